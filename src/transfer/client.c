/* Transfer client: persistent pipelined connections to peers' transfer
 * servers, one reader thread per connection receiving replies straight into
 * the callers' buffers (see transfer.h). */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "proto/proto.h"
#include "transfer.h"

#define REQ_BODY 28u /* u32 segment_id, u64 offset, u64 len, u64 epoch */
#define FRAME_LEN (KVS_FRAME_HDR + REQ_BODY)
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
/* A batch moving more bytes than this waits without busy-polling. */
#define SPIN_MAX_BYTES (256u << 10)
/* A peer whose connection made no progress for timeout_ms (stopped,
 * partitioned) is not tried again for this long: the same call's next
 * attempt (a get re-reading what its early read could not) fails at once
 * instead of waiting a second timeout. */
#define STALL_MS 1000u


/* One request on the wire (one chunk of one op). */
struct xreq {
    struct xreq *next;
    uint64_t req_id;
    uint16_t type;
    uint8_t *buf;
    uint64_t len;
    struct kvs_xfer_batch *batch;
    size_t op;
};

/* What one submitted batch waits on (kvs_xfer_submit .. kvs_xfer_wait). */
struct kvs_xfer_batch {
    kvs_xfer_client *xc;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_size_t left;   /* requests not completed yet (changed under mu) */
    uint64_t progress_ms; /* last completion (or start) */
    kvs_xfer_op *ops;
    size_t n;
    uint64_t bytes;       /* bytes the batch moves */
    struct xreq *reqs;
    uint8_t *frames;
    struct xconn **used; /* connections it sent on (referenced) */
    size_t nused;
};
typedef struct kvs_xfer_batch xbatch_t;

struct xconn {
    kvs_xfer_client *xc;
    struct xpeer *peer; /* its entry (entries live as long as the client) */
    int fd;
    pthread_mutex_t send_mu; /* one sender at a time; held while enqueueing + sending */
    pthread_mutex_t mu;      /* pending list, dead */
    struct xreq *head, *tail;
    int dead;
    uint64_t next_id;
    atomic_int refs;
};

struct xpeer {
    struct xpeer *next;
    char peer[KVS_XFER_ADDR_MAX];
    pthread_mutex_t mu; /* serializes connects to this peer */
    struct xconn *conn;
    uint64_t retry_at_ms;
    int backoff_ms;
    int last_err;
    atomic_uint_fast64_t stalled_until_ms; /* see STALL_MS */
};

struct kvs_xfer_client {
    char secret[256];
    int timeout_ms;
    pthread_mutex_t mu; /* peers list */
    struct xpeer *peers;
    pthread_mutex_t live_mu;
    pthread_cond_t live_cv;
    int live_readers;
    atomic_int cancelled;
};

/* ---- batches ---- */

static void batch_complete(struct xreq *r, int status)
{
    xbatch_t *b = r->batch;
    pthread_mutex_lock(&b->mu);
    if (status && b->ops[r->op].status == KVS_OK) b->ops[r->op].status = status;
    b->progress_ms = kvs_now_ms();
    if (--b->left == 0) pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

/* ---- connections ---- */

static void conn_unref(struct xconn *c)
{
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    close(c->fd);
    pthread_mutex_destroy(&c->send_mu);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* Marks the connection dead and wakes its reader (which fails the pending
 * requests). */
static void conn_kill(struct xconn *c)
{
    pthread_mutex_lock(&c->mu);
    c->dead = 1;
    pthread_mutex_unlock(&c->mu);
    shutdown(c->fd, SHUT_RDWR);
}

static void conn_fail_all(struct xconn *c)
{
    pthread_mutex_lock(&c->mu);
    c->dead = 1;
    struct xreq *r = c->head;
    c->head = c->tail = NULL;
    pthread_mutex_unlock(&c->mu);
    while (r) {
        struct xreq *n = r->next;
        batch_complete(r, KVS_ERR_UNAVAILABLE);
        r = n;
    }
}

/* Receives 1..n bytes. While a request is pending it busy-polls for up to
 * kvs_spin_ns() before blocking (a reply to a pipelined request usually
 * follows within microseconds); with nothing pending no reply can come, so
 * it blocks at once and leaves the CPU to the threads that will send the
 * next requests (on a 2-core host a spinning reader measurably delayed the
 * caller's master RPC between batches). */
static int recv_some(struct xconn *c, void *p, size_t n)
{
    pthread_mutex_lock(&c->mu);
    int pending = c->head != NULL;
    pthread_mutex_unlock(&c->mu);
    int fd = c->fd;
    if (pending) {
        ssize_t s = kvs_recv_spin(fd, p, n);
        if (s > 0) return (int)s;
        if (s == 0 || errno != EAGAIN) return -1;
    }
    for (;;) {
        ssize_t r = recv(fd, p, n, 0);
        if (r > 0) return (int)r;
        if (r < 0 && errno == EINTR) continue;
        return -1;
    }
}

static void *reader_main(void *arg)
{
    struct xconn *c = arg;
    uint8_t hb[KVS_FRAME_HDR];
    size_t have = 0;
    for (;;) {
        while (have < KVS_FRAME_HDR) {
            int r = recv_some(c, hb + have, KVS_FRAME_HDR - have);
            if (r < 0) goto fail;
            have += (size_t)r;
        }
        have = 0;
        kvs_frame_hdr h;
        if (kvs_frame_hdr_decode(hb, KVS_MAX_CHUNK, &h) || !(h.flags & KVS_F_RESPONSE)) goto proto;
        pthread_mutex_lock(&c->mu);
        struct xreq *r = c->head;
        pthread_mutex_unlock(&c->mu);
        if (!r || r->req_id != h.req_id || r->type != h.type) goto proto;
        uint64_t want = (h.status == KVS_OK && h.type == KVS_MSG_T_READ) ? r->len : 0;
        if (h.body_len != want) goto proto;
        uint64_t got = 0;
        while (got < want) {
            /* Body straight into the caller's buffer; the same call also
             * picks up the next header if it is already there. */
            struct iovec iov[2] = {{r->buf + got, (size_t)(want - got)}, {hb, KVS_FRAME_HDR}};
            ssize_t n = readv(c->fd, iov, 2);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) goto fail;
            if ((uint64_t)n > want - got) {
                have = (size_t)((uint64_t)n - (want - got));
                got = want;
            } else {
                got += (uint64_t)n;
            }
        }
        pthread_mutex_lock(&c->mu);
        c->head = r->next;
        if (!c->head) c->tail = NULL;
        pthread_mutex_unlock(&c->mu);
        int st = h.status;
        if (st > 0 || st < -64) st = KVS_ERR_PROTO;
        batch_complete(r, st);
    }
proto:
    KVS_LOGW("transfer: malformed reply from a peer; dropping the connection");
fail:
    shutdown(c->fd, SHUT_RDWR);
    conn_fail_all(c);
    kvs_xfer_client *xc = c->xc;
    conn_unref(c);
    pthread_mutex_lock(&xc->live_mu);
    if (--xc->live_readers == 0) pthread_cond_broadcast(&xc->live_cv);
    pthread_mutex_unlock(&xc->live_mu);
    return NULL;
}

static int conn_open(kvs_xfer_client *xc, const char *peer, struct xconn **out)
{
    kvs_addr a;
    if (kvs_addr_parse(peer, 0, &a) || a.is_unix || a.port == 0) return KVS_ERR_UNAVAILABLE;
    int fd = kvs_connect(&a, xc->timeout_ms);
    if (fd < 0) return KVS_ERR_UNAVAILABLE;
    int rc = kvs_hs_client(fd, xc->secret, KVS_ROLE_CLIENT, xc->timeout_ms, NULL, 0, NULL);
    if (rc) {
        close(fd);
        KVS_LOGW("transfer: handshake with %s failed: %s", peer, kvs_strerror(rc));
        return rc == KVS_ERR_AUTH ? KVS_ERR_AUTH : KVS_ERR_UNAVAILABLE;
    }
    kvs_set_bulk_buffers(fd);
    struct timeval tv = {xc->timeout_ms / 1000, (xc->timeout_ms % 1000) * 1000};
    struct timeval zero = {0, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &zero, sizeof zero);
    struct xconn *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return KVS_ERR_NOMEM;
    }
    c->xc = xc;
    c->fd = fd;
    pthread_mutex_init(&c->send_mu, NULL);
    pthread_mutex_init(&c->mu, NULL);
    atomic_init(&c->refs, 3); /* peer entry, reader, caller */
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 128u << 10);
    pthread_mutex_lock(&xc->live_mu);
    pthread_t th;
    rc = pthread_create(&th, &at, reader_main, c);
    if (rc == 0) xc->live_readers++;
    pthread_mutex_unlock(&xc->live_mu);
    pthread_attr_destroy(&at);
    if (rc) {
        close(fd);
        pthread_mutex_destroy(&c->send_mu);
        pthread_mutex_destroy(&c->mu);
        free(c);
        return KVS_ERR_IO;
    }
    *out = c;
    return KVS_OK;
}

static struct xpeer *peer_entry(kvs_xfer_client *xc, const char *peer)
{
    pthread_mutex_lock(&xc->mu);
    struct xpeer *p;
    for (p = xc->peers; p; p = p->next)
        if (!strcmp(p->peer, peer)) break;
    if (!p && strlen(peer) < sizeof p->peer && (p = calloc(1, sizeof *p))) {
        strcpy(p->peer, peer);
        pthread_mutex_init(&p->mu, NULL);
        p->next = xc->peers;
        xc->peers = p;
    }
    pthread_mutex_unlock(&xc->mu);
    return p;
}

/* Returns a referenced live connection to `peer`, connecting if needed. */
static int get_conn(kvs_xfer_client *xc, const char *peer, struct xconn **out)
{
    if (atomic_load(&xc->cancelled)) return KVS_ERR_CLOSED;
    struct xpeer *p = peer_entry(xc, peer);
    if (!p) return KVS_ERR_UNAVAILABLE;
    pthread_mutex_lock(&p->mu);
    struct xconn *c = p->conn;
    if (c) {
        pthread_mutex_lock(&c->mu);
        int dead = c->dead;
        pthread_mutex_unlock(&c->mu);
        if (!dead) {
            atomic_fetch_add(&c->refs, 1);
            pthread_mutex_unlock(&p->mu);
            *out = c;
            return KVS_OK;
        }
        p->conn = NULL;
        conn_unref(c);
    }
    if (kvs_now_ms() < atomic_load(&p->stalled_until_ms)) {
        pthread_mutex_unlock(&p->mu);
        return KVS_ERR_UNAVAILABLE;
    }
    if (p->retry_at_ms && kvs_now_ms() < p->retry_at_ms) {
        int e = p->last_err;
        pthread_mutex_unlock(&p->mu);
        return e;
    }
    int rc = conn_open(xc, peer, &c);
    if (rc) {
        p->backoff_ms = p->backoff_ms ? KVS_MIN(p->backoff_ms * 2, BACKOFF_MAX_MS) : BACKOFF_MIN_MS;
        p->retry_at_ms = kvs_now_ms() + (uint64_t)p->backoff_ms;
        p->last_err = rc;
        pthread_mutex_unlock(&p->mu);
        return rc;
    }
    p->backoff_ms = 0;
    p->retry_at_ms = 0;
    c->peer = p;
    p->conn = c;
    pthread_mutex_unlock(&p->mu);
    *out = c;
    return KVS_OK;
}

static void put_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Enqueues and sends reqs[0..n) on c. On failure the connection is killed,
 * and its reader fails whatever was enqueued. */
static void send_group(struct xconn *c, struct xreq **reqs, size_t n, kvs_xfer_op *ops,
                       uint8_t *frames, struct iovec *iov)
{
    pthread_mutex_lock(&c->send_mu);
    pthread_mutex_lock(&c->mu);
    if (c->dead) {
        pthread_mutex_unlock(&c->mu);
        pthread_mutex_unlock(&c->send_mu);
        for (size_t i = 0; i < n; i++) batch_complete(reqs[i], KVS_ERR_UNAVAILABLE);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        struct xreq *r = reqs[i];
        r->req_id = ++c->next_id;
        r->next = NULL;
        if (c->tail) c->tail->next = r;
        else c->head = r;
        c->tail = r;
    }
    pthread_mutex_unlock(&c->mu);
    int niov = 0;
    for (size_t i = 0; i < n; i++) {
        struct xreq *r = reqs[i];
        uint8_t *f = frames + i * FRAME_LEN;
        int wr = r->type == KVS_MSG_T_WRITE;
        kvs_frame_hdr h = {KVS_MAGIC, r->type, 0, (uint32_t)(REQ_BODY + (wr ? r->len : 0)), 0,
                           r->req_id};
        kvs_frame_hdr_encode(&h, f);
        kvs_xfer_op *op = &ops[r->op];
        put_le(f + KVS_FRAME_HDR, op->segment_id, 4);
        put_le(f + KVS_FRAME_HDR + 4, op->offset + (uint64_t)(r->buf - (uint8_t *)op->buf), 8);
        put_le(f + KVS_FRAME_HDR + 12, r->len, 8);
        put_le(f + KVS_FRAME_HDR + 20, wr ? op->epoch : 0, 8);
        if (niov && (uint8_t *)iov[niov - 1].iov_base + iov[niov - 1].iov_len == f) {
            iov[niov - 1].iov_len += FRAME_LEN; /* consecutive frames: one iovec */
        } else {
            iov[niov].iov_base = f;
            iov[niov++].iov_len = FRAME_LEN;
        }
        if (wr && r->len) {
            iov[niov].iov_base = r->buf;
            iov[niov++].iov_len = (size_t)r->len;
        }
    }
    int rc = kvs_sendv_full(c->fd, iov, niov);
    if (rc) conn_kill(c);
    pthread_mutex_unlock(&c->send_mu);
}

static void batch_free(xbatch_t *b)
{
    for (size_t u = 0; u < b->nused; u++) conn_unref(b->used[u]);
    free(b->used);
    free(b->reqs);
    free(b->frames);
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
    free(b);
}

static void fail_unsent(kvs_xfer_op *ops, size_t n, int err)
{
    for (size_t i = 0; i < n; i++)
        if (ops[i].status == KVS_OK && ops[i].len) ops[i].status = err;
}

int kvs_xfer_submit(kvs_xfer_client *xc, kvs_xfer_op *ops, size_t n, kvs_xfer_batch **out)
{
    *out = NULL;
    size_t total = 0;
    uint64_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        ops[i].status = KVS_OK;
        if (!ops[i].peer || (!ops[i].buf && ops[i].len)) {
            ops[i].status = KVS_ERR_INVALID;
            continue;
        }
        total += (size_t)((ops[i].len + KVS_MAX_CHUNK - 1) / KVS_MAX_CHUNK);
        bytes += ops[i].len;
    }
    xbatch_t *b = calloc(1, sizeof *b);
    if (!b) {
        fail_unsent(ops, n, KVS_ERR_NOMEM);
        return KVS_ERR_NOMEM;
    }
    pthread_mutex_init(&b->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b->cv, &ca);
    pthread_condattr_destroy(&ca);
    b->xc = xc;
    b->ops = ops;
    b->n = n;
    b->bytes = bytes;
    b->progress_ms = kvs_now_ms();
    *out = b;
    if (!total) return KVS_OK;

    struct xreq **group = calloc(total, sizeof *group);
    struct iovec *iov = malloc(2 * total * sizeof *iov);
    uint8_t *done_op = calloc(n, 1); /* op already grouped */
    size_t *first_req = calloc(n, sizeof *first_req);
    b->reqs = calloc(total, sizeof *b->reqs);
    b->frames = malloc(total * FRAME_LEN);
    b->used = calloc(n, sizeof *b->used);
    if (!group || !iov || !done_op || !first_req || !b->reqs || !b->frames || !b->used) {
        fail_unsent(ops, n, KVS_ERR_NOMEM);
        goto out;
    }
    /* Build every chunk's request, op by op. */
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        first_req[i] = k;
        if (ops[i].status || !ops[i].len) continue;
        for (uint64_t off = 0; off < ops[i].len; off += KVS_MAX_CHUNK) {
            struct xreq *r = &b->reqs[k++];
            r->type = ops[i].write ? KVS_MSG_T_WRITE : KVS_MSG_T_READ;
            r->buf = (uint8_t *)ops[i].buf + off;
            r->len = KVS_MIN((uint64_t)KVS_MAX_CHUNK, ops[i].len - off);
            r->batch = b;
            r->op = i;
        }
    }
    b->left = total;
    /* Peer by peer: connect once, enqueue and send all its requests. */
    size_t fi = 0;
    for (size_t i = 0; i < n; i++) {
        if (done_op[i] || ops[i].status || !ops[i].len) continue;
        const char *peer = ops[i].peer;
        size_t ng = 0;
        for (size_t j = i; j < n; j++) {
            if (done_op[j] || ops[j].status || !ops[j].len || strcmp(ops[j].peer, peer)) continue;
            done_op[j] = 1;
            size_t cnt = (size_t)((ops[j].len + KVS_MAX_CHUNK - 1) / KVS_MAX_CHUNK);
            for (size_t q = 0; q < cnt; q++) group[ng++] = &b->reqs[first_req[j] + q];
        }
        struct xconn *c = NULL;
        int rc = get_conn(xc, peer, &c);
        if (rc) {
            for (size_t q = 0; q < ng; q++) batch_complete(group[q], rc);
            continue;
        }
        b->used[b->nused++] = c;
        send_group(c, group, ng, ops, b->frames + fi * FRAME_LEN, iov + 2 * fi);
        fi += ng;
    }
out:
    free(group);
    free(iov);
    free(done_op);
    free(first_req);
    return KVS_OK;
}

int kvs_xfer_wait(kvs_xfer_batch *b)
{
    if (!b) return 0;
    kvs_xfer_client *xc = b->xc;
    /* Wait: busy-poll briefly (the replies of a small batch often come
     * before a sleep and wake-up would), then sleep; a batch that makes no
     * progress for timeout_ms gives up on its connections (their readers
     * then fail what is left). A batch of more than SPIN_MAX_BYTES cannot
     * finish within a spin, and spinning would take a CPU from the threads
     * moving its bytes, so it sleeps at once. The lock below also waits out
     * the reader still inside batch_complete. */
    uint64_t spin = b->bytes <= SPIN_MAX_BYTES ? kvs_spin_ns() : 0;
    if (spin && atomic_load(&b->left)) {
        uint64_t until = kvs_now_ns() + spin;
        while (atomic_load(&b->left) && kvs_now_ns() < until) kvs_cpu_relax();
    }
    pthread_mutex_lock(&b->mu);
    int killed = 0;
    while (b->left) {
        if (killed) {
            pthread_cond_wait(&b->cv, &b->mu);
            continue;
        }
        uint64_t deadline = b->progress_ms + (uint64_t)xc->timeout_ms;
        uint64_t now = kvs_now_ms();
        if (now >= deadline) {
            pthread_mutex_unlock(&b->mu);
            KVS_LOGW("transfer: no progress for %d ms; dropping %zu connection(s)",
                     xc->timeout_ms, b->nused);
            for (size_t u = 0; u < b->nused; u++) {
                struct xconn *c = b->used[u];
                pthread_mutex_lock(&c->mu);
                int stuck = c->head != NULL && !c->dead; /* replies still owed */
                pthread_mutex_unlock(&c->mu);
                conn_kill(c);
                if (stuck && c->peer)
                    atomic_store(&c->peer->stalled_until_ms, kvs_now_ms() + STALL_MS);
            }
            pthread_mutex_lock(&b->mu);
            killed = 1;
            continue;
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t ns = (uint64_t)ts.tv_nsec + (deadline - now) * 1000000ull;
        ts.tv_sec += (time_t)(ns / 1000000000ull);
        ts.tv_nsec = (long)(ns % 1000000000ull);
        pthread_cond_timedwait(&b->cv, &b->mu, &ts);
    }
    pthread_mutex_unlock(&b->mu);
    int ok = 0;
    for (size_t i = 0; i < b->n; i++) ok += b->ops[i].status == KVS_OK;
    batch_free(b);
    return ok;
}

int kvs_xfer_run(kvs_xfer_client *xc, kvs_xfer_op *ops, size_t n)
{
    kvs_xfer_batch *b;
    if (kvs_xfer_submit(xc, ops, n, &b)) return 0;
    return kvs_xfer_wait(b);
}

int kvs_xfer_client_new(const char *secret, int timeout_ms, kvs_xfer_client **out)
{
    kvs_xfer_client *xc = calloc(1, sizeof *xc);
    if (!xc) return KVS_ERR_NOMEM;
    if (secret) kvs_strlcpy(xc->secret, secret, sizeof xc->secret);
    xc->timeout_ms = timeout_ms > 0 ? timeout_ms : 5000;
    pthread_mutex_init(&xc->mu, NULL);
    pthread_mutex_init(&xc->live_mu, NULL);
    pthread_cond_init(&xc->live_cv, NULL);
    *out = xc;
    return KVS_OK;
}

void kvs_xfer_client_cancel(kvs_xfer_client *xc)
{
    atomic_store(&xc->cancelled, 1);
    pthread_mutex_lock(&xc->mu);
    for (struct xpeer *p = xc->peers; p; p = p->next) {
        pthread_mutex_lock(&p->mu);
        if (p->conn) conn_kill(p->conn);
        pthread_mutex_unlock(&p->mu);
    }
    pthread_mutex_unlock(&xc->mu);
}

void kvs_xfer_client_drop_peer(kvs_xfer_client *xc, const char *peer)
{
    pthread_mutex_lock(&xc->mu);
    for (struct xpeer *p = xc->peers; p; p = p->next) {
        if (strcmp(p->peer, peer)) continue;
        pthread_mutex_lock(&p->mu);
        if (p->conn) conn_kill(p->conn);
        pthread_mutex_unlock(&p->mu);
    }
    pthread_mutex_unlock(&xc->mu);
}

void kvs_xfer_client_free(kvs_xfer_client *xc)
{
    if (!xc) return;
    pthread_mutex_lock(&xc->mu);
    struct xpeer *p = xc->peers;
    xc->peers = NULL;
    pthread_mutex_unlock(&xc->mu);
    while (p) {
        struct xpeer *n = p->next;
        if (p->conn) {
            conn_kill(p->conn);
            conn_unref(p->conn);
        }
        pthread_mutex_destroy(&p->mu);
        free(p);
        p = n;
    }
    pthread_mutex_lock(&xc->live_mu);
    while (xc->live_readers) pthread_cond_wait(&xc->live_cv, &xc->live_mu);
    pthread_mutex_unlock(&xc->live_mu);
    pthread_mutex_destroy(&xc->mu);
    pthread_mutex_destroy(&xc->live_mu);
    pthread_cond_destroy(&xc->live_cv);
    free(xc);
}
