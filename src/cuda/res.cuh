/* What every CUDA copy worker holds (copy.cu's kernel and batch workers,
 * parts.cu's parts workers): its non-blocking streams, a pinned mapped
 * array through which a job's stamp kernel hands back the view-check words
 * it read, and the pointer arrays of cudaMemcpyBatchAsync. CUDA C++ only
 * (cudaStream_t); the C side sees the workers through kvs_cuda.h. */
#ifndef KVS_CUDA_RES_CUH
#define KVS_CUDA_RES_CUH

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#define KVS_CUDA_RES_MAX_STREAMS 8

struct kvs_cuda_ctx;

/* How a context's parts workers copy (parts.cu): mode KVS_CUDA_KERNEL or
 * KVS_CUDA_BATCH when the connector forced one, else KVS_CUDA_AUTO (each
 * copy picks from its mean part size against batch_min_chunk, as block
 * layouts do), and the kernel's shape. */
typedef struct kvs_cuda_parts_cfg {
    int mode;
    uint64_t batch_min_chunk;
    int sms, threads, per_sm, unroll;
} kvs_cuda_parts_cfg;

/* Fills *out from x (copy.cu). */
void kvs_cuda_ctx_parts_cfg(const struct kvs_cuda_ctx *x, kvs_cuda_parts_cfg *out);

typedef struct kvs_cuda_res {
    cudaStream_t streams[KVS_CUDA_RES_MAX_STREAMS];
    int nstreams;
    uint64_t *out_gen;     /* pinned, mapped: KVS_CUDA_MAX_JOB_BLOCKS words */
    uint64_t *out_gen_dev; /* the GPU's address of out_gen */
    void **dsts, **srcs;   /* batch-copy arrays, cap entries each */
    size_t *sizes;
    size_t cap;
} kvs_cuda_res;

/* Creates `nstreams` streams (1..KVS_CUDA_RES_MAX_STREAMS) on the current
 * device and the out_gen array. KVS_OK, or KVS_ERR_CUDA with nothing left
 * allocated (*r zeroed). */
int kvs_cuda_res_init(kvs_cuda_res *r, int nstreams);

/* Adds streams until there are n (at most KVS_CUDA_RES_MAX_STREAMS); stops
 * quietly at the first failure (fewer streams: slower, not wrong). */
void kvs_cuda_res_grow_streams(kvs_cuda_res *r, int n);

/* Makes the batch-copy arrays hold at least `need` entries. KVS_OK or
 * KVS_ERR_NOMEM (the arrays held so far stay valid). */
int kvs_cuda_res_reserve(kvs_cuda_res *r, size_t need);

/* Enqueues dsts/srcs/sizes[0..k) with cudaMemcpyBatchAsync, split evenly
 * over the streams: each stream's batch goes to a copy engine of its own,
 * and DMA pays per chunk, so parallel engines help. Returns the first
 * CUDA error (cudaSuccess when all were enqueued). */
cudaError_t kvs_cuda_res_batch_copy(kvs_cuda_res *r, size_t k);

/* Waits for and destroys the streams, opens every GPU gate (freeing pinned
 * memory synchronizes the device, which a closed gate would hold), frees
 * the rest and zeroes *r. */
void kvs_cuda_res_free(kvs_cuda_res *r);

#endif
