/* Directory changes for segments whose owner keeps a directory of complete
 * objects (proto.h DIR_SYNC, ARCHITECTURE.md "Master restarts").
 *
 * A published object's entry is queued (ADD); an object leaving the index
 * whose entry the owner may have written has its removal queued (DEL) and
 * keeps its space until the owner confirmed the removal, so a directory
 * never lists a place the master has handed out again. An entry not yet
 * sent is simply cancelled. The owner fetches changes in numbered batches
 * and acknowledges each (in its next DIR_SYNC) after applying it; changes
 * of batches it did not acknowledge are sent again (applying one twice does
 * no harm). */
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "master/master_int.h"

#define BATCH_MAX_OPS 4096
/* A parked DIR_SYNC is answered at once for a removal (space waits on
 * it); listings are gathered for PARK_ADD_DELAY_MS (or until this many
 * wait), so a stream of puts costs the owner one round trip per few ms,
 * not one per put, and an object is listed a few ms after it completed. */
#define PARK_WAKE_OPS 1024
#define PARK_ADD_DELAY_MS 5
#define BATCH_MAX_BYTES (1u << 20)

enum { OP_ADD = 1, OP_DEL = 2 };

static void q_remove(kvs_seg *s, kvs_obj *o)
{
    if (!kvs_list_linked(&o->dir_link)) return;
    kvs_list_remove(&o->dir_link);
    if (o->dir == KVS_OD_ADD_Q || o->dir == KVS_OD_DEL_Q) s->n_dir_q--;
    else s->n_dir_sent--;
    if (o->dir == KVS_OD_DEL_Q) s->n_del_q--;
}

static void q_push(kvs_seg *s, kvs_obj *o, uint8_t state, uint64_t now)
{
    q_remove(s, o);
    if (s->n_dir_q == 0) s->dir_q_since_ms = now;
    o->dir = state;
    kvs_list_push_back(&s->dir_q, &o->dir_link);
    s->n_dir_q++;
    if (state == KVS_OD_DEL_Q) s->n_del_q++;
}

void kvs_m_dir_listed(kvs_master *m, kvs_obj *o)
{
    kvs_seg *s = o->seg;
    if (!s || !s->has_dir || o->dir != KVS_OD_NONE) return;
    q_push(s, o, KVS_OD_ADD_Q, kvs_master_now(m));
}

int kvs_m_dir_unlist(kvs_master *m, kvs_obj *o)
{
    kvs_seg *s = o->seg;
    if (!s || !s->has_dir) return 0;
    switch (o->dir) {
    case KVS_OD_ADD_Q: /* the owner never heard of it */
        q_remove(s, o);
        o->dir = KVS_OD_NONE;
        return 0;
    case KVS_OD_ADD_SENT:
    case KVS_OD_LISTED:
        q_push(s, o, KVS_OD_DEL_Q, kvs_master_now(m));
        s->unlist_bytes += kvs_alloc_round(o->size);
        return 1;
    case KVS_OD_DEL_Q:
    case KVS_OD_DEL_SENT: return 1;
    default: return 0;
    }
}

/* Settles o's place in a deferred REMOVE reply with status st. */
static void resolve(kvs_master *m, kvs_obj *o, int st)
{
    kvs_m_reply *p = o->waiter;
    if (!p) return;
    if (st != KVS_OK) p->status[o->waiter_idx] = st; /* else the status given at the call */
    p->objs[o->waiter_idx] = NULL;
    o->waiter = NULL;
    if (--p->waiting == 0) m->n_replies_ready++;
}

void kvs_m_dir_forget(kvs_master *m, kvs_obj *o)
{
    resolve(m, o, KVS_ERR_UNAVAILABLE); /* its owner never confirmed the removal */
    kvs_seg *s = o->seg;
    if (s) {
        q_remove(s, o);
        if (kvs_m_dir_holds(o)) s->unlist_bytes -= kvs_alloc_round(o->size);
    }
    o->dir = KVS_OD_NONE;
}

/* The owner applied batch `ack` (0: none). Only the changes last sent in
 * that batch are confirmed: a change last sent in an earlier batch whose
 * reply may have been lost is sent again, never taken as applied. */
static void apply_ack(kvs_master *m, kvs_seg *s, uint64_t ack)
{
    kvs_list *e = s->dir_sent.next;
    while (ack && e != &s->dir_sent) {
        kvs_obj *o = KVS_CONTAINER_OF(e, kvs_obj, dir_link);
        e = e->next;
        if (o->dir_seq != ack) continue;
        q_remove(s, o);
        if (o->dir == KVS_OD_ADD_SENT) {
            o->dir = KVS_OD_LISTED;
            m->cnt.dir_listed++;
        } else { /* DEL_SENT: the place is unlisted, its space may go */
            s->unlist_bytes -= kvs_alloc_round(o->size);
            o->dir = KVS_OD_NONE;
            m->cnt.dir_unlisted++;
            resolve(m, o, KVS_OK);
            kvs_m_obj_unlink(m, o); /* the key is free for a new version now */
            if (o->leases == 0) kvs_m_obj_destroy(m, o);
        }
    }
}

static void put_op(kvs_wbuf *w, const kvs_obj *o)
{
    int add = o->dir == KVS_OD_ADD_Q || o->dir == KVS_OD_ADD_SENT;
    kvs_wbuf_u8(w, add ? OP_ADD : OP_DEL);
    kvs_wbuf_u64(w, o->offset);
    kvs_wbuf_u64(w, o->size);
    kvs_wbuf_u64(w, o->obj_id);
    kvs_wbuf_bytes(w, add ? o->key : NULL, add ? o->key_len : 0);
}

int kvs_m_dir_ack(kvs_master *m, uint64_t client_id, uint32_t segment_id, uint64_t ack_seq,
                  kvs_seg **out)
{
    kvs_seg *s = kvs_segs_find(&m->segs, segment_id);
    if (!s) return KVS_ERR_NOT_FOUND;
    if (s->owner != client_id || !s->has_dir || ack_seq > s->dir_seq) return KVS_ERR_INVALID;
    apply_ack(m, s, ack_seq);
    *out = s;
    return KVS_OK;
}

void kvs_m_dir_batch(kvs_master *m, kvs_seg *s, kvs_wbuf *body)
{
    (void)m;
    uint64_t pending = s->n_dir_sent + s->n_dir_q;
    if (pending == 0) {
        kvs_wbuf_u64(body, 0);
        kvs_wbuf_u8(body, 0);
        kvs_wbuf_u32(body, 0);
        return;
    }
    uint64_t seq = ++s->dir_seq;
    kvs_wbuf_u64(body, seq);
    size_t more_at = body->len;
    kvs_wbuf_u8(body, 0);
    size_t n_at = body->len;
    kvs_wbuf_u32(body, 0);
    size_t start = body->len;
    uint32_t n = 0;
    /* first what was sent and not acknowledged (the reply may have been
     * lost): again, under the new number, in the same order */
    kvs_list resend;
    kvs_list_init(&resend);
    while (!kvs_list_empty(&s->dir_sent) && n < BATCH_MAX_OPS &&
           body->len - start < BATCH_MAX_BYTES) {
        kvs_obj *o = KVS_CONTAINER_OF(s->dir_sent.next, kvs_obj, dir_link);
        kvs_list_remove(&o->dir_link);
        kvs_list_push_back(&resend, &o->dir_link);
        o->dir_seq = seq;
        put_op(body, o);
        n++;
    }
    while (!kvs_list_empty(&s->dir_q) && n < BATCH_MAX_OPS &&
           body->len - start < BATCH_MAX_BYTES) {
        kvs_obj *o = KVS_CONTAINER_OF(s->dir_q.next, kvs_obj, dir_link);
        q_remove(s, o);
        o->dir = o->dir == KVS_OD_ADD_Q ? KVS_OD_ADD_SENT : KVS_OD_DEL_SENT;
        o->dir_seq = seq;
        put_op(body, o);
        kvs_list_push_back(&resend, &o->dir_link);
        s->n_dir_sent++;
        n++;
    }
    /* the batch goes behind whatever older batches are still listed as
     * sent (none: they were all re-sent above unless the batch was full) */
    while (!kvs_list_empty(&resend)) {
        kvs_list *e = resend.next;
        kvs_list_remove(e);
        kvs_list_push_back(&s->dir_sent, e);
    }
    /* ask again at once: more changes wait, or removals whose space is
     * held until this batch is acknowledged */
    int more = !kvs_list_empty(&s->dir_q) || s->n_dir_sent > n || s->unlist_bytes > 0;
    if (!body->err) {
        body->data[more_at] = (uint8_t)more;
        for (int i = 0; i < 4; i++) body->data[n_at + (size_t)i] = (uint8_t)(n >> (8 * i));
    }
}

int kvs_m_dir_sync(kvs_master *m, uint64_t client_id, uint32_t segment_id, uint64_t ack_seq,
                   kvs_wbuf *body)
{
    kvs_seg *s = NULL;
    int rc = kvs_m_dir_ack(m, client_id, segment_id, ack_seq, &s);
    if (rc == KVS_OK) kvs_m_dir_batch(m, s, body);
    return rc;
}

/* ---- parked DIR_SYNC requests and deferred REMOVE replies (master.h) ---- */

static int write_replies(kvs_master *m);

/* Appends the answer of s's parked request and forgets it. */
static void answer_parked(kvs_master *m, kvs_seg *s)
{
    size_t f = kvs_wbuf_begin_frame(s->park_out, KVS_MSG_DIR_SYNC, KVS_F_RESPONSE, KVS_OK,
                                    s->park_req);
    kvs_m_dir_batch(m, s, s->park_out);
    kvs_wbuf_end_frame(s->park_out, f);
    kvs_m_dir_unpark(m, s);
}

void kvs_m_dir_unpark(kvs_master *m, kvs_seg *s)
{
    if (!s->park_conn) return;
    if (s->park_conn->parked_seg == s->id) s->park_conn->parked_seg = 0;
    s->park_conn = NULL;
    s->park_out = NULL;
    m->n_parked--;
}

void kvs_m_dir_park(kvs_master *m, kvs_seg *s, kvs_mconn *c, kvs_wbuf *out, uint64_t req_id,
                    uint32_t wait_ms)
{
    if (s->park_conn) answer_parked(m, s); /* its owner gave up on it, or asks twice */
    if (c->parked_seg) { /* one parked request per connection */
        kvs_seg *o = kvs_segs_find(&m->segs, c->parked_seg);
        if (o && o->park_conn == c) answer_parked(m, o);
    }
    s->park_conn = c;
    s->park_out = out;
    s->park_req = req_id;
    s->park_until_ms = kvs_master_now(m) + KVS_MIN(wait_ms, KVS_DIR_PARK_MAX_MS);
    c->parked_seg = s->id;
    m->n_parked++;
}

/* When s's parked request is due (master time). */
static uint64_t park_due(const kvs_seg *s)
{
    if (s->n_del_q || s->n_dir_sent || s->n_dir_q >= PARK_WAKE_OPS) return 0; /* now */
    uint64_t due = s->park_until_ms;
    if (s->n_dir_q) due = KVS_MIN(due, s->dir_q_since_ms + PARK_ADD_DELAY_MS);
    return due;
}

int kvs_master_flush_parked(kvs_master *m)
{
    int n = write_replies(m);
    if (!m->n_parked) return n;
    uint64_t now = kvs_master_now(m);
    for (size_t i = 0; i < m->segs.n; i++) {
        kvs_seg *s = m->segs.v[i];
        if (s->park_conn && now >= park_due(s)) {
            answer_parked(m, s);
            n++;
        }
    }
    return n;
}

uint64_t kvs_master_park_wait_ms(kvs_master *m)
{
    if (m->n_replies_ready) return 0;
    if (!m->n_parked) return UINT64_MAX;
    uint64_t now = kvs_master_now(m), wait = UINT64_MAX;
    for (size_t i = 0; i < m->segs.n; i++) {
        const kvs_seg *s = m->segs.v[i];
        if (!s->park_conn) continue;
        uint64_t due = park_due(s);
        wait = KVS_MIN(wait, due > now ? due - now : 0);
    }
    return wait;
}

static void reply_free(kvs_master *m, kvs_m_reply *p)
{
    for (uint32_t i = 0; i < p->n; i++)
        if (p->objs[i]) p->objs[i]->waiter = NULL;
    if (p->waiting == 0) m->n_replies_ready--;
    if (p->conn) p->conn->deferred--;
    kvs_list_remove(&p->link);
    free(p->status);
    free(p->objs);
    free(p);
}

int kvs_m_defer_remove(kvs_master *m, kvs_mconn *c, kvs_wbuf *out, uint64_t req_id,
                       uint32_t n, const int32_t *st, kvs_obj *const *held)
{
    kvs_m_reply *p = calloc(1, sizeof *p);
    if (p) {
        p->status = malloc(((size_t)n + 1) * sizeof *p->status);
        p->objs = calloc((size_t)n + 1, sizeof *p->objs);
    }
    if (!p || !p->status || !p->objs) {
        if (p) {
            free(p->status);
            free(p->objs);
        }
        free(p);
        return KVS_ERR_NOMEM;
    }
    p->conn = c;
    p->out = out;
    p->req_id = req_id;
    p->n = n;
    for (uint32_t i = 0; i < n; i++) {
        p->status[i] = st[i];
        kvs_obj *o = held[i];
        if (!o || o->waiter) continue;
        p->objs[i] = o;
        o->waiter = p;
        o->waiter_idx = i;
        p->waiting++;
    }
    kvs_list_push_back(&m->replies, &p->link);
    c->deferred++;
    if (p->waiting == 0) m->n_replies_ready++;
    return KVS_OK;
}

/* Appends the complete deferred replies; returns how many. */
static int write_replies(kvs_master *m)
{
    int n = 0;
    kvs_list *e = m->replies.next;
    while (m->n_replies_ready && e != &m->replies) {
        kvs_m_reply *p = KVS_CONTAINER_OF(e, kvs_m_reply, link);
        e = e->next;
        if (p->waiting) continue;
        size_t f = kvs_wbuf_begin_frame(p->out, KVS_MSG_REMOVE, KVS_F_RESPONSE, KVS_OK,
                                        p->req_id);
        kvs_wbuf_u32(p->out, p->n);
        for (uint32_t i = 0; i < p->n; i++) kvs_wbuf_i32(p->out, p->status[i]);
        kvs_wbuf_end_frame(p->out, f);
        reply_free(m, p);
        n++;
    }
    return n;
}

void kvs_m_replies_free(kvs_master *m)
{
    while (!kvs_list_empty(&m->replies)) {
        kvs_m_reply *p = KVS_CONTAINER_OF(m->replies.next, kvs_m_reply, link);
        p->conn = NULL; /* the connection may be gone already */
        reply_free(m, p);
    }
}

void kvs_master_conn_closed(kvs_master *m, kvs_mconn *c)
{
    if (c->parked_seg) {
        kvs_seg *s = kvs_segs_find(&m->segs, c->parked_seg);
        if (s && s->park_conn == c) kvs_m_dir_unpark(m, s);
        c->parked_seg = 0;
    }
    kvs_list *e = m->replies.next;
    while (c->deferred && e != &m->replies) {
        kvs_m_reply *p = KVS_CONTAINER_OF(e, kvs_m_reply, link);
        e = e->next;
        if (p->conn == c) reply_free(m, p);
    }
}
