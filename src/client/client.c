/* Client lifecycle: open/close, the master connection (HELLO, MOUNT,
 * reconnect with backoff), the heartbeat thread and the segment table. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/statvfs.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client/client_internal.h"
#include "common/etcd.h"
#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"

/* Reconnect attempts after a failed one: exponential back-off with jitter
 * (a random delay in [b/2, b], b doubling from BACKOFF_MIN_MS to
 * BACKOFF_MAX_MS), so clients neither spin nor reconnect in lock-step. */
#define BACKOFF_MIN_MS 10
#define BACKOFF_MAX_MS 1000
#define FENCE_RETRY_MS 100 /* heartbeat sooner while a fence waits for a writer */
#define DEFAULT_TTL_MS 10000
#define DEFAULT_LEASE_MS 5000
#define RETIRE_GRACE_MS 30000
#define POOL_SEGMENT_WAIT_MS 5000 /* after a (re)connect, do not retire absent segments */
#define DIR_LOAD_BATCH 4096 /* directory entries per DIR_LOAD */
#define DIR_PARK_MS 250     /* a DIR_SYNC with nothing to do waits this long at the master */
#define DIR_RETRY_MS 100    /* after a failed DIR_SYNC */

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* ---- lifecycle of calls ---- */

int kvs_enter(kvs_client *c)
{
    if (!c) return KVS_ERR_INVALID;
    atomic_fetch_add(&c->active, 1);
    if (atomic_load(&c->closing)) {
        atomic_fetch_sub(&c->active, 1);
        return KVS_ERR_CLOSED;
    }
    return KVS_OK;
}

void kvs_leave(kvs_client *c) { atomic_fetch_sub(&c->active, 1); }

uint32_t kvs_client_gen(kvs_client *c)
{
    pthread_mutex_lock(&c->mu);
    uint32_t g = c->gen;
    pthread_mutex_unlock(&c->mu);
    return g;
}

/* ---- master connection ---- */

/* Sends one DIR_LOAD of entries v[0..n) (last: the final, empty one) and
 * unlists every entry the master refused. KVS_OK or the call's error. */
static int load_batch(kvs_client *c, kvs_rpc *rpc, uint64_t client_id, uint32_t seg_id,
                      const kvs_dir_entry *v, uint32_t n, int last, uint64_t *refused)
{
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    kvs_wbuf_u64(&w, client_id);
    kvs_wbuf_u32(&w, seg_id);
    kvs_wbuf_u8(&w, last ? 1 : 0);
    kvs_wbuf_u32(&w, n);
    for (uint32_t i = 0; i < n; i++) {
        kvs_wbuf_bytes(&w, v[i].key, v[i].key_len);
        kvs_wbuf_u64(&w, v[i].offset);
        kvs_wbuf_u64(&w, v[i].size);
    }
    if (w.err) {
        kvs_wbuf_free(&w);
        return KVS_ERR_NOMEM;
    }
    uint8_t *resp = NULL;
    uint32_t len = 0;
    int rc = kvs_rpc_call(rpc, KVS_MSG_DIR_LOAD, w.data, w.len, c->timeout_ms, &resp, &len);
    kvs_wbuf_free(&w);
    if (rc) return rc;
    kvs_rbuf r;
    kvs_rbuf_init(&r, resp, len);
    uint32_t m = kvs_rbuf_u32(&r);
    if (m != n) r.err = KVS_ERR_PROTO;
    for (uint32_t i = 0; i < n && !r.err; i++) {
        int st = kvs_rbuf_i32(&r);
        if (!r.err && st != KVS_OK) { /* gone from the directory before `last` */
            kvs_dir_del(c->dir, v[i].offset);
            (*refused)++;
        }
    }
    rc = kvs_rbuf_finish(&r);
    free(resp);
    return rc;
}

/* Hands the segment's directory (the snapshot v[0..n) taken before MOUNT)
 * to the master that just mounted it (DIR_LOAD, proto.h): every listed
 * object becomes a hit again. Entries the master refuses are unlisted
 * before the final DIR_LOAD, after which the master places new objects in
 * the segment. */
static int load_directory(kvs_client *c, kvs_rpc *rpc, uint64_t client_id, uint32_t seg_id,
                          const kvs_dir_entry *v, uint64_t n)
{
    uint64_t refused = 0;
    uint64_t t0 = kvs_now_ms();
    int rc = KVS_OK;
    for (uint64_t i = 0; rc == KVS_OK && i < n; i += DIR_LOAD_BATCH) {
        uint32_t k = (uint32_t)KVS_MIN(n - i, (uint64_t)DIR_LOAD_BATCH);
        rc = load_batch(c, rpc, client_id, seg_id, v + i, k, 0, &refused);
    }
    if (rc == KVS_OK) rc = load_batch(c, rpc, client_id, seg_id, NULL, 0, 1, &refused);
    if (rc != KVS_OK)
        KVS_LOGW("client: handing the segment's directory to the master failed: %s",
                 kvs_strerror(rc));
    else
        KVS_LOGI("client: segment %u: %llu objects of its directory handed to the master "
                 "(%llu refused) in %llu ms",
                 seg_id, (unsigned long long)(n - refused), (unsigned long long)refused,
                 (unsigned long long)(kvs_now_ms() - t0));
    return rc;
}

/* MOUNTs our segment on a fresh connection; returns the segment id. A
 * segment mounted before is fenced first past every epoch any earlier
 * registration handed out (an earlier master, or ours before we expired:
 * at most its control page's epoch + 1, proto.h "Write epochs"), so that no
 * write reserved under one can land in space the master hands out again. A
 * fresh segment (epoch 1, never mounted) had no writers: no fence. With a
 * directory, MOUNT says so and its entries follow (DIR_LOAD): the master
 * rebuilds its index of this segment from them (a restarted master, or
 * this one after our registration expired). *reg_out gets the directory
 * registration this MOUNT started (0 without a directory). */
static int mount_segment(kvs_client *c, kvs_rpc *rpc, uint64_t client_id, uint32_t *seg_id,
                         uint64_t *reg_out)
{
    uint64_t epoch = kvs_segment_epoch(&c->seg);
    if (atomic_load(&c->seg_mounted)) {
        epoch += 2;
        int frc = kvs_segment_fence(&c->seg, epoch);
        if (frc != KVS_OK) {
            KVS_LOGW("client: cannot mount the segment yet: a writer of an earlier "
                     "registration is still inside it (%s); retrying",
                     kvs_strerror(frc));
            return frc;
        }
    }
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    kvs_wbuf_u64(&w, client_id);
    kvs_wbuf_u64(&w, c->seg.size);
    kvs_wbuf_str(&w, c->seg.name);
    kvs_wbuf_str(&w, kvs_xfer_server_addr(c->xsrv));
    kvs_wbuf_put(&w, c->host_id, KVS_HOST_ID_LEN);
    kvs_wbuf_u64(&w, epoch);
    /* changes fetched for an earlier registration are refused from now on,
     * so the snapshot is what this registration starts from */
    uint64_t dir_reg = c->dir ? kvs_dir_new_registration(c->dir) : 0;
    *reg_out = dir_reg;
    kvs_dir_entry *dv = NULL;
    uint64_t dn = 0;
    if (c->dir && kvs_dir_snapshot(c->dir, &dv, &dn) != KVS_OK) w.err = KVS_ERR_NOMEM;
    /* an empty directory needs no DIR_LOAD: the segment is collected at once */
    kvs_wbuf_u32(&w, !c->dir ? 0 : dn ? KVS_MOUNT_F_DIR : KVS_MOUNT_F_DIR | KVS_MOUNT_F_DIR_EMPTY);
    kvs_wbuf_u64(&w, kvs_dir_reign(c->dir)); /* the reign it last followed (0: none) */
    if (w.err) {
        free(dv);
        kvs_wbuf_free(&w);
        return KVS_ERR_NOMEM;
    }
    uint8_t *resp;
    uint32_t len;
    /* from here on a master may have registered it (even if no answer comes) */
    atomic_store(&c->seg_mounted, 1);
    int rc = kvs_rpc_call(rpc, KVS_MSG_MOUNT, w.data, w.len, c->timeout_ms, &resp, &len);
    kvs_wbuf_free(&w);
    if (rc) {
        free(dv);
        return rc;
    }
    kvs_rbuf r;
    kvs_rbuf_init(&r, resp, len);
    *seg_id = kvs_rbuf_u32(&r);
    uint64_t reign = r.err == KVS_OK && r.pos < r.len ? kvs_rbuf_u64(&r) : 0; /* optional */
    rc = kvs_rbuf_finish(&r);
    free(resp);
    if (rc == KVS_OK && dn) rc = load_directory(c, rpc, client_id, *seg_id, dv, dn);
    free(dv);
    /* handed in (what the master refused is unlisted): from now on the
     * directory follows this master's reign */
    if (rc == KVS_OK && c->dir && reign) kvs_dir_set_reign(c->dir, reign);
    return rc;
}

/* The embedded pool's master answers on its socket a moment before its own
 * segment is mounted: wait (up to POOL_SEGMENT_WAIT_MS) until SEGMENTS lists
 * one, so the first put of a fresh pool does not fail with NO_SPACE. */
static void wait_pool_segment(kvs_client *c, kvs_rpc *rpc)
{
    uint64_t deadline = kvs_now_ms() + POOL_SEGMENT_WAIT_MS;
    for (;;) {
        uint8_t *resp = NULL;
        uint32_t len = 0;
        int rc = kvs_rpc_call(rpc, KVS_MSG_SEGMENTS, NULL, 0, c->timeout_ms, &resp, &len);
        kvs_rbuf r;
        kvs_rbuf_init(&r, resp, len);
        uint32_t n = rc == KVS_OK ? kvs_rbuf_u32(&r) : 0;
        free(resp);
        if (rc != KVS_OK || n > 0 || kvs_now_ms() >= deadline) return;
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* Opens a new master connection (HELLO, MOUNT) and installs it; timeout_ms
 * bounds the connect and handshake. Called by one thread at a time: with
 * conn_mu held (open) or as the thread that set c->connecting. */
static int connect_master(kvs_client *c, int timeout_ms, char *err, size_t errlen)
{
    if (c->embedded) {
        char e2[512] = "";
        int rc = kvs_embedded_ensure(&c->cfg, c->runtime_dir, !c->opts.no_spawn, e2, sizeof e2);
        if (rc) {
            seterr(err, errlen, "%s", e2);
            return rc;
        }
    }
    if (c->etcd) { /* failover: the leader named in etcd now */
        char *leader = NULL;
        int lrc = kvs_etcd_get(c->etcd, c->etcd_leader_key, &leader, NULL, NULL);
        kvs_addr la;
        if (lrc == KVS_OK && (kvs_addr_parse(leader, KVS_DEFAULT_MASTER_PORT, &la) != KVS_OK ||
                              la.is_unix || la.port == 0))
            lrc = KVS_ERR_PROTO;
        if (lrc != KVS_OK && lrc != KVS_ERR_NOT_FOUND && c->master.port) {
            /* etcd away: the leader we knew (it refuses if it stepped down) */
            KVS_LOGW("client: etcd %s: %s; trying the last known leader %s:%u", c->master_text,
                     kvs_strerror(lrc), c->master.host, c->master.port);
            free(leader);
            leader = NULL;
            lrc = KVS_OK;
            la = c->master;
        }
        if (lrc != KVS_OK) {
            seterr(err, errlen, "no master leader in %s (%s): %s", c->master_text,
                   c->etcd_leader_key,
                   lrc == KVS_ERR_NOT_FOUND ? "no leader elected (yet)" : kvs_strerror(lrc));
            free(leader);
            return KVS_ERR_CONN;
        }
        if (strcmp(la.host, c->master.host) != 0 || la.port != c->master.port)
            KVS_LOGI("client: the master leader is %s (%s)", leader, c->master_text);
        if (leader) {
            c->master = la;
            pthread_mutex_lock(&c->mu);
            kvs_strlcpy(c->etcd_leader, leader, sizeof c->etcd_leader);
            pthread_mutex_unlock(&c->mu);
            free(leader);
        }
    }
    kvs_rpc *rpc;
    kvs_hello_info hi;
    int rc = kvs_rpc_open(&c->master, c->cfg.secret, c->opts.role, timeout_ms, &rpc, &hi);
    if (rc == KVS_ERR_PROTO) {
        seterr(err, errlen,
               "the server at %s does not speak kvshelf's protocol (a Mooncake master, or "
               "another service, on that port?): master_server_address must name a `kvshelf "
               "master` (or be empty for the host-local pool)",
               c->master_text);
        return KVS_ERR_PROTO;
    }
    if (rc) {
        seterr(err, errlen, "cannot reach the master at %s: %s", c->master_text,
               kvs_strerror(rc));
        return rc == KVS_ERR_AUTH ? KVS_ERR_AUTH : KVS_ERR_CONN;
    }
    if (c->embedded && !c->opts.no_spawn) wait_pool_segment(c, rpc);
    uint32_t seg_id = 0;
    uint64_t dir_reg = 0;
    if (c->have_seg) {
        rc = mount_segment(c, rpc, hi.client_id, &seg_id, &dir_reg);
        if (rc) {
            seterr(err, errlen, "cannot mount the segment at the master %s: %s", c->master_text,
                   kvs_strerror(rc));
            kvs_rpc_kill(rpc, KVS_ERR_CONN);
            kvs_rpc_unref(rpc);
            return rc == KVS_ERR_AUTH ? rc : KVS_ERR_CONN;
        }
    }
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->closing)) { /* kvs_client_close started meanwhile */
        pthread_mutex_unlock(&c->mu);
        kvs_rpc_kill(rpc, KVS_ERR_CLOSED);
        kvs_rpc_unref(rpc);
        return KVS_ERR_CLOSED;
    }
    kvs_rpc *old = c->rpc;
    uint32_t old_seg = c->seg_id;
    c->rpc = rpc;
    c->client_id = hi.client_id;
    c->ttl_ms = hi.ttl_ms ? hi.ttl_ms : DEFAULT_TTL_MS;
    c->lease_ms = hi.lease_ms ? hi.lease_ms : DEFAULT_LEASE_MS;
    c->gen++;
    c->seg_id = seg_id;
    c->dir_reg = dir_reg;
    c->connected_ms = kvs_now_ms();
    int reconnect = c->gen > 1;
    pthread_mutex_unlock(&c->mu);
    if (c->have_seg) {
        if (old_seg && old_seg != seg_id) kvs_xfer_server_remove_segment(c->xsrv, old_seg);
        kvs_xfer_server_add_segment(c->xsrv, seg_id, &c->seg);
    }
    if (old) {
        kvs_rpc_kill(old, KVS_ERR_CONN);
        kvs_rpc_unref(old);
    }
    if (reconnect) {
        atomic_fetch_add(&c->n_reconnects, 1);
        KVS_LOGI("client: reconnected to the master %s (client %llu)", c->master_text,
                 (unsigned long long)hi.client_id);
    }
    return KVS_OK;
}

static int conn_take(kvs_client *c, kvs_conn_ref *out)
{
    int ok = 0;
    pthread_mutex_lock(&c->mu);
    if (c->rpc && kvs_rpc_alive(c->rpc)) {
        kvs_rpc_ref(c->rpc);
        out->rpc = c->rpc;
        out->client_id = c->client_id;
        out->gen = c->gen;
        out->lease_ms = c->lease_ms;
        ok = 1;
    }
    pthread_mutex_unlock(&c->mu);
    return ok;
}

/* The delay before the next reconnect attempt after a failed one (see
 * BACKOFF_MIN_MS). Caller holds conn_mu. */
static uint64_t next_backoff_locked(kvs_client *c)
{
    c->backoff_ms = c->backoff_ms ? KVS_MIN(c->backoff_ms * 2, BACKOFF_MAX_MS) : BACKOFF_MIN_MS;
    if (!c->jitter) c->jitter = (kvs_now_ns() ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)c) | 1;
    c->jitter ^= c->jitter << 13; /* xorshift64 */
    c->jitter ^= c->jitter >> 7;
    c->jitter ^= c->jitter << 17;
    uint64_t half = (uint64_t)c->backoff_ms / 2;
    return (uint64_t)c->backoff_ms - half + c->jitter % (half + 1);
}

/* Waits on conn_cv until `until_ms` (monotonic) at most. Caller holds conn_mu. */
static void conn_wait_locked(kvs_client *c, uint64_t until_ms)
{
    uint64_t now = kvs_now_ms();
    if (until_ms <= now) return;
    kvs_cond_wait_ms(&c->conn_cv, &c->conn_mu, until_ms - now);
}

int kvs_conn_get(kvs_client *c, kvs_conn_ref *out)
{
    memset(out, 0, sizeof *out);
    if (conn_take(c, out)) return KVS_OK;
    if (atomic_load(&c->closing)) return KVS_ERR_CLOSED;
    /* The master is away: reconnect, or wait (within this call's timeout)
     * for the attempt in progress or for the next attempt the back-off
     * allows, instead of failing at once: a caller in a loop then fails
     * at the pace of the attempts, not as fast as it can call. */
    uint64_t deadline = kvs_now_ms() + (uint64_t)(c->timeout_ms > 0 ? c->timeout_ms : 1);
    int rc = KVS_ERR_CONN;
    pthread_mutex_lock(&c->conn_mu);
    for (;;) {
        if (atomic_load(&c->closing)) {
            rc = KVS_ERR_CLOSED;
            break;
        }
        if (conn_take(c, out)) {
            rc = KVS_OK;
            break;
        }
        uint64_t now = kvs_now_ms();
        if (now >= deadline) {
            rc = KVS_ERR_CONN;
            break;
        }
        if (!c->connecting && now >= c->retry_at_ms) {
            c->connecting = 1; /* others wait on conn_cv meanwhile */
            pthread_mutex_unlock(&c->conn_mu);
            rc = connect_master(c, (int)(deadline - now), NULL, 0);
            pthread_mutex_lock(&c->conn_mu);
            c->connecting = 0;
            if (rc) {
                c->retry_at_ms = kvs_now_ms() + next_backoff_locked(c);
                if (rc != KVS_ERR_AUTH && rc != KVS_ERR_CLOSED) rc = KVS_ERR_CONN;
            } else {
                c->backoff_ms = 0;
                c->retry_at_ms = 0;
                if (!conn_take(c, out)) rc = KVS_ERR_CONN;
            }
            pthread_cond_broadcast(&c->conn_cv);
            break; /* this call's own attempt decides */
        }
        conn_wait_locked(c, c->connecting ? deadline : KVS_MIN(deadline, c->retry_at_ms));
    }
    pthread_mutex_unlock(&c->conn_mu);
    return rc;
}

void kvs_conn_put(kvs_conn_ref *cr)
{
    if (cr->rpc) kvs_rpc_unref(cr->rpc);
    cr->rpc = NULL;
}

/* What a reply's status means for the connection (see kvs_conn_call). */
static int conn_status(kvs_client *c, kvs_conn_ref *cr, int rc, int names_client)
{
    if (rc == KVS_ERR_NOT_FOUND && names_client) {
        KVS_LOGW("client: the master does not know client %llu any more; reconnecting",
                 (unsigned long long)cr->client_id);
        kvs_rpc_kill(cr->rpc, KVS_ERR_CONN);
        rc = KVS_ERR_CONN;
    }
    if (rc == KVS_ERR_CONN && atomic_load(&c->closing)) rc = KVS_ERR_CLOSED;
    return rc;
}

int kvs_conn_call(kvs_client *c, kvs_conn_ref *cr, uint16_t type, const kvs_wbuf *body,
                  int names_client, uint8_t **resp, uint32_t *resp_len)
{
    *resp = NULL;
    *resp_len = 0;
    if (body->err) return body->err;
    int rc = kvs_rpc_call(cr->rpc, type, body->data, body->len, c->timeout_ms, resp, resp_len);
    return conn_status(c, cr, rc, names_client);
}

int kvs_conn_start(kvs_conn_ref *cr, kvs_rpc_req *q, uint16_t type, const kvs_wbuf *body)
{
    return kvs_rpc_start(cr->rpc, q, type, body->data, body->len);
}

int kvs_conn_finish(kvs_client *c, kvs_conn_ref *cr, kvs_rpc_req *q, int names_client,
                    uint8_t **resp, uint32_t *resp_len)
{
    int rc = kvs_rpc_finish(cr->rpc, q, c->timeout_ms, resp, resp_len);
    return conn_status(c, cr, rc, names_client);
}

/* ---- segment table ---- */

static int seg_cmp(const void *a, const void *b)
{
    const kvs_seginfo *x = a, *y = b;
    return x->id < y->id ? -1 : x->id > y->id;
}

static int refresh_segments(kvs_client *c, uint32_t want_gen)
{
    kvs_conn_ref cr;
    int rc = kvs_conn_get(c, &cr);
    if (rc) return rc;
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    uint8_t *resp;
    uint32_t len;
    rc = kvs_conn_call(c, &cr, KVS_MSG_SEGMENTS, &w, 0, &resp, &len);
    kvs_wbuf_free(&w);
    if (rc) {
        kvs_conn_put(&cr);
        return rc;
    }
    kvs_rbuf r;
    kvs_rbuf_init(&r, resp, len);
    uint32_t n = kvs_rbuf_u32(&r);
    kvs_segtab *t = NULL;
    if (!r.err && n <= len / 40) t = calloc(1, sizeof *t + (size_t)n * sizeof(kvs_seginfo));
    if (!t) {
        free(resp);
        kvs_conn_put(&cr);
        return r.err ? KVS_ERR_PROTO : KVS_ERR_NOMEM;
    }
    const char **names = calloc(n ? n : 1, sizeof *names);
    size_t k = 0;
    for (uint32_t i = 0; i < n && !r.err; i++) {
        kvs_seginfo *s = &t->v[k];
        s->id = kvs_rbuf_u32(&r);
        s->size = kvs_rbuf_u64(&r);
        (void)kvs_rbuf_u64(&r); /* used */
        kvs_rbuf_str(&r, s->shm_name, sizeof s->shm_name);
        kvs_rbuf_str(&r, s->transfer_addr, sizeof s->transfer_addr);
        uint8_t hid[KVS_HOST_ID_LEN];
        kvs_rbuf_raw(&r, hid, sizeof hid);
        (void)kvs_rbuf_u64(&r); /* owner */
        if (r.err) break;
        if (!c->no_shm && !memcmp(hid, c->host_id, sizeof hid) && s->shm_name[0]) {
            s->seg = kvs_shm_cache_get(c->shm, s->shm_name, s->size);
            s->base = s->seg ? s->seg->base : NULL;
        }
        if (names) names[k] = s->shm_name;
        k++;
    }
    rc = kvs_rbuf_finish(&r);
    free(resp);
    if (rc) {
        free(t);
        free(names);
        kvs_conn_put(&cr);
        KVS_LOGW("client: malformed SEGMENTS reply");
        return KVS_ERR_PROTO;
    }
    t->n = k;
    t->gen = cr.gen;
    for (size_t i = 0; i < k; i++) t->nmapped += t->v[i].base != NULL;
    qsort(t->v, t->n, sizeof t->v[0], seg_cmp);
    /* Segments that left the pool: release their memory, keep the address
     * range (slots may still point there). Not right after a reconnect,
     * when owners may not have re-mounted yet. */
    pthread_mutex_lock(&c->mu);
    int settled = kvs_now_ms() - c->connected_ms > RETIRE_GRACE_MS;
    pthread_mutex_unlock(&c->mu);
    if (settled && names) kvs_shm_cache_retire_absent(c->shm, names, k);
    free(names);
    pthread_rwlock_wrlock(&c->tab_lock);
    kvs_segtab *old = c->tab;
    c->tab = t;
    pthread_rwlock_unlock(&c->tab_lock);
    free(old);
    kvs_conn_put(&cr);
    (void)want_gen;
    return KVS_OK;
}

/* Looks up id in the current table: 1 found, 0 unknown, -1 table stale. */
static int tab_lookup(kvs_client *c, uint32_t gen, uint32_t id, kvs_seginfo *out)
{
    int res = -1;
    pthread_rwlock_rdlock(&c->tab_lock);
    kvs_segtab *t = c->tab;
    if (t && t->gen == gen) {
        res = 0;
        size_t lo = 0, hi = t->n;
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            if (t->v[mid].id < id) lo = mid + 1;
            else hi = mid;
        }
        if (lo < t->n && t->v[lo].id == id) {
            *out = t->v[lo];
            res = 1;
        }
    }
    pthread_rwlock_unlock(&c->tab_lock);
    return res;
}

int kvs_seg_peek(kvs_client *c, uint32_t gen, uint32_t id, kvs_seginfo *out)
{
    return tab_lookup(c, gen, id, out) == 1;
}

int kvs_seg_find(kvs_client *c, uint32_t gen, uint32_t id, kvs_seginfo *out)
{
    if (tab_lookup(c, gen, id, out) == 1) return KVS_OK;
    if (kvs_client_gen(c) != gen) return KVS_ERR_UNAVAILABLE; /* reconnected since */
    pthread_mutex_lock(&c->refresh_mu);
    /* another thread may have refreshed while we waited */
    int r = tab_lookup(c, gen, id, out);
    if (r != 1) {
        refresh_segments(c, gen);
        r = tab_lookup(c, gen, id, out);
    }
    pthread_mutex_unlock(&c->refresh_mu);
    return r == 1 ? KVS_OK : KVS_ERR_UNAVAILABLE;
}

/* ---- heartbeat thread ---- */

/* Runs the fences a HEARTBEAT reply asks of our segment: fences the
 * memory (without waiting for writers still inside) and confirms each done
 * one with FENCE. Returns 1 if a fence is still pending (retry soon). */
static int run_fences(kvs_client *c, kvs_conn_ref *cr, const uint8_t *resp, uint32_t len)
{
    kvs_rbuf r;
    kvs_rbuf_init(&r, resp, len);
    uint32_t n = kvs_rbuf_u32(&r);
    int pending = 0;
    pthread_mutex_lock(&c->mu);
    uint32_t my_seg = c->seg_id;
    pthread_mutex_unlock(&c->mu);
    for (uint32_t i = 0; i < n && !r.err; i++) {
        uint32_t seg = kvs_rbuf_u32(&r);
        uint64_t epoch = kvs_rbuf_u64(&r);
        if (r.err || !c->have_seg || seg != my_seg) continue;
        int rc = kvs_segment_fence(&c->seg, epoch);
        if (rc == KVS_ERR_BUSY) {
            pending = 1;
            continue;
        }
        if (rc != KVS_OK) {
            KVS_LOGW("client: fencing segment %u to epoch %llu: %s", seg,
                     (unsigned long long)epoch, kvs_strerror(rc));
            continue;
        }
        kvs_wbuf w;
        kvs_wbuf_init(&w);
        kvs_wbuf_u64(&w, cr->client_id);
        kvs_wbuf_u32(&w, seg);
        kvs_wbuf_u64(&w, epoch);
        uint8_t *fr = NULL;
        uint32_t flen;
        rc = kvs_conn_call(c, cr, KVS_MSG_FENCE, &w, 1, &fr, &flen);
        free(fr);
        kvs_wbuf_free(&w);
        if (rc != KVS_OK) pending = 1;
    }
    if (r.err) KVS_LOGW("client: malformed HEARTBEAT reply");
    return pending;
}

/* Waits on c->hb_cv (c->hb_mu held) for at most ms milliseconds: the
 * heartbeat, directory and leader-watch threads sleep here until woken or
 * due. */
static void hb_wait(kvs_client *c, uint64_t ms) { kvs_cond_wait_ms(&c->hb_cv, &c->hb_mu, ms); }

/* Failover: how often a client of an etcd:// master address checks that the
 * leader key still names the master it is connected to (KVSHELF_LEADER_CHECK_MS,
 * default 500). A master that died or froze keeps its connections open or
 * silent for a while; a node that moves to the new leader at once hands its
 * directory in while the new leader still rebuilds. */
static uint64_t leader_check_ms(void)
{
    static uint64_t v;
    if (!v) v = kvs_env_u64("KVSHELF_LEADER_CHECK_MS", 500, 50, 60000, "ms");
    return v;
}

/* 1 if etcd names a leader other than the one this client's connection
 * goes to; that connection is then closed (the caller reconnects). 0 if
 * not (or no leader key: an election is under way), -1 if etcd did not
 * answer (the caller checks less often for a while). */
static int leader_moved(kvs_client *c)
{
    char *leader = NULL;
    int rc = kvs_etcd_get(c->etcd, c->etcd_leader_key, &leader, NULL, NULL);
    if (rc != KVS_OK) {
        free(leader);
        return rc == KVS_ERR_NOT_FOUND ? 0 : -1; /* keep the connection we have */
    }
    int moved = 0;
    pthread_mutex_lock(&c->mu);
    if (c->rpc && kvs_rpc_alive(c->rpc) && c->etcd_leader[0] && strcmp(leader, c->etcd_leader)) {
        KVS_LOGW("client: etcd names a new master leader, %s (was %s): reconnecting", leader,
                 c->etcd_leader);
        kvs_rpc_kill(c->rpc, KVS_ERR_CONN);
        moved = 1;
    }
    pthread_mutex_unlock(&c->mu);
    free(leader);
    return moved;
}

/* The leader watch thread of an etcd:// client: every leader_check_ms it
 * reads the leader key and, when it names another master, drops the
 * connection and reconnects to the new leader at once. A thread of its
 * own: the heartbeat thread may be blocked for a whole timeout in a call to
 * a frozen master. */
static void *lw_main(void *arg)
{
    kvs_client *c = arg;
    uint64_t next_check = 0;
    pthread_mutex_lock(&c->hb_mu);
    while (!c->hb_stop) {
        hb_wait(c, leader_check_ms());
        if (c->hb_stop) break;
        pthread_mutex_unlock(&c->hb_mu);
        if (kvs_now_ms() >= next_check) {
            int moved = leader_moved(c);
            if (moved < 0) next_check = kvs_now_ms() + 5000; /* etcd away: less often */
            if (moved > 0 && !atomic_load(&c->closing)) {
                kvs_conn_ref cr;
                if (kvs_conn_get(c, &cr) == KVS_OK) kvs_conn_put(&cr); /* reconnect now */
            }
        }
        pthread_mutex_lock(&c->hb_mu);
    }
    pthread_mutex_unlock(&c->hb_mu);
    return NULL;
}

static void *hb_main(void *arg)
{
    kvs_client *c = arg;
    int fence_pending = 0;
    pthread_mutex_lock(&c->hb_mu);
    while (!c->hb_stop) {
        pthread_mutex_lock(&c->mu);
        int connected = c->rpc && kvs_rpc_alive(c->rpc);
        uint32_t ttl = c->ttl_ms;
        uint64_t retry_at = c->retry_at_ms;
        pthread_mutex_unlock(&c->mu);
        uint64_t wait_ms = connected ? KVS_MAX(ttl / 3, 10u) : BACKOFF_MIN_MS;
        if (connected && fence_pending) wait_ms = KVS_MIN(wait_ms, FENCE_RETRY_MS);
        if (!connected && retry_at > kvs_now_ms()) wait_ms = retry_at - kvs_now_ms();
        hb_wait(c, wait_ms);
        if (c->hb_stop) break;
        pthread_mutex_unlock(&c->hb_mu);

        kvs_conn_ref cr;
        if (kvs_conn_get(c, &cr) == KVS_OK) {
            kvs_wbuf w;
            kvs_wbuf_init(&w);
            kvs_wbuf_u64(&w, cr.client_id);
            uint8_t *resp;
            uint32_t len;
            int rc = kvs_conn_call(c, &cr, KVS_MSG_HEARTBEAT, &w, 1, &resp, &len);
            kvs_wbuf_free(&w);
            if (rc == KVS_OK) fence_pending = run_fences(c, &cr, resp, len);
            free(resp);
            if (rc == KVS_ERR_TIMEOUT) {
                KVS_LOGW("client: heartbeat timed out; reconnecting to %s", c->master_text);
                kvs_rpc_kill(cr.rpc, KVS_ERR_CONN);
            }
            kvs_conn_put(&cr);
            if (rc == KVS_ERR_CONN && !atomic_load(&c->closing)) {
                /* reconnect at once (the master restarted or forgot us) */
                if (kvs_conn_get(c, &cr) == KVS_OK) kvs_conn_put(&cr);
            }
        }
        pthread_mutex_lock(&c->hb_mu);
    }
    pthread_mutex_unlock(&c->hb_mu);
    return NULL;
}

/* ---- directory sync thread ---- */

/* Applies one DIR_SYNC reply under registration `reg`. Returns 1 if the
 * batch was applied (its seq in *seq, 0 if empty; *dels: it unlisted
 * something; *more: more changes wait), 0 if it must not be acknowledged
 * (malformed, or a newer registration started meanwhile). */
static int apply_dir_batch(kvs_client *c, uint64_t reg, const uint8_t *resp, uint32_t len,
                           uint64_t *seq, int *dels, int *more)
{
    kvs_rbuf r;
    kvs_rbuf_init(&r, resp, len);
    *seq = kvs_rbuf_u64(&r);
    *more = kvs_rbuf_u8(&r) != 0;
    uint32_t n = kvs_rbuf_u32(&r);
    *dels = 0;
    for (uint32_t i = 0; i < n && !r.err; i++) {
        uint8_t op = kvs_rbuf_u8(&r);
        uint64_t off = kvs_rbuf_u64(&r), size = kvs_rbuf_u64(&r), obj = kvs_rbuf_u64(&r);
        uint32_t kl = 0;
        const uint8_t *key = kvs_rbuf_bytes(&r, KVS_KEY_MAX, &kl);
        if (r.err) break;
        if (op == 2) { /* unlisting is always safe, whatever the registration */
            kvs_dir_del(c->dir, off);
            *dels = 1;
        } else if (op == 1) {
            int rc = kvs_dir_add_if(c->dir, reg, key, kl, off, size, obj);
            if (rc == KVS_ERR_UNAVAILABLE) return 0;
            if (rc == KVS_ERR_NO_SPACE) {
                static kvs_log_limit lim;
                kvs_log_limited(&lim, 10000, KVS_LOG_WARN,
                                "client: the segment's directory is full (%llu entries): "
                                "objects beyond it are not kept across a master restart "
                                "(KVSHELF_DIR_SLOTS)",
                                (unsigned long long)kvs_dir_capacity(c->dir));
            }
        } else {
            r.err = KVS_ERR_PROTO;
        }
    }
    if (kvs_rbuf_finish(&r) != KVS_OK) {
        KVS_LOGW("client: malformed DIR_SYNC reply");
        return 0;
    }
    return 1;
}

/* Keeps the segment's directory in step with the master (DIR_SYNC): lists
 * objects the master declared complete, unlists those it dropped, and
 * acknowledges each batch (in the next request) so that the master may
 * reuse unlisted space. A request with nothing to do waits at the master
 * until a change comes (at most DIR_PARK_MS), so removals are heard of at
 * once without polling. */
static void *dir_main(void *arg)
{
    kvs_client *c = arg;
    uint64_t my_reg = 0, ack = 0, wait_ms = 0;
    uint32_t park_ms = (uint32_t)KVS_MIN(DIR_PARK_MS, KVS_MAX(c->timeout_ms / 2, 1));
    pthread_mutex_lock(&c->hb_mu);
    while (!c->hb_stop) {
        if (wait_ms) {
            hb_wait(c, wait_ms);
            if (c->hb_stop) break;
        }
        pthread_mutex_unlock(&c->hb_mu);
        wait_ms = DIR_RETRY_MS; /* unless the call below succeeds */
        kvs_conn_ref cr;
        pthread_mutex_lock(&c->mu);
        int connected = c->rpc && kvs_rpc_alive(c->rpc);
        uint32_t seg = c->seg_id;
        uint64_t reg = c->dir_reg;
        pthread_mutex_unlock(&c->mu);
        if (!connected) {
            /* the master went away: reconnect now (paced by the back-off),
             * not at the next heartbeat, so that a restarted master gets
             * this segment's directory back within a second or so */
            if (kvs_conn_get(c, &cr) == KVS_OK) {
                kvs_conn_put(&cr);
                wait_ms = 0;
            }
        } else if (seg && kvs_conn_get(c, &cr) == KVS_OK) {
            if (reg != my_reg) { /* a new MOUNT: its batches count from 1 */
                my_reg = reg;
                ack = 0;
            }
            kvs_wbuf w;
            kvs_wbuf_init(&w);
            kvs_wbuf_u64(&w, cr.client_id);
            kvs_wbuf_u32(&w, seg);
            kvs_wbuf_u64(&w, ack);
            kvs_wbuf_u32(&w, park_ms);
            uint8_t *resp = NULL;
            uint32_t len = 0;
            int rc = kvs_conn_call(c, &cr, KVS_MSG_DIR_SYNC, &w, 1, &resp, &len);
            kvs_wbuf_free(&w);
            uint64_t seq = 0;
            int dels = 0, more = 0;
            pthread_mutex_lock(&c->mu);
            int same = c->seg_id == seg && c->dir_reg == reg;
            pthread_mutex_unlock(&c->mu);
            if (rc == KVS_OK && same && apply_dir_batch(c, reg, resp, len, &seq, &dels, &more)) {
                if (seq) ack = seq;
                wait_ms = 0; /* ask again at once: the master paces us */
            }
            free(resp);
            kvs_conn_put(&cr);
        }
        pthread_mutex_lock(&c->hb_mu);
    }
    pthread_mutex_unlock(&c->hb_mu);
    return NULL;
}

/* ---- open / close ---- */

static void client_free(kvs_client *c)
{
    if (c->hb_started) {
        pthread_mutex_lock(&c->hb_mu);
        c->hb_stop = 1;
        pthread_cond_broadcast(&c->hb_cv);
        pthread_mutex_unlock(&c->hb_mu);
        pthread_join(c->hb, NULL);
    }
    if (c->lw_started) {
        pthread_mutex_lock(&c->hb_mu);
        c->hb_stop = 1;
        pthread_cond_broadcast(&c->hb_cv);
        pthread_mutex_unlock(&c->hb_mu);
        pthread_join(c->lw, NULL);
        c->lw_started = 0;
    }
    if (c->rpc) kvs_rpc_kill(c->rpc, KVS_ERR_CLOSED); /* a parked DIR_SYNC returns */
    if (c->dsync_started) {
        pthread_mutex_lock(&c->hb_mu);
        c->hb_stop = 1;
        pthread_cond_broadcast(&c->hb_cv);
        pthread_mutex_unlock(&c->hb_mu);
        pthread_join(c->dsync, NULL);
        c->dsync_started = 0;
    }
    if (c->rpc) kvs_rpc_unref(c->rpc);
    kvs_xfer_server_stop(c->xsrv);
    kvs_xfer_client_free(c->xc);
    kvs_shm_cache_free(c->shm);
    kvs_etcd_free(c->etcd);
    kvs_loccache_free(c->lc);
    kvs_resv_free(c->resv);
    kvs_dir_close(c->dir);
    if (c->have_seg) kvs_segment_destroy(&c->seg);
    free(c->tab);
    free(c->regs);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->conn_mu);
    pthread_mutex_destroy(&c->refresh_mu);
    pthread_mutex_destroy(&c->reg_mu);
    pthread_mutex_destroy(&c->hb_mu);
    pthread_cond_destroy(&c->hb_cv);
    pthread_cond_destroy(&c->conn_cv);
    pthread_rwlock_destroy(&c->tab_lock);
    free(c);
}

int kvs_client_open_opts(const kvs_config *cfg, const kvs_client_opts *opts, kvs_client **out,
                         char *err, size_t errlen)
{
    if (err && errlen) err[0] = '\0';
    if (!out) return KVS_ERR_INVALID;
    *out = NULL;
    if (!cfg) {
        seterr(err, errlen, "no configuration given");
        return KVS_ERR_INVALID;
    }
    int rc = kvs_config_validate(cfg, err, errlen);
    if (rc) return rc;
    if (strcmp(cfg->protocol, "tcp")) {
        seterr(err, errlen, "protocol '%s' is not built yet; use \"tcp\"", cfg->protocol);
        return KVS_ERR_CONFIG;
    }
    kvs_client *c = calloc(1, sizeof *c);
    if (!c) return KVS_ERR_NOMEM;
    c->cfg = *cfg;
    if (opts) c->opts = *opts;
    if (!c->opts.role) c->opts.role = KVS_ROLE_CLIENT;
    c->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : KVS_DEFAULT_TIMEOUT_MS;
    c->t0_ms = kvs_now_ms();
    kvs_host_id(c->host_id);
    const char *noshm = getenv("KVSHELF_NO_SHM");
    c->no_shm = noshm && *noshm && strcmp(noshm, "0");
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->conn_mu, NULL);
    pthread_mutex_init(&c->refresh_mu, NULL);
    pthread_mutex_init(&c->reg_mu, NULL);
    pthread_mutex_init(&c->hb_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->hb_cv, &ca);
    pthread_cond_init(&c->conn_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_rwlock_init(&c->tab_lock, NULL);

    c->embedded = cfg->master_server_address[0] == '\0';
    if (c->embedded) {
        rc = kvs_embedded_prepare_dir(cfg, c->runtime_dir, sizeof c->runtime_dir, err, errlen);
        if (rc) goto fail;
        snprintf(c->master_text, sizeof c->master_text, "unix:%s/master.sock", c->runtime_dir);
    } else {
        kvs_strlcpy(c->master_text, cfg->master_server_address, sizeof c->master_text);
    }
    if (!strncmp(c->master_text, "etcd://", 7)) { /* failover: the leader is in etcd */
        char eps[1024], prefix[256];
        rc = kvs_etcd_parse_url(c->master_text, eps, sizeof eps, prefix, sizeof prefix);
        if (rc == KVS_OK)
            rc = kvs_etcd_new(eps, KVS_MIN(c->timeout_ms, 1000), &c->etcd);
        if (rc) {
            seterr(err, errlen, "invalid master address '%s' (etcd://host:port[,host:port][/prefix])",
                   c->master_text);
            rc = rc == KVS_ERR_NOMEM ? rc : KVS_ERR_CONFIG;
            goto fail;
        }
        snprintf(c->etcd_leader_key, sizeof c->etcd_leader_key, "%s/leader", prefix);
    } else if (kvs_addr_parse(c->master_text, KVS_DEFAULT_MASTER_PORT, &c->master)) {
        seterr(err, errlen, "invalid master address '%s'", c->master_text);
        rc = KVS_ERR_CONFIG;
        goto fail;
    }
    int serves = !c->embedded && !c->opts.no_segment && cfg->global_segment_size > 0;
    if (!c->cfg.secret[0]) {
        /* no configured secret: this user's pool secret (its daemons use it too) */
        char e2[512] = "";
        rc = kvs_pool_secret(&c->cfg, c->cfg.secret, sizeof c->cfg.secret, e2, sizeof e2);
        if (rc && serves) { /* never serve a segment without a secret */
            seterr(err, errlen, "no secret configured and no pool secret: %s", e2);
            goto fail;
        }
        if (rc) KVS_LOGW("client: no secret configured and no pool secret (%s)", e2);
        rc = KVS_OK;
    }
    c->shm = kvs_shm_cache_new();
    c->lc = kvs_loccache_new(kvs_loccache_size_from_env()); /* NULL: off (or no memory) */
    c->resv = kvs_resv_new();
    rc = c->shm && c->resv ? kvs_xfer_client_new(c->cfg.secret, c->timeout_ms, &c->xc) : KVS_ERR_NOMEM;
    if (rc) goto fail;

    /* The embedded pool's own master process owns the pool's segment; other
     * clients in embedded mode contribute none. */
    if (serves) {
        /* issue 17: the embedded pool's own segment may be the one its killed
         * master left, adopted with its directory (embedded.c) */
        int adopted = 0;
        rc = kvs_embedded_segment_open(c, &adopted);
        if (rc == KVS_ERR_NO_SPACE) {
            struct statvfs vs;
            unsigned long long avail =
                statvfs("/dev/shm", &vs) == 0 ? (unsigned long long)vs.f_bavail * vs.f_frsize : 0;
            seterr(err, errlen,
                   "cannot reserve a shared-memory segment of %llu bytes: /dev/shm has %llu "
                   "bytes free (set a smaller global_segment_size, or make /dev/shm larger)",
                   (unsigned long long)cfg->global_segment_size, avail);
            goto fail;
        }
        if (rc) {
            seterr(err, errlen, "cannot create a shared-memory segment of %llu bytes: %s",
                   (unsigned long long)cfg->global_segment_size, kvs_strerror(rc));
            rc = KVS_ERR_IO;
            goto fail;
        }
        c->have_seg = 1;
        if (c->seg.dir && !adopted) { /* a fresh directory: this segment lists nothing yet */
            int drc = kvs_dir_attach(c->seg.dir, c->seg.dir_size, c->seg.size,
                                     kvs_segment_nonce(&c->seg), 1, &c->dir);
            if (drc != KVS_OK)
                KVS_LOGW("client: the segment's directory is unusable (%s): its objects "
                         "will not survive a master restart",
                         kvs_strerror(drc));
        }
        rc = kvs_xfer_server_start(cfg->local_hostname, c->cfg.secret, &c->xsrv);
        if (rc) {
            seterr(err, errlen, "cannot start the transfer server on %s: %s",
                   cfg->local_hostname, kvs_strerror(rc));
            goto fail;
        }
        kvs_shm_cache_add_local(c->shm, &c->seg);
    }

    pthread_mutex_lock(&c->conn_mu);
    rc = connect_master(c, c->timeout_ms, err, errlen);
    pthread_mutex_unlock(&c->conn_mu);
    if (rc) goto fail;
    /* the segment table now, so the first get/put needs no extra round trip */
    pthread_mutex_lock(&c->refresh_mu);
    refresh_segments(c, 0);
    pthread_mutex_unlock(&c->refresh_mu);
    if (pthread_create(&c->hb, NULL, hb_main, c) == 0) c->hb_started = 1;
    if (c->etcd && pthread_create(&c->lw, NULL, lw_main, c) == 0) c->lw_started = 1;
    if (c->dir && pthread_create(&c->dsync, NULL, dir_main, c) == 0) c->dsync_started = 1;
    *out = c;
    return KVS_OK;
fail:
    client_free(c);
    return rc;
}

int kvs_client_open(const kvs_config *cfg, kvs_client **out, char *err, size_t errlen)
{
    return kvs_client_open_opts(cfg, NULL, out, err, errlen);
}

void kvs_client_close(kvs_client *c)
{
    if (!c) return;
    if (atomic_exchange(&c->closing, 1)) return;
    /* calls waiting for a reconnect return now */
    pthread_mutex_lock(&c->conn_mu);
    pthread_cond_broadcast(&c->conn_cv);
    pthread_mutex_unlock(&c->conn_mu);
    /* stop heartbeats/reconnects first */
    pthread_mutex_lock(&c->hb_mu);
    c->hb_stop = 1;
    pthread_cond_broadcast(&c->hb_cv);
    pthread_mutex_unlock(&c->hb_mu);
    if (c->hb_started) pthread_join(c->hb, NULL);
    c->hb_started = 0;
    if (c->lw_started) pthread_join(c->lw, NULL);
    c->lw_started = 0;
    /* unmount (best effort) so the master drops our objects at once */
    pthread_mutex_lock(&c->mu);
    kvs_rpc *rpc = c->rpc;
    uint32_t seg_id = c->seg_id;
    uint64_t cid = c->client_id;
    if (rpc) kvs_rpc_ref(rpc);
    pthread_mutex_unlock(&c->mu);
    if (rpc && seg_id && kvs_rpc_alive(rpc)) {
        kvs_wbuf w;
        kvs_wbuf_init(&w);
        kvs_wbuf_u64(&w, cid);
        kvs_wbuf_u32(&w, seg_id);
        uint8_t *resp;
        uint32_t len;
        if (!w.err) {
            kvs_rpc_call(rpc, KVS_MSG_UNMOUNT, w.data, w.len, KVS_MIN(c->timeout_ms, 2000),
                         &resp, &len);
            free(resp);
        }
        kvs_wbuf_free(&w);
    }
    if (rpc) {
        kvs_rpc_kill(rpc, KVS_ERR_CLOSED); /* in-flight calls fail with KVS_ERR_CLOSED */
        kvs_rpc_unref(rpc);
    }
    if (c->dsync_started) pthread_join(c->dsync, NULL); /* its parked call failed just now */
    c->dsync_started = 0;
    kvs_xfer_client_cancel(c->xc); /* and transfers in flight end now */
    /* wait for calls still running in other threads */
    while (atomic_load(&c->active) > 0) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    client_free(c);
}

int kvs_client_shutdown_master(kvs_client *c)
{
    int rc = kvs_enter(c);
    if (rc) return rc;
    kvs_conn_ref cr;
    rc = kvs_conn_get(c, &cr);
    if (rc == KVS_OK) {
        kvs_wbuf w;
        kvs_wbuf_init(&w);
        uint8_t *resp;
        uint32_t len;
        rc = kvs_conn_call(c, &cr, KVS_MSG_SHUTDOWN, &w, 0, &resp, &len);
        free(resp);
        kvs_wbuf_free(&w);
        kvs_conn_put(&cr);
    }
    kvs_leave(c);
    return rc;
}

const char *kvs_client_master_addr(const kvs_client *c) { return c->master_text; }
int kvs_client_is_embedded(const kvs_client *c) { return c->embedded; }
const char *kvs_client_transfer_addr(const kvs_client *c)
{
    return c->xsrv ? kvs_xfer_server_addr(c->xsrv) : "";
}
uint32_t kvs_client_segment_id(kvs_client *c)
{
    pthread_mutex_lock(&c->mu);
    uint32_t id = c->seg_id;
    pthread_mutex_unlock(&c->mu);
    return id;
}

void kvs_client_get_counters(kvs_client *c, kvs_client_counters *out)
{
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!c) return;
    out->puts = atomic_load(&c->n_puts);
    out->gets = atomic_load(&c->n_gets);
    out->hits = atomic_load(&c->n_hits);
    out->misses = atomic_load(&c->n_misses);
    out->errors = atomic_load(&c->n_errors);
    out->reconnects = atomic_load(&c->n_reconnects);
    out->bytes_put = atomic_load(&c->n_bytes_put);
    out->bytes_got = atomic_load(&c->n_bytes_got);
    out->early_kept = atomic_load(&c->n_early_kept);
    out->early_wasted = atomic_load(&c->n_early_wasted);
}
