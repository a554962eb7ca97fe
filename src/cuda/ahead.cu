/* Read-ahead of striped loads (see kvs_cuda.h, "read-ahead").
 *
 * UCM's layerwise mode asks for layer L+1 of a step's blocks only after layer
 * L's load has been waited for, so the copy engines idle for the whole
 * return path of every layer (call, hand-off, synchronisation, checks:
 * ~250 us against a 650 us copy of 8k tokens' layer on an H200). A parts
 * worker that loads stripe s of open objects therefore also starts copying
 * a window of the next stripes of the same objects (KVSHELF_READAHEAD_DEPTH
 * of them, one contiguous range per object: see ra_claim in
 * src/connector/stripes.c for why windows), host -> device, on one stream
 * (KVSHELF_READAHEAD_STREAMS), into a buffer carved from its context's
 * arena; the jobs that later load those stripes scatter them from there
 * into the destinations (known only then) with one kernel on the GPU
 * (device to device: tens of microseconds), while the copy engines already
 * move the next window.
 *
 * Arena: one per context, KVSHELF_READAHEAD_MB of device memory taken with
 * cudaMallocAsync on its first use (no device-wide synchronisation, which a
 * closed GPU gate would hold: see the gates in kvs_cuda.h) and kept until the
 * context goes. Buffers are first-fit ranges of it; a buffer that does not
 * fit is not started (the next job copies from host memory as before).
 *
 * Each buffer is laid out per object as [view-check word | pad][stripe],
 * RA_ALIGN-aligned: the word is the object's stamp as the GPU read it right
 * after the stripe's copy (the same check every load makes), handed to the
 * consuming job's out_gen by the scatter kernel. */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "cuda/ahead.cuh"
#include "cuda/kvs_cuda.h"
#include "cuda/res.cuh"
#include "kvshelf/errors.h"

#define RA_ALIGN 256u
#define RA_MAX_FREE 1024

struct kc_range {
    uint64_t off, len;
};

struct kc_arena {
    pthread_mutex_t mu;
    int device;
    uint64_t size;
    char *base; /* device memory, NULL until the first buffer */
    int failed; /* the memory could not be had: read-ahead is off */
    /* KVSHELF_READAHEAD_TRACE=1: sums over the buffers, printed at the end */
    uint64_t tr_n, tr_copy_ns, tr_wait_ns, tr_nused;
    /* host time inside kc_ahead_start: all of it, creating events, the
     * batch copy call, the stamp kernel and event records */
    uint64_t tr_nstart, tr_start_ns, tr_ev_ns, tr_batch_ns, tr_rec_ns;
    /* KVSHELF_READAHEAD_TRACE_FILE: one line per buffer, times relative to
     * ref (recorded on the GPU when the memory came, host time ref_ns) */
    cudaEvent_t ref;
    uint64_t ref_ns;
    struct ra_trace_line *tl;
    size_t ntl, captl;
    size_t nfree;
    struct kc_range fr[RA_MAX_FREE]; /* free ranges, sorted, coalesced */
};

/* One buffer in the trace file: host times (us after the arena's
 * reference) of its enqueue and first use, GPU times of its copies' start
 * and end and of the end of the first scatter from it; -1: unknown. */
struct ra_trace_line {
    double enq, use, gstart, gend, gused;
    uint64_t bytes;
};

struct kvs_cuda_ahead {
    struct kc_arena *ar;
    uint64_t off, len; /* range of the arena */
    /* recorded on each stream after its copies (stream 0: and the stamp
     * reads) */
    cudaEvent_t done[KVS_CUDA_RES_MAX_STREAMS];
    int ndone;
    int refs;
    /* tracing: recorded on stream 0 before the copies (timing on), the
     * host time of the enqueue and of the first use */
    cudaEvent_t t0, used;
    uint64_t enq_ns, use_ns;
};

/* KVSHELF_READAHEAD_TRACE=1: per buffer, how long its copies ran on the GPU
 * (from stream 0 reaching them to the last stream's event) and how long
 * after its enqueue a job came to load from it; means printed when the
 * arena goes (for tuning read-ahead without a timeline profiler). */
static int ra_trace(void)
{
    static int t = -1;
    if (t < 0) {
        const char *v = getenv("KVSHELF_READAHEAD_TRACE");
        t = v && *v == '1';
    }
    return t;
}

/* Waits until b's copies are done. */
static cudaError_t ahead_wait(const kvs_cuda_ahead *b)
{
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < b->ndone; i++) {
        cudaError_t x = cudaEventSynchronize(b->done[i]);
        if (e == cudaSuccess) e = x;
    }
    return e;
}

static void ahead_free_events(kvs_cuda_ahead *b)
{
    if (b->t0) cudaEventDestroy(b->t0);
    if (b->used) cudaEventDestroy(b->used);
    b->t0 = b->used = NULL;
    for (int i = 0; i < b->ndone; i++) cudaEventDestroy(b->done[i]);
    b->ndone = 0;
}

/* ------------------------------------------------------------- arena */

struct kc_arena *kc_arena_new(int device, uint64_t bytes)
{
    struct kc_arena *a = (struct kc_arena *)calloc(1, sizeof *a);
    if (!a) return NULL;
    pthread_mutex_init(&a->mu, NULL);
    a->device = device;
    a->size = bytes / RA_ALIGN * RA_ALIGN;
    return a;
}

void kc_arena_destroy(struct kc_arena *a)
{
    if (!a) return;
    if (a->tr_n)
        fprintf(stderr,
                "kvshelf read-ahead trace: %llu buffers, copies %.1f us each on the GPU; "
                "%llu used, %.1f us after their enqueue\n",
                (unsigned long long)a->tr_n, a->tr_copy_ns / 1e3 / a->tr_n,
                (unsigned long long)a->tr_nused,
                a->tr_nused ? a->tr_wait_ns / 1e3 / a->tr_nused : 0.0);
    if (a->tr_nstart)
        fprintf(stderr,
                "kvshelf read-ahead trace: starting a buffer took %.1f us on the host (events "
                "%.1f, batch copy call %.1f, stamp kernel and records %.1f)\n",
                a->tr_start_ns / 1e3 / a->tr_nstart, a->tr_ev_ns / 1e3 / a->tr_nstart,
                a->tr_batch_ns / 1e3 / a->tr_nstart, a->tr_rec_ns / 1e3 / a->tr_nstart);
    const char *tf = getenv("KVSHELF_READAHEAD_TRACE_FILE");
    FILE *f = a->ntl && tf && *tf ? fopen(tf, "a") : NULL;
    if (f) {
        fprintf(f, "# kvshelf read-ahead buffers, us after the arena's first use (CLOCK_MONOTONIC "
                   "%llu ns): enqueued used gpu_start gpu_end gpu_scattered bytes\n",
                (unsigned long long)a->ref_ns);
        for (size_t i = 0; i < a->ntl; i++) {
            const struct ra_trace_line *l = &a->tl[i];
            fprintf(f, "%.1f %.1f %.1f %.1f %.1f %llu\n", l->enq, l->use, l->gstart, l->gend,
                    l->gused, (unsigned long long)l->bytes);
        }
        fclose(f);
    }
    free(a->tl);
    if (a->ref) cudaEventDestroy(a->ref);
    if (a->base) {
        int prev = -1;
        cudaGetDevice(&prev);
        cudaSetDevice(a->device);
        kvs_cuda_gates_force_open(); /* a closed gate would hold the stream below */
        cudaFreeAsync(a->base, 0);
        cudaStreamSynchronize(0);
        if (prev >= 0) cudaSetDevice(prev);
        cudaGetLastError();
    }
    pthread_mutex_destroy(&a->mu);
    free(a);
}

/* The arena's memory, taken on stream s at first use; 0 when unavailable. */
static int arena_ready(struct kc_arena *a, cudaStream_t s)
{
    if (a->base) return 1;
    if (a->failed || !a->size) return 0;
    void *p = NULL;
    cudaError_t e = cudaMallocAsync(&p, a->size, s);
    if (e == cudaSuccess) e = cudaStreamSynchronize(s);
    if (e != cudaSuccess) {
        cudaGetLastError();
        a->failed = 1;
        fprintf(stderr,
                "kvshelf: no device memory for the read-ahead of striped loads (%llu MiB: "
                "KVSHELF_READAHEAD_MB): %s; layerwise loads copy without it\n",
                (unsigned long long)(a->size >> 20), cudaGetErrorString(e));
        return 0;
    }
    if (ra_trace() && cudaEventCreate(&a->ref) == cudaSuccess &&
        cudaEventRecord(a->ref, s) == cudaSuccess && cudaEventSynchronize(a->ref) == cudaSuccess)
        a->ref_ns = kvs_now_ns();
    cudaGetLastError();
    a->base = (char *)p;
    a->nfree = 1;
    a->fr[0].off = 0;
    a->fr[0].len = a->size;
    return 1;
}

/* First fit; UINT64_MAX when no free range is long enough. Under a->mu. */
static uint64_t arena_take(struct kc_arena *a, uint64_t len)
{
    for (size_t i = 0; i < a->nfree; i++) {
        if (a->fr[i].len < len) continue;
        uint64_t off = a->fr[i].off;
        a->fr[i].off += len;
        a->fr[i].len -= len;
        if (!a->fr[i].len) {
            memmove(&a->fr[i], &a->fr[i + 1], (a->nfree - i - 1) * sizeof a->fr[0]);
            a->nfree--;
        }
        return off;
    }
    return UINT64_MAX;
}

/* Gives [off, off+len) back, merged with its neighbours. Under a->mu. */
static void arena_give(struct kc_arena *a, uint64_t off, uint64_t len)
{
    size_t i = 0;
    while (i < a->nfree && a->fr[i].off < off) i++;
    int left = i > 0 && a->fr[i - 1].off + a->fr[i - 1].len == off;
    int right = i < a->nfree && off + len == a->fr[i].off;
    if (left && right) {
        a->fr[i - 1].len += len + a->fr[i].len;
        memmove(&a->fr[i], &a->fr[i + 1], (a->nfree - i - 1) * sizeof a->fr[0]);
        a->nfree--;
    } else if (left) {
        a->fr[i - 1].len += len;
    } else if (right) {
        a->fr[i].off = off;
        a->fr[i].len += len;
    } else if (a->nfree < RA_MAX_FREE) {
        memmove(&a->fr[i + 1], &a->fr[i], (a->nfree - i) * sizeof a->fr[0]);
        a->fr[i].off = off;
        a->fr[i].len = len;
        a->nfree++;
    }
    /* else: more fragments than the table holds (not reached with buffers of
     * one job each); the range stays out of use until the arena goes */
}

/* ------------------------------------------------------------ buffers */

void kvs_cuda_ahead_ref(kvs_cuda_ahead *b)
{
    if (b) __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED);
}

void kvs_cuda_ahead_unref(kvs_cuda_ahead *b)
{
    if (!b || __atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL)) return;
    /* the copies may still run (a buffer nobody loaded from): its memory
     * and the objects it reads stay untouched until they are done */
    ahead_wait(b);
    float ms = 0, m;
    struct ra_trace_line tl = {-1, -1, -1, -1, -1, b->len};
    if (b->t0) {
        for (int i = 0; i < b->ndone; i++)
            if (cudaEventElapsedTime(&m, b->t0, b->done[i]) == cudaSuccess && m > ms) ms = m;
        struct kc_arena *a = b->ar;
        if (a->ref_ns) {
            tl.enq = (double)(int64_t)(b->enq_ns - a->ref_ns) / 1e3;
            if (b->use_ns) tl.use = (double)(int64_t)(b->use_ns - a->ref_ns) / 1e3;
            if (cudaEventElapsedTime(&m, a->ref, b->t0) == cudaSuccess) {
                tl.gstart = m * 1e3;
                tl.gend = tl.gstart + ms * 1e3;
            }
            if (b->used && cudaEventSynchronize(b->used) == cudaSuccess &&
                cudaEventElapsedTime(&m, a->ref, b->used) == cudaSuccess)
                tl.gused = m * 1e3;
        }
    }
    ahead_free_events(b);
    cudaGetLastError();
    pthread_mutex_lock(&b->ar->mu);
    if (b->ar->ref_ns && tl.enq >= 0) {
        struct kc_arena *a = b->ar;
        if (a->ntl == a->captl && a->captl < (1u << 20)) {
            size_t nc = a->captl ? a->captl * 2 : 4096;
            struct ra_trace_line *nt = (struct ra_trace_line *)realloc(a->tl, nc * sizeof *nt);
            if (nt) {
                a->tl = nt;
                a->captl = nc;
            }
        }
        if (a->ntl < a->captl) a->tl[a->ntl++] = tl;
    }
    if (b->enq_ns) {
        b->ar->tr_n++;
        b->ar->tr_copy_ns += (uint64_t)(ms * 1e6);
        if (b->use_ns) {
            b->ar->tr_nused++;
            b->ar->tr_wait_ns += b->use_ns - b->enq_ns;
        }
    }
    arena_give(b->ar, b->off, b->len);
    pthread_mutex_unlock(&b->ar->mu);
    free(b);
}

/* The stamp reads of a buffer: word i of object i (src 0: skip). */
struct ra_stamps {
    uint64_t src[KVS_CUDA_MAX_JOB_BLOCKS]; /* GPU address of the object's stamp */
    uint64_t dst[KVS_CUDA_MAX_JOB_BLOCKS]; /* its word in the buffer */
    uint32_t n;
};

__global__ void ra_stamp_kernel(const __grid_constant__ ra_stamps j)
{
    for (uint32_t i = threadIdx.x; i < j.n; i += blockDim.x)
        if (j.src[i]) *(uint64_t *)j.dst[i] = *(volatile const uint64_t *)j.src[i];
}

int kc_ahead_start(kvs_cuda_ctx *x, kvs_cuda_res *pf, uint64_t budget,
                   size_t n, const uint8_t *want, void *const *src, const uint64_t *dobj,
                   uint64_t stamp_off, const uint64_t *len, uint64_t *off_out,
                   kvs_cuda_ahead **out)
{
    *out = NULL;
    for (size_t i = 0; i < n; i++) off_out[i] = UINT64_MAX;
    if (n > KVS_CUDA_MAX_JOB_BLOCKS || !budget) return KVS_ERR_INVALID;
    const uint64_t h0 = ra_trace() ? kvs_now_ns() : 0;
    uint64_t h1 = 0, h2 = 0, h3 = 0;
    uint64_t total = 0;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (!want[i] || !dobj[i] || !len[i]) continue;
        total += RA_ALIGN + (len[i] + RA_ALIGN - 1) / RA_ALIGN * RA_ALIGN;
        m++;
    }
    if (!m) return KVS_ERR_INVALID;
    struct kc_arena *a = kc_ctx_arena(x, budget);
    if (!a) return KVS_ERR_NOMEM;
    pthread_mutex_lock(&a->mu);
    uint64_t off = arena_ready(a, pf->streams[0]) ? arena_take(a, total) : UINT64_MAX;
    pthread_mutex_unlock(&a->mu);
    if (off == UINT64_MAX) return KVS_ERR_NO_SPACE;
    kvs_cuda_ahead *b = (kvs_cuda_ahead *)calloc(1, sizeof *b);
    ra_stamps *st = (ra_stamps *)calloc(1, sizeof *st);
    int rc = KVS_ERR_NOMEM;
    if (!b || !st || kvs_cuda_res_reserve(pf, m) != KVS_OK) goto fail;
    b->ar = a;
    b->off = off;
    b->len = total;
    b->refs = 1;
    rc = KVS_ERR_CUDA;
    if (ra_trace()) {
        if (cudaEventCreate(&b->t0) != cudaSuccess || cudaEventRecord(b->t0, pf->streams[0]) != cudaSuccess) {
            cudaGetLastError();
            goto fail;
        }
        b->enq_ns = kvs_now_ns();
    }
    if (h0) h1 = kvs_now_ns();
    for (int si = 0; si < pf->nstreams; si++) {
        if (cudaEventCreateWithFlags(&b->done[si], b->t0 ? 0 : cudaEventDisableTiming) != cudaSuccess) {
            cudaGetLastError();
            goto fail;
        }
        b->ndone++;
    }
    {
        char *base = a->base + off;
        uint64_t cur = 0;
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            if (!want[i] || !dobj[i] || !len[i]) continue;
            st->src[i] = dobj[i] + stamp_off;
            st->dst[i] = (uint64_t)(uintptr_t)(base + cur);
            cur += RA_ALIGN;
            off_out[i] = cur;
            pf->dsts[k] = base + cur;
            pf->srcs[k] = src[i];
            pf->sizes[k] = (size_t)len[i];
            k++;
            cur += (len[i] + RA_ALIGN - 1) / RA_ALIGN * RA_ALIGN;
        }
        st->n = (uint32_t)n;
        if (h0) h2 = kvs_now_ns();
        cudaError_t e = kvs_cuda_res_batch_copy(pf, k);
        if (h0) h3 = kvs_now_ns();
        if (e == cudaSuccess) {
            ra_stamp_kernel<<<1, 128, 0, pf->streams[0]>>>(*st);
            e = cudaGetLastError();
        }
        for (int si = 0; si < pf->nstreams && e == cudaSuccess; si++)
            e = cudaEventRecord(b->done[si], pf->streams[si]);
        if (e != cudaSuccess) {
            /* what was enqueued finishes before the memory is reused */
            for (int si = 0; si < pf->nstreams; si++) cudaStreamSynchronize(pf->streams[si]);
            cudaGetLastError();
            goto fail;
        }
    }
    free(st);
    *out = b;
    if (h0) {
        uint64_t h4 = kvs_now_ns();
        pthread_mutex_lock(&a->mu);
        a->tr_nstart++;
        a->tr_start_ns += h4 - h0;
        a->tr_ev_ns += h2 - h1;
        a->tr_batch_ns += h3 - h2;
        a->tr_rec_ns += h4 - h3;
        pthread_mutex_unlock(&a->mu);
    }
    return KVS_OK;
fail:
    for (size_t i = 0; i < n; i++) off_out[i] = UINT64_MAX;
    if (b) ahead_free_events(b);
    free(b);
    free(st);
    pthread_mutex_lock(&a->mu);
    arena_give(a, off, total);
    pthread_mutex_unlock(&a->mu);
    return rc;
}

/* ------------------------------------------------------------ scatter */

#define RA_SCATTER_PARTS KC_AHEAD_MAX_PPO

struct ra_scatter {
    uint64_t src[RA_SCATTER_PARTS], dst[RA_SCATTER_PARTS], len[RA_SCATTER_PARTS];
    uint64_t gsrc[KVS_CUDA_MAX_JOB_BLOCKS]; /* view-check words to hand back (0: none) */
    uint64_t *out_gen;
    uint32_t nparts, ngen;
};

/* Block b copies part b; block 0 also hands back the view-check words. */
__global__ void ra_scatter_kernel(const __grid_constant__ ra_scatter j)
{
    if (blockIdx.x == 0)
        for (uint32_t i = threadIdx.x; i < j.ngen; i += blockDim.x)
            if (j.gsrc[i]) j.out_gen[i] = *(const uint64_t *)j.gsrc[i];
    if (blockIdx.x >= j.nparts) return;
    const uint64_t s = j.src[blockIdx.x], d = j.dst[blockIdx.x], n = j.len[blockIdx.x];
    if (((s | d | n) & 15) == 0) {
        const uint4 *sp = (const uint4 *)s;
        uint4 *dp = (uint4 *)d;
        for (uint64_t i = threadIdx.x; i < n / 16; i += blockDim.x) dp[i] = sp[i];
    } else {
        const unsigned char *sp = (const unsigned char *)s;
        unsigned char *dp = (unsigned char *)d;
        for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) dp[i] = sp[i];
    }
}

cudaError_t kc_ahead_scatter(cudaStream_t s, size_t n, kvs_cuda_ahead *const *ra,
                             const uint64_t *ra_off, const uint64_t *ra_skip,
                             const uint64_t *addrs, const uint64_t *lens, size_t ppo,
                             uint64_t *out_gen_dev)
{
    ra_scatter *j = (ra_scatter *)calloc(1, sizeof *j);
    if (!j) return cudaErrorMemoryAllocation;
    cudaError_t e = cudaSuccess;
    const kvs_cuda_ahead *last = NULL;
    /* the stream waits, not the CPU: on an H200 (UCM layerwise, 8k tokens,
     * depth 1) a wait here on the CPU left the read-ahead no faster than
     * none (64% of the ceiling against 59%), a wait on the GPU did better
     * (77% against 63%; bench/RESULTS.md) */
    for (size_t i = 0; i < n && e == cudaSuccess; i++)
        if (ra[i] && ra[i] != last) {
            if (ra[i]->enq_ns && !ra[i]->use_ns) ra[i]->use_ns = kvs_now_ns();
            for (int q = 0; q < ra[i]->ndone && e == cudaSuccess; q++)
                e = cudaStreamWaitEvent(s, ra[i]->done[q], 0);
            last = ra[i];
        }
    j->out_gen = out_gen_dev;
    j->ngen = (uint32_t)n;
    for (size_t i = 0; i < n; i++)
        if (ra[i]) j->gsrc[i] = (uint64_t)(uintptr_t)(ra[i]->ar->base + ra[i]->off + ra_off[i] - RA_ALIGN);
    int gen_pending = 1;
    uint32_t np = 0;
    for (size_t i = 0; i <= n && e == cudaSuccess; i++) {
        /* flush when full, before an object that would not fit, and at the end */
        int end = i == n;
        if (end || (ra[i] && np + ppo > RA_SCATTER_PARTS)) {
            if (np || (end && gen_pending)) {
                j->nparts = np;
                ra_scatter_kernel<<<np ? np : 1, 256, 0, s>>>(*j);
                e = cudaGetLastError();
                if (gen_pending) { /* once */
                    gen_pending = 0;
                    j->ngen = 0;
                }
                np = 0;
            }
            if (end) break;
        }
        if (!ra[i]) continue;
        uint64_t src = (uint64_t)(uintptr_t)(ra[i]->ar->base + ra[i]->off + ra_off[i] + ra_skip[i]);
        for (size_t p = 0; p < ppo && np < RA_SCATTER_PARTS; p++) {
            uint64_t len = lens[i * ppo + p];
            if (!len) continue;
            j->src[np] = src;
            j->dst[np] = addrs[i * ppo + p];
            j->len[np] = len;
            np++;
            src += len;
        }
    }
    /* tracing: when the first scatter from each buffer ended on the GPU */
    last = NULL;
    for (size_t i = 0; i < n && e == cudaSuccess; i++)
        if (ra[i] && ra[i] != last) {
            last = ra[i];
            if (!ra[i]->t0 || __atomic_load_n(&ra[i]->used, __ATOMIC_ACQUIRE)) continue;
            cudaEvent_t ev = NULL, none = NULL;
            if (cudaEventCreate(&ev) == cudaSuccess && cudaEventRecord(ev, s) == cudaSuccess &&
                !__atomic_compare_exchange_n(&ra[i]->used, &none, ev, 0, __ATOMIC_ACQ_REL,
                                             __ATOMIC_ACQUIRE))
                cudaEventDestroy(ev); /* another job's scatter came first */
            cudaGetLastError();
        }
    free(j);
    return e;
}
