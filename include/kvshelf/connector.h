/* kvshelf — KV connector: moves an inference engine's KV blocks between GPU
 * (or host) memory and the kvshelf pool.
 *
 * Model: the engine's KV cache is a set of tensors; in each, block `b` lives
 * at base + b*block_stride as `count` chunks of `chunk_bytes` spaced
 * `chunk_stride` apart (kvs_tensor_layout). One pool object per block holds
 * a header and then every tensor's chunks for that block, tensor by tensor in
 * registration order, so a load can be consumed layer by layer.
 *
 * Keys: the engine's block hashes (1..KVS_HASH_MAX bytes), namespaced inside
 * kvshelf by (namespace string, layout fingerprint, rank), so different
 * models, layouts or tensor-parallel ranks never read each other's blocks.
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
    uint32_t num_workers;     /* copy worker threads; 0 = default (2) */
    uint32_t max_inflight;    /* max blocks queued in tasks before backpressure; 0 = 65536 */
    int drop_when_full;       /* 1: dumps over max_inflight are dropped and counted;
                                 0: dump blocks the caller until room frees (default) */
    const char *backend;      /* "auto" (default), "host", "cuda-kernel", "cuda-batch" */
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
 * (geometry, not addresses) is mixed into every key and object header. */
int kvs_connector_register_layout(kvs_connector *c, const kvs_tensor_layout *tensors,
                                  size_t n_tensors, uint32_t num_blocks);

/* Bytes of one stored block object (header + all chunks), 0 before a layout. */
uint64_t kvs_connector_block_bytes(const kvs_connector *c);

/* hit[i] = 1 if block hashes[i] is stored (for every rank on a lookup-only
 * client), else 0. One round trip. */
int kvs_connector_lookup(kvs_connector *c, const kvs_key *hashes, size_t n, uint8_t *hit);

/* Returns the number of leading hashes that are all stored (>= 0), or an error. */
int kvs_connector_lookup_prefix(kvs_connector *c, const kvs_key *hashes, size_t n);

/* Starts copying blocks block_ids[i] to the pool under hashes[i]. If
 * `after_event` (a cudaEvent_t, may be NULL) is given, copies start only
 * after it completes; the caller's stream is never synchronized. Blocks
 * already stored are skipped (status KVS_ERR_EXISTS counts as done).
 * Returns KVS_OK and a task in *task, or an error (nothing started). */
int kvs_connector_dump(kvs_connector *c, const kvs_key *hashes, const uint32_t *block_ids,
                       size_t n, void *after_event, kvs_task **task);

/* Starts loading hashes[i] into block block_ids[i]. Per-block results come
 * with kvs_task_results: KVS_OK loaded, KVS_ERR_NOT_FOUND miss, other error. */
int kvs_connector_load(kvs_connector *c, const kvs_key *hashes, const uint32_t *block_ids,
                       size_t n, kvs_task **task);

/* Waits for `t` up to timeout_ms (-1 = forever). KVS_OK when finished (even if
 * some blocks missed: see kvs_task_results), KVS_ERR_TIMEOUT if still running. */
int kvs_task_wait(kvs_task *t, int timeout_ms);

/* Returns 1 if finished, 0 if still running. Never blocks. */
int kvs_task_check(kvs_task *t);

/* After the task finished: copies per-block statuses into results[0..n-1]
 * (n = the task's block count) and returns the number with KVS_OK. */
int kvs_task_results(kvs_task *t, int *results, size_t n);

/* Frees a task. If still running it is cancelled and freed when its workers
 * let go; results are then lost. Safe with NULL. */
void kvs_task_free(kvs_task *t);

/* Counters of the connector (monotonic). */
typedef struct kvs_connector_counters {
    uint64_t dumped_blocks, loaded_blocks, missed_blocks, failed_blocks, dropped_blocks,
        skipped_blocks, bytes_dumped, bytes_loaded;
} kvs_connector_counters;
void kvs_connector_get_counters(kvs_connector *c, kvs_connector_counters *out);

/* Name of the copy backend in use ("host", "cuda-kernel", ...). Static string. */
const char *kvs_connector_backend(const kvs_connector *c);

/* Waits for or cancels tasks in flight (they finish with KVS_ERR_CLOSED for
 * blocks not yet done), frees the connector and its client. Safe with NULL. */
void kvs_connector_close(kvs_connector *c);

#ifdef __cplusplus
}
#endif
#endif
