/* CUDA copies of objects given as explicit parts (kvs_connector_dump_parts /
 * load_parts, and the Python CudaCopier of the Mooncake store) between
 * device parts and the object's host memory (a registered segment mapping
 * or pinned staging), then one small kernel moves each object's view-check
 * word through the GPU's view of the object (see kvs_cuda.h).
 *
 * Two ways, chosen per copy as for block layouts (copy.cu): copy engines
 * (one cudaMemcpyBatchAsync per stream, host pointers through UVA) when the
 * mean part is at least KVSHELF_CUDA_BATCH_MIN_CHUNK (32 KiB), which UCM's
 * layer blocks of tens to hundreds of KiB are; else one gather/scatter
 * kernel over a list of (device, host, length) pieces, SMs copying through
 * the mapped host memory. Copy engines pay ~0.5-1 us per entry, so parts
 * of a few KiB (a vLLM layout with one chunk per KV head, 4 KiB at head dim
 * 128 and 16-token blocks) crawled at 2.2 GB/s through them on an H200
 * (bench/ttft.py --mode mooncake, 2026-12-04); the kernel copies them at
 * the rate of the block-layout kernel. A connector that forced a backend
 * (kvs_connector_opts.backend "kernel" / "batch") gets that one. */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "cuda/ahead.cuh"
#include "cuda/kcopy.cuh"
#include "cuda/kvs_cuda.h"
#include "cuda/res.cuh"
#include "kvshelf/errors.h"

/* KVSHELF_PARTS_TRACE_FILE: one line per parts copy (direction, objects,
 * copy entries, host times on CLOCK_MONOTONIC: called, copies enqueued,
 * done), appended to the file when a worker goes; for finding what bounds
 * small jobs (UCM's layerwise dumps) without a timeline profiler. */
struct kp_trace_line {
    uint64_t t0, t1, t2;
    uint32_t dir, n, k;
};
static pthread_mutex_t kp_trace_mu = PTHREAD_MUTEX_INITIALIZER;
static struct kp_trace_line *kp_trace;
static size_t kp_ntrace, kp_captrace;

static const char *kp_trace_file(void)
{
    static const char *f = (const char *)1;
    if (f == (const char *)1) {
        const char *v = getenv("KVSHELF_PARTS_TRACE_FILE");
        f = v && *v ? v : NULL;
    }
    return f;
}

static void kp_trace_add(int dir, size_t n, size_t k, uint64_t t0, uint64_t t1)
{
    struct kp_trace_line l = {t0, t1, kvs_now_ns(), (uint32_t)dir, (uint32_t)n, (uint32_t)k};
    pthread_mutex_lock(&kp_trace_mu);
    if (kp_ntrace == kp_captrace && kp_captrace < (1u << 22)) {
        size_t nc = kp_captrace ? kp_captrace * 2 : 4096;
        struct kp_trace_line *nt =
            (struct kp_trace_line *)realloc(kp_trace, nc * sizeof *nt);
        if (nt) {
            kp_trace = nt;
            kp_captrace = nc;
        }
    }
    if (kp_ntrace < kp_captrace) kp_trace[kp_ntrace++] = l;
    pthread_mutex_unlock(&kp_trace_mu);
}

static void kp_trace_flush(void)
{
    const char *path = kp_trace_file();
    pthread_mutex_lock(&kp_trace_mu);
    FILE *f = path && kp_ntrace ? fopen(path, "a") : NULL;
    if (f) {
        fprintf(f, "# kvshelf parts copies: dir(1 dump, 2 load) objects entries called_ns "
                   "enqueued_ns done_ns (CLOCK_MONOTONIC)\n");
        for (size_t i = 0; i < kp_ntrace; i++)
            fprintf(f, "%u %u %u %llu %llu %llu\n", kp_trace[i].dir, kp_trace[i].n, kp_trace[i].k,
                    (unsigned long long)kp_trace[i].t0, (unsigned long long)kp_trace[i].t1,
                    (unsigned long long)kp_trace[i].t2);
        fclose(f);
    }
    kp_ntrace = 0;
    pthread_mutex_unlock(&kp_trace_mu);
}

/* One piece of the kernel path: `len` (<= KC_PIECE) bytes between device
 * address `dev` and the GPU's address `host` of host bytes. */
struct kp_desc {
    uint64_t dev, host, len;
};

struct kvs_cuda_pworker {
    kvs_cuda_ctx *x;
    int device;
    kvs_cuda_res r;
    kvs_cuda_parts_cfg cfg;
    /* kernel path: the pieces, written here (host memory) and copied to
     * the device (stream-ordered allocation) before the kernel; grown on
     * demand, dcap pieces each; dfail: an allocation failed, copy engines */
    kp_desc *hdesc, *ddesc;
    size_t dcap;
    int dfail;
    /* read-ahead (ahead.cu): streams never waited for by a job, created on
     * first use */
    kvs_cuda_res pf;
    int pf_state; /* 0: not tried, 1: ready, -1: failed */
};

/* One job's view-check words, passed by value. obj[i] == 0: skip. */
struct kp_stamps {
    uint64_t obj[KVS_CUDA_MAX_JOB_BLOCKS]; /* device addresses of the objects */
    uint64_t gen[KVS_CUDA_MAX_JOB_BLOCKS];
    uint64_t *out_gen;
    uint64_t stamp_off;
    uint64_t check_off; /* dump: 0, or the word read back after the stamp */
    uint32_t n, dir;
};

__global__ void kp_stamp_kernel(const __grid_constant__ kp_stamps j)
{
    for (uint32_t i = threadIdx.x; i < j.n; i += blockDim.x) {
        if (!j.obj[i]) continue;
        volatile uint64_t *s = (volatile uint64_t *)(j.obj[i] + j.stamp_off);
        if (j.dir != KVS_CUDA_DUMP) {
            j.out_gen[i] = *s;
            continue;
        }
        *s = j.gen[i];
        if (j.check_off) j.out_gen[i] = *(volatile uint64_t *)(j.obj[i] + j.check_off);
    }
}

/* Copies pieces d[0..k) (device memory), dir as KVS_CUDA_DUMP / LOAD; one
 * CTA per piece at a time, as copy.cu's kc_kernel does per chunk piece. */
template <int U>
__global__ void kp_kernel(const kp_desc *__restrict__ d, uint64_t k, uint32_t dir)
{
    for (uint64_t u = blockIdx.x; u < k; u += gridDim.x) {
        char *dev = (char *)(uintptr_t)__ldg(&d[u].dev);
        char *host = (char *)(uintptr_t)__ldg(&d[u].host);
        const uint64_t len = __ldg(&d[u].len);
        if (dir == KVS_CUDA_DUMP)
            kc_copy<U>(host, dev, len);
        else
            kc_copy<U>(dev, host, len);
    }
}

/* Room for `need` pieces, grown without synchronizing the device (a GPU
 * gate of another task may be closed: a device-wide sync would have to open
 * it early): the host list is plain memory, the device list comes from
 * cudaMallocAsync on the worker's stream 0 (the old one freed behind the
 * work already queued there). KVS_OK, or KVS_ERR_NOMEM and the caller uses
 * copy engines (after one failure this worker stops asking). */
static int kp_desc_reserve(kvs_cuda_pworker *w, size_t need)
{
    if (need <= w->dcap) return KVS_OK;
    if (w->dfail) return KVS_ERR_NOMEM;
    size_t cap = w->dcap ? w->dcap : 4096;
    while (cap < need) cap *= 2;
    kp_desc *h = (kp_desc *)realloc(w->hdesc, cap * sizeof(kp_desc));
    if (h) w->hdesc = h;
    void *d = NULL;
    if (!h || cudaMallocAsync(&d, cap * sizeof(kp_desc), w->r.streams[0]) != cudaSuccess) {
        cudaGetLastError();
        w->dfail = 1;
        return KVS_ERR_NOMEM;
    }
    if (w->ddesc) cudaFreeAsync(w->ddesc, w->r.streams[0]);
    w->ddesc = (kp_desc *)d;
    w->dcap = cap;
    return KVS_OK;
}

static int kp_env_int(const char *name, int def, int lo, int hi)
{
    const char *s = getenv(name);
    if (!s || !*s) return def;
    int v = atoi(s);
    return v < lo ? lo : v > hi ? hi : v;
}

extern "C" int kvs_cuda_pworker_create(kvs_cuda_ctx *x, int device, kvs_cuda_pworker **out)
{
    if (!x || !out || device < 0) return KVS_ERR_INVALID;
    *out = NULL;
    if (cudaSetDevice(device) != cudaSuccess) {
        cudaGetLastError();
        return KVS_ERR_CUDA;
    }
    kvs_cuda_pworker *w = (kvs_cuda_pworker *)calloc(1, sizeof *w);
    if (!w) return KVS_ERR_NOMEM;
    w->x = x;
    w->device = device;
    int ns = kp_env_int("KVSHELF_CUDA_STREAMS", 4, 1, KVS_CUDA_RES_MAX_STREAMS);
    if (kvs_cuda_res_init(&w->r, ns) != KVS_OK) {
        free(w);
        return KVS_ERR_CUDA;
    }
    kvs_cuda_ctx_parts_cfg(x, &w->cfg);
    *out = w;
    return KVS_OK;
}

extern "C" void kvs_cuda_pworker_destroy(kvs_cuda_pworker *w)
{
    if (!w) return;
    if (kp_trace_file()) kp_trace_flush();
    if (w->ddesc) cudaFreeAsync(w->ddesc, w->r.streams[0]); /* before the stream goes */
    kvs_cuda_res_free(&w->r); /* waits for the streams, opens the gates */
    if (w->pf_state == 1) kvs_cuda_res_free(&w->pf);
    free(w->hdesc);
    free(w);
}

extern "C" int kvs_cuda_copy_parts(kvs_cuda_pworker *w, int dir, size_t n, void *const *obj,
                                   const uint64_t *addrs, const uint64_t *lens, size_t ppo,
                                   uint64_t payload_off, uint64_t stamp_off, const uint8_t *ok,
                                   const uint64_t *gen, uint64_t *out_gen, void *wait_event)
{
    return kvs_cuda_copy_parts_ex(w, dir, n, obj, NULL, NULL, addrs, lens, ppo, payload_off,
                                  stamp_off, 0, ok, gen, out_gen, wait_event);
}

/* The read-ahead streams of w, created on first use; 0 when unavailable. */
static int pf_ready(kvs_cuda_pworker *w)
{
    if (w->pf_state) return w->pf_state > 0;
    w->pf_state = -1;
    /* one stream: a window's copies are ranges of hundreds of KiB, and every
     * stream costs the enqueueing job a batch call and an event */
    if (kvs_cuda_res_init(&w->pf, kp_env_int("KVSHELF_READAHEAD_STREAMS", 1, 1,
                                             KVS_CUDA_RES_MAX_STREAMS)) != KVS_OK)
        return 0;
    w->pf_state = 1;
    return 1;
}

extern "C" int kvs_cuda_ahead_start(kvs_cuda_pworker *w, size_t n, const uint8_t *want,
                                    void *const *obj, const uint64_t *dobj, const uint64_t *off,
                                    const uint64_t *len, uint64_t stamp_off, uint64_t budget,
                                    kvs_cuda_ahead **out, uint64_t *off_out)
{
    *out = NULL;
    for (size_t i = 0; i < n; i++) off_out[i] = UINT64_MAX;
    if (!w || n > KVS_CUDA_MAX_JOB_BLOCKS || !budget) return KVS_ERR_INVALID;
    if (!pf_ready(w)) return KVS_ERR_CUDA;
    uint8_t ok[KVS_CUDA_MAX_JOB_BLOCKS];
    void *src[KVS_CUDA_MAX_JOB_BLOCKS];
    uint64_t dev[KVS_CUDA_MAX_JOB_BLOCKS];
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        ok[i] = 0;
        src[i] = NULL;
        dev[i] = 0;
        if (!want[i] || !obj[i] || !len[i]) continue;
        uint64_t end = off[i] + len[i];
        dev[i] = dobj && dobj[i] ? dobj[i]
                                 : kvs_cuda_translate(w->x, obj[i], end > stamp_off + 8 ? end : stamp_off + 8);
        if (!dev[i]) continue;
        src[i] = (char *)obj[i] + off[i];
        ok[i] = 1;
        m++;
    }
    if (!m) return KVS_ERR_INVALID;
    return kc_ahead_start(w->x, &w->pf, budget, n, ok, src, dev, stamp_off, len, off_out, out);
}

static int copy_parts(kvs_cuda_pworker *w, int dir, size_t n, void *const *obj,
                      const uint64_t *dobj, const uint64_t *poffs, const uint64_t *addrs,
                      const uint64_t *lens, size_t ppo, uint64_t payload_off, uint64_t stamp_off,
                      uint64_t check_off, const uint8_t *ok, const uint64_t *gen,
                      uint64_t *out_gen, void *wait_event, kvs_cuda_ahead *const *ra,
                      const uint64_t *ra_off, const uint64_t *ra_skip)
{
    if (!w || n > KVS_CUDA_MAX_JOB_BLOCKS || !obj || !addrs || !lens || !ppo ||
        (dir != KVS_CUDA_DUMP && dir != KVS_CUDA_LOAD))
        return KVS_ERR_INVALID;
    if (n > SIZE_MAX / ppo) return KVS_ERR_INVALID;
    const uint64_t tr0 = kp_trace_file() ? kvs_now_ns() : 0;
    uint64_t tr1 = 0;
    int kern = w->cfg.mode == KVS_CUDA_KERNEL;
    size_t pieces = 0;
    if (w->cfg.mode != KVS_CUDA_BATCH) {
        uint64_t bytes = 0, parts = 0;
        for (size_t q = 0; q < n * ppo; q++) {
            if (!lens[q]) continue;
            bytes += lens[q];
            parts++;
            pieces += (size_t)((lens[q] + KC_PIECE - 1) / KC_PIECE);
        }
        if (w->cfg.mode == KVS_CUDA_AUTO) kern = parts && bytes / parts < w->cfg.batch_min_chunk;
        if (kern && kp_desc_reserve(w, pieces ? pieces : 1) != KVS_OK) kern = 0; /* copy engines */
    }
    if (!kern && kvs_cuda_res_reserve(&w->r, n * ppo) != KVS_OK) return KVS_ERR_NOMEM;
    kp_stamps *j = (kp_stamps *)calloc(1, sizeof *j);
    if (!j) return KVS_ERR_NOMEM;
    const int from_ra = ra && ra_off && ra_skip && dir == KVS_CUDA_LOAD && ppo <= KC_AHEAD_MAX_PPO;
    cudaError_t e = cudaSuccess;
    size_t k = 0, live = 0, nstamp = 0;
    for (size_t i = 0; i < n; i++) {
        if (out_gen) out_gen[i] = 0;
        w->r.out_gen[i] = 0;
        if ((ok && !ok[i]) || !obj[i] || (uintptr_t)obj[i] % 8) continue;
        if (from_ra && ra[i]) {
            live++; /* scattered from its read-ahead buffer below */
            continue;
        }
        uint64_t poff = poffs ? poffs[i] : payload_off;
        uint64_t total = poff;
        for (size_t p = 0; p < ppo; p++) total += lens[i * ppo + p];
        if (total < stamp_off + 8) total = stamp_off + 8;
        j->obj[i] = dobj && dobj[i] ? dobj[i] : kvs_cuda_translate(w->x, obj[i], total);
        if (!j->obj[i]) continue; /* unreachable: its check word stays 0, the object fails */
        j->gen[i] = gen ? gen[i] : 0;
        live++;
        char *o = (char *)obj[i] + poff;
        uint64_t ho = j->obj[i] + poff; /* the GPU's address of o */
        nstamp++;
        for (size_t p = 0; p < ppo; p++) {
            char *dev = (char *)(uintptr_t)addrs[i * ppo + p];
            size_t len = (size_t)lens[i * ppo + p];
            if (!len) continue;
            if (kern) {
                for (size_t off = 0; off < len; off += KC_PIECE, k++) {
                    w->hdesc[k].dev = (uint64_t)(uintptr_t)dev + off;
                    w->hdesc[k].host = ho + off;
                    w->hdesc[k].len = len - off < KC_PIECE ? len - off : KC_PIECE;
                }
            } else {
                w->r.dsts[k] = dir == KVS_CUDA_DUMP ? (void *)o : (void *)dev;
                w->r.srcs[k] = dir == KVS_CUDA_DUMP ? (void *)dev : (void *)o;
                w->r.sizes[k] = len;
                k++;
            }
            o += len;
            ho += len;
        }
    }
    j->out_gen = w->r.out_gen_dev;
    j->stamp_off = stamp_off;
    j->check_off = dir == KVS_CUDA_DUMP ? check_off : 0;
    j->n = (uint32_t)n;
    j->dir = (uint32_t)dir;
    int rc = KVS_OK;
    /* streams given work (bit si), synchronised below: a job loading only
     * from read-ahead uses one (host calls are what bounds small jobs) */
    unsigned used = 0;
    if (live && nstamp && kern) {
        cudaStream_t st = w->r.streams[0];
        used |= 1u;
        /* the list first: a copy from pageable memory may wait for the
         * stream, which must not be waiting for the caller's event yet */
        if (k) e = cudaMemcpyAsync(w->ddesc, w->hdesc, k * sizeof(kp_desc), cudaMemcpyHostToDevice, st);
        if (e == cudaSuccess && wait_event) e = cudaStreamWaitEvent(st, (cudaEvent_t)wait_event, 0);
        if (e == cudaSuccess && k) {
            uint64_t grid = (uint64_t)w->cfg.sms * (uint64_t)w->cfg.per_sm;
            if (grid > k) grid = k;
            if (grid < 1) grid = 1;
            if (w->cfg.unroll == 8)
                kp_kernel<8><<<(unsigned)grid, (unsigned)w->cfg.threads, 0, st>>>(w->ddesc, k, (uint32_t)dir);
            else
                kp_kernel<4><<<(unsigned)grid, (unsigned)w->cfg.threads, 0, st>>>(w->ddesc, k, (uint32_t)dir);
            e = cudaGetLastError();
        }
        if (e == cudaSuccess) {
            kp_stamp_kernel<<<1, 128, 0, st>>>(*j);
            e = cudaGetLastError();
        }
    } else if (live && nstamp) {
        for (int si = 0; wait_event && si < w->r.nstreams && e == cudaSuccess; si++)
            e = cudaStreamWaitEvent(w->r.streams[si], (cudaEvent_t)wait_event, 0);
        if (e == cudaSuccess) e = kvs_cuda_res_batch_copy(&w->r, k);
        for (int si = 0; si < w->r.nstreams && (size_t)si < (k ? k : 1); si++) used |= 1u << si;
        if (e == cudaSuccess) {
            kp_stamp_kernel<<<1, 128, 0, w->r.streams[0]>>>(*j);
            e = cudaGetLastError();
        }
    }
    if (live && e == cudaSuccess && from_ra && live > nstamp) {
        e = kc_ahead_scatter(w->r.streams[w->r.nstreams - 1], n, ra, ra_off, ra_skip, addrs, lens,
                             ppo, w->r.out_gen_dev);
        used |= 1u << (w->r.nstreams - 1);
    }
    if (tr0) tr1 = kvs_now_ns();
    if (live) {
        for (int si = 0; si < w->r.nstreams; si++) {
            if (!(used >> si & 1)) continue;
            cudaError_t s = cudaStreamSynchronize(w->r.streams[si]);
            if (e == cudaSuccess) e = s;
        }
        if (e != cudaSuccess) rc = KVS_ERR_CUDA;
        if (rc == KVS_OK && out_gen)
            for (size_t i = 0; i < n; i++) out_gen[i] = w->r.out_gen[i];
    }
    if (e != cudaSuccess) {
        static int warned;
        if (!warned) {
            warned = 1;
            fprintf(stderr, "kvshelf: CUDA parts copy failed: %s\n", cudaGetErrorString(e));
        }
        cudaGetLastError();
    }
    free(j);
    if (tr0) kp_trace_add(dir, n, k, tr0, tr1);
    return rc;
}

extern "C" int kvs_cuda_copy_parts_ex(kvs_cuda_pworker *w, int dir, size_t n, void *const *obj,
                                      const uint64_t *dobj, const uint64_t *poffs,
                                      const uint64_t *addrs, const uint64_t *lens, size_t ppo,
                                      uint64_t payload_off, uint64_t stamp_off, uint64_t check_off,
                                      const uint8_t *ok, const uint64_t *gen, uint64_t *out_gen,
                                      void *wait_event)
{
    return copy_parts(w, dir, n, obj, dobj, poffs, addrs, lens, ppo, payload_off, stamp_off,
                      check_off, ok, gen, out_gen, wait_event, NULL, NULL, NULL);
}

extern "C" int kvs_cuda_copy_parts_ra(kvs_cuda_pworker *w, size_t n, void *const *obj,
                                      const uint64_t *dobj, const uint64_t *poffs,
                                      const uint64_t *addrs, const uint64_t *lens, size_t ppo,
                                      uint64_t stamp_off, const uint8_t *ok, uint64_t *out_gen,
                                      kvs_cuda_ahead *const *ra, const uint64_t *ra_off,
                                      const uint64_t *ra_skip)
{
    return copy_parts(w, KVS_CUDA_LOAD, n, obj, dobj, poffs, addrs, lens, ppo, 0, stamp_off, 0, ok,
                      NULL, out_gen, NULL, ra, ra_off, ra_skip);
}
