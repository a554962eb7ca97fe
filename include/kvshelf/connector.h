/* kvshelf — KV connector: moves an inference engine's KV blocks between GPU
 * (or host) memory and the kvshelf pool.
 *
 * Model: the engine's KV cache is a set of tensors; in each, block `b` lives
 * at base + b*block_stride as `count` chunks of `chunk_bytes` spaced
 * `chunk_stride` apart (kvs_tensor_layout). One pool object per block holds
 * a header and then every tensor's chunks for that block, tensor by tensor in
 * registration order, so a load can be consumed layer by layer.
 *
 * Keys: the engine's block hashes (1..KVS_HASH_MAX bytes). The store key of
 * a block is 16 namespace bytes (xxh3-128 of the namespace string, world_size
 * and rank; see kvs_connector_store_key) followed by the hash bytes, so
 * different models or tensor-parallel ranks never see each other's blocks.
 * The layout fingerprint (per tensor: chunk_bytes and count; never addresses
 * or strides, so a restarted engine with another num_blocks still hits) is
 * NOT in the key, because a lookup-only client (the scheduler) knows no
 * layout: it is stored in every object's header and checked on load, where a
 * mismatch is a miss. So `ns` should name everything that changes the bytes
 * of a block (model, dtype, block size, attention backend), or lookups may
 * report hits that load as misses.
 *
 * Stored object (one per block and rank): a 64-byte header {magic "KVSB",
 * version, header size, tensor count, flags, key stamp (xxh3-64 of the store
 * key), payload length, layout fingerprint, generation (a nonce per write),
 * checksum (optional, opts.checksum), view stamp} followed by every tensor's
 * chunks for the block, tensor by tensor in registration order, each tensor's
 * chunks in order. Loads check the header before copying and the header, the
 * read lease and (CUDA) the GPU's view of the object after copying; any
 * mismatch makes that block a miss.
 *
 * Threads: all functions are thread-safe. dump/load return at once with a
 * task; worker threads do the copies.
 * Errors: negative kvs_error codes. A block that cannot be loaded for any
 * reason (absent, evicted, header mismatch, peer gone) is reported as a miss
 * (KVS_ERR_NOT_FOUND) or an error for that block — never as wrong bytes.
 */
#ifndef KVSHELF_CONNECTOR_H
#define KVSHELF_CONNECTOR_H

#include <stddef.h>
#include <stdint.h>

#include "client.h"
#include "config.h"
#include "errors.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_HASH_MAX 64
#define KVS_NAMESPACE_MAX 256
#define KVS_CONNECTOR_PREFIX_BYTES 16 /* namespace bytes before the hash in a store key */

typedef struct kvs_connector kvs_connector;
typedef struct kvs_task kvs_task;

/* Where block b of one KV tensor lives (all in bytes). */
typedef struct kvs_tensor_layout {
    uint64_t base;         /* device address (device >= 0) or host address (device == -2) */
    uint64_t block_stride; /* distance between block b and block b+1 */
    uint64_t chunk_bytes;  /* bytes in each contiguous chunk */
    uint64_t chunk_stride; /* distance between consecutive chunks of one block */
    uint32_t count;        /* chunks per block */
} kvs_tensor_layout;

/* Options for kvs_connector_open. Zero-initialise, then set what you need. */
typedef struct kvs_connector_opts {
    const char *ns;           /* namespace, e.g. model name + dtype + block size (required) */
    uint32_t rank;            /* this process's tensor-parallel rank */
    uint32_t world_size;      /* TP ranks (a lookup-only client checks all of them); 0 = 1 */
    uint32_t num_workers;     /* copy worker threads; 0 = default (2 for host tensors,
                                 4 with CUDA) */
    uint32_t max_inflight;    /* max blocks queued in tasks before backpressure; 0 = 65536 */
    int drop_when_full;       /* 1: dumps over max_inflight are dropped and counted;
                                 0: dump blocks the caller until room frees (default) */
    const char *backend;      /* "auto" (default), "host", "cuda-kernel", "cuda-batch".
                                 auto: device -2 -> host; device >= 0 -> decided by
                                 register_layout from the mean chunk size: >= 32 KiB
                                 cuda-batch (copy engines), else cuda-kernel (SM copies);
                                 KVS_ERR_UNSUPPORTED in a build without CUDA */
    int checksum;             /* 1: store an xxh3-64 checksum of each block and verify it on
                                 load (costs a CPU pass over the bytes; off by default) */
    int force_staging;        /* 1: never copy straight into mapped segments; go through a
                                 staging buffer and kvs_slot_write/read, as for objects on
                                 other hosts (tests use it) */
} kvs_connector_opts;

/* Opens a connector over a new client built from `cfg`.
 * device >= 0: CUDA device ordinal (tensors are device memory);
 * device == -1: lookup-only client (an engine's scheduler): no layout, no
 *               dump/load, no segment contributed;
 * device == -2: host memory tensors (no GPU; used by tests and CPU engines).
 * Returns KVS_OK and *out, or an error with a message in `err`. */
int kvs_connector_open(const kvs_config *cfg, int device, const kvs_connector_opts *opts,
                       kvs_connector **out, char *err, size_t errlen);

/* Registers the KV tensors (copied). Must be called once before dump/load.
 * num_blocks bounds the block ids dump/load accept. The layout fingerprint
 * (geometry, not addresses) is stored in every object header and checked on
 * load; it is not part of the keys (a lookup-only client knows no layout). */
int kvs_connector_register_layout(kvs_connector *c, const kvs_tensor_layout *tensors,
                                  size_t n_tensors, uint32_t num_blocks);

/* Bytes of one stored block object (header + all chunks), 0 before a layout. */
uint64_t kvs_connector_block_bytes(const kvs_connector *c);

/* The layout fingerprint stored in object headers, 0 before a layout. */
uint64_t kvs_connector_layout_fingerprint(const kvs_connector *c);

/* Writes into `out` (cap bytes) the store key under which connectors opened
 * with (ns, world_size, rank) keep block `hash`: KVS_CONNECTOR_PREFIX_BYTES
 * namespace bytes then the hash bytes. world_size 0 means 1. Returns the key
 * length (> 0), KVS_ERR_INVALID, or KVS_ERR_TOO_LARGE if cap is too small.
 * Lets tools and other clients find, inspect or remove a connector's objects. */
int kvs_connector_store_key(const char *ns, uint32_t world_size, uint32_t rank,
                            const kvs_key *hash, uint8_t *out, size_t cap);

/* The store client the connector uses (owned by the connector: do not close
 * it). For statistics and debugging. */
kvs_client *kvs_connector_client(kvs_connector *c);

/* hit[i] = 1 if block hashes[i] is stored (for every rank on a lookup-only
 * client), else 0. One round trip. */
int kvs_connector_lookup(kvs_connector *c, const kvs_key *hashes, size_t n, uint8_t *hit);

/* Returns the number of leading hashes that are all stored (>= 0), or an error. */
int kvs_connector_lookup_prefix(kvs_connector *c, const kvs_key *hashes, size_t n);

/* Starts copying blocks block_ids[i] to the pool under hashes[i]. If
 * `after_event` (a cudaEvent_t, may be NULL) is given, copies start only
 * after it completes; the caller's stream is never synchronized (the event's
 * state is captured when dump is called, so the caller may re-record it at
 * once). after_event needs a CUDA backend (KVS_ERR_INVALID otherwise).
 * Blocks already stored (or being stored by another writer) are skipped:
 * their result is KVS_OK and they count in skipped_blocks. With
 * drop_when_full, blocks over max_inflight get KVS_ERR_BUSY (dropped_blocks).
 * Returns KVS_OK and a task in *task, or an error (nothing started):
 * KVS_ERR_INVALID, KVS_ERR_LAYOUT (no layout, or a block id >= num_blocks),
 * KVS_ERR_UNSUPPORTED (lookup-only), KVS_ERR_CLOSED, KVS_ERR_NOMEM. */
int kvs_connector_dump(kvs_connector *c, const kvs_key *hashes, const uint32_t *block_ids,
                       size_t n, void *after_event, kvs_task **task);

/* Starts loading hashes[i] into block block_ids[i]. Per-block results come
 * with kvs_task_results: KVS_OK loaded, KVS_ERR_NOT_FOUND miss (absent,
 * evicted, header/layout/lease mismatch), other error. A block that is not
 * KVS_OK may have been partly written: the engine must recompute it.
 * Loads are never dropped: over max_inflight the caller waits. */
int kvs_connector_load(kvs_connector *c, const kvs_key *hashes, const uint32_t *block_ids,
                       size_t n, kvs_task **task);

/* ---- objects given as explicit parts (no registered layout needed) ----
 *
 * For callers whose memory is not one block layout (unified-cache-
 * management's stores hand over a list of tensors or addresses per object):
 * object i is its parts addrs[i*ppo + k], k = 0..ppo-1 (lens[i*ppo + k]
 * bytes each), stored back to back after a 64-byte header (the block
 * header, with flag "parts", n_tensors = ppo and as fingerprint an xxh3-64
 * of the part sizes and the object's tag). Parts are device memory of the
 * connector's device (device >= 0; copied with cudaMemcpyBatchAsync straight
 * to/from the mapped pool object, or through pinned staging when the object
 * is not mappable) or host memory (device -2; memcpy). Nothing is copied out
 * of the caller's arrays after the call returns except the addresses and
 * lengths themselves (copied): the memory they point to must stay valid and
 * (dump) unchanged until the task finished.
 *
 * Keys: hashes[i] names object i as for block dumps (namespace prefix +
 * hash, 1..KVS_HASH_MAX bytes), or, with opts->raw_keys, the store key is
 * hashes[i] as given (1..KVS_KEY_MAX bytes; the caller keeps key spaces
 * apart, as with kvs_put).
 *
 * Guarantees as for blocks: per-object results, skip of objects already
 * stored (dump: KVS_OK, counted in skipped_blocks), backpressure
 * (max_inflight counts objects; drop_when_full drops dumps with
 * KVS_ERR_BUSY), lease and view checks, never wrong bytes. Load results:
 *   KVS_OK            loaded;
 *   KVS_ERR_NOT_FOUND miss: absent, evicted, lease lost during the copy, or
 *                     the object is not a parts object of this key (written
 *                     by kvs_put / block dumps, incomplete);
 *   KVS_ERR_TOO_LARGE the stored object has another total size;
 *   KVS_ERR_CORRUPT   same size but other part count, part sizes or tag
 *                     (or, with checksums, a checksum mismatch);
 *   other errors      (KVS_ERR_CUDA, KVS_ERR_NOMEM, transport errors).
 * Except for KVS_ERR_TOO_LARGE/KVS_ERR_CORRUPT/KVS_ERR_NOT_FOUND found before
 * copying (then nothing was copied), an object that is not KVS_OK may have
 * been partly written. */

/* Striped objects (opts->stripes > 1), for callers that move one slice of
 * every object per call, e.g. UCM's layerwise mode (one call per layer, the
 * object a whole KV block of every layer):
 *
 * object i is `stripes` stripes stored back to back after the header, each
 * laid out as the call's ppo parts of object i (every call must give the
 * same part lengths for an object). Payload and fingerprint are those of an
 * object of stripes*ppo parts, the lengths repeated: a striped object is
 * byte for byte the object a whole-object call giving every stripe's parts
 * in order stores, so either kind of call loads the other's objects. A call
 * moves stripe opts->stripe (< stripes) of each of its objects.
 *   dump: the first call that reaches an object reserves it (one master
 *         round trip for the job's new objects) and every call copies its
 *         stripe into the reserved space; the object is published once all
 *         its stripes are copied, and only then do lookups and loads see it.
 *         A call's result is KVS_OK once its stripe is copied (the object
 *         may still wait for other stripes); a stripe already copied (or
 *         being copied) is not copied again (KVS_OK); an object that is
 *         already stored is skipped (KVS_OK, as whole objects). An object
 *         with a failed stripe is abandoned, never published; its later
 *         stripes fail with the same error until the idle time below has
 *         passed, after which a stripe of it starts a new object (which
 *         needs all its stripes again before it is published). An object
 *         left incomplete (stripes that never come) is abandoned once no
 *         call held it for KVSHELF_STRIPE_IDLE_MS (default 10000 for dumps,
 *         2000 for loads; checked by a worker every second even when no call
 *         comes), or at close. opts.checksum is not applied to striped
 *         objects in segments this process does not map (they move through
 *         staging): their header is still checked.
 *   load: the first call that reaches an object takes its read lease and
 *         checks its header; later calls copy their stripe without asking the
 *         master. The lease is ended once every stripe was loaded, or when
 *         no call held it for KVSHELF_STRIPE_IDLE_MS, or at close; a
 *         lease that runs out meanwhile (the master's lease time, 5 s by
 *         default) makes later stripes misses. Results as for whole objects.
 * At most 65536 stripes; an object of at most 1 GiB - 64 in all. */

/* Options of kvs_connector_dump_parts_ex / load_parts_ex. Zero-initialise. */
typedef struct kvs_parts_opts {
    const uint64_t *tags; /* n per-object tags mixed into the fingerprint (a load
                             must give the tag the dump gave, e.g. a hash of the
                             dtype and shape), or NULL: all 0 */
    int raw_keys;         /* 1: hashes[i] is the whole store key (no namespace) */
    uint32_t stripe;      /* striped objects: the stripe this call moves */
    uint32_t stripes;     /* stripes per object (see above); 0 or 1: whole objects */
} kvs_parts_opts;

/* Starts storing n objects made of parts (see above). after_event as for
 * kvs_connector_dump (CUDA backends only). addrs and lens hold n*parts_per_obj
 * entries (copied; every length >= 1, every address != 0; an object's
 * payload at most 1 GiB - 64). Returns KVS_OK and a task in *task (free it
 * with kvs_task_free), or an error with nothing started: KVS_ERR_INVALID
 * (bad argument, key length, event without CUDA), KVS_ERR_TOO_LARGE (object
 * over 1 GiB), KVS_ERR_UNSUPPORTED (lookup-only connector), KVS_ERR_CLOSED,
 * KVS_ERR_NOMEM, KVS_ERR_CUDA (event snapshot). */
int kvs_connector_dump_parts(kvs_connector *c, const kvs_key *hashes, size_t n,
                             const uint64_t *addrs, const uint64_t *lens, size_t parts_per_obj,
                             void *after_event, kvs_task **task);

/* Starts loading n objects into their parts (see above; per-object results
 * with kvs_task_results). Arguments and errors as kvs_connector_dump_parts.
 * Loads are never dropped: over max_inflight the caller waits. */
int kvs_connector_load_parts(kvs_connector *c, const kvs_key *hashes, size_t n,
                             const uint64_t *addrs, const uint64_t *lens, size_t parts_per_obj,
                             kvs_task **task);

/* kvs_connector_dump_parts / load_parts with options (opts may be NULL). */
int kvs_connector_dump_parts_ex(kvs_connector *c, const kvs_key *hashes, size_t n,
                                const uint64_t *addrs, const uint64_t *lens,
                                size_t parts_per_obj, void *after_event,
                                const kvs_parts_opts *opts, kvs_task **task);
int kvs_connector_load_parts_ex(kvs_connector *c, const kvs_key *hashes, size_t n,
                                const uint64_t *addrs, const uint64_t *lens,
                                size_t parts_per_obj, const kvs_parts_opts *opts,
                                kvs_task **task);

/* Waits for `t` up to timeout_ms (-1 = forever). KVS_OK when finished (even if
 * some blocks missed: see kvs_task_results), KVS_ERR_TIMEOUT if still running. */
int kvs_task_wait(kvs_task *t, int timeout_ms);

/* Returns 1 if finished, 0 if still running. Never blocks. */
int kvs_task_check(kvs_task *t);

/* After the task finished: copies per-block statuses into results[0..n-1]
 * (at most the task's block count; results may be NULL) and returns the
 * number of blocks with KVS_OK. KVS_ERR_BUSY if the task is still running. */
int kvs_task_results(kvs_task *t, int *results, size_t n);

/* Makes the GPU work the caller enqueues on `stream` after this call wait,
 * on the GPU, until `t` has finished: every copy done and checked, whatever
 * the results. The calling thread is not blocked, so an engine can launch
 * the next forward while its KV is still loading. Then, as always, read
 * kvs_task_results once the task finished, and discard that forward's
 * output for blocks that are not KVS_OK.
 *
 * `stream`: a cudaStream_t of the connector's device created non-blocking
 * (cudaStreamNonBlocking; torch.cuda.Stream() is). The legacy default stream
 * (NULL) is refused with KVS_ERR_INVALID: measured on an H100, a forward
 * gated there held the load's own copies back until the gate timed out (8k
 * tokens and more of a 14B model), while on a stream of its own the same
 * forward overlapped the load at every length (bench/RESULTS.md). A gate
 * waits at most KVSHELF_GATE_TIMEOUT_MS (default 2000) and then opens by
 * itself; it is also forced open before anything in the load's path that
 * synchronizes the whole device. Either way the task's blocks are then
 * KVS_ERR_EARLY: redo the work. Keep the launches queued behind a gate
 * bounded (e.g. wait for the task on the host before the last layers, as
 * vLLM's wait_for_layer_load does).
 *
 * One gate per task (KVS_ERR_INVALID for a second); a task already finished
 * adds nothing (KVS_OK). Errors: KVS_ERR_INVALID, KVS_ERR_UNSUPPORTED (not a
 * CUDA backend), KVS_ERR_BUSY (256 gates closed in the process),
 * KVS_ERR_CUDA. */
int kvs_task_gpu_wait(kvs_task *t, void *stream);

/* Number of blocks in the task (0 for NULL). */
size_t kvs_task_size(const kvs_task *t);

/* Frees a task. If still running it is cancelled and freed when its workers
 * let go; results are then lost. Safe with NULL. */
void kvs_task_free(kvs_task *t);

/* Counters of the connector (monotonic). readahead_stripes: stripes of
 * striped loads served from the CUDA read-ahead (KVSHELF_READAHEAD_MB: a
 * window of the next stripes of an object is copied to device memory while
 * the caller waits for the current one; counted also in loaded_blocks'
 * bytes). */
typedef struct kvs_connector_counters {
    uint64_t dumped_blocks, loaded_blocks, missed_blocks, failed_blocks, dropped_blocks,
        skipped_blocks, bytes_dumped, bytes_loaded, readahead_stripes;
} kvs_connector_counters;
void kvs_connector_get_counters(kvs_connector *c, kvs_connector_counters *out);

/* Name of the copy backend in use: "host", "cuda-kernel", "cuda-batch", or
 * "none" on a lookup-only connector. Static string. */
const char *kvs_connector_backend(const kvs_connector *c);

/* Waits for or cancels tasks in flight (they finish with KVS_ERR_CLOSED for
 * blocks not yet done), frees the connector and its client. Safe with NULL. */
void kvs_connector_close(kvs_connector *c);

#ifdef __cplusplus
}
#endif
#endif
