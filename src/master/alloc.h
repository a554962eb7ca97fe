/* Space allocator for one segment: hands out byte ranges [offset, offset+len)
 * at 4 KiB granularity. Free space is kept as maximal extents (neighbours are
 * coalesced at once) in two treaps: by (size, offset) for best-fit and by
 * offset for coalescing. Allocation picks the smallest extent that fits (the
 * lowest address among equals), so large extents are kept whole for large
 * objects and sizes do not fragment each other. O(log n) alloc and free.
 * Metadata only: it never touches segment memory. Not thread-safe. */
#ifndef KVS_MASTER_ALLOC_H
#define KVS_MASTER_ALLOC_H

#include <stdint.h>

#define KVS_ALLOC_GRAIN 4096u

typedef struct kvs_alloc kvs_alloc;

typedef struct kvs_alloc_stats {
    uint64_t capacity;     /* bytes managed (segment size rounded down to 4 KiB) */
    uint64_t used;         /* bytes handed out (rounded sizes) */
    uint64_t free;         /* capacity - used */
    uint64_t largest_free; /* largest free extent in bytes */
    uint64_t free_extents; /* number of free extents */
    uint64_t allocations;  /* ranges handed out and not released */
} kvs_alloc_stats;

/* Creates an allocator over `size` bytes (rounded down to 4 KiB; may be 0).
 * Returns NULL on out of memory. Free with kvs_alloc_destroy. */
kvs_alloc *kvs_alloc_new(uint64_t size);

/* Frees the allocator and all its bookkeeping. Safe with NULL. */
void kvs_alloc_destroy(kvs_alloc *a);

/* Rounds a request up to the allocation grain (0 stays 0; saturates at the
 * largest multiple of the grain). */
uint64_t kvs_alloc_round(uint64_t size);

/* Reserves kvs_alloc_round(size) bytes; stores the start in *offset.
 * Returns KVS_OK, KVS_ERR_INVALID (size 0), KVS_ERR_NO_SPACE (no free extent
 * is large enough) or KVS_ERR_NOMEM. */
int kvs_alloc_alloc(kvs_alloc *a, uint64_t size, uint64_t *offset);

/* Returns the range [offset, offset+kvs_alloc_round(size)) to free space,
 * merging it with free neighbours. KVS_ERR_INVALID if the range is
 * misaligned, out of bounds or overlaps free space (e.g. a double free);
 * KVS_ERR_NOMEM if bookkeeping memory ran out (the range then stays used). */
int kvs_alloc_release(kvs_alloc *a, uint64_t offset, uint64_t size);

/* Reserves exactly [offset, offset+kvs_alloc_round(size)) if that whole
 * range is free (objects found in a segment's directory after a master
 * restart). KVS_OK; KVS_ERR_INVALID (size 0, misaligned, out of bounds, or
 * some of it is in use); KVS_ERR_NOMEM (bookkeeping memory ran out: nothing
 * reserved). */
int kvs_alloc_claim(kvs_alloc *a, uint64_t offset, uint64_t size);

/* Whether an allocation of `size` bytes would succeed now. */
int kvs_alloc_fits(const kvs_alloc *a, uint64_t size);

/* Fills *st with the current figures. */
void kvs_alloc_get_stats(const kvs_alloc *a, kvs_alloc_stats *st);

#endif
