/* Eviction: least recently used first, per segment, never leased or
 * in-flight objects (those are not on the LRU list or are skipped). */
#include "master/master_int.h"

static uint64_t watermark(const kvs_seg *s, double frac)
{
    kvs_alloc_stats st;
    kvs_alloc_get_stats(s->alloc, &st);
    return (uint64_t)((double)st.capacity * frac);
}

/* Bytes in use that are not on their way out: space of dropped objects
 * whose directory entry the owner has not yet confirmed removing is still
 * allocated, but counts as freed here (dirsync.c). */
static uint64_t used_now(const kvs_seg *s)
{
    uint64_t u = kvs_seg_used(s);
    return u > s->unlist_bytes ? u - s->unlist_bytes : 0;
}

uint64_t kvs_m_evict(kvs_master *m, kvs_seg *s, uint64_t need)
{
    uint64_t low = watermark(s, m->o.evict_low), n = 0;
    kvs_list *e = s->lru.next;
    while (e != &s->lru) {
        if (used_now(s) < low &&
            (need == 0 || kvs_alloc_fits(s->alloc, need) || s->unlist_bytes >= need))
            break;
        kvs_obj *o = KVS_CONTAINER_OF(e, kvs_obj, lru);
        e = e->next;
        if (o->leases) continue;
        kvs_m_obj_drop(m, o);
        m->cnt.evictions++;
        n++;
    }
    return n;
}

void kvs_m_evict_watermark(kvs_master *m, kvs_seg *s)
{
    if (used_now(s) > watermark(s, m->o.evict_high)) kvs_m_evict(m, s, 0);
}

int kvs_m_evict_has_room(const kvs_master *m, const kvs_seg *s, uint64_t need)
{
    return used_now(s) + need <= watermark(s, m->o.evict_high);
}

uint64_t kvs_m_evict_oldest(const kvs_seg *s)
{
    for (const kvs_list *e = s->lru.next; e != &s->lru; e = e->next) {
        const kvs_obj *o = KVS_CONTAINER_OF(e, kvs_obj, lru);
        if (!o->leases) return o->lru_stamp;
    }
    return UINT64_MAX;
}
