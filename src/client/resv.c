/* Outstanding mapped reservations (resv.h): a chained hash by object id
 * under one mutex (a reserve or commit already costs a master round trip;
 * this is a few nanoseconds beside it). */
#include "client/resv.h"

#include <pthread.h>
#include <stdlib.h>

#include "kvshelf/errors.h"

typedef struct ent {
    struct ent *next;
    uint64_t obj_id;
    const void *ptr;
    uint64_t epoch;
    int failed;
} ent;

struct kvs_resv_table {
    pthread_mutex_t mu;
    ent **b;
    size_t nb; /* power of two */
    uint64_t n;
};

static size_t bucket(const kvs_resv_table *t, uint64_t id)
{
    id ^= id >> 33;
    id *= 0xff51afd7ed558ccdull;
    id ^= id >> 33;
    return (size_t)id & (t->nb - 1);
}

kvs_resv_table *kvs_resv_new(void)
{
    kvs_resv_table *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->nb = 64;
    t->b = calloc(t->nb, sizeof *t->b);
    if (!t->b) {
        free(t);
        return NULL;
    }
    pthread_mutex_init(&t->mu, NULL);
    return t;
}

void kvs_resv_free(kvs_resv_table *t)
{
    if (!t) return;
    for (size_t i = 0; i < t->nb; i++) {
        for (ent *e = t->b[i], *nx; e; e = nx) {
            nx = e->next;
            free(e);
        }
    }
    free(t->b);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

/* Doubles the bucket array (best effort: on no memory the chains grow). */
static void grow(kvs_resv_table *t)
{
    size_t nb = t->nb * 2;
    ent **b = calloc(nb, sizeof *b);
    if (!b) return;
    ent **old = t->b;
    size_t onb = t->nb;
    t->b = b;
    t->nb = nb;
    for (size_t i = 0; i < onb; i++) {
        for (ent *e = old[i], *nx; e; e = nx) {
            nx = e->next;
            size_t k = bucket(t, e->obj_id);
            e->next = b[k];
            b[k] = e;
        }
    }
    free(old);
}

int kvs_resv_add(kvs_resv_table *t, uint64_t obj_id, const void *ptr, uint64_t epoch)
{
    if (!t) return KVS_ERR_NOMEM;
    pthread_mutex_lock(&t->mu);
    for (ent *e = t->b[bucket(t, obj_id)]; e; e = e->next) {
        if (e->obj_id == obj_id) {
            pthread_mutex_unlock(&t->mu);
            return KVS_ERR_EXISTS;
        }
    }
    ent *e = malloc(sizeof *e);
    if (!e) {
        pthread_mutex_unlock(&t->mu);
        return KVS_ERR_NOMEM;
    }
    if (t->n >= t->nb * 2) grow(t);
    size_t k = bucket(t, obj_id);
    *e = (ent){t->b[k], obj_id, ptr, epoch, 0};
    t->b[k] = e;
    t->n++;
    pthread_mutex_unlock(&t->mu);
    return KVS_OK;
}

int kvs_resv_take(kvs_resv_table *t, uint64_t obj_id, const void *ptr, uint64_t *epoch)
{
    if (!t) return 0;
    pthread_mutex_lock(&t->mu);
    for (ent **pp = &t->b[bucket(t, obj_id)]; *pp; pp = &(*pp)->next) {
        ent *e = *pp;
        if (e->obj_id != obj_id || e->ptr != ptr) continue;
        *pp = e->next;
        t->n--;
        *epoch = e->epoch;
        pthread_mutex_unlock(&t->mu);
        free(e);
        return 1;
    }
    pthread_mutex_unlock(&t->mu);
    return 0;
}

/* The entry of (obj_id, ptr), or NULL. Caller holds t->mu. */
static ent *find_locked(kvs_resv_table *t, uint64_t obj_id, const void *ptr)
{
    for (ent *e = t->b[bucket(t, obj_id)]; e; e = e->next)
        if (e->obj_id == obj_id && e->ptr == ptr) return e;
    return NULL;
}

int kvs_resv_mark_failed(kvs_resv_table *t, uint64_t obj_id, const void *ptr)
{
    if (!t) return 0;
    pthread_mutex_lock(&t->mu);
    ent *e = find_locked(t, obj_id, ptr);
    if (e) e->failed = 1;
    pthread_mutex_unlock(&t->mu);
    return e != NULL;
}

int kvs_resv_get(kvs_resv_table *t, uint64_t obj_id, const void *ptr, int *failed)
{
    if (!t) return 0;
    pthread_mutex_lock(&t->mu);
    ent *e = find_locked(t, obj_id, ptr);
    if (e) *failed = e->failed;
    pthread_mutex_unlock(&t->mu);
    return e != NULL;
}

uint64_t kvs_resv_count(kvs_resv_table *t)
{
    if (!t) return 0;
    pthread_mutex_lock(&t->mu);
    uint64_t n = t->n;
    pthread_mutex_unlock(&t->mu);
    return n;
}
