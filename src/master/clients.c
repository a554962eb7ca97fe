/* Client registry: chained hash by client id (see clients.h). */
#include "master/clients.h"

#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kvshelf/errors.h"

static size_t slot(const kvs_clients *C, uint64_t id)
{
    return (size_t)((id * 0x9e3779b97f4a7c15ull) >> 20) & C->mask;
}

int kvs_clients_init(kvs_clients *C, size_t max, uint64_t first_id)
{
    C->mask = 255;
    C->buckets = calloc(C->mask + 1, sizeof *C->buckets);
    C->count = 0;
    C->max = max;
    C->next_id = first_id ? first_id : 1;
    return C->buckets ? KVS_OK : KVS_ERR_NOMEM;
}

void kvs_clients_destroy(kvs_clients *C)
{
    if (!C->buckets) return;
    for (size_t i = 0; i <= C->mask; i++) {
        kvs_mclient *c = C->buckets[i];
        while (c) {
            kvs_mclient *n = c->hnext;
            free(c);
            c = n;
        }
    }
    free(C->buckets);
    C->buckets = NULL;
    C->count = 0;
}

static void grow(kvs_clients *C)
{
    size_t omask = C->mask;
    kvs_mclient **ob = C->buckets, **nb = calloc(omask * 2 + 2, sizeof *nb);
    if (!nb) return;
    C->buckets = nb;
    C->mask = omask * 2 + 1;
    for (size_t i = 0; i <= omask; i++) {
        kvs_mclient *c = ob[i];
        while (c) {
            kvs_mclient *n = c->hnext;
            size_t s = slot(C, c->id);
            c->hnext = nb[s];
            nb[s] = c;
            c = n;
        }
    }
    free(ob);
}

kvs_mclient *kvs_clients_add(kvs_clients *C, const char *hostname, const uint8_t host_id[16],
                             uint64_t pid, uint32_t uid, uint32_t role, uint64_t now_ms,
                             int *err)
{
    if (C->count >= C->max) {
        *err = KVS_ERR_BUSY;
        return NULL;
    }
    kvs_mclient *c = calloc(1, sizeof *c);
    if (!c) {
        *err = KVS_ERR_NOMEM;
        return NULL;
    }
    if (C->count >= C->mask + 1) grow(C);
    c->id = C->next_id++;
    if (C->next_id == 0) C->next_id = 1;
    kvs_strlcpy(c->hostname, hostname ? hostname : "", sizeof c->hostname);
    memcpy(c->host_id, host_id, 16);
    c->pid = pid;
    c->uid = uid;
    c->role = role;
    c->last_seen_ms = now_ms;
    size_t s = slot(C, c->id);
    c->hnext = C->buckets[s];
    C->buckets[s] = c;
    C->count++;
    *err = KVS_OK;
    return c;
}

kvs_mclient *kvs_clients_find(const kvs_clients *C, uint64_t id)
{
    for (kvs_mclient *c = C->buckets[slot(C, id)]; c; c = c->hnext)
        if (c->id == id) return c;
    return NULL;
}

void kvs_clients_remove(kvs_clients *C, kvs_mclient *c)
{
    for (kvs_mclient **p = &C->buckets[slot(C, c->id)]; *p; p = &(*p)->hnext) {
        if (*p == c) {
            *p = c->hnext;
            C->count--;
            if (c->disconnected_ms) C->ndisconnected--;
            break;
        }
    }
    free(c);
}

kvs_mclient *kvs_clients_find_stale(const kvs_clients *C, uint64_t deadline_ms)
{
    for (size_t i = 0; i <= C->mask; i++)
        for (kvs_mclient *c = C->buckets[i]; c; c = c->hnext)
            if (c->last_seen_ms < deadline_ms) return c;
    return NULL;
}

void kvs_clients_set_disconnected(kvs_clients *C, kvs_mclient *c, uint64_t now_ms)
{
    if (!now_ms) {
        if (c->disconnected_ms) C->ndisconnected--;
        c->disconnected_ms = 0;
        return;
    }
    if (!c->disconnected_ms) C->ndisconnected++;
    c->disconnected_ms = now_ms;
}

kvs_mclient *kvs_clients_find_disconnected(const kvs_clients *C, uint64_t deadline_ms)
{
    if (!C->ndisconnected) return NULL;
    for (size_t i = 0; i <= C->mask; i++)
        for (kvs_mclient *c = C->buckets[i]; c; c = c->hnext)
            if (c->disconnected_ms && c->disconnected_ms <= deadline_ms) return c;
    return NULL;
}

void kvs_clients_foreach(const kvs_clients *C, void (*fn)(kvs_mclient *c, void *ud), void *ud)
{
    for (size_t i = 0; i <= C->mask; i++)
        for (kvs_mclient *c = C->buckets[i]; c; c = c->hnext) fn(c, ud);
}
