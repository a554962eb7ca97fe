/* Location cache of recently read or written objects (see loccache.h). */
#include "loccache.h"

#include <pthread.h>
#include <stdlib.h>

#include "common/util.h"

#define STRIPES 64

struct kvs_loccache {
    size_t mask;
    pthread_mutex_t mu[STRIPES];
    kvs_loc_ent *v;
};

size_t kvs_loccache_size_from_env(void)
{
    return (size_t)kvs_env_u64("KVSHELF_LOC_CACHE", KVS_LOCCACHE_DEFAULT, 0, KVS_LOCCACHE_MAX,
                               "entries");
}

kvs_loccache *kvs_loccache_new(size_t n)
{
    if (n == 0) return NULL;
    if (n > KVS_LOCCACHE_MAX) n = KVS_LOCCACHE_MAX;
    size_t cap = 1;
    while (cap < n) cap <<= 1;
    kvs_loccache *lc = calloc(1, sizeof *lc);
    if (!lc) return NULL;
    lc->v = calloc(cap, sizeof *lc->v);
    if (!lc->v) {
        free(lc);
        return NULL;
    }
    lc->mask = cap - 1;
    for (int i = 0; i < STRIPES; i++) pthread_mutex_init(&lc->mu[i], NULL);
    return lc;
}

void kvs_loccache_free(kvs_loccache *lc)
{
    if (!lc) return;
    for (int i = 0; i < STRIPES; i++) pthread_mutex_destroy(&lc->mu[i]);
    free(lc->v);
    free(lc);
}

uint64_t kvs_loccache_hash(const void *key, uint32_t len)
{
    uint64_t h = kvs_hash64(key, len);
    return h ? h : 1;
}

static size_t slot_of(const kvs_loccache *lc, uint64_t khash) { return (size_t)khash & lc->mask; }
static pthread_mutex_t *lock_of(kvs_loccache *lc, size_t slot) { return &lc->mu[slot % STRIPES]; }

int kvs_loccache_get(kvs_loccache *lc, uint64_t khash, kvs_loc_ent *out)
{
    if (!lc || !khash) return 0;
    size_t i = slot_of(lc, khash);
    pthread_mutex_lock(lock_of(lc, i));
    int found = lc->v[i].khash == khash;
    if (found) *out = lc->v[i];
    pthread_mutex_unlock(lock_of(lc, i));
    return found;
}

void kvs_loccache_put(kvs_loccache *lc, const kvs_loc_ent *e)
{
    if (!lc || !e->khash) return;
    size_t i = slot_of(lc, e->khash);
    pthread_mutex_lock(lock_of(lc, i));
    lc->v[i] = *e;
    pthread_mutex_unlock(lock_of(lc, i));
}

void kvs_loccache_drop(kvs_loccache *lc, uint64_t khash)
{
    if (!lc || !khash) return;
    size_t i = slot_of(lc, khash);
    pthread_mutex_lock(lock_of(lc, i));
    if (lc->v[i].khash == khash) lc->v[i].khash = 0;
    pthread_mutex_unlock(lock_of(lc, i));
}
