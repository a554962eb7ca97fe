/* Internal state of the master and the operations behind each RPC, shared
 * by the files of src/master and by the unit tests. Callers hold the master
 * lock. Every kvs_m_* function returns KVS_OK or a negative kvs_error that
 * becomes the per-item (or per-message) status on the wire. */
#ifndef KVS_MASTER_INT_H
#define KVS_MASTER_INT_H

#include <pthread.h>
#include <stdint.h>

#include "master/clients.h"
#include "master/index.h"
#include "master/lease.h"
#include "master/list.h"
#include "master/master.h"
#include "master/segment.h"

#define KVS_MSEG_MAX_SIZE (1ull << 50) /* 1 PiB: larger MOUNTs are invalid */

#define KVS_M_RETIRED_MAX 64

struct kvs_master {
    pthread_mutex_t lock;
    kvs_master_opts o;
    char secret[256];
    char local_path[108]; /* unix socket offered to same-host TCP peers ("": none) */
    kvs_index ix;
    kvs_segs segs;
    kvs_clients clients;
    kvs_leases leases;
    kvs_list writing;      /* WRITING objects in put-deadline order */
    uint64_t next_obj_id;
    uint64_t n_objs;       /* object records alive (linked, writing or leased) */
    uint64_t n_complete;   /* linked COMPLETE objects */
    uint64_t fake_now;
    uint64_t start_ms;
    int shutdown;
    kvs_master_counters cnt;
    /* memory whose registration ended (unmount, expiry): until when read
     * leases granted on it may run, so that mounting it again waits exactly
     * that long (ops_ctl.c); a bounded ring, forgetting is safe (memory not
     * found here waits a whole lease) */
    struct kvs_m_retired {
        char shm_name[KVS_SEG_STR_MAX];
        uint8_t host_id[16];
        uint64_t leases_until_ms;
    } retired[KVS_M_RETIRED_MAX];
    unsigned n_retired, retired_next;
};

/* Where a found object lives, as GET returns it. */
typedef struct kvs_m_loc {
    uint64_t size, offset, obj_id, lease_id;
    uint32_t segment_id;
} kvs_m_loc;

/* Clients and segments (ops_ctl.c). */
int kvs_m_hello(kvs_master *m, const char *hostname, const uint8_t host_id[16], uint64_t pid,
                uint32_t uid, uint32_t role, uint64_t *client_id);
int kvs_m_heartbeat(kvs_master *m, uint64_t client_id);
int kvs_m_mount(kvs_master *m, uint64_t client_id, uint64_t size, const char *shm_name,
                const char *transfer_addr, const uint8_t host_id[16], uint64_t epoch,
                uint32_t *segment_id);
/* A fence the master wants of a segment (HEARTBEAT reply). */
typedef struct kvs_m_fence_req {
    uint32_t segment_id;
    uint64_t epoch;
} kvs_m_fence_req;
/* Fences wanted of client_id's segments: up to cap into out; returns the count. */
size_t kvs_m_fences_wanted(kvs_master *m, uint64_t client_id, kvs_m_fence_req *out, size_t cap);
/* The owner fenced segment_id to epoch: frees the space of given-up puts
 * with older reservations. KVS_OK, KVS_ERR_NOT_FOUND (no such segment),
 * KVS_ERR_INVALID (not the owner, or epoch above the segment's). */
int kvs_m_fence(kvs_master *m, uint64_t client_id, uint32_t segment_id, uint64_t epoch);
int kvs_m_unmount(kvs_master *m, uint64_t client_id, uint32_t segment_id);
/* Drops a segment and every object in it (leased objects stay as records
 * without a segment until their leases end). */
void kvs_m_segment_drop(kvs_master *m, kvs_seg *s);
/* Expires a client: unmounts its segments, revokes its puts, forgets it. */
void kvs_m_client_expire(kvs_master *m, kvs_mclient *c);
/* Expires the clients whose connection closed more than the disconnect
 * grace ago (liveness.c; called by kvs_master_tick). */
void kvs_m_expire_disconnected(kvs_master *m, uint64_t now);

/* Objects (ops_obj.c). */
int kvs_m_put_start(kvs_master *m, uint64_t client_id, const void *key, uint32_t key_len,
                    uint64_t size, uint32_t *segment_id, uint64_t *offset, uint64_t *obj_id,
                    uint64_t *epoch);
int kvs_m_put_end(kvs_master *m, uint64_t client_id, const void *key, uint32_t key_len,
                  uint64_t obj_id, int ok);
int kvs_m_get(kvs_master *m, uint64_t client_id, const void *key, uint32_t key_len,
              kvs_m_loc *loc);
int kvs_m_release(kvs_master *m, uint64_t lease_id);
/* 1 if stored (complete), 0 if not. */
int kvs_m_exists(kvs_master *m, const void *key, uint32_t key_len);
int kvs_m_remove(kvs_master *m, const void *key, uint32_t key_len);

/* Object lifecycle (master.c). */
/* Unlinks o from the key index and its lists; frees it (and its space) at
 * once unless leased, then when the last lease ends. */
void kvs_m_obj_drop(kvs_master *m, kvs_obj *o);
/* Gives up a WRITING object whose writes may still be in flight: unlinks
 * it, keeps its space until the segment's owner fenced past its epoch
 * (raising the segment's epoch and asking for a fence if needed). */
void kvs_m_obj_abandon(kvs_master *m, kvs_obj *o);
/* Called after a lease on o ended: frees o if unlinked and unleased. */
void kvs_m_obj_lease_ended(kvs_master *m, kvs_obj *o);

/* Eviction (evict.c): evicts least recently used complete, unleased objects
 * of s until its use is below the low watermark and `need` bytes fit
 * (need 0: watermark only). Returns the number evicted. */
uint64_t kvs_m_evict(kvs_master *m, kvs_seg *s, uint64_t need);
/* If s is above the high watermark, evicts down to the low one. */
void kvs_m_evict_watermark(kvs_master *m, kvs_seg *s);

#endif
