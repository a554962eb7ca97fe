/* Outstanding mapped reservations: the zero-copy slots (kvs_reserve_batch)
 * this client handed out with a segment write fence held (segment.h), keyed
 * by the master's object id. A slot's fence is ended exactly once: by the
 * first commit (or abort) that takes it out of the table; a second commit
 * of the same slot, or a forged one, finds nothing and ends no one else's
 * fence. Thread-safe. */
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

/* Number of reservations recorded (for tests and stats). */
uint64_t kvs_resv_count(kvs_resv_table *t);

#endif
