/* The SM copy loop shared by the gather/scatter kernels (copy.cu's block
 * layouts, parts.cu's explicit parts). CUDA C++ only. */
#ifndef KVS_CUDA_KCOPY_CUH
#define KVS_CUDA_KCOPY_CUH

#include <stdint.h>

/* A kernel work unit copies at most this many bytes (bigger chunks and
 * parts are cut into pieces of this size, so CTAs share the work). */
#define KC_PIECE (64u * 1024u)

/* Copies len bytes; 16-byte vectors with U loads in flight per thread (all
 * issued before the first store) when everything is 16-byte aligned, else
 * 8-byte words, else bytes. */
template <int U>
__device__ __forceinline__ void kc_copy(char *dst, const char *src, uint64_t len)
{
    const uint32_t tid = threadIdx.x, nth = blockDim.x;
    if (((uintptr_t)dst | (uintptr_t)src | len) % 16 == 0) {
        uint4 *d = (uint4 *)dst;
        const uint4 *s = (const uint4 *)src;
        const uint64_t nv = len / 16;
        for (uint64_t base = tid; base < nv; base += (uint64_t)U * nth) {
            uint4 v[U];
#pragma unroll
            for (int k = 0; k < U; k++) {
                uint64_t i = base + (uint64_t)k * nth;
                if (i < nv) v[k] = s[i];
            }
#pragma unroll
            for (int k = 0; k < U; k++) {
                uint64_t i = base + (uint64_t)k * nth;
                if (i < nv) d[i] = v[k];
            }
        }
    } else if (((uintptr_t)dst | (uintptr_t)src | len) % 8 == 0) {
        uint64_t *d = (uint64_t *)dst;
        const uint64_t *s = (const uint64_t *)src;
        for (uint64_t i = tid; i < len / 8; i += nth) d[i] = s[i];
    } else {
        for (uint64_t i = tid; i < len; i += nth) dst[i] = src[i];
    }
}

#endif
