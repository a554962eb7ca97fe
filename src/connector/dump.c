/* KV connector: one dump job (blocks or parts) on a worker:
 *   reserve_batch -> header + copy straight into the slot (or into staging,
 *   then slot_write) -> view check -> checksum -> commit_batch. */
#include <stdatomic.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "connector/conn_internal.h"

/* Reserves the job's objects; picks direct or staged memory for the new
 * ones. w->reserved[i]: a slot to commit or abandon. */
static int reserve(conn_worker *w, const kvs_task *t, const kvs_key *keys, size_t n, int *res)
{
    kvs_connector *c = w->c;
    memset(w->slots, 0, n * sizeof w->slots[0]);
    int rc = kvs_reserve_batch(c->cl, keys, w->sizes, n, w->slots);
    if (rc < 0) return rc;
    for (size_t i = 0; i < n; i++) {
        kvs_slot *s = &w->slots[i];
        w->ok[i] = 0;
        w->reserved[i] = 0;
        w->staged[i] = 0;
        w->obj[i] = NULL;
        res[i] = KVS_OK;
        if (s->status == KVS_ERR_EXISTS) { /* stored, or being stored by another writer */
            atomic_fetch_add(&c->n_skipped, 1);
            continue;
        }
        if (s->status != KVS_OK) {
            res[i] = s->status;
            continue;
        }
        w->reserved[i] = 1;
        if (s->size < w->sizes[i]) {
            res[i] = KVS_ERR_INTERNAL;
            continue;
        }
        if (conn_direct_ok(c, t, s, w->sizes[i]))
            w->obj[i] = s->ptr;
        else
            w->staged[i] = 1;
    }
    conn_assign_staging(w, t, n, res);
    return KVS_OK;
}

/* After the copies: view check, checksum, staged objects written. */
static void finish_copies(conn_worker *w, const kvs_task *t, size_t start, size_t n, int rc,
                          int *res)
{
    kvs_connector *c = w->c;
    for (size_t i = 0; i < n; i++) {
        if (!w->ok[i]) continue;
        if (rc != KVS_OK) {
            w->ok[i] = 0;
            res[i] = rc;
            continue;
        }
        if (conn_read_stamp(w->obj[i]) != w->gen[i]) { /* the GPU wrote elsewhere */
            KVS_LOGW("connector: view check failed on dump; re-registering the mapping");
            conn_copy_forget(w, i);
            w->ok[i] = 0;
            res[i] = KVS_ERR_CUDA;
            continue;
        }
        if (c->checksum) {
            conn_obj g = conn_task_obj(c, t, start + i);
            conn_hdr_seal(w->obj[i], &g);
        }
        if (w->staged[i]) {
            int wr = kvs_slot_write(c->cl, &w->slots[i], 0, w->obj[i], w->sizes[i]);
            if (wr != KVS_OK) {
                w->ok[i] = 0;
                res[i] = wr;
            }
        }
    }
}

/* Publishes the good objects, abandons the rest (a reserved object that is
 * not ok always has a non-OK result by now). */
static void commit(conn_worker *w, const kvs_key *keys, size_t n, int *res)
{
    kvs_connector *c = w->c;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!w->reserved[i]) continue;
        if (!w->ok[i] && res[i] == KVS_OK) res[i] = KVS_ERR_INTERNAL;
        w->ck[k] = keys[i];
        w->cs[k] = w->slots[i];
        w->cok[k] = w->ok[i];
        w->cres[k] = KVS_OK;
        k++;
    }
    if (!k) return;
    int rc = kvs_commit_batch(c->cl, w->ck, w->cs, w->cok, k, w->cres);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (!w->reserved[i]) continue;
        int r = rc < 0 ? rc : w->cres[m];
        if (w->ok[i] && r != KVS_OK) res[i] = r;
        m++;
    }
}

void conn_run_dump(conn_worker *w, struct conn_job *j)
{
    kvs_connector *c = w->c;
    kvs_task *t = j->task;
    const kvs_key *keys = t->keys + j->start;
    int *res = t->results + j->start;
    size_t n = j->n;
    const int prof = c->profile && !t->parts; /* block jobs are profiled */

    for (size_t i = 0; i < n; i++) w->sizes[i] = conn_task_obj(c, t, j->start + i).bytes;
    uint64_t t0 = prof ? kvs_now_ns() : 0;
    int rc = reserve(w, t, keys, n, res);
    if (rc < 0) {
        conn_job_fail(c, j, rc);
        return;
    }
    size_t live = 0;
    for (size_t i = 0; i < n; i++) {
        if (!w->obj[i] || res[i] != KVS_OK) continue;
        conn_obj g = conn_task_obj(c, t, j->start + i);
        w->gen[i] = conn_hdr_write(c, w->obj[i], &keys[i], &g);
        w->ok[i] = 1;
        live++;
    }
    uint64_t t1 = prof ? kvs_now_ns() : 0;
    if (live && !atomic_load(&t->cancelled))
        finish_copies(w, t, j->start, n, conn_copy(w, TASK_DUMP, t, j->start, n), res);
    else if (live)
        conn_fail_live(w, n, res, KVS_ERR_CLOSED);
    uint64_t t2 = prof ? kvs_now_ns() : 0;
    commit(w, keys, n, res);
    uint64_t done = 0, bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (w->reserved[i] && w->ok[i] && res[i] == KVS_OK) {
            done++;
            bytes += conn_task_obj(c, t, j->start + i).payload;
        } else if (res[i] != KVS_OK && res[i] != KVS_ERR_CLOSED) {
            atomic_fetch_add(&c->n_failed, 1);
        }
    }
    atomic_fetch_add(&c->n_dumped, done);
    atomic_fetch_add(&c->n_bytes_dumped, bytes);
    if (prof) conn_profile_add(c, t0, t1, t2);
}
