/* Streams, read-back words and batch arrays of a CUDA copy worker (res.cuh). */
#include "cuda/res.cuh"

#include <stdlib.h>
#include <string.h>

#include "cuda/kvs_cuda.h"
#include "kvshelf/errors.h"

int kvs_cuda_res_init(kvs_cuda_res *r, int nstreams)
{
    memset(r, 0, sizeof *r);
    if (nstreams < 1) nstreams = 1;
    if (nstreams > KVS_CUDA_RES_MAX_STREAMS) nstreams = KVS_CUDA_RES_MAX_STREAMS;
    void *og = NULL, *ogd = NULL;
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < nstreams && e == cudaSuccess; i++) {
        e = cudaStreamCreateWithFlags(&r->streams[i], cudaStreamNonBlocking);
        if (e == cudaSuccess) r->nstreams++;
    }
    if (e == cudaSuccess) {
        kvs_cuda_gates_force_open(); /* cudaHostAlloc synchronizes the device */
        e = cudaHostAlloc(&og, KVS_CUDA_MAX_JOB_BLOCKS * sizeof(uint64_t),
                          cudaHostAllocPortable | cudaHostAllocMapped);
    }
    if (e == cudaSuccess) e = cudaHostGetDevicePointer(&ogd, og, 0);
    if (e != cudaSuccess) {
        cudaGetLastError();
        for (int i = 0; i < r->nstreams; i++) cudaStreamDestroy(r->streams[i]);
        if (og) cudaFreeHost(og);
        memset(r, 0, sizeof *r);
        return KVS_ERR_CUDA;
    }
    r->out_gen = (uint64_t *)og;
    r->out_gen_dev = (uint64_t *)ogd;
    return KVS_OK;
}

void kvs_cuda_res_grow_streams(kvs_cuda_res *r, int n)
{
    if (n > KVS_CUDA_RES_MAX_STREAMS) n = KVS_CUDA_RES_MAX_STREAMS;
    while (r->nstreams < n) {
        if (cudaStreamCreateWithFlags(&r->streams[r->nstreams], cudaStreamNonBlocking) !=
            cudaSuccess) {
            cudaGetLastError();
            return;
        }
        r->nstreams++;
    }
}

int kvs_cuda_res_reserve(kvs_cuda_res *r, size_t need)
{
    if (need <= r->cap) return KVS_OK;
    void **d = (void **)realloc(r->dsts, need * sizeof *d);
    if (d) r->dsts = d;
    void **s = (void **)realloc(r->srcs, need * sizeof *s);
    if (s) r->srcs = s;
    size_t *z = (size_t *)realloc(r->sizes, need * sizeof *z);
    if (z) r->sizes = z;
    if (!d || !s || !z) return KVS_ERR_NOMEM;
    r->cap = need;
    return KVS_OK;
}

/* Most copies per cudaMemcpyBatchAsync call: the host spends about 0.8 us
 * an entry inside the call (H200), and the copy engines start on a call's
 * entries only once it returns, so a job of thousands of parts (UCM's
 * direct mode: 12,288 parts a job) is enqueued in slices, round robin over
 * the streams, and the link starts after one slice instead of a quarter of
 * the job. A batch is not split thinner than RES_BATCH_MIN_PER_STREAM
 * entries a stream: every stream costs a call and a synchronisation, and on
 * an H200 UCM's layerwise dumps (256 parts a job) ran at 86-90% of the
 * ceiling over 4 streams against 88-93% over 2 (bench/RESULTS.md). */
#define RES_BATCH_SLICE 512
#define RES_BATCH_MIN_PER_STREAM 128

cudaError_t kvs_cuda_res_batch_copy(kvs_cuda_res *r, size_t k)
{
    if (!k) return cudaSuccess;
    struct cudaMemcpyAttributes attr;
    memset(&attr, 0, sizeof attr);
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t ns = (size_t)r->nstreams, most = (k + RES_BATCH_MIN_PER_STREAM - 1) / RES_BATCH_MIN_PER_STREAM;
    if (ns > most) ns = most;
    size_t per = (k + ns - 1) / ns;
    if (per > RES_BATCH_SLICE) per = RES_BATCH_SLICE;
    for (size_t off = 0, q = 0; off < k; off += per, q++) {
        size_t cnt = k - off < per ? k - off : per;
        size_t idx = 0;
        cudaError_t e = cudaMemcpyBatchAsync((void *const *)(r->dsts + off),
                                             (const void *const *)(r->srcs + off), r->sizes + off,
                                             cnt, &attr, &idx, 1,
                                             r->streams[q % ns]);
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}

void kvs_cuda_res_free(kvs_cuda_res *r)
{
    for (int i = 0; i < r->nstreams; i++) {
        cudaStreamSynchronize(r->streams[i]);
        cudaStreamDestroy(r->streams[i]);
    }
    kvs_cuda_gates_force_open();
    if (r->out_gen) cudaFreeHost(r->out_gen);
    free(r->dsts);
    free(r->srcs);
    free(r->sizes);
    cudaGetLastError();
    memset(r, 0, sizeof *r);
}
