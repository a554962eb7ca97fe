/* KV connector: layouts, keys and namespaces, object headers, task engine,
 * host copy backend (CUDA backends in src/cuda/). See include/kvshelf/connector.h.
 *
 * Flow of one job (up to CONN_JOB_BYTES of blocks of one task):
 *   dump: reserve_batch -> header + gather chunks straight into the slot
 *         (or into staging, then slot_write) -> view check -> commit_batch
 *   load: acquire_batch -> check header -> scatter chunks into the block ids
 *         -> re-check header, lease, GPU view -> release_batch
 */
#include "kvshelf/connector.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/log.h"
#include "common/util.h"
#include "kvshelf/client.h"
#ifdef KVS_HAVE_CUDA
#include "cuda/kvs_cuda.h"
#endif

#include "connector/conn_internal.h"

/* -------------------------------------------------------------- helpers */

static void set_err(char *err, size_t errlen, const char *fmt, const char *a)
{
    if (err && errlen) snprintf(err, errlen, fmt, a ? a : "");
}

int conn_valid_hash(const kvs_key *h)
{
    return h && h->data && h->len >= 1 && h->len <= KVS_HASH_MAX;
}

static void make_prefix(const char *ns, uint32_t world, uint32_t rank,
                        uint8_t out[KVS_CONNECTOR_PREFIX_BYTES])
{
    static const char tag[] = "kvshelf-connector-v1";
    size_t nl = strlen(ns);
    uint8_t buf[sizeof tag + KVS_NAMESPACE_MAX + 1 + 8];
    size_t k = 0;
    memcpy(buf, tag, sizeof tag); /* includes the NUL */
    k += sizeof tag;
    memcpy(buf + k, ns, nl);
    k += nl;
    buf[k++] = 0;
    for (int i = 0; i < 4; i++) buf[k++] = (uint8_t)(world >> (8 * i));
    for (int i = 0; i < 4; i++) buf[k++] = (uint8_t)(rank >> (8 * i));
    XXH128_hash_t h = XXH3_128bits(buf, k);
    for (int i = 0; i < 8; i++) out[i] = (uint8_t)(h.low64 >> (8 * i));
    for (int i = 0; i < 8; i++) out[8 + i] = (uint8_t)(h.high64 >> (8 * i));
}

int kvs_connector_store_key(const char *ns, uint32_t world_size, uint32_t rank,
                            const kvs_key *hash, uint8_t *out, size_t cap)
{
    if (!ns || !*ns || strlen(ns) > KVS_NAMESPACE_MAX || !conn_valid_hash(hash) || !out)
        return KVS_ERR_INVALID;
    if (world_size == 0) world_size = 1;
    if (rank >= world_size) return KVS_ERR_INVALID;
    if (cap < KVS_CONNECTOR_PREFIX_BYTES + hash->len) return KVS_ERR_TOO_LARGE;
    make_prefix(ns, world_size, rank, out);
    memcpy(out + KVS_CONNECTOR_PREFIX_BYTES, hash->data, hash->len);
    return (int)(KVS_CONNECTOR_PREFIX_BYTES + hash->len);
}

uint64_t conn_next_gen(kvs_connector *c)
{
    for (;;) {
        uint64_t g = c->gen_base + atomic_fetch_add(&c->gen_ctr, 1) * 0x9E3779B97F4A7C15ull;
        if (g) return g;
    }
}

/* Enter/leave a public call that uses the client or the queue; close waits
 * until none is inside. */
int conn_enter(kvs_connector *c)
{
    pthread_mutex_lock(&c->mu);
    if (c->closing) {
        pthread_mutex_unlock(&c->mu);
        return KVS_ERR_CLOSED;
    }
    c->callers++;
    pthread_mutex_unlock(&c->mu);
    return KVS_OK;
}

void conn_leave(kvs_connector *c)
{
    pthread_mutex_lock(&c->mu);
    if (--c->callers == 0) pthread_cond_broadcast(&c->idle_cv);
    pthread_mutex_unlock(&c->mu);
}

/* ---------------------------------------------------------------- tasks */

static void task_unref(kvs_task *t)
{
    if (atomic_fetch_sub(&t->refs, 1) != 1) return;
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t->keymem);
    free(t->keys);
    free(t->bids);
    free(t->results);
    free(t->jobs);
    free(t->paddrs);
    free(t->plens);
    free(t->pfp);
    free(t->pbytes);
    free(t);
}

/* Marks one job finished (its results already written). */
void conn_job_finish(struct conn_job *j)
{
    kvs_task *t = j->task;
    pthread_mutex_lock(&t->mu);
    if (--t->jobs_left == 0) {
#ifdef KVS_HAVE_CUDA
        if (t->event) kvs_cuda_event_free(t->event);
#endif
        t->event = NULL;
        t->done = 1;
        pthread_cond_broadcast(&t->cv);
    }
    pthread_mutex_unlock(&t->mu);
    task_unref(t);
}

void conn_job_set_all(struct conn_job *j, int status)
{
    for (size_t i = 0; i < j->n; i++) j->task->results[j->start + i] = status;
}

kvs_task *conn_task_new(kvs_connector *c, int kind, const kvs_key *hashes, const uint32_t *bids,
                        size_t n, size_t job_blocks, int raw_keys)
{
    kvs_task *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->kind = kind;
    t->n = n;
    size_t keybytes = 0;
    const size_t pfx = raw_keys ? 0 : KVS_CONNECTOR_PREFIX_BYTES;
    for (size_t i = 0; i < n; i++) keybytes += pfx + hashes[i].len;
    /* Jobs of at most job_blocks, but spread over every worker when the
     * task is small, so all of them copy at once. */
    size_t jb = job_blocks ? job_blocks : 1;
    size_t share = c->nworkers ? (n + c->nworkers - 1) / c->nworkers : n;
    if (share < jb) jb = share ? share : 1;
    t->njobs = (n + jb - 1) / jb;
    t->keymem = malloc(keybytes ? keybytes : 1);
    t->keys = calloc(n ? n : 1, sizeof *t->keys);
    t->bids = calloc(n ? n : 1, sizeof *t->bids);
    t->results = calloc(n ? n : 1, sizeof *t->results);
    t->jobs = calloc(t->njobs ? t->njobs : 1, sizeof *t->jobs);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int ok = t->keymem && t->keys && t->bids && t->results && t->jobs;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, &ca);
    pthread_condattr_destroy(&ca);
    atomic_init(&t->refs, 1);
    atomic_init(&t->cancelled, 0);
    if (!ok) {
        task_unref(t);
        return NULL;
    }
    uint8_t *p = t->keymem;
    for (size_t i = 0; i < n; i++) {
        if (pfx) memcpy(p, c->prefixes[0], pfx);
        memcpy(p + pfx, hashes[i].data, hashes[i].len);
        t->keys[i] = (kvs_key){p, pfx + hashes[i].len};
        p += t->keys[i].len;
        t->bids[i] = bids ? bids[i] : 0;
        t->results[i] = KVS_ERR_CLOSED;
    }
    for (size_t k = 0; k < t->njobs; k++) {
        t->jobs[k].task = t;
        t->jobs[k].start = k * jb;
        t->jobs[k].n = KVS_MIN(jb, n - k * jb);
    }
    t->jobs_left = t->njobs;
    if (t->njobs == 0) t->done = 1;
    atomic_fetch_add(&t->refs, (int)t->njobs);
    return t;
}

/* Queues the task's jobs with backpressure; returns after all are queued,
 * dropped (dumps with drop_when_full) or failed (closing). Caller is inside
 * conn_enter()/conn_leave(). */
void conn_task_submit(kvs_connector *c, kvs_task *t)
{
    pthread_mutex_lock(&c->mu);
    for (size_t k = 0; k < t->njobs; k++) {
        struct conn_job *j = &t->jobs[k];
        int drop = 0;
        while (!c->closing && c->inflight > 0 && c->inflight + j->n > c->max_inflight) {
            if (t->kind == TASK_DUMP && c->drop_when_full) {
                drop = 1;
                break;
            }
            pthread_cond_wait(&c->space_cv, &c->mu);
        }
        if (drop || c->closing) {
            pthread_mutex_unlock(&c->mu);
            conn_job_set_all(j, drop ? KVS_ERR_BUSY : KVS_ERR_CLOSED);
            if (drop) atomic_fetch_add(&c->n_dropped, j->n);
            conn_job_finish(j);
            pthread_mutex_lock(&c->mu);
            continue;
        }
        c->inflight += j->n;
        j->next = NULL;
        if (c->qtail)
            c->qtail->next = j;
        else
            c->qhead = j;
        c->qtail = j;
        pthread_cond_signal(&c->work_cv);
    }
    pthread_mutex_unlock(&c->mu);
}

int kvs_task_wait(kvs_task *t, int timeout_ms)
{
    if (!t) return KVS_ERR_INVALID;
    struct timespec dl;
    if (timeout_ms >= 0) {
        clock_gettime(CLOCK_MONOTONIC, &dl);
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
    }
    int rc = KVS_OK;
    pthread_mutex_lock(&t->mu);
    while (!t->done) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&t->cv, &t->mu);
        } else if (pthread_cond_timedwait(&t->cv, &t->mu, &dl) == ETIMEDOUT) {
            if (!t->done) rc = KVS_ERR_TIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

int kvs_task_check(kvs_task *t)
{
    if (!t) return KVS_ERR_INVALID;
    pthread_mutex_lock(&t->mu);
    int d = t->done;
    pthread_mutex_unlock(&t->mu);
    return d;
}

int kvs_task_results(kvs_task *t, int *results, size_t n)
{
    if (!t) return KVS_ERR_INVALID;
    pthread_mutex_lock(&t->mu);
    int d = t->done;
    pthread_mutex_unlock(&t->mu);
    if (!d) return KVS_ERR_BUSY;
    int ok = 0;
    for (size_t i = 0; i < t->n; i++) {
        if (t->results[i] == KVS_OK) ok++;
        if (results && i < n) results[i] = t->results[i];
    }
    return ok;
}

size_t kvs_task_size(const kvs_task *t) { return t ? t->n : 0; }

void kvs_task_free(kvs_task *t)
{
    if (!t) return;
    atomic_store(&t->cancelled, 1);
    task_unref(t);
}

/* --------------------------------------------------------- host backend */

/* obj: start of the object (payload_off counts the header). */
static void host_gather(const kvs_connector *c, uint32_t bid, uint8_t *obj)
{
    for (size_t t = 0; t < c->nt; t++) {
        const conn_tensor *T = &c->T[t];
        const uint8_t *src = (const uint8_t *)(uintptr_t)(T->base + (uint64_t)bid * T->block_stride);
        uint8_t *dst = obj + T->payload_off;
        for (uint32_t k = 0; k < T->count; k++)
            memcpy(dst + (uint64_t)k * T->chunk_bytes, src + (uint64_t)k * T->chunk_stride,
                   T->chunk_bytes);
    }
}

static void host_scatter(const kvs_connector *c, uint32_t bid, const uint8_t *obj)
{
    for (size_t t = 0; t < c->nt; t++) {
        const conn_tensor *T = &c->T[t];
        uint8_t *dst = (uint8_t *)(uintptr_t)(T->base + (uint64_t)bid * T->block_stride);
        const uint8_t *src = obj + T->payload_off;
        for (uint32_t k = 0; k < T->count; k++)
            memcpy(dst + (uint64_t)k * T->chunk_stride, src + (uint64_t)k * T->chunk_bytes,
                   T->chunk_bytes);
    }
}

/* 1 if the copy backend can use the slot's direct pointer. */
static int direct_ok(kvs_connector *c, const kvs_slot *s)
{
    if (!s->ptr || c->force_staging) return 0;
#ifdef KVS_HAVE_CUDA
    if (c->backend == BK_CUDA) return kvs_cuda_can_map(c->cx, s->ptr, c->block_bytes);
#endif
    return 1;
}

/* Staging memory for a job's non-mapped slots (lazily, per worker). */
static uint8_t *staging(conn_worker *w, size_t k)
{
    kvs_connector *c = w->c;
    /* objects 64-byte aligned: the header's 8-byte words and 16-byte vectors */
    size_t stride = (size_t)(c->block_bytes + 63) & ~(size_t)63;
    size_t need = (size_t)c->job_blocks * stride;
    if (!w->staging) {
#ifdef KVS_HAVE_CUDA
        if (c->backend == BK_CUDA)
            w->staging = kvs_cuda_pinned_alloc(need);
        else
#endif
            w->staging = aligned_alloc(4096, (need + 4095) / 4096 * 4096);
        if (!w->staging) return NULL;
        w->staging_cap = need;
    }
    return w->staging + k * stride;
}

/* Runs the copies of a job: dir = TASK_DUMP or TASK_LOAD over blocks with
 * w->ok[i]. dump: writes the view stamp; load: fills w->got[i] (GPU view).
 * Returns KVS_OK or the error that failed every block. */
static int run_copies(conn_worker *w, int dir, const uint32_t *bids, size_t n, void *event)
{
    kvs_connector *c = w->c;
#ifdef KVS_HAVE_CUDA
    if (c->backend == BK_CUDA) {
        if (!w->cw) return KVS_ERR_CUDA;
        return kvs_cuda_copy(w->cw, dir == TASK_DUMP ? KVS_CUDA_DUMP : KVS_CUDA_LOAD, n, w->obj,
                             bids, w->ok, w->gen, w->got, event);
    }
#endif
    (void)event;
    for (size_t i = 0; i < n; i++) {
        if (!w->ok[i]) continue;
        if (dir == TASK_DUMP) {
            host_gather(c, bids[i], (uint8_t *)w->obj[i]);
            conn_write_stamp(w->obj[i], w->gen[i]);
        } else {
            w->got[i] = conn_read_stamp(w->obj[i]);
            host_scatter(c, bids[i], (const uint8_t *)w->obj[i]);
        }
    }
    return KVS_OK;
}

/* ----------------------------------------------------------------- dump */

static void run_dump(conn_worker *w, struct conn_job *j)
{
    kvs_connector *c = w->c;
    kvs_task *t = j->task;
    const kvs_key *keys = t->keys + j->start;
    const uint32_t *bids = t->bids + j->start;
    int *res = t->results + j->start;
    size_t n = j->n;

    for (size_t i = 0; i < n; i++) w->sizes[i] = c->block_bytes;
    memset(w->slots, 0, n * sizeof w->slots[0]);
    uint64_t t0 = c->profile ? kvs_now_ns() : 0;
    int rc = kvs_reserve_batch(c->cl, keys, w->sizes, n, w->slots);
    if (rc < 0) {
        for (size_t i = 0; i < n; i++) res[i] = rc;
        atomic_fetch_add(&c->n_failed, n);
        return;
    }
    size_t nstaged = 0, live = 0;
    for (size_t i = 0; i < n; i++) {
        kvs_slot *s = &w->slots[i];
        w->ok[i] = 0;
        w->reserved[i] = 0;
        w->staged[i] = 0;
        w->obj[i] = NULL;
        if (s->status == KVS_ERR_EXISTS) {
            res[i] = KVS_OK;
            atomic_fetch_add(&c->n_skipped, 1);
            continue;
        }
        if (s->status != KVS_OK) {
            res[i] = s->status;
            continue;
        }
        w->reserved[i] = 1;
        if (s->size < c->block_bytes) {
            res[i] = KVS_ERR_INTERNAL;
            continue;
        }
        if (direct_ok(c, s)) {
            w->obj[i] = s->ptr;
        } else {
            w->obj[i] = staging(w, nstaged);
            if (!w->obj[i]) {
                res[i] = KVS_ERR_NOMEM;
                continue;
            }
            w->staged[i] = 1;
            nstaged++;
        }
        conn_hdr h = {.magic = CONN_MAGIC,
                      .version = CONN_VERSION,
                      .hdr_bytes = CONN_HDR_BYTES,
                      .n_tensors = (uint32_t)c->nt,
                      .flags = 0,
                      .key_stamp = XXH3_64bits(keys[i].data, keys[i].len),
                      .payload_len = c->payload_bytes,
                      .layout_fp = c->layout_fp,
                      .generation = conn_next_gen(c),
                      .checksum = 0,
                      .view_stamp = 0};
        memcpy(w->obj[i], &h, sizeof h);
        w->gen[i] = h.generation;
        w->ok[i] = 1;
        res[i] = KVS_OK;
        live++;
    }
    uint64_t t1 = c->profile ? kvs_now_ns() : 0;
    if (live && !atomic_load(&t->cancelled)) {
        rc = run_copies(w, TASK_DUMP, bids, n, t->event);
        for (size_t i = 0; i < n; i++) {
            if (!w->ok[i]) continue;
            if (rc != KVS_OK) {
                w->ok[i] = 0;
                res[i] = rc;
                continue;
            }
            if (conn_read_stamp(w->obj[i]) != w->gen[i]) { /* the GPU wrote elsewhere */
                KVS_LOGW("connector: view check failed on dump; re-registering the mapping");
#ifdef KVS_HAVE_CUDA
                if (c->backend == BK_CUDA && !w->staged[i]) kvs_cuda_forget(c->cx, w->obj[i]);
#endif
                w->ok[i] = 0;
                res[i] = KVS_ERR_CUDA;
                continue;
            }
            if (c->checksum) {
                conn_hdr *h = w->obj[i];
                h->checksum = XXH3_64bits((uint8_t *)w->obj[i] + CONN_HDR_BYTES, c->payload_bytes);
                h->flags |= CONN_FLAG_CHECKSUM;
            }
            if (w->staged[i]) {
                int wr = kvs_slot_write(c->cl, &w->slots[i], 0, w->obj[i], c->block_bytes);
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
    uint64_t t2 = c->profile ? kvs_now_ns() : 0;
    /* Publish the good ones, abandon the rest. */
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!w->reserved[i]) continue;
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
    uint64_t done = 0;
    for (size_t i = 0; i < n; i++) {
        if (w->reserved[i] && w->ok[i] && res[i] == KVS_OK) done++;
        else if (res[i] != KVS_OK && res[i] != KVS_ERR_CLOSED) atomic_fetch_add(&c->n_failed, 1);
    }
    atomic_fetch_add(&c->n_dumped, done);
    atomic_fetch_add(&c->n_bytes_dumped, done * c->payload_bytes);
    if (c->profile) {
        uint64_t t3 = kvs_now_ns();
        atomic_fetch_add(&c->t_meta, t1 - t0);
        atomic_fetch_add(&c->t_copy, t2 - t1);
        atomic_fetch_add(&c->t_finish, t3 - t2);
        atomic_fetch_add(&c->n_jobs, 1);
    }
}

/* ----------------------------------------------------------------- load */

/* 1 if the header at obj is a valid header of `key` for this layout. */
static int header_ok(const kvs_connector *c, const conn_hdr *h, const kvs_key *key)
{
    if (h->magic != CONN_MAGIC || h->version != CONN_VERSION || h->hdr_bytes != CONN_HDR_BYTES ||
        h->n_tensors != c->nt || h->payload_len != c->payload_bytes ||
        h->layout_fp != c->layout_fp || h->generation == 0 || h->view_stamp != h->generation)
        return 0;
    return h->key_stamp == XXH3_64bits(key->data, key->len);
}

static void run_load(conn_worker *w, struct conn_job *j)
{
    kvs_connector *c = w->c;
    kvs_task *t = j->task;
    const kvs_key *keys = t->keys + j->start;
    const uint32_t *bids = t->bids + j->start;
    int *res = t->results + j->start;
    size_t n = j->n;

    memset(w->slots, 0, n * sizeof w->slots[0]);
    uint64_t t0 = c->profile ? kvs_now_ns() : 0;
    int rc = kvs_acquire_batch(c->cl, keys, n, w->slots);
    if (rc < 0) {
        for (size_t i = 0; i < n; i++) res[i] = rc;
        atomic_fetch_add(&c->n_failed, n);
        return;
    }
    size_t nstaged = 0, live = 0;
    for (size_t i = 0; i < n; i++) {
        kvs_slot *s = &w->slots[i];
        w->ok[i] = 0;
        w->staged[i] = 0;
        w->obj[i] = NULL;
        if (s->status != KVS_OK) {
            res[i] = s->status;
            continue;
        }
        res[i] = KVS_ERR_NOT_FOUND;
        if (s->size != c->block_bytes) continue; /* another layout under this key */
        if (direct_ok(c, s)) {
            w->obj[i] = s->ptr;
        } else {
            w->obj[i] = staging(w, nstaged);
            if (!w->obj[i]) {
                res[i] = KVS_ERR_NOMEM;
                continue;
            }
            w->staged[i] = 1;
            nstaged++;
            int rr = kvs_slot_read(c->cl, s, 0, w->obj[i], c->block_bytes);
            if (rr != KVS_OK) {
                res[i] = rr == KVS_ERR_NOT_FOUND ? KVS_ERR_NOT_FOUND : rr;
                continue;
            }
        }
        conn_hdr h;
        memcpy(&h, w->obj[i], sizeof h);
        if (!header_ok(c, &h, &keys[i])) {
            KVS_LOGD("connector: header mismatch on load: miss");
            continue;
        }
        if (c->checksum && (h.flags & CONN_FLAG_CHECKSUM) &&
            XXH3_64bits((uint8_t *)w->obj[i] + CONN_HDR_BYTES, c->payload_bytes) != h.checksum) {
            KVS_LOGW("connector: checksum mismatch on load: miss");
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
    uint64_t t1 = c->profile ? kvs_now_ns() : 0;
    if (live) {
        rc = run_copies(w, TASK_LOAD, bids, n, NULL);
        for (size_t i = 0; i < n; i++) {
            if (!w->ok[i]) continue;
            if (rc != KVS_OK) {
                res[i] = rc;
                continue;
            }
            conn_hdr h;
            memcpy(&h, w->obj[i], sizeof h);
            if (w->got[i] != w->gen[i]) {
                KVS_LOGW("connector: view check failed on load: miss");
#ifdef KVS_HAVE_CUDA
                if (c->backend == BK_CUDA && !w->staged[i]) kvs_cuda_forget(c->cx, w->obj[i]);
#endif
                continue;
            }
            if (h.generation != w->gen[i] || !header_ok(c, &h, &keys[i]) ||
                kvs_slot_lease_valid(c->cl, &w->slots[i]) != 1) {
                KVS_LOGD("connector: object changed or lease lost during load: miss");
                continue;
            }
            res[i] = KVS_OK;
        }
    }
    uint64_t t2 = c->profile ? kvs_now_ns() : 0;
    kvs_release_batch(c->cl, w->slots, n);
    if (c->profile) {
        uint64_t t3 = kvs_now_ns();
        atomic_fetch_add(&c->t_meta, t1 - t0);
        atomic_fetch_add(&c->t_copy, t2 - t1);
        atomic_fetch_add(&c->t_finish, t3 - t2);
        atomic_fetch_add(&c->n_jobs, 1);
    }
    uint64_t ok = 0, miss = 0, fail = 0;
    for (size_t i = 0; i < n; i++) {
        if (res[i] == KVS_OK)
            ok++;
        else if (res[i] == KVS_ERR_NOT_FOUND)
            miss++;
        else if (res[i] != KVS_ERR_CLOSED)
            fail++;
    }
    atomic_fetch_add(&c->n_loaded, ok);
    atomic_fetch_add(&c->n_missed, miss);
    atomic_fetch_add(&c->n_failed, fail);
    atomic_fetch_add(&c->n_bytes_loaded, ok * c->payload_bytes);
}

/* -------------------------------------------------------------- workers */

static void *worker_main(void *arg)
{
    conn_worker *w = arg;
    kvs_connector *c = w->c;
#ifdef KVS_HAVE_CUDA
    if (c->backend == BK_CUDA) {
        kvs_cuda_worker *cw = NULL;
        if (kvs_cuda_worker_create(c->cx, &cw) == KVS_OK)
            w->cw = cw;
        else
            KVS_LOGE("connector: cannot set up a CUDA worker; its copies will fail");
    }
#endif
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->qhead && !c->stop) pthread_cond_wait(&c->work_cv, &c->mu);
        if (!c->qhead) break;
        struct conn_job *j = c->qhead;
        c->qhead = j->next;
        if (!c->qhead) c->qtail = NULL;
        pthread_mutex_unlock(&c->mu);

        if (atomic_load(&j->task->cancelled))
            conn_job_set_all(j, KVS_ERR_CLOSED);
        else if (j->task->parts)
            conn_run_parts(w, j);
        else if (j->task->kind == TASK_DUMP)
            run_dump(w, j);
        else
            run_load(w, j);

        pthread_mutex_lock(&c->mu);
        c->inflight -= j->n;
        pthread_cond_broadcast(&c->space_cv);
        pthread_mutex_unlock(&c->mu);
        conn_job_finish(j);
        pthread_mutex_lock(&c->mu);
    }
    pthread_mutex_unlock(&c->mu);
    conn_parts_worker_exit(w);
#ifdef KVS_HAVE_CUDA
    if (w->cw) kvs_cuda_worker_destroy(w->cw);
    w->cw = NULL;
#endif
    return NULL;
}

/* ------------------------------------------------------------ open/close */

int kvs_connector_open(const kvs_config *cfg, int device, const kvs_connector_opts *opts,
                       kvs_connector **out, char *err, size_t errlen)
{
    if (err && errlen) err[0] = 0;
    if (!cfg || !opts || !out) {
        set_err(err, errlen, "%snull argument", "");
        return KVS_ERR_INVALID;
    }
    *out = NULL;
    if (!opts->ns || !*opts->ns || strlen(opts->ns) > KVS_NAMESPACE_MAX) {
        set_err(err, errlen, "connector namespace (ns) must be 1..256 bytes%s", "");
        return KVS_ERR_INVALID;
    }
    uint32_t world = opts->world_size ? opts->world_size : 1;
    if (opts->rank >= world) {
        set_err(err, errlen, "rank must be below world_size%s", "");
        return KVS_ERR_INVALID;
    }
    if (device < -2) {
        set_err(err, errlen, "device must be >= 0, -1 (lookup-only) or -2 (host)%s", "");
        return KVS_ERR_INVALID;
    }
    const char *be = opts->backend && *opts->backend ? opts->backend : "auto";
    int backend = BK_NONE;
    int cuda_mode = 0;
    if (device == -1) {
        backend = BK_NONE;
    } else if (!strcmp(be, "host")) {
        if (device >= 0) {
            set_err(err, errlen, "backend \"host\" needs host tensors (device -2)%s", "");
            return KVS_ERR_CONFIG;
        }
        backend = BK_HOST;
    } else if (!strcmp(be, "auto") || !strcmp(be, "cuda-kernel") || !strcmp(be, "cuda-batch") ||
               !strcmp(be, "cuda")) {
        if (device == -2) {
            if (strcmp(be, "auto")) {
                set_err(err, errlen, "backend \"%s\" needs a CUDA device (device >= 0)", be);
                return KVS_ERR_CONFIG;
            }
            backend = BK_HOST;
        } else {
#ifdef KVS_HAVE_CUDA
            backend = BK_CUDA;
            cuda_mode = !strcmp(be, "cuda-batch")    ? KVS_CUDA_BATCH
                        : !strcmp(be, "cuda-kernel") ? KVS_CUDA_KERNEL
                                                     : KVS_CUDA_AUTO;
#else
            set_err(err, errlen, "this build of kvshelf has no CUDA support%s", "");
            return KVS_ERR_UNSUPPORTED;
#endif
        }
    } else {
        set_err(err, errlen, "unknown backend \"%s\" (auto, host, cuda-kernel, cuda-batch)", be);
        return KVS_ERR_CONFIG;
    }

    kvs_connector *c = calloc(1, sizeof *c);
    if (!c) return KVS_ERR_NOMEM;
    c->device = device;
    kvs_strlcpy(c->ns, opts->ns, sizeof c->ns);
    c->rank = opts->rank;
    c->world = world;
    c->max_inflight = opts->max_inflight ? opts->max_inflight : CONN_DEFAULT_INFLIGHT;
    c->drop_when_full = opts->drop_when_full != 0;
    c->checksum = opts->checksum != 0;
    c->force_staging = opts->force_staging != 0;
    const char *prof = getenv("KVSHELF_CONNECTOR_PROFILE");
    c->profile = prof && *prof && *prof != '0';
    c->backend = backend;
    c->backend_name = backend == BK_HOST ? "host" : backend == BK_NONE ? "none" : "cuda";
    uint32_t nprefix = device == -1 ? world : 1;
    c->prefixes = calloc(nprefix, sizeof *c->prefixes);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work_cv, NULL);
    pthread_cond_init(&c->space_cv, NULL);
    pthread_cond_init(&c->idle_cv, NULL);
    if (!c->prefixes) {
        kvs_connector_close(c);
        return KVS_ERR_NOMEM;
    }
    for (uint32_t r = 0; r < nprefix; r++)
        make_prefix(c->ns, world, device == -1 ? r : c->rank, c->prefixes[r]);
    if (kvs_random_bytes(&c->gen_base, sizeof c->gen_base) != KVS_OK)
        c->gen_base = kvs_now_ns() ^ ((uint64_t)getpid() << 32);
    atomic_init(&c->gen_ctr, 1);

#ifdef KVS_HAVE_CUDA
    if (backend == BK_CUDA) {
        int rc = kvs_cuda_ctx_create(device, cuda_mode, &c->cx, err, errlen);
        if (rc != KVS_OK) {
            kvs_connector_close(c);
            return rc;
        }
        c->backend_name = kvs_cuda_mode_name(cuda_mode);
    }
#else
    (void)cuda_mode;
#endif

    kvs_config cc = *cfg;
    /* A lookup-only client contributes no memory to a remote pool; in embedded
     * mode no client contributes its own, and the size says how large a pool
     * this client starts if it is the first (the scheduler often is). */
    if (device == -1 && cc.master_server_address[0]) cc.global_segment_size = 0;
    int rc = kvs_client_open(&cc, &c->cl, err, errlen);
    if (rc != KVS_OK) {
        kvs_connector_close(c);
        return rc;
    }

    if (device != -1) {
        c->nworkers = opts->num_workers         ? opts->num_workers
                      : backend == BK_CUDA ? CONN_DEFAULT_CUDA_WORKERS
                                           : CONN_DEFAULT_WORKERS;
        if (c->nworkers > 256) c->nworkers = 256;
        c->workers = calloc(c->nworkers, sizeof *c->workers);
        if (!c->workers) {
            kvs_connector_close(c);
            return KVS_ERR_NOMEM;
        }
        for (uint32_t i = 0; i < c->nworkers; i++) {
            c->workers[i].c = c;
            if (pthread_create(&c->workers[i].th, NULL, worker_main, &c->workers[i])) {
                set_err(err, errlen, "cannot start worker threads%s", "");
                kvs_connector_close(c);
                return KVS_ERR_NOMEM;
            }
            c->workers[i].started = 1;
        }
    }
    *out = c;
    return KVS_OK;
}

void kvs_connector_close(kvs_connector *c)
{
    if (!c) return;
    if (c->profile && atomic_load(&c->n_jobs)) {
        uint64_t nj = atomic_load(&c->n_jobs);
        fprintf(stderr,
                "kvshelf connector profile: %llu jobs of <= %u blocks; per job: reserve/acquire "
                "%.1f us, copy %.1f us, commit/release %.1f us\n",
                (unsigned long long)nj, c->job_blocks, atomic_load(&c->t_meta) / 1e3 / nj,
                atomic_load(&c->t_copy) / 1e3 / nj, atomic_load(&c->t_finish) / 1e3 / nj);
    }
    pthread_mutex_lock(&c->mu);
    c->closing = 1;
    struct conn_job *q = c->qhead;
    c->qhead = c->qtail = NULL;
    pthread_cond_broadcast(&c->space_cv);
    while (c->callers > 0) pthread_cond_wait(&c->idle_cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    while (q) {
        struct conn_job *nx = q->next;
        conn_job_set_all(q, KVS_ERR_CLOSED);
        pthread_mutex_lock(&c->mu);
        c->inflight -= q->n;
        pthread_mutex_unlock(&c->mu);
        conn_job_finish(q);
        q = nx;
    }
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_broadcast(&c->work_cv);
    pthread_mutex_unlock(&c->mu);
    for (uint32_t i = 0; c->workers && i < c->nworkers; i++) {
        conn_worker *w = &c->workers[i];
        if (w->started) pthread_join(w->th, NULL);
        if (w->staging) {
#ifdef KVS_HAVE_CUDA
            if (c->backend == BK_CUDA)
                kvs_cuda_pinned_free(w->staging);
            else
#endif
                free(w->staging);
        }
    }
    free(c->workers);
#ifdef KVS_HAVE_CUDA
    /* Unregister segment mappings before the client unmaps them. */
    kvs_cuda_ctx_destroy(c->cx);
#endif
    kvs_client_close(c->cl);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->work_cv);
    pthread_cond_destroy(&c->space_cv);
    pthread_cond_destroy(&c->idle_cv);
    free(c->prefixes);
    free(c->T);
    free(c);
}

/* --------------------------------------------------------------- layout */

int kvs_connector_register_layout(kvs_connector *c, const kvs_tensor_layout *tensors,
                                  size_t n_tensors, uint32_t num_blocks)
{
    if (!c || !tensors || !n_tensors || n_tensors > (1u << 20) || !num_blocks)
        return KVS_ERR_INVALID;
    if (c->device == -1) return KVS_ERR_UNSUPPORTED;
    conn_tensor *T = calloc(n_tensors, sizeof *T);
    if (!T) return KVS_ERR_NOMEM;
    XXH3_state_t *st = XXH3_createState();
    if (!st) {
        free(T);
        return KVS_ERR_NOMEM;
    }
    XXH3_64bits_reset(st);
    uint32_t v = CONN_VERSION;
    uint64_t nt = n_tensors;
    XXH3_64bits_update(st, &v, sizeof v);
    XXH3_64bits_update(st, &nt, sizeof nt);
    uint64_t off = CONN_HDR_BYTES;
    int rc = KVS_OK;
    for (size_t i = 0; i < n_tensors; i++) {
        const kvs_tensor_layout *L = &tensors[i];
        if (!L->base || !L->chunk_bytes || !L->count || L->chunk_bytes > CONN_MAX_BLOCK_BYTES ||
            L->count > CONN_MAX_BLOCK_BYTES || (L->count > 1 && L->chunk_stride < L->chunk_bytes)) {
            rc = KVS_ERR_INVALID;
            break;
        }
        /* The fingerprint covers what defines the object's bytes: per tensor,
         * chunk size and count, never addresses or strides. */
        uint64_t geo[2] = {L->chunk_bytes, L->count};
        XXH3_64bits_update(st, geo, sizeof geo);
        uint64_t bytes = L->chunk_bytes * L->count;
        if (bytes > CONN_MAX_BLOCK_BYTES || off + bytes > CONN_MAX_BLOCK_BYTES) {
            rc = KVS_ERR_TOO_LARGE;
            break;
        }
        T[i].base = L->base;
        T[i].block_stride = L->block_stride;
        T[i].payload_off = off;
        if (L->count == 1 || L->chunk_stride == L->chunk_bytes) { /* contiguous: one chunk */
            T[i].chunk_bytes = bytes;
            T[i].chunk_stride = bytes;
            T[i].count = 1;
        } else {
            T[i].chunk_bytes = L->chunk_bytes;
            T[i].chunk_stride = L->chunk_stride;
            T[i].count = L->count;
        }
        off += bytes;
    }
    uint64_t fp = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    if (rc != KVS_OK) {
        free(T);
        return rc;
    }
    if (conn_enter(c) != KVS_OK) {
        free(T);
        return KVS_ERR_CLOSED;
    }
    pthread_mutex_lock(&c->mu);
    if (c->have_layout) {
        pthread_mutex_unlock(&c->mu);
        conn_leave(c);
        free(T);
        return KVS_ERR_INVALID;
    }
    c->T = T;
    c->nt = n_tensors;
    c->num_blocks = num_blocks;
    c->payload_bytes = off - CONN_HDR_BYTES;
    c->block_bytes = off;
    c->layout_fp = fp ? fp : 1;
    uint64_t job_bytes = CONN_JOB_BYTES;
    const char *env = getenv("KVSHELF_CONNECTOR_JOB_MB");
    if (env && atoi(env) > 0) job_bytes = (uint64_t)atoi(env) << 20;
    uint64_t jb = job_bytes / c->block_bytes;
    if (jb > CONN_JOB_MAX_BLOCKS) jb = CONN_JOB_MAX_BLOCKS;
    if (jb > c->max_inflight) jb = c->max_inflight; /* a job always fits the queue */
    c->job_blocks = (uint32_t)(jb < 1 ? 1 : jb);
#ifdef KVS_HAVE_CUDA
    if (c->backend == BK_CUDA) {
        kvs_cuda_tensor *ct = calloc(n_tensors, sizeof *ct);
        rc = ct ? KVS_OK : KVS_ERR_NOMEM;
        for (size_t i = 0; ct && i < n_tensors; i++)
            ct[i] = (kvs_cuda_tensor){T[i].base,        T[i].block_stride, T[i].chunk_bytes,
                                      T[i].chunk_stride, T[i].payload_off,  T[i].count};
        if (ct) rc = kvs_cuda_ctx_set_layout(c->cx, ct, n_tensors, CONN_STAMP_OFF);
        free(ct);
        if (rc == KVS_OK) {
            c->backend_name = kvs_cuda_mode_name(kvs_cuda_ctx_mode(c->cx));
            kvs_cuda_preregister(c->cx); /* pin the pool now, not in the first dump */
        }
        if (rc != KVS_OK) {
            c->T = NULL;
            pthread_mutex_unlock(&c->mu);
            conn_leave(c);
            free(T);
            return rc;
        }
    }
#endif
    c->have_layout = 1;
    pthread_mutex_unlock(&c->mu);
    conn_leave(c);
    return KVS_OK;
}

uint64_t kvs_connector_block_bytes(const kvs_connector *c)
{
    return c && c->have_layout ? c->block_bytes : 0;
}

uint64_t kvs_connector_layout_fingerprint(const kvs_connector *c)
{
    return c && c->have_layout ? c->layout_fp : 0;
}

/* --------------------------------------------------------------- lookup */

int kvs_connector_lookup(kvs_connector *c, const kvs_key *hashes, size_t n, uint8_t *hit)
{
    if (!c || (n && (!hashes || !hit))) return KVS_ERR_INVALID;
    if (!n) return KVS_OK;
    for (size_t i = 0; i < n; i++)
        if (!conn_valid_hash(&hashes[i])) return KVS_ERR_INVALID;
    uint32_t nr = c->device == -1 ? c->world : 1;
    if (n > SIZE_MAX / nr / CONN_KEY_MAX) return KVS_ERR_INVALID;
    size_t nk = n * nr;
    kvs_key *keys = malloc(nk * sizeof *keys);
    uint8_t *mem = malloc(nk * CONN_KEY_MAX);
    uint8_t *found = malloc(nk);
    int rc = keys && mem && found ? KVS_OK : KVS_ERR_NOMEM;
    if (rc == KVS_OK) rc = conn_enter(c);
    if (rc == KVS_OK) {
        uint8_t *p = mem;
        for (uint32_t r = 0; r < nr; r++)
            for (size_t i = 0; i < n; i++) {
                memcpy(p, c->prefixes[r], KVS_CONNECTOR_PREFIX_BYTES);
                memcpy(p + KVS_CONNECTOR_PREFIX_BYTES, hashes[i].data, hashes[i].len);
                keys[r * n + i] = (kvs_key){p, KVS_CONNECTOR_PREFIX_BYTES + hashes[i].len};
                p += keys[r * n + i].len;
            }
        rc = kvs_exists_batch(c->cl, keys, nk, found);
        conn_leave(c);
        if (rc >= 0) {
            rc = KVS_OK;
            for (size_t i = 0; i < n; i++) {
                uint8_t h = 1;
                for (uint32_t r = 0; r < nr; r++) h &= found[r * n + i] ? 1 : 0;
                hit[i] = h;
            }
        }
    }
    free(keys);
    free(mem);
    free(found);
    return rc;
}

int kvs_connector_lookup_prefix(kvs_connector *c, const kvs_key *hashes, size_t n)
{
    if (!c || (n && !hashes) || n > INT32_MAX) return KVS_ERR_INVALID;
    if (!n) return 0;
    uint8_t *hit = malloc(n);
    if (!hit) return KVS_ERR_NOMEM;
    int rc = kvs_connector_lookup(c, hashes, n, hit);
    if (rc == KVS_OK) {
        size_t k = 0;
        while (k < n && hit[k]) k++;
        rc = (int)k;
    }
    free(hit);
    return rc;
}

/* ------------------------------------------------------------ dump/load */

static int start_task(kvs_connector *c, int kind, const kvs_key *hashes,
                      const uint32_t *block_ids, size_t n, void *after_event, kvs_task **task)
{
    if (!c || !task || (n && (!hashes || !block_ids))) return KVS_ERR_INVALID;
    *task = NULL;
    if (c->device == -1) return KVS_ERR_UNSUPPORTED;
    if (!c->have_layout) return KVS_ERR_LAYOUT;
    if (after_event && c->backend != BK_CUDA) return KVS_ERR_INVALID;
    for (size_t i = 0; i < n; i++) {
        if (!conn_valid_hash(&hashes[i])) return KVS_ERR_INVALID;
        if (block_ids[i] >= c->num_blocks) return KVS_ERR_LAYOUT;
    }
    int rc = conn_enter(c);
    if (rc != KVS_OK) return rc;
    kvs_task *t = conn_task_new(c, kind, hashes, block_ids, n, c->job_blocks, 0);
    if (!t) {
        conn_leave(c);
        return KVS_ERR_NOMEM;
    }
#ifdef KVS_HAVE_CUDA
    if (after_event && t->njobs) {
        rc = kvs_cuda_event_snapshot(c->cx, after_event, &t->event);
        if (rc != KVS_OK) {
            /* nothing started: finish the jobs unqueued and drop the task */
            for (size_t k = 0; k < t->njobs; k++) conn_job_finish(&t->jobs[k]);
            kvs_task_free(t);
            conn_leave(c);
            return rc;
        }
    }
#endif
    conn_task_submit(c, t);
    conn_leave(c);
    *task = t;
    return KVS_OK;
}

int kvs_connector_dump(kvs_connector *c, const kvs_key *hashes, const uint32_t *block_ids,
                       size_t n, void *after_event, kvs_task **task)
{
    return start_task(c, TASK_DUMP, hashes, block_ids, n, after_event, task);
}

int kvs_connector_load(kvs_connector *c, const kvs_key *hashes, const uint32_t *block_ids,
                       size_t n, kvs_task **task)
{
    return start_task(c, TASK_LOAD, hashes, block_ids, n, NULL, task);
}

/* ----------------------------------------------------------------- misc */

void kvs_connector_get_counters(kvs_connector *c, kvs_connector_counters *out)
{
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!c) return;
    out->dumped_blocks = atomic_load(&c->n_dumped);
    out->loaded_blocks = atomic_load(&c->n_loaded);
    out->missed_blocks = atomic_load(&c->n_missed);
    out->failed_blocks = atomic_load(&c->n_failed);
    out->dropped_blocks = atomic_load(&c->n_dropped);
    out->skipped_blocks = atomic_load(&c->n_skipped);
    out->bytes_dumped = atomic_load(&c->n_bytes_dumped);
    out->bytes_loaded = atomic_load(&c->n_bytes_loaded);
}

const char *kvs_connector_backend(const kvs_connector *c)
{
    return c ? c->backend_name : "none";
}

kvs_client *kvs_connector_client(kvs_connector *c) { return c ? c->cl : NULL; }
