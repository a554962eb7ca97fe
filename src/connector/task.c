/* KV connector: task objects (one dump or load of n objects, cut into jobs),
 * their start and the public kvs_task_* calls. The queue that runs the jobs
 * is queue.c. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/util.h"
#include "connector/conn_internal.h"

static void task_unref(kvs_task *t)
{
    if (atomic_fetch_sub(&t->refs, 1) != 1) return;
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t->keymem);
    free(t->keys);
    free(t->bids);
    free(t->results);
    free(t->jobs);
    free(t->paddrs);
    free(t->plens);
    free(t->pfp);
    free(t->pbytes);
    free(t);
}

void conn_job_finish(struct conn_job *j)
{
    kvs_task *t = j->task;
    pthread_mutex_lock(&t->mu);
    if (--t->jobs_left == 0) {
#ifdef KVS_HAVE_CUDA
        if (t->event) kvs_cuda_event_free(t->event);
        /* every copy is done and checked: let the GPU go on. A gate forced
         * open before (kvs_cuda.h) let work run on incomplete data. */
        if (t->gated && kvs_cuda_gate_open(t->gate_ticket) != 1)
            for (size_t i = 0; i < t->n; i++)
                if (t->results[i] == KVS_OK) t->results[i] = KVS_ERR_EARLY;
        t->gated = 0;
#endif
        t->event = NULL;
        t->done = 1;
        pthread_cond_broadcast(&t->cv);
    }
    pthread_mutex_unlock(&t->mu);
    task_unref(t);
}

void conn_job_set_all(struct conn_job *j, int status)
{
    for (size_t i = 0; i < j->n; i++) j->task->results[j->start + i] = status;
}

void conn_job_fail(kvs_connector *c, struct conn_job *j, int rc)
{
    conn_job_set_all(j, rc);
    atomic_fetch_add(&c->n_failed, j->n);
}

kvs_task *conn_task_new(kvs_connector *c, int kind, const kvs_key *hashes, const uint32_t *bids,
                        size_t n, size_t job_blocks, int raw_keys)
{
    kvs_task *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->kind = kind;
    t->n = n;
    t->gate_dev = c->backend == BK_CUDA ? c->device : -1;
    const uint8_t *prefix = raw_keys ? NULL : c->prefixes[0];
    const size_t pfx = prefix ? KVS_CONNECTOR_PREFIX_BYTES : 0;
    size_t keybytes = 0;
    for (size_t i = 0; i < n; i++) keybytes += pfx + hashes[i].len;
    /* Jobs of at most job_blocks, as many as a multiple of the workers and
     * of even sizes, so all of them copy at once to the last round (13 jobs
     * on 4 workers left one copying alone at the end of a dump). */
    size_t jb = job_blocks ? job_blocks : 1;
    size_t nw = c->nworkers ? c->nworkers : 1;
    size_t nj = (n + jb - 1) / jb;
    nj = (nj + nw - 1) / nw * nw;
    if (nj > n) nj = n;
    jb = nj ? (n + nj - 1) / nj : 1;
    t->njobs = (n + jb - 1) / jb;
    t->keymem = malloc(keybytes ? keybytes : 1);
    t->keys = calloc(n ? n : 1, sizeof *t->keys);
    t->bids = calloc(n ? n : 1, sizeof *t->bids);
    t->results = calloc(n ? n : 1, sizeof *t->results);
    t->jobs = calloc(t->njobs ? t->njobs : 1, sizeof *t->jobs);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int ok = t->keymem && t->keys && t->bids && t->results && t->jobs;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, &ca);
    pthread_condattr_destroy(&ca);
    atomic_init(&t->refs, 1);
    atomic_init(&t->cancelled, 0);
    if (!ok) {
        task_unref(t);
        return NULL;
    }
    uint8_t *p = t->keymem;
    for (size_t i = 0; i < n; i++) {
        t->keys[i] = conn_key_at(p, prefix, &hashes[i]);
        p += t->keys[i].len;
        t->bids[i] = bids ? bids[i] : 0;
        t->results[i] = KVS_ERR_CLOSED;
    }
    for (size_t k = 0; k < t->njobs; k++) {
        t->jobs[k].task = t;
        t->jobs[k].start = k * jb;
        t->jobs[k].n = KVS_MIN(jb, n - k * jb);
    }
    t->jobs_left = t->njobs;
    if (t->njobs == 0) t->done = 1;
    atomic_fetch_add(&t->refs, (int)t->njobs);
    return t;
}

uint32_t conn_job_blocks(const kvs_connector *c, uint64_t obj_bytes)
{
    uint64_t job_bytes = CONN_JOB_BYTES;
    const char *env = getenv("KVSHELF_CONNECTOR_JOB_MB");
    if (env && atoi(env) > 0) job_bytes = (uint64_t)atoi(env) << 20;
    uint64_t jb = job_bytes / obj_bytes;
    if (jb > CONN_JOB_MAX_BLOCKS) jb = CONN_JOB_MAX_BLOCKS;
    if (jb > c->max_inflight) jb = c->max_inflight; /* a job always fits the queue */
    return (uint32_t)(jb < 1 ? 1 : jb);
}

void conn_task_drop(kvs_task *t)
{
    for (size_t k = 0; k < t->njobs; k++) conn_job_finish(&t->jobs[k]);
    kvs_task_free(t);
}

int conn_task_start(kvs_connector *c, kvs_task *t, void *after_event, kvs_task **task)
{
#ifdef KVS_HAVE_CUDA
    if (after_event && t->njobs) {
        int rc = kvs_cuda_event_snapshot(c->cx, after_event, &t->event);
        if (rc != KVS_OK) {
            conn_task_drop(t);
            conn_leave(c);
            return rc;
        }
    }
#else
    (void)after_event;
#endif
    conn_task_submit(c, t);
    conn_leave(c);
    *task = t;
    return KVS_OK;
}

/* ------------------------------------------------------------ public */

int kvs_task_wait(kvs_task *t, int timeout_ms)
{
    if (!t) return KVS_ERR_INVALID;
    struct timespec dl;
    if (timeout_ms >= 0) {
        clock_gettime(CLOCK_MONOTONIC, &dl);
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
    }
    int rc = KVS_OK;
    pthread_mutex_lock(&t->mu);
    while (!t->done) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&t->cv, &t->mu);
        } else if (pthread_cond_timedwait(&t->cv, &t->mu, &dl) == ETIMEDOUT) {
            if (!t->done) rc = KVS_ERR_TIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

int kvs_task_check(kvs_task *t)
{
    if (!t) return KVS_ERR_INVALID;
    pthread_mutex_lock(&t->mu);
    int d = t->done;
    pthread_mutex_unlock(&t->mu);
    return d;
}

int kvs_task_results(kvs_task *t, int *results, size_t n)
{
    if (!t) return KVS_ERR_INVALID;
    int d = kvs_task_check(t);
    if (!d) return KVS_ERR_BUSY;
    int ok = 0;
    for (size_t i = 0; i < t->n; i++) {
        if (t->results[i] == KVS_OK) ok++;
        if (results && i < n) results[i] = t->results[i];
    }
    return ok;
}

size_t kvs_task_size(const kvs_task *t) { return t ? t->n : 0; }

int kvs_task_gpu_wait(kvs_task *t, void *stream)
{
    if (!t) return KVS_ERR_INVALID;
#ifdef KVS_HAVE_CUDA
    if (t->gate_dev < 0) return KVS_ERR_UNSUPPORTED;
    /* the legacy default stream (NULL, cudaStreamLegacy) serializes with
     * other work: the load's own copies then wait for the gate */
    if (!stream || stream == (void *)0x1) return KVS_ERR_INVALID;
    int rc = KVS_OK;
    pthread_mutex_lock(&t->mu);
    if (t->gated) rc = KVS_ERR_INVALID;
    else if (!t->done && (rc = kvs_cuda_gate_close(stream, t->gate_dev, &t->gate_ticket)) == KVS_OK)
        t->gated = 1;
    pthread_mutex_unlock(&t->mu);
    return rc;
#else
    (void)stream;
    return KVS_ERR_UNSUPPORTED;
#endif
}

void kvs_task_free(kvs_task *t)
{
    if (!t) return;
    atomic_store(&t->cancelled, 1);
    task_unref(t);
}
