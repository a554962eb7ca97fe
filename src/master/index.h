/* Object index of the master: key (opaque bytes, 1..KVS_KEY_MAX) -> object,
 * a chained hash table keyed by xxh3-64. Objects are allocated by
 * kvs_obj_new and owned by the caller (the master), which links them into
 * the index, its segment's lists and the LRU; the index only links and
 * unlinks. Not thread-safe. */
#ifndef KVS_MASTER_INDEX_H
#define KVS_MASTER_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "master/list.h"

/* UNLISTING: dropped (removed, evicted) while its segment's directory may
 * still list it; it stays linked by key (gets miss, a new put of the key is
 * KVS_ERR_BUSY, a directory entry of the key is refused) until the owner
 * confirmed the removal, so no older version can come back (dirsync.c). */
enum kvs_obj_state { KVS_OBJ_WRITING = 1, KVS_OBJ_COMPLETE = 2, KVS_OBJ_UNLISTING = 3 };

/* Where an object stands with its segment's directory (dirsync.c), for
 * segments whose owner keeps one. */
enum kvs_obj_dir {
    KVS_OD_NONE = 0,     /* not listed, nothing queued */
    KVS_OD_ADD_Q = 1,    /* complete; its entry waits to be sent (seg->dir_q) */
    KVS_OD_ADD_SENT = 2, /* entry sent, not yet confirmed (seg->dir_sent) */
    KVS_OD_LISTED = 3,   /* the owner confirmed the entry */
    KVS_OD_DEL_Q = 4,    /* dropped; its removal waits to be sent (seg->dir_q) */
    KVS_OD_DEL_SENT = 5, /* removal sent, not yet confirmed (seg->dir_sent) */
};

struct kvs_seg;

typedef struct kvs_obj {
    struct kvs_obj *hnext;   /* hash chain */
    uint64_t hash;           /* xxh3-64 of the key */
    uint64_t size;           /* bytes requested by the writer */
    uint64_t offset;         /* start inside the segment */
    struct kvs_seg *seg;     /* segment holding the bytes; NULL once unmounted */
    uint64_t obj_id;         /* unique per master run; also the generation */
    uint64_t generation;
    uint64_t writer;         /* client id of the writer */
    uint64_t put_deadline_ms;/* WRITING: revoked after this */
    uint64_t lease_expiry_ms;/* latest expiry among its leases */
    uint64_t lru_stamp;      /* master's access count at its last use (LRU order) */
    uint64_t epoch;          /* write epoch of its reservation (segment's at PUT_START) */
    uint32_t leases;         /* live leases */
    uint8_t state;           /* enum kvs_obj_state */
    uint8_t linked;          /* 1 while reachable by key */
    uint8_t dir;             /* enum kvs_obj_dir: DEL_Q/DEL_SENT keep the space */
    uint64_t dir_seq;        /* batch its directory change was last sent in */
    kvs_list dir_link;       /* seg->dir_q or seg->dir_sent */
    struct kvs_m_reply *waiter; /* a REMOVE reply waiting for its unlisting, or NULL */
    uint32_t waiter_idx;     /* its entry in that reply */
    kvs_list lru;            /* COMPLETE: segment LRU; WRITING: master's put list */
    kvs_list seg_link;       /* every object (and unlinked leased object) of its segment */
    uint32_t key_len;
    uint8_t key[];
} kvs_obj;

typedef struct kvs_index {
    kvs_obj **buckets;
    size_t mask;  /* buckets - 1 (power of two) */
    size_t count; /* linked objects */
} kvs_index;

/* Allocates a zeroed object holding a copy of the key (hash computed).
 * Returns NULL on out of memory. Free with free(). */
kvs_obj *kvs_obj_new(const void *key, uint32_t key_len);

/* Initializes an empty index. KVS_OK or KVS_ERR_NOMEM. */
int kvs_index_init(kvs_index *ix);

/* Frees the bucket array (not the objects). */
void kvs_index_destroy(kvs_index *ix);

/* Finds the linked object with this key, or NULL. */
kvs_obj *kvs_index_find(const kvs_index *ix, const void *key, uint32_t key_len);

/* Links o (key not present; caller checks with find). Grows the table when
 * the load exceeds 1 (growth failure is ignored: chains just get longer). */
void kvs_index_insert(kvs_index *ix, kvs_obj *o);

/* Unlinks o if linked (o->linked becomes 0). */
void kvs_index_remove(kvs_index *ix, kvs_obj *o);

/* Calls fn on every linked object (fn must not modify the index). */
void kvs_index_foreach(const kvs_index *ix, void (*fn)(kvs_obj *o, void *ud), void *ud);

#endif
