/* KV connector: dumps and loads of objects given as explicit parts
 * (kvs_connector_dump_parts / load_parts; see include/kvshelf/connector.h).
 * No registered layout: each task carries its parts' addresses and lengths.
 * Runs on the connector's task engine (queue, workers, backpressure in
 * connector.c); one job = up to CONN_JOB_BYTES of objects of one task:
 *   dump: reserve_batch -> header + parts straight into the slot (or into
 *         staging, then slot_write) -> view check -> commit_batch
 *   load: acquire_batch -> check size and header -> parts out of the object
 *         -> re-check header, lease, GPU view -> release_batch
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "common/log.h"
#include "common/util.h"
#include "connector/conn_internal.h"
#include "kvshelf/client.h"
#include "kvshelf/connector.h"

#define PARTS_MAX_PPO (1u << 16)
#define PARTS_FP_SEED 0x6b76737061727473ull /* "kvsparts" */

static uint64_t parts_fp(size_t ppo, const uint64_t *lens, uint64_t tag)
{
    /* lens then (ppo, tag), hashed in one pass over a small buffer when it fits */
    uint64_t buf[64 + 2];
    uint64_t fp;
    if (ppo <= 64) {
        memcpy(buf, lens, ppo * sizeof *lens);
        buf[ppo] = (uint64_t)ppo;
        buf[ppo + 1] = tag;
        fp = XXH3_64bits_withSeed(buf, (ppo + 2) * sizeof *buf, PARTS_FP_SEED);
    } else {
        uint64_t h = XXH3_64bits_withSeed(lens, ppo * sizeof *lens, PARTS_FP_SEED);
        uint64_t t3[3] = {h, (uint64_t)ppo, tag};
        fp = XXH3_64bits_withSeed(t3, sizeof t3, PARTS_FP_SEED ^ 1);
    }
    return fp ? fp : 1;
}

/* ---------------------------------------------------------------- start */

static int start_parts(kvs_connector *c, int kind, const kvs_key *hashes, size_t n,
                       const uint64_t *addrs, const uint64_t *lens, size_t ppo, void *ev,
                       const kvs_parts_opts *opts, kvs_task **task)
{
    if (!c || !task) return KVS_ERR_INVALID;
    *task = NULL;
    if (n && (!hashes || !addrs || !lens)) return KVS_ERR_INVALID;
    if (!ppo || ppo > PARTS_MAX_PPO || n > SIZE_MAX / 16 / ppo) return KVS_ERR_INVALID;
    if (c->device == -1) return KVS_ERR_UNSUPPORTED;
    if (ev && c->backend != BK_CUDA) return KVS_ERR_INVALID;
    int raw = opts && opts->raw_keys;
    uint64_t max_obj = CONN_HDR_BYTES;
    for (size_t i = 0; i < n; i++) {
        if (raw ? !hashes[i].data || hashes[i].len < 1 || hashes[i].len > KVS_KEY_MAX
                : !conn_valid_hash(&hashes[i]))
            return KVS_ERR_INVALID;
        uint64_t sum = CONN_HDR_BYTES;
        for (size_t k = 0; k < ppo; k++) {
            uint64_t a = addrs[i * ppo + k], l = lens[i * ppo + k];
            if (!a || !l) return KVS_ERR_INVALID;
            if (l > CONN_MAX_BLOCK_BYTES || sum + l > CONN_MAX_BLOCK_BYTES)
                return KVS_ERR_TOO_LARGE;
            sum += l;
        }
        if (sum > max_obj) max_obj = sum;
    }
    uint64_t job_bytes = CONN_JOB_BYTES;
    const char *env = getenv("KVSHELF_CONNECTOR_JOB_MB");
    if (env && atoi(env) > 0) job_bytes = (uint64_t)atoi(env) << 20;
    uint64_t jb = job_bytes / max_obj;
    if (jb > CONN_JOB_MAX_BLOCKS) jb = CONN_JOB_MAX_BLOCKS;
    if (jb > c->max_inflight) jb = c->max_inflight; /* a job always fits the queue */
    if (jb < 1) jb = 1;

    int rc = conn_enter(c);
    if (rc != KVS_OK) return rc;
    kvs_task *t = conn_task_new(c, kind, hashes, NULL, n, (size_t)jb, raw);
    if (t) {
        t->parts = 1;
        t->ppo = ppo;
        size_t np = n * ppo;
        if (!np) np = 1;
        t->paddrs = malloc(np * sizeof *t->paddrs);
        t->plens = malloc(np * sizeof *t->plens);
        t->pfp = malloc((n ? n : 1) * sizeof *t->pfp);
        t->pbytes = malloc((n ? n : 1) * sizeof *t->pbytes);
        rc = t->paddrs && t->plens && t->pfp && t->pbytes ? KVS_OK : KVS_ERR_NOMEM;
    } else {
        rc = KVS_ERR_NOMEM;
    }
    if (rc == KVS_OK) {
        memcpy(t->paddrs, addrs, n * ppo * sizeof *addrs);
        memcpy(t->plens, lens, n * ppo * sizeof *lens);
        for (size_t i = 0; i < n; i++) {
            uint64_t sum = 0;
            for (size_t k = 0; k < ppo; k++) sum += lens[i * ppo + k];
            t->pbytes[i] = sum;
            t->pfp[i] = parts_fp(ppo, lens + i * ppo, opts && opts->tags ? opts->tags[i] : 0);
        }
    }
#ifdef KVS_HAVE_CUDA
    if (rc == KVS_OK && ev && t->njobs) rc = kvs_cuda_event_snapshot(c->cx, ev, &t->event);
#endif
    if (rc != KVS_OK) {
        if (t) { /* nothing started: finish the jobs unqueued and drop the task */
            for (size_t k = 0; k < t->njobs; k++) conn_job_finish(&t->jobs[k]);
            kvs_task_free(t);
        }
        conn_leave(c);
        return rc;
    }
    conn_task_submit(c, t);
    conn_leave(c);
    *task = t;
    return KVS_OK;
}

int kvs_connector_dump_parts_ex(kvs_connector *c, const kvs_key *hashes, size_t n,
                                const uint64_t *addrs, const uint64_t *lens,
                                size_t parts_per_obj, void *after_event,
                                const kvs_parts_opts *opts, kvs_task **task)
{
    return start_parts(c, TASK_DUMP, hashes, n, addrs, lens, parts_per_obj, after_event, opts,
                       task);
}

int kvs_connector_load_parts_ex(kvs_connector *c, const kvs_key *hashes, size_t n,
                                const uint64_t *addrs, const uint64_t *lens,
                                size_t parts_per_obj, const kvs_parts_opts *opts,
                                kvs_task **task)
{
    return start_parts(c, TASK_LOAD, hashes, n, addrs, lens, parts_per_obj, NULL, opts, task);
}

int kvs_connector_dump_parts(kvs_connector *c, const kvs_key *hashes, size_t n,
                             const uint64_t *addrs, const uint64_t *lens, size_t parts_per_obj,
                             void *after_event, kvs_task **task)
{
    return start_parts(c, TASK_DUMP, hashes, n, addrs, lens, parts_per_obj, after_event, NULL,
                       task);
}

int kvs_connector_load_parts(kvs_connector *c, const kvs_key *hashes, size_t n,
                             const uint64_t *addrs, const uint64_t *lens, size_t parts_per_obj,
                             kvs_task **task)
{
    return start_parts(c, TASK_LOAD, hashes, n, addrs, lens, parts_per_obj, NULL, NULL, task);
}

/* -------------------------------------------------------------- workers */

static void pstaging_free(kvs_connector *c, conn_worker *w)
{
    if (!w->pstaging) return;
#ifdef KVS_HAVE_CUDA
    if (c->backend == BK_CUDA)
        kvs_cuda_pinned_free(w->pstaging);
    else
#endif
        free(w->pstaging);
    w->pstaging = NULL;
    w->pstaging_cap = 0;
}

/* Staging of at least `need` bytes (kept and grown per worker). */
static uint8_t *pstaging(conn_worker *w, size_t need)
{
    kvs_connector *c = w->c;
    if (need <= w->pstaging_cap) return w->pstaging;
    size_t cap = (need + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1);
    if (cap < 2 * w->pstaging_cap) cap = 2 * w->pstaging_cap;
    pstaging_free(c, w);
#ifdef KVS_HAVE_CUDA
    if (c->backend == BK_CUDA)
        w->pstaging = kvs_cuda_pinned_alloc(cap);
    else
#endif
        w->pstaging = aligned_alloc(4096, cap);
    if (w->pstaging) w->pstaging_cap = cap;
    return w->pstaging;
}

void conn_parts_worker_exit(conn_worker *w)
{
    kvs_connector *c = w->c;
#ifdef KVS_HAVE_CUDA
    if (w->pcw) kvs_cuda_pworker_destroy(w->pcw);
#endif
    w->pcw = NULL;
    pstaging_free(c, w);
}

/* 1 if the copy can use the slot's direct pointer for an object of len bytes. */
static int parts_direct_ok(kvs_connector *c, const kvs_slot *s, uint64_t len)
{
    if (!s->ptr || c->force_staging || ((uintptr_t)s->ptr & 7)) return 0;
#ifdef KVS_HAVE_CUDA
    if (c->backend == BK_CUDA) return kvs_cuda_can_map(c->cx, s->ptr, len);
#endif
    return 1;
}

/* Runs the copies of objects w->ok[i] of a job. dump: parts -> objects, view
 * stamp written; load: w->got[i] = view stamp, objects -> parts. Returns
 * KVS_OK or the error that failed every object. */
static int parts_copies(conn_worker *w, int dir, const kvs_task *t, size_t start, size_t n)
{
    kvs_connector *c = w->c;
    const size_t ppo = t->ppo;
    const uint64_t *addrs = t->paddrs + start * ppo, *lens = t->plens + start * ppo;
#ifdef KVS_HAVE_CUDA
    if (c->backend == BK_CUDA) {
        if (!w->pcw) {
            kvs_cuda_pworker *pw = NULL;
            if (kvs_cuda_pworker_create(c->cx, c->device, &pw) != KVS_OK) return KVS_ERR_CUDA;
            w->pcw = pw;
        }
        return kvs_cuda_copy_parts(w->pcw, dir == TASK_DUMP ? KVS_CUDA_DUMP : KVS_CUDA_LOAD, n,
                                   w->obj, addrs, lens, ppo, CONN_HDR_BYTES, CONN_STAMP_OFF,
                                   w->ok, w->gen, w->got, dir == TASK_DUMP ? t->event : NULL);
    }
#endif
    (void)c;
    for (size_t i = 0; i < n; i++) {
        if (!w->ok[i]) continue;
        uint8_t *o = (uint8_t *)w->obj[i] + CONN_HDR_BYTES;
        if (dir == TASK_LOAD) w->got[i] = conn_read_stamp(w->obj[i]);
        for (size_t k = 0; k < ppo; k++) {
            void *p = (void *)(uintptr_t)addrs[i * ppo + k];
            size_t len = (size_t)lens[i * ppo + k];
            if (dir == TASK_DUMP)
                memcpy(o, p, len);
            else
                memcpy(p, o, len);
            o += len;
        }
        if (dir == TASK_DUMP) conn_write_stamp(w->obj[i], w->gen[i]);
    }
    return KVS_OK;
}

static size_t align64(uint64_t v) { return (size_t)((v + 63) & ~(uint64_t)63); }

/* Gives staged objects (w->staged[i]) their staging memory; an object that
 * gets none fails with KVS_ERR_NOMEM (w->ok[i] = 0). */
static void assign_staging(conn_worker *w, size_t n, int *res)
{
    size_t need = 0;
    for (size_t i = 0; i < n; i++)
        if (w->staged[i]) need += align64(w->sizes[i]);
    uint8_t *base = need ? pstaging(w, need) : NULL;
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        if (!w->staged[i]) continue;
        if (!base) {
            w->staged[i] = 0;
            w->obj[i] = NULL;
            res[i] = KVS_ERR_NOMEM;
            continue;
        }
        w->obj[i] = base + off;
        off += align64(w->sizes[i]);
    }
}

static void parts_dump(conn_worker *w, struct conn_job *j)
{
    kvs_connector *c = w->c;
    kvs_task *t = j->task;
    const kvs_key *keys = t->keys + j->start;
    const uint64_t *fp = t->pfp + j->start, *pb = t->pbytes + j->start;
    int *res = t->results + j->start;
    size_t n = j->n;

    for (size_t i = 0; i < n; i++) w->sizes[i] = CONN_HDR_BYTES + pb[i];
    memset(w->slots, 0, n * sizeof w->slots[0]);
    int rc = kvs_reserve_batch(c->cl, keys, w->sizes, n, w->slots);
    if (rc < 0) {
        for (size_t i = 0; i < n; i++) res[i] = rc;
        atomic_fetch_add(&c->n_failed, n);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        kvs_slot *s = &w->slots[i];
        w->ok[i] = 0;
        w->reserved[i] = 0;
        w->staged[i] = 0;
        w->obj[i] = NULL;
        res[i] = KVS_OK;
        if (s->status == KVS_ERR_EXISTS) {
            atomic_fetch_add(&c->n_skipped, 1);
            continue;
        }
        if (s->status != KVS_OK) {
            res[i] = s->status;
            continue;
        }
        w->reserved[i] = 1;
        if (s->size < w->sizes[i]) {
            res[i] = KVS_ERR_INTERNAL;
            continue;
        }
        if (parts_direct_ok(c, s, w->sizes[i]))
            w->obj[i] = s->ptr;
        else
            w->staged[i] = 1;
    }
    assign_staging(w, n, res);
    size_t live = 0;
    for (size_t i = 0; i < n; i++) {
        if (!w->obj[i] || res[i] != KVS_OK) continue;
        conn_hdr h = {.magic = CONN_MAGIC,
                      .version = CONN_VERSION,
                      .hdr_bytes = CONN_HDR_BYTES,
                      .n_tensors = (uint32_t)t->ppo,
                      .flags = CONN_FLAG_PARTS,
                      .key_stamp = XXH3_64bits(keys[i].data, keys[i].len),
                      .payload_len = pb[i],
                      .layout_fp = fp[i],
                      .generation = conn_next_gen(c),
                      .checksum = 0,
                      .view_stamp = 0};
        memcpy(w->obj[i], &h, sizeof h);
        w->gen[i] = h.generation;
        w->ok[i] = 1;
        live++;
    }
    if (live && !atomic_load(&t->cancelled)) {
        rc = parts_copies(w, TASK_DUMP, t, j->start, n);
        for (size_t i = 0; i < n; i++) {
            if (!w->ok[i]) continue;
            if (rc != KVS_OK) {
                w->ok[i] = 0;
                res[i] = rc;
                continue;
            }
            if (conn_read_stamp(w->obj[i]) != w->gen[i]) { /* the GPU wrote elsewhere */
                KVS_LOGW("connector: view check failed on parts dump; re-registering the mapping");
#ifdef KVS_HAVE_CUDA
                if (c->backend == BK_CUDA && !w->staged[i]) kvs_cuda_forget(c->cx, w->obj[i]);
#endif
                w->ok[i] = 0;
                res[i] = KVS_ERR_CUDA;
                continue;
            }
            if (c->checksum) {
                conn_hdr *h = w->obj[i];
                h->checksum = XXH3_64bits((uint8_t *)w->obj[i] + CONN_HDR_BYTES, pb[i]);
                h->flags |= CONN_FLAG_CHECKSUM;
            }
            if (w->staged[i]) {
                int wr = kvs_slot_write(c->cl, &w->slots[i], 0, w->obj[i], w->sizes[i]);
                if (wr != KVS_OK) {
                    w->ok[i] = 0;
                    res[i] = wr;
                }
            }
        }
    } else if (live) {
        for (size_t i = 0; i < n; i++)
            if (w->ok[i]) {
                w->ok[i] = 0;
                res[i] = KVS_ERR_CLOSED;
            }
    }
    /* Publish the good ones, abandon the rest (a reserved object that is not
     * ok always has a non-OK result by now). */
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!w->reserved[i]) continue;
        if (!w->ok[i] && res[i] == KVS_OK) res[i] = KVS_ERR_INTERNAL;
        w->ck[k] = keys[i];
        w->cs[k] = w->slots[i];
        w->cok[k] = w->ok[i];
        w->cres[k] = KVS_OK;
        k++;
    }
    if (k) {
        rc = kvs_commit_batch(c->cl, w->ck, w->cs, w->cok, k, w->cres);
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            if (!w->reserved[i]) continue;
            int r = rc < 0 ? rc : w->cres[m];
            if (w->ok[i] && r != KVS_OK) res[i] = r;
            m++;
        }
    }
    uint64_t done = 0, bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (w->reserved[i] && w->ok[i] && res[i] == KVS_OK) {
            done++;
            bytes += pb[i];
        } else if (res[i] != KVS_OK && res[i] != KVS_ERR_CLOSED) {
            atomic_fetch_add(&c->n_failed, 1);
        }
    }
    atomic_fetch_add(&c->n_dumped, done);
    atomic_fetch_add(&c->n_bytes_dumped, bytes);
}

/* KVS_OK if h heads a complete parts object of `key` with this geometry;
 * else the load result (see connector.h). */
static int parts_hdr_status(const conn_hdr *h, const kvs_key *key, size_t ppo, uint64_t payload,
                            uint64_t fp)
{
    if (h->magic != CONN_MAGIC || h->version != CONN_VERSION || h->hdr_bytes != CONN_HDR_BYTES ||
        !(h->flags & CONN_FLAG_PARTS) || h->generation == 0 || h->view_stamp != h->generation ||
        h->key_stamp != XXH3_64bits(key->data, key->len))
        return KVS_ERR_NOT_FOUND;
    if (h->payload_len != payload) return KVS_ERR_TOO_LARGE;
    if (h->n_tensors != ppo || h->layout_fp != fp) return KVS_ERR_CORRUPT;
    return KVS_OK;
}

static void parts_load(conn_worker *w, struct conn_job *j)
{
    kvs_connector *c = w->c;
    kvs_task *t = j->task;
    const kvs_key *keys = t->keys + j->start;
    const uint64_t *fp = t->pfp + j->start, *pb = t->pbytes + j->start;
    int *res = t->results + j->start;
    size_t n = j->n;

    memset(w->slots, 0, n * sizeof w->slots[0]);
    int rc = kvs_acquire_batch(c->cl, keys, n, w->slots);
    if (rc < 0) {
        for (size_t i = 0; i < n; i++) res[i] = rc;
        atomic_fetch_add(&c->n_failed, n);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        kvs_slot *s = &w->slots[i];
        w->ok[i] = 0;
        w->staged[i] = 0;
        w->obj[i] = NULL;
        w->sizes[i] = CONN_HDR_BYTES + pb[i];
        if (s->status != KVS_OK) {
            res[i] = s->status;
            continue;
        }
        if (s->size != w->sizes[i]) { /* other part sizes under this key: nothing copied */
            res[i] = s->size < CONN_HDR_BYTES ? KVS_ERR_NOT_FOUND : KVS_ERR_TOO_LARGE;
            continue;
        }
        res[i] = KVS_OK;
        if (parts_direct_ok(c, s, w->sizes[i]))
            w->obj[i] = s->ptr;
        else
            w->staged[i] = 1;
    }
    assign_staging(w, n, res);
    size_t live = 0;
    for (size_t i = 0; i < n; i++) {
        if (!w->obj[i] || res[i] != KVS_OK) continue;
        if (w->staged[i]) {
            int rr = kvs_slot_read(c->cl, &w->slots[i], 0, w->obj[i], w->sizes[i]);
            if (rr != KVS_OK) {
                res[i] = rr;
                continue;
            }
        }
        conn_hdr h;
        memcpy(&h, w->obj[i], sizeof h);
        int st = parts_hdr_status(&h, &keys[i], t->ppo, pb[i], fp[i]);
        if (st != KVS_OK) {
            KVS_LOGD("connector: parts header mismatch on load");
            res[i] = st;
            continue;
        }
        if (c->checksum && (h.flags & CONN_FLAG_CHECKSUM) &&
            XXH3_64bits((uint8_t *)w->obj[i] + CONN_HDR_BYTES, pb[i]) != h.checksum) {
            KVS_LOGW("connector: checksum mismatch on parts load");
            res[i] = KVS_ERR_CORRUPT;
            continue;
        }
        w->gen[i] = h.generation;
        w->ok[i] = 1;
        live++;
    }
    if (live && atomic_load(&t->cancelled)) {
        for (size_t i = 0; i < n; i++)
            if (w->ok[i]) {
                w->ok[i] = 0;
                res[i] = KVS_ERR_CLOSED;
            }
        live = 0;
    }
    if (live) {
        rc = parts_copies(w, TASK_LOAD, t, j->start, n);
        for (size_t i = 0; i < n; i++) {
            if (!w->ok[i]) continue;
            if (rc != KVS_OK) {
                res[i] = rc;
                continue;
            }
            res[i] = KVS_ERR_NOT_FOUND;
            conn_hdr h;
            memcpy(&h, w->obj[i], sizeof h);
            if (w->got[i] != w->gen[i]) {
                KVS_LOGW("connector: view check failed on parts load: miss");
#ifdef KVS_HAVE_CUDA
                if (c->backend == BK_CUDA && !w->staged[i]) kvs_cuda_forget(c->cx, w->obj[i]);
#endif
                continue;
            }
            if (h.generation != w->gen[i] ||
                parts_hdr_status(&h, &keys[i], t->ppo, pb[i], fp[i]) != KVS_OK ||
                kvs_slot_lease_valid(c->cl, &w->slots[i]) != 1) {
                KVS_LOGD("connector: object changed or lease lost during parts load: miss");
                continue;
            }
            res[i] = KVS_OK;
        }
    }
    kvs_release_batch(c->cl, w->slots, n);
    uint64_t ok = 0, miss = 0, fail = 0, bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (res[i] == KVS_OK) {
            ok++;
            bytes += pb[i];
        } else if (res[i] == KVS_ERR_NOT_FOUND) {
            miss++;
        } else if (res[i] != KVS_ERR_CLOSED) {
            fail++;
        }
    }
    atomic_fetch_add(&c->n_loaded, ok);
    atomic_fetch_add(&c->n_missed, miss);
    atomic_fetch_add(&c->n_failed, fail);
    atomic_fetch_add(&c->n_bytes_loaded, bytes);
}

void conn_run_parts(conn_worker *w, struct conn_job *j)
{
    if (j->task->kind == TASK_DUMP)
        parts_dump(w, j);
    else
        parts_load(w, j);
}
