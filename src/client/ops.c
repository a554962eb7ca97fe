/* The data API of the client: put/get (single, batch, registered memory),
 * exists, remove, zero-copy slots, registered memory, stats. Each batch is
 * one master round trip to locate/allocate, then the bytes move (memcpy into
 * mapped same-host segments, pipelined transfers for the rest), then one
 * message to publish (PUT_END) or release leases (RELEASE, not waited for). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client/client_internal.h"
#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"

/* ---- slot handles ----
 * handle[0] = segment_id | lease deadline (ms since client start, 32 bits) << 32
 *             (reserved slots: write epoch << 32 instead)
 * handle[1] = offset (48 bits) | connection generation (16 bits) << 48
 * handle[2] = obj_id (reserved slots) or lease_id (acquired slots) */
#define OFF_BITS 48
#define OFF_MASK ((1ull << OFF_BITS) - 1)

static void slot_encode(kvs_slot *s, uint32_t seg, uint64_t off, uint32_t gen, uint32_t deadline,
                        uint64_t id)
{
    s->handle[0] = (uint64_t)seg | ((uint64_t)deadline << 32);
    s->handle[1] = (off & OFF_MASK) | ((uint64_t)(gen & 0xffff) << OFF_BITS);
    s->handle[2] = id;
}
static uint32_t slot_seg(const kvs_slot *s) { return (uint32_t)s->handle[0]; }
static uint32_t slot_deadline(const kvs_slot *s) { return (uint32_t)(s->handle[0] >> 32); }
static uint64_t slot_off(const kvs_slot *s) { return s->handle[1] & OFF_MASK; }
static uint32_t slot_gen16(const kvs_slot *s) { return (uint32_t)(s->handle[1] >> OFF_BITS); }

/* Lease deadline (client-relative ms, wrapping) for a GET sent at `sent_ms`:
 * the lease minus a safety margin of 1/10 (at least 20 ms). */
static uint32_t lease_deadline(kvs_client *c, uint64_t sent_ms, uint32_t lease_ms)
{
    uint32_t margin = KVS_MAX(lease_ms / 10, 20u);
    if (margin > lease_ms / 2) margin = lease_ms / 2;
    return (uint32_t)(sent_ms - c->t0_ms + lease_ms - margin);
}
static int deadline_passed(kvs_client *c, uint32_t deadline)
{
    uint32_t now = (uint32_t)(kvs_now_ms() - c->t0_ms);
    return (int32_t)(deadline - now) <= 0;
}

static int key_ok(const void *key, uint32_t len) { return key && len >= 1 && len <= KVS_KEY_MAX; }

static int count_err(kvs_client *c, int st)
{
    if (st && st != KVS_ERR_NOT_FOUND && st != KVS_ERR_EXISTS) atomic_fetch_add(&c->n_errors, 1);
    return st;
}

/* ---- registered memory ---- */

int kvs_register_memory(kvs_client *c, void *addr, uint64_t len)
{
    if (!c || !addr || !len || (uintptr_t)addr + len < (uintptr_t)addr) return KVS_ERR_INVALID;
    uintptr_t s = (uintptr_t)addr, e = s + (uintptr_t)len;
    int rc = KVS_OK;
    pthread_mutex_lock(&c->reg_mu);
    size_t i = 0;
    while (i < c->nregs && c->regs[i].start < s) i++;
    if ((i > 0 && c->regs[i - 1].end > s) || (i < c->nregs && c->regs[i].start < e)) {
        rc = KVS_ERR_INVALID;
    } else if (c->nregs == c->capregs) {
        size_t cap = c->capregs ? c->capregs * 2 : 8;
        kvs_region *r = realloc(c->regs, cap * sizeof *r);
        if (!r) rc = KVS_ERR_NOMEM;
        else {
            c->regs = r;
            c->capregs = cap;
        }
    }
    if (rc == KVS_OK) {
        memmove(&c->regs[i + 1], &c->regs[i], (c->nregs - i) * sizeof *c->regs);
        c->regs[i].start = s;
        c->regs[i].end = e;
        c->nregs++;
    }
    pthread_mutex_unlock(&c->reg_mu);
    return rc;
}

int kvs_unregister_memory(kvs_client *c, void *addr)
{
    if (!c || !addr) return KVS_ERR_INVALID;
    int rc = KVS_ERR_NOT_FOUND;
    pthread_mutex_lock(&c->reg_mu);
    for (size_t i = 0; i < c->nregs; i++) {
        if (c->regs[i].start != (uintptr_t)addr) continue;
        memmove(&c->regs[i], &c->regs[i + 1], (c->nregs - i - 1) * sizeof *c->regs);
        c->nregs--;
        rc = KVS_OK;
        break;
    }
    pthread_mutex_unlock(&c->reg_mu);
    return rc;
}

/* 1 if [p, p+len) lies inside one registered region. Caller holds reg_mu. */
static int registered_locked(kvs_client *c, const void *p, uint64_t len)
{
    uintptr_t s = (uintptr_t)p;
    size_t lo = 0, hi = c->nregs;
    while (lo < hi) { /* last region with start <= s */
        size_t mid = (lo + hi) / 2;
        if (c->regs[mid].start <= s) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return 0;
    const kvs_region *r = &c->regs[lo - 1];
    return s >= r->start && s <= r->end && len <= r->end - s; /* no unsigned wrap past end */
}

/* ---- moving bytes ---- */

/* Per-item location for a batch transfer. */
typedef struct loc {
    size_t item;
    uint32_t seg;
    uint64_t off;
    uint64_t len;
    uint64_t epoch; /* writes: the reservation's epoch */
} loc;

/* Moves bytes for `nl` located items: memcpy where the segment is mapped
 * here, one pipelined transfer batch for the rest. Sets st[item] (only on
 * failure). Writes are fenced (segment.h): a same-host write whose
 * reservation went stale writes nothing (KVS_ERR_UNAVAILABLE). When a
 * remote write failed, its bytes may still be on their way, and
 * inflight[item] (if not NULL) is set to 1. */
static void move_bytes(kvs_client *c, uint32_t gen, const loc *ls, size_t nl, void *const *bufs,
                       int write, int *st, uint8_t *inflight)
{
    kvs_xfer_op *ops = NULL;
    size_t *opitem = NULL, nops = 0;
    kvs_seginfo *infos = NULL;
    for (size_t i = 0; i < nl; i++) {
        const loc *l = &ls[i];
        kvs_seginfo si;
        if (kvs_seg_find(c, gen, l->seg, &si)) {
            st[l->item] = KVS_ERR_UNAVAILABLE;
            continue;
        }
        if (l->off > si.size || l->len > si.size - l->off) {
            st[l->item] = KVS_ERR_CORRUPT;
            continue;
        }
        if (!l->len) continue;
        if (si.base && write) {
            int wrc = kvs_segment_write_begin(si.seg, l->epoch);
            if (wrc != KVS_OK) {
                st[l->item] = wrc == KVS_ERR_UNAVAILABLE ? wrc : KVS_ERR_IO;
                continue;
            }
            memcpy(si.base + l->off, bufs[l->item], l->len);
            kvs_segment_write_end(si.seg, l->epoch);
            continue;
        }
        if (si.base) {
            memcpy(bufs[l->item], si.base + l->off, l->len);
            continue;
        }
        if (!si.transfer_addr[0]) {
            st[l->item] = KVS_ERR_UNAVAILABLE;
            continue;
        }
        if (!ops) {
            ops = calloc(nl, sizeof *ops);
            opitem = calloc(nl, sizeof *opitem);
            infos = calloc(nl, sizeof *infos);
            if (!ops || !opitem || !infos) {
                st[l->item] = KVS_ERR_NOMEM;
                free(ops);
                free(opitem);
                free(infos);
                ops = NULL;
                continue;
            }
        }
        infos[nops] = si; /* the op points at its transfer_addr */
        ops[nops] = (kvs_xfer_op){infos[nops].transfer_addr, l->seg, l->off, bufs[l->item],
                                  l->len, write, 0, write ? l->epoch : 0};
        opitem[nops++] = l->item;
    }
    if (nops) {
        kvs_xfer_run(c->xc, ops, nops);
        for (size_t k = 0; k < nops; k++) {
            if (!ops[k].status) continue;
            st[opitem[k]] = ops[k].status;
            if (write && inflight) inflight[opitem[k]] = 1;
        }
    }
    free(ops);
    free(opitem);
    free(infos);
}

/* A batch is sent in chunks of at most KVS_MAX_BATCH items and about
 * CHUNK_BYTES of values, so that each chunk's leases (GET) and reservations
 * (PUT_START) comfortably outlive its transfers even over slow links. */
#define CHUNK_BYTES (512ull << 20)

static size_t chunk_end(const kvs_item *items, size_t start, size_t n)
{
    uint64_t bytes = 0;
    size_t i = start;
    while (i < n && i - start < KVS_MAX_BATCH) {
        if (i > start && bytes + items[i].len > CHUNK_BYTES) break;
        bytes += items[i].len;
        i++;
    }
    return i;
}

/* ---- put ---- */

static void put_chunk(kvs_client *c, kvs_item *items, size_t n)
{
    size_t *idx = malloc(n * sizeof *idx);
    int *st = calloc(n, sizeof *st);
    loc *ls = malloc(n * sizeof *ls);
    void **bufs = malloc(n * sizeof *bufs);
    uint64_t *objs = calloc(n, sizeof *objs);
    uint8_t *inflight = calloc(n, 1);
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    kvs_conn_ref cr = {0};
    uint8_t *resp = NULL;
    uint32_t rlen;
    size_t k = 0;
    if (!idx || !st || !ls || !bufs || !objs || !inflight) {
        for (size_t i = 0; i < n; i++)
            if (items[i].status == KVS_OK) items[i].status = KVS_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        bufs[i] = items[i].buf;
        if (items[i].status == KVS_OK) idx[k++] = i;
    }
    if (!k) goto out;
    int rc = kvs_conn_get(c, &cr);
    if (rc == KVS_OK) {
        kvs_wbuf_u64(&w, cr.client_id);
        kvs_wbuf_u32(&w, (uint32_t)k);
        for (size_t j = 0; j < k; j++) {
            kvs_item *it = &items[idx[j]];
            kvs_wbuf_bytes(&w, it->key.data, it->key.len);
            kvs_wbuf_u64(&w, it->len);
        }
        rc = kvs_conn_call(c, &cr, KVS_MSG_PUT_START, &w, 1, &resp, &rlen);
    }
    if (rc) {
        for (size_t j = 0; j < k; j++) items[idx[j]].status = rc;
        goto out;
    }
    kvs_rbuf r;
    kvs_rbuf_init(&r, resp, rlen);
    if (kvs_rbuf_u32(&r) != k) r.err = KVS_ERR_PROTO;
    size_t nl = 0;
    for (size_t j = 0; j < k && !r.err; j++) {
        size_t i = idx[j];
        int s = kvs_rbuf_i32(&r);
        uint32_t seg = kvs_rbuf_u32(&r);
        uint64_t off = kvs_rbuf_u64(&r);
        objs[i] = kvs_rbuf_u64(&r);
        uint64_t epoch = kvs_rbuf_u64(&r);
        st[i] = s > 0 ? KVS_ERR_PROTO : s;
        if (s == KVS_OK) ls[nl++] = (loc){i, seg, off, items[i].len, epoch};
    }
    if (kvs_rbuf_finish(&r)) {
        /* cannot tell what was allocated: the master revokes unended puts */
        for (size_t j = 0; j < k; j++) items[idx[j]].status = KVS_ERR_PROTO;
        goto out;
    }
    move_bytes(c, cr.gen, ls, nl, bufs, 1, st, inflight);

    /* PUT_END for every allocated item: publish what arrived; give up the
     * rest, saying whether a write of it may still be on its way */
    kvs_wbuf_reset(&w);
    kvs_wbuf_u64(&w, cr.client_id);
    kvs_wbuf_u32(&w, (uint32_t)nl);
    for (size_t j = 0; j < nl; j++) {
        size_t i = ls[j].item;
        kvs_wbuf_bytes(&w, items[i].key.data, items[i].key.len);
        kvs_wbuf_u64(&w, objs[i]);
        kvs_wbuf_u8(&w, st[i] == KVS_OK ? KVS_PUT_PUBLISH
                        : inflight[i]   ? KVS_PUT_ABANDON
                                        : KVS_PUT_ABANDON_CLEAN);
    }
    free(resp);
    resp = NULL;
    for (size_t j = 0; j < k; j++) items[idx[j]].status = st[idx[j]];
    if (!nl) goto out;
    rc = kvs_conn_call(c, &cr, KVS_MSG_PUT_END, &w, 1, &resp, &rlen);
    if (rc) {
        for (size_t j = 0; j < nl; j++)
            if (items[ls[j].item].status == KVS_OK) items[ls[j].item].status = rc;
        goto out;
    }
    kvs_rbuf_init(&r, resp, rlen);
    if (kvs_rbuf_u32(&r) != nl) r.err = KVS_ERR_PROTO;
    for (size_t j = 0; j < nl && !r.err; j++) {
        int s = kvs_rbuf_i32(&r);
        kvs_item *it = &items[ls[j].item];
        if (it->status == KVS_OK) it->status = s > 0 ? KVS_ERR_PROTO : s;
    }
    if (kvs_rbuf_finish(&r))
        for (size_t j = 0; j < nl; j++)
            if (items[ls[j].item].status == KVS_OK) items[ls[j].item].status = KVS_ERR_PROTO;
    /* a later get of these keys from this process can copy early */
    for (size_t j = 0; j < nl && c->lc; j++) {
        const kvs_item *it = &items[ls[j].item];
        if (it->status != KVS_OK) continue;
        kvs_loc_ent e = {kvs_loccache_hash(it->key.data, it->key.len), objs[ls[j].item],
                         ls[j].off, ls[j].len, ls[j].seg, cr.gen};
        kvs_loccache_put(c->lc, &e);
    }
out:
    for (size_t j = 0; j < k; j++) {
        kvs_item *it = &items[idx[j]];
        if (it->status == KVS_OK) {
            atomic_fetch_add(&c->n_puts, 1);
            atomic_fetch_add(&c->n_bytes_put, it->len);
        } else {
            count_err(c, it->status);
        }
    }
    free(resp);
    kvs_wbuf_free(&w);
    kvs_conn_put(&cr);
    free(idx);
    free(st);
    free(ls);
    free(bufs);
    free(objs);
    free(inflight);
}

/* ---- get ---- */

static void post_release(kvs_client *c, kvs_conn_ref *cr, const uint64_t *leases, size_t n)
{
    if (!n) return;
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    kvs_wbuf_u64(&w, cr->client_id);
    kvs_wbuf_u32(&w, (uint32_t)n);
    for (size_t i = 0; i < n; i++) kvs_wbuf_u64(&w, leases[i]);
    if (!w.err) kvs_rpc_post(cr->rpc, KVS_MSG_RELEASE, w.data, w.len);
    kvs_wbuf_free(&w);
}

/* Reads of one get chunk started before the master's answer (copy_early). */
typedef struct early_io {
    kvs_xfer_op *ops;   /* remote reads, in flight until kvs_xfer_wait */
    size_t *item;       /* ops[j] reads into items[item[j]] */
    kvs_seginfo *infos; /* ops[j].peer points into infos[j] */
    size_t n;
    kvs_xfer_batch *batch;
} early_io;

/* For each item whose location this client has seen before, starts moving
 * the bytes from there into the item's buffer while the GET is on its way:
 * memcpy where the segment is mapped here, else a T_READ to the segment's
 * transfer server (sent now, waited for by early_finish). Records in
 * early[i] where they came from (khash 0: nothing started). The bytes count
 * only if the answer names the same object at the same place (see
 * loccache.h); a remote read that failed counts as not done. */
static void copy_early(kvs_client *c, uint32_t gen, const kvs_item *items, const size_t *idx,
                       size_t k, const uint64_t *kh, kvs_loc_ent *early, early_io *eio)
{
    kvs_seginfo si;
    int have = 0;
    for (size_t j = 0; j < k; j++) {
        size_t i = idx[j];
        kvs_loc_ent e;
        if (!kvs_loccache_get(c->lc, kh[i], &e) || e.gen != gen || !e.size ||
            e.size > items[i].len)
            continue;
        if (!have || si.id != e.seg) have = kvs_seg_peek(c, gen, e.seg, &si);
        if (!have || e.off > si.size || e.size > si.size - e.off) continue;
        if (si.base) {
            memcpy(items[i].buf, si.base + e.off, e.size);
            early[i] = e;
            continue;
        }
        if (!si.transfer_addr[0]) continue;
        if (!eio->ops) {
            eio->ops = calloc(k, sizeof *eio->ops);
            eio->item = calloc(k, sizeof *eio->item);
            eio->infos = calloc(k, sizeof *eio->infos);
            if (!eio->ops || !eio->item || !eio->infos) return; /* freed by early_finish */
        }
        eio->infos[eio->n] = si;
        eio->ops[eio->n] = (kvs_xfer_op){eio->infos[eio->n].transfer_addr, e.seg, e.off,
                                         items[i].buf, e.size, 0, 0};
        eio->item[eio->n++] = i;
        early[i] = e;
    }
    if (eio->n && kvs_xfer_submit(c->xc, eio->ops, eio->n, &eio->batch))
        for (size_t j = 0; j < eio->n; j++) early[eio->item[j]].khash = 0;
}

/* Waits for the remote early reads (the buffers are written until then) and
 * forgets those that failed. Safe to call when none were started. */
static void early_finish(early_io *eio, kvs_loc_ent *early)
{
    if (eio->batch) {
        kvs_xfer_wait(eio->batch);
        for (size_t j = 0; j < eio->n; j++)
            if (eio->ops[j].status != KVS_OK) early[eio->item[j]].khash = 0;
    }
    free(eio->ops);
    free(eio->item);
    free(eio->infos);
    memset(eio, 0, sizeof *eio);
}

static void get_chunk(kvs_client *c, kvs_item *items, size_t n)
{
    size_t *idx = malloc(n * sizeof *idx);
    int *st = calloc(n, sizeof *st);
    loc *ls = malloc(n * sizeof *ls);
    void **bufs = malloc(n * sizeof *bufs);
    uint64_t *leases = malloc(n * sizeof *leases);
    uint64_t *kh = c->lc ? malloc(n * sizeof *kh) : NULL;
    kvs_loc_ent *early = c->lc ? calloc(n, sizeof *early) : NULL;
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    kvs_conn_ref cr = {0};
    uint8_t *resp = NULL;
    uint32_t rlen;
    size_t k = 0, nleases = 0;
    if (!idx || !st || !ls || !bufs || !leases || (c->lc && (!kh || !early))) {
        for (size_t i = 0; i < n; i++)
            if (items[i].status == KVS_OK) items[i].status = KVS_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        bufs[i] = items[i].buf;
        if (items[i].status != KVS_OK) continue;
        idx[k++] = i;
        if (kh) kh[i] = kvs_loccache_hash(items[i].key.data, items[i].key.len);
    }
    if (!k) goto out;
    int rc = kvs_conn_get(c, &cr);
    uint64_t sent = kvs_now_ms();
    if (rc == KVS_OK) {
        kvs_wbuf_u64(&w, cr.client_id);
        kvs_wbuf_u32(&w, (uint32_t)k);
        for (size_t j = 0; j < k; j++)
            kvs_wbuf_bytes(&w, items[idx[j]].key.data, items[idx[j]].key.len);
        rc = w.err;
    }
    if (rc == KVS_OK) {
        kvs_rpc_req q;
        early_io eio = {0};
        if (kvs_conn_start(&cr, &q, KVS_MSG_GET, &w) == KVS_OK && early)
            copy_early(c, cr.gen, items, idx, k, kh, early, &eio);
        rc = kvs_conn_finish(c, &cr, &q, 1, &resp, &rlen);
        early_finish(&eio, early);
    }
    if (rc) {
        for (size_t j = 0; j < k; j++) items[idx[j]].status = rc;
        goto out;
    }
    kvs_rbuf r;
    kvs_rbuf_init(&r, resp, rlen);
    if (kvs_rbuf_u32(&r) != k) r.err = KVS_ERR_PROTO;
    size_t nl = 0;
    uint64_t kept = 0, wasted = 0;
    for (size_t j = 0; j < k && !r.err; j++) {
        size_t i = idx[j];
        int s = kvs_rbuf_i32(&r);
        uint64_t size = kvs_rbuf_u64(&r);
        uint32_t seg = kvs_rbuf_u32(&r);
        uint64_t off = kvs_rbuf_u64(&r);
        uint64_t obj = kvs_rbuf_u64(&r);
        uint64_t lease = kvs_rbuf_u64(&r);
        if (r.err) break;
        st[i] = s > 0 ? KVS_ERR_PROTO : s;
        int was_early = early && early[i].khash;
        if (s != KVS_OK) {
            if (kh && s == KVS_ERR_NOT_FOUND) kvs_loccache_drop(c->lc, kh[i]);
            wasted += was_early;
            continue;
        }
        leases[nleases++] = lease;
        items[i].size = size;
        if (kh) kvs_loccache_put(c->lc, &(kvs_loc_ent){kh[i], obj, off, size, seg, cr.gen});
        if (size > items[i].len) {
            st[i] = KVS_ERR_TOO_LARGE;
        } else if (was_early && early[i].obj_id == obj && early[i].seg == seg &&
                   early[i].off == off && early[i].size == size) {
            kept++; /* the bytes copied early are this object's */
        } else {
            wasted += was_early;
            ls[nl++] = (loc){i, seg, off, size};
        }
    }
    if (kvs_rbuf_finish(&r)) {
        for (size_t j = 0; j < k; j++) items[idx[j]].status = KVS_ERR_PROTO;
        goto out; /* leases (if any) time out at the master */
    }
    if (kept) atomic_fetch_add(&c->n_early_kept, kept);
    if (wasted) atomic_fetch_add(&c->n_early_wasted, wasted);
    move_bytes(c, cr.gen, ls, nl, bufs, 0, st, NULL);
    /* A copy that finished after the lease ran out may have raced with a
     * reuse of the space: report it as a failure, never as data. */
    uint32_t dl = lease_deadline(c, sent, cr.lease_ms);
    if (nleases && deadline_passed(c, dl))
        for (size_t j = 0; j < k; j++)
            if (st[idx[j]] == KVS_OK) st[idx[j]] = KVS_ERR_TIMEOUT;
    post_release(c, &cr, leases, nleases);
    for (size_t j = 0; j < k; j++) items[idx[j]].status = st[idx[j]];
out:
    for (size_t j = 0; j < k; j++) {
        kvs_item *it = &items[idx[j]];
        atomic_fetch_add(&c->n_gets, 1);
        if (it->status == KVS_OK) {
            atomic_fetch_add(&c->n_hits, 1);
            atomic_fetch_add(&c->n_bytes_got, it->size);
        } else if (it->status == KVS_ERR_NOT_FOUND) {
            atomic_fetch_add(&c->n_misses, 1);
        } else {
            count_err(c, it->status);
        }
    }
    free(resp);
    kvs_wbuf_free(&w);
    kvs_conn_put(&cr);
    free(idx);
    free(st);
    free(ls);
    free(bufs);
    free(leases);
    free(kh);
    free(early);
}

/* Checks every item (key, buffer, and with need_reg that the buffer lies in
 * registered memory), then moves the batch chunk by chunk: puts with
 * put_chunk, gets with get_chunk. Returns the number of items with KVS_OK
 * or, when the client cannot be used, its error. */
static int run_batch(kvs_client *c, kvs_item *items, size_t n, int need_reg, int put)
{
    if (!c || (!items && n)) return KVS_ERR_INVALID;
    int rc = kvs_enter(c);
    if (rc) return rc;
    if (need_reg) pthread_mutex_lock(&c->reg_mu);
    for (size_t i = 0; i < n; i++) {
        kvs_item *it = &items[i];
        it->status = KVS_OK;
        it->size = put ? it->len : 0;
        if (!key_ok(it->key.data, it->key.len) || (!it->buf && it->len))
            it->status = KVS_ERR_INVALID;
        else if (need_reg && !registered_locked(c, it->buf, it->len))
            it->status = KVS_ERR_NOT_REGISTERED;
    }
    if (need_reg) pthread_mutex_unlock(&c->reg_mu);
    for (size_t s = 0, e; s < n; s = e) {
        e = chunk_end(items, s, n);
        (put ? put_chunk : get_chunk)(c, items + s, e - s);
    }
    int ok = 0;
    for (size_t i = 0; i < n; i++) ok += items[i].status == KVS_OK;
    kvs_leave(c);
    return ok;
}

/* Backoff of the BUSY retries below: waits between tries, doubling up to
 * max_us, for at most the client's timeout_ms from the start. */
typedef struct busy_backoff {
    uint64_t deadline_ms;
    unsigned delay_us, max_us;
} busy_backoff;

static busy_backoff busy_backoff_start(const kvs_client *c, unsigned first_us, unsigned max_us)
{
    uint64_t t = (uint64_t)(c->timeout_ms > 0 ? c->timeout_ms : 1000);
    return (busy_backoff){kvs_now_ms() + t, first_us, max_us};
}

/* Sleeps before the next try; 0 (no sleep) once the time is up. */
static int busy_backoff_wait(busy_backoff *b)
{
    if (kvs_now_ms() >= b->deadline_ms) return 0;
    struct timespec ts = {0, (long)b->delay_us * 1000};
    nanosleep(&ts, NULL);
    b->delay_us = b->delay_us * 2 < b->max_us ? b->delay_us * 2 : b->max_us;
    return 1;
}

/* Puts again, for at most the client's timeout_ms, the items the master
 * answered KVS_ERR_BUSY: a moment, not a failure (an earlier version of the
 * key, or the space eviction freed, waits for its segment's owner to unlist
 * it from the segment's directory: master/dirsync.c). */
static void retry_busy(kvs_client *c, kvs_item *items, size_t n)
{
    busy_backoff b = busy_backoff_start(c, 500, 32000);
    kvs_item *again = NULL;
    size_t *at = NULL;
    for (;;) {
        size_t nb = 0;
        for (size_t i = 0; i < n; i++) nb += items[i].status == KVS_ERR_BUSY;
        if (!nb) break;
        if (!again) {
            again = malloc(n * sizeof *again);
            at = malloc(n * sizeof *at);
            if (!again || !at) break;
        }
        if (!busy_backoff_wait(&b)) break;
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if (items[i].status == KVS_ERR_BUSY) {
                again[k] = items[i];
                again[k].status = KVS_OK;
                at[k++] = i;
            }
        for (size_t s = 0, e; s < k; s = e) {
            e = chunk_end(again, s, k);
            put_chunk(c, again + s, e - s);
        }
        for (size_t j = 0; j < k; j++) items[at[j]].status = again[j].status;
    }
    free(again);
    free(at);
}

static int put_batch(kvs_client *c, kvs_item *items, size_t n, int need_reg)
{
    int rc = run_batch(c, items, n, need_reg, 1);
    if (rc < 0 || (size_t)rc == n) return rc;
    retry_busy(c, items, n);
    int ok = 0;
    for (size_t i = 0; i < n; i++) ok += items[i].status == KVS_OK;
    return ok;
}

static int get_batch(kvs_client *c, kvs_item *items, size_t n, int need_reg)
{
    return run_batch(c, items, n, need_reg, 0);
}

int kvs_put_batch(kvs_client *c, kvs_item *items, size_t n) { return put_batch(c, items, n, 0); }
int kvs_get_batch(kvs_client *c, kvs_item *items, size_t n) { return get_batch(c, items, n, 0); }

static int put1(kvs_client *c, const void *key, uint32_t key_len, const void *value,
                uint64_t len, int need_reg)
{
    kvs_item it = {{key, key_len}, (void *)value, len, 0, 0};
    int rc = put_batch(c, &it, 1, need_reg);
    return rc < 0 ? rc : it.status;
}

static int get1(kvs_client *c, const void *key, uint32_t key_len, void *buf, uint64_t cap,
                uint64_t *size, int need_reg)
{
    kvs_item it = {{key, key_len}, buf, cap, 0, 0};
    int rc = get_batch(c, &it, 1, need_reg);
    if (rc < 0) return rc;
    if (size) *size = it.size;
    return it.status;
}

int kvs_put(kvs_client *c, const void *key, uint32_t key_len, const void *value, uint64_t len)
{
    return put1(c, key, key_len, value, len, 0);
}

int kvs_get(kvs_client *c, const void *key, uint32_t key_len, void *buf, uint64_t cap,
            uint64_t *size)
{
    return get1(c, key, key_len, buf, cap, size, 0);
}

int kvs_put_from(kvs_client *c, const void *key, uint32_t key_len, const void *value,
                 uint64_t len)
{
    return put1(c, key, key_len, value, len, 1);
}

int kvs_get_into(kvs_client *c, const void *key, uint32_t key_len, void *buf, uint64_t cap,
                 uint64_t *size)
{
    return get1(c, key, key_len, buf, cap, size, 1);
}

/* ---- exists / remove ---- */

static int keys_call(kvs_client *c, uint16_t type, const kvs_key *keys, size_t n, uint8_t **resp,
                     uint32_t *rlen)
{
    for (size_t i = 0; i < n; i++)
        if (!key_ok(keys[i].data, keys[i].len)) return KVS_ERR_INVALID;
    kvs_conn_ref cr;
    int rc = kvs_conn_get(c, &cr);
    if (rc) return rc;
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    kvs_wbuf_u32(&w, (uint32_t)n);
    for (size_t i = 0; i < n; i++) kvs_wbuf_bytes(&w, keys[i].data, keys[i].len);
    rc = kvs_conn_call(c, &cr, type, &w, 0, resp, rlen);
    kvs_wbuf_free(&w);
    kvs_conn_put(&cr);
    return rc;
}

int kvs_exists_batch(kvs_client *c, const kvs_key *keys, size_t n, uint8_t *out)
{
    if (!c || (n && (!keys || !out))) return KVS_ERR_INVALID;
    int rc = kvs_enter(c);
    if (rc) return rc;
    for (size_t s = 0; s < n && rc == KVS_OK; s += KVS_MAX_BATCH) {
        size_t m = KVS_MIN(n - s, (size_t)KVS_MAX_BATCH);
        uint8_t *resp;
        uint32_t rlen;
        rc = keys_call(c, KVS_MSG_EXISTS, keys + s, m, &resp, &rlen);
        if (rc) break;
        kvs_rbuf r;
        kvs_rbuf_init(&r, resp, rlen);
        if (kvs_rbuf_u32(&r) != m) r.err = KVS_ERR_PROTO;
        size_t nb = (m + 7) / 8;
        const uint8_t *bits = NULL;
        if (!r.err && rlen - r.pos >= nb) {
            bits = resp + r.pos;
            r.pos += nb;
        } else {
            r.err = KVS_ERR_PROTO;
        }
        rc = kvs_rbuf_finish(&r);
        if (rc == KVS_OK)
            for (size_t i = 0; i < m; i++) out[s + i] = (bits[i / 8] >> (i % 8)) & 1;
        free(resp);
    }
    if (rc) count_err(c, rc);
    kvs_leave(c);
    return rc;
}

int kvs_exists(kvs_client *c, const void *key, uint32_t key_len)
{
    kvs_key k = {key, key_len};
    uint8_t o = 0;
    int rc = kvs_exists_batch(c, &k, 1, &o);
    return rc < 0 ? rc : o;
}

int kvs_remove_batch(kvs_client *c, const kvs_key *keys, size_t n, int *results)
{
    if (!c || (n && !keys)) return KVS_ERR_INVALID;
    int rc = kvs_enter(c);
    if (rc) return rc;
    int removed = 0;
    for (size_t s = 0; s < n && rc == KVS_OK; s += KVS_MAX_BATCH) {
        size_t m = KVS_MIN(n - s, (size_t)KVS_MAX_BATCH);
        uint8_t *resp;
        uint32_t rlen;
        rc = keys_call(c, KVS_MSG_REMOVE, keys + s, m, &resp, &rlen);
        if (rc) break;
        kvs_rbuf r;
        kvs_rbuf_init(&r, resp, rlen);
        if (kvs_rbuf_u32(&r) != m) r.err = KVS_ERR_PROTO;
        for (size_t i = 0; i < m && !r.err; i++) {
            int st = kvs_rbuf_i32(&r);
            if (r.err) break;
            if (st > 0) st = KVS_ERR_PROTO;
            if (results) results[s + i] = st;
            removed += st == KVS_OK;
        }
        rc = kvs_rbuf_finish(&r);
        free(resp);
    }
    if (rc) count_err(c, rc);
    kvs_leave(c);
    return rc ? rc : removed;
}

int kvs_remove(kvs_client *c, const void *key, uint32_t key_len)
{
    kvs_key k = {key, key_len};
    int res = KVS_ERR_INTERNAL;
    int rc = kvs_remove_batch(c, &k, 1, &res);
    return rc < 0 ? rc : res;
}

/* ---- zero-copy slots ---- */

/* Ends the write fence a mapped reserved slot holds from reserve_chunk
 * until its commit (the segment found by the slot's address, whatever
 * happened to the master connection meanwhile). */
static void release_slot_fence(kvs_client *c, const kvs_slot *s)
{
    uint64_t epoch;
    /* only a reservation still outstanding (resv.h): never twice */
    if (!s->ptr || s->status != KVS_OK || !kvs_resv_take(c->resv, s->handle[2], s->ptr, &epoch))
        return;
    kvs_segment *seg = kvs_shm_cache_find_addr(c->shm, s->ptr);
    if (seg) kvs_segment_write_end(seg, epoch);
}

static void release_slot_fences(kvs_client *c, const kvs_slot *slots, size_t n)
{
    for (size_t i = 0; i < n; i++) release_slot_fence(c, &slots[i]);
}

/* A remote (unmapped) reserved slot: a kvs_slot_write into it failed (its
 * bytes may be partly missing, partly still on their way). Marked in place
 * in its reservation entry (no allocation: the mark cannot be lost). */
static void mark_slot_write_failed(kvs_client *c, const kvs_slot *s)
{
    if (!s->ptr) (void)kvs_resv_mark_failed(c->resv, s->handle[2], NULL);
}

/* For commit_chunk: 0 a remote slot that may be published, 1 one whose
 * write failed, -1 one this client does not hold (never reserved here, or
 * committed already): never published either. Mapped slots: 0. */
static int remote_slot_state(kvs_client *c, const kvs_slot *s)
{
    int failed = 0;
    if (s->ptr || s->status != KVS_OK) return 0;
    if (!kvs_resv_get(c->resv, s->handle[2], NULL, &failed)) return -1;
    return failed;
}

/* Takes remote slots' entries out once their PUT_END was sent (or their
 * reservation died with its connection). */
static void drop_remote_entries(kvs_client *c, const kvs_slot *slots, size_t n)
{
    uint64_t unused;
    for (size_t i = 0; i < n; i++)
        if (!slots[i].ptr && slots[i].status == KVS_OK)
            (void)kvs_resv_take(c->resv, slots[i].handle[2], NULL, &unused);
}

/* A reservation reserve_chunk could not hand out. */
typedef struct abandoned {
    const void *key;
    uint32_t key_len;
    uint64_t obj;
} abandoned;

/* PUT_END ok=2 (nothing written: free the space now) for reservations a
 * reserve could not hand out. */
static void abandon_clean(kvs_client *c, kvs_conn_ref *cr, const abandoned *ab, size_t n)
{
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    kvs_wbuf_u64(&w, cr->client_id);
    kvs_wbuf_u32(&w, (uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        kvs_wbuf_bytes(&w, ab[i].key, ab[i].key_len);
        kvs_wbuf_u64(&w, ab[i].obj);
        kvs_wbuf_u8(&w, KVS_PUT_ABANDON_CLEAN);
    }
    uint8_t *resp = NULL;
    uint32_t rlen;
    if (!w.err) kvs_conn_call(c, cr, KVS_MSG_PUT_END, &w, 1, &resp, &rlen);
    free(resp);
    kvs_wbuf_free(&w);
}

static int reserve_chunk(kvs_client *c, const kvs_key *keys, const uint64_t *sizes, size_t n,
                         kvs_slot *slots)
{
    int rc = kvs_enter(c);
    if (rc) return rc;
    size_t *idx = malloc((n ? n : 1) * sizeof *idx), k = 0, nab = 0;
    abandoned *abandon = malloc((n ? n : 1) * sizeof *abandon);
    kvs_conn_ref cr = {0};
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    uint8_t *resp = NULL;
    uint32_t rlen;
    int reserved = 0;
    if (!idx || !abandon) {
        rc = KVS_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        memset(&slots[i], 0, sizeof slots[i]);
        slots[i].size = sizes[i];
        slots[i].status = key_ok(keys[i].data, keys[i].len) ? KVS_OK : KVS_ERR_INVALID;
        if (slots[i].status == KVS_OK) idx[k++] = i;
    }
    if (!k) goto out;
    rc = kvs_conn_get(c, &cr);
    if (rc) goto out;
    kvs_wbuf_u64(&w, cr.client_id);
    kvs_wbuf_u32(&w, (uint32_t)k);
    for (size_t j = 0; j < k; j++) {
        kvs_wbuf_bytes(&w, keys[idx[j]].data, keys[idx[j]].len);
        kvs_wbuf_u64(&w, sizes[idx[j]]);
    }
    rc = kvs_conn_call(c, &cr, KVS_MSG_PUT_START, &w, 1, &resp, &rlen);
    if (rc) goto out;
    kvs_rbuf r;
    kvs_rbuf_init(&r, resp, rlen);
    if (kvs_rbuf_u32(&r) != k) r.err = KVS_ERR_PROTO;
    for (size_t j = 0; j < k && !r.err; j++) {
        kvs_slot *s = &slots[idx[j]];
        int st = kvs_rbuf_i32(&r);
        uint32_t seg = kvs_rbuf_u32(&r);
        uint64_t off = kvs_rbuf_u64(&r);
        uint64_t obj = kvs_rbuf_u64(&r);
        uint64_t epoch = kvs_rbuf_u64(&r);
        if (r.err) break;
        s->status = st > 0 ? KVS_ERR_PROTO : st;
        if (st != KVS_OK) continue;
        if (off > OFF_MASK || epoch == 0 || epoch > UINT32_MAX) {
            s->status = KVS_ERR_CORRUPT;
            abandon[nab++] = (abandoned){keys[idx[j]].data, keys[idx[j]].len, obj};
            continue;
        }
        slot_encode(s, seg, off, cr.gen, (uint32_t)epoch, obj);
        kvs_seginfo si;
        if (kvs_seg_find(c, cr.gen, seg, &si) == KVS_OK && si.base && off <= si.size &&
            s->size <= si.size - off) {
            /* the caller writes the mapped slot until commit: hold the
             * segment's write fence for the whole time (segment.h) */
            int wrc = kvs_segment_write_begin(si.seg, epoch);
            if (wrc == KVS_OK && kvs_resv_add(c->resv, obj, si.base + off, epoch) != KVS_OK) {
                kvs_segment_write_end(si.seg, epoch);
                wrc = KVS_ERR_NOMEM;
            }
            if (wrc != KVS_OK) {
                s->status = wrc == KVS_ERR_NOMEM ? wrc : KVS_ERR_UNAVAILABLE;
                abandon[nab++] = (abandoned){keys[idx[j]].data, keys[idx[j]].len, obj};
                continue;
            }
            s->ptr = si.base + off;
        } else if (kvs_resv_add(c->resv, obj, NULL, 0) != KVS_OK) {
            /* a remote slot is recorded too (its failed writes are marked
             * there): without room for that, it is not handed out */
            s->status = KVS_ERR_NOMEM;
            abandon[nab++] = (abandoned){keys[idx[j]].data, keys[idx[j]].len, obj};
            continue;
        }
        reserved++;
    }
    rc = kvs_rbuf_finish(&r);
    if (rc) {
        release_slot_fences(c, slots, n);
        reserved = 0;
    }
    if (!rc && nab) abandon_clean(c, &cr, abandon, nab);
out:
    if (rc) {
        for (size_t j = 0; j < k; j++) slots[idx[j]].status = rc;
        count_err(c, rc);
    }
    free(resp);
    free(idx);
    free(abandon);
    kvs_wbuf_free(&w);
    kvs_conn_put(&cr);
    kvs_leave(c);
    return rc ? rc : reserved;
}

static int commit_chunk(kvs_client *c, const kvs_key *keys, const kvs_slot *slots,
                        const uint8_t *ok, size_t n, int *results)
{
    int rc = kvs_enter(c);
    if (rc) return rc;
    size_t *idx = malloc((n ? n : 1) * sizeof *idx), k = 0;
    kvs_conn_ref cr = {0};
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    uint8_t *resp = NULL;
    uint32_t rlen;
    int published = 0;
    /* the caller's writes into mapped slots are done: end their fences
     * (each once, whatever happens next) */
    release_slot_fences(c, slots, n);
    /* remote slots with a failed kvs_slot_write, or not held here: never
     * published (their entries stay until a PUT_END is sent: a commit that
     * fails before that can be retried and still knows) */
    signed char *failed = calloc(n ? n : 1, 1);
    for (size_t i = 0; failed && i < n; i++)
        failed[i] = (signed char)remote_slot_state(c, &slots[i]);
    int sent = 0;
    if (!idx || !failed) {
        rc = KVS_ERR_NOMEM;
        goto out;
    }
    rc = kvs_conn_get(c, &cr);
    for (size_t i = 0; i < n; i++) {
        int st = slots[i].status;
        if (st == KVS_OK && failed[i] < 0) st = KVS_ERR_INVALID;
        if (st == KVS_OK && !key_ok(keys[i].data, keys[i].len)) st = KVS_ERR_INVALID;
        /* a reservation of an earlier connection died with it */
        if (st == KVS_OK && (rc || slot_gen16(&slots[i]) != (cr.gen & 0xffff)))
            st = KVS_ERR_CONN;
        if (results) results[i] = st;
        if (st == KVS_OK) idx[k++] = i;
    }
    rc = KVS_OK;
    if (!k) goto out;
    kvs_wbuf_u64(&w, cr.client_id);
    kvs_wbuf_u32(&w, (uint32_t)k);
    for (size_t j = 0; j < k; j++) {
        size_t i = idx[j];
        kvs_wbuf_bytes(&w, keys[i].data, keys[i].len);
        kvs_wbuf_u64(&w, slots[i].handle[2]);
        uint8_t v = KVS_PUT_PUBLISH;
        if (failed[i] > 0) /* part of it may be missing, part still on its way */
            v = KVS_PUT_ABANDON;
        else if (ok && !ok[i]) /* a remote slot's writes may still be on their way */
            v = slots[i].ptr ? KVS_PUT_ABANDON_CLEAN : KVS_PUT_ABANDON;
        kvs_wbuf_u8(&w, v);
    }
    rc = w.err ? KVS_ERR_NOMEM : kvs_conn_call(c, &cr, KVS_MSG_PUT_END, &w, 1, &resp, &rlen);
    sent = rc != KVS_ERR_NOMEM; /* (a request never built was never sent) */
    if (rc) goto out;
    kvs_rbuf r;
    kvs_rbuf_init(&r, resp, rlen);
    if (kvs_rbuf_u32(&r) != k) r.err = KVS_ERR_PROTO;
    for (size_t j = 0; j < k && !r.err; j++) {
        int st = kvs_rbuf_i32(&r);
        if (r.err) break;
        if (st > 0) st = KVS_ERR_PROTO;
        size_t i = idx[j];
        if (st == KVS_OK && failed[i] > 0 && (!ok || ok[i])) st = KVS_ERR_UNAVAILABLE;
        if (results) results[i] = st;
        if (st == KVS_OK && (!ok || ok[i])) {
            published++;
            atomic_fetch_add(&c->n_puts, 1);
            atomic_fetch_add(&c->n_bytes_put, slots[i].size);
        }
    }
    rc = kvs_rbuf_finish(&r);
out:
    if (rc) {
        if (results)
            for (size_t j = 0; j < k; j++) results[idx[j]] = rc;
        count_err(c, rc);
    }
    /* entries of remote slots go once a PUT_END went out for them, or
     * when nothing will ever be sent (no connection: the reservations died
     * with it); a commit that failed before sending keeps them for a retry */
    if (sent || (rc != KVS_ERR_NOMEM && k == 0)) drop_remote_entries(c, slots, n);
    free(resp);
    free(idx);
    free(failed);
    kvs_wbuf_free(&w);
    kvs_conn_put(&cr);
    kvs_leave(c);
    return rc ? rc : published;
}

static int acquire_chunk(kvs_client *c, const kvs_key *keys, size_t n, kvs_slot *slots)
{
    int rc = kvs_enter(c);
    if (rc) return rc;
    size_t *idx = malloc((n ? n : 1) * sizeof *idx), k = 0;
    kvs_conn_ref cr = {0};
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    uint8_t *resp = NULL;
    uint32_t rlen;
    int found = 0;
    if (!idx) {
        rc = KVS_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        memset(&slots[i], 0, sizeof slots[i]);
        slots[i].status = key_ok(keys[i].data, keys[i].len) ? KVS_OK : KVS_ERR_INVALID;
        if (slots[i].status == KVS_OK) idx[k++] = i;
    }
    if (!k) goto out;
    rc = kvs_conn_get(c, &cr);
    if (rc) goto out;
    kvs_wbuf_u64(&w, cr.client_id);
    kvs_wbuf_u32(&w, (uint32_t)k);
    for (size_t j = 0; j < k; j++) kvs_wbuf_bytes(&w, keys[idx[j]].data, keys[idx[j]].len);
    uint64_t sent = kvs_now_ms();
    rc = kvs_conn_call(c, &cr, KVS_MSG_GET, &w, 1, &resp, &rlen);
    if (rc) goto out;
    uint32_t dl = lease_deadline(c, sent, cr.lease_ms);
    kvs_rbuf r;
    kvs_rbuf_init(&r, resp, rlen);
    if (kvs_rbuf_u32(&r) != k) r.err = KVS_ERR_PROTO;
    for (size_t j = 0; j < k && !r.err; j++) {
        kvs_slot *s = &slots[idx[j]];
        int st = kvs_rbuf_i32(&r);
        uint64_t size = kvs_rbuf_u64(&r);
        uint32_t seg = kvs_rbuf_u32(&r);
        uint64_t off = kvs_rbuf_u64(&r);
        (void)kvs_rbuf_u64(&r);
        uint64_t lease = kvs_rbuf_u64(&r);
        if (r.err) break;
        s->status = st > 0 ? KVS_ERR_PROTO : st;
        atomic_fetch_add(&c->n_gets, 1);
        if (st != KVS_OK) {
            if (st == KVS_ERR_NOT_FOUND) atomic_fetch_add(&c->n_misses, 1);
            else count_err(c, st);
            continue;
        }
        s->size = size;
        slot_encode(s, seg, off, cr.gen, dl, lease);
        if (off > OFF_MASK) {
            s->status = KVS_ERR_CORRUPT;
            continue;
        }
        kvs_seginfo si;
        if (kvs_seg_find(c, cr.gen, seg, &si) == KVS_OK && si.base && off <= si.size &&
            size <= si.size - off)
            s->ptr = si.base + off;
        atomic_fetch_add(&c->n_hits, 1);
        atomic_fetch_add(&c->n_bytes_got, size);
        found++;
    }
    rc = kvs_rbuf_finish(&r);
out:
    if (rc) {
        for (size_t j = 0; j < k; j++) slots[idx[j]].status = rc;
        count_err(c, rc);
    }
    free(resp);
    free(idx);
    kvs_wbuf_free(&w);
    kvs_conn_put(&cr);
    kvs_leave(c);
    return rc ? rc : found;
}

/* Batches larger than one message are sent in chunks; a chunk that fails
 * as a whole gives its error to its slots, and the call returns the count
 * of the others. */
static int reserve_all(kvs_client *c, const kvs_key *keys, const uint64_t *sizes, size_t n,
                       kvs_slot *slots)
{
    if (n <= KVS_MAX_BATCH) return reserve_chunk(c, keys, sizes, n, slots);
    int total = 0, rc = 0;
    for (size_t s = 0; s < n; s += KVS_MAX_BATCH) {
        size_t m = KVS_MIN(n - s, (size_t)KVS_MAX_BATCH);
        int r = reserve_chunk(c, keys + s, sizes + s, m, slots + s);
        if (r < 0) {
            rc = r;
            for (size_t i = 0; i < m; i++) slots[s + i].status = r;
        } else {
            total += r;
        }
    }
    return total || !rc ? total : rc;
}

/* Reserves again, within the client's timeout, the slots the master
 * answered KVS_ERR_BUSY (as retry_busy does for puts: the space that
 * eviction freed, or an earlier version of the key, waits for its segment's
 * owner to unlist it; a connector dump into a full pool meets this every
 * few ms). Returns how many more slots were reserved. */
static int reserve_retry_busy(kvs_client *c, const kvs_key *keys, const uint64_t *sizes,
                              size_t n, kvs_slot *slots)
{
    busy_backoff b = busy_backoff_start(c, 250, 16000);
    kvs_key *rk = NULL;
    uint64_t *rs = NULL;
    kvs_slot *again = NULL;
    size_t *at = NULL;
    int more = 0;
    for (;;) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++) k += slots[i].status == KVS_ERR_BUSY;
        if (!k) break;
        if (!rk) {
            rk = malloc(n * sizeof *rk);
            rs = malloc(n * sizeof *rs);
            again = malloc(n * sizeof *again);
            at = malloc(n * sizeof *at);
            if (!rk || !rs || !again || !at) break;
        }
        if (!busy_backoff_wait(&b)) break;
        k = 0;
        for (size_t i = 0; i < n; i++)
            if (slots[i].status == KVS_ERR_BUSY) {
                rk[k] = keys[i];
                rs[k] = sizes[i];
                at[k++] = i;
            }
        int r = reserve_all(c, rk, rs, k, again);
        if (r < 0) break; /* the BUSY slots keep their status */
        more += r;
        for (size_t j = 0; j < k; j++) slots[at[j]] = again[j];
    }
    free(rk);
    free(rs);
    free(again);
    free(at);
    return more;
}

int kvs_reserve_batch(kvs_client *c, const kvs_key *keys, const uint64_t *sizes, size_t n,
                      kvs_slot *slots)
{
    if (!c || (n && (!keys || !sizes || !slots))) return KVS_ERR_INVALID;
    int rc = reserve_all(c, keys, sizes, n, slots);
    if (rc < 0 || (size_t)rc == n) return rc;
    return rc + reserve_retry_busy(c, keys, sizes, n, slots);
}

int kvs_commit_batch(kvs_client *c, const kvs_key *keys, const kvs_slot *slots,
                     const uint8_t *ok, size_t n, int *results)
{
    if (!c || (n && (!keys || !slots))) return KVS_ERR_INVALID;
    if (n <= KVS_MAX_BATCH) return commit_chunk(c, keys, slots, ok, n, results);
    int total = 0, rc = 0;
    for (size_t s = 0; s < n; s += KVS_MAX_BATCH) {
        size_t m = KVS_MIN(n - s, (size_t)KVS_MAX_BATCH);
        int r = commit_chunk(c, keys + s, slots + s, ok ? ok + s : NULL, m,
                             results ? results + s : NULL);
        if (r < 0) rc = r;
        else total += r;
    }
    return total || !rc ? total : rc;
}

int kvs_acquire_batch(kvs_client *c, const kvs_key *keys, size_t n, kvs_slot *slots)
{
    if (!c || (n && (!keys || !slots))) return KVS_ERR_INVALID;
    if (n <= KVS_MAX_BATCH) return acquire_chunk(c, keys, n, slots);
    int total = 0, rc = 0;
    for (size_t s = 0; s < n; s += KVS_MAX_BATCH) {
        size_t m = KVS_MIN(n - s, (size_t)KVS_MAX_BATCH);
        int r = acquire_chunk(c, keys + s, m, slots + s);
        if (r < 0) {
            rc = r;
            for (size_t i = 0; i < m; i++) slots[s + i].status = r;
        } else {
            total += r;
        }
    }
    return total || !rc ? total : rc;
}

int kvs_release_batch(kvs_client *c, const kvs_slot *slots, size_t n)
{
    if (!c || (n && !slots)) return KVS_ERR_INVALID;
    int rc = kvs_enter(c);
    if (rc) return rc;
    kvs_conn_ref cr;
    rc = kvs_conn_get(c, &cr);
    if (rc == KVS_OK) {
        uint64_t *leases = malloc((n ? n : 1) * sizeof *leases);
        size_t k = 0;
        if (!leases) rc = KVS_ERR_NOMEM;
        for (size_t i = 0; leases && i < n; i++)
            if (slots[i].status == KVS_OK && slot_gen16(&slots[i]) == (cr.gen & 0xffff))
                leases[k++] = slots[i].handle[2];
        for (size_t s = 0; leases && s < k; s += KVS_MAX_BATCH)
            post_release(c, &cr, leases + s, KVS_MIN(k - s, (size_t)KVS_MAX_BATCH));
        free(leases);
        kvs_conn_put(&cr);
    }
    kvs_leave(c);
    /* leases of a lost connection are gone with it */
    return rc == KVS_ERR_CONN ? KVS_OK : rc;
}

static int slot_io(kvs_client *c, const kvs_slot *slot, uint64_t offset, void *buf, uint64_t len,
                   int write)
{
    if (!c || !slot || (!buf && len)) return KVS_ERR_INVALID;
    if (slot->status != KVS_OK) return KVS_ERR_INVALID;
    if (offset > slot->size || len > slot->size - offset) return KVS_ERR_INVALID;
    int rc = kvs_enter(c);
    if (rc) return rc;
    uint32_t gen = kvs_client_gen(c);
    if (slot_gen16(slot) != (gen & 0xffff)) {
        rc = KVS_ERR_UNAVAILABLE; /* the master connection was lost since */
    } else if (!len) {
        rc = KVS_OK;
    } else if (slot->ptr) {
        int unused;
        if (write && !kvs_resv_get(c->resv, slot->handle[2], slot->ptr, &unused))
            rc = KVS_ERR_INVALID; /* committed (or never reserved here): not ours to write */
        else if (write) memcpy((uint8_t *)slot->ptr + offset, buf, len);
        else memcpy(buf, (const uint8_t *)slot->ptr + offset, len);
    } else {
        loc l = {0, slot_seg(slot), slot_off(slot) + offset, len, slot_deadline(slot)};
        void *bufs[1] = {buf};
        int st = KVS_OK;
        move_bytes(c, gen, &l, 1, bufs, write, &st, NULL);
        rc = st;
        if (rc && write) mark_slot_write_failed(c, slot);
    }
    if (rc) count_err(c, rc);
    kvs_leave(c);
    return rc;
}

int kvs_slot_write(kvs_client *c, const kvs_slot *slot, uint64_t offset, const void *src,
                   uint64_t len)
{
    return slot_io(c, slot, offset, (void *)src, len, 1);
}

int kvs_slot_read(kvs_client *c, const kvs_slot *slot, uint64_t offset, void *dst, uint64_t len)
{
    return slot_io(c, slot, offset, dst, len, 0);
}

int kvs_slot_lease_valid(kvs_client *c, const kvs_slot *slot)
{
    if (!c || !slot || slot->status != KVS_OK) return 0;
    if (slot_gen16(slot) != (kvs_client_gen(c) & 0xffff)) return 0;
    return !deadline_passed(c, slot_deadline(slot));
}

/* ---- stats ---- */

int kvs_client_stats_json(kvs_client *c, char **json)
{
    if (!c || !json) return KVS_ERR_INVALID;
    *json = NULL;
    int rc = kvs_enter(c);
    if (rc) return rc;
    kvs_conn_ref cr;
    rc = kvs_conn_get(c, &cr);
    if (rc == KVS_OK) {
        kvs_wbuf w;
        kvs_wbuf_init(&w);
        uint8_t *resp;
        uint32_t rlen;
        rc = kvs_conn_call(c, &cr, KVS_MSG_STATS, &w, 0, &resp, &rlen);
        kvs_wbuf_free(&w);
        kvs_conn_put(&cr);
        if (rc == KVS_OK) {
            kvs_rbuf r;
            kvs_rbuf_init(&r, resp, rlen);
            uint32_t n;
            const uint8_t *p = kvs_rbuf_bytes(&r, KVS_MAX_BODY, &n);
            rc = kvs_rbuf_finish(&r);
            if (rc == KVS_OK) {
                *json = malloc((size_t)n + 1);
                if (!*json) rc = KVS_ERR_NOMEM;
                else {
                    memcpy(*json, p, n);
                    (*json)[n] = '\0';
                }
            }
        }
        free(resp);
    }
    kvs_leave(c);
    return rc;
}
