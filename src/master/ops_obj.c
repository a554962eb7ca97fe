/* Object operations: PUT_START / PUT_END (placement, eviction on a full
 * pool), GET (lease), RELEASE, EXISTS, REMOVE. */
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "kvshelf/client.h"
#include "kvshelf/errors.h"
#include "master/master_int.h"

static int key_ok(uint32_t key_len) { return key_len >= 1 && key_len <= KVS_KEY_MAX; }

static int same_host(const kvs_seg *s, const kvs_mclient *c)
{
    static const uint8_t zero[16];
    return memcmp(s->host_id, zero, 16) != 0 && memcmp(s->host_id, c->host_id, 16) == 0;
}

static uint64_t seg_free(const kvs_seg *s)
{
    kvs_alloc_stats st;
    kvs_alloc_get_stats(s->alloc, &st);
    return st.free;
}

/* How good a place s is for a put of `need` bytes (better() compares two):
 * the writer's host first (a local put is a memcpy); then a segment where
 * the put evicts nothing, the one with the most free space (spreads the
 * pool's use); on a full pool the segment whose next victim was used
 * longest ago, so the pool as a whole, not one segment, loses its least
 * recently used objects first (most free space only would keep feeding
 * the segment that evicted last and evict its newest objects while older
 * ones stay elsewhere). */
typedef struct place {
    kvs_seg *s;
    int local, room;
    uint64_t free, oldest;
} place;

static place place_of(const kvs_master *m, kvs_seg *s, const kvs_mclient *w, uint64_t need)
{
    place p = {s, same_host(s, w), 0, seg_free(s), 0};
    p.room = kvs_m_evict_has_room(m, s, need);
    if (!p.room) p.oldest = kvs_m_evict_oldest(s);
    return p;
}

static int better(const place *a, const place *b)
{
    if (a->local != b->local) return a->local > b->local;
    if (a->room != b->room) return a->room > b->room;
    if (!a->room && a->oldest != b->oldest) return a->oldest < b->oldest;
    return a->free > b->free;
}

/* Best placeable segment (see place) where `need` fits now, NULL if none. */
static kvs_seg *pick_fitting(kvs_master *m, const kvs_mclient *w, uint64_t need)
{
    place best = {0};
    uint64_t now = kvs_master_now(m);
    for (size_t i = 0; i < m->segs.n; i++) {
        kvs_seg *s = m->segs.v[i];
        if (!kvs_m_seg_placeable(s, now) || !kvs_alloc_fits(s->alloc, need)) continue;
        place p = place_of(m, s, w, need);
        if (!best.s || better(&p, &best)) best = p;
    }
    return best.s;
}

/* Evicts in segments until `need` fits in one: the writer's host first,
 * then in order of their oldest victims (see place). */
static kvs_seg *evict_for(kvs_master *m, const kvs_mclient *w, uint64_t need)
{
    uint64_t now = kvs_master_now(m);
    size_t n = m->segs.n;
    unsigned char *tried = calloc(n ? n : 1, 1);
    if (!tried) return NULL;
    kvs_seg *found = NULL;
    for (;;) {
        place best = {0};
        size_t bi = 0;
        for (size_t i = 0; i < n; i++) {
            kvs_seg *s = m->segs.v[i];
            if (tried[i] || s->alloc == NULL || !kvs_m_seg_placeable(s, now)) continue;
            kvs_alloc_stats st;
            kvs_alloc_get_stats(s->alloc, &st);
            if (st.capacity < need) continue;
            place p = place_of(m, s, w, need);
            p.room = 0; /* nothing fits: compare by age alone */
            p.oldest = kvs_m_evict_oldest(s);
            if (!best.s || better(&p, &best)) {
                best = p;
                bi = i;
            }
        }
        if (!best.s) break;
        tried[bi] = 1;
        kvs_m_evict(m, best.s, need);
        if (kvs_alloc_fits(best.s->alloc, need)) {
            found = best.s;
            break;
        }
    }
    free(tried);
    return found;
}

int kvs_m_put_start(kvs_master *m, uint64_t client_id, const void *key, uint32_t key_len,
                    uint64_t size, uint32_t *segment_id, uint64_t *offset, uint64_t *obj_id,
                    uint64_t *epoch)
{
    kvs_mclient *w = kvs_clients_find(&m->clients, client_id);
    if (!w) return KVS_ERR_NOT_FOUND;
    if (!key_ok(key_len) || size == 0) return KVS_ERR_INVALID;
    kvs_m_touch(m, key, key_len); /* rebuild.c: its directory entries are older now */
    const kvs_obj *prev = kvs_index_find(&m->ix, key, key_len);
    if (prev) /* an earlier version still being unlisted: a moment, not a conflict */
        return prev->state == KVS_OBJ_UNLISTING ? KVS_ERR_BUSY : KVS_ERR_EXISTS;
    if (m->segs.n == 0) return KVS_ERR_NO_SPACE;
    uint64_t need = kvs_alloc_round(size), maxcap = 0;
    for (size_t i = 0; i < m->segs.n; i++)
        if (m->segs.v[i]->size > maxcap) maxcap = m->segs.v[i]->size;
    if (need > maxcap || size > KVS_MSEG_MAX_SIZE) return KVS_ERR_TOO_LARGE;
    if (m->n_objs >= m->o.max_objects) return KVS_ERR_NO_SPACE;
    kvs_obj *o = kvs_obj_new(key, key_len);
    if (!o) return KVS_ERR_NOMEM;
    kvs_seg *s = pick_fitting(m, w, need);
    if (!s) s = evict_for(m, w, need);
    uint64_t off = 0;
    if (!s || kvs_alloc_alloc(s->alloc, size, &off) != KVS_OK) {
        free(o);
        /* space of evicted or removed objects comes free once their owners
         * confirm unlisting them (dirsync.c): a moment, not a full pool */
        for (size_t i = 0; i < m->segs.n; i++)
            if (m->segs.v[i]->unlist_bytes >= need) return KVS_ERR_BUSY;
        return KVS_ERR_NO_SPACE;
    }
    uint64_t now = kvs_master_now(m);
    o->size = size;
    o->offset = off;
    o->seg = s;
    o->obj_id = o->generation = m->next_obj_id++;
    o->writer = client_id;
    o->epoch = s->epoch;
    o->put_deadline_ms = now + m->o.put_timeout_ms;
    o->lru_stamp = ++m->lru_clock;
    o->state = KVS_OBJ_WRITING;
    kvs_list_push_back(&s->objs, &o->seg_link);
    s->nobjs++;
    kvs_list_push_back(&m->writing, &o->lru);
    kvs_index_insert(&m->ix, o);
    m->n_objs++;
    kvs_m_evict_watermark(m, s);
    *segment_id = s->id;
    *offset = off;
    *obj_id = o->obj_id;
    *epoch = o->epoch;
    return KVS_OK;
}

int kvs_m_put_end(kvs_master *m, uint64_t client_id, const void *key, uint32_t key_len,
                  uint64_t obj_id, int ok)
{
    (void)client_id;
    if (!key_ok(key_len) || (unsigned)ok > KVS_PUT_ABANDON_CLEAN) return KVS_ERR_INVALID;
    kvs_obj *o = kvs_index_find(&m->ix, key, key_len);
    if (!o || o->obj_id != obj_id || o->state == KVS_OBJ_UNLISTING) return KVS_ERR_NOT_FOUND;
    if (o->state == KVS_OBJ_COMPLETE) return ok == 1 ? KVS_OK : KVS_ERR_INVALID; /* a retry */
    if (ok == KVS_PUT_ABANDON_CLEAN) { /* nothing in flight: the space is free now */
        kvs_m_obj_drop(m, o);
        return KVS_OK;
    }
    if (ok != KVS_PUT_PUBLISH) {
        kvs_m_obj_abandon(m, o);
        return KVS_OK;
    }
    if (o->seg && o->epoch < o->seg->fenced_to) {
        /* the owner fenced the segment past this reservation: a write of
         * it after the fence was dropped (a writer that saw the refusal
         * never says ok=1, so this is a stale or careless commit) */
        kvs_m_obj_abandon(m, o);
        return KVS_ERR_UNAVAILABLE;
    }
    kvs_list_remove(&o->lru);
    o->state = KVS_OBJ_COMPLETE;
    o->lru_stamp = ++m->lru_clock;
    kvs_list_push_back(&o->seg->lru, &o->lru);
    m->n_complete++;
    m->cnt.puts++;
    kvs_m_dir_listed(m, o);
    return KVS_OK;
}

int kvs_m_get(kvs_master *m, uint64_t client_id, const void *key, uint32_t key_len,
              kvs_m_loc *loc)
{
    m->cnt.gets++;
    if (!key_ok(key_len)) return KVS_ERR_INVALID;
    kvs_obj *o = kvs_index_find(&m->ix, key, key_len);
    if (!o || o->state != KVS_OBJ_COMPLETE) {
        m->cnt.misses++;
        return KVS_ERR_NOT_FOUND;
    }
    uint64_t now = kvs_master_now(m);
    uint64_t lease = kvs_leases_grant(&m->leases, o, client_id, now, m->o.lease_ms);
    if (!lease) return KVS_ERR_BUSY;
    o->seg->last_grant_ms = now;
    m->cnt.hits++;
    o->lru_stamp = ++m->lru_clock;
    kvs_list_remove(&o->lru);
    kvs_list_push_back(&o->seg->lru, &o->lru);
    loc->size = o->size;
    loc->segment_id = o->seg->id;
    loc->offset = o->offset;
    loc->obj_id = o->obj_id;
    loc->lease_id = lease;
    return KVS_OK;
}

int kvs_m_release(kvs_master *m, uint64_t lease_id)
{
    kvs_obj *o = kvs_leases_release(&m->leases, lease_id);
    if (!o) return KVS_ERR_NOT_FOUND;
    kvs_m_obj_lease_ended(m, o);
    return KVS_OK;
}

int kvs_m_exists(kvs_master *m, const void *key, uint32_t key_len)
{
    if (!key_ok(key_len)) return 0;
    kvs_obj *o = kvs_index_find(&m->ix, key, key_len);
    return o && o->state == KVS_OBJ_COMPLETE;
}

int kvs_m_remove(kvs_master *m, const void *key, uint32_t key_len)
{
    return kvs_m_remove_held(m, key, key_len, NULL);
}

int kvs_m_remove_held(kvs_master *m, const void *key, uint32_t key_len, kvs_obj **held)
{
    if (held) *held = NULL;
    if (!key_ok(key_len)) return KVS_ERR_INVALID;
    kvs_m_touch(m, key, key_len); /* rebuild.c: its directory entries are stale now */
    kvs_obj *o = kvs_index_find(&m->ix, key, key_len);
    if (o && o->state == KVS_OBJ_UNLISTING && kvs_m_dir_holds(o)) {
        /* dropped (evicted) already, but its owner's directory still lists
         * it: not found, yet the answer waits for the unlisting like a
         * removal does, so that no master rebuilt from that directory
         * serves it again after the caller was told it is gone */
        if (held) {
            if (o->waiter) return KVS_ERR_BUSY; /* another removal waits on it */
            *held = o;
        }
        return KVS_ERR_NOT_FOUND;
    }
    if (!o || o->state != KVS_OBJ_COMPLETE) return KVS_ERR_NOT_FOUND;
    /* decided before the drop, which may free o */
    int stays = kvs_m_dir_may_list(o);
    kvs_m_obj_drop(m, o);
    m->cnt.removes++;
    if (held && stays) *held = o; /* UNLISTING, still linked */
    return KVS_OK;
}
