/* CUDA copy backends of the KV connector: gather/scatter kernel and batched
 * memcpy between device KV tensors and host objects (see kvs_cuda.h).
 *
 * Why both, and how "auto" picks (bench/connector on one H100 80GB HBM3,
 * PCIe Gen5 x16, 2026-11-24, 32k tokens of Qwen2.5-14B = 6.44 GB, 2048 blocks
 * x 96 chunks; ceiling = one contiguous pinned cudaMemcpy, ~53-55 GB/s):
 *   32 KiB chunks     dump GB/s (ratio)   load GB/s (ratio)
 *   kernel, 2 workers   47.7-50.1 (87-91%)  45.0-48.0 (83-88%)
 *   kernel, 4 workers   49.9-50.5 (91-92%)  44.6-49.4 (82-91%)
 *   batch, 2 workers x 1 stream   36.8 (67%)   35.0 (64%)
 *   batch, 4 workers x 1 stream   50.8-51.4 (92-94%)  51.3-52.1 (94-96%)
 *   batch, 4 workers x 4 streams, 128 MiB jobs  51.5-52.2 (94-96%)  51.2-53.2 (94-98%)
 *   8 KiB chunks (2 KV heads, 1.61 GB)
 *   kernel, 4 workers   49.7-50.0 (90-91%)  45.2-48.8 (83-90%)
 *   batch, 4 workers    16.0-21.7 (29-39%)   6.6-9.6 (12-18%)
 * Copy engines pay ~0.5 us per chunk and need several streams in parallel,
 * but move bytes more efficiently over PCIe than SM loads from mapped host
 * memory (the kernel's loads top out near 49 GB/s); SM copies cost the same at
 * any chunk size. So auto = batch (4 streams per worker) when the mean chunk
 * is >= 32 KiB, else the kernel. Knobs for measuring: KVSHELF_CUDA_THREADS
 * (512), KVSHELF_CUDA_CTAS_PER_SM (4), KVSHELF_CUDA_UNROLL (4; 8 made no
 * difference), KVSHELF_CUDA_STREAMS (4), KVSHELF_CUDA_BATCH_MIN_CHUNK (32768).
 */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/ahead.cuh"
#include "cuda/kcopy.cuh"
#include "cuda/kvs_cuda.h"
#include "cuda/res.cuh"
#include "kvshelf/errors.h"


/* ---------------------------------------------------------------- helpers */

static void kc_seterr(char *err, size_t errlen, const char *what, cudaError_t e)
{
    if (err && errlen) snprintf(err, errlen, "%s: %s", what, cudaGetErrorString(e));
}

static int kc_env_int(const char *name, int def, int lo, int hi)
{
    const char *s = getenv(name);
    if (!s || !*s) return def;
    int v = atoi(s);
    return v < lo ? lo : v > hi ? hi : v;
}

/* --------------------------------------------- registry of host mappings */

/* Process-wide: cudaHostRegister is per process, and several connectors (or
 * a test's two) may use the same segment mapping. */
struct kc_map {
    uintptr_t base;
    size_t len;
    uintptr_t dev;
    int refs;   /* contexts using it (+1 for pinned staging) */
    int dead;   /* failed a view check: never handed out again */
    int failed; /* cudaHostRegister refused it: not mappable (cached answer) */
    int pinned; /* our own cudaHostAlloc staging: never cudaHostUnregister */
    struct kc_map *next;
};
static pthread_mutex_t g_map_mu = PTHREAD_MUTEX_INITIALIZER;
static struct kc_map *g_maps;

static void kc_map_unref_locked(struct kc_map *m)
{
    if (--m->refs > 0) return;
    if (!m->pinned && !m->dead && !m->failed) {
        kvs_cuda_gates_force_open(); /* device-synchronizing: see kvs_cuda.h */
        cudaHostUnregister((void *)m->base);
    }
    for (struct kc_map **pp = &g_maps; *pp; pp = &(*pp)->next)
        if (*pp == m) {
            *pp = m->next;
            break;
        }
    free(m);
    cudaGetLastError();
}

/* Finds the VMA containing p in /proc/self/maps. */
static int kc_find_vma(uintptr_t p, uintptr_t *start, uintptr_t *end)
{
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) return -1;
    char line[512];
    int found = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long long s, e;
        if (sscanf(line, "%llx-%llx", &s, &e) != 2) continue;
        if (p >= s && p < e) {
            *start = (uintptr_t)s;
            *end = (uintptr_t)e;
            found = 0;
            break;
        }
    }
    fclose(f);
    return found;
}

/* ------------------------------------------------------------- contexts */

struct kc_dev_tensor {
    uint64_t base, block_stride, chunk_bytes, chunk_stride, payload_off;
    uint32_t count, ppc, unit_start, pad;
};

struct kvs_cuda_ctx {
    int device;
    int mode;
    int sms;
    int threads, per_sm; /* kernel shape (KVSHELF_CUDA_THREADS, KVSHELF_CUDA_CTAS_PER_SM) */
    int unroll;          /* 16-byte loads in flight per thread (KVSHELF_CUDA_UNROLL: 4 or 8) */
    int streams;         /* batch mode: streams per worker (KVSHELF_CUDA_STREAMS) */
    int auto_mode;       /* pick kernel or batch from the layout (set_layout) */
    int batch_min_chunk; /* auto: batch when the mean chunk is at least this many bytes */
    pthread_mutex_t mu; /* gate stream, map refs */
    cudaStream_t gate;
    /* layout */
    struct kc_dev_tensor *d_tensors;
    kvs_cuda_tensor *h_tensors;
    uint32_t nt;
    uint32_t upb;    /* kernel units (chunk pieces) per block */
    uint64_t chunks; /* chunks per block (batch mode) */
    uint64_t stamp_off;
    /* mappings this context holds a reference on */
    struct kc_map **maps;
    size_t nmaps, capmaps;
    struct kc_arena *arena; /* read-ahead of striped loads (ahead.cu), created on first use */
};

struct kvs_cuda_worker {
    kvs_cuda_ctx *x;
    kvs_cuda_res r; /* kernels run on r.streams[0]; batch mode uses them all */
};

extern "C" int kvs_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" const char *kvs_cuda_mode_name(int mode)
{
    return mode == KVS_CUDA_BATCH ? "cuda-batch" : mode == KVS_CUDA_KERNEL ? "cuda-kernel" : "cuda";
}

/* Makes `device` current in this thread; returns the caller's device (or -1)
 * for kc_dev_restore. Plain functions, no C++ destructors: this file must
 * link into C programs without the C++ runtime. */
static int kc_dev_enter(int device, int *ok)
{
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
    int r = cudaSetDevice(device) == cudaSuccess;
    if (ok) *ok = r;
    return prev;
}

static void kc_dev_restore(int prev)
{
    if (prev >= 0) cudaSetDevice(prev);
    cudaGetLastError();
}

static int kc_ctx_create(int device, int mode, kvs_cuda_ctx **out, char *err, size_t errlen)
{
    kvs_cuda_ctx *x = (kvs_cuda_ctx *)calloc(1, sizeof *x);
    if (!x) return KVS_ERR_NOMEM;
    x->device = device;
    x->auto_mode = mode == KVS_CUDA_AUTO;
    x->mode = mode == KVS_CUDA_AUTO ? KVS_CUDA_KERNEL : mode;
    pthread_mutex_init(&x->mu, NULL);
    cudaError_t e = cudaDeviceGetAttribute(&x->sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&x->gate, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        kc_seterr(err, errlen, "CUDA setup", e);
        pthread_mutex_destroy(&x->mu);
        free(x);
        return KVS_ERR_CUDA;
    }
    x->threads = kc_env_int("KVSHELF_CUDA_THREADS", 512, 64, 1024) / 32 * 32;
    x->per_sm = kc_env_int("KVSHELF_CUDA_CTAS_PER_SM", 4, 1, 32);
    x->unroll = kc_env_int("KVSHELF_CUDA_UNROLL", 4, 1, 8) > 4 ? 8 : 4;
    x->streams = kc_env_int("KVSHELF_CUDA_STREAMS", 4, 1, KVS_CUDA_RES_MAX_STREAMS);
    x->batch_min_chunk = kc_env_int("KVSHELF_CUDA_BATCH_MIN_CHUNK", 32768, 1, 1 << 30);
    *out = x;
    return KVS_OK;
}

extern "C" int kvs_cuda_ctx_create(int device, int mode, kvs_cuda_ctx **out, char *err,
                                   size_t errlen)
{
    if (!out || device < 0 ||
        (mode != KVS_CUDA_KERNEL && mode != KVS_CUDA_BATCH && mode != KVS_CUDA_AUTO))
        return KVS_ERR_INVALID;
    int n = kvs_cuda_device_count();
    if (device >= n) {
        if (err && errlen) snprintf(err, errlen, "CUDA device %d not present (%d found)", device, n);
        return KVS_ERR_CUDA;
    }
    int ok = 0, prev = kc_dev_enter(device, &ok);
    int rc = KVS_ERR_CUDA;
    if (!ok)
        kc_seterr(err, errlen, "cudaSetDevice", cudaGetLastError());
    else
        rc = kc_ctx_create(device, mode, out, err, errlen);
    kc_dev_restore(prev);
    return rc;
}

static int kc_set_layout(kvs_cuda_ctx *x, const kvs_cuda_tensor *t, size_t n, uint64_t stamp_off)
{
    struct kc_dev_tensor *h = (struct kc_dev_tensor *)calloc(n, sizeof *h);
    kvs_cuda_tensor *ht = (kvs_cuda_tensor *)malloc(n * sizeof *ht);
    if (!h || !ht) {
        free(h);
        free(ht);
        return KVS_ERR_NOMEM;
    }
    uint64_t units = 0, chunks = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t ppc = (t[i].chunk_bytes + KC_PIECE - 1) / KC_PIECE;
        h[i].base = t[i].base;
        h[i].block_stride = t[i].block_stride;
        h[i].chunk_bytes = t[i].chunk_bytes;
        h[i].chunk_stride = t[i].chunk_stride;
        h[i].payload_off = t[i].payload_off;
        h[i].count = t[i].count;
        h[i].ppc = (uint32_t)ppc;
        h[i].unit_start = (uint32_t)units;
        units += ppc * t[i].count;
        chunks += t[i].count;
        if (units > 0x7fffffffu) {
            free(h);
            free(ht);
            return KVS_ERR_INVALID;
        }
    }
    memcpy(ht, t, n * sizeof *ht);
    void *d = NULL;
    kvs_cuda_gates_force_open();
    cudaError_t e = cudaMalloc(&d, n * sizeof *h);
    if (e == cudaSuccess) e = cudaMemcpy(d, h, n * sizeof *h, cudaMemcpyHostToDevice);
    free(h);
    if (e != cudaSuccess) {
        if (d) cudaFree(d);
        free(ht);
        return KVS_ERR_CUDA;
    }
    if (x->d_tensors) {
        kvs_cuda_gates_force_open();
        cudaFree(x->d_tensors);
    }
    free(x->h_tensors);
    x->d_tensors = (struct kc_dev_tensor *)d;
    x->h_tensors = ht;
    x->nt = (uint32_t)n;
    x->upb = (uint32_t)units;
    x->chunks = chunks;
    x->stamp_off = stamp_off;
    if (x->auto_mode) {
        /* Copy engines pay per chunk (~0.5 us each): they win only on large
         * chunks, where they beat SM copies on loads (see the numbers at the
         * top of this file). */
        uint64_t payload = 0;
        for (size_t i = 0; i < n; i++) payload += t[i].chunk_bytes * t[i].count;
        x->mode = chunks && payload / chunks >= (uint64_t)x->batch_min_chunk ? KVS_CUDA_BATCH
                                                                              : KVS_CUDA_KERNEL;
    }
    return KVS_OK;
}

extern "C" int kvs_cuda_ctx_set_layout(kvs_cuda_ctx *x, const kvs_cuda_tensor *t, size_t n,
                                       uint64_t stamp_off)
{
    if (!x || !t || !n || n > 1u << 20) return KVS_ERR_INVALID;
    int prev = kc_dev_enter(x->device, NULL);
    int rc = kc_set_layout(x, t, n, stamp_off);
    kc_dev_restore(prev);
    return rc;
}

extern "C" void kvs_cuda_ctx_destroy(kvs_cuda_ctx *x)
{
    if (!x) return;
    int prev = kc_dev_enter(x->device, NULL);
    pthread_mutex_lock(&g_map_mu);
    for (size_t i = 0; i < x->nmaps; i++) kc_map_unref_locked(x->maps[i]);
    pthread_mutex_unlock(&g_map_mu);
    free(x->maps);
    if (x->d_tensors) {
        kvs_cuda_gates_force_open();
        cudaFree(x->d_tensors);
    }
    free(x->h_tensors);
    kc_arena_destroy(x->arena);
    cudaStreamDestroy(x->gate);
    pthread_mutex_destroy(&x->mu);
    kc_dev_restore(prev);
    free(x);
}

struct kc_arena *kc_ctx_arena(kvs_cuda_ctx *x, uint64_t bytes)
{
    pthread_mutex_lock(&x->mu);
    if (!x->arena) x->arena = kc_arena_new(x->device, bytes);
    struct kc_arena *a = x->arena;
    pthread_mutex_unlock(&x->mu);
    return a;
}

/* Makes room for one more mapping reference in x->maps. */
static int kc_maps_reserve(kvs_cuda_ctx *x)
{
    if (x->nmaps < x->capmaps) return 0;
    size_t nc = x->capmaps ? x->capmaps * 2 : 8;
    struct kc_map **nm = (struct kc_map **)realloc(x->maps, nc * sizeof *nm);
    if (!nm) return -1;
    x->maps = nm;
    x->capmaps = nc;
    return 0;
}

/* Returns the device address of host object p (len bytes), registering the
 * mapping that holds it on first use; 0 when it cannot be mapped. */
static uintptr_t kc_translate(kvs_cuda_ctx *x, uintptr_t p, size_t len)
{
    uintptr_t d = 0;
    pthread_mutex_lock(&g_map_mu);
    for (struct kc_map *m = g_maps; m; m = m->next) {
        if (m->dead || p < m->base || p + len > m->base + m->len) continue;
        if (m->failed) goto out;
        int held = m->pinned;
        for (size_t i = 0; !held && i < x->nmaps; i++) held = x->maps[i] == m;
        if (!held) {
            if (kc_maps_reserve(x)) goto out;
            x->maps[x->nmaps++] = m;
            m->refs++;
        }
        d = m->dev + (p - m->base);
        goto out;
    }
    {
        /* Pinned memory from elsewhere (cudaHostAlloc by the caller, ...). */
        cudaPointerAttributes a;
        if (cudaPointerGetAttributes(&a, (void *)p) == cudaSuccess &&
            a.type == cudaMemoryTypeHost && a.devicePointer) {
            d = (uintptr_t)a.devicePointer;
            goto out;
        }
        cudaGetLastError();
        /* A segment mapping: register the whole VMA once. */
        uintptr_t s, e;
        if (kc_find_vma(p, &s, &e) || p + len > e || kc_maps_reserve(x)) goto out;
        struct kc_map *m = (struct kc_map *)calloc(1, sizeof *m);
        if (!m) goto out;
        void *dp = NULL;
        /* KVSHELF_CUDA_NO_REGISTER=1 simulates a refusal (tests of the fallback) */
        const char *nr = getenv("KVSHELF_CUDA_NO_REGISTER");
        if (!(nr && *nr == '1')) kvs_cuda_gates_force_open();
        cudaError_t ce = nr && *nr == '1' ? cudaErrorNotPermitted
                                          : cudaHostRegister((void *)s, e - s,
                                                             cudaHostRegisterPortable |
                                                                 cudaHostRegisterMapped);
        if (ce == cudaSuccess) {
            ce = cudaHostGetDevicePointer(&dp, (void *)s, 0);
            if (ce != cudaSuccess) cudaHostUnregister((void *)s);
        }
        if (ce != cudaSuccess) {
            static int warned; /* under g_map_mu */
            if (!warned++ && !(nr && *nr == '1'))
                fprintf(stderr, "kvshelf: cannot register host mapping %#lx+%lu with CUDA: %s\n",
                        (unsigned long)s, (unsigned long)(e - s), cudaGetErrorString(ce));
            cudaGetLastError();
            /* remember the refusal (this context holds the entry) */
            m->base = s;
            m->len = e - s;
            m->failed = 1;
            m->refs = 1;
            m->next = g_maps;
            g_maps = m;
            x->maps[x->nmaps++] = m;
            goto out;
        }
        m->base = s;
        m->len = e - s;
        m->dev = (uintptr_t)dp;
        m->refs = 1;
        m->next = g_maps;
        g_maps = m;
        x->maps[x->nmaps++] = m;
        d = m->dev + (p - s);
    }
out:
    pthread_mutex_unlock(&g_map_mu);
    return d;
}

extern "C" int kvs_cuda_preregister(kvs_cuda_ctx *x)
{
    if (!x) return 0;
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) return 0;
    uintptr_t starts[64];
    size_t n = 0;
    char line[512];
    while (n < sizeof starts / sizeof starts[0] && fgets(line, sizeof line, f)) {
        unsigned long long s, e;
        if (sscanf(line, "%llx-%llx", &s, &e) == 2 && strstr(line, "/dev/shm/kvshelf-"))
            starts[n++] = (uintptr_t)s;
    }
    fclose(f);
    int prev = kc_dev_enter(x->device, NULL);
    int done = 0;
    for (size_t i = 0; i < n; i++) done += kc_translate(x, starts[i], 1) != 0;
    kc_dev_restore(prev);
    return done;
}

extern "C" int kvs_cuda_ctx_mode(const kvs_cuda_ctx *x) { return x ? x->mode : 0; }

void kvs_cuda_ctx_parts_cfg(const kvs_cuda_ctx *x, kvs_cuda_parts_cfg *out)
{
    out->mode = x->auto_mode ? KVS_CUDA_AUTO : x->mode;
    out->batch_min_chunk = (uint64_t)x->batch_min_chunk;
    out->sms = x->sms;
    out->threads = x->threads;
    out->per_sm = x->per_sm;
    out->unroll = x->unroll;
}

extern "C" int kvs_cuda_can_map(kvs_cuda_ctx *x, const void *p, uint64_t len)
{
    if (!x || !p) return 0;
    int prev = kc_dev_enter(x->device, NULL);
    int ok = kc_translate(x, (uintptr_t)p, len) != 0;
    kc_dev_restore(prev);
    return ok;
}

extern "C" uint64_t kvs_cuda_translate(kvs_cuda_ctx *x, const void *p, uint64_t len)
{
    if (!x || !p) return 0;
    int prev = kc_dev_enter(x->device, NULL);
    uintptr_t d = kc_translate(x, (uintptr_t)p, len);
    kc_dev_restore(prev);
    return (uint64_t)d;
}

extern "C" void kvs_cuda_forget(kvs_cuda_ctx *x, const void *p)
{
    uintptr_t a = (uintptr_t)p;
    pthread_mutex_lock(&g_map_mu);
    for (struct kc_map *m = g_maps; m; m = m->next)
        if (!m->dead && !m->pinned && !m->failed && a >= m->base && a < m->base + m->len) {
            int prev = kc_dev_enter(x->device, NULL);
            kvs_cuda_gates_force_open();
            cudaHostUnregister((void *)m->base);
            kc_dev_restore(prev);
            m->dead = 1;
        }
    pthread_mutex_unlock(&g_map_mu);
}

extern "C" void *kvs_cuda_pinned_alloc(size_t n)
{
    void *p = NULL;
    kvs_cuda_gates_force_open();
    if (cudaHostAlloc(&p, n, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    void *d = NULL;
    struct kc_map *m = (struct kc_map *)calloc(1, sizeof *m);
    if (!m || cudaHostGetDevicePointer(&d, p, 0) != cudaSuccess) {
        cudaGetLastError();
        free(m);
        cudaFreeHost(p);
        return NULL;
    }
    m->base = (uintptr_t)p;
    m->len = n;
    m->dev = (uintptr_t)d;
    m->refs = 1;
    m->pinned = 1;
    pthread_mutex_lock(&g_map_mu);
    m->next = g_maps;
    g_maps = m;
    pthread_mutex_unlock(&g_map_mu);
    return p;
}

extern "C" void kvs_cuda_pinned_free(void *p)
{
    if (!p) return;
    pthread_mutex_lock(&g_map_mu);
    for (struct kc_map *m = g_maps; m; m = m->next)
        if (m->pinned && m->base == (uintptr_t)p) {
            kc_map_unref_locked(m);
            break;
        }
    pthread_mutex_unlock(&g_map_mu);
    kvs_cuda_gates_force_open();
    cudaFreeHost(p);
}

extern "C" void *kvs_cuda_dev_alloc(int device, size_t n)
{
    int prev = kc_dev_enter(device, NULL);
    void *p = NULL;
    kvs_cuda_gates_force_open();
    if (cudaMalloc(&p, n) != cudaSuccess) p = NULL;
    kc_dev_restore(prev);
    return p;
}

extern "C" void kvs_cuda_dev_free(void *p)
{
    if (!p) return;
    kvs_cuda_gates_force_open();
    cudaFree(p);
}

extern "C" int kvs_cuda_memcpy(void *dst, const void *src, size_t n)
{
    return cudaMemcpy(dst, src, n, cudaMemcpyDefault) == cudaSuccess ? KVS_OK : KVS_ERR_CUDA;
}

/* ------------------------------------------------------------- events */

extern "C" int kvs_cuda_event_snapshot(kvs_cuda_ctx *x, void *user_event, void **snap)
{
    if (!x || !user_event || !snap) return KVS_ERR_INVALID;
    int prev = kc_dev_enter(x->device, NULL);
    cudaEvent_t ev;
    int rc = KVS_ERR_CUDA;
    if (cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) == cudaSuccess) {
        pthread_mutex_lock(&x->mu);
        cudaError_t e = cudaStreamWaitEvent(x->gate, (cudaEvent_t)user_event, 0);
        if (e == cudaSuccess) e = cudaEventRecord(ev, x->gate);
        pthread_mutex_unlock(&x->mu);
        if (e == cudaSuccess) {
            *snap = (void *)ev;
            rc = KVS_OK;
        } else {
            cudaEventDestroy(ev);
        }
    }
    kc_dev_restore(prev);
    return rc;
}

extern "C" void kvs_cuda_event_free(void *snap)
{
    if (snap) cudaEventDestroy((cudaEvent_t)snap);
}

/* ------------------------------------------------------------- workers */

extern "C" int kvs_cuda_worker_create(kvs_cuda_ctx *x, kvs_cuda_worker **out)
{
    if (!x || !out) return KVS_ERR_INVALID;
    if (cudaSetDevice(x->device) != cudaSuccess) return KVS_ERR_CUDA;
    kvs_cuda_worker *w = (kvs_cuda_worker *)calloc(1, sizeof *w);
    if (!w) return KVS_ERR_NOMEM;
    w->x = x;
    /* one stream for the kernel; batch mode adds the rest on first use
     * (kvs_cuda_copy), so kernel-mode workers hold one stream (and one
     * hardware queue, of CUDA_DEVICE_MAX_CONNECTIONS) each */
    int ns = x->mode == KVS_CUDA_BATCH && !x->auto_mode ? x->streams : 1;
    if (kvs_cuda_res_init(&w->r, ns) != KVS_OK) {
        free(w);
        return KVS_ERR_CUDA;
    }
    *out = w;
    return KVS_OK;
}

extern "C" void kvs_cuda_worker_destroy(kvs_cuda_worker *w)
{
    if (!w) return;
    kvs_cuda_res_free(&w->r);
    free(w);
}

/* One job, passed by value (fits the 4 KiB parameter space). obj[i] == 0: skip. */
struct kc_job {
    uint64_t obj[KVS_CUDA_MAX_JOB_BLOCKS]; /* device addresses of the objects */
    uint64_t gen[KVS_CUDA_MAX_JOB_BLOCKS];
    uint32_t bid[KVS_CUDA_MAX_JOB_BLOCKS];
    const struct kc_dev_tensor *T;
    uint64_t *out_gen;
    uint64_t stamp_off;
    uint32_t n, nt, upb, dir;
};

template <int U>
__global__ void kc_kernel(const __grid_constant__ kc_job j)
{
    const uint64_t total = (uint64_t)j.n * j.upb;
    for (uint64_t u = blockIdx.x; u < total; u += gridDim.x) {
        const uint32_t i = (uint32_t)(u / j.upb), r = (uint32_t)(u % j.upb);
        const uint64_t obj = j.obj[i];
        if (!obj) continue;
        uint32_t lo = 0, hi = j.nt - 1;
        while (lo < hi) {
            uint32_t mid = (lo + hi + 1) >> 1;
            if (__ldg(&j.T[mid].unit_start) <= r)
                lo = mid;
            else
                hi = mid - 1;
        }
        const struct kc_dev_tensor *t = &j.T[lo];
        const uint32_t ppc = __ldg(&t->ppc), rr = r - __ldg(&t->unit_start);
        const uint32_t c = rr / ppc, p = rr % ppc;
        const uint64_t cb = __ldg(&t->chunk_bytes);
        const uint64_t off = (uint64_t)p * KC_PIECE;
        const uint64_t len = cb - off < KC_PIECE ? cb - off : KC_PIECE;
        char *dev = (char *)(__ldg(&t->base) + (uint64_t)j.bid[i] * __ldg(&t->block_stride) +
                             (uint64_t)c * __ldg(&t->chunk_stride) + off);
        char *host = (char *)(obj + __ldg(&t->payload_off) + (uint64_t)c * cb + off);
        if (j.dir == KVS_CUDA_DUMP)
            kc_copy<U>(host, dev, len);
        else
            kc_copy<U>(dev, host, len);
    }
    if (blockIdx.x == 0)
        for (uint32_t i = threadIdx.x; i < j.n; i += blockDim.x) {
            if (!j.obj[i]) continue;
            volatile uint64_t *s = (volatile uint64_t *)(j.obj[i] + j.stamp_off);
            if (j.dir == KVS_CUDA_DUMP)
                *s = j.gen[i];
            else
                j.out_gen[i] = *s;
        }
}

/* View-check words only (batch mode). */
__global__ void kc_stamp_kernel(const __grid_constant__ kc_job j)
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

static int kc_batch(kvs_cuda_worker *w, const kc_job *j, size_t n, void *const *obj,
                    const uint32_t *bid)
{
    kvs_cuda_ctx *x = w->x;
    if (kvs_cuda_res_reserve(&w->r, x->chunks * n) != KVS_OK) return KVS_ERR_NOMEM;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!j->obj[i]) continue;
        char *o = (char *)obj[i];
        for (uint32_t t = 0; t < x->nt; t++) {
            const kvs_cuda_tensor *T = &x->h_tensors[t];
            char *dev = (char *)(uintptr_t)(T->base + (uint64_t)bid[i] * T->block_stride);
            char *host = o + T->payload_off;
            for (uint32_t c = 0; c < T->count; c++, k++) {
                char *dv = dev + (uint64_t)c * T->chunk_stride, *hv = host + (uint64_t)c * T->chunk_bytes;
                w->r.dsts[k] = j->dir == KVS_CUDA_DUMP ? hv : dv;
                w->r.srcs[k] = j->dir == KVS_CUDA_DUMP ? dv : hv;
                w->r.sizes[k] = T->chunk_bytes;
            }
        }
    }
    return kvs_cuda_res_batch_copy(&w->r, k) == cudaSuccess ? KVS_OK : KVS_ERR_CUDA;
}

extern "C" int kvs_cuda_copy(kvs_cuda_worker *w, int dir, size_t n, void *const *obj,
                             const uint32_t *bid, const uint8_t *ok, const uint64_t *gen,
                             uint64_t *out_gen, void *wait_event)
{
    if (!w || n > KVS_CUDA_MAX_JOB_BLOCKS || !obj || !bid) return KVS_ERR_INVALID;
    kvs_cuda_ctx *x = w->x;
    if (!x->d_tensors) return KVS_ERR_LAYOUT;
    static kc_job zero_job;
    kc_job *j = (kc_job *)malloc(sizeof *j);
    if (!j) return KVS_ERR_NOMEM;
    *j = zero_job;
    uint64_t obj_bytes = x->stamp_off + 8;
    for (uint32_t t = 0; t < x->nt; t++) {
        uint64_t end = x->h_tensors[t].payload_off +
                       x->h_tensors[t].chunk_bytes * x->h_tensors[t].count;
        if (end > obj_bytes) obj_bytes = end;
    }
    size_t live = 0;
    for (size_t i = 0; i < n; i++) {
        j->obj[i] = 0;
        if (out_gen) out_gen[i] = 0;
        w->r.out_gen[i] = 0;
        if (ok && !ok[i]) continue;
        if ((uintptr_t)obj[i] % 8) continue; /* the view word must be aligned: fail it */
        j->obj[i] = kc_translate(x, (uintptr_t)obj[i], obj_bytes);
        j->bid[i] = bid[i];
        j->gen[i] = gen ? gen[i] : 0;
        live += j->obj[i] != 0;
    }
    j->T = x->d_tensors;
    j->out_gen = w->r.out_gen_dev;
    j->stamp_off = x->stamp_off;
    j->n = (uint32_t)n;
    j->nt = x->nt;
    j->upb = x->upb;
    j->dir = (uint32_t)dir;
    int rc = KVS_OK;
    cudaError_t e = cudaSuccess;
    if (live) {
        /* batch mode: the worker's other streams, on first use (before they
         * are told to wait for wait_event) */
        if (x->mode == KVS_CUDA_BATCH) kvs_cuda_res_grow_streams(&w->r, x->streams);
        for (int si = 0; wait_event && si < w->r.nstreams && e == cudaSuccess; si++)
            e = cudaStreamWaitEvent(w->r.streams[si], (cudaEvent_t)wait_event, 0);
        if (e == cudaSuccess && x->mode == KVS_CUDA_BATCH) {
            /* a failed batch may have left copies running on the streams
             * before the one that failed: synchronized below all the same */
            rc = kc_batch(w, j, n, obj, bid);
            if (rc == KVS_OK) {
                kc_stamp_kernel<<<1, 128, 0, w->r.streams[0]>>>(*j);
                e = cudaGetLastError();
            }
        } else if (e == cudaSuccess) {
            uint64_t units = (uint64_t)n * x->upb;
            uint64_t grid = (uint64_t)x->sms * (uint64_t)x->per_sm;
            if (grid > units) grid = units;
            if (grid < 1) grid = 1;
            if (x->unroll == 8)
                kc_kernel<8><<<(unsigned)grid, (unsigned)x->threads, 0, w->r.streams[0]>>>(*j);
            else
                kc_kernel<4><<<(unsigned)grid, (unsigned)x->threads, 0, w->r.streams[0]>>>(*j);
            e = cudaGetLastError();
        }
        /* Every stream, whatever failed: on an error, copies enqueued on the
         * other streams may still be moving bytes to or from the objects,
         * which the caller abandons or releases (and the pool hands out
         * again) once this returns. So nothing returns before they end, as
         * in parts.cu. */
        for (int si = 0; si < w->r.nstreams; si++) {
            cudaError_t s = cudaStreamSynchronize(w->r.streams[si]);
            if (e == cudaSuccess) e = s;
        }
        if (e != cudaSuccess && rc == KVS_OK) rc = KVS_ERR_CUDA;
        if (rc == KVS_OK && out_gen)
            for (size_t i = 0; i < n; i++) out_gen[i] = w->r.out_gen[i];
    }
    if (e != cudaSuccess || rc == KVS_ERR_CUDA) {
        static int warned;
        if (!warned) {
            warned = 1;
            fprintf(stderr, "kvshelf: CUDA copy failed: %s\n",
                    cudaGetErrorString(e != cudaSuccess ? e : cudaGetLastError()));
        }
        cudaGetLastError(); /* clear a non-sticky error for the next job */
    }
    free(j);
    return rc;
}
