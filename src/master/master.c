/* Master lifecycle, clock, periodic work and object lifecycle helpers. */
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "master/master_int.h"

void kvs_master_opts_init(kvs_master_opts *o)
{
    memset(o, 0, sizeof *o);
    o->client_ttl_ms = 10000;
    o->lease_ms = 5000;
    o->put_timeout_ms = 30000;
    o->evict_high = 0.95;
    o->evict_low = 0.90;
    o->max_clients = 65536;
    o->max_segments = 4096;
    o->max_leases = 1u << 20;
    o->max_objects = 64u << 20;
    o->recovery_wait_ms = 5000;
    const char *w = getenv("KVSHELF_RECOVERY_WAIT_MS");
    if (w && *w) {
        char *end;
        unsigned long v = strtoul(w, &end, 10);
        if (*end == '\0' && v <= 3600000ul) o->recovery_wait_ms = (uint32_t)v;
    }
}

static uint64_t random_base(void)
{
    uint64_t r = 0;
    if (kvs_random_bytes(&r, sizeof r) != KVS_OK) r = kvs_now_ns();
    /* below 2^41: ids stay exact as JSON numbers (2^53) and never wrap */
    return (r & 0x1ffffffffffull) | 1;
}

int kvs_master_new(const kvs_master_opts *o, kvs_master **out)
{
    *out = NULL;
    if (!o || o->client_ttl_ms == 0 || o->lease_ms == 0 || o->put_timeout_ms == 0 ||
        !(o->evict_low > 0 && o->evict_low <= o->evict_high && o->evict_high <= 1.0) ||
        !o->max_clients || !o->max_segments || !o->max_leases || !o->max_objects)
        return KVS_ERR_INVALID;
    if (o->secret && strlen(o->secret) >= 256) return KVS_ERR_INVALID;
    kvs_master *m = calloc(1, sizeof *m);
    if (!m) return KVS_ERR_NOMEM;
    m->o = *o;
    if (o->secret) kvs_strlcpy(m->secret, o->secret, sizeof m->secret);
    m->o.secret = m->secret;
    pthread_mutex_init(&m->lock, NULL);
    kvs_list_init(&m->writing);
    kvs_list_init(&m->replies);
    uint64_t b = o->id_base;
    /* segment ids differ across master restarts, so a stale id never names
     * a new segment by accident */
    uint32_t seg_base = b ? (uint32_t)b : (uint32_t)(random_base() & 0x7fffffffu);
    kvs_segs_init(&m->segs, o->max_segments, seg_base);
    m->next_obj_id = b ? b : random_base();
    if (kvs_index_init(&m->ix) ||
        kvs_clients_init(&m->clients, o->max_clients, b ? b : random_base()) ||
        kvs_leases_init(&m->leases, (size_t)o->max_leases, b ? b : random_base())) {
        kvs_master_free(m);
        return KVS_ERR_NOMEM;
    }
    m->start_ms = kvs_now_ms();
    m->reign = kvs_wall_ms();
    *out = m;
    return KVS_OK;
}

static void free_obj_cb(kvs_obj *o, void *ud)
{
    (void)ud;
    free(o);
}

void kvs_master_free(kvs_master *m)
{
    if (!m) return;
    if (m->leases.buckets) {
        kvs_obj *o;
        while ((o = kvs_leases_reap_one(&m->leases, UINT64_MAX)) != NULL)
            kvs_m_obj_lease_ended(m, o);
    }
    for (size_t i = 0; i < m->segs.n; i++) { /* their connections may be gone already */
        m->segs.v[i]->park_conn = NULL;
        m->segs.v[i]->park_out = NULL;
    }
    m->n_parked = 0;
    kvs_m_replies_free(m);
    while (m->segs.n) kvs_m_segment_drop(m, m->segs.v[m->segs.n - 1]);
    if (m->ix.buckets) kvs_index_foreach(&m->ix, free_obj_cb, NULL);
    kvs_index_destroy(&m->ix);
    free(m->touched);
    kvs_segs_destroy(&m->segs);
    kvs_clients_destroy(&m->clients);
    if (m->leases.buckets) kvs_leases_destroy(&m->leases);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

void kvs_master_lock(kvs_master *m) { pthread_mutex_lock(&m->lock); }
void kvs_master_unlock(kvs_master *m) { pthread_mutex_unlock(&m->lock); }

uint64_t kvs_master_now(const kvs_master *m) { return m->fake_now ? m->fake_now : kvs_now_ms(); }
void kvs_master_set_time(kvs_master *m, uint64_t now_ms) { m->fake_now = now_ms; }

void kvs_master_set_reign(kvs_master *m, uint64_t reign, uint64_t floor)
{
    m->reign = reign;
    m->reign_floor = floor;
}

uint64_t kvs_master_reign(const kvs_master *m) { return m->reign; }

int kvs_master_shutdown_requested(const kvs_master *m) { return m->shutdown; }

void kvs_master_get_counters(const kvs_master *m, kvs_master_counters *out) { *out = m->cnt; }

void kvs_m_obj_destroy(kvs_master *m, kvs_obj *o)
{
    kvs_m_dir_forget(m, o);
    if (o->seg) {
        int rc = kvs_alloc_release(o->seg->alloc, o->offset, o->size);
        if (rc != KVS_OK)
            KVS_LOGE("internal: releasing object %llu in segment %u: %s",
                     (unsigned long long)o->obj_id, o->seg->id, kvs_strerror(rc));
        kvs_list_remove(&o->seg_link);
        o->seg->nobjs--;
    }
    m->n_objs--;
    free(o);
}

void kvs_m_obj_drop(kvs_master *m, kvs_obj *o)
{
    if (o->linked && o->state == KVS_OBJ_COMPLETE) m->n_complete--;
    kvs_list_remove(&o->lru);
    if (kvs_m_dir_unlist(m, o)) { /* freed (and unlinked) once the owner unlisted it */
        if (o->linked && o->state != KVS_OBJ_UNLISTING) {
            o->state = KVS_OBJ_UNLISTING;
            m->n_unlisting++;
        }
        return;
    }
    kvs_m_obj_unlink(m, o);
    if (o->leases == 0) kvs_m_obj_destroy(m, o);
}

void kvs_m_obj_unlink(kvs_master *m, kvs_obj *o)
{
    if (!o->linked) return;
    kvs_index_remove(&m->ix, o);
    if (o->state == KVS_OBJ_UNLISTING) m->n_unlisting--;
}

/* Asks for the next fence of s if a given-up put still waits for one. The
 * epoch handed out is raised only one step past the last fence its owner
 * confirmed (s->epoch <= fenced_to + 1 <= the owner's control page + 1), so
 * an owner that mounts again fences every epoch any registration of its
 * memory handed out by fencing to its control page + 2 (proto.h). A put
 * given up under the raised epoch waits for the fence after next. */
static void seg_want_fence(kvs_seg *s)
{
    if (s->epoch != s->fenced_to) return; /* a fence is asked already */
    for (kvs_list *e = s->fenced.next; e != &s->fenced; e = e->next) {
        const kvs_obj *o = KVS_CONTAINER_OF(e, kvs_obj, lru);
        if (o->epoch >= s->fenced_to) {
            s->epoch = s->fenced_to + 1;
            KVS_LOGI("segment %u: a put was given up with writes possibly in flight; asking "
                     "its owner to fence to epoch %llu",
                     s->id, (unsigned long long)s->epoch);
            return;
        }
    }
}

void kvs_m_obj_abandon(kvs_master *m, kvs_obj *o)
{
    kvs_seg *s = o->seg;
    if (!s || o->state != KVS_OBJ_WRITING) { /* no space left to protect */
        kvs_m_obj_drop(m, o);
        return;
    }
    kvs_m_obj_unlink(m, o);
    kvs_list_remove(&o->lru);
    if (o->epoch < s->fenced_to) { /* the owner already fenced past it */
        kvs_m_obj_destroy(m, o);
        return;
    }
    kvs_list_push_back(&s->fenced, &o->lru);
    s->nfenced++;
    s->fenced_bytes += o->size;
    m->cnt.fenced_puts++;
    seg_want_fence(s);
}

size_t kvs_m_fences_wanted(kvs_master *m, uint64_t client_id, kvs_m_fence_req *out, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < m->segs.n && n < cap; i++) {
        const kvs_seg *s = m->segs.v[i];
        if (s->owner == client_id && s->fenced_to < s->epoch)
            out[n++] = (kvs_m_fence_req){s->id, s->epoch};
    }
    return n;
}

int kvs_m_fence(kvs_master *m, uint64_t client_id, uint32_t segment_id, uint64_t epoch)
{
    kvs_seg *s = kvs_segs_find(&m->segs, segment_id);
    if (!s) return KVS_ERR_NOT_FOUND;
    if (s->owner != client_id || epoch > s->epoch) return KVS_ERR_INVALID;
    if (epoch <= s->fenced_to) return KVS_OK;
    s->fenced_to = epoch;
    uint64_t freed = 0;
    kvs_list *e = s->fenced.next;
    while (e != &s->fenced) {
        kvs_obj *o = KVS_CONTAINER_OF(e, kvs_obj, lru);
        e = e->next;
        if (o->epoch >= epoch) continue;
        kvs_list_remove(&o->lru);
        s->nfenced--;
        s->fenced_bytes -= o->size;
        kvs_m_obj_destroy(m, o);
        freed++;
    }
    m->cnt.fences++;
    KVS_LOGI("segment %u fenced to epoch %llu: %llu given-up puts freed", s->id,
             (unsigned long long)epoch, (unsigned long long)freed);
    seg_want_fence(s); /* puts given up under the epoch just fenced to */
    return KVS_OK;
}

void kvs_m_obj_lease_ended(kvs_master *m, kvs_obj *o)
{
    if (o->leases == 0 && !o->linked && !kvs_m_dir_holds(o)) kvs_m_obj_destroy(m, o);
}

void kvs_master_tick(kvs_master *m)
{
    uint64_t now = kvs_master_now(m);
    kvs_obj *o;
    while ((o = kvs_leases_reap_one(&m->leases, now)) != NULL) {
        m->cnt.expired_leases++;
        kvs_m_obj_lease_ended(m, o);
    }
    while (!kvs_list_empty(&m->writing)) {
        o = KVS_CONTAINER_OF(m->writing.next, kvs_obj, lru);
        if (o->put_deadline_ms > now) break;
        KVS_LOGI("revoking put of object %llu (deadline passed)", (unsigned long long)o->obj_id);
        m->cnt.revoked_puts++;
        kvs_m_obj_abandon(m, o);
    }
    if (now > m->o.client_ttl_ms) {
        kvs_mclient *c;
        while ((c = kvs_clients_find_stale(&m->clients, now - m->o.client_ttl_ms)) != NULL) {
            KVS_LOGI("client %llu (%s pid %llu) expired", (unsigned long long)c->id, c->hostname,
                     (unsigned long long)c->pid);
            kvs_m_client_expire(m, c);
        }
    }
    kvs_m_expire_disconnected(m, now);
    for (size_t i = 0; i < m->segs.n; i++) kvs_m_evict_watermark(m, m->segs.v[i]);
    kvs_m_recovery_tick(m);
}
