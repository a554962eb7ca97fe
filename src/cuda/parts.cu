/* CUDA copies of objects given as explicit parts (kvs_connector_dump_parts /
 * load_parts): one cudaMemcpyBatchAsync per stream between the device parts
 * and the object's host memory (a registered segment mapping or pinned
 * staging; host pointers, reached through UVA), then one small kernel moves
 * each object's view-check word through the GPU's view of the object (see
 * kvs_cuda.h). Copy engines suit the parts UCM hands over (whole layer
 * blocks of tens to hundreds of KiB); no gather kernel here. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/kvs_cuda.h"
#include "kvshelf/errors.h"

#define KP_MAX_STREAMS 8

struct kvs_cuda_pworker {
    kvs_cuda_ctx *x;
    int device;
    cudaStream_t streams[KP_MAX_STREAMS];
    int nstreams;
    uint64_t *out_gen; /* pinned, mapped */
    uint64_t *out_gen_dev;
    void **dsts, **srcs;
    size_t *sizes;
    size_t cap;
};

/* One job's view-check words, passed by value. obj[i] == 0: skip. */
struct kp_stamps {
    uint64_t obj[KVS_CUDA_MAX_JOB_BLOCKS]; /* device addresses of the objects */
    uint64_t gen[KVS_CUDA_MAX_JOB_BLOCKS];
    uint64_t *out_gen;
    uint64_t stamp_off;
    uint32_t n, dir;
};

__global__ void kp_stamp_kernel(const __grid_constant__ kp_stamps j)
{
    for (uint32_t i = threadIdx.x; i < j.n; i += blockDim.x) {
        if (!j.obj[i]) continue;
        volatile uint64_t *s = (volatile uint64_t *)(j.obj[i] + j.stamp_off);
        if (j.dir == KVS_CUDA_DUMP)
            *s = j.gen[i];
        else
            j.out_gen[i] = *s;
    }
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
    int ns = kp_env_int("KVSHELF_CUDA_STREAMS", 4, 1, KP_MAX_STREAMS);
    void *og = NULL, *ogd = NULL;
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < ns && e == cudaSuccess; i++) {
        e = cudaStreamCreateWithFlags(&w->streams[i], cudaStreamNonBlocking);
        if (e == cudaSuccess) w->nstreams++;
    }
    if (e == cudaSuccess) {
        kvs_cuda_gates_force_open();
        e = cudaHostAlloc(&og, KVS_CUDA_MAX_JOB_BLOCKS * sizeof(uint64_t),
                          cudaHostAllocPortable | cudaHostAllocMapped);
    }
    if (e == cudaSuccess) e = cudaHostGetDevicePointer(&ogd, og, 0);
    if (e != cudaSuccess) {
        cudaGetLastError();
        for (int i = 0; i < w->nstreams; i++) cudaStreamDestroy(w->streams[i]);
        if (og) cudaFreeHost(og);
        free(w);
        return KVS_ERR_CUDA;
    }
    w->out_gen = (uint64_t *)og;
    w->out_gen_dev = (uint64_t *)ogd;
    *out = w;
    return KVS_OK;
}

extern "C" void kvs_cuda_pworker_destroy(kvs_cuda_pworker *w)
{
    if (!w) return;
    for (int i = 0; i < w->nstreams; i++) {
        cudaStreamSynchronize(w->streams[i]);
        cudaStreamDestroy(w->streams[i]);
    }
    kvs_cuda_gates_force_open();
    cudaFreeHost(w->out_gen);
    free(w->dsts);
    free(w->srcs);
    free(w->sizes);
    cudaGetLastError();
    free(w);
}

static int kp_reserve(kvs_cuda_pworker *w, size_t need)
{
    if (need <= w->cap) return KVS_OK;
    void **d = (void **)realloc(w->dsts, need * sizeof *d);
    if (d) w->dsts = d;
    void **s = (void **)realloc(w->srcs, need * sizeof *s);
    if (s) w->srcs = s;
    size_t *z = (size_t *)realloc(w->sizes, need * sizeof *z);
    if (z) w->sizes = z;
    if (!d || !s || !z) return KVS_ERR_NOMEM;
    w->cap = need;
    return KVS_OK;
}

extern "C" int kvs_cuda_copy_parts(kvs_cuda_pworker *w, int dir, size_t n, void *const *obj,
                                   const uint64_t *addrs, const uint64_t *lens, size_t ppo,
                                   uint64_t payload_off, uint64_t stamp_off, const uint8_t *ok,
                                   const uint64_t *gen, uint64_t *out_gen, void *wait_event)
{
    if (!w || n > KVS_CUDA_MAX_JOB_BLOCKS || !obj || !addrs || !lens || !ppo ||
        (dir != KVS_CUDA_DUMP && dir != KVS_CUDA_LOAD))
        return KVS_ERR_INVALID;
    if (n > SIZE_MAX / ppo) return KVS_ERR_INVALID;
    if (kp_reserve(w, n * ppo) != KVS_OK) return KVS_ERR_NOMEM;
    kp_stamps *j = (kp_stamps *)calloc(1, sizeof *j);
    if (!j) return KVS_ERR_NOMEM;
    size_t k = 0, live = 0;
    for (size_t i = 0; i < n; i++) {
        if (out_gen) out_gen[i] = 0;
        w->out_gen[i] = 0;
        if ((ok && !ok[i]) || !obj[i] || (uintptr_t)obj[i] % 8) continue;
        uint64_t total = payload_off;
        for (size_t p = 0; p < ppo; p++) total += lens[i * ppo + p];
        j->obj[i] = kvs_cuda_translate(w->x, obj[i], total);
        if (!j->obj[i]) continue; /* unreachable: its check word stays 0, the object fails */
        j->gen[i] = gen ? gen[i] : 0;
        live++;
        char *o = (char *)obj[i] + payload_off;
        for (size_t p = 0; p < ppo; p++) {
            char *dev = (char *)(uintptr_t)addrs[i * ppo + p];
            size_t len = (size_t)lens[i * ppo + p];
            if (!len) continue;
            w->dsts[k] = dir == KVS_CUDA_DUMP ? (void *)o : (void *)dev;
            w->srcs[k] = dir == KVS_CUDA_DUMP ? (void *)dev : (void *)o;
            w->sizes[k] = len;
            k++;
            o += len;
        }
    }
    j->out_gen = w->out_gen_dev;
    j->stamp_off = stamp_off;
    j->n = (uint32_t)n;
    j->dir = (uint32_t)dir;
    int rc = KVS_OK;
    cudaError_t e = cudaSuccess;
    if (live) {
        for (int si = 0; wait_event && si < w->nstreams && e == cudaSuccess; si++)
            e = cudaStreamWaitEvent(w->streams[si], (cudaEvent_t)wait_event, 0);
        if (e == cudaSuccess && k) {
            struct cudaMemcpyAttributes attr;
            memset(&attr, 0, sizeof attr);
            attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
            /* Spread over the streams: each batch goes to a copy engine. */
            size_t per = (k + (size_t)w->nstreams - 1) / (size_t)w->nstreams;
            for (int si = 0; si < w->nstreams && e == cudaSuccess; si++) {
                size_t off = (size_t)si * per;
                if (off >= k) break;
                size_t cnt = k - off < per ? k - off : per;
                size_t idx = 0;
                e = cudaMemcpyBatchAsync((void *const *)(w->dsts + off),
                                         (const void *const *)(w->srcs + off), w->sizes + off,
                                         cnt, &attr, &idx, 1, w->streams[si]);
            }
        }
        if (e == cudaSuccess) {
            kp_stamp_kernel<<<1, 128, 0, w->streams[0]>>>(*j);
            e = cudaGetLastError();
        }
        for (int si = 0; si < w->nstreams; si++) {
            cudaError_t s = cudaStreamSynchronize(w->streams[si]);
            if (e == cudaSuccess) e = s;
        }
        if (e != cudaSuccess) rc = KVS_ERR_CUDA;
        if (rc == KVS_OK && out_gen)
            for (size_t i = 0; i < n; i++) out_gen[i] = w->out_gen[i];
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
    return rc;
}
