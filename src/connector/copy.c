/* KV connector: a worker's copy state — its CUDA workers, direct (mapped
 * slot) or staged memory for a job's objects, and the dispatch of a job's
 * copies to the CUDA backends (src/cuda/) or the host backend (host_copy.c). */
#include <stdint.h>
#include <stdlib.h>

#include "common/log.h"
#include "connector/conn_internal.h"

void conn_worker_init(conn_worker *w)
{
#ifdef KVS_HAVE_CUDA
    kvs_connector *c = w->c;
    if (c->backend == BK_CUDA) {
        kvs_cuda_worker *cw = NULL;
        if (kvs_cuda_worker_create(c->cx, &cw) == KVS_OK)
            w->cw = cw;
        else
            KVS_LOGE("connector: cannot set up a CUDA worker; its copies will fail");
    }
#else
    (void)w;
#endif
}

static void staging_free(conn_worker *w)
{
    if (!w->staging) return;
#ifdef KVS_HAVE_CUDA
    if (w->c->backend == BK_CUDA)
        kvs_cuda_pinned_free(w->staging);
    else
#endif
        free(w->staging);
    w->staging = NULL;
    w->staging_cap = 0;
}

void conn_worker_exit(conn_worker *w)
{
#ifdef KVS_HAVE_CUDA
    if (w->pcw) kvs_cuda_pworker_destroy(w->pcw);
    if (w->cw) kvs_cuda_worker_destroy(w->cw);
#endif
    w->pcw = NULL;
    w->cw = NULL;
    staging_free(w);
}

int conn_direct_ok(const kvs_connector *c, const kvs_task *t, const kvs_slot *s, uint64_t len)
{
    if (!s->ptr || c->force_staging) return 0;
    if (t->parts && ((uintptr_t)s->ptr & 7)) return 0; /* parts objects pack unaligned */
#ifdef KVS_HAVE_CUDA
    if (c->backend == BK_CUDA) return kvs_cuda_can_map(c->cx, s->ptr, len);
#else
    (void)len;
#endif
    return 1;
}

/* Staging of at least `need` bytes (kept and grown per worker; pinned for CUDA). */
static uint8_t *staging(conn_worker *w, size_t need)
{
    if (need <= w->staging_cap) return w->staging;
    size_t cap = (need + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1);
    if (cap < 2 * w->staging_cap) cap = 2 * w->staging_cap;
    staging_free(w);
#ifdef KVS_HAVE_CUDA
    if (w->c->backend == BK_CUDA)
        w->staging = kvs_cuda_pinned_alloc(cap);
    else
#endif
        w->staging = aligned_alloc(4096, cap);
    if (w->staging) w->staging_cap = cap;
    return w->staging;
}

/* objects 64-byte aligned: the header's 8-byte words and 16-byte vectors */
static size_t align64(uint64_t v) { return (size_t)((v + 63) & ~(uint64_t)63); }

void conn_assign_staging(conn_worker *w, const kvs_task *t, size_t n, int *res)
{
    size_t need = 0;
    for (size_t i = 0; i < n; i++)
        if (w->staged[i]) need += align64(w->sizes[i]);
    /* a block job takes room for a whole job at once: a layout's jobs never grow it */
    if (need && !t->parts) need = (size_t)w->c->job_blocks * align64(w->c->block_bytes);
    uint8_t *base = need ? staging(w, need) : NULL;
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

int conn_copy(conn_worker *w, int dir, const kvs_task *t, size_t start, size_t n)
{
    const size_t ppo = t->ppo;
    const uint64_t *addrs = t->parts ? t->paddrs + start * ppo : NULL;
    const uint64_t *lens = t->parts ? t->plens + start * ppo : NULL;
#ifdef KVS_HAVE_CUDA
    kvs_connector *c = w->c;
    if (c->backend == BK_CUDA) {
        int cdir = dir == TASK_DUMP ? KVS_CUDA_DUMP : KVS_CUDA_LOAD;
        void *event = dir == TASK_DUMP ? t->event : NULL;
        if (!t->parts) {
            if (!w->cw) return KVS_ERR_CUDA;
            return kvs_cuda_copy(w->cw, cdir, n, w->obj, t->bids + start, w->ok, w->gen, w->got,
                                 event);
        }
        if (!w->pcw) {
            kvs_cuda_pworker *pw = NULL;
            if (kvs_cuda_pworker_create(c->cx, c->device, &pw) != KVS_OK) return KVS_ERR_CUDA;
            w->pcw = pw;
        }
        return kvs_cuda_copy_parts(w->pcw, cdir, n, w->obj, addrs, lens, ppo, CONN_HDR_BYTES,
                                   CONN_STAMP_OFF, w->ok, w->gen, w->got, event);
    }
#endif
    if (t->parts)
        conn_host_copy_parts(w, dir, addrs, lens, ppo, n);
    else
        conn_host_copy_blocks(w, dir, t->bids + start, n);
    return KVS_OK;
}

void conn_copy_forget(conn_worker *w, size_t i)
{
#ifdef KVS_HAVE_CUDA
    kvs_connector *c = w->c;
    if (c->backend == BK_CUDA && !w->staged[i]) kvs_cuda_forget(c->cx, w->obj[i]);
#else
    (void)w;
    (void)i;
#endif
}

void conn_fail_live(conn_worker *w, size_t n, int *res, int status)
{
    for (size_t i = 0; i < n; i++)
        if (w->ok[i]) {
            w->ok[i] = 0;
            res[i] = status;
        }
}
