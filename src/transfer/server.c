/* Transfer server: one accept thread, one thread per connection, at most
 * kvs_xfer_server_max_conns() of them, HELLO within a deadline (see
 * transfer.h). Replies to T_READ are gathered (header + segment memory) and
 * sent with one sendmsg per burst of pipelined requests; T_WRITE payloads
 * are received straight into segment memory (only the bytes that arrived
 * with the request headers in the 64 KiB input buffer are copied from it:
 * small writes need no extra system call, large ones are >= 94 % direct). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "proto/proto.h"
#include "segment/segment.h"
#include "transfer.h"

#define MAX_SEGS 16
#define IN_BUF (64u << 10)
#define OUT_MAX 128         /* replies gathered before a forced flush */
#define FLUSH_BYTES (256u << 10) /* start sending once this much is gathered */
#define REQ_BODY 28u        /* u32 segment_id, u64 offset, u64 len, u64 epoch */
#define HS_TIMEOUT_MS 10000 /* a peer must finish its HELLO within this */
/* A T_WRITE's payload that makes no progress for this long (a writer
 * paused or cut off mid-send) closes its connection: the segment's write
 * fence it holds must not be held forever. KVSHELF_XFER_STALL_MS overrides. */
#define PAYLOAD_STALL_MS 5000
#define MIN_RATE_BYTES_PER_MS 1000u /* 1 MB/s: slower whole payloads are cut off too */

struct seg_ent {
    uint32_t id;
    int used;
    kvs_segment *seg;
};

enum { C_HELLO = 0, C_AUTHED = 1, C_KICKED = 2 }; /* sconn.state */

struct sconn {
    kvs_xfer_server *srv;
    int fd;
    pthread_t th;
    atomic_int done;
    atomic_int state;           /* C_HELLO until the handshake succeeded */
    uint64_t hello_deadline_ms; /* kicked if still in C_HELLO then */
    struct sconn *next;
};

struct kvs_xfer_server {
    int lfd;
    int wake[2]; /* pipe: stop wakes the accept thread */
    char addr[KVS_XFER_ADDR_MAX];
    char secret[256];
    pthread_t accept_th;
    pthread_mutex_t mu; /* segs and conns */
    struct seg_ent segs[MAX_SEGS];
    struct sconn *conns;
    int nconns;  /* threads not joined yet */
    int nkicked; /* of which told to go (shut down, exiting) */
    int max_conns;
    uint32_t hello_ms;
    uint32_t backoff_ms;   /* accept paused after EMFILE/ENFILE (accept thread only) */
    uint64_t resume_ms;
    atomic_uint_fast64_t refused, kicked_hello, timed_out_hello, accept_pauses;
    atomic_int stopping;
    atomic_uint_fast64_t requests, bytes, bad, fenced;
};

/* ---- segment table ---- */

int kvs_xfer_server_add_segment(kvs_xfer_server *s, uint32_t id, kvs_segment *seg)
{
    int rc = KVS_ERR_NO_SPACE;
    pthread_mutex_lock(&s->mu);
    struct seg_ent *free_ent = NULL;
    for (int i = 0; i < MAX_SEGS; i++) {
        if (s->segs[i].used && s->segs[i].id == id) free_ent = &s->segs[i];
        else if (!s->segs[i].used && !free_ent) free_ent = &s->segs[i];
    }
    if (free_ent) {
        free_ent->used = 1;
        free_ent->id = id;
        free_ent->seg = seg;
        rc = KVS_OK;
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void kvs_xfer_server_remove_segment(kvs_xfer_server *s, uint32_t id)
{
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < MAX_SEGS; i++)
        if (s->segs[i].used && s->segs[i].id == id) s->segs[i].used = 0;
    pthread_mutex_unlock(&s->mu);
}

/* Looks up segment `id`: the segment, or NULL if unknown. */
static kvs_segment *seg_lookup(kvs_xfer_server *s, uint32_t id)
{
    kvs_segment *seg = NULL;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < MAX_SEGS; i++)
        if (s->segs[i].used && s->segs[i].id == id) {
            seg = s->segs[i].seg;
            break;
        }
    pthread_mutex_unlock(&s->mu);
    return seg;
}

/* ---- per-connection service ---- */

static uint64_t get_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static int server_handshake(kvs_xfer_server *s, int fd)
{
    kvs_set_timeouts(fd, HS_TIMEOUT_MS);
    uint8_t nonce[KVS_NONCE_LEN];
    if (kvs_random_bytes(nonce, sizeof nonce)) return KVS_ERR_IO;
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    size_t f = kvs_wbuf_begin_frame(&w, KVS_MSG_CHALLENGE, 0, 0, 0);
    kvs_wbuf_u32(&w, s->secret[0] ? 1u : 0u);
    kvs_wbuf_put(&w, nonce, sizeof nonce);
    kvs_wbuf_end_frame(&w, f);
    struct iovec iov = {w.data, w.len};
    int rc = w.err ? w.err : kvs_sendv_full(fd, &iov, 1);
    kvs_wbuf_free(&w);
    if (rc) return rc;

    uint8_t hb[KVS_FRAME_HDR], body[1024];
    kvs_frame_hdr h;
    rc = kvs_read_full(fd, hb, sizeof hb);
    if (rc) return rc;
    if (kvs_frame_hdr_decode(hb, sizeof body, &h) || h.type != KVS_MSG_HELLO ||
        (h.flags & KVS_F_RESPONSE))
        return KVS_ERR_PROTO;
    rc = kvs_read_full(fd, body, h.body_len);
    if (rc) return rc;
    kvs_rbuf r;
    kvs_rbuf_init(&r, body, h.body_len);
    uint32_t version = kvs_rbuf_u32(&r);
    (void)kvs_rbuf_u32(&r); /* role */
    (void)kvs_rbuf_u64(&r); /* pid */
    (void)kvs_rbuf_u32(&r); /* uid */
    char host[256];
    kvs_rbuf_str(&r, host, sizeof host);
    uint8_t hid[KVS_HOST_ID_LEN], auth[KVS_AUTH_LEN];
    kvs_rbuf_raw(&r, hid, sizeof hid);
    kvs_rbuf_raw(&r, auth, sizeof auth);
    if (kvs_rbuf_finish(&r)) return KVS_ERR_PROTO;
    int status = KVS_OK;
    if (version != KVS_PROTO_VERSION) status = KVS_ERR_PROTO;
    else if (!s->secret[0] || !kvs_auth_check(s->secret, nonce, auth)) status = KVS_ERR_AUTH;

    kvs_wbuf_init(&w);
    f = kvs_wbuf_begin_frame(&w, KVS_MSG_HELLO, KVS_F_RESPONSE, status, h.req_id);
    if (status == KVS_OK) {
        kvs_wbuf_u64(&w, 0);
        kvs_wbuf_u32(&w, 0);
        kvs_wbuf_u32(&w, 0);
    }
    kvs_wbuf_end_frame(&w, f);
    iov.iov_base = w.data;
    iov.iov_len = w.len;
    rc = w.err ? w.err : kvs_sendv_full(fd, &iov, 1);
    kvs_wbuf_free(&w);
    if (status) {
        KVS_LOGW("transfer: rejected peer %s: %s", host, kvs_strerror(status));
        return status;
    }
    if (rc) return rc;
    kvs_set_timeouts(fd, 0);
    return KVS_OK;
}

/* Output gathered for one burst of replies. */
struct outq {
    uint8_t hdrs[OUT_MAX][KVS_FRAME_HDR];
    struct iovec iov[2 * OUT_MAX];
    int nhdr, niov;
    uint64_t bytes; /* payload bytes gathered */
};

static int flush_out(int fd, struct outq *o)
{
    int rc = KVS_OK;
    if (o->niov) rc = kvs_sendv_full(fd, o->iov, o->niov);
    o->nhdr = o->niov = 0;
    o->bytes = 0;
    return rc;
}

static void add_reply(struct outq *o, uint16_t type, int32_t status, uint64_t req_id,
                      const void *data, uint64_t len)
{
    kvs_frame_hdr h = {KVS_MAGIC, type, KVS_F_RESPONSE, (uint32_t)len, status, req_id};
    uint8_t *hb = o->hdrs[o->nhdr++];
    kvs_frame_hdr_encode(&h, hb);
    o->iov[o->niov].iov_base = hb;
    o->iov[o->niov++].iov_len = KVS_FRAME_HDR;
    if (len) {
        o->iov[o->niov].iov_base = (void *)data;
        o->iov[o->niov++].iov_len = (size_t)len;
        o->bytes += len;
    }
}

/* Reads into the input buffer: non-blocking first; if nothing is there,
 * flushes pending replies and blocks. Returns bytes read, 0 on EOF, <0 err. */
static ssize_t fill_in(int fd, uint8_t *buf, size_t cap, struct outq *o)
{
    for (;;) {
        ssize_t r = recv(fd, buf, cap, MSG_DONTWAIT);
        if (r >= 0) return r;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
        if (flush_out(fd, o)) return -1;
        /* the client's next request usually follows at once: poll briefly
         * before sleeping */
        r = kvs_recv_spin(fd, buf, cap);
        if (r >= 0) return r;
        if (errno != EAGAIN) return -1;
        r = recv(fd, buf, cap, 0);
        if (r >= 0) return r;
        if (errno == EINTR) continue;
        return -1;
    }
}

/* Milliseconds a payload may stall (PAYLOAD_STALL_MS, or the environment's). */
static int stall_ms(void)
{
    static atomic_int v;
    int ms = atomic_load(&v);
    if (!ms) {
        ms = (int)kvs_env_u64("KVSHELF_XFER_STALL_MS", PAYLOAD_STALL_MS, 10, 3600000, "ms");
        atomic_store(&v, ms);
    }
    return ms;
}

/* Receives exactly n bytes into dst (straight into segment memory, or a
 * scratch buffer when draining), first from the input buffer. Fails with
 * KVS_ERR_TIMEOUT when no byte arrives for stall_ms(), or when the whole
 * payload takes longer than stall_ms() plus its length at MIN_RATE (a
 * writer trickling bytes must not hold the write fence either). */
static int recv_payload(int fd, uint8_t *ib, size_t *pos, size_t *end, uint8_t *dst,
                        uint64_t n, uint8_t *scratch, size_t scratch_len)
{
    size_t have = *end - *pos;
    size_t take = (size_t)KVS_MIN((uint64_t)have, n);
    if (dst) memcpy(dst, ib + *pos, take);
    *pos += take;
    n -= take;
    if (dst) dst += take;
    uint64_t deadline = kvs_now_ms() + (uint64_t)stall_ms() + n / MIN_RATE_BYTES_PER_MS;
    while (n) {
        size_t want = (size_t)n;
        uint8_t *to = dst;
        if (!to) {
            to = scratch;
            want = KVS_MIN(want, scratch_len);
        }
        ssize_t r = recv(fd, to, want, MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            uint64_t now = kvs_now_ms();
            if (now >= deadline) return KVS_ERR_TIMEOUT;
            struct pollfd p = {fd, POLLIN, 0};
            int pr = poll(&p, 1, (int)KVS_MIN((uint64_t)stall_ms(), deadline - now));
            if (pr == 0) return KVS_ERR_TIMEOUT;
            if (pr < 0 && errno != EINTR) return KVS_ERR_CONN;
            continue;
        }
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            return KVS_ERR_CONN;
        }
        n -= (uint64_t)r;
        if (dst) dst += r;
    }
    return KVS_OK;
}

static void serve(kvs_xfer_server *s, int fd)
{
    uint8_t *ib = malloc(IN_BUF);
    struct outq *o = calloc(1, sizeof *o);
    if (!ib || !o) goto out;
    size_t pos = 0, end = 0;
    const char *why = NULL;
    for (;;) {
        if (atomic_load(&s->stopping)) break;
        if (end - pos < KVS_FRAME_HDR + REQ_BODY) {
            /* Compact, then read more. A T_READ/T_WRITE header+body is 44
             * bytes; a shorter remainder needs more input. */
            if (pos) {
                memmove(ib, ib + pos, end - pos);
                end -= pos;
                pos = 0;
            }
            ssize_t r = fill_in(fd, ib + end, IN_BUF - end, o);
            if (r <= 0) break; /* EOF or error: peer went away */
            end += (size_t)r;
            continue;
        }
        kvs_frame_hdr h;
        if (kvs_frame_hdr_decode(ib + pos, KVS_MAX_BODY, &h)) {
            why = "bad frame header";
            break;
        }
        if (h.flags & KVS_F_RESPONSE || (h.type != KVS_MSG_T_READ && h.type != KVS_MSG_T_WRITE) ||
            h.body_len < REQ_BODY) {
            why = "unexpected message";
            break;
        }
        const uint8_t *b = ib + pos + KVS_FRAME_HDR;
        uint32_t seg_id = (uint32_t)get_le(b, 4);
        uint64_t off = get_le(b + 4, 8), len = get_le(b + 12, 8), epoch = get_le(b + 20, 8);
        if (len > KVS_MAX_CHUNK) {
            why = "chunk too large";
            break;
        }
        if (h.type == KVS_MSG_T_READ ? h.body_len != REQ_BODY : h.body_len != REQ_BODY + len) {
            why = "bad body length";
            break;
        }
        pos += KVS_FRAME_HDR + REQ_BODY;
        kvs_segment *seg = seg_lookup(s, seg_id);
        int found = seg != NULL;
        uint8_t *base = found ? seg->base : NULL;
        uint64_t size = found ? seg->size : 0;
        if (found && (off > size || len > size - off)) {
            why = "access outside the segment";
            break;
        }
        atomic_fetch_add(&s->requests, 1);
        if (h.type == KVS_MSG_T_READ) {
            if (found) {
                add_reply(o, KVS_MSG_T_READ, KVS_OK, h.req_id, base + off, len);
                atomic_fetch_add(&s->bytes, len);
            } else {
                add_reply(o, KVS_MSG_T_READ, KVS_ERR_UNAVAILABLE, h.req_id, NULL, 0);
            }
        } else {
            /* fenced: a write whose reservation went stale is drained, not applied */
            int wst = found ? kvs_segment_write_begin(seg, epoch) : KVS_ERR_UNAVAILABLE;
            if (wst != KVS_OK) {
                wst = KVS_ERR_UNAVAILABLE;
                atomic_fetch_add(&s->fenced, 1);
            }
            uint8_t scratch[4096];
            int rrc = recv_payload(fd, ib, &pos, &end, wst == KVS_OK ? base + off : NULL, len,
                                   scratch, sizeof scratch);
            if (wst == KVS_OK) kvs_segment_write_end(seg, epoch);
            if (rrc == KVS_ERR_TIMEOUT) why = "a write's payload stalled";
            if (rrc) break;
            add_reply(o, KVS_MSG_T_WRITE, wst, h.req_id, NULL, 0);
            if (wst == KVS_OK) atomic_fetch_add(&s->bytes, len);
        }
        if ((o->nhdr == OUT_MAX || o->bytes >= FLUSH_BYTES) && flush_out(fd, o)) break;
    }
    if (why) {
        atomic_fetch_add(&s->bad, 1);
        KVS_LOGW("transfer: closing a connection: %s", why);
    } else if (o) {
        flush_out(fd, o);
    }
out:
    free(ib);
    free(o);
}

static void *conn_main(void *arg)
{
    struct sconn *c = arg;
    int st = C_HELLO;
    /* authenticated only if not kicked meanwhile (deadline, or room for a
     * newer connection): then the connection holds its thread until the
     * peer closes it */
    if (server_handshake(c->srv, c->fd) == KVS_OK &&
        atomic_compare_exchange_strong(&c->state, &st, C_AUTHED))
        serve(c->srv, c->fd);
    shutdown(c->fd, SHUT_RDWR);
    atomic_store(&c->done, 1);
    return NULL;
}

/* Tells a connection still in its handshake to go: its thread's blocking
 * I/O fails at once and it exits (joined and closed by reap). 1 if it was
 * still in the handshake. Caller holds s->mu. */
static int kick_locked(kvs_xfer_server *s, struct sconn *c)
{
    int st = C_HELLO;
    if (!atomic_compare_exchange_strong(&c->state, &st, C_KICKED)) return 0;
    shutdown(c->fd, SHUT_RDWR);
    s->nkicked++;
    return 1;
}

static kvs_log_limit g_refuse_log, g_hello_log;

/* Kicks the oldest connection still in its handshake, to make room for a
 * new one. 1 if there was one. */
static int kick_oldest_hello(kvs_xfer_server *s)
{
    pthread_mutex_lock(&s->mu);
    struct sconn *old = NULL;
    for (struct sconn *c = s->conns; c; c = c->next)
        if (atomic_load(&c->state) == C_HELLO &&
            (!old || c->hello_deadline_ms < old->hello_deadline_ms))
            old = c;
    int kicked = old && kick_locked(s, old);
    pthread_mutex_unlock(&s->mu);
    if (kicked) atomic_fetch_add(&s->kicked_hello, 1);
    return kicked;
}

/* Kicks the connections that did not complete HELLO by their deadline. */
static void expire_hello(kvs_xfer_server *s, uint64_t now)
{
    int n = 0;
    pthread_mutex_lock(&s->mu);
    for (struct sconn *c = s->conns; c; c = c->next)
        if (c->hello_deadline_ms <= now && atomic_load(&c->state) == C_HELLO)
            n += kick_locked(s, c);
    pthread_mutex_unlock(&s->mu);
    if (!n) return;
    atomic_fetch_add(&s->timed_out_hello, (uint64_t)n);
    kvs_log_limited(&g_hello_log, 1000, KVS_LOG_WARN,
                    "transfer: closed %d connection(s) without HELLO within %u ms", n,
                    s->hello_ms);
}

/* Joins and frees finished connections (all of them when `all`). */
static void reap(kvs_xfer_server *s, int all)
{
    pthread_mutex_lock(&s->mu);
    struct sconn **pp = &s->conns;
    while (*pp) {
        struct sconn *c = *pp;
        if (all) shutdown(c->fd, SHUT_RDWR);
        if (all || atomic_load(&c->done)) {
            *pp = c->next;
            s->nconns--;
            if (atomic_load(&c->state) == C_KICKED) s->nkicked--;
            pthread_mutex_unlock(&s->mu);
            pthread_join(c->th, NULL);
            close(c->fd);
            free(c);
            pthread_mutex_lock(&s->mu);
            pp = &s->conns;
            continue;
        }
        pp = &c->next;
    }
    pthread_mutex_unlock(&s->mu);
}

/* No descriptor for accept (EMFILE/ENFILE): makes room by kicking the
 * oldest connection still in its handshake (its descriptor is closed once
 * its thread has gone), and pauses accepting for a back-off that doubles
 * from 10 ms to 1 s, logged once per pause, instead of polling a listener
 * that stays readable. */
static void accept_starved(kvs_xfer_server *s, int err)
{
    kick_oldest_hello(s);
    s->backoff_ms = s->backoff_ms ? KVS_MIN(s->backoff_ms * 2, 1000u) : 10u;
    s->resume_ms = kvs_now_ms() + s->backoff_ms;
    atomic_fetch_add(&s->accept_pauses, 1);
    pthread_mutex_lock(&s->mu);
    int n = s->nconns;
    pthread_mutex_unlock(&s->mu);
    KVS_LOGW("transfer: accept: %s (%d connections); not accepting for %u ms", strerror(err), n,
             s->backoff_ms);
}

#define KICK_SLACK 8 /* kicked threads still exiting, beyond the cap */

/* 1 if accepting one more connection would exceed the thread bound. */
static int threads_over(kvs_xfer_server *s)
{
    pthread_mutex_lock(&s->mu);
    int over = s->nconns >= s->max_conns + KICK_SLACK;
    pthread_mutex_unlock(&s->mu);
    return over;
}

static void *accept_main(void *arg)
{
    kvs_xfer_server *s = arg;
    while (!atomic_load(&s->stopping)) {
        uint64_t now = kvs_now_ms();
        int paused = s->resume_ms > now;
        /* wake up often enough to close connections past their HELLO deadline */
        int timeout = (int)KVS_MIN(s->hello_ms / 4 + 1, 250u);
        if (paused) timeout = (int)KVS_MIN((uint64_t)timeout, s->resume_ms - now);
        struct pollfd p[2] = {{paused ? -1 : s->lfd, POLLIN, 0}, {s->wake[0], POLLIN, 0}};
        int pr = poll(p, 2, timeout);
        reap(s, 0);
        expire_hello(s, kvs_now_ms());
        if (pr <= 0 || atomic_load(&s->stopping)) continue;
        if (!(p[0].revents & POLLIN)) continue;
        int fd = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                accept_starved(s, errno);
            continue;
        }
        s->backoff_ms = 0;
        pthread_mutex_lock(&s->mu);
        int full = s->nconns - s->nkicked >= s->max_conns;
        pthread_mutex_unlock(&s->mu);
        if (full && !kick_oldest_hello(s)) {
            /* every thread serves an authenticated peer: refuse at once */
            atomic_fetch_add(&s->refused, 1);
            kvs_log_limited(&g_refuse_log, 1000, KVS_LOG_WARN,
                            "transfer: %d connections (KVSHELF_XFER_MAX_CONNS), all "
                            "authenticated: refusing a new one",
                            s->max_conns);
            close(fd);
            continue;
        }
        /* kicked threads exit at once (their socket is shut down) but are
         * still threads until joined: wait for them, so that threads never
         * exceed the cap by more than KICK_SLACK however fast a flood comes
         * (seen: 280 threads for a cap of 256 under ASan without this) */
        for (int i = 0; i < 200 && threads_over(s); i++) {
            struct timespec ts = {0, 1000000L};
            nanosleep(&ts, NULL);
            reap(s, 0);
        }
        if (threads_over(s)) {
            atomic_fetch_add(&s->refused, 1);
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        kvs_set_bulk_buffers(fd);
        struct sconn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->srv = s;
        c->fd = fd;
        c->hello_deadline_ms = kvs_now_ms() + s->hello_ms;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setstacksize(&at, 256u << 10);
        pthread_mutex_lock(&s->mu);
        if (pthread_create(&c->th, &at, conn_main, c) == 0) {
            c->next = s->conns;
            s->conns = c;
            s->nconns++;
        } else {
            close(fd);
            free(c);
        }
        pthread_mutex_unlock(&s->mu);
        pthread_attr_destroy(&at);
    }
    return NULL;
}

int kvs_xfer_server_max_conns(void)
{
    int n = (int)kvs_env_u64("KVSHELF_XFER_MAX_CONNS", KVS_XFER_MAX_CONNS, 1, 65536,
                             "connections");
    /* each connection holds a descriptor: leave room for everything else */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        uint64_t fit = rl.rlim_cur > 40 ? (rl.rlim_cur - 32) / 2 : 4;
        if ((uint64_t)n > fit) n = (int)fit;
    }
    return n;
}

int kvs_xfer_server_start(const char *host, const char *secret, kvs_xfer_server **out)
{
    *out = NULL;
    if (!host || !*host) host = "127.0.0.1";
    if (!secret || !*secret) { /* on loopback too: other users of this host */
        KVS_LOGE("transfer: refusing to listen on %s without a secret", host);
        return KVS_ERR_CONFIG;
    }
    kvs_xfer_server *s = calloc(1, sizeof *s);
    if (!s) return KVS_ERR_NOMEM;
    kvs_addr a;
    char text[KVS_XFER_ADDR_MAX];
    snprintf(text, sizeof text, strchr(host, ':') ? "[%s]:0" : "%s:0", host);
    int rc = kvs_addr_parse(text, 0, &a);
    if (rc) {
        free(s);
        return KVS_ERR_CONFIG;
    }
    s->lfd = kvs_listen(&a);
    if (s->lfd < 0) {
        rc = s->lfd;
        free(s);
        return rc;
    }
    kvs_addr_format(&a, s->addr, sizeof s->addr);
    if (secret) kvs_strlcpy(s->secret, secret, sizeof s->secret);
    s->max_conns = kvs_xfer_server_max_conns();
    s->hello_ms = (uint32_t)kvs_env_u64("KVSHELF_XFER_HELLO_MS", KVS_XFER_HELLO_MS, 100, 600000,
                                        "milliseconds");
    if (pipe2(s->wake, O_CLOEXEC) < 0) {
        close(s->lfd);
        free(s);
        return KVS_ERR_IO;
    }
    pthread_mutex_init(&s->mu, NULL);
    if (pthread_create(&s->accept_th, NULL, accept_main, s)) {
        close(s->lfd);
        close(s->wake[0]);
        close(s->wake[1]);
        pthread_mutex_destroy(&s->mu);
        free(s);
        return KVS_ERR_IO;
    }
    *out = s;
    return KVS_OK;
}

const char *kvs_xfer_server_addr(const kvs_xfer_server *s) { return s->addr; }

void kvs_xfer_server_counters(const kvs_xfer_server *s, uint64_t *requests, uint64_t *bytes,
                              uint64_t *bad_frames)
{
    kvs_xfer_server *m = (kvs_xfer_server *)s;
    if (requests) *requests = atomic_load(&m->requests);
    if (bytes) *bytes = atomic_load(&m->bytes);
    if (bad_frames) *bad_frames = atomic_load(&m->bad);
}

void kvs_xfer_server_conn_counters(const kvs_xfer_server *s, uint64_t *refused,
                                   uint64_t *kicked, uint64_t *hello_timeouts,
                                   uint64_t *accept_pauses)
{
    kvs_xfer_server *m = (kvs_xfer_server *)s;
    if (refused) *refused = atomic_load(&m->refused);
    if (kicked) *kicked = atomic_load(&m->kicked_hello);
    if (hello_timeouts) *hello_timeouts = atomic_load(&m->timed_out_hello);
    if (accept_pauses) *accept_pauses = atomic_load(&m->accept_pauses);
}

void kvs_xfer_server_stop(kvs_xfer_server *s)
{
    if (!s) return;
    atomic_store(&s->stopping, 1);
    ssize_t wr = write(s->wake[1], "x", 1);
    (void)wr;
    pthread_join(s->accept_th, NULL);
    close(s->lfd);
    reap(s, 1);
    close(s->wake[0]);
    close(s->wake[1]);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
