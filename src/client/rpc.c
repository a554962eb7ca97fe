/* Master connection with a reader thread and req_id -> waiter matching
 * (see rpc.h). */
#include "rpc.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "proto/proto.h"
#include "transfer/transfer.h"

struct waiter {
    struct waiter *next;
    uint64_t req_id;
    int done;
    int status;
    uint8_t *body;
    uint32_t len;
    pthread_cond_t cv;
};

struct kvs_rpc {
    int fd;
    pthread_t reader;
    pthread_mutex_t send_mu;
    pthread_mutex_t mu; /* waiters, dead, err */
    struct waiter *waiters;
    int dead;
    int err;
    uint64_t next_id;
    atomic_int refs;
};

static pthread_condattr_t g_cattr;
static pthread_once_t g_cattr_once = PTHREAD_ONCE_INIT;

static void cattr_init(void)
{
    pthread_condattr_init(&g_cattr);
    pthread_condattr_setclock(&g_cattr, CLOCK_MONOTONIC);
}

/* Marks dead and wakes every waiter with `err` (first failure wins). */
static void fail_all(kvs_rpc *r, int err)
{
    pthread_mutex_lock(&r->mu);
    if (!r->dead) {
        r->dead = 1;
        r->err = err;
    }
    for (struct waiter *w = r->waiters; w; w = w->next) {
        w->done = 1;
        w->status = r->err;
        pthread_cond_signal(&w->cv);
    }
    r->waiters = NULL;
    pthread_mutex_unlock(&r->mu);
}

static void *reader_main(void *arg)
{
    kvs_rpc *r = arg;
    for (;;) {
        uint8_t hb[KVS_FRAME_HDR];
        if (kvs_read_full(r->fd, hb, sizeof hb)) break;
        kvs_frame_hdr h;
        if (kvs_frame_hdr_decode(hb, KVS_MAX_BODY, &h) || !(h.flags & KVS_F_RESPONSE)) {
            KVS_LOGW("client: malformed frame from the master; reconnecting");
            break;
        }
        uint8_t *body = NULL;
        if (h.body_len) {
            body = malloc(h.body_len);
            if (!body) break;
            if (kvs_read_full(r->fd, body, h.body_len)) {
                free(body);
                break;
            }
        }
        pthread_mutex_lock(&r->mu);
        struct waiter **pp = &r->waiters, *w = NULL;
        while (*pp && (*pp)->req_id != h.req_id) pp = &(*pp)->next;
        if (*pp) {
            w = *pp;
            *pp = w->next;
            w->done = 1;
            w->status = h.status > 0 ? KVS_ERR_PROTO : h.status;
            w->body = body;
            w->len = h.body_len;
            body = NULL;
            pthread_cond_signal(&w->cv);
        }
        pthread_mutex_unlock(&r->mu);
        free(body); /* nobody waits for it */
    }
    shutdown(r->fd, SHUT_RDWR);
    fail_all(r, KVS_ERR_CONN);
    return NULL;
}

int kvs_rpc_open(const kvs_addr *a, const char *secret, uint32_t role, int timeout_ms,
                 kvs_rpc **out, kvs_hello_info *hello)
{
    pthread_once(&g_cattr_once, cattr_init);
    *out = NULL;
    int fd = kvs_connect(a, timeout_ms);
    if (fd < 0) return fd == KVS_ERR_TIMEOUT ? KVS_ERR_TIMEOUT : KVS_ERR_CONN;
    uint8_t resp[64];
    uint32_t rlen = 0;
    int rc = kvs_hs_client(fd, secret, role, timeout_ms, resp, sizeof resp, &rlen);
    if (rc) {
        close(fd);
        return rc;
    }
    kvs_rbuf rb;
    kvs_rbuf_init(&rb, resp, KVS_MIN(rlen, (uint32_t)sizeof resp));
    kvs_hello_info hi;
    hi.client_id = kvs_rbuf_u64(&rb);
    hi.ttl_ms = kvs_rbuf_u32(&rb);
    hi.lease_ms = kvs_rbuf_u32(&rb);
    if (kvs_rbuf_finish(&rb)) {
        close(fd);
        return KVS_ERR_PROTO;
    }
    if (hello) *hello = hi;
    /* Sends time out (a stuck master); reads block: the reader waits. */
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000}, zero = {0, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &zero, sizeof zero);
    kvs_rpc *r = calloc(1, sizeof *r);
    if (!r) {
        close(fd);
        return KVS_ERR_NOMEM;
    }
    r->fd = fd;
    r->next_id = 1;
    atomic_init(&r->refs, 1);
    pthread_mutex_init(&r->send_mu, NULL);
    pthread_mutex_init(&r->mu, NULL);
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setstacksize(&at, 256u << 10);
    rc = pthread_create(&r->reader, &at, reader_main, r);
    pthread_attr_destroy(&at);
    if (rc) {
        close(fd);
        pthread_mutex_destroy(&r->send_mu);
        pthread_mutex_destroy(&r->mu);
        free(r);
        return KVS_ERR_IO;
    }
    *out = r;
    return KVS_OK;
}

/* Sends one frame; on failure kills the connection. */
static int send_frame(kvs_rpc *r, uint16_t type, uint64_t req_id, const void *body, size_t len)
{
    if (len > KVS_MAX_BODY) return KVS_ERR_TOO_LARGE;
    uint8_t hb[KVS_FRAME_HDR];
    kvs_frame_hdr h = {KVS_MAGIC, type, 0, (uint32_t)len, 0, req_id};
    kvs_frame_hdr_encode(&h, hb);
    struct iovec iov[2] = {{hb, sizeof hb}, {(void *)body, len}};
    pthread_mutex_lock(&r->send_mu);
    int rc = kvs_sendv_full(r->fd, iov, len ? 2 : 1);
    pthread_mutex_unlock(&r->send_mu);
    if (rc) {
        KVS_LOGW("client: sending %s to the master failed: %s", kvs_msg_name(type),
                 kvs_strerror(rc));
        kvs_rpc_kill(r, KVS_ERR_CONN);
        return KVS_ERR_CONN;
    }
    return KVS_OK;
}

int kvs_rpc_call(kvs_rpc *r, uint16_t type, const void *body, size_t len, int timeout_ms,
                 uint8_t **resp, uint32_t *resp_len)
{
    *resp = NULL;
    *resp_len = 0;
    struct waiter w;
    memset(&w, 0, sizeof w);
    pthread_cond_init(&w.cv, &g_cattr);
    pthread_mutex_lock(&r->mu);
    if (r->dead) {
        int e = r->err;
        pthread_mutex_unlock(&r->mu);
        pthread_cond_destroy(&w.cv);
        return e;
    }
    w.req_id = r->next_id++;
    w.next = r->waiters;
    r->waiters = &w;
    pthread_mutex_unlock(&r->mu);

    send_frame(r, type, w.req_id, body, len); /* a failure wakes us through fail_all */

    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t ns = (uint64_t)ts.tv_nsec + (uint64_t)(timeout_ms > 0 ? timeout_ms : 5000) * 1000000ull;
    ts.tv_sec += (time_t)(ns / 1000000000ull);
    ts.tv_nsec = (long)(ns % 1000000000ull);
    pthread_mutex_lock(&r->mu);
    while (!w.done) {
        if (pthread_cond_timedwait(&w.cv, &r->mu, &ts) == ETIMEDOUT && !w.done) {
            struct waiter **pp = &r->waiters;
            while (*pp && *pp != &w) pp = &(*pp)->next;
            if (*pp) *pp = w.next;
            w.done = 1;
            w.status = KVS_ERR_TIMEOUT;
        }
    }
    pthread_mutex_unlock(&r->mu);
    pthread_cond_destroy(&w.cv);
    if (w.status == KVS_OK) {
        *resp = w.body;
        *resp_len = w.len;
    } else {
        free(w.body);
    }
    return w.status;
}

int kvs_rpc_post(kvs_rpc *r, uint16_t type, const void *body, size_t len)
{
    pthread_mutex_lock(&r->mu);
    int dead = r->dead, e = r->err;
    uint64_t id = r->next_id++;
    pthread_mutex_unlock(&r->mu);
    if (dead) return e;
    return send_frame(r, type, id, body, len);
}

int kvs_rpc_alive(kvs_rpc *r)
{
    pthread_mutex_lock(&r->mu);
    int alive = !r->dead;
    pthread_mutex_unlock(&r->mu);
    return alive;
}

void kvs_rpc_kill(kvs_rpc *r, int err)
{
    fail_all(r, err);
    shutdown(r->fd, SHUT_RDWR);
}

void kvs_rpc_ref(kvs_rpc *r) { atomic_fetch_add(&r->refs, 1); }

void kvs_rpc_unref(kvs_rpc *r)
{
    if (!r || atomic_fetch_sub(&r->refs, 1) != 1) return;
    shutdown(r->fd, SHUT_RDWR);
    pthread_join(r->reader, NULL);
    close(r->fd);
    pthread_mutex_destroy(&r->send_mu);
    pthread_mutex_destroy(&r->mu);
    free(r);
}
