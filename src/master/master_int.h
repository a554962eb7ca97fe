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
    uint64_t lru_clock; /* counts uses of objects: their lru_stamp */
    /* reigns (kvs_master_set_reign): this master's, and the latest earlier
     * one known to have served; a directory that last followed an older
     * reign than that is refused whole (rebuild.c) */
    uint64_t reign, reign_floor;
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
    uint64_t recovery_done_ms; /* uptime at which the rebuild became complete; 0 = not yet */
    uint64_t n_parked;         /* segments with a parked DIR_SYNC */
    kvs_list replies;          /* deferred REMOVE replies (struct kvs_m_reply) */
    uint64_t n_replies_ready;  /* of those, complete ones waiting to be written */
    uint64_t n_unlisting;      /* objects in state KVS_OBJ_UNLISTING */
    /* keys this master put or removed while the rebuild was not complete
     * (rebuild.c): a directory entry of such a key may be older than what
     * the clients were told, so it is refused. Freed once complete. */
    uint64_t *touched;         /* open addressing set of key hashes (0 = empty) */
    size_t touched_cap, touched_n;
    int touched_lost;          /* the set could not grow: refuse every entry */
};

/* A REMOVE reply deferred until the owners confirmed unlisting the removed
 * objects (dirsync.c). Owned by the master (m->replies). */
typedef struct kvs_m_reply {
    kvs_list link;
    kvs_mconn *conn;
    kvs_wbuf *out;   /* the connection's output buffer */
    uint64_t req_id;
    uint32_t n, waiting;
    int32_t *status; /* n per-key statuses */
    kvs_obj **objs;  /* n: the object entry i waits for, or NULL */
} kvs_m_reply;

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
/* A directory MOUNT says last followed reign dir_reign (0: none recorded):
 * one older than the latest reign known to have served (m->reign_floor)
 * may list what that reign removed or replaced, so every entry of it is
 * refused (its owner unlists them); a newer one raises the floor. */
void kvs_m_dir_reign(kvs_master *m, kvs_seg *s, uint64_t dir_reign);
/* kvs_m_mount with MOUNT's flags: KVS_MOUNT_F_DIR (proto.h): the owner keeps
 * a directory, hands it in with DIR_LOAD and follows changes with
 * DIR_SYNC; the segment takes no placements until its DIR_LOAD ended
 * (KVS_MOUNT_F_DIR_EMPTY: the directory is empty, no DIR_LOAD comes).
 * Unknown flags: KVS_ERR_INVALID. */
int kvs_m_mount_flags(kvs_master *m, uint64_t client_id, uint64_t size, const char *shm_name,
                      const char *transfer_addr, const uint8_t host_id[16], uint64_t epoch,
                      uint32_t flags, uint32_t *segment_id);
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
/* kvs_m_remove that also says (*held, may be NULL) which object is
 * UNLISTING: its removal is final only once its owner confirmed it. That
 * is the removed object (KVS_OK), or one dropped earlier (evicted) whose
 * unlisting is pending (KVS_ERR_NOT_FOUND; KVS_ERR_BUSY if another removal
 * waits on it already): the caller's answer waits for the unlisting in
 * both cases, so that a master rebuilt from the directory never serves a
 * key its caller was told is gone. */
int kvs_m_remove_held(kvs_master *m, const void *key, uint32_t key_len, kvs_obj **held);

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

/* Directory rebuild (rebuild.c). */
/* One entry of segment_id's directory handed in by its owner client_id:
 * indexes (key, offset, size) as a complete, listed object. KVS_OK;
 * KVS_ERR_NOT_FOUND (no such segment) / KVS_ERR_INVALID (not the owner, no
 * directory, already collected, bad bounds or key) for the whole message
 * (checked by kvs_m_dir_load_check first); per entry: KVS_ERR_INVALID
 * (bounds, alignment, key length, overlaps space in use), KVS_ERR_EXISTS
 * (the key is stored or being written already), KVS_ERR_NO_SPACE (object
 * limit), KVS_ERR_NOMEM. A refused entry must be unlisted by the owner
 * before it ends the load. */
int kvs_m_dir_load_check(kvs_master *m, uint64_t client_id, uint32_t segment_id, kvs_seg **out);
int kvs_m_dir_load_entry(kvs_master *m, kvs_seg *s, const void *key, uint32_t key_len,
                         uint64_t offset, uint64_t size);
/* The owner handed in its whole directory: the segment takes placements
 * from now on (after its quiet time). */
void kvs_m_dir_load_end(kvs_master *m, kvs_seg *s);
/* Notes that a client put or removed `key` (before the rebuild is
 * complete: a directory entry of the key handed in later is refused). */
void kvs_m_touch(kvs_master *m, const void *key, uint32_t key_len);
/* 1 if s may take new placements at master time `now`. */
int kvs_m_seg_placeable(const kvs_seg *s, uint64_t now);
/* Notes the moment the rebuild became complete (kvs_master_tick). */
void kvs_m_recovery_tick(kvs_master *m);

/* Directory changes (dirsync.c). */
/* A complete object was published in a segment with a directory: queues
 * its entry for the owner. */
void kvs_m_dir_listed(kvs_master *m, kvs_obj *o);
/* o leaves the index (drop, eviction, remove): cancels an entry not yet
 * sent, else queues its removal; returns 1 if the space must wait for the
 * owner's confirmation (o->dir is then DEL_Q), 0 if it may be freed now. */
int kvs_m_dir_unlist(kvs_master *m, kvs_obj *o);
/* Forgets o's directory state (its segment is going away, or o is freed);
 * a REMOVE waiting for o's unlisting gets KVS_ERR_UNAVAILABLE for it. */
void kvs_m_dir_forget(kvs_master *m, kvs_obj *o);
/* DIR_SYNC: the owner client_id applied every batch up to ack_seq of
 * segment_id; frees the space of confirmed removals and appends the next
 * batch to `body` (proto.h DIR_SYNC response). KVS_OK, KVS_ERR_NOT_FOUND (no
 * such segment), KVS_ERR_INVALID (not the owner, no directory, ack from the
 * future); nothing is appended on error. */
int kvs_m_dir_sync(kvs_master *m, uint64_t client_id, uint32_t segment_id, uint64_t ack_seq,
                   kvs_wbuf *body);
/* The two halves of kvs_m_dir_sync: kvs_m_dir_ack checks the request and
 * applies the acknowledgement (*out: the segment); kvs_m_dir_batch appends
 * the next batch (proto.h DIR_SYNC response body) of s. */
int kvs_m_dir_ack(kvs_master *m, uint64_t client_id, uint32_t segment_id, uint64_t ack_seq,
                  kvs_seg **out);
void kvs_m_dir_batch(kvs_master *m, kvs_seg *s, kvs_wbuf *body);
/* Parks a DIR_SYNC of `c` (request req_id, reply into `out`) on s for up
 * to wait_ms (master.h); an earlier one parked on s is answered first. */
void kvs_m_dir_park(kvs_master *m, kvs_seg *s, kvs_mconn *c, kvs_wbuf *out, uint64_t req_id,
                    uint32_t wait_ms);
/* Forgets s's parked DIR_SYNC without answering it (s is going away). */
void kvs_m_dir_unpark(kvs_master *m, kvs_seg *s);
/* Defers the reply to a REMOVE (req_id, n keys with statuses st[0..n))
 * until every held[i] != NULL is unlisted (then KVS_OK; KVS_ERR_UNAVAILABLE
 * if its segment goes first); copies st and held. Returns KVS_OK (nothing
 * to append now), or KVS_ERR_NOMEM (the caller answers at once). */
int kvs_m_defer_remove(kvs_master *m, kvs_mconn *c, kvs_wbuf *out, uint64_t req_id,
                       uint32_t n, const int32_t *st, kvs_obj *const *held);
/* Frees every deferred reply without writing it (kvs_master_free). */
void kvs_m_replies_free(kvs_master *m);
/* 1 if o's segment's directory may list o (its entry was sent): dropping o
 * then leaves it UNLISTING until the owner confirms (kvs_m_dir_unlist). */
static inline int kvs_m_dir_may_list(const kvs_obj *o)
{
    return o->seg && o->seg->has_dir &&
           (o->dir == KVS_OD_ADD_SENT || o->dir == KVS_OD_LISTED || o->dir == KVS_OD_DEL_Q ||
            o->dir == KVS_OD_DEL_SENT);
}
/* 1 while o's space must be kept (its removal is not confirmed yet). */
static inline int kvs_m_dir_holds(const kvs_obj *o)
{
    return o->dir == KVS_OD_DEL_Q || o->dir == KVS_OD_DEL_SENT;
}
/* Unlinks o from the key index (if linked). */
void kvs_m_obj_unlink(kvs_master *m, kvs_obj *o);
/* Frees o's space and record (o unlinked, unleased, not held); master.c. */
void kvs_m_obj_destroy(kvs_master *m, kvs_obj *o);

/* Eviction (evict.c): evicts least recently used complete, unleased objects
 * of s until its use is below the low watermark and `need` bytes fit
 * (need 0: watermark only). Returns the number evicted. */
uint64_t kvs_m_evict(kvs_master *m, kvs_seg *s, uint64_t need);
/* If s is above the high watermark, evicts down to the low one. */
void kvs_m_evict_watermark(kvs_master *m, kvs_seg *s);
/* Whether `need` more bytes keep s at or below the high watermark (a put
 * there evicts nothing). */
int kvs_m_evict_has_room(const kvs_master *m, const kvs_seg *s, uint64_t need);
/* lru_stamp of the object s would evict first (lower: used longer ago);
 * UINT64_MAX if none may go. Placement on a full pool evicts where this is oldest, so the
 * pool as a whole loses its least recently used objects first. */
uint64_t kvs_m_evict_oldest(const kvs_seg *s);

#endif
