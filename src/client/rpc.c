/* Master connection: pipelined requests, replies read by a leader among the
 * waiting callers and matched by req_id (see rpc.h). */
#include "rpc.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "proto/proto.h"
#include "transfer/transfer.h"


struct kvs_rpc {
    int fd;
    pthread_mutex_t send_mu;
    pthread_mutex_t mu; /* everything below */
    struct waiter *waiters;
    int dead;
    int err;
    int reading; /* a leader is reading frames */
    uint64_t next_id;
    /* the frame being read (only the leader touches these) */
    uint8_t hdr[KVS_FRAME_HDR];
    size_t hdr_have;
    kvs_frame_hdr h;
    uint8_t *body;
    size_t body_have;
    uint64_t spin_ns; /* 0: never busy-poll for a reply; else kvs_spin_ns() per wait */
    atomic_int refs;
};

static pthread_condattr_t g_cattr;
static pthread_once_t g_cattr_once = PTHREAD_ONCE_INIT;

static void cattr_init(void)
{
    pthread_condattr_init(&g_cattr);
    pthread_condattr_setclock(&g_cattr, CLOCK_MONOTONIC);
}

/* Marks dead and wakes every waiter with `err` (first failure wins).
 * Caller holds mu. */
static void fail_all_locked(kvs_rpc *r, int err)
{
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
}

static void unlink_waiter(kvs_rpc *r, struct waiter *w)
{
    struct waiter **pp = &r->waiters;
    while (*pp && *pp != w) pp = &(*pp)->next;
    if (*pp) *pp = w->next;
}

/* Reads until one whole frame is assembled (1), the deadline passes (0) or
 * the connection fails (<0). Called by the leader without mu held; a
 * partial frame stays in r for the next leader. */
static int read_frame(kvs_rpc *r, uint64_t deadline_ms)
{
    uint64_t spin_ns = r->spin_ns ? kvs_spin_ns() : 0; /* adapts to the host's load */
    uint64_t spin_until = spin_ns ? kvs_now_ns() + spin_ns : 0;
    for (;;) {
        void *dst;
        size_t want;
        if (r->hdr_have < KVS_FRAME_HDR) {
            dst = r->hdr + r->hdr_have;
            want = KVS_FRAME_HDR - r->hdr_have;
        } else {
            dst = r->body + r->body_have;
            want = r->h.body_len - r->body_have;
        }
        if (want) {
            ssize_t n = recv(r->fd, dst, want, MSG_DONTWAIT);
            if (n == 0) return KVS_ERR_CONN;
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK) return KVS_ERR_CONN;
                if (spin_until) {
                    if (kvs_now_ns() < spin_until) {
                        kvs_cpu_relax();
                        continue;
                    }
                    spin_until = 0;
                }
                uint64_t now = kvs_now_ms();
                if (now >= deadline_ms) return 0;
                struct pollfd p = {r->fd, POLLIN, 0};
                int pr = poll(&p, 1, (int)KVS_MIN(deadline_ms - now, (uint64_t)1000));
                if (pr < 0 && errno != EINTR) return KVS_ERR_CONN;
                continue;
            }
            if (r->hdr_have < KVS_FRAME_HDR) r->hdr_have += (size_t)n;
            else r->body_have += (size_t)n;
        }
        if (r->hdr_have == KVS_FRAME_HDR && !r->body && r->body_have == 0) {
            if (kvs_frame_hdr_decode(r->hdr, KVS_MAX_BODY, &r->h) ||
                !(r->h.flags & KVS_F_RESPONSE)) {
                KVS_LOGW("client: malformed frame from the master; reconnecting");
                return KVS_ERR_PROTO;
            }
            if (r->h.body_len) {
                r->body = malloc(r->h.body_len);
                if (!r->body) return KVS_ERR_NOMEM;
                continue;
            }
        }
        if (r->hdr_have == KVS_FRAME_HDR && r->body_have == r->h.body_len) return 1;
    }
}

/* Hands the frame just read to its waiter (or drops it). Caller holds mu. */
static void dispatch_locked(kvs_rpc *r)
{
    struct waiter **pp = &r->waiters;
    while (*pp && (*pp)->req_id != r->h.req_id) pp = &(*pp)->next;
    if (*pp) {
        struct waiter *w = *pp;
        *pp = w->next;
        w->done = 1;
        w->status = r->h.status > 0 ? KVS_ERR_PROTO : r->h.status;
        w->body = r->body;
        w->len = r->h.body_len;
        r->body = NULL;
        pthread_cond_signal(&w->cv);
    }
    free(r->body); /* nobody waits for it */
    r->body = NULL;
    r->body_have = 0;
    r->hdr_have = 0;
}

/* A master on this host offered its unix socket on the TCP connection:
 * connects there and says HELLO. The fd, or -1 (the caller stays on TCP).
 * KVSHELF_NO_LOCAL_SOCKET=1 turns this off. */
static int open_local(const kvs_challenge *tcp_ch, const char *secret, uint32_t role,
                      int timeout_ms, uint8_t *resp, size_t cap, uint32_t *rlen)
{
    const char *off = getenv("KVSHELF_NO_LOCAL_SOCKET");
    if (off && *off && strcmp(off, "0")) return -1;
    kvs_addr ua;
    memset(&ua, 0, sizeof ua);
    ua.is_unix = 1;
    if (kvs_strlcpy(ua.path, tcp_ch->local_path, sizeof ua.path)) return -1;
    int fd = kvs_connect(&ua, timeout_ms);
    if (fd < 0) return -1;
    kvs_challenge ch;
    int rc = kvs_hs_read_challenge(fd, timeout_ms, &ch);
    if (rc == KVS_OK) rc = kvs_hs_hello(fd, &ch, secret, role, timeout_ms, resp, cap, rlen);
    if (rc) {
        KVS_LOGD("client: the master's unix socket %s: %s; staying on TCP", ua.path,
                 kvs_strerror(rc));
        close(fd);
        return -1;
    }
    KVS_LOGD("client: the master is on this host: talking over unix:%s", ua.path);
    return fd;
}

/* Reads the master's CHALLENGE. Over TCP, if none came within
 * KVS_PROBE_AFTER_MS, sends PROBE (proto.h) so that a server of another
 * protocol (a Mooncake master on the same port, say) shows itself at once:
 * a close or bytes that are not a frame then mean KVS_ERR_PROTO, instead of
 * a wait for the whole timeout. */
static int read_challenge_probing(int fd, const kvs_addr *a, int timeout_ms, kvs_challenge *ch,
                                  int *probed_out)
{
    int probed = 0;
    uint64_t t0 = kvs_now_ms();
    if (!a->is_unix) {
        struct pollfd p = {fd, POLLIN, 0};
        int pr;
        do {
            pr = poll(&p, 1, KVS_MIN(timeout_ms, KVS_PROBE_AFTER_MS));
        } while (pr < 0 && errno == EINTR);
        if (pr == 0) {
            /* the body ends a line and a header block: an HTTP server
             * answers "400" at once instead of waiting for more */
            kvs_frame_hdr h = {KVS_MAGIC, KVS_MSG_PROBE, 0, 4, 0, 0};
            uint8_t b[KVS_FRAME_HDR + 4];
            kvs_frame_hdr_encode(&h, b);
            memcpy(b + KVS_FRAME_HDR, "\r\n\r\n", 4);
            probed = send(fd, b, sizeof b, MSG_NOSIGNAL) == (ssize_t)sizeof b;
        }
    }
    uint64_t spent = kvs_now_ms() - t0; /* the whole read within timeout_ms */
    int left = spent < (uint64_t)timeout_ms ? timeout_ms - (int)spent : 1;
    int rc = kvs_hs_read_challenge(fd, left, ch);
    if (probed && rc == KVS_ERR_CONN) rc = KVS_ERR_PROTO;
    *probed_out = probed;
    return rc;
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
    kvs_challenge ch;
    int probed = 0;
    uint64_t t0 = kvs_now_ms();
    int rc = read_challenge_probing(fd, a, timeout_ms, &ch, &probed);
    if (rc == KVS_OK && probed) {
        /* a kvshelf master after all, only slow: one that predates PROBE
         * answers it with an error and closes, so start again on a fresh
         * connection, without probing */
        close(fd);
        uint64_t spent = kvs_now_ms() - t0;
        int left = spent < (uint64_t)timeout_ms ? timeout_ms - (int)spent : 1;
        fd = kvs_connect(a, left);
        if (fd < 0) return fd == KVS_ERR_TIMEOUT ? KVS_ERR_TIMEOUT : KVS_ERR_CONN;
        rc = kvs_hs_read_challenge(fd, left, &ch);
    }
    if (rc == KVS_OK && ch.local_path[0] && !a->is_unix) {
        int ufd = open_local(&ch, secret, role, timeout_ms, resp, sizeof resp, &rlen);
        if (ufd >= 0) {
            close(fd); /* never said HELLO there: the master keeps no state for it */
            fd = ufd;
            goto authed;
        }
    }
    if (rc == KVS_OK) rc = kvs_hs_hello(fd, &ch, secret, role, timeout_ms, resp, sizeof resp, &rlen);
    if (rc) {
        close(fd);
        return rc;
    }
authed:;
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
    /* Sends time out (a stuck master); reads poll with each call's deadline. */
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
    r->spin_ns = kvs_spin_ns();
    atomic_init(&r->refs, 1);
    pthread_mutex_init(&r->send_mu, NULL);
    pthread_mutex_init(&r->mu, NULL);
    *out = r;
    return KVS_OK;
}

/* Sends one frame (sendmsg `sflags`: MSG_MORE holds it back until the next
 * frame); on failure kills the connection. */
static int send_frame(kvs_rpc *r, uint16_t type, uint16_t flags, uint64_t req_id,
                      const void *body, size_t len, int sflags)
{
    if (len > KVS_MAX_BODY) return KVS_ERR_TOO_LARGE;
    uint8_t hb[KVS_FRAME_HDR];
    kvs_frame_hdr h = {KVS_MAGIC, type, flags, (uint32_t)len, 0, req_id};
    kvs_frame_hdr_encode(&h, hb);
    struct iovec iov[2] = {{hb, sizeof hb}, {(void *)body, len}};
    pthread_mutex_lock(&r->send_mu);
    int rc = kvs_sendv_flags(r->fd, iov, len ? 2 : 1, sflags);
    pthread_mutex_unlock(&r->send_mu);
    if (rc) {
        KVS_LOGW("client: sending %s to the master failed: %s", kvs_msg_name(type),
                 kvs_strerror(rc));
        kvs_rpc_kill(r, KVS_ERR_CONN);
        return KVS_ERR_CONN;
    }
    return KVS_OK;
}

int kvs_rpc_start(kvs_rpc *r, kvs_rpc_req *q, uint16_t type, const void *body, size_t len)
{
    struct waiter *w = &q->w;
    memset(q, 0, sizeof *q);
    pthread_cond_init(&w->cv, &g_cattr);
    pthread_mutex_lock(&r->mu);
    if (r->dead) {
        w->done = 1;
        w->status = r->err;
        pthread_mutex_unlock(&r->mu);
        return w->status;
    }
    w->req_id = r->next_id++;
    w->next = r->waiters;
    r->waiters = w;
    pthread_mutex_unlock(&r->mu);
    /* a failure completes w with the error (fail_all_locked) */
    send_frame(r, type, 0, w->req_id, body, len, 0);
    pthread_mutex_lock(&r->mu);
    int st = w->done ? w->status : KVS_OK;
    pthread_mutex_unlock(&r->mu);
    return st;
}

int kvs_rpc_finish(kvs_rpc *r, kvs_rpc_req *q, int timeout_ms, uint8_t **resp,
                   uint32_t *resp_len)
{
    struct waiter *w = &q->w;
    *resp = NULL;
    *resp_len = 0;
    uint64_t deadline = kvs_now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 5000);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t ns = (uint64_t)ts.tv_nsec + (uint64_t)(timeout_ms > 0 ? timeout_ms : 5000) * 1000000ull;
    ts.tv_sec += (time_t)(ns / 1000000000ull);
    ts.tv_nsec = (long)(ns % 1000000000ull);
    pthread_mutex_lock(&r->mu);
    while (!w->done) {
        if (!r->reading) {
            /* lead: read frames until ours has come (or time is up) */
            r->reading = 1;
            pthread_mutex_unlock(&r->mu);
            int rc = read_frame(r, deadline);
            pthread_mutex_lock(&r->mu);
            r->reading = 0;
            if (rc == 1) {
                dispatch_locked(r);
            } else if (rc < 0) {
                shutdown(r->fd, SHUT_RDWR);
                fail_all_locked(r, rc == KVS_ERR_NOMEM ? KVS_ERR_NOMEM : KVS_ERR_CONN);
            } else if (!w->done) {
                unlink_waiter(r, w);
                w->done = 1;
                w->status = KVS_ERR_TIMEOUT;
            }
            continue;
        }
        if (pthread_cond_timedwait(&w->cv, &r->mu, &ts) == ETIMEDOUT && !w->done) {
            unlink_waiter(r, w);
            w->done = 1;
            w->status = KVS_ERR_TIMEOUT;
        }
    }
    /* pass the reading role on to a caller still waiting */
    if (!r->reading && r->waiters) pthread_cond_signal(&r->waiters->cv);
    pthread_mutex_unlock(&r->mu);
    pthread_cond_destroy(&w->cv);
    if (w->status == KVS_OK) {
        *resp = w->body;
        *resp_len = w->len;
    } else {
        free(w->body);
    }
    w->body = NULL;
    return w->status;
}

int kvs_rpc_call(kvs_rpc *r, uint16_t type, const void *body, size_t len, int timeout_ms,
                 uint8_t **resp, uint32_t *resp_len)
{
    kvs_rpc_req q;
    kvs_rpc_start(r, &q, type, body, len);
    return kvs_rpc_finish(r, &q, timeout_ms, resp, resp_len);
}

int kvs_rpc_post(kvs_rpc *r, uint16_t type, const void *body, size_t len)
{
    pthread_mutex_lock(&r->mu);
    int dead = r->dead, e = r->err;
    uint64_t id = r->next_id++;
    pthread_mutex_unlock(&r->mu);
    if (dead) return e;
    /* No reply is sent for it; over TCP it leaves with the next request
     * (one segment, one wake-up of the master) or within ~200 ms. */
    return send_frame(r, type, KVS_F_NOREPLY, id, body, len, MSG_MORE);
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
    pthread_mutex_lock(&r->mu);
    fail_all_locked(r, err);
    pthread_mutex_unlock(&r->mu);
    shutdown(r->fd, SHUT_RDWR); /* wakes a leader blocked in poll */
}

void kvs_rpc_ref(kvs_rpc *r) { atomic_fetch_add(&r->refs, 1); }

void kvs_rpc_unref(kvs_rpc *r)
{
    if (!r || atomic_fetch_sub(&r->refs, 1) != 1) return;
    close(r->fd);
    free(r->body);
    pthread_mutex_destroy(&r->send_mu);
    pthread_mutex_destroy(&r->mu);
    free(r);
}
