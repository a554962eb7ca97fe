/* Rebuilding the index from the segments' directories (proto.h DIR_LOAD,
 * ARCHITECTURE.md "Master restarts").
 *
 * A segment whose owner keeps a directory is mounted "uncollected": it
 * takes no placements, and nothing of it is in the index (lookups of its
 * objects miss). Its owner then hands in every entry of its directory; each
 * one that fits (a free, in-bounds, aligned range; a key not stored
 * already) becomes a complete object at once, marked listed (the owner has
 * its entry, so dropping it later waits for the owner to unlist it). The
 * last DIR_LOAD makes the segment placeable. The owner writes entries only
 * for objects a master declared complete and fences the segment past every
 * earlier registration before it mounts (proto.h "Write epochs"), so no
 * half-written object is ever listed and no late write lands in a listed
 * range. */
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "common/log.h"
#include "common/util.h"
#include "kvshelf/client.h"
#include "kvshelf/errors.h"
#include "master/master_int.h"

/* ---- keys touched while the rebuild is not complete ---- */

static uint64_t key_hash(const void *key, uint32_t key_len)
{
    uint64_t h = XXH3_64bits(key, key_len);
    return h ? h : 1; /* 0 marks an empty place */
}

static int touched_has(const kvs_master *m, uint64_t h)
{
    if (!m->touched_cap) return 0;
    size_t mask = m->touched_cap - 1;
    for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
        if (m->touched[i] == h) return 1;
        if (m->touched[i] == 0) return 0;
    }
}

/* Inserts h; KVS_ERR_NOMEM if the set cannot grow. */
static int touched_add(kvs_master *m, uint64_t h)
{
    if ((m->touched_n + 1) * 2 > m->touched_cap) {
        size_t cap = m->touched_cap ? m->touched_cap * 2 : 1024;
        uint64_t *t = calloc(cap, sizeof *t);
        if (!t) return KVS_ERR_NOMEM;
        for (size_t j = 0; j < m->touched_cap; j++) {
            uint64_t v = m->touched[j];
            if (!v) continue;
            size_t i = (size_t)v & (cap - 1);
            while (t[i]) i = (i + 1) & (cap - 1);
            t[i] = v;
        }
        free(m->touched);
        m->touched = t;
        m->touched_cap = cap;
    }
    size_t mask = m->touched_cap - 1, i = (size_t)h & mask;
    while (m->touched[i] && m->touched[i] != h) i = (i + 1) & mask;
    if (!m->touched[i]) {
        m->touched[i] = h;
        m->touched_n++;
    }
    return KVS_OK;
}

void kvs_m_touch(kvs_master *m, const void *key, uint32_t key_len)
{
    if (m->recovery_done_ms || !key || !key_len) return;
    if (touched_add(m, key_hash(key, key_len)) != KVS_OK && !m->touched_lost) {
        /* cannot remember it: refuse every directory entry from now on */
        m->touched_lost = 1;
        KVS_LOGW("rebuild: out of memory for the keys written meanwhile; directory entries "
                 "handed in from now on are refused");
    }
}

int kvs_m_seg_placeable(const kvs_seg *s, uint64_t now)
{
    return now >= s->quiet_until_ms && (!s->has_dir || s->dir_collected);
}

int kvs_m_dir_load_check(kvs_master *m, uint64_t client_id, uint32_t segment_id, kvs_seg **out)
{
    kvs_seg *s = kvs_segs_find(&m->segs, segment_id);
    if (!s) return KVS_ERR_NOT_FOUND;
    if (s->owner != client_id || !s->has_dir || s->dir_collected) return KVS_ERR_INVALID;
    *out = s;
    return KVS_OK;
}

int kvs_m_dir_load_entry(kvs_master *m, kvs_seg *s, const void *key, uint32_t key_len,
                         uint64_t offset, uint64_t size)
{
    int rc = KVS_OK;
    if (key_len < 1 || key_len > KVS_KEY_MAX || size == 0 || size > KVS_MSEG_MAX_SIZE)
        rc = KVS_ERR_INVALID;
    else if (s->dir_stale)
        rc = KVS_ERR_UNAVAILABLE; /* the directory missed a reign (kvs_m_dir_reign) */
    else if (m->recovery_done_ms || m->touched_lost)
        /* the rebuild is over (a late segment, or one mounted again after
         * its registration ended): this master has served the pool since,
         * so any entry may be older than what clients were told */
        rc = KVS_ERR_UNAVAILABLE;
    else if (kvs_index_find(&m->ix, key, key_len) || touched_has(m, key_hash(key, key_len)))
        rc = KVS_ERR_EXISTS; /* written or removed since (that is newer), or listed twice */
    else if (m->n_objs >= m->o.max_objects)
        rc = KVS_ERR_NO_SPACE;
    kvs_obj *o = NULL;
    if (rc == KVS_OK && !(o = kvs_obj_new(key, key_len))) rc = KVS_ERR_NOMEM;
    if (rc == KVS_OK && (rc = kvs_alloc_claim(s->alloc, offset, size)) != KVS_OK) free(o);
    if (rc != KVS_OK) {
        s->dir_rejected++;
        m->cnt.recovery_rejected++;
        static kvs_log_limit lim;
        kvs_log_limited(&lim, 1000, KVS_LOG_WARN, "segment %u: directory entry at offset %llu (%llu bytes) "
                        "refused: %s", s->id, (unsigned long long)offset,
                        (unsigned long long)size, kvs_strerror(rc));
        return rc;
    }
    o->size = size;
    o->offset = offset;
    o->seg = s;
    o->obj_id = o->generation = m->next_obj_id++;
    o->writer = s->owner;
    o->epoch = s->epoch;
    o->lru_stamp = ++m->lru_clock;
    o->state = KVS_OBJ_COMPLETE;
    o->dir = KVS_OD_LISTED;
    kvs_list_push_back(&s->objs, &o->seg_link);
    s->nobjs++;
    kvs_list_push_back(&s->lru, &o->lru);
    kvs_index_insert(&m->ix, o);
    m->n_objs++;
    m->n_complete++;
    s->dir_loaded++;
    m->cnt.recovered_objects++;
    return KVS_OK;
}

void kvs_m_dir_reign(kvs_master *m, kvs_seg *s, uint64_t dir_reign)
{
    s->dir_reign = dir_reign;
    if (!s->has_dir || s->dir_collected) return; /* nothing to hand in */
    if (dir_reign < m->reign_floor) {
        s->dir_stale = 1;
        KVS_LOGW("segment %u: its directory last followed reign %llu, but reign %llu served "
                 "since (it may list what that one removed or replaced): every entry refused",
                 s->id, (unsigned long long)dir_reign, (unsigned long long)m->reign_floor);
    } else if (dir_reign > m->reign_floor && dir_reign < m->reign) {
        m->reign_floor = dir_reign; /* that reign served: directories older than it missed it */
    }
}

void kvs_m_dir_load_end(kvs_master *m, kvs_seg *s)
{
    s->dir_collected = 1;
    uint64_t now = kvs_master_now(m);
    KVS_LOGI("segment %u: directory collected in %llu ms: %llu objects taken back, %llu "
             "entries refused",
             s->id, (unsigned long long)(now > s->mount_ms ? now - s->mount_ms : 0),
             (unsigned long long)s->dir_loaded, (unsigned long long)s->dir_rejected);
    kvs_m_evict_watermark(m, s);
}

static uint64_t uptime(const kvs_master *m)
{
    uint64_t n = kvs_now_ms();
    return n > m->start_ms ? n - m->start_ms : 0;
}

void kvs_master_get_recovery(kvs_master *m, kvs_master_recovery *out)
{
    memset(out, 0, sizeof *out);
    for (size_t i = 0; i < m->segs.n; i++) {
        const kvs_seg *s = m->segs.v[i];
        if (!s->has_dir) continue;
        if (s->dir_collected) out->segments_collected++;
        else out->segments_pending++;
    }
    out->objects_recovered = m->cnt.recovered_objects;
    out->entries_rejected = m->cnt.recovery_rejected;
    out->complete = m->recovery_done_ms != 0;
    out->complete_after_ms = m->recovery_done_ms;
}

void kvs_m_recovery_tick(kvs_master *m)
{
    if (m->recovery_done_ms) return;
    uint64_t up = uptime(m);
    if (up < m->o.recovery_wait_ms) return;
    for (size_t i = 0; i < m->segs.n; i++)
        if (m->segs.v[i]->has_dir && !m->segs.v[i]->dir_collected) return;
    m->recovery_done_ms = up ? up : 1;
    free(m->touched); /* no entry is taken from now on */
    m->touched = NULL;
    m->touched_cap = m->touched_n = 0;
    KVS_LOGI("index rebuild complete after %llu ms: %llu objects taken back from segments' "
             "directories, %llu entries refused",
             (unsigned long long)up, (unsigned long long)m->cnt.recovered_objects,
             (unsigned long long)m->cnt.recovery_rejected);
}
