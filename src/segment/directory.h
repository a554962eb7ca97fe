/* The directory of a segment: the list of its complete objects (key,
 * offset, size), kept in the segment's own shared memory so that a master
 * that restarts (or replaces a dead one) rebuilds its index from the nodes
 * instead of starting empty (ARCHITECTURE.md, "Master restarts").
 *
 * On-segment format (host byte order: only processes of this host read it),
 * a region of kvs_dir_bytes(nslots) bytes between the segment's data and its
 * control page (segment.h):
 *
 *   header (KVS_DIR_HDR_SIZE bytes)
 *     char     magic[8]   "KVSDIR1\0"
 *     u32      version    1
 *     u32      slot_size  KVS_DIR_SLOT_SIZE
 *     u64      nslots
 *     u64      data_size  bytes of segment data the entries point into
 *     u64      nonce      the segment's nonce (its name, its control page)
 *     u64      check      xxh3-64 of the 40 bytes above
 *     u64      reign      the master reign the owner follows (0: none)
 *     u64      reign_check xxh3-64 of reign, seeded with nonce ^ a constant
 *                         (a mismatch reads as reign 0)
 *   nslots x slot (KVS_DIR_SLOT_SIZE bytes each)
 *     u32      state      KVS_DIR_LIVE, anything else = free
 *     u32      key_len    1..KVS_DIR_KEY_MAX
 *     u64      offset     start in the data, a multiple of KVS_DIR_GRAIN
 *     u64      size       bytes of the object (> 0), offset + size <= data_size
 *     u64      obj_id     informational (the id the master gave it)
 *     u64      check      xxh3-64, seeded with the nonce, of offset, size,
 *                         obj_id, key_len and the key
 *     u8       key[KVS_DIR_KEY_MAX]
 *
 * Only the segment's owner writes it, one slot at a time and in an order
 * that a crash between any two stores leaves either the old entry, no entry,
 * or a slot whose check fails: a slot is freed by clearing `state`, written
 * with `state` cleared, and made live last. An entry is written only for an
 * object the master declared complete, and removed before the master hands
 * its space out again (the master frees the space only once the owner has
 * confirmed the removal), so a live entry always describes the bytes that
 * lie at its place.
 *
 * Everything read back is validated (kvs_dir_parse): a process of the same
 * user can write this memory, so a corrupt header, slot or overlap is
 * rejected with a log line, never trusted.
 */
#ifndef KVS_SEGMENT_DIRECTORY_H
#define KVS_SEGMENT_DIRECTORY_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define KVS_DIR_MAGIC "KVSDIR1"
#define KVS_DIR_VERSION 1u
#define KVS_DIR_HDR_SIZE 64u
#define KVS_DIR_SLOT_SIZE 320u
#define KVS_DIR_KEY_MAX 256u   /* = KVS_KEY_MAX (client.h) */
#define KVS_DIR_GRAIN 4096u    /* = KVS_ALLOC_GRAIN: objects start on it */
#define KVS_DIR_LIVE 0x4556494cu /* "LIVE" */
#define KVS_DIR_MAX_SLOTS (1u << 24)

/* One entry as parsed or written; `key` points into caller memory. */
typedef struct kvs_dir_entry {
    const uint8_t *key;
    uint32_t key_len;
    uint64_t offset, size, obj_id;
    uint32_t slot; /* index of its slot */
} kvs_dir_entry;

/* What kvs_dir_parse found. */
typedef struct kvs_dir_stats {
    uint64_t live;     /* valid entries handed to the callback */
    uint64_t corrupt;  /* live-marked slots rejected (check, bounds, key) */
    uint64_t overlap;  /* valid-looking entries rejected for overlapping another */
    uint64_t dup_keys; /* entries rejected because their key is listed twice */
} kvs_dir_stats;

/* Slots a segment of data_size bytes gets: one per 64 KiB of data, at
 * least 64, at most KVS_DIR_MAX_SLOTS; KVSHELF_DIR_SLOTS overrides it (0:
 * no directory). */
uint64_t kvs_dir_default_slots(uint64_t data_size);

/* Bytes of a directory of nslots slots (header included), rounded up to
 * `page` (a power of two); 0 for nslots 0. */
uint64_t kvs_dir_bytes(uint64_t nslots, uint64_t page);

/* Formats mem (bytes long, zeroed or not) as an empty directory of as many
 * slots as fit, for a segment of data_size bytes with this nonce. Returns
 * the slot count, 0 if not even one fits. */
uint64_t kvs_dir_format(void *mem, uint64_t bytes, uint64_t data_size, uint64_t nonce);

/* Callback of kvs_dir_parse for each valid entry (in offset order). The
 * entry's key points into `mem`. Return 0 to go on, non-zero to stop. */
typedef int (*kvs_dir_fn)(const kvs_dir_entry *e, void *ud);

/* Validates the directory in mem[0..bytes) against the segment it should
 * belong to (data_size, nonce) and calls fn for every valid entry. Slots
 * whose check, bounds or key length are wrong are skipped (counted as
 * corrupt); entries overlapping another, or listing a key twice, are all
 * skipped (neither can be trusted). `bad` (may be NULL, else bad_cap
 * bytes) gets 1 at index i for each rejected live-marked slot i < bad_cap,
 * 0 for the others. Nothing is written to mem; memory of O(entries) is
 * allocated and freed. Returns KVS_OK, KVS_ERR_CORRUPT (bad header:
 * nothing listed), KVS_ERR_NOMEM. */
int kvs_dir_parse(const void *mem, uint64_t bytes, uint64_t data_size, uint64_t nonce,
                  kvs_dir_fn fn, void *ud, uint8_t *bad, uint64_t bad_cap, kvs_dir_stats *st);

/* ---- the owner's handle: writes entries, finds them by offset ---- */

typedef struct kvs_dir kvs_dir;

/* Attaches to the directory at mem (bytes long) of a segment of data_size
 * bytes with this nonce. `fresh`: format it; else validate what is there
 * (kvs_dir_parse), keep the valid entries and clear every rejected slot
 * (logged). *out is malloc'd; free with kvs_dir_close (the memory stays).
 * KVS_OK, KVS_ERR_INVALID (too small), KVS_ERR_CORRUPT (bad header: the
 * caller may attach again with fresh set), KVS_ERR_NOMEM. Thread-safe
 * afterwards (an internal mutex). */
int kvs_dir_attach(void *mem, uint64_t bytes, uint64_t data_size, uint64_t nonce, int fresh,
                   kvs_dir **out);

/* Frees the handle (not the memory). Safe with NULL. */
void kvs_dir_close(kvs_dir *d);

/* Lists an object: writes a slot for (key, offset, size, obj_id),
 * replacing an entry at the same offset. KVS_OK; KVS_ERR_INVALID (key
 * length, alignment or bounds); KVS_ERR_NO_SPACE (every slot used: the
 * object is simply not listed and will be a miss after a master restart). */
int kvs_dir_add(kvs_dir *d, const void *key, uint32_t key_len, uint64_t offset, uint64_t size,
                uint64_t obj_id);

/* Unlists the entry starting at `offset`, if any (KVS_OK either way). */
int kvs_dir_del(kvs_dir *d, uint64_t offset);

/* Live entries now. */
uint64_t kvs_dir_count(kvs_dir *d);

/* Slots (capacity). */
uint64_t kvs_dir_capacity(const kvs_dir *d);

/* Copies every live entry (keys included) into a malloc'd array for the
 * caller (*out, *n; free with free(): keys point inside the same block),
 * validating each slot again. KVS_OK or KVS_ERR_NOMEM. */
int kvs_dir_snapshot(kvs_dir *d, kvs_dir_entry **out, uint64_t *n);

/* ---- registrations: which master registration the entries follow ----
 * The owner bumps the registration before it lists its entries to a
 * (new) master; directory changes fetched on behalf of an older
 * registration are then refused (kvs_dir_add_if with a stale value), so
 * an object of a registration the master no longer knows is never listed
 * after the new master took the directory. */

/* ---- reigns (master.h, kvs_master_set_reign) ----
 * The reign of the master whose changes the directory follows: a master
 * refuses a directory that missed a later reign. 0 if none is recorded or
 * its check fails. */
uint64_t kvs_dir_reign(kvs_dir *d);
/* Records `reign` (after the directory was handed in to that master). */
void kvs_dir_set_reign(kvs_dir *d, uint64_t reign);

/* Starts a new registration; returns its number. */
uint64_t kvs_dir_new_registration(kvs_dir *d);

/* kvs_dir_add under registration `reg`: KVS_ERR_UNAVAILABLE (nothing
 * written) if a newer registration started. */
int kvs_dir_add_if(kvs_dir *d, uint64_t reg, const void *key, uint32_t key_len,
                   uint64_t offset, uint64_t size, uint64_t obj_id);

#endif
