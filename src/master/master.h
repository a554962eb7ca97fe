/* The master's state machine, independent of sockets: object index,
 * segments, clients, leases, eviction, and the RPC protocol handler that
 * turns request frames into response frames (kvs_master_feed /
 * kvs_master_handle). The epoll server (server.h), the HTTP endpoints
 * (web.h) and the fuzzer drive it.
 *
 * Threads: callers hold kvs_master_lock() around every call below except
 * kvs_master_new/free (the event loop holds it per batch of frames, HTTP
 * handlers while reading state). */
#ifndef KVS_MASTER_MASTER_H
#define KVS_MASTER_MASTER_H

#include <stddef.h>
#include <stdint.h>

#include "proto/proto.h"

typedef struct kvs_master kvs_master;

#define KVS_MASTER_MAX_ALLOW_UIDS 32

typedef struct kvs_master_opts {
    const char *secret;        /* shared secret (copied); NULL/"" = none. A connection
                                  proves it in HELLO; see kvs_master_handle for who
                                  may connect without it */
    int secret_is_pool;        /* the secret is this user's generated pool secret,
                                  not a configured one: unix-socket peers with an
                                  allowed uid need not prove it */
    uint32_t allow_uids[KVS_MASTER_MAX_ALLOW_UIDS]; /* more uids allowed on unix
                                  sockets besides the master's own uid and root */
    uint32_t n_allow_uids;
    uint32_t client_ttl_ms;    /* default 10000 */
    uint32_t lease_ms;         /* default 5000 */
    uint32_t put_timeout_ms;   /* default 30000 */
    double evict_high;         /* default 0.95 (fraction of a segment) */
    double evict_low;          /* default 0.90 */
    uint32_t max_clients;      /* default 65536 */
    uint32_t max_segments;     /* default 4096 */
    uint64_t max_leases;       /* default 1048576 */
    uint64_t max_objects;      /* default 67108864 */
    uint32_t disconnect_grace_ms; /* a client whose connection closed is expired
                                     after this (0 = default 1000; never more
                                     than client_ttl_ms) */
    uint32_t recovery_wait_ms; /* after a start, how long segments' owners may take to
                                  come back and hand in their directories before the
                                  rebuild counts as complete (default 5000, or
                                  KVSHELF_RECOVERY_WAIT_MS) */
    uint64_t id_base;          /* 0 (default): client, segment, object and lease ids
                                  start at random values; else they all start here
                                  (tests, fuzzing) */
} kvs_master_opts;

typedef struct kvs_master_counters {
    uint64_t puts, gets, hits, misses, evictions, removes, expired_clients, revoked_puts,
        fenced_puts, fences,
        bad_frames, auth_failures, expired_leases;
    uint64_t disconnected_clients; /* expired because their connection closed
                                      (also counted in expired_clients) */
    uint64_t recovered_objects;  /* objects taken back from segments' directories */
    uint64_t recovery_rejected;  /* directory entries refused (overlap, key taken, bounds) */
    uint64_t dir_listed;         /* entries the owners confirmed listing */
    uint64_t dir_unlisted;       /* removals the owners confirmed (space freed then) */
} kvs_master_counters;

/* Where the rebuild of the index from the segments' directories stands
 * (rebuild.c). */
typedef struct kvs_master_recovery {
    int complete;              /* the wait passed and every segment that keeps a
                                  directory has handed it in */
    uint64_t segments_collected, segments_pending;
    uint64_t objects_recovered, entries_rejected;
    uint64_t complete_after_ms; /* master uptime when it became complete; 0 = not yet */
} kvs_master_recovery;

/* Fills *out with the state of the rebuild. */
void kvs_master_get_recovery(kvs_master *m, kvs_master_recovery *out);

/* Fills *o with the defaults above. */
void kvs_master_opts_init(kvs_master_opts *o);

/* Creates a master with options *o (copied). KVS_OK and *out, or
 * KVS_ERR_INVALID (bad options: low > high, zero ttl...) / KVS_ERR_NOMEM. */
int kvs_master_new(const kvs_master_opts *o, kvs_master **out);

/* Frees the master and everything it holds. Safe with NULL. */
void kvs_master_free(kvs_master *m);

/* The master mutex (see the threads note above). */
void kvs_master_lock(kvs_master *m);
void kvs_master_unlock(kvs_master *m);

/* Milliseconds on the master's clock: the monotonic clock, or the value
 * set with kvs_master_set_time (tests; 0 returns to the real clock). */
uint64_t kvs_master_now(const kvs_master *m);
void kvs_master_set_time(kvs_master *m, uint64_t now_ms);

/* Reigns: each master that serves a pool has a reign number, higher than
 * every earlier one (failover: recorded in etcd when the election is won;
 * otherwise the wall clock at start); a segment's owner records in its
 * directory the reign it follows (the MOUNT reply says it). floor is the
 * latest earlier reign known to have served (0: unknown). A directory
 * handed in by an owner that last followed a reign older than floor missed
 * a whole reign, whose removals and newer versions it does not reflect:
 * it is refused. Without etcd the floor is also raised by every directory
 * handed in, so the check holds once any segment of the later reign came
 * back first. Call before serving. */
void kvs_master_set_reign(kvs_master *m, uint64_t reign, uint64_t floor);
uint64_t kvs_master_reign(const kvs_master *m);

/* Periodic work (call every ~100 ms): reaps expired leases, revokes puts
 * past their deadline, expires silent clients, enforces watermarks. */
void kvs_master_tick(kvs_master *m);

/* The connection of client `client_id` closed (its process may have died:
 * the kernel closes the sockets of a killed process; a live client that
 * lost its connection says HELLO again and gets a new id). Unless a request
 * names it again meanwhile (it then lives on by its TTL), kvs_master_tick
 * expires the client after the disconnect grace
 * (kvs_master_opts.disconnect_grace_ms) instead of its TTL, so the segments
 * of a crashed node leave the pool at once. Unknown ids are ignored. */
void kvs_master_client_disconnected(kvs_master *m, uint64_t client_id);

/* 1 once a SHUTDOWN request was accepted. */
int kvs_master_shutdown_requested(const kvs_master *m);

/* Copies the counters. */
void kvs_master_get_counters(const kvs_master *m, kvs_master_counters *out);

/* ---- protocol handling for one connection ---- */

/* Per-connection protocol state (owned by the caller, no heap memory). */
typedef struct kvs_mconn {
    uint8_t nonce[KVS_NONCE_LEN];
    uint64_t client_id; /* client registered by this connection's HELLO; 0 before */
    int authed;         /* a HELLO succeeded */
    int local;          /* unix socket or loopback TCP peer */
    int peer_uid;       /* kernel-reported uid (unix sockets, SO_PEERCRED), -1 if unknown */
    int by_secret;      /* the HELLO proved the secret (else: allowed by peer_uid) */
    uint32_t parked_seg; /* segment whose DIR_SYNC waits on this connection; 0 = none */
    uint32_t deferred;   /* REMOVE replies of this connection waiting (dirsync.c) */
} kvs_mconn;

/* Starts a connection: picks a random nonce and appends the CHALLENGE frame
 * to `out`. `local`/`peer_uid` describe the peer (see kvs_mconn); on a TCP
 * connection the CHALLENGE also offers the master's unix socket (see
 * kvs_master_set_local_path), for clients on the same host. */
void kvs_mconn_init(kvs_master *m, kvs_mconn *c, int local, int peer_uid, kvs_wbuf *out);

/* Sets the unix socket path ("unix:" not included; NULL or "" for none) that
 * CHALLENGE offers to TCP peers; a client on the same host then talks to
 * the master over it (no TCP stack on either side). KVS_OK or
 * KVS_ERR_TOO_LARGE (path of 108 bytes or more). */
int kvs_master_set_local_path(kvs_master *m, const char *path);

/* Handles one request frame (header already validated by
 * kvs_frame_hdr_decode) and appends its response to `out` (nothing for a
 * request flagged KVS_F_NOREPLY). Returns KVS_OK
 * to keep the connection, or a negative error meaning "flush `out`, then
 * close": KVS_ERR_PROTO (malformed/unexpected frame; nothing appended),
 * KVS_ERR_AUTH / KVS_ERR_UNSUPPORTED (refused HELLO; a reply was appended),
 * KVS_ERR_NOMEM.
 *
 * Who may connect (HELLO): a peer that proves the secret; or a unix-socket
 * peer whose kernel-reported uid (peer_uid) is the master's own, root or
 * one of opts.allow_uids, when the master has no secret or only the pool
 * secret (opts.secret_is_pool). A TCP peer always needs the secret: with
 * none, the master accepts no TCP peer. The uid a HELLO claims is never
 * trusted. SHUTDOWN is accepted from a connection that proved the secret
 * or from a unix peer of the master's own uid or root; else KVS_ERR_AUTH
 * (the connection stays open). */
int kvs_master_handle(kvs_master *m, kvs_mconn *c, const kvs_frame_hdr *h, const uint8_t *body,
                      size_t len, kvs_wbuf *out);

/* A REMOVE of an object its segment's directory may list is answered only
 * once the owner confirmed unlisting it (else a master restart could bring
 * the removed value back); kvs_master_flush_parked appends such replies
 * too, once complete.
 *
 * DIR_SYNC requests that find no change wait at the master ("parked", at
 * most the wait the request asks for, <= KVS_DIR_PARK_MAX_MS) instead of
 * being answered empty, so an owner hears of a removal at once without
 * polling. kvs_master_flush_parked appends the answers of parked requests
 * whose changes came or whose wait ran out to their connection's output
 * buffer (the `out` given to kvs_master_handle with the request, which
 * must stay valid until kvs_master_conn_closed) and returns how many it
 * appended; the caller then sends the pending output of its connections.
 * Call it after every batch of requests and on every tick. */
#define KVS_DIR_PARK_MAX_MS 1000u
int kvs_master_flush_parked(kvs_master *m);

/* Milliseconds until kvs_master_flush_parked has an answer due (0: now;
 * UINT64_MAX: nothing parked): an event loop sleeps no longer than that. */
uint64_t kvs_master_park_wait_ms(kvs_master *m);

/* The connection `c` closes: a DIR_SYNC it parked and REMOVE replies it
 * waits for are forgotten (its output buffer is never written again). */
void kvs_master_conn_closed(kvs_master *m, kvs_mconn *c);

/* Bodies larger than this before a successful HELLO close the connection
 * (an unauthenticated peer cannot make the master buffer 64 MiB). */
#define KVS_PREAUTH_MAX_BODY 4096u

/* Parses and handles every complete frame in data[0..len) (pipelining),
 * appending responses to `out`; *consumed gets the bytes used (a trailing
 * partial frame is left for the next call). Returns KVS_OK or, as
 * kvs_master_handle, a negative error meaning "flush, then close". */
int kvs_master_feed(kvs_master *m, kvs_mconn *c, const uint8_t *data, size_t len,
                    kvs_wbuf *out, size_t *consumed);

/* Bytes a connection must buffer before kvs_master_feed can make progress:
 * at least the next frame's header + body, given the bytes buffered now. */
size_t kvs_master_frame_need(const uint8_t *data, size_t len);

/* ---- reports ---- */

/* STATS document (see docs): malloc'd NUL-terminated JSON, or NULL on out
 * of memory. The caller frees it. */
char *kvs_master_stats_json(kvs_master *m);

/* Prometheus text exposition (format 0.0.4) of gauges and counters;
 * `extra_metadata_keys` < 0 omits the metadata gauge. malloc'd, NUL-
 * terminated, length in *len; NULL on out of memory. */
char *kvs_master_metrics_text(kvs_master *m, long extra_metadata_keys, size_t *len);

#endif
