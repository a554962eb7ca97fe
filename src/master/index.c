/* Chained hash table of objects by xxh3-64 of the key (see index.h). */
#include "master/index.h"

#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kvshelf/errors.h"

kvs_obj *kvs_obj_new(const void *key, uint32_t key_len)
{
    kvs_obj *o = calloc(1, sizeof *o + key_len);
    if (!o) return NULL;
    if (key_len) memcpy(o->key, key, key_len);
    o->key_len = key_len;
    o->hash = kvs_hash64(key, key_len);
    return o;
}

int kvs_index_init(kvs_index *ix)
{
    ix->count = 0;
    ix->mask = 1023;
    ix->buckets = calloc(ix->mask + 1, sizeof *ix->buckets);
    return ix->buckets ? KVS_OK : KVS_ERR_NOMEM;
}

void kvs_index_destroy(kvs_index *ix)
{
    free(ix->buckets);
    ix->buckets = NULL;
    ix->count = 0;
}

kvs_obj *kvs_index_find(const kvs_index *ix, const void *key, uint32_t key_len)
{
    uint64_t h = kvs_hash64(key, key_len);
    for (kvs_obj *o = ix->buckets[h & ix->mask]; o; o = o->hnext)
        if (o->hash == h && o->key_len == key_len && !memcmp(o->key, key, key_len)) return o;
    return NULL;
}

static void grow(kvs_index *ix)
{
    size_t nmask = ix->mask * 2 + 1;
    kvs_obj **nb = calloc(nmask + 1, sizeof *nb);
    if (!nb) return;
    for (size_t i = 0; i <= ix->mask; i++) {
        kvs_obj *o = ix->buckets[i];
        while (o) {
            kvs_obj *next = o->hnext;
            o->hnext = nb[o->hash & nmask];
            nb[o->hash & nmask] = o;
            o = next;
        }
    }
    free(ix->buckets);
    ix->buckets = nb;
    ix->mask = nmask;
}

void kvs_index_insert(kvs_index *ix, kvs_obj *o)
{
    if (ix->count >= ix->mask + 1 && ix->mask < (SIZE_MAX >> 4)) grow(ix);
    kvs_obj **b = &ix->buckets[o->hash & ix->mask];
    o->hnext = *b;
    *b = o;
    o->linked = 1;
    ix->count++;
}

void kvs_index_remove(kvs_index *ix, kvs_obj *o)
{
    if (!o->linked) return;
    for (kvs_obj **p = &ix->buckets[o->hash & ix->mask]; *p; p = &(*p)->hnext) {
        if (*p == o) {
            *p = o->hnext;
            break;
        }
    }
    o->hnext = NULL;
    o->linked = 0;
    ix->count--;
}

void kvs_index_foreach(const kvs_index *ix, void (*fn)(kvs_obj *o, void *ud), void *ud)
{
    for (size_t i = 0; i <= ix->mask; i++)
        for (kvs_obj *o = ix->buckets[i]; o; o = o->hnext) fn(o, ud);
}
