/* The master's RPC server: one thread running an epoll event loop over
 * non-blocking TCP and unix-socket listeners and their connections (input
 * buffer, frame parsing via kvs_master_feed, output buffer, pipelining),
 * plus a ~100 ms timer calling kvs_master_tick. Holds the master lock while
 * it handles the frames of one read and while ticking. */
#ifndef KVS_MASTER_SERVER_H
#define KVS_MASTER_SERVER_H

#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "master/master.h"

typedef struct kvs_server kvs_server;

/* Creates a server over m (not owned). KVS_OK and *out, or KVS_ERR_IO /
 * KVS_ERR_NOMEM. */
int kvs_server_new(kvs_master *m, kvs_server **out);

/* Adds a listener on `addr` ("host:port", "[v6]:port", "unix:/path"; port 0
 * picks one). The bound TCP port goes to *port (0 for unix; may be NULL).
 * KVS_OK, KVS_ERR_CONFIG (bad address, too many listeners) or KVS_ERR_IO;
 * a message goes to err. */
int kvs_server_listen(kvs_server *s, const char *addr, uint16_t *port, char *err, size_t errlen);

/* After handling events the loop keeps polling (epoll_wait with timeout 0)
 * for this long before it sleeps: the next request of a busy client is
 * then read at once instead of after a wake-up of an idle CPU, which costs
 * tens of microseconds (far more in a VM). It burns CPU only in the gaps
 * of traffic, at most this long per gap. */
#define KVS_SERVER_BUSY_POLL_US 100u

/* Sets the busy-poll time in microseconds (0: sleep at once). */
void kvs_server_set_busy_poll(kvs_server *s, uint32_t us);

/* Serving under a leadership lease (failover through etcd,
 * src/master/election.h): `until_ms` (not owned; NULL = no limit, the
 * default) holds the monotonic time in ms (kvs_now_ms) until which this
 * master may serve; another thread extends it as the lease is renewed, or
 * sets it to 0 to step down. Once it has passed, kvs_server_run stops before
 * handling any further request and returns KVS_ERR_UNAVAILABLE; the caller
 * then frees the server, which closes every connection, so clients look up
 * the new leader. */
void kvs_server_set_serve_until(kvs_server *s, const _Atomic uint64_t *until_ms);

/* ---- bounded resources ----
 * Connections: at most max_conns at once (kvs_server_set_max_conns; by
 * default derived from RLIMIT_NOFILE, see kvs_server_default_max_conns). A
 * connection that has not completed HELLO within hello_ms (default
 * KVS_SERVER_HELLO_MS) is closed. When the limit is reached, a new
 * connection takes the place of the oldest one still without HELLO, or is
 * closed at once when every connection is authenticated (counted, logged at
 * most once a second). When accept fails for want of descriptors (EMFILE,
 * ENFILE), the oldest connection without HELLO is closed to make room; with
 * none, the loop stops accepting for a back-off that doubles from
 * KVS_SERVER_ACCEPT_BACKOFF_MIN_MS to KVS_SERVER_ACCEPT_BACKOFF_MAX_MS (one
 * log line per pause) instead of waking up for the same error again and
 * again. */
#define KVS_SERVER_MAX_CONNS 65536u
#define KVS_SERVER_HELLO_MS 3000u
#define KVS_SERVER_ACCEPT_BACKOFF_MIN_MS 10u
#define KVS_SERVER_ACCEPT_BACKOFF_MAX_MS 1000u

/* The default connection limit: the soft RLIMIT_NOFILE less a reserve of
 * max(32, limit/8) descriptors for everything else (listeners, epoll, the
 * HTTP server, files), at least 8 and at most KVS_SERVER_MAX_CONNS. */
uint32_t kvs_server_default_max_conns(void);

/* Sets the connection limit (0: the default above; at most
 * KVS_SERVER_MAX_CONNS). A limit above what RLIMIT_NOFILE allows is kept:
 * accept then meets EMFILE, handled as described above. */
void kvs_server_set_max_conns(kvs_server *s, uint32_t n);

/* The connection limit in force. */
uint32_t kvs_server_max_conns(const kvs_server *s);

/* Sets how long a new connection may take to complete HELLO (0: the
 * default, KVS_SERVER_HELLO_MS). */
void kvs_server_set_hello_ms(kvs_server *s, uint32_t ms);

/* Sets a function the loop calls at start and, after its tick expired
 * clients, once a second for the next few seconds (NULL: none): the master
 * process passes kvs_segment_gc, which removes the shared-memory files of
 * segment owners that died on this host. It returns how many it removed
 * (logged). */
void kvs_server_set_gc(kvs_server *s, int (*gc)(void));

/* Connection counters of the loop. */
typedef struct kvs_server_counters {
    uint64_t accepted;       /* connections accepted */
    uint64_t refused;        /* closed at once: at the limit, every connection authenticated */
    uint64_t evicted;        /* without HELLO, closed to make room for a newer one */
    uint64_t hello_timeouts; /* without HELLO after hello_ms: closed */
    uint64_t accept_pauses;  /* accepting paused for want of descriptors */
    uint64_t open;           /* connections open now */
} kvs_server_counters;

/* Copies the counters. Call from the loop's thread, or while it is stopped. */
void kvs_server_get_counters(const kvs_server *s, kvs_server_counters *out);

/* Runs the loop until *stop becomes non-zero or, when stop_on_shutdown, a
 * SHUTDOWN was accepted; then flushes pending replies (best effort).
 * Returns KVS_OK, KVS_ERR_IO (epoll failed) or KVS_ERR_UNAVAILABLE (the
 * leadership lease of kvs_server_set_serve_until ended: nothing flushed). */
int kvs_server_run(kvs_server *s, volatile sig_atomic_t *stop, int stop_on_shutdown);

/* Closes every connection and listener (unix socket files are removed) and
 * frees the server. Safe with NULL. */
void kvs_server_free(kvs_server *s);

#endif
