/* Best-fit extent allocator (see alloc.h). A free extent sits in two trees:
 * by_size keyed (len, start) and by_off keyed (start, 0). Splitting keeps
 * the front of the chosen extent and leaves the remainder free; the
 * remainder keeps its place in by_off (order unchanged), so only by_size
 * needs a re-insert. */
#include "master/alloc.h"

#include <stdlib.h>

#include "kvshelf/errors.h"
#include "master/tree.h"

typedef struct extent {
    kvs_tnode by_size; /* k1 = len, k2 = start */
    kvs_tnode by_off;  /* k1 = start */
    struct extent *next_free; /* node cache */
} extent;

struct kvs_alloc {
    uint64_t capacity, used, allocations;
    kvs_tree by_size, by_off;
    extent *cache;
    size_t cached;
};

#define EXT_OF_SIZE(n) ((extent *)((char *)(n)-offsetof(extent, by_size)))
#define EXT_OF_OFF(n) ((extent *)((char *)(n)-offsetof(extent, by_off)))
#define CACHE_MAX 1024

static extent *ext_new(kvs_alloc *a)
{
    extent *e = a->cache;
    if (e) {
        a->cache = e->next_free;
        a->cached--;
        return e;
    }
    return malloc(sizeof(extent));
}

static void ext_put(kvs_alloc *a, extent *e)
{
    if (a->cached < CACHE_MAX) {
        e->next_free = a->cache;
        a->cache = e;
        a->cached++;
    } else {
        free(e);
    }
}

static uint64_t ext_start(const extent *e) { return e->by_off.k1; }
static uint64_t ext_len(const extent *e) { return e->by_size.k1; }

static void ext_insert(kvs_alloc *a, extent *e, uint64_t start, uint64_t len)
{
    e->by_off.k1 = start;
    e->by_off.k2 = 0;
    e->by_size.k1 = len;
    e->by_size.k2 = start;
    kvs_tree_insert(&a->by_off, &e->by_off);
    kvs_tree_insert(&a->by_size, &e->by_size);
}

static void ext_unlink(kvs_alloc *a, extent *e)
{
    kvs_tree_remove(&a->by_off, &e->by_off);
    kvs_tree_remove(&a->by_size, &e->by_size);
}

uint64_t kvs_alloc_round(uint64_t size)
{
    const uint64_t g = KVS_ALLOC_GRAIN;
    if (size > UINT64_MAX - (g - 1)) return UINT64_MAX & ~(uint64_t)(g - 1);
    return (size + g - 1) & ~(uint64_t)(g - 1);
}

kvs_alloc *kvs_alloc_new(uint64_t size)
{
    kvs_alloc *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    a->capacity = size & ~(uint64_t)(KVS_ALLOC_GRAIN - 1);
    kvs_tree_init(&a->by_size, 0x2545f491u);
    kvs_tree_init(&a->by_off, 0x6c8e9cf5u);
    if (a->capacity) {
        extent *e = ext_new(a);
        if (!e) {
            free(a);
            return NULL;
        }
        ext_insert(a, e, 0, a->capacity);
    }
    return a;
}

static void free_subtree(kvs_tnode *n)
{
    while (n) {
        free_subtree(n->l);
        kvs_tnode *r = n->r;
        free(EXT_OF_OFF(n));
        n = r;
    }
}

void kvs_alloc_destroy(kvs_alloc *a)
{
    if (!a) return;
    free_subtree(a->by_off.root);
    while (a->cache) {
        extent *e = a->cache;
        a->cache = e->next_free;
        free(e);
    }
    free(a);
}

int kvs_alloc_alloc(kvs_alloc *a, uint64_t size, uint64_t *offset)
{
    if (size == 0) return KVS_ERR_INVALID;
    uint64_t len = kvs_alloc_round(size);
    if (len > a->capacity - a->used) return KVS_ERR_NO_SPACE;
    kvs_tnode *n = kvs_tree_ceil(&a->by_size, len, 0);
    if (!n) return KVS_ERR_NO_SPACE;
    extent *e = EXT_OF_SIZE(n);
    uint64_t start = ext_start(e), elen = ext_len(e);
    kvs_tree_remove(&a->by_size, &e->by_size);
    if (elen == len) {
        kvs_tree_remove(&a->by_off, &e->by_off);
        ext_put(a, e);
    } else {
        /* keep the tail free: its offset order among free extents is unchanged */
        e->by_off.k1 = start + len;
        e->by_size.k1 = elen - len;
        e->by_size.k2 = start + len;
        kvs_tree_insert(&a->by_size, &e->by_size);
    }
    a->used += len;
    a->allocations++;
    *offset = start;
    return KVS_OK;
}

int kvs_alloc_release(kvs_alloc *a, uint64_t offset, uint64_t size)
{
    uint64_t len = kvs_alloc_round(size);
    if (len == 0 || (offset & (KVS_ALLOC_GRAIN - 1)) || offset > a->capacity ||
        len > a->capacity - offset || len > a->used)
        return KVS_ERR_INVALID;
    uint64_t end = offset + len;
    kvs_tnode *pn = kvs_tree_lower(&a->by_off, offset, 0);
    kvs_tnode *sn = kvs_tree_ceil(&a->by_off, offset, 0);
    extent *prev = pn ? EXT_OF_OFF(pn) : NULL;
    extent *succ = sn ? EXT_OF_OFF(sn) : NULL;
    if (prev && ext_start(prev) + ext_len(prev) > offset) return KVS_ERR_INVALID;
    if (succ && ext_start(succ) < end) return KVS_ERR_INVALID;
    int join_prev = prev && ext_start(prev) + ext_len(prev) == offset;
    int join_succ = succ && ext_start(succ) == end;
    if (join_prev && join_succ) {
        uint64_t pstart = ext_start(prev), total = ext_len(prev) + len + ext_len(succ);
        ext_unlink(a, succ);
        ext_put(a, succ);
        kvs_tree_remove(&a->by_size, &prev->by_size);
        prev->by_size.k1 = total;
        prev->by_size.k2 = pstart;
        kvs_tree_insert(&a->by_size, &prev->by_size);
    } else if (join_prev) {
        kvs_tree_remove(&a->by_size, &prev->by_size);
        prev->by_size.k1 += len;
        kvs_tree_insert(&a->by_size, &prev->by_size);
    } else if (join_succ) {
        uint64_t total = ext_len(succ) + len;
        kvs_tree_remove(&a->by_size, &succ->by_size);
        succ->by_off.k1 = offset; /* order among free extents unchanged */
        succ->by_size.k1 = total;
        succ->by_size.k2 = offset;
        kvs_tree_insert(&a->by_size, &succ->by_size);
    } else {
        extent *e = ext_new(a);
        if (!e) return KVS_ERR_NOMEM;
        ext_insert(a, e, offset, len);
    }
    a->used -= len;
    a->allocations--;
    return KVS_OK;
}

int kvs_alloc_claim(kvs_alloc *a, uint64_t offset, uint64_t size)
{
    uint64_t len = kvs_alloc_round(size);
    if (len == 0 || (offset & (KVS_ALLOC_GRAIN - 1)) || offset >= a->capacity ||
        len > a->capacity - offset)
        return KVS_ERR_INVALID;
    /* the free extent holding `offset`: the last one starting at or before it */
    kvs_tnode *n = kvs_tree_lower(&a->by_off, offset + 1, 0);
    if (!n) return KVS_ERR_INVALID;
    extent *e = EXT_OF_OFF(n);
    uint64_t start = ext_start(e), elen = ext_len(e), end = offset + len;
    if (start > offset || start + elen < end) return KVS_ERR_INVALID;
    uint64_t head = offset - start, tail = start + elen - end;
    extent *t = NULL;
    if (head && tail && !(t = ext_new(a))) return KVS_ERR_NOMEM;
    ext_unlink(a, e);
    if (head) ext_insert(a, e, start, head);
    if (tail) ext_insert(a, head ? t : e, end, tail);
    if (!head && !tail) ext_put(a, e);
    a->used += len;
    a->allocations++;
    return KVS_OK;
}

int kvs_alloc_fits(const kvs_alloc *a, uint64_t size)
{
    uint64_t len = kvs_alloc_round(size);
    if (len == 0 || len > a->capacity - a->used) return 0;
    kvs_tnode *m = kvs_tree_max(&a->by_size);
    return m && m->k1 >= len;
}

void kvs_alloc_get_stats(const kvs_alloc *a, kvs_alloc_stats *st)
{
    kvs_tnode *m = kvs_tree_max(&a->by_size);
    st->capacity = a->capacity;
    st->used = a->used;
    st->free = a->capacity - a->used;
    st->largest_free = m ? m->k1 : 0;
    st->free_extents = a->by_off.count;
    st->allocations = a->allocations;
}
