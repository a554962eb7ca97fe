/* Segment registry (see segment.h): a small array; segment counts are low. */
#include "master/segment.h"

#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kvshelf/errors.h"

void kvs_segs_init(kvs_segs *S, size_t max, uint32_t first_id)
{
    memset(S, 0, sizeof *S);
    S->max = max;
    S->next_id = first_id ? first_id : 1;
}

void kvs_segs_destroy(kvs_segs *S)
{
    for (size_t i = 0; i < S->n; i++) {
        kvs_alloc_destroy(S->v[i]->alloc);
        free(S->v[i]);
    }
    free(S->v);
    memset(S, 0, sizeof *S);
}

kvs_seg *kvs_segs_add(kvs_segs *S, uint64_t size, uint64_t owner, const char *hostname,
                      const char *shm_name, const char *transfer_addr,
                      const uint8_t host_id[16], uint64_t epoch, int *err)
{
    if (S->n >= S->max) {
        *err = KVS_ERR_BUSY;
        return NULL;
    }
    if (S->n == S->cap) {
        size_t cap = S->cap ? S->cap * 2 : 16;
        kvs_seg **v = realloc(S->v, cap * sizeof *v);
        if (!v) {
            *err = KVS_ERR_NOMEM;
            return NULL;
        }
        S->v = v;
        S->cap = cap;
    }
    kvs_seg *s = calloc(1, sizeof *s);
    if (!s || !(s->alloc = kvs_alloc_new(size))) {
        free(s);
        *err = KVS_ERR_NOMEM;
        return NULL;
    }
    s->id = S->next_id++;
    if (S->next_id == 0) S->next_id = 1;
    s->size = size;
    s->owner = owner;
    kvs_strlcpy(s->hostname, hostname ? hostname : "", sizeof s->hostname);
    kvs_strlcpy(s->shm_name, shm_name ? shm_name : "", sizeof s->shm_name);
    kvs_strlcpy(s->transfer_addr, transfer_addr ? transfer_addr : "", sizeof s->transfer_addr);
    memcpy(s->host_id, host_id, 16);
    kvs_list_init(&s->objs);
    kvs_list_init(&s->lru);
    kvs_list_init(&s->fenced);
    kvs_list_init(&s->dir_q);
    kvs_list_init(&s->dir_sent);
    s->epoch = s->fenced_to = epoch;
    S->v[S->n++] = s;
    *err = KVS_OK;
    return s;
}

kvs_seg *kvs_segs_find(const kvs_segs *S, uint32_t id)
{
    for (size_t i = 0; i < S->n; i++)
        if (S->v[i]->id == id) return S->v[i];
    return NULL;
}

void kvs_segs_remove(kvs_segs *S, kvs_seg *s)
{
    for (size_t i = 0; i < S->n; i++) {
        if (S->v[i] == s) {
            memmove(&S->v[i], &S->v[i + 1], (S->n - i - 1) * sizeof *S->v);
            S->n--;
            break;
        }
    }
    kvs_alloc_destroy(s->alloc);
    free(s);
}

uint64_t kvs_seg_used(const kvs_seg *s)
{
    kvs_alloc_stats st;
    kvs_alloc_get_stats(s->alloc, &st);
    return st.used;
}
