/* KV connector: the job queue — public calls entering and leaving,
 * backpressure (max_inflight objects queued or copying), worker threads that
 * run the jobs, and the queue's shutdown at close. */
#include <errno.h>
#include <time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "connector/conn_internal.h"

int conn_enter(kvs_connector *c)
{
    pthread_mutex_lock(&c->mu);
    if (c->closing) {
        pthread_mutex_unlock(&c->mu);
        return KVS_ERR_CLOSED;
    }
    c->callers++;
    pthread_mutex_unlock(&c->mu);
    return KVS_OK;
}

void conn_leave(kvs_connector *c)
{
    pthread_mutex_lock(&c->mu);
    if (--c->callers == 0) pthread_cond_broadcast(&c->idle_cv);
    pthread_mutex_unlock(&c->mu);
}

/* A job left the queue's accounting (done or failed at close): room frees. */
static void job_retire(kvs_connector *c, struct conn_job *j)
{
    pthread_mutex_lock(&c->mu);
    c->inflight -= j->n;
    pthread_cond_broadcast(&c->space_cv);
    pthread_mutex_unlock(&c->mu);
    conn_job_finish(j);
}

/* Returns after every job is queued, dropped (dumps with drop_when_full) or
 * failed (closing). */
void conn_task_submit(kvs_connector *c, kvs_task *t)
{
    pthread_mutex_lock(&c->mu);
    for (size_t k = 0; k < t->njobs; k++) {
        struct conn_job *j = &t->jobs[k];
        int drop = 0;
        while (!c->closing && c->inflight > 0 && c->inflight + j->n > c->max_inflight) {
            if (t->kind == TASK_DUMP && c->drop_when_full) {
                drop = 1;
                break;
            }
            pthread_cond_wait(&c->space_cv, &c->mu);
        }
        if (drop || c->closing) {
            pthread_mutex_unlock(&c->mu);
            conn_job_set_all(j, drop ? KVS_ERR_BUSY : KVS_ERR_CLOSED);
            if (drop) atomic_fetch_add(&c->n_dropped, j->n);
            conn_job_finish(j);
            pthread_mutex_lock(&c->mu);
            continue;
        }
        c->inflight += j->n;
        j->next = NULL;
        if (c->qtail)
            c->qtail->next = j;
        else
            c->qhead = j;
        c->qtail = j;
        pthread_cond_signal(&c->work_cv);
    }
    pthread_mutex_unlock(&c->mu);
}

static void run_job(conn_worker *w, struct conn_job *j)
{
    if (atomic_load(&j->task->cancelled))
        conn_job_set_all(j, KVS_ERR_CLOSED);
    else if (j->task->stripes > 1)
        (j->task->kind == TASK_DUMP ? conn_run_stripe_dump : conn_run_stripe_load)(w, j);
    else if (j->task->kind == TASK_DUMP)
        conn_run_dump(w, j);
    else
        conn_run_load(w, j);
}

#define REAP_EVERY_S 1 /* idle striped objects checked this often without jobs */

static void *worker_main(void *arg)
{
    conn_worker *w = arg;
    kvs_connector *c = w->c;
    conn_worker_init(w);
    /* the first worker also gives up striped objects left idle (stripes.c)
     * while no job comes: their reservations hold segment write fences */
    const int reaper = w == &c->workers[0];
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->qhead && !c->stop) {
            if (!reaper) {
                pthread_cond_wait(&c->work_cv, &c->mu);
                continue;
            }
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += REAP_EVERY_S;
            if (pthread_cond_timedwait(&c->work_cv, &c->mu, &ts) == ETIMEDOUT && !c->stop) {
                pthread_mutex_unlock(&c->mu);
                conn_stripes_reap_idle(c);
                pthread_mutex_lock(&c->mu);
            }
        }
        if (!c->qhead) break;
        struct conn_job *j = c->qhead;
        c->qhead = j->next;
        if (!c->qhead) c->qtail = NULL;
        pthread_mutex_unlock(&c->mu);
        run_job(w, j);
        job_retire(c, j);
        conn_stripes_retire(w);
        pthread_mutex_lock(&c->mu);
    }
    pthread_mutex_unlock(&c->mu);
    conn_worker_exit(w);
    return NULL;
}

int conn_workers_start(kvs_connector *c)
{
    for (uint32_t i = 0; i < c->nworkers; i++) {
        c->workers[i].c = c;
        if (pthread_create(&c->workers[i].th, NULL, worker_main, &c->workers[i]))
            return KVS_ERR_NOMEM;
        c->workers[i].started = 1;
    }
    return KVS_OK;
}

void conn_queue_close(kvs_connector *c)
{
    pthread_mutex_lock(&c->mu);
    c->closing = 1;
    struct conn_job *q = c->qhead;
    c->qhead = c->qtail = NULL;
    pthread_cond_broadcast(&c->space_cv);
    while (c->callers > 0) pthread_cond_wait(&c->idle_cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    while (q) {
        struct conn_job *nx = q->next;
        conn_job_set_all(q, KVS_ERR_CLOSED);
        job_retire(c, q);
        q = nx;
    }
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_broadcast(&c->work_cv);
    pthread_mutex_unlock(&c->mu);
    for (uint32_t i = 0; c->workers && i < c->nworkers; i++)
        if (c->workers[i].started) pthread_join(c->workers[i].th, NULL);
}
