/* Eviction: least recently used first, per segment, never leased or
 * in-flight objects (those are not on the LRU list or are skipped). */
#include "master/master_int.h"

static uint64_t watermark(const kvs_seg *s, double frac)
{
    kvs_alloc_stats st;
    kvs_alloc_get_stats(s->alloc, &st);
    return (uint64_t)((double)st.capacity * frac);
}

uint64_t kvs_m_evict(kvs_master *m, kvs_seg *s, uint64_t need)
{
    uint64_t low = watermark(s, m->o.evict_low), n = 0;
    kvs_list *e = s->lru.next;
    while (e != &s->lru) {
        if (kvs_seg_used(s) < low && (need == 0 || kvs_alloc_fits(s->alloc, need))) break;
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
    if (kvs_seg_used(s) > watermark(s, m->o.evict_high)) kvs_m_evict(m, s, 0);
}
