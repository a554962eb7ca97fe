/* kvshelf — client API of the store.
 *
 * A kvs_client connects to a master (or to the embedded host-local pool when
 * master_server_address is empty), optionally contributes a segment of
 * global_segment_size bytes of host memory, and stores and fetches byte
 * objects under opaque byte-string keys (1..KVS_KEY_MAX bytes).
 *
 * Threads: every function is thread-safe; many calls may be in flight at
 * once on one client (they are pipelined on shared connections).
 * Memory: the client never keeps pointers to caller buffers after a call
 * returns. Errors: negative kvs_error codes (see errors.h). A miss is
 * KVS_ERR_NOT_FOUND. If the master or a peer is lost the calls fail with
 * KVS_ERR_CONN / KVS_ERR_UNAVAILABLE and the client reconnects on its own.
 *
 * Environment: KVSHELF_NO_SHM=1 makes a client never map other processes'
 * segments, even on the same host: every byte then goes through the
 * transfer engine (TCP). For tests and debugging.
 */
#ifndef KVSHELF_CLIENT_H
#define KVSHELF_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "errors.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_KEY_MAX 256

typedef struct kvs_client kvs_client;

/* One key: `len` bytes at `data` (not NUL-terminated; any bytes allowed). */
typedef struct kvs_key {
    const void *data;
    uint32_t len;
} kvs_key;

/* One element of a batch call.
 *   put: `buf`/`len` are the value to store.
 *   get: `buf` receives the value, `len` is its capacity; `size` returns the
 *        stored size (also set when the buffer was too small: KVS_ERR_TOO_LARGE).
 * `status` returns KVS_OK or the negative error for this element. */
typedef struct kvs_item {
    kvs_key key;
    void *buf;
    uint64_t len;
    uint64_t size;
    int status;
} kvs_item;

/* Opens a client with `cfg` (copied). Connects to the master (starting the
 * embedded pool if none is configured and none runs), mounts a segment of
 * cfg->global_segment_size bytes if non-zero. In embedded mode the client
 * contributes no segment: the pool's own process holds the memory (sized by
 * the global_segment_size of the client that started it, the default if 0)
 * and every process of the user on the host shares it. On success stores
 * the client in *out and returns KVS_OK; on failure returns KVS_ERR_CONFIG,
 * KVS_ERR_CONN, KVS_ERR_AUTH, KVS_ERR_NOMEM or KVS_ERR_IO and writes a
 * message into `err` (if non-NULL). */
int kvs_client_open(const kvs_config *cfg, kvs_client **out, char *err, size_t errlen);

/* Unmounts this client's segment (objects stored there are dropped), closes
 * connections and frees the client. Safe with NULL. Calls still running in
 * other threads fail with KVS_ERR_CLOSED; do not use `c` after this returns. */
void kvs_client_close(kvs_client *c);

/* Stores `len` bytes at `value` under `key` (any memory). Overwrites nothing:
 * a key already present gives KVS_ERR_EXISTS. KVS_ERR_NO_SPACE if the pool is
 * full of leased/in-flight objects. */
int kvs_put(kvs_client *c, const void *key, uint32_t key_len, const void *value, uint64_t len);

/* Fetches the value of `key` into `buf` (capacity `cap`), stores its size in
 * *size (may be NULL). KVS_ERR_NOT_FOUND on a miss, KVS_ERR_TOO_LARGE if cap
 * is smaller than the value (then *size is still set). On any status but
 * KVS_OK the bytes of `buf` are unspecified: from a same-host segment a get
 * starts copying from where this client last saw the object while the
 * master is still answering, and keeps that copy only if the answer names
 * the same object (KVSHELF_LOC_CACHE=0 turns this off). */
int kvs_get(kvs_client *c, const void *key, uint32_t key_len, void *buf, uint64_t cap,
            uint64_t *size);

/* Registers [addr, addr+len) as memory put_from/get_into may use (pinned with
 * CUDA later when the connector needs it). Overlapping registrations are
 * KVS_ERR_INVALID. */
int kvs_register_memory(kvs_client *c, void *addr, uint64_t len);

/* Unregisters the region that starts at `addr`. KVS_ERR_NOT_FOUND if none. */
int kvs_unregister_memory(kvs_client *c, void *addr);

/* Like kvs_put / kvs_get, but the buffer must lie inside registered memory
 * (KVS_ERR_NOT_REGISTERED otherwise); bytes move with no intermediate copy. */
int kvs_put_from(kvs_client *c, const void *key, uint32_t key_len, const void *value,
                 uint64_t len);
int kvs_get_into(kvs_client *c, const void *key, uint32_t key_len, void *buf, uint64_t cap,
                 uint64_t *size);

/* Batch forms: one master round trip for the whole batch and pipelined
 * transfers. Each item gets its own status. Returns the number of items
 * with status KVS_OK (>= 0), or a negative error if the batch as a whole
 * could not be attempted (e.g. KVS_ERR_CONN, KVS_ERR_INVALID). */
int kvs_put_batch(kvs_client *c, kvs_item *items, size_t n);
int kvs_get_batch(kvs_client *c, kvs_item *items, size_t n);

/* Returns 1 if `key` is stored (complete), 0 if not, or a negative error. */
int kvs_exists(kvs_client *c, const void *key, uint32_t key_len);

/* Sets out[i] = 1 if keys[i] is stored, else 0. One round trip. Returns
 * KVS_OK or a negative error (then `out` is undefined). */
int kvs_exists_batch(kvs_client *c, const kvs_key *keys, size_t n, uint8_t *out);

/* Removes `key`. KVS_ERR_NOT_FOUND if absent. Space held by readers under a
 * lease is freed when their lease ends. */
int kvs_remove(kvs_client *c, const void *key, uint32_t key_len);

/* Removes each key; results[i] gets KVS_OK or the error. Returns the number
 * removed or a negative error. `results` may be NULL. */
int kvs_remove_batch(kvs_client *c, const kvs_key *keys, size_t n, int *results);

/* ---- Zero-copy access (used by the KV connector) ----
 *
 * A slot is space for one object inside a segment. When the segment is on
 * this host and mapped into this process, `ptr` points straight at the
 * object's bytes; otherwise `ptr` is NULL and bytes move with
 * kvs_slot_write / kvs_slot_read over the transfer engine.
 */
typedef struct kvs_slot {
    void *ptr;          /* direct pointer into a mapped same-host segment, or NULL */
    uint64_t size;      /* object size in bytes */
    uint64_t handle[3]; /* opaque: segment, offset, object/lease ids */
    int status;         /* KVS_OK or the error for this slot */
} kvs_slot;

/* Reserves space for n new objects (master put-start, one round trip).
 * sizes[i] bytes for keys[i]; slots[i] receives the slot or its error
 * (KVS_ERR_EXISTS, KVS_ERR_NO_SPACE, ...). Every slot with status KVS_OK
 * must later be passed to kvs_commit_batch (with ok=0 to abandon it). A
 * reservation not committed within the master's put timeout is revoked.
 * Returns the number of slots reserved or a negative error. */
int kvs_reserve_batch(kvs_client *c, const kvs_key *keys, const uint64_t *sizes, size_t n,
                      kvs_slot *slots);

/* Publishes (ok[i] != 0) or abandons (ok[i] == 0; ok may be NULL = all
 * publish) reserved slots. results[i] (may be NULL) gets the outcome. A
 * slot into which a kvs_slot_write failed is never published: it is
 * abandoned and its result is KVS_ERR_UNAVAILABLE. A remote slot (ptr NULL)
 * this client no longer holds (committed already) is refused with
 * KVS_ERR_INVALID; committing a slot a second time changes nothing of other
 * slots. A commit that fails before reaching the master (KVS_ERR_NOMEM) may
 * be retried. Returns the number published or a negative error. */
int kvs_commit_batch(kvs_client *c, const kvs_key *keys, const kvs_slot *slots,
                     const uint8_t *ok, size_t n, int *results);

/* Locates n stored objects and takes a read lease on each (one round trip):
 * the space is not reused until kvs_release_batch or the lease times out.
 * Misses get KVS_ERR_NOT_FOUND. Returns the number found or a negative error. */
int kvs_acquire_batch(kvs_client *c, const kvs_key *keys, size_t n, kvs_slot *slots);

/* Ends the leases of slots taken by kvs_acquire_batch (slots with an error
 * status are skipped). Returns KVS_OK or a negative error. */
int kvs_release_batch(kvs_client *c, const kvs_slot *slots, size_t n);

/* Copies bytes between a slot and caller memory, whether the slot is mapped
 * (memcpy) or remote (transfer engine). Bounds-checked against slot->size. */
int kvs_slot_write(kvs_client *c, const kvs_slot *slot, uint64_t offset, const void *src,
                   uint64_t len);
int kvs_slot_read(kvs_client *c, const kvs_slot *slot, uint64_t offset, void *dst, uint64_t len);

/* Returns 1 if the lease on `slot` (from kvs_acquire_batch) is still valid
 * per the local clock with a safety margin, else 0. Readers check this after
 * copying and treat 0 as a miss. */
int kvs_slot_lease_valid(kvs_client *c, const kvs_slot *slot);

/* Writes a JSON document with the pool's state (segments, capacity, use,
 * objects, clients) into a malloc'd string stored in *json (free() it). */
int kvs_client_stats_json(kvs_client *c, char **json);

/* Counters of this client (monotonic). early_kept / early_wasted: gets
 * whose bytes started moving before the master answered (from where this
 * client last saw the object: memcpy from a same-host segment, or a
 * transfer-engine read from another host's) and were kept / had to be
 * moved again because the object had changed or the early read failed
 * (KVSHELF_LOC_CACHE=0 turns that off). */
typedef struct kvs_client_counters {
    uint64_t puts, gets, hits, misses, errors, reconnects, bytes_put, bytes_got;
    uint64_t early_kept, early_wasted;
} kvs_client_counters;
void kvs_client_get_counters(kvs_client *c, kvs_client_counters *out);

#ifdef __cplusplus
}
#endif
#endif
