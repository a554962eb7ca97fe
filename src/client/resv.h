/* Outstanding reservations: the zero-copy slots (kvs_reserve_batch) this
 * client handed out, keyed by the master's object id and the slot's address
 * (NULL for a remote slot). A mapped slot holds a segment write fence
 * (segment.h), ended exactly once: by the first commit that takes it out of
 * the table; a second commit of the same slot, or a forged one, finds
 * nothing and ends no one else's fence. A remote slot's entry records
 * whether a write into it failed (kvs_resv_mark_failed, no allocation): such
 * a slot is never published. Thread-safe. */
#ifndef KVS_CLIENT_RESV_H
#define KVS_CLIENT_RESV_H

#include <stdint.h>

typedef struct kvs_resv_table kvs_resv_table;

/* An empty table, or NULL when memory is short. Free with kvs_resv_free
 * (NULL is fine); entries left in it are dropped (their fences are the
 * caller's to end). */
kvs_resv_table *kvs_resv_new(void);
void kvs_resv_free(kvs_resv_table *t);

/* Records reservation `obj_id` (mapped at `ptr`, fenced under `epoch`).
 * KVS_OK, KVS_ERR_EXISTS (already recorded: nothing changed) or
 * KVS_ERR_NOMEM. */
int kvs_resv_add(kvs_resv_table *t, uint64_t obj_id, const void *ptr, uint64_t epoch);

/* Takes reservation `obj_id` out of the table if it is there and was
 * recorded at `ptr`: returns 1 with *epoch set, else 0. */
int kvs_resv_take(kvs_resv_table *t, uint64_t obj_id, const void *ptr, uint64_t *epoch);

/* Marks reservation `obj_id` at `ptr` as having had a failed write (no
 * allocation). 1 if it is recorded, else 0. */
int kvs_resv_mark_failed(kvs_resv_table *t, uint64_t obj_id, const void *ptr);

/* Looks reservation `obj_id` at `ptr` up without taking it out: 1 with
 * *failed set (1 if a write into it failed), else 0. */
int kvs_resv_get(kvs_resv_table *t, uint64_t obj_id, const void *ptr, int *failed);

/* Number of reservations recorded (for tests and stats). */
uint64_t kvs_resv_count(kvs_resv_table *t);

#endif
