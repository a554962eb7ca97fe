/* Connection to the master: one socket shared by every thread of a client.
 *
 * Callers send request frames (under a send lock, so frames never
 * interleave) and wait for the reply with the same req_id, so requests of
 * many threads are pipelined. There is no reader thread: one waiting caller
 * at a time (the "leader") reads frames from the socket and hands each body
 * to its waiter; when its own reply has come it passes the role on to
 * another waiter. A lone caller thus reads its own reply, with no thread
 * hand-off (one wake-up per round trip instead of two). Replies nobody waits
 * for (posted requests, timed-out calls) are read and dropped by the next
 * leader. When the connection fails or is killed, every waiter is woken with
 * the failure code and later calls fail at once: the owner opens a new
 * kvs_rpc (see client.c for reconnects).
 *
 * Lifetime: reference counted; the last kvs_rpc_unref closes the socket.
 */
#ifndef KVS_CLIENT_RPC_H
#define KVS_CLIENT_RPC_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "common/net.h"

typedef struct kvs_rpc kvs_rpc;

/* A caller waiting for its reply (private to rpc.c; here so that a request
 * can live on the caller's stack between kvs_rpc_start and kvs_rpc_finish). */
struct waiter {
    struct waiter *next;
    uint64_t req_id;
    int done;
    int status;
    uint8_t *body;
    uint32_t len;
    pthread_cond_t cv;
};

/* One request in flight, owned by the caller. */
typedef struct kvs_rpc_req {
    struct waiter w;
} kvs_rpc_req;

/* What the master said in its HELLO reply. */
typedef struct kvs_hello_info {
    uint64_t client_id;
    uint32_t ttl_ms, lease_ms;
} kvs_hello_info;

/* Connects to the master at `a`, authenticates as `role` with `secret`.
 * timeout_ms bounds the connect and handshake and
 * is the send timeout afterwards. Returns KVS_OK (with one reference held
 * by the caller), KVS_ERR_CONN, KVS_ERR_TIMEOUT, KVS_ERR_AUTH or
 * KVS_ERR_PROTO. */
int kvs_rpc_open(const kvs_addr *a, const char *secret, uint32_t role, int timeout_ms,
                 kvs_rpc **out, kvs_hello_info *hello);

/* Sends a request of `type` with `body` and waits up to timeout_ms for the
 * reply. Returns the reply's status (KVS_OK or the master's negative error)
 * and, on KVS_OK, the reply body in *resp (malloc'd, free() it; NULL when
 * empty) and its length in *resp_len. Transport failures give KVS_ERR_CONN
 * (or the code the connection was killed with), KVS_ERR_TIMEOUT when no
 * reply came in time (the connection stays usable). */
int kvs_rpc_call(kvs_rpc *r, uint16_t type, const void *body, size_t len, int timeout_ms,
                 uint8_t **resp, uint32_t *resp_len);

/* kvs_rpc_call in two halves, so the caller can work while the master
 * answers: kvs_rpc_start sends the request (KVS_OK, or the transport
 * error the request has already completed with); kvs_rpc_finish waits for
 * the reply exactly as kvs_rpc_call does. Every kvs_rpc_start must be
 * followed by one kvs_rpc_finish on the same `q`, whatever it returned. */
int kvs_rpc_start(kvs_rpc *r, kvs_rpc_req *q, uint16_t type, const void *body, size_t len);
int kvs_rpc_finish(kvs_rpc *r, kvs_rpc_req *q, int timeout_ms, uint8_t **resp,
                   uint32_t *resp_len);

/* Sends a request flagged KVS_F_NOREPLY (the master answers nothing) and
 * does not wait. Over TCP the kernel holds it (MSG_MORE) until the next
 * request on this connection or ~200 ms, so it costs no wake-up of its own.
 * KVS_OK or a transport error. */
int kvs_rpc_post(kvs_rpc *r, uint16_t type, const void *body, size_t len);

/* 1 while the connection works. */
int kvs_rpc_alive(kvs_rpc *r);

/* Fails the connection: pending and later calls return `err`. */
void kvs_rpc_kill(kvs_rpc *r, int err);

void kvs_rpc_ref(kvs_rpc *r);
void kvs_rpc_unref(kvs_rpc *r);

#endif
