/* GPU gates (see kvs_cuda.h): a stream stops at a one-thread kernel that
 * sleeps until a word of pinned, device-mapped host memory becomes non-zero;
 * the host writes the word when the task the gate belongs to has finished.
 *
 * The kernel gives up after KVSHELF_GATE_TIMEOUT_MS (default 2 s) and says
 * so in the gate's second word; the owner then learns from kvs_cuda_gate_open
 * that work behind the gate may have run early. This bounds the damage of a
 * wait the library cannot see: measured on an H100, a gate on the legacy
 * default stream held back the copies of the very load it waited for
 * (kvs_task_gpu_wait now refuses that stream); anything else that makes the
 * load wait for the gated stream would otherwise hang for good.
 *
 * Slots are process-wide (gates of every connector and device share them:
 * the memory is portable and, with unified addressing, the device address
 * of a word is its host address). A slot is reused only once the event
 * recorded after its kernel has completed, so a late kernel never reads the
 * next owner's word. */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "common/util.h"
#include "kvs_cuda.h"
#include "kvshelf/errors.h"

#define NGATES 256
#define WORD_STRIDE 16 /* words apart: one 64-byte line per gate */

enum { G_FREE = 0, G_CLOSED, G_RETIRING, G_DEAD /* never reused: a kernel may read it */ };

struct gate {
    int state;
    int early;      /* opened by kvs_cuda_gates_force_open */
    uint32_t gen;   /* bumped per use: tickets of old uses are refused */
    int device;     /* device of its event */
    cudaEvent_t ev; /* recorded after the kernel; NULL until first used */
};

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static volatile uint32_t *g_words; /* NGATES * WORD_STRIDE, pinned + mapped */
static struct gate g_gates[NGATES];

static __device__ uint64_t gate_now_ns(void)
{
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

/* w[0]: opened by the host; w[1]: set here when the wait gave up. */
__global__ void gate_wait_kernel(volatile uint32_t *w, uint64_t timeout_ns)
{
    uint64_t t0 = gate_now_ns();
    while (w[0] == 0) {
        if (gate_now_ns() - t0 > timeout_ns) {
            w[1] = 1;
            __threadfence_system();
            return;
        }
        __nanosleep(2000);
    }
}

/* KVSHELF_GATE_TIMEOUT_MS (default 2000, 1..600000). Caller holds g_mu. */
static uint64_t gate_timeout_ns(void)
{
    static uint64_t ns;
    if (!ns) ns = kvs_env_u64("KVSHELF_GATE_TIMEOUT_MS", 2000, 1, 600000, "milliseconds") * 1000000ull;
    return ns;
}

/* Caller holds g_mu. */
static int words_ready(void)
{
    if (g_words) return 1;
    void *p = NULL;
    if (cudaHostAlloc(&p, NGATES * WORD_STRIDE * sizeof(uint32_t),
                      cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    memset(p, 0, NGATES * WORD_STRIDE * sizeof(uint32_t));
    g_words = (volatile uint32_t *)p;
    return 1;
}

/* A free slot (reclaiming retired ones whose kernel has passed), or -1.
 * Caller holds g_mu. */
static int take_slot(void)
{
    for (int i = 0; i < NGATES; i++)
        if (g_gates[i].state == G_FREE) return i;
    for (int i = 0; i < NGATES; i++) {
        struct gate *g = &g_gates[i];
        if (g->state != G_RETIRING) continue;
        int cur = -1;
        cudaGetDevice(&cur);
        if (cur != g->device) cudaSetDevice(g->device);
        cudaError_t e = cudaEventQuery(g->ev);
        if (cur != g->device && cur >= 0) cudaSetDevice(cur);
        if (e == cudaSuccess) return i;
        if (e != cudaErrorNotReady) cudaGetLastError();
    }
    return -1;
}

extern "C" int kvs_cuda_gate_close(void *stream, int device, uint32_t *ticket)
{
    pthread_mutex_lock(&g_mu);
    int rc = KVS_ERR_CUDA;
    int cur = -1;
    cudaGetDevice(&cur);
    if (cur != device && cudaSetDevice(device) != cudaSuccess) goto out;
    if (!words_ready()) goto restore;
    {
        int i = take_slot();
        if (i < 0) {
            rc = KVS_ERR_BUSY;
            goto restore;
        }
        struct gate *g = &g_gates[i];
        if (g->ev && g->device != device) {
            cudaEventDestroy(g->ev);
            g->ev = NULL;
        }
        if (!g->ev && cudaEventCreateWithFlags(&g->ev, cudaEventDisableTiming) != cudaSuccess) {
            g->ev = NULL;
            goto restore;
        }
        g->device = device;
        volatile uint32_t *w = g_words + (size_t)i * WORD_STRIDE;
        w[0] = 0;
        w[1] = 0;
        __sync_synchronize();
        cudaStream_t s = (cudaStream_t)stream;
        gate_wait_kernel<<<1, 1, 0, s>>>((uint32_t *)w, gate_timeout_ns());
        if (cudaGetLastError() != cudaSuccess) goto restore; /* nothing queued: still free */
        if (cudaEventRecord(g->ev, s) != cudaSuccess) {
            *w = 1; /* the kernel is queued: let it pass, never reuse the word */
            g->state = G_DEAD;
            goto restore;
        }
        g->state = G_CLOSED;
        g->early = 0;
        g->gen = (g->gen + 1) & 0xffffffu;
        *ticket = (g->gen << 8) | (uint32_t)i;
        rc = KVS_OK;
    }
restore:
    if (cur >= 0 && cur != device) cudaSetDevice(cur);
out:
    if (rc == KVS_ERR_CUDA) cudaGetLastError();
    pthread_mutex_unlock(&g_mu);
    return rc;
}

extern "C" int kvs_cuda_gate_open(uint32_t ticket)
{
    int i = (int)(ticket & 0xffu);
    pthread_mutex_lock(&g_mu);
    struct gate *g = &g_gates[i];
    int res = -1;
    if (g->gen == (ticket >> 8) && g->state == G_CLOSED) {
        volatile uint32_t *w = g_words + (size_t)i * WORD_STRIDE;
        w[0] = 1;
        __sync_synchronize();
        g->state = G_RETIRING;
        res = g->early || w[1] ? 0 : 1; /* forced, or the kernel gave up waiting */
    }
    pthread_mutex_unlock(&g_mu);
    return res;
}

extern "C" int kvs_cuda_gates_force_open(void)
{
    int n = 0;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < NGATES; i++) {
        struct gate *g = &g_gates[i];
        if (g->state != G_CLOSED || g->early) continue;
        g_words[(size_t)i * WORD_STRIDE] = 1;
        g->early = 1;
        n++;
    }
    if (n) __sync_synchronize();
    pthread_mutex_unlock(&g_mu);
    return n;
}
