/* CUDA copy backends of the KV connector (internal; plain C interface so the
 * connector, compiled by the C compiler, can call it).
 *
 * Built only when CMake finds the CUDA toolkit (KVS_HAVE_CUDA). Two ways to
 * move a job's chunks between device tensors and host objects:
 *   KVS_CUDA_KERNEL  one gather/scatter kernel: SMs copy through mapped host
 *                    memory with 16-byte accesses, a grid over (block, chunk piece);
 *   KVS_CUDA_BATCH   one cudaMemcpyBatchAsync per job (copy engines; CUDA 12.8+).
 * Host objects are either inside a segment mapping (registered once per mapping
 * with cudaHostRegister, found through /proc/self/maps) or in pinned staging
 * memory from kvs_cuda_pinned_alloc.
 *
 * View check: every copy also moves one 8-byte word per object through the GPU's
 * view of the host memory (dump: the GPU writes gen[i] at obj[i]+stamp_off;
 * load: the GPU reads obj[i]+stamp_off into out_gen[i]). The connector compares
 * it with the CPU's view, so a stale registration (the mapping replaced under
 * the same address) is detected and becomes a failed block, never wrong bytes.
 */
#ifndef KVS_CUDA_H
#define KVS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum kvs_cuda_mode { KVS_CUDA_AUTO = 0, KVS_CUDA_KERNEL = 1, KVS_CUDA_BATCH = 2 };
enum kvs_cuda_dir { KVS_CUDA_DUMP = 1, KVS_CUDA_LOAD = 2 };

/* Most blocks in one kvs_cuda_copy call. */
#define KVS_CUDA_MAX_JOB_BLOCKS 128

/* One KV tensor (normalized: contiguous chunks already merged). */
typedef struct kvs_cuda_tensor {
    uint64_t base;         /* device address of block 0 */
    uint64_t block_stride; /* bytes between blocks */
    uint64_t chunk_bytes;  /* bytes per chunk */
    uint64_t chunk_stride; /* bytes between chunks of one block */
    uint64_t payload_off;  /* offset of this tensor's first chunk inside an object */
    uint32_t count;        /* chunks per block */
} kvs_cuda_tensor;

typedef struct kvs_cuda_ctx kvs_cuda_ctx;       /* one per connector */
typedef struct kvs_cuda_worker kvs_cuda_worker; /* one per worker thread */

/* Number of CUDA devices (0 when none or the driver is missing). */
int kvs_cuda_device_count(void);

/* Creates a context on `device` with `mode` (KVS_CUDA_AUTO: kernel or batch
 * chosen by kvs_cuda_ctx_set_layout from the mean chunk size, batch at >=
 * KVSHELF_CUDA_BATCH_MIN_CHUNK bytes, default 32 KiB). Returns KVS_OK or KVS_ERR_CUDA /
 * KVS_ERR_INVALID / KVS_ERR_NOMEM with a message in err. */
int kvs_cuda_ctx_create(int device, int mode, kvs_cuda_ctx **out, char *err, size_t errlen);

/* Copies the layout to the device. stamp_off: offset in every object of the
 * 8-byte view-check word. Returns KVS_OK or an error. */
int kvs_cuda_ctx_set_layout(kvs_cuda_ctx *x, const kvs_cuda_tensor *t, size_t n,
                            uint64_t stamp_off);

/* Frees the context and drops its references to registered host mappings
 * (unregistered when no context uses them). Safe with NULL. */
void kvs_cuda_ctx_destroy(kvs_cuda_ctx *x);

/* Backend name: "cuda-kernel", "cuda-batch" ("cuda" for auto not yet decided). */
const char *kvs_cuda_mode_name(int mode);

/* The mode in use (KVS_CUDA_KERNEL or KVS_CUDA_BATCH once decided). */
int kvs_cuda_ctx_mode(const kvs_cuda_ctx *x);

/* Per-worker state (own non-blocking stream). Call from the worker thread. */
int kvs_cuda_worker_create(kvs_cuda_ctx *x, kvs_cuda_worker **out);
void kvs_cuda_worker_destroy(kvs_cuda_worker *w);

/* Takes a snapshot of the caller's event (cudaEvent_t) without touching the
 * caller's stream: a private stream waits on it and records a private event,
 * returned in *snap. Returns KVS_OK or KVS_ERR_CUDA. */
int kvs_cuda_event_snapshot(kvs_cuda_ctx *x, void *user_event, void **snap);
void kvs_cuda_event_free(void *snap);

/* Copies n (<= KVS_CUDA_MAX_JOB_BLOCKS) blocks between the device tensors and
 * host objects obj[i] (block id bid[i]) and waits until done. wait_event (a
 * snapshot) may be NULL: the worker's stream waits on it first. dump: gen[i]
 * is written at obj[i]+stamp_off after the payload; load: out_gen[i] gets the
 * word at obj[i]+stamp_off as the GPU saw it. ok[i] == 0 skips block i.
 * Returns KVS_OK, or KVS_ERR_CUDA (sticky device errors included). */
int kvs_cuda_copy(kvs_cuda_worker *w, int dir, size_t n, void *const *obj, const uint32_t *bid,
                  const uint8_t *ok, const uint64_t *gen, uint64_t *out_gen, void *wait_event);

/* 1 if the GPU can reach host object [p, p+len) directly (registering its
 * mapping on first use; a refusal is remembered), else 0: the connector then
 * copies that object through pinned staging. */
int kvs_cuda_can_map(kvs_cuda_ctx *x, const void *p, uint64_t len);

/* Registers with CUDA, now, every kvshelf segment this process has mapped
 * (/dev/shm/kvshelf-* in /proc/self/maps). cudaHostRegister of a large pool
 * pins every page and stalls the whole process for seconds (about 1.3 s per
 * GiB measured on an H100 host): done here, at layout registration (engine
 * start), instead of inside the first dump. Returns how many were registered. */
int kvs_cuda_preregister(kvs_cuda_ctx *x);

/* The device address of host object [p, p+len) (registering its mapping on
 * first use, as kvs_cuda_can_map), or 0 when the GPU cannot reach it. */
uint64_t kvs_cuda_translate(kvs_cuda_ctx *x, const void *p, uint64_t len);

/* ---- objects given as explicit parts (parts.cu; kvs_connector_dump_parts) ----
 * A parts worker has its own streams (KVSHELF_CUDA_STREAMS) and view-check
 * words; one per connector worker thread, created on that thread. */
typedef struct kvs_cuda_pworker kvs_cuda_pworker;

/* Creates a parts worker on x's device (the calling thread's current device
 * becomes x's). Returns KVS_OK, KVS_ERR_NOMEM or KVS_ERR_CUDA. */
int kvs_cuda_pworker_create(kvs_cuda_ctx *x, int device, kvs_cuda_pworker **out);

/* Waits for the worker's streams and frees it. Safe with NULL. */
void kvs_cuda_pworker_destroy(kvs_cuda_pworker *w);

/* Copies n (<= KVS_CUDA_MAX_JOB_BLOCKS) objects between device parts and
 * host objects, one cudaMemcpyBatchAsync per stream, and waits. Object i is
 * obj[i] (host memory the GPU can reach: a registered segment mapping or
 * pinned staging); its parts are addrs[i*ppo+k] (device memory, lens[i*ppo+k]
 * bytes), stored back to back from obj[i]+payload_off. dump: parts -> object,
 * then gen[i] written at obj[i]+stamp_off through the GPU's view; load:
 * object -> parts, out_gen[i] = the word at obj[i]+stamp_off as the GPU saw
 * it (0 when not read). ok[i] == 0 skips object i. wait_event (a snapshot
 * from kvs_cuda_event_snapshot, may be NULL): copies start after it.
 * Returns KVS_OK, KVS_ERR_INVALID, KVS_ERR_NOMEM or KVS_ERR_CUDA. */
int kvs_cuda_copy_parts(kvs_cuda_pworker *w, int dir, size_t n, void *const *obj,
                        const uint64_t *addrs, const uint64_t *lens, size_t ppo,
                        uint64_t payload_off, uint64_t stamp_off, const uint8_t *ok,
                        const uint64_t *gen, uint64_t *out_gen, void *wait_event);

/* kvs_cuda_copy_parts for the stripes of striped objects: dobj[i] (may be
 * NULL) is the GPU's address of obj[i] from an earlier kvs_cuda_translate
 * (0: translated here); object i's parts start at obj[i] + poffs[i] (per
 * object; poffs NULL: payload_off for all),
 * and a dump with check_off != 0 also reads, after writing gen[i] at
 * obj[i]+stamp_off, the word at obj[i]+check_off through the GPU's view into
 * out_gen[i] (the stamp alone proves nothing once an earlier stripe wrote
 * it; a word the CPU wrote, read back by the GPU, does). The rest as
 * kvs_cuda_copy_parts. */
int kvs_cuda_copy_parts_ex(kvs_cuda_pworker *w, int dir, size_t n, void *const *obj,
                           const uint64_t *dobj, const uint64_t *poffs, const uint64_t *addrs, const uint64_t *lens,
                           size_t ppo, uint64_t payload_off, uint64_t stamp_off,
                           uint64_t check_off, const uint8_t *ok, const uint64_t *gen,
                           uint64_t *out_gen, void *wait_event);

/* ---- read-ahead of striped loads (ahead.cu; see there for why) ----
 * A buffer of device memory (carved from the context's arena of
 * KVSHELF_READAHEAD_MB) holding a window of the next stripes of a job's
 * objects (one range per object), copied before the calls that load them
 * arrive. Reference counted: the last
 * reference waits for its copies, then gives the memory back. */
typedef struct kvs_cuda_ahead kvs_cuda_ahead;

/* Takes / drops a reference (NULL: nothing). Unref may wait for copies. */
void kvs_cuda_ahead_ref(kvs_cuda_ahead *b);
void kvs_cuda_ahead_unref(kvs_cuda_ahead *b);

/* Starts copying, on w's read-ahead streams (never waited for by a copy
 * job), the stripe [off[i], off[i]+len[i]) of every object i with want[i]
 * (host memory obj[i], its GPU address dobj[i] or 0: translated here) into
 * a new buffer, and the object's view-check word (obj + stamp_off) after
 * it. budget: the arena's bytes if it is created now. Returns KVS_OK with
 * *out (one reference) and off_out[i] (where object i's stripe starts in it;
 * UINT64_MAX: not read ahead), or KVS_ERR_NO_SPACE (arena full or no device
 * memory), KVS_ERR_INVALID (nothing to read), KVS_ERR_NOMEM, KVS_ERR_CUDA,
 * with *out NULL and nothing enqueued. */
int kvs_cuda_ahead_start(kvs_cuda_pworker *w, size_t n, const uint8_t *want, void *const *obj,
                         const uint64_t *dobj, const uint64_t *off, const uint64_t *len,
                         uint64_t stamp_off, uint64_t budget, kvs_cuda_ahead **out,
                         uint64_t *off_out);

/* kvs_cuda_copy_parts_ex for a stripe load job (KVS_CUDA_LOAD): objects
 * with ra[i] != NULL are copied from that buffer (the object's range starts
 * at ra_off[i], as kvs_cuda_ahead_start's off_out gave it; the stripe is
 * ra_skip[i] bytes into it; their view-check word is the one read right
 * after the buffer's copy; the GPU waits for it), the others from obj[i].
 * Errors as kvs_cuda_copy_parts_ex. */
int kvs_cuda_copy_parts_ra(kvs_cuda_pworker *w, size_t n, void *const *obj, const uint64_t *dobj,
                           const uint64_t *poffs, const uint64_t *addrs, const uint64_t *lens,
                           size_t ppo, uint64_t stamp_off, const uint8_t *ok, uint64_t *out_gen,
                           kvs_cuda_ahead *const *ra, const uint64_t *ra_off,
                           const uint64_t *ra_skip);

/* Forgets (unregisters) the mapping containing host address p after a failed
 * view check, so the next use registers the current mapping afresh. */
void kvs_cuda_forget(kvs_cuda_ctx *x, const void *p);

/* ---- GPU gates (gate.cu; kvs_task_gpu_wait) ----
 * A gate makes a stream wait, on the GPU, until the host opens it: work the
 * caller enqueues after the gate runs only then, and the calling thread is
 * never blocked. At most 256 gates are closed (or not yet passed) at once
 * in a process.
 *
 * A gate that stays closed longer than KVSHELF_GATE_TIMEOUT_MS (default
 * 2000) opens by itself (see gate.cu for why) and counts as opened early.
 *
 * Anything that synchronizes the whole device (cudaFreeHost,
 * cudaHostUnregister, cudaHostRegister, cudaMalloc/cudaFree, ...) would wait
 * behind a closed gate, and a gate waiting for that very thread would never
 * open: such calls in the copy paths first call kvs_cuda_gates_force_open,
 * and the owners of gates opened that way learn it from kvs_cuda_gate_open. */

/* Closes a new gate on `stream` (a cudaStream_t; NULL = the legacy default
 * stream) of `device`: returns KVS_OK and its ticket, KVS_ERR_BUSY (256 in
 * use) or KVS_ERR_CUDA. */
int kvs_cuda_gate_close(void *stream, int device, uint32_t *ticket);

/* Opens the gate of `ticket`: 1 if it was still closed, 0 if it had opened
 * before (kvs_cuda_gates_force_open, or its timeout: work behind it may have
 * run too early), -1 for a ticket not in use. The ticket is spent. */
int kvs_cuda_gate_open(uint32_t ticket);

/* Opens every closed gate at once, marking them opened early. Returns how
 * many. Call before anything that synchronizes the device. */
int kvs_cuda_gates_force_open(void);

/* Pinned, device-mapped host memory for staging. NULL on failure. */
void *kvs_cuda_pinned_alloc(size_t n);
void kvs_cuda_pinned_free(void *p);

/* Device memory helpers used by tests and the benchmark. */
void *kvs_cuda_dev_alloc(int device, size_t n);
void kvs_cuda_dev_free(void *p);
int kvs_cuda_memcpy(void *dst, const void *src, size_t n); /* cudaMemcpy, kind default */

#ifdef __cplusplus
}
#endif
#endif
