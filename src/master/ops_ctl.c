/* Client and segment operations: HELLO, HEARTBEAT, MOUNT, UNMOUNT, expiry. */
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "master/master_int.h"

int kvs_m_hello(kvs_master *m, const char *hostname, const uint8_t host_id[16], uint64_t pid,
                uint32_t uid, uint32_t role, uint64_t *client_id)
{
    if (role < 1 || role > 3) return KVS_ERR_INVALID;
    int err;
    kvs_mclient *c = kvs_clients_add(&m->clients, hostname, host_id, pid, uid, role,
                                     kvs_master_now(m), &err);
    if (!c) return err;
    *client_id = c->id;
    KVS_LOGI("client %llu: %s pid %llu uid %u role %u", (unsigned long long)c->id, c->hostname,
             (unsigned long long)pid, uid, role);
    return KVS_OK;
}

int kvs_m_heartbeat(kvs_master *m, uint64_t client_id)
{
    kvs_mclient *c = kvs_clients_find(&m->clients, client_id);
    if (!c) return KVS_ERR_NOT_FOUND;
    c->last_seen_ms = kvs_master_now(m);
    return KVS_OK;
}

int kvs_m_mount(kvs_master *m, uint64_t client_id, uint64_t size, const char *shm_name,
                const char *transfer_addr, const uint8_t host_id[16], uint64_t epoch,
                uint32_t *segment_id)
{
    return kvs_m_mount_flags(m, client_id, size, shm_name, transfer_addr, host_id, epoch, 0,
                             segment_id);
}

int kvs_m_mount_flags(kvs_master *m, uint64_t client_id, uint64_t size, const char *shm_name,
                      const char *transfer_addr, const uint8_t host_id[16], uint64_t epoch,
                      uint32_t flags, uint32_t *segment_id)
{
    if ((flags & ~(uint32_t)(KVS_MOUNT_F_DIR | KVS_MOUNT_F_DIR_EMPTY)) ||
        ((flags & KVS_MOUNT_F_DIR_EMPTY) && !(flags & KVS_MOUNT_F_DIR)))
        return KVS_ERR_INVALID;
    kvs_mclient *c = kvs_clients_find(&m->clients, client_id);
    if (!c) return KVS_ERR_NOT_FOUND;
    if (size < KVS_ALLOC_GRAIN || size > KVS_MSEG_MAX_SIZE) return KVS_ERR_INVALID;
    if (epoch == 0 || epoch >= (1ull << 60)) return KVS_ERR_INVALID;
    /* The same memory mounted again (its owner reconnected before its old
     * registration expired): drop the stale registration first, or two
     * allocators would hand out the same bytes. Read leases granted on an
     * earlier registration of this memory may still run: no placements in
     * it until they ran out. Memory mounted before (epoch > 1) that this
     * master does not remember (registered with a master before a restart)
     * waits one whole lease. */
    uint64_t now = kvs_master_now(m);
    uint64_t quiet = 0;
    int known = 0;
    for (size_t i = m->segs.n; shm_name[0] && i-- > 0;) {
        kvs_seg *old = m->segs.v[i];
        if (!strcmp(old->shm_name, shm_name) && !memcmp(old->host_id, host_id, 16)) {
            KVS_LOGI("segment %u: its memory ('%s') is mounted again by client %llu; dropping "
                     "the stale registration",
                     old->id, shm_name, (unsigned long long)client_id);
            kvs_m_segment_drop(m, old); /* remembered in m->retired */
        }
    }
    for (unsigned i = 0; shm_name[0] && i < m->n_retired; i++) {
        struct kvs_m_retired *r = &m->retired[i];
        if (r->shm_name[0] && !strcmp(r->shm_name, shm_name) && !memcmp(r->host_id, host_id, 16)) {
            quiet = KVS_MAX(quiet, r->leases_until_ms);
            known = 1;
            r->shm_name[0] = '\0';
        }
    }
    if (!known && epoch > 1) quiet = now + m->o.lease_ms;
    int err;
    kvs_seg *s = kvs_segs_add(&m->segs, size, client_id, c->hostname, shm_name, transfer_addr,
                              host_id, epoch, &err);
    if (!s) return err;
    s->quiet_until_ms = quiet > now ? quiet : 0;
    s->mount_ms = now;
    s->has_dir = (flags & KVS_MOUNT_F_DIR) != 0;
    s->dir_collected = (flags & KVS_MOUNT_F_DIR_EMPTY) != 0; /* nothing to hand in */
    if (s->quiet_until_ms)
        KVS_LOGI("segment %u: memory mounted before; no placements for %llu ms (read leases "
                 "of its earlier registration may still run)",
                 s->id, (unsigned long long)(quiet - now));
    *segment_id = s->id;
    KVS_LOGI("segment %u mounted by client %llu: %llu bytes, shm '%s', transfer '%s'%s", s->id,
             (unsigned long long)client_id, (unsigned long long)size, s->shm_name,
             s->transfer_addr,
             s->has_dir && !s->dir_collected ? "; waiting for its directory" : "");
    return KVS_OK;
}

/* Remembers until when read leases on s's memory may run (m->retired). */
static void retire(kvs_master *m, const kvs_seg *s)
{
    if (!s->shm_name[0]) return;
    uint64_t until = s->last_grant_ms ? s->last_grant_ms + m->o.lease_ms : 0;
    until = KVS_MAX(until, s->quiet_until_ms);
    struct kvs_m_retired *r = NULL;
    for (unsigned i = 0; i < m->n_retired && !r; i++) /* a free entry first */
        if (!m->retired[i].shm_name[0]) r = &m->retired[i];
    if (!r && m->n_retired < KVS_M_RETIRED_MAX) r = &m->retired[m->n_retired++];
    if (!r) { /* full: forget the oldest (it will wait a whole lease) */
        r = &m->retired[m->retired_next];
        m->retired_next = (m->retired_next + 1) % KVS_M_RETIRED_MAX;
    }
    kvs_strlcpy(r->shm_name, s->shm_name, sizeof r->shm_name);
    memcpy(r->host_id, s->host_id, 16);
    r->leases_until_ms = until;
}

void kvs_m_segment_drop(kvs_master *m, kvs_seg *s)
{
    retire(m, s);
    kvs_m_dir_unpark(m, s); /* its owner's DIR_SYNC times out and finds it gone */
    while (!kvs_list_empty(&s->objs)) {
        kvs_obj *o = KVS_CONTAINER_OF(s->objs.next, kvs_obj, seg_link);
        kvs_m_dir_forget(m, o); /* the owner's next registration starts afresh */
        kvs_list_remove(&o->seg_link);
        s->nobjs--;
        o->seg = NULL; /* its bytes are gone with the segment */
        if (o->state == KVS_OBJ_WRITING && o->linked) m->cnt.revoked_puts++;
        kvs_m_obj_drop(m, o);
    }
    KVS_LOGI("segment %u unmounted", s->id);
    kvs_segs_remove(&m->segs, s);
}

int kvs_m_unmount(kvs_master *m, uint64_t client_id, uint32_t segment_id)
{
    kvs_seg *s = kvs_segs_find(&m->segs, segment_id);
    if (!s) return KVS_ERR_NOT_FOUND;
    if (s->owner != client_id) return KVS_ERR_INVALID;
    kvs_m_segment_drop(m, s);
    return KVS_OK;
}

void kvs_m_client_expire(kvs_master *m, kvs_mclient *c)
{
    uint64_t id = c->id;
    for (size_t i = m->segs.n; i-- > 0;)
        if (m->segs.v[i]->owner == id) kvs_m_segment_drop(m, m->segs.v[i]);
    kvs_list *e = m->writing.next;
    while (e != &m->writing) {
        kvs_obj *o = KVS_CONTAINER_OF(e, kvs_obj, lru);
        e = e->next;
        if (o->writer == id) {
            m->cnt.revoked_puts++;
            kvs_m_obj_abandon(m, o);
        }
    }
    kvs_clients_remove(&m->clients, c);
    m->cnt.expired_clients++;
}
