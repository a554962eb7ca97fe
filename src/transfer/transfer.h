/* Transfer engine: moves object bytes between a process's memory and the
 * segments of the pool.
 *
 * Server side (kvs_xfer_server): a listening thread plus one thread per
 * connection (blocking I/O; each connection is served in order). Every
 * connection starts with CHALLENGE / HELLO (proto.h); then T_READ replies are
 * sent with one sendmsg straight from segment memory (headers and data
 * gathered, several replies per system call when requests are pipelined)
 * and T_WRITE payloads are received straight into segment memory. Each
 * access is bounds-checked against the server's own segments: an access
 * outside a segment, a malformed frame or an unexpected type closes that
 * connection only. An unknown segment id (e.g. a stale id after the master
 * restarted) is answered with KVS_ERR_UNAVAILABLE.
 *
 * Bounded: at most kvs_xfer_server_max_conns() connection threads. A
 * connection must complete HELLO within KVSHELF_XFER_HELLO_MS (default
 * KVS_XFER_HELLO_MS) or is closed. At the limit a new connection takes the
 * place of the oldest one still in its handshake, or is closed at once when
 * every thread serves an authenticated peer (counted; logged at most once a
 * second); so idle connections that never say HELLO cannot lock others
 * out. Out of descriptors (EMFILE/ENFILE), accepting pauses for 10 ms .. 1 s
 * (doubling; one log line per pause) instead of spinning.
 *
 * Client side (kvs_xfer_client): one persistent connection per peer address,
 * shared by all threads. A batch call enqueues and sends all its requests
 * (values larger than KVS_MAX_CHUNK are split into pieces) before waiting;
 * a reader thread per connection receives each reply straight into the
 * caller's buffer. A failed connection fails its pending requests with
 * KVS_ERR_UNAVAILABLE and is replaced on next use. A batch that makes no
 * progress for timeout_ms kills the connections it waits on, so callers
 * never hang and buffers are never written after the call returns; a peer
 * that owed replies then is not tried again for 1 s (requests to it fail at
 * once with KVS_ERR_UNAVAILABLE), so a call that would try a stopped or
 * partitioned peer twice (a get whose early read failed) waits one timeout,
 * not two.
 *
 * Same-host mappings (kvs_shm_cache): segments of other processes of this
 * user on this host, mapped by shm name and cached, so bytes move with
 * memcpy and no socket.
 */
#ifndef KVS_TRANSFER_H
#define KVS_TRANSFER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct kvs_segment; /* segment/segment.h */

#define KVS_XFER_ADDR_MAX 280 /* "host:port" as kvs_addr_format writes it */

/* ---------------- handshake (shared with the master RPC client) -------- */

/* Client half of CHALLENGE / HELLO on a connected blocking socket: reads the
 * CHALLENGE, sends HELLO(role, auth = HMAC(secret, nonce)), reads the reply.
 * The reply body (HELLO resp) is copied into resp (cap bytes), its length in
 * *resp_len (both may be NULL/0). Uses timeout_ms for each step. Returns
 * KVS_OK, KVS_ERR_AUTH, KVS_ERR_PROTO, KVS_ERR_CONN or KVS_ERR_TIMEOUT. */
int kvs_hs_client(int fd, const char *secret, uint32_t role, int timeout_ms, uint8_t *resp,
                  size_t cap, uint32_t *resp_len);

/* What a CHALLENGE carried. */
typedef struct kvs_challenge {
    uint8_t nonce[16];
    char local_path[108]; /* the master's unix socket, offered on TCP and set
                             only when its host tag proves it is this host */
} kvs_challenge;

/* The two halves of kvs_hs_client: read the CHALLENGE (KVS_OK, KVS_ERR_PROTO,
 * KVS_ERR_CONN, KVS_ERR_TIMEOUT), then send HELLO and read its reply (as
 * kvs_hs_client). Between them a client may switch to ch->local_path. */
int kvs_hs_read_challenge(int fd, int timeout_ms, kvs_challenge *ch);
int kvs_hs_hello(int fd, const kvs_challenge *ch, const char *secret, uint32_t role,
                 int timeout_ms, uint8_t *resp, size_t cap, uint32_t *resp_len);

/* Sends all iovecs with sendmsg(MSG_NOSIGNAL), retrying short writes and
 * EINTR (the iovec array is modified). KVS_OK, KVS_ERR_TIMEOUT (SO_SNDTIMEO)
 * or KVS_ERR_CONN. */
int kvs_sendv_full(int fd, struct iovec *iov, int iovcnt);

/* kvs_sendv_full with extra sendmsg flags (MSG_MORE: on TCP the kernel holds
 * the bytes until the next send without it, at most ~200 ms). */
int kvs_sendv_flags(int fd, struct iovec *iov, int iovcnt, int flags);

/* ---------------- server ---------------- */

typedef struct kvs_xfer_server kvs_xfer_server;

/* Starts a server listening on host:0 (a free port). It needs a non-empty
 * secret, on loopback too (else KVS_ERR_CONFIG): every peer must prove it in
 * HELLO before any T_READ/T_WRITE, so other users of the host get nothing.
 * Returns KVS_OK or an error; the address peers use ("host:port") is
 * kvs_xfer_server_addr(). */
int kvs_xfer_server_start(const char *host, const char *secret, kvs_xfer_server **out);

/* "host:port" of the listening socket (valid until stop). */
const char *kvs_xfer_server_addr(const kvs_xfer_server *s);

/* Serves the memory of `seg` (not copied: it must stay mapped until stop)
 * as segment `id` (at most 16 segments). An id already present is replaced.
 * Every T_WRITE is fenced like a same-host write: applied only while its
 * epoch is current (kvs_segment_write_begin), else answered
 * KVS_ERR_UNAVAILABLE with its payload discarded. KVS_OK or KVS_ERR_NO_SPACE. */
int kvs_xfer_server_add_segment(kvs_xfer_server *s, uint32_t id, struct kvs_segment *seg);

/* Stops serving segment `id` (in-flight requests on it finish first only if
 * they already passed the lookup: the memory itself must stay mapped until
 * kvs_xfer_server_stop). */
void kvs_xfer_server_remove_segment(kvs_xfer_server *s, uint32_t id);

#define KVS_XFER_MAX_CONNS 256 /* default connection threads per server */
#define KVS_XFER_HELLO_MS 3000 /* default HELLO deadline of a new connection */

/* Connection threads a server allows: KVSHELF_XFER_MAX_CONNS (1..65536,
 * default KVS_XFER_MAX_CONNS), lowered to (RLIMIT_NOFILE - 32) / 2 (at
 * least 4) so the process keeps descriptors for everything else. */
int kvs_xfer_server_max_conns(void);

/* Connections refused at the limit (all authenticated), closed in their
 * handshake to make room for newer ones, closed for missing their HELLO
 * deadline, and accept pauses for want of descriptors. Any may be NULL. */
void kvs_xfer_server_conn_counters(const kvs_xfer_server *s, uint64_t *refused,
                                   uint64_t *kicked, uint64_t *hello_timeouts,
                                   uint64_t *accept_pauses);

/* Closes the listener and every connection, joins all threads, frees. NULL ok. */
void kvs_xfer_server_stop(kvs_xfer_server *s);

/* Requests and bytes served so far. */
void kvs_xfer_server_counters(const kvs_xfer_server *s, uint64_t *requests, uint64_t *bytes,
                              uint64_t *bad_frames);

/* ---------------- client ---------------- */

typedef struct kvs_xfer_client kvs_xfer_client;

/* One operation of a batch. */
typedef struct kvs_xfer_op {
    const char *peer;    /* transfer_addr of the segment's server ("host:port") */
    uint32_t segment_id; /* segment at that server */
    uint64_t offset;     /* byte offset in the segment */
    void *buf;           /* read: destination; write: source (not modified) */
    uint64_t len;        /* bytes to move (any size; split into KVS_MAX_CHUNK pieces) */
    int write;           /* 1 = T_WRITE (buf -> segment), 0 = T_READ (segment -> buf) */
    int status;          /* out: KVS_OK, KVS_ERR_UNAVAILABLE (peer unreachable,
                            segment gone, or a write refused as stale), KVS_ERR_AUTH, ... */
    uint64_t epoch;      /* write: the reservation's epoch (PUT_START); read: unused */
} kvs_xfer_op;

/* Creates a client that authenticates with `secret` (may be empty) and
 * gives up on a peer after timeout_ms without progress. */
int kvs_xfer_client_new(const char *secret, int timeout_ms, kvs_xfer_client **out);

/* Closes every connection (pending requests fail), waits for the reader
 * threads to exit, frees. Must not race with kvs_xfer_run. NULL ok. */
void kvs_xfer_client_free(kvs_xfer_client *xc);

/* Runs n operations: sends every request to its peer (pipelined, several
 * per system call) before waiting for any reply. Thread-safe; many calls
 * may share connections. Sets each op's status and returns the number of
 * ops with KVS_OK. Never returns before every reply for this call was
 * received or abandoned, so buffers are not touched after it returns. */
int kvs_xfer_run(kvs_xfer_client *xc, kvs_xfer_op *ops, size_t n);

/* The two halves of kvs_xfer_run, so that a caller can do other work (a
 * master round trip) while the bytes move. kvs_xfer_submit sends every
 * request and returns at once with *out set (KVS_OK), or KVS_ERR_NOMEM with
 * *out NULL and the ops' statuses set; ops[] and every buffer they name
 * must stay untouched until kvs_xfer_wait(*out) returns. kvs_xfer_wait
 * waits exactly as kvs_xfer_run does, sets the statuses, frees the batch
 * and returns the number of ops with KVS_OK (0 for NULL). Every submitted
 * batch must be waited for, exactly once. */
typedef struct kvs_xfer_batch kvs_xfer_batch;
int kvs_xfer_submit(kvs_xfer_client *xc, kvs_xfer_op *ops, size_t n, kvs_xfer_batch **out);
int kvs_xfer_wait(kvs_xfer_batch *b);

/* Kills every connection (pending requests fail with KVS_ERR_UNAVAILABLE)
 * and makes later kvs_xfer_run calls fail at once with KVS_ERR_CLOSED. Used
 * when the owner is closing, so callers still inside return promptly. */
void kvs_xfer_client_cancel(kvs_xfer_client *xc);

/* Drops the connection to `peer` (if any); pending requests on it fail. */
void kvs_xfer_client_drop_peer(kvs_xfer_client *xc, const char *peer);

/* ---------------- same-host mappings ---------------- */

typedef struct kvs_shm_cache kvs_shm_cache;

kvs_shm_cache *kvs_shm_cache_new(void);

/* Unmaps everything and frees. Pointers handed out become invalid. NULL ok. */
void kvs_shm_cache_free(kvs_shm_cache *sc);

/* Returns segment `name` mapped read-write (size bytes at least; its memory
 * checked to be that segment, see kvs_segment_map), mapping and caching it
 * on first use; NULL if it cannot be mapped (the failure is cached too, and
 * retried after a while). Returned segments (and their base addresses) stay
 * valid until kvs_shm_cache_free (see retire). */
struct kvs_segment *kvs_shm_cache_get(kvs_shm_cache *sc, const char *name, uint64_t size);

/* Registers this process's own segment `seg` (not copied: it must outlive
 * the cache) so get() returns it without mapping it twice. */
void kvs_shm_cache_add_local(kvs_shm_cache *sc, struct kvs_segment *seg);

/* The cached segment whose data contains address p (retired ones too), or
 * NULL. */
struct kvs_segment *kvs_shm_cache_find_addr(kvs_shm_cache *sc, const void *p);

/* Releases the memory of every cached mapping whose name is not in
 * names[0..n) (its segment left the pool), keeping the address range
 * reserved as zero pages so stale pointers never fault. */
void kvs_shm_cache_retire_absent(kvs_shm_cache *sc, const char *const *names, size_t n);

#endif
