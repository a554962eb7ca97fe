/* The RPC protocol of the master (proto.h): decodes each request body in
 * full before acting on it, runs the operations, encodes the response. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "kvshelf/client.h"
#include "kvshelf/errors.h"
#include "master/master_int.h"

void kvs_mconn_init(kvs_master *m, kvs_mconn *c, int local, int peer_uid, kvs_wbuf *out)
{
    memset(c, 0, sizeof *c);
    c->local = local;
    c->peer_uid = peer_uid;
    if (kvs_random_bytes(c->nonce, sizeof c->nonce) != KVS_OK) {
        uint64_t t = kvs_now_ns();
        memcpy(c->nonce, &t, sizeof t);
    }
    size_t f = kvs_wbuf_begin_frame(out, KVS_MSG_CHALLENGE, 0, 0, 0);
    kvs_wbuf_u32(out, m->secret[0] ? 1u : 0u);
    kvs_wbuf_put(out, c->nonce, sizeof c->nonce);
    if (m->local_path[0] && !(peer_uid >= 0 && local)) { /* a TCP peer */
        uint8_t tag[KVS_AUTH_LEN];
        kvs_host_tag(c->nonce, tag);
        kvs_wbuf_put(out, tag, sizeof tag);
        kvs_wbuf_str(out, m->local_path);
    }
    kvs_wbuf_end_frame(out, f);
}

int kvs_master_set_local_path(kvs_master *m, const char *path)
{
    return kvs_strlcpy(m->local_path, path ? path : "", sizeof m->local_path);
}

static size_t begin(kvs_wbuf *out, const kvs_frame_hdr *h, int status)
{
    return kvs_wbuf_begin_frame(out, h->type, KVS_F_RESPONSE, status, h->req_id);
}

static void reply_status(kvs_wbuf *out, const kvs_frame_hdr *h, int status)
{
    kvs_wbuf_end_frame(out, begin(out, h, status));
}

/* Reads a batch count and checks it against KVS_MAX_BATCH and the bytes
 * left (each entry needs at least min_entry bytes). 0 on failure. */
static int read_count(kvs_rbuf *r, size_t min_entry, uint32_t *n)
{
    *n = kvs_rbuf_u32(r);
    if (r->err || *n > KVS_MAX_BATCH || (size_t)*n * min_entry > r->len - r->pos) {
        r->err = KVS_ERR_PROTO;
        return 0;
    }
    return 1;
}

/* 1 if a unix-socket peer of this uid may connect without the secret: the
 * master's own uid, root, or one named in opts.allow_uids. */
static int uid_allowed(const kvs_master *m, uint32_t uid)
{
    if (uid == (uint32_t)geteuid() || uid == 0) return 1;
    for (uint32_t i = 0; i < m->o.n_allow_uids && i < KVS_MASTER_MAX_ALLOW_UIDS; i++)
        if (m->o.allow_uids[i] == uid) return 1;
    return 0;
}

static int on_hello(kvs_master *m, kvs_mconn *c, const kvs_frame_hdr *h, kvs_rbuf *r,
                    kvs_wbuf *out)
{
    char hostname[256];
    uint8_t host_id[16], auth[32];
    uint32_t version = kvs_rbuf_u32(r), role = kvs_rbuf_u32(r);
    uint64_t pid = kvs_rbuf_u64(r);
    uint32_t uid = kvs_rbuf_u32(r);
    kvs_rbuf_str(r, hostname, sizeof hostname);
    kvs_rbuf_raw(r, host_id, sizeof host_id);
    kvs_rbuf_raw(r, auth, sizeof auth);
    if (kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    /* the uid in the body is the peer's claim: never trusted (see master.h) */
    int by_secret = m->secret[0] && kvs_auth_check(m->secret, c->nonce, auth);
    int by_uid = c->peer_uid >= 0 && (!m->secret[0] || m->o.secret_is_pool) &&
                 uid_allowed(m, (uint32_t)c->peer_uid);
    if (!by_secret && !by_uid) {
        m->cnt.auth_failures++;
        if (c->peer_uid >= 0)
            KVS_LOGW("HELLO from %s pid %llu (uid %d on a unix socket): refused (uid not "
                     "allowed, no secret)",
                     hostname, (unsigned long long)pid, c->peer_uid);
        else
            KVS_LOGW("HELLO from %s pid %llu: wrong or missing secret", hostname,
                     (unsigned long long)pid);
        reply_status(out, h, KVS_ERR_AUTH);
        return KVS_ERR_AUTH;
    }
    if (version != KVS_PROTO_VERSION) {
        KVS_LOGW("HELLO from %s: protocol version %u, want %u", hostname, version,
                 KVS_PROTO_VERSION);
        reply_status(out, h, KVS_ERR_UNSUPPORTED);
        return KVS_ERR_UNSUPPORTED;
    }
    uint64_t id = 0;
    if (c->peer_uid >= 0) uid = (uint32_t)c->peer_uid; /* the kernel's word, for reports */
    int rc = kvs_m_hello(m, hostname, host_id, pid, uid, role, &id);
    if (rc != KVS_OK) {
        reply_status(out, h, rc);
        return c->authed ? KVS_OK : rc; /* no client registered: close */
    }
    c->authed = 1;
    c->client_id = id;
    c->by_secret = by_secret;
    size_t f = begin(out, h, KVS_OK);
    kvs_wbuf_u64(out, id);
    kvs_wbuf_u32(out, m->o.client_ttl_ms);
    kvs_wbuf_u32(out, m->o.lease_ms);
    kvs_wbuf_end_frame(out, f);
    return KVS_OK;
}

static int on_heartbeat(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    uint64_t id = kvs_rbuf_u64(r);
    if (kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    int rc = kvs_m_heartbeat(m, id);
    size_t f = begin(out, h, rc);
    if (rc == KVS_OK) {
        kvs_m_fence_req want[64];
        size_t n = kvs_m_fences_wanted(m, id, want, 64);
        kvs_wbuf_u32(out, (uint32_t)n);
        for (size_t i = 0; i < n; i++) {
            kvs_wbuf_u32(out, want[i].segment_id);
            kvs_wbuf_u64(out, want[i].epoch);
        }
    }
    kvs_wbuf_end_frame(out, f);
    return KVS_OK;
}

static int on_fence(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    uint64_t id = kvs_rbuf_u64(r);
    uint32_t seg = kvs_rbuf_u32(r);
    uint64_t epoch = kvs_rbuf_u64(r);
    if (kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    reply_status(out, h, kvs_m_fence(m, id, seg, epoch));
    return KVS_OK;
}

static int on_mount(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    char shm[KVS_SEG_STR_MAX], taddr[KVS_SEG_STR_MAX];
    uint8_t host_id[16];
    uint64_t id = kvs_rbuf_u64(r), size = kvs_rbuf_u64(r);
    kvs_rbuf_str(r, shm, sizeof shm);
    kvs_rbuf_str(r, taddr, sizeof taddr);
    kvs_rbuf_raw(r, host_id, sizeof host_id);
    uint64_t epoch = kvs_rbuf_u64(r);
    uint32_t flags = r->err == KVS_OK && r->pos < r->len ? kvs_rbuf_u32(r) : 0; /* optional */
    uint64_t dir_reign = r->err == KVS_OK && r->pos < r->len ? kvs_rbuf_u64(r) : 0; /* optional */
    if (kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    uint32_t seg = 0;
    int rc = kvs_m_mount_flags(m, id, size, shm, taddr, host_id, epoch, flags, &seg);
    if (rc == KVS_OK) kvs_m_dir_reign(m, kvs_segs_find(&m->segs, seg), dir_reign);
    size_t f = begin(out, h, rc);
    if (rc == KVS_OK) {
        kvs_wbuf_u32(out, seg);
        kvs_wbuf_u64(out, m->reign);
    }
    kvs_wbuf_end_frame(out, f);
    return KVS_OK;
}

static int on_unmount(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    uint64_t id = kvs_rbuf_u64(r);
    uint32_t seg = kvs_rbuf_u32(r);
    if (kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    reply_status(out, h, kvs_m_unmount(m, id, seg));
    return KVS_OK;
}

/* DIR_LOAD: decodes the whole body first, then indexes each entry. */
static int on_dir_load(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    uint64_t id = kvs_rbuf_u64(r);
    uint32_t segid = kvs_rbuf_u32(r);
    uint8_t last = kvs_rbuf_u8(r);
    uint32_t n;
    if (!read_count(r, 4 + 8 + 8, &n)) return KVS_ERR_PROTO;
    size_t start = r->pos;
    for (uint32_t i = 0; i < n && !r->err; i++) { /* validate the layout */
        uint32_t kl;
        kvs_rbuf_bytes(r, KVS_KEY_MAX, &kl);
        kvs_rbuf_u64(r);
        kvs_rbuf_u64(r);
    }
    if (last > 1 || kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    kvs_seg *s = NULL;
    int rc = kvs_m_dir_load_check(m, id, segid, &s);
    if (rc != KVS_OK) {
        reply_status(out, h, rc);
        return KVS_OK;
    }
    r->pos = start;
    size_t f = begin(out, h, KVS_OK);
    kvs_wbuf_u32(out, n);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t kl;
        const uint8_t *key = kvs_rbuf_bytes(r, KVS_KEY_MAX, &kl);
        uint64_t off = kvs_rbuf_u64(r), size = kvs_rbuf_u64(r);
        kvs_wbuf_i32(out, kvs_m_dir_load_entry(m, s, key, kl, off, size));
    }
    if (last) kvs_m_dir_load_end(m, s);
    kvs_wbuf_end_frame(out, f);
    return KVS_OK;
}

/* DIR_SYNC: answers at once when changes wait, else parks the request
 * (master.h) for up to the wait it asks for. */
static int on_dir_sync(kvs_master *m, kvs_mconn *c, const kvs_frame_hdr *h, kvs_rbuf *r,
                       kvs_wbuf *out)
{
    uint64_t id = kvs_rbuf_u64(r);
    uint32_t segid = kvs_rbuf_u32(r);
    uint64_t ack = kvs_rbuf_u64(r);
    uint32_t wait_ms = kvs_rbuf_u32(r);
    if (kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    kvs_seg *s = NULL;
    int rc = kvs_m_dir_ack(m, id, segid, ack, &s);
    if (rc != KVS_OK) {
        reply_status(out, h, rc);
        return KVS_OK;
    }
    if (wait_ms && !(h->flags & KVS_F_NOREPLY) && !s->n_dir_q && !s->n_dir_sent) {
        kvs_m_dir_park(m, s, c, out, h->req_id, wait_ms);
        return KVS_OK;
    }
    size_t f = begin(out, h, KVS_OK);
    kvs_m_dir_batch(m, s, out);
    kvs_wbuf_end_frame(out, f);
    return KVS_OK;
}

typedef struct entry {
    const uint8_t *key;
    uint32_t key_len;
    uint8_t ok;
    uint64_t v; /* size, obj_id or lease id */
} entry;

/* Decodes n x { bytes key [, u64 v [, u8 ok]] } into a malloc'd array. */
static entry *read_keys(kvs_rbuf *r, uint32_t *n, int with_u64, int with_u8)
{
    size_t min = 4 + (with_u64 ? 8 : 0) + (with_u8 ? 1 : 0);
    if (!read_count(r, min, n)) return NULL;
    entry *e = malloc(((size_t)*n + 1) * sizeof *e);
    if (!e) {
        r->err = KVS_ERR_NOMEM;
        return NULL;
    }
    for (uint32_t i = 0; i < *n && !r->err; i++) {
        e[i].key = kvs_rbuf_bytes(r, KVS_KEY_MAX, &e[i].key_len);
        e[i].v = with_u64 ? kvs_rbuf_u64(r) : 0;
        e[i].ok = with_u8 ? kvs_rbuf_u8(r) : 1;
    }
    if (kvs_rbuf_finish(r) != KVS_OK) {
        free(e);
        return NULL;
    }
    return e;
}

static int nomem_or_proto(const kvs_rbuf *r) { return r->err == KVS_ERR_NOMEM ? KVS_ERR_NOMEM : KVS_ERR_PROTO; }

static int on_put_start(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    uint64_t id = kvs_rbuf_u64(r);
    uint32_t n;
    entry *e = read_keys(r, &n, 1, 0);
    if (!e) return nomem_or_proto(r);
    if (!kvs_clients_find(&m->clients, id)) {
        free(e);
        reply_status(out, h, KVS_ERR_NOT_FOUND);
        return KVS_OK;
    }
    size_t f = begin(out, h, KVS_OK);
    kvs_wbuf_u32(out, n);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t seg = 0;
        uint64_t off = 0, obj = 0, epoch = 0;
        int rc =
            kvs_m_put_start(m, id, e[i].key, e[i].key_len, e[i].v, &seg, &off, &obj, &epoch);
        kvs_wbuf_i32(out, rc);
        kvs_wbuf_u32(out, seg);
        kvs_wbuf_u64(out, off);
        kvs_wbuf_u64(out, obj);
        kvs_wbuf_u64(out, epoch);
    }
    kvs_wbuf_end_frame(out, f);
    free(e);
    return KVS_OK;
}

static int on_put_end(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    uint64_t id = kvs_rbuf_u64(r);
    uint32_t n;
    entry *e = read_keys(r, &n, 1, 1);
    if (!e) return nomem_or_proto(r);
    size_t f = begin(out, h, KVS_OK);
    kvs_wbuf_u32(out, n);
    for (uint32_t i = 0; i < n; i++)
        kvs_wbuf_i32(out, kvs_m_put_end(m, id, e[i].key, e[i].key_len, e[i].v, e[i].ok));
    kvs_wbuf_end_frame(out, f);
    free(e);
    return KVS_OK;
}

static int on_get(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    uint64_t id = kvs_rbuf_u64(r);
    uint32_t n;
    entry *e = read_keys(r, &n, 0, 0);
    if (!e) return nomem_or_proto(r);
    size_t f = begin(out, h, KVS_OK);
    kvs_wbuf_u32(out, n);
    for (uint32_t i = 0; i < n; i++) {
        kvs_m_loc loc;
        memset(&loc, 0, sizeof loc);
        int rc = kvs_m_get(m, id, e[i].key, e[i].key_len, &loc);
        kvs_wbuf_i32(out, rc);
        kvs_wbuf_u64(out, loc.size);
        kvs_wbuf_u32(out, loc.segment_id);
        kvs_wbuf_u64(out, loc.offset);
        kvs_wbuf_u64(out, loc.obj_id);
        kvs_wbuf_u64(out, loc.lease_id);
    }
    kvs_wbuf_end_frame(out, f);
    free(e);
    return KVS_OK;
}

static int on_release(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    (void)kvs_rbuf_u64(r); /* client id: leases are found by their own id */
    uint32_t n;
    if (!read_count(r, 8, &n)) return KVS_ERR_PROTO;
    if ((size_t)n * 8 != r->len - r->pos) return KVS_ERR_PROTO;
    for (uint32_t i = 0; i < n; i++) kvs_m_release(m, kvs_rbuf_u64(r));
    if (kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    reply_status(out, h, KVS_OK);
    return KVS_OK;
}

static int on_exists(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    uint32_t n;
    entry *e = read_keys(r, &n, 0, 0);
    if (!e) return nomem_or_proto(r);
    size_t f = begin(out, h, KVS_OK);
    kvs_wbuf_u32(out, n);
    uint8_t byte = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (kvs_m_exists(m, e[i].key, e[i].key_len)) byte |= (uint8_t)(1u << (i % 8));
        if (i % 8 == 7 || i + 1 == n) {
            kvs_wbuf_u8(out, byte);
            byte = 0;
        }
    }
    kvs_wbuf_end_frame(out, f);
    free(e);
    return KVS_OK;
}

/* REMOVE: a removed object that its segment's directory may list makes
 * the reply wait until the owner confirmed unlisting it (master.h). */
static int on_remove(kvs_master *m, kvs_mconn *c, const kvs_frame_hdr *h, kvs_rbuf *r,
                     kvs_wbuf *out)
{
    uint32_t n;
    entry *e = read_keys(r, &n, 0, 0);
    if (!e) return nomem_or_proto(r);
    int32_t *st = malloc(((size_t)n + 1) * sizeof *st);
    kvs_obj **held = calloc((size_t)n + 1, sizeof *held);
    int wait = 0;
    for (uint32_t i = 0; i < n; i++) {
        kvs_obj *o = NULL;
        int rc = kvs_m_remove_held(m, e[i].key, e[i].key_len, st && held ? &o : NULL);
        if (st) st[i] = rc;
        if (held) held[i] = o;
        wait |= o != NULL;
    }
    if (!st || !held) { /* no memory for the statuses: removed, but say so */
        free(st);
        free(held);
        free(e);
        reply_status(out, h, KVS_ERR_NOMEM);
        return KVS_OK;
    }
    if (!wait || (h->flags & KVS_F_NOREPLY) ||
        kvs_m_defer_remove(m, c, out, h->req_id, n, st, held) != KVS_OK) {
        size_t f = begin(out, h, KVS_OK);
        kvs_wbuf_u32(out, n);
        for (uint32_t i = 0; i < n; i++) kvs_wbuf_i32(out, st[i]);
        kvs_wbuf_end_frame(out, f);
    }
    free(st);
    free(held);
    free(e);
    return KVS_OK;
}

static int on_segments(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    if (kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    size_t f = begin(out, h, KVS_OK);
    kvs_wbuf_u32(out, (uint32_t)m->segs.n);
    for (size_t i = 0; i < m->segs.n; i++) {
        const kvs_seg *s = m->segs.v[i];
        kvs_wbuf_u32(out, s->id);
        kvs_wbuf_u64(out, s->size);
        kvs_wbuf_u64(out, kvs_seg_used(s));
        kvs_wbuf_str(out, s->shm_name);
        kvs_wbuf_str(out, s->transfer_addr);
        kvs_wbuf_put(out, s->host_id, 16);
        kvs_wbuf_u64(out, s->owner);
    }
    kvs_wbuf_end_frame(out, f);
    return KVS_OK;
}

static int on_stats(kvs_master *m, const kvs_frame_hdr *h, kvs_rbuf *r, kvs_wbuf *out)
{
    if (kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    char *json = kvs_master_stats_json(m);
    if (!json) {
        reply_status(out, h, KVS_ERR_NOMEM);
        return KVS_OK;
    }
    size_t f = begin(out, h, KVS_OK);
    kvs_wbuf_str(out, json);
    kvs_wbuf_end_frame(out, f);
    free(json);
    return KVS_OK;
}

static int on_shutdown(kvs_master *m, kvs_mconn *c, const kvs_frame_hdr *h, kvs_rbuf *r,
                       kvs_wbuf *out)
{
    if (kvs_rbuf_finish(r) != KVS_OK) return KVS_ERR_PROTO;
    /* the secret, or the kernel's word for a unix peer: never a uid from HELLO */
    int owner = c->peer_uid >= 0 &&
                ((uint32_t)c->peer_uid == (uint32_t)geteuid() || c->peer_uid == 0);
    if (!(c->by_secret || owner)) {
        m->cnt.auth_failures++;
        KVS_LOGW("SHUTDOWN refused (client %llu: no secret, not a unix peer of uid %u or root)",
                 (unsigned long long)c->client_id, (unsigned)geteuid());
        reply_status(out, h, KVS_ERR_AUTH);
        return KVS_OK;
    }
    KVS_LOGI("SHUTDOWN requested by client %llu", (unsigned long long)c->client_id);
    m->shutdown = 1;
    reply_status(out, h, KVS_OK);
    return KVS_OK;
}

static int handle_one(kvs_master *m, kvs_mconn *c, const kvs_frame_hdr *h, const uint8_t *body,
                      size_t len, kvs_wbuf *out)
{
    kvs_rbuf r;
    kvs_rbuf_init(&r, body, len);
    if (h->flags & KVS_F_RESPONSE) {
        m->cnt.bad_frames++;
        KVS_LOGW("response frame (%s) sent to the master: closing the connection",
                 kvs_msg_name(h->type));
        return KVS_ERR_PROTO;
    }
    if (!c->authed && h->type == KVS_MSG_PROBE) return KVS_OK; /* proto.h: ignored */
    if (!c->authed && h->type != KVS_MSG_HELLO) {
        m->cnt.auth_failures++;
        KVS_LOGW("%s before HELLO: refused", kvs_msg_name(h->type));
        reply_status(out, h, KVS_ERR_AUTH);
        return KVS_ERR_AUTH;
    }
    if (c->authed && c->client_id) {
        kvs_mclient *cl = kvs_clients_find(&m->clients, c->client_id);
        if (cl) cl->last_seen_ms = kvs_master_now(m);
    }
    int rc;
    switch (h->type) {
    case KVS_MSG_HELLO: rc = on_hello(m, c, h, &r, out); break;
    case KVS_MSG_HEARTBEAT: rc = on_heartbeat(m, h, &r, out); break;
    case KVS_MSG_MOUNT: rc = on_mount(m, h, &r, out); break;
    case KVS_MSG_UNMOUNT: rc = on_unmount(m, h, &r, out); break;
    case KVS_MSG_PUT_START: rc = on_put_start(m, h, &r, out); break;
    case KVS_MSG_PUT_END: rc = on_put_end(m, h, &r, out); break;
    case KVS_MSG_GET: rc = on_get(m, h, &r, out); break;
    case KVS_MSG_RELEASE: rc = on_release(m, h, &r, out); break;
    case KVS_MSG_EXISTS: rc = on_exists(m, h, &r, out); break;
    case KVS_MSG_REMOVE: rc = on_remove(m, c, h, &r, out); break;
    case KVS_MSG_SEGMENTS: rc = on_segments(m, h, &r, out); break;
    case KVS_MSG_STATS: rc = on_stats(m, h, &r, out); break;
    case KVS_MSG_SHUTDOWN: rc = on_shutdown(m, c, h, &r, out); break;
    case KVS_MSG_FENCE: rc = on_fence(m, h, &r, out); break;
    case KVS_MSG_DIR_LOAD: rc = on_dir_load(m, h, &r, out); break;
    case KVS_MSG_DIR_SYNC: rc = on_dir_sync(m, c, h, &r, out); break;
    default: rc = KVS_ERR_PROTO; break;
    }
    if (rc == KVS_ERR_PROTO) {
        m->cnt.bad_frames++;
        KVS_LOGW("malformed %s request (type %u, %u bytes): closing the connection",
                 kvs_msg_name(h->type), h->type, h->body_len);
    }
    if (rc == KVS_OK && out->err) rc = out->err;
    return rc;
}

int kvs_master_handle(kvs_master *m, kvs_mconn *c, const kvs_frame_hdr *h, const uint8_t *body,
                      size_t len, kvs_wbuf *out)
{
    size_t mark = out->len;
    int rc = handle_one(m, c, h, body, len, out);
    if ((h->flags & KVS_F_NOREPLY) && !out->err) out->len = mark; /* nobody waits for it */
    return rc;
}

size_t kvs_master_frame_need(const uint8_t *data, size_t len)
{
    if (len < KVS_FRAME_HDR) return KVS_FRAME_HDR;
    kvs_frame_hdr h;
    if (kvs_frame_hdr_decode(data, KVS_MAX_BODY, &h) != KVS_OK) return KVS_FRAME_HDR;
    return KVS_FRAME_HDR + (size_t)h.body_len;
}

int kvs_master_feed(kvs_master *m, kvs_mconn *c, const uint8_t *data, size_t len,
                    kvs_wbuf *out, size_t *consumed)
{
    size_t pos = 0;
    int rc = KVS_OK;
    while (len - pos >= KVS_FRAME_HDR) {
        kvs_frame_hdr h;
        if (kvs_frame_hdr_decode(data + pos, KVS_MAX_BODY, &h) != KVS_OK) {
            m->cnt.bad_frames++;
            KVS_LOGW("bad frame header (magic/type/flags/length): closing the connection");
            rc = KVS_ERR_PROTO;
            break;
        }
        if (!c->authed && h.body_len > KVS_PREAUTH_MAX_BODY) {
            m->cnt.bad_frames++;
            KVS_LOGW("%u-byte %s before HELLO: closing the connection", h.body_len,
                     kvs_msg_name(h.type));
            rc = KVS_ERR_PROTO;
            break;
        }
        if (len - pos - KVS_FRAME_HDR < h.body_len) break;
        rc = kvs_master_handle(m, c, &h, data + pos + KVS_FRAME_HDR, h.body_len, out);
        pos += KVS_FRAME_HDR + h.body_len;
        if (rc != KVS_OK) break;
    }
    *consumed = pos;
    return rc;
}
