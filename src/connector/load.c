/* KV connector: one load job (blocks or parts) on a worker:
 *   acquire_batch -> check size and header (staged: slot_read first) ->
 *   copy out of the object -> re-check header, lease, GPU view ->
 *   release_batch. */
#include <stdatomic.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "connector/conn_internal.h"

/* Acquires the job's objects, picks direct or staged memory and checks each
 * header; w->ok[i] for the objects to copy. Returns their number or the
 * error of kvs_acquire_batch. */
static int acquire(conn_worker *w, const kvs_task *t, size_t start, size_t n, int *res)
{
    kvs_connector *c = w->c;
    const kvs_key *keys = t->keys + start;
    memset(w->slots, 0, n * sizeof w->slots[0]);
    int rc = kvs_acquire_batch(c->cl, keys, n, w->slots);
    if (rc < 0) return rc;
    for (size_t i = 0; i < n; i++) {
        kvs_slot *s = &w->slots[i];
        conn_obj g = conn_task_obj(c, t, start + i);
        w->ok[i] = 0;
        w->staged[i] = 0;
        w->obj[i] = NULL;
        w->sizes[i] = g.bytes;
        res[i] = s->status;
        if (s->status != KVS_OK) continue;
        res[i] = conn_size_status(&g, s->size); /* mismatch: nothing copied */
        if (res[i] != KVS_OK) continue;
        if (conn_direct_ok(c, t, s, w->sizes[i]))
            w->obj[i] = s->ptr;
        else
            w->staged[i] = 1;
    }
    conn_assign_staging(w, t, n, res);
    int live = 0;
    for (size_t i = 0; i < n; i++) {
        if (!w->obj[i] || res[i] != KVS_OK) continue;
        if (w->staged[i]) {
            res[i] = kvs_slot_read(c->cl, &w->slots[i], 0, w->obj[i], w->sizes[i]);
            if (res[i] != KVS_OK) continue;
        }
        conn_obj g = conn_task_obj(c, t, start + i);
        res[i] = conn_hdr_check(c, w->obj[i], &keys[i], &g, &w->gen[i]);
        if (res[i] != KVS_OK) continue;
        w->ok[i] = 1;
        live++;
    }
    return live;
}

/* After the copies: GPU view, header and lease re-checked; else a miss. */
static void check_copies(conn_worker *w, const kvs_task *t, size_t start, size_t n, int rc,
                         int *res)
{
    kvs_connector *c = w->c;
    for (size_t i = 0; i < n; i++) {
        if (!w->ok[i]) continue;
        if (rc != KVS_OK) {
            res[i] = rc;
            continue;
        }
        res[i] = KVS_ERR_NOT_FOUND;
        if (w->got[i] != w->gen[i]) {
            KVS_LOGW("connector: view check failed on load: miss");
            conn_copy_forget(w, i);
            continue;
        }
        conn_hdr h;
        memcpy(&h, w->obj[i], sizeof h);
        conn_obj g = conn_task_obj(c, t, start + i);
        if (h.generation != w->gen[i] || conn_hdr_status(&h, &t->keys[start + i], &g) != KVS_OK ||
            kvs_slot_lease_valid(c->cl, &w->slots[i]) != 1) {
            KVS_LOGD("connector: object changed or lease lost during load: miss");
            continue;
        }
        res[i] = KVS_OK;
    }
}

void conn_run_load(conn_worker *w, struct conn_job *j)
{
    kvs_connector *c = w->c;
    kvs_task *t = j->task;
    int *res = t->results + j->start;
    size_t n = j->n;
    const int prof = c->profile && !t->parts; /* block jobs are profiled */

    uint64_t t0 = prof ? kvs_now_ns() : 0;
    int live = acquire(w, t, j->start, n, res);
    if (live < 0) {
        conn_job_fail(c, j, live);
        return;
    }
    if (live && atomic_load(&t->cancelled)) {
        conn_fail_live(w, n, res, KVS_ERR_CLOSED);
        live = 0;
    }
    uint64_t t1 = prof ? kvs_now_ns() : 0;
    if (live) check_copies(w, t, j->start, n, conn_copy(w, TASK_LOAD, t, j->start, n), res);
    uint64_t t2 = prof ? kvs_now_ns() : 0;
    kvs_release_batch(c->cl, w->slots, n);
    if (prof) conn_profile_add(c, t0, t1, t2);
    uint64_t ok = 0, miss = 0, fail = 0, bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (res[i] == KVS_OK) {
            ok++;
            bytes += conn_task_obj(c, t, j->start + i).payload;
        } else if (res[i] == KVS_ERR_NOT_FOUND) {
            miss++;
        } else if (res[i] != KVS_ERR_CLOSED) {
            fail++;
        }
    }
    atomic_fetch_add(&c->n_loaded, ok);
    atomic_fetch_add(&c->n_missed, miss);
    atomic_fetch_add(&c->n_failed, fail);
    atomic_fetch_add(&c->n_bytes_loaded, bytes);
}
