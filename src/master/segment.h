/* Segment registry: the memory segments clients MOUNT, each with its own
 * allocator, its objects and its LRU list of complete objects. The registry
 * owns kvs_seg records and their allocators; objects are owned by the
 * master. Not thread-safe. */
#ifndef KVS_MASTER_SEGMENT_H
#define KVS_MASTER_SEGMENT_H

#include <stddef.h>
#include <stdint.h>

#include "master/alloc.h"
#include "master/list.h"

#define KVS_SEG_STR_MAX 256

typedef struct kvs_seg {
    uint32_t id;
    uint64_t size;
    uint64_t owner;                      /* client id */
    char hostname[KVS_SEG_STR_MAX];      /* owner's hostname */
    char shm_name[KVS_SEG_STR_MAX];
    char transfer_addr[KVS_SEG_STR_MAX];
    uint8_t host_id[16];
    kvs_alloc *alloc;
    kvs_list objs;   /* every object placed here */
    kvs_list lru;    /* complete objects, least recently used first */
    uint64_t nobjs;  /* objects in objs */
    /* write fencing (proto.h "Write epochs") */
    uint64_t epoch;        /* epoch of new reservations */
    uint64_t fenced_to;    /* highest epoch the owner confirmed with FENCE */
    kvs_list fenced;       /* given-up puts whose space waits for a fence (via lru) */
    uint64_t nfenced, fenced_bytes;
    /* read leases (proto.h "Write epochs"): memory mounted again takes no
     * placements until every read lease granted on its earlier
     * registrations has run out */
    uint64_t last_grant_ms; /* master time of the last lease granted here; 0 = none */
    uint64_t quiet_until_ms;
    /* the owner's directory of complete objects (rebuild.c, dirsync.c) */
    int has_dir;            /* MOUNT said the owner keeps one */
    int dir_collected;      /* its DIR_LOAD ended: the segment takes placements */
    int dir_stale;          /* its directory missed a reign: every entry refused */
    uint64_t dir_reign;     /* the reign its directory last followed (MOUNT) */
    uint64_t mount_ms;      /* master time of the MOUNT */
    uint64_t dir_loaded, dir_rejected; /* DIR_LOAD entries taken / refused */
    kvs_list dir_q;         /* objects whose entry change waits to be sent */
    kvs_list dir_sent;      /* sent, not confirmed (oldest batch first) */
    uint64_t n_dir_q, n_dir_sent;
    uint64_t n_del_q;       /* removals among dir_q (a parked DIR_SYNC answers at once) */
    uint64_t dir_q_since_ms; /* master time dir_q last became non-empty */
    uint64_t dir_seq;       /* last DIR_SYNC batch handed out */
    uint64_t unlist_bytes;  /* space of dropped objects until their removal is confirmed */
    /* a DIR_SYNC of the owner waiting for changes (master.h, "parked") */
    struct kvs_mconn *park_conn; /* NULL = none */
    struct kvs_wbuf *park_out;   /* its connection's output buffer */
    uint64_t park_req;           /* its req_id */
    uint64_t park_until_ms;      /* answered empty at this master time */
} kvs_seg;

typedef struct kvs_segs {
    kvs_seg **v;
    size_t n, cap, max;
    uint32_t next_id;
} kvs_segs;

/* Initializes an empty registry admitting at most `max` segments; ids start
 * at first_id (0 is taken as 1). */
void kvs_segs_init(kvs_segs *S, size_t max, uint32_t first_id);

/* Frees every segment record and allocator (objects must be gone). */
void kvs_segs_destroy(kvs_segs *S);

/* Creates and registers a segment of `size` bytes whose owner fenced it to
 * `epoch` (> 0). Strings are copied
 * (truncated to KVS_SEG_STR_MAX-1). Returns it, or NULL with *err set to
 * KVS_ERR_BUSY (registry full) or KVS_ERR_NOMEM. */
kvs_seg *kvs_segs_add(kvs_segs *S, uint64_t size, uint64_t owner, const char *hostname,
                      const char *shm_name, const char *transfer_addr,
                      const uint8_t host_id[16], uint64_t epoch, int *err);

/* Finds a segment by id, or NULL. */
kvs_seg *kvs_segs_find(const kvs_segs *S, uint32_t id);

/* Unregisters and frees s (its object lists must be empty). */
void kvs_segs_remove(kvs_segs *S, kvs_seg *s);

/* Bytes used in s (allocator view). */
uint64_t kvs_seg_used(const kvs_seg *s);

#endif
