/* Cache of same-host segment mappings, keyed by shm name (see transfer.h). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kvshelf/errors.h"
#include "segment/segment.h"
#include "transfer.h"

#define RETRY_MS 5000 /* a segment that could not be mapped is retried after this */

struct shm_ent {
    struct shm_ent *next;
    kvs_segment seg; /* seg.base == NULL: mapping failed */
    kvs_segment *own; /* local: the process's own segment */
    char name[KVS_SHM_NAME_MAX];
    int local;    /* memory of this process: never unmapped here */
    int retired;  /* memory released; range kept reserved */
    uint64_t retry_at_ms;
};

struct kvs_shm_cache {
    pthread_mutex_t mu;
    struct shm_ent *ents;
};

kvs_shm_cache *kvs_shm_cache_new(void)
{
    kvs_shm_cache *sc = calloc(1, sizeof *sc);
    if (sc) pthread_mutex_init(&sc->mu, NULL);
    return sc;
}

void kvs_shm_cache_free(kvs_shm_cache *sc)
{
    if (!sc) return;
    struct shm_ent *e = sc->ents;
    while (e) {
        struct shm_ent *n = e->next;
        if (!e->local) kvs_segment_destroy(&e->seg);
        free(e);
        e = n;
    }
    pthread_mutex_destroy(&sc->mu);
    free(sc);
}

void kvs_shm_cache_add_local(kvs_shm_cache *sc, kvs_segment *seg)
{
    struct shm_ent *e = calloc(1, sizeof *e);
    if (!e) return;
    kvs_strlcpy(e->name, seg->name, sizeof e->name);
    e->own = seg;
    e->local = 1;
    pthread_mutex_lock(&sc->mu);
    e->next = sc->ents;
    sc->ents = e;
    pthread_mutex_unlock(&sc->mu);
}

kvs_segment *kvs_shm_cache_get(kvs_shm_cache *sc, const char *name, uint64_t size)
{
    kvs_segment *base = NULL;
    pthread_mutex_lock(&sc->mu);
    struct shm_ent *e;
    for (e = sc->ents; e; e = e->next)
        if (!e->retired && !strcmp(e->name, name)) break;
    if (e && e->local) {
        base = e->own->size >= size ? e->own : NULL;
        goto out;
    }
    if (e && e->seg.base) {
        base = e->seg.size >= size ? &e->seg : NULL;
        goto out;
    }
    if (e && kvs_now_ms() < e->retry_at_ms) goto out;
    if (!e) {
        if (!kvs_segment_name_valid(name) || !(e = calloc(1, sizeof *e))) goto out;
        kvs_strlcpy(e->name, name, sizeof e->name);
        e->next = sc->ents;
        sc->ents = e;
    }
    if (kvs_segment_map(name, size, &e->seg) == KVS_OK) {
        base = &e->seg;
    } else {
        e->retry_at_ms = kvs_now_ms() + RETRY_MS;
    }
out:
    pthread_mutex_unlock(&sc->mu);
    return base;
}

kvs_segment *kvs_shm_cache_find_addr(kvs_shm_cache *sc, const void *p)
{
    kvs_segment *found = NULL;
    uintptr_t a = (uintptr_t)p;
    pthread_mutex_lock(&sc->mu);
    for (struct shm_ent *e = sc->ents; e && !found; e = e->next) {
        kvs_segment *seg = e->local ? e->own : &e->seg;
        uintptr_t b = (uintptr_t)seg->base;
        if (seg->base && a >= b && a - b < seg->size) found = seg;
    }
    pthread_mutex_unlock(&sc->mu);
    return found;
}

void kvs_shm_cache_retire_absent(kvs_shm_cache *sc, const char *const *names, size_t n)
{
    pthread_mutex_lock(&sc->mu);
    for (struct shm_ent *e = sc->ents; e; e = e->next) {
        if (e->local || e->retired) continue;
        int present = 0;
        for (size_t i = 0; i < n && !present; i++) present = !strcmp(names[i], e->name);
        if (present) continue;
        if (e->seg.base) kvs_segment_retire(&e->seg);
        e->retired = 1;
    }
    pthread_mutex_unlock(&sc->mu);
}
