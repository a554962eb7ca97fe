/* Where objects this client recently read or wrote lie: key hash →
 * (connection generation, segment, offset, size, object id).
 *
 * A get of a key found here starts moving the bytes while its GET is still
 * on the way to the master (memcpy when the segment is mapped in this
 * process, else a transfer-engine read), and keeps them only if the
 * master's answer names the same object at the same place (ops.c,
 * copy_early and get_chunk). Object ids are never reused within a master's life
 * (and start from a random base after a restart; the connection generation
 * is part of the entry anyway), and an object is immutable from PUT_END
 * until it leaves the index: so if the object the entry names is still the
 * key's object when the master answers, its bytes did not change between
 * the time the entry was made and the lease the answer grants, and the
 * early copy read exactly them. Entries are therefore only hints: a stale
 * one costs a wasted copy, never wrong data.
 *
 * Fixed size, direct-mapped (a new entry replaces whatever shared its slot),
 * thread-safe (striped locks). KVSHELF_LOC_CACHE=N sets the number of
 * entries (rounded up to a power of two; 0 turns the cache off).
 */
#ifndef KVS_CLIENT_LOCCACHE_H
#define KVS_CLIENT_LOCCACHE_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvs_loc_ent {
    uint64_t khash;  /* kvs_loccache_hash of the key; 0 = empty slot */
    uint64_t obj_id; /* the master's object id */
    uint64_t off;    /* offset in the segment */
    uint64_t size;   /* object size */
    uint32_t seg;    /* segment id */
    uint32_t gen;    /* connection generation the location came on */
} kvs_loc_ent;

typedef struct kvs_loccache kvs_loccache;

/* Default number of entries (KVSHELF_LOC_CACHE overrides). */
#define KVS_LOCCACHE_DEFAULT 16384u
#define KVS_LOCCACHE_MAX (1u << 24)

/* Number of entries the environment asks for (KVSHELF_LOC_CACHE; a bad
 * value is logged and the default used). */
size_t kvs_loccache_size_from_env(void);

/* A cache of `n` entries (rounded up to a power of two, at most
 * KVS_LOCCACHE_MAX). NULL when n is 0 or memory is short: callers treat a
 * NULL cache as always empty. Free with kvs_loccache_free (NULL is fine). */
kvs_loccache *kvs_loccache_new(size_t n);
void kvs_loccache_free(kvs_loccache *lc);

/* 64-bit hash of a key (never 0). */
uint64_t kvs_loccache_hash(const void *key, uint32_t len);

/* Copies the entry of `khash` into *out: 1, or 0 when there is none. */
int kvs_loccache_get(kvs_loccache *lc, uint64_t khash, kvs_loc_ent *out);

/* Records *e (e->khash != 0), replacing the slot's previous entry. */
void kvs_loccache_put(kvs_loccache *lc, const kvs_loc_ent *e);

/* Forgets the entry of `khash`, if it is there. */
void kvs_loccache_drop(kvs_loccache *lc, uint64_t khash);

#endif
