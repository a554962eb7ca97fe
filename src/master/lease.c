/* Lease table (see lease.h). */
#include "master/lease.h"

#include <stdlib.h>

#include "kvshelf/errors.h"

#define LEASE_OF(e) KVS_CONTAINER_OF(e, kvs_lease, fifo)

static size_t slot(const kvs_leases *L, uint64_t id)
{
    return (size_t)((id * 0x9e3779b97f4a7c15ull) >> 17) & L->mask;
}

int kvs_leases_init(kvs_leases *L, size_t max, uint64_t first_id)
{
    L->mask = 1023;
    L->buckets = calloc(L->mask + 1, sizeof *L->buckets);
    L->count = 0;
    L->max = max;
    L->next_id = first_id ? first_id : 1;
    kvs_list_init(&L->fifo);
    return L->buckets ? KVS_OK : KVS_ERR_NOMEM;
}

void kvs_leases_destroy(kvs_leases *L)
{
    while (!kvs_list_empty(&L->fifo)) {
        kvs_lease *l = LEASE_OF(L->fifo.next);
        kvs_list_remove(&l->fifo);
        free(l);
    }
    free(L->buckets);
    L->buckets = NULL;
    L->count = 0;
}

static void grow(kvs_leases *L)
{
    size_t nmask = L->mask * 2 + 1;
    kvs_lease **nb = calloc(nmask + 1, sizeof *nb);
    if (!nb) return;
    size_t omask = L->mask;
    kvs_lease **ob = L->buckets;
    L->buckets = nb;
    L->mask = nmask;
    for (size_t i = 0; i <= omask; i++) {
        kvs_lease *l = ob[i];
        while (l) {
            kvs_lease *next = l->hnext;
            size_t s = slot(L, l->id);
            l->hnext = nb[s];
            nb[s] = l;
            l = next;
        }
    }
    free(ob);
}

uint64_t kvs_leases_grant(kvs_leases *L, kvs_obj *o, uint64_t client, uint64_t now_ms,
                          uint64_t lease_ms)
{
    if (L->count >= L->max) return 0;
    kvs_lease *l = malloc(sizeof *l);
    if (!l) return 0;
    if (L->count >= L->mask + 1) grow(L);
    l->id = L->next_id++;
    if (L->next_id == 0) L->next_id = 1;
    l->expiry_ms = now_ms + lease_ms;
    l->client = client;
    l->obj = o;
    size_t s = slot(L, l->id);
    l->hnext = L->buckets[s];
    L->buckets[s] = l;
    kvs_list_push_back(&L->fifo, &l->fifo);
    L->count++;
    o->leases++;
    if (l->expiry_ms > o->lease_expiry_ms) o->lease_expiry_ms = l->expiry_ms;
    return l->id;
}

static kvs_obj *end_lease(kvs_leases *L, kvs_lease *l)
{
    for (kvs_lease **p = &L->buckets[slot(L, l->id)]; *p; p = &(*p)->hnext) {
        if (*p == l) {
            *p = l->hnext;
            break;
        }
    }
    kvs_list_remove(&l->fifo);
    L->count--;
    kvs_obj *o = l->obj;
    if (o->leases) o->leases--;
    free(l);
    return o;
}

kvs_obj *kvs_leases_release(kvs_leases *L, uint64_t id)
{
    for (kvs_lease *l = L->buckets[slot(L, id)]; l; l = l->hnext)
        if (l->id == id) return end_lease(L, l);
    return NULL;
}

kvs_obj *kvs_leases_reap_one(kvs_leases *L, uint64_t now_ms)
{
    if (kvs_list_empty(&L->fifo)) return NULL;
    kvs_lease *l = LEASE_OF(L->fifo.next);
    if (l->expiry_ms > now_ms) return NULL;
    return end_lease(L, l);
}
