/* Read-ahead arena of a CUDA context (ahead.cu): the device memory that
 * read-ahead buffers of striped loads are carved from. Internal to src/cuda. */
#ifndef KVS_CUDA_AHEAD_CUH
#define KVS_CUDA_AHEAD_CUH

#include <stdint.h>

#include <cuda_runtime.h>

#include "cuda/kvs_cuda.h"
#include "cuda/res.cuh"

struct kc_arena;

/* The arena of x, created (empty: device memory comes at its first use) on
 * the first call with `bytes` as its size; NULL when out of host memory.
 * copy.cu, under x's mutex. */
struct kc_arena *kc_ctx_arena(kvs_cuda_ctx *x, uint64_t bytes);

/* A new arena of `bytes` on `device` (no device memory yet); NULL: no memory. */
struct kc_arena *kc_arena_new(int device, uint64_t bytes);

/* Frees the arena and its device memory (every buffer carved from it must
 * be gone). Safe with NULL. */
void kc_arena_destroy(struct kc_arena *a);

/* Enqueues, on pf's streams, the copies of object i's stripe (host memory
 * src[i], len[i] bytes; GPU address of the object dobj[i]) for every
 * want[i], and the read of its stamp (dobj[i] + stamp_off) after them;
 * off_out[i] gets where the stripe starts in the new buffer (UINT64_MAX:
 * not read ahead). budget: the arena's size if it is created now. Returns
 * KVS_OK and *out (one reference), KVS_ERR_NO_SPACE (arena full or
 * unavailable), KVS_ERR_NOMEM, KVS_ERR_INVALID (nothing wanted) or
 * KVS_ERR_CUDA; with nothing enqueued on error. */
int kc_ahead_start(kvs_cuda_ctx *x, kvs_cuda_res *pf, uint64_t budget,
                   size_t n, const uint8_t *want, void *const *src, const uint64_t *dobj,
                   uint64_t stamp_off, const uint64_t *len, uint64_t *off_out,
                   kvs_cuda_ahead **out);

/* Most parts per object the scatter takes (a job with more loads from host
 * memory instead). */
#define KC_AHEAD_MAX_PPO 256

/* Enqueues on stream s a wait for the buffers ra[i] (NULL: object i is not
 * loaded from read-ahead), then the kernel that copies each such object's
 * stripe (ra[i]: the object's range at ra_off[i], the stripe ra_skip[i]
 * bytes into it) to its ppo parts addrs/lens and writes its view-check word
 * to out_gen_dev[i]. ppo <= KC_AHEAD_MAX_PPO. */
cudaError_t kc_ahead_scatter(cudaStream_t s, size_t n, kvs_cuda_ahead *const *ra,
                             const uint64_t *ra_off, const uint64_t *ra_skip,
                             const uint64_t *addrs, const uint64_t *lens, size_t ppo,
                             uint64_t *out_gen_dev);

#endif
