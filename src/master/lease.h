/* Read leases: GET grants one per found object; RELEASE or expiry ends it.
 * A lease table is a hash by lease id plus a list in expiry order (every
 * lease lasts the same time, so grant order is expiry order). Each grant
 * bumps obj->leases; each end drops it and hands the object back to the
 * caller, which frees unlinked objects whose last lease ended. The table owns
 * its lease records, not the objects. Not thread-safe. */
#ifndef KVS_MASTER_LEASE_H
#define KVS_MASTER_LEASE_H

#include <stddef.h>
#include <stdint.h>

#include "master/index.h"
#include "master/list.h"

typedef struct kvs_lease {
    struct kvs_lease *hnext;
    uint64_t id;
    uint64_t expiry_ms;
    uint64_t client;
    kvs_obj *obj;
    kvs_list fifo;
} kvs_lease;

typedef struct kvs_leases {
    kvs_lease **buckets;
    size_t mask;
    size_t count;
    size_t max;      /* grants beyond this fail (bounds memory) */
    uint64_t next_id;
    kvs_list fifo;   /* oldest (soonest expiring) first */
} kvs_leases;

/* Initializes an empty table holding at most `max` leases; ids start at
 * `first_id` (non-zero). KVS_OK or KVS_ERR_NOMEM. */
int kvs_leases_init(kvs_leases *L, size_t max, uint64_t first_id);

/* Frees every lease record (objects untouched) and the table. */
void kvs_leases_destroy(kvs_leases *L);

/* Grants a lease on o for `client` expiring at now_ms + lease_ms. Returns the
 * lease id (> 0), or 0 when the table is full or memory ran out. */
uint64_t kvs_leases_grant(kvs_leases *L, kvs_obj *o, uint64_t client, uint64_t now_ms,
                          uint64_t lease_ms);

/* Ends lease `id`: returns its object (leases already decremented) or NULL
 * if the id is unknown (already released or expired). */
kvs_obj *kvs_leases_release(kvs_leases *L, uint64_t id);

/* Ends the oldest lease if it expired by now_ms; returns its object (leases
 * decremented) or NULL when none expired. Call in a loop to reap all. */
kvs_obj *kvs_leases_reap_one(kvs_leases *L, uint64_t now_ms);

#endif
