/* KV connector: striped parts objects (kvs_parts_opts.stripes > 1; see
 * include/kvshelf/connector.h, "Striped objects").
 *
 * A striped object is one store object (one key, one reservation, one
 * lease) that many calls fill or read one stripe at a time: UCM's layerwise
 * mode dumps and loads one layer of every block per call, and one object per
 * (block, layer) cost a master reservation or lease per 64 KiB, which held
 * those calls far below the copy engines' speed. Each connector keeps two
 * tables of open objects, keyed by store key:
 *   dump: reserved, being filled; published (commit) by the job that copies
 *         its last missing stripe, abandoned when a stripe failed;
 *   load: acquired (read lease held) and header-checked by the first job
 *         that reaches it; released by the job that loads its last stripe.
 * An entry's `users` counts the jobs between claiming it and settling it:
 * no entry is published, abandoned or released while a job may still copy
 * to or from its memory. Entries no job held for KVSHELF_STRIPE_IDLE_MS
 * (default 10000 for dumps, 2000 for loads) are given up by the next job
 * (and all of them at close).
 *
 * Read-ahead (CUDA loads, KVSHELF_READAHEAD_MB, KVSHELF_READAHEAD_DEPTH): a
 * job that loads stripe s of open objects also starts copying stripes
 * s+1..s+depth of them (those not asked for before) into device memory
 * (src/cuda/ahead.cu); the entry keeps those buffers, and the job that
 * loads stripe s+d scatters it from there. UCM asks for layer L+1 only
 * after layer L's wait, so without this the copy engines idle through the
 * whole return path of every layer. The lease is held meanwhile; the checks
 * after the copy (view stamp read right after the read-ahead, header,
 * lease) are the same. An entry's buffers are dropped, their copies waited
 * for, before its lease is released.
 *
 * View checks: a stripe dump cannot rely on the header's view stamp alone
 * (the first stripe's copy already wrote it), so the GPU also reads back the
 * header's generation word, which the CPU wrote at reservation time, through
 * its own view of the object (kvs_cuda_copy_parts_ex, check_off). Loads
 * check the stamp as whole-object loads do, and re-read the header and the
 * lease after every stripe. */
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#include "common/log.h"
#include "common/util.h"
#include "connector/conn_internal.h"

enum { SE_NEW = 0, SE_BUSY, SE_OPEN, SE_SKIP, SE_FAILED };
enum { ACT_NONE = 0, ACT_FREE, ACT_COMMIT, ACT_ABANDON, ACT_RELEASE };
#define KVS_ERR_LEASE_LOST_ 1 /* internal: an open load entry whose lease ran out */

typedef struct conn_sent {
    struct conn_sent *hnext;         /* hash chain */
    struct conn_sent *older, *newer; /* touch order: tab->oldest .. tab->newest */
    uint64_t h;
    int state;       /* SE_*; fields below are the owner's while SE_BUSY */
    int status;      /* SE_FAILED: the error later stripes get */
    int held;        /* dump: a reservation to commit or abandon; load: a lease */
    int staged;      /* not mapped here: stripes move through staging */
    int linked;      /* in the table */
    uint32_t stripes;
    uint32_t users;  /* jobs between claiming and settling the entry */
    uint32_t ndone;  /* dump: stripes claimed and finished; load: stripes loaded */
    uint64_t gen;    /* the object's generation */
    uint64_t dptr;   /* the GPU's address of slot.ptr (CUDA, mapped), 0: unknown */
    uint64_t t_touch;
    kvs_slot slot;
    conn_obj g;      /* geometry (the first caller's) */
    conn_hdr hdr;    /* dump, staged: the header to write at publication;
                        load: the header found at acquisition */
    uint64_t *bits;  /* per stripe: dump claimed / load loaded */
    struct conn_ra {           /* load: stripes stripe..stripe+n-1 read ahead into buf
                                  from off, bytes each */
        struct kvs_cuda_ahead *buf;
        uint64_t off, bytes;
        uint32_t stripe, n;
    } ra[CONN_RA_SLOTS];
    uint32_t ra_upto;          /* load: stripes up to this one were asked for ahead */
    kvs_key key;
    uint8_t kb[];
} conn_sent;

struct conn_stab {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* an entry left SE_BUSY */
    conn_sent **b;
    size_t nb, count;
    conn_sent *oldest, *newest;
    uint64_t idle_ns;
};

/* ------------------------------------------------------------- table */

static struct conn_stab *stab_new(long default_ms)
{
    struct conn_stab *tb = calloc(1, sizeof *tb);
    if (!tb) return NULL;
    tb->nb = 1024;
    tb->b = calloc(tb->nb, sizeof *tb->b);
    if (!tb->b) {
        free(tb);
        return NULL;
    }
    pthread_mutex_init(&tb->mu, NULL);
    pthread_cond_init(&tb->cv, NULL);
    const char *env = getenv("KVSHELF_STRIPE_IDLE_MS");
    long ms = env && *env ? atol(env) : default_ms;
    tb->idle_ns = (uint64_t)(ms > 0 ? ms : 1) * 1000000ull;
    return tb;
}

/* Drops e's read-ahead buffer (waiting for its copies when nobody else
 * holds it): before the lease that let it read the object goes. */
static void ent_drop_ahead(conn_sent *e)
{
    for (int q = 0; q < CONN_RA_SLOTS; q++) {
#ifdef KVS_HAVE_CUDA
        if (e->ra[q].buf) kvs_cuda_ahead_unref(e->ra[q].buf);
#endif
        e->ra[q].buf = NULL;
    }
}

static void ent_free(conn_sent *e)
{
    if (!e) return;
    ent_drop_ahead(e);
    free(e->bits);
    free(e);
}

static uint64_t key_hash(const kvs_key *k) { return XXH3_64bits(k->data, k->len); }

static void lru_unlink(struct conn_stab *tb, conn_sent *e)
{
    if (e->older) e->older->newer = e->newer;
    else tb->oldest = e->newer;
    if (e->newer) e->newer->older = e->older;
    else tb->newest = e->older;
    e->older = e->newer = NULL;
}

static void lru_append(struct conn_stab *tb, conn_sent *e)
{
    e->older = tb->newest;
    e->newer = NULL;
    if (tb->newest) tb->newest->newer = e;
    else tb->oldest = e;
    tb->newest = e;
}

/* Takes e out of the table (under tb->mu). */
static void stab_unlink(struct conn_stab *tb, conn_sent *e)
{
    if (!e->linked) return;
    for (conn_sent **pp = &tb->b[e->h & (tb->nb - 1)]; *pp; pp = &(*pp)->hnext)
        if (*pp == e) {
            *pp = e->hnext;
            break;
        }
    lru_unlink(tb, e);
    e->hnext = NULL;
    e->linked = 0;
    tb->count--;
}

static void stab_grow(struct conn_stab *tb)
{
    size_t nb = tb->nb * 4;
    conn_sent **b = calloc(nb, sizeof *b);
    if (!b) return; /* longer chains, still correct */
    for (size_t i = 0; i < tb->nb; i++)
        for (conn_sent *e = tb->b[i], *nx; e; e = nx) {
            nx = e->hnext;
            e->hnext = b[e->h & (nb - 1)];
            b[e->h & (nb - 1)] = e;
        }
    free(tb->b);
    tb->b = b;
    tb->nb = nb;
}

/* The entry of key (created SE_NEW with geometry g when absent), moved to
 * the newest end; NULL when out of memory. Under tb->mu. */
static conn_sent *stab_get(struct conn_stab *tb, const kvs_key *key, uint64_t h, uint32_t stripes,
                           const conn_obj *g, uint64_t now)
{
    conn_sent *e = tb->b[h & (tb->nb - 1)];
    while (e && !(e->h == h && e->key.len == key->len && !memcmp(e->kb, key->data, key->len)))
        e = e->hnext;
    if (e) return e; /* its place in the touch order changes when a job lets go of it */
    {
        e = calloc(1, sizeof *e + key->len);
        if (!e) return NULL;
        e->bits = calloc((stripes + 63) / 64, sizeof *e->bits);
        if (!e->bits) {
            free(e);
            return NULL;
        }
        memcpy(e->kb, key->data, key->len);
        e->key = (kvs_key){e->kb, key->len};
        e->h = h;
        e->stripes = stripes;
        e->g = *g;
        e->linked = 1;
        if (tb->count >= 2 * tb->nb) stab_grow(tb);
        e->hnext = tb->b[h & (tb->nb - 1)];
        tb->b[h & (tb->nb - 1)] = e;
        tb->count++;
    }
    e->t_touch = now;
    lru_append(tb, e);
    return e;
}

/* The hashes of a job's keys, computed before taking the table's lock (the
 * jobs of one call reach the table at the same moment). */
static void key_hashes(const kvs_key *keys, size_t n, uint64_t *hs)
{
    for (size_t i = 0; i < n; i++) hs[i] = key_hash(&keys[i]);
}

static int bit_test(const conn_sent *e, uint32_t s) { return (e->bits[s / 64] >> (s % 64)) & 1; }
static void bit_set(conn_sent *e, uint32_t s) { e->bits[s / 64] |= 1ull << (s % 64); }

/* What to do with an entry a job let go of (under tb->mu; dump: `dump`).
 * The idle time counts from here: a job that waited long (a reservation
 * that pinned the pool, a full queue) leaves its entries fresh. */
static int settle(struct conn_stab *tb, conn_sent *e, int dump, uint64_t now)
{
    if (e->linked) {
        e->t_touch = now;
        lru_unlink(tb, e);
        lru_append(tb, e);
    }
    if (e->users) return ACT_NONE;
    if (dump) {
        if (e->state == SE_OPEN && e->ndone == e->stripes) {
            stab_unlink(tb, e);
            return ACT_COMMIT;
        }
        if (e->state == SE_FAILED && e->held) {
            /* abandoned now (by the caller, who owns e once it is out of the
             * table); a tombstone stays to fail the stripes still coming */
            stab_unlink(tb, e);
            if (e->ndone < e->stripes) {
                conn_sent *ts = stab_get(tb, &e->key, e->h, e->stripes, &e->g, e->t_touch);
                if (ts) {
                    ts->state = SE_FAILED;
                    ts->status = e->status;
                    ts->ndone = e->ndone;
                    memcpy(ts->bits, e->bits, (e->stripes + 63) / 64 * sizeof *e->bits);
                }
            }
            return ACT_ABANDON;
        }
        if ((e->state == SE_FAILED || e->state == SE_SKIP) && e->ndone == e->stripes) {
            stab_unlink(tb, e);
            return ACT_FREE;
        }
        return ACT_NONE;
    }
    if (e->state == SE_FAILED || (e->state == SE_OPEN && e->ndone == e->stripes)) {
        stab_unlink(tb, e); /* loads keep no failures: the next call asks again */
        return e->held ? ACT_RELEASE : ACT_FREE;
    }
    return ACT_NONE;
}

/* Waits until none of the job's entries is being reserved/acquired by
 * another job (under tb->mu). Every job reserves its own new entries before
 * it waits here, so no two jobs wait for each other. */
static void wait_open(struct conn_stab *tb, conn_sent *const *ent, size_t n)
{
    for (size_t i = 0; i < n; i++)
        while (ent[i] && ent[i]->state == SE_BUSY) pthread_cond_wait(&tb->cv, &tb->mu);
}

/* Publishes (ACT_COMMIT), abandons (ACT_ABANDON) or releases (ACT_RELEASE)
 * k entries, then frees those no longer in the table. res/idx: the job's
 * result of each commit (may be NULL). */
static void finish_entries(kvs_connector *c, conn_sent **es, const int *act, size_t k,
                           int *res, const size_t *idx)
{
    kvs_key ck[CONN_JOB_MAX_BLOCKS];
    kvs_slot cs[CONN_JOB_MAX_BLOCKS];
    uint8_t cok[CONN_JOB_MAX_BLOCKS];
    int cres[CONN_JOB_MAX_BLOCKS];
    size_t ci[CONN_JOB_MAX_BLOCKS];
    size_t m = 0, nrel = 0;
    kvs_slot rel[CONN_JOB_MAX_BLOCKS];
    for (size_t q = 0; q < k; q++) {
        conn_sent *e = es[q];
        if (act[q] != ACT_NONE) ent_drop_ahead(e); /* out of the table: ours */
        if (act[q] == ACT_RELEASE) {
            rel[nrel++] = e->slot;
            continue;
        }
        if (act[q] != ACT_COMMIT && act[q] != ACT_ABANDON) continue;
        int ok = act[q] == ACT_COMMIT;
        if (ok && e->staged) { /* the header last: its view stamp says "complete" */
            conn_hdr h = e->hdr;
            h.view_stamp = h.generation;
            int wr = kvs_slot_write(c->cl, &e->slot, 0, &h, sizeof h);
            if (wr != KVS_OK) {
                ok = 0;
                if (res && idx) res[idx[q]] = wr;
            }
        } else if (ok && c->checksum) {
            conn_hdr_seal(e->slot.ptr, &e->g);
        }
        ck[m] = e->key;
        cs[m] = e->slot;
        cok[m] = (uint8_t)ok;
        cres[m] = KVS_OK;
        ci[m] = q;
        m++;
    }
    if (m) {
        int rc = kvs_commit_batch(c->cl, ck, cs, cok, m, cres);
        uint64_t published = 0;
        for (size_t x = 0; x < m; x++) {
            int r = rc < 0 ? rc : cres[x];
            if (!cok[x]) continue;
            if (r == KVS_OK) {
                published++;
            } else {
                atomic_fetch_add(&c->n_failed, 1);
                if (res && idx) res[idx[ci[x]]] = r;
            }
        }
        atomic_fetch_add(&c->n_dumped, published);
    }
    if (nrel) kvs_release_batch(c->cl, rel, nrel);
    for (size_t q = 0; q < k; q++)
        if (act[q] != ACT_NONE) ent_free(es[q]); /* all out of the table by now */
}

/* Gives up entries nobody reached for the idle time (at most one job's
 * worth per call): incomplete dumps abandoned, loads released. */
static size_t reap(kvs_connector *c, struct conn_stab *tb, int dump)
{
    conn_sent *es[CONN_JOB_MAX_BLOCKS];
    int act[CONN_JOB_MAX_BLOCKS];
    size_t k = 0;
    pthread_mutex_lock(&tb->mu);
    /* the time now, under the lock: stamps are set under it, so none is
     * later (a time taken before the lock could be, and its difference
     * would wrap into "idle for ages") */
    uint64_t now = kvs_now_ns();
    for (conn_sent *e = tb->oldest, *nx; e && k < CONN_JOB_MAX_BLOCKS; e = nx) {
        nx = e->newer;
        if (e->t_touch >= now || now - e->t_touch < tb->idle_ns)
            break; /* the rest were reached later */
        if (e->users) continue;
        stab_unlink(tb, e);
        es[k] = e;
        act[k++] = !e->held ? ACT_FREE : dump ? ACT_ABANDON : ACT_RELEASE;
        if (e->held && dump) KVS_LOGD("connector: striped object left incomplete: abandoned");
    }
    pthread_mutex_unlock(&tb->mu);
    if (k) finish_entries(c, es, act, k, NULL, NULL);
    return k;
}

void conn_stripes_reap_idle(kvs_connector *c)
{
    while (c->stab_dump && reap(c, c->stab_dump, 1) == CONN_JOB_MAX_BLOCKS) {
    }
    while (c->stab_load && reap(c, c->stab_load, 0) == CONN_JOB_MAX_BLOCKS) {
    }
}

/* ------------------------------------------------------ init / close */

static void conn_stab_free(struct conn_stab *tb)
{
    if (!tb) return;
    for (size_t i = 0; i < tb->nb; i++)
        for (conn_sent *e = tb->b[i], *nx; e; e = nx) {
            nx = e->hnext;
            ent_free(e);
        }
    free(tb->b);
    pthread_mutex_destroy(&tb->mu);
    pthread_cond_destroy(&tb->cv);
    free(tb);
}

int conn_stripes_init(kvs_connector *c)
{
    /* incomplete dumps hold reserved space (revoked and fenced by the master
     * after its put timeout, 30 s by default); loads a lease (5 s) */
    c->stab_dump = stab_new(10000);
    c->stab_load = stab_new(2000);
    /* Depth: measured on an H200 (UCM layerwise, 8k tokens of Qwen2.5-14B,
     * one run, medians of 3): loads at 64% of the ceiling without read-ahead,
     * 65% with depth 2, 76% with depth 4 (bench/RESULTS.md). 512 MiB holds
     * 4 layers of 8k tokens (34 MB each) many times over, 3 of 32k (134 MB
     * each) with the one being loaded; what does not fit is copied from host
     * memory as without read-ahead. */
    /* 1 GiB: two windows of 4 layers of 32k tokens (Qwen2.5-14B, 8 KV heads:
     * 128 MiB a layer) in flight; smaller layers use less of it */
    c->readahead = kvs_env_u64("KVSHELF_READAHEAD_MB", 1024, 0, 1u << 20, "MiB") << 20;
    c->ra_depth = (uint32_t)kvs_env_u64("KVSHELF_READAHEAD_DEPTH", 4, 1, CONN_RA_MAX_DEPTH, "stripes");
    return c->stab_dump && c->stab_load ? KVS_OK : KVS_ERR_NOMEM;
}

/* Gives up every entry of tb (workers stopped). */
static void close_table(kvs_connector *c, struct conn_stab *tb, int dump)
{
    for (;;) {
        conn_sent *es[CONN_JOB_MAX_BLOCKS];
        int act[CONN_JOB_MAX_BLOCKS];
        size_t k = 0;
        pthread_mutex_lock(&tb->mu);
        while (tb->oldest && k < CONN_JOB_MAX_BLOCKS) {
            conn_sent *e = tb->oldest;
            stab_unlink(tb, e);
            es[k] = e;
            act[k++] = !e->held || !c->cl ? ACT_FREE : dump ? ACT_ABANDON : ACT_RELEASE;
        }
        pthread_mutex_unlock(&tb->mu);
        if (!k) return;
        finish_entries(c, es, act, k, NULL, NULL);
    }
}

void conn_stripes_close(kvs_connector *c)
{
    if (c->stab_dump) close_table(c, c->stab_dump, 1);
    if (c->stab_load) close_table(c, c->stab_load, 0);
    conn_stab_free(c->stab_dump);
    conn_stab_free(c->stab_load);
    c->stab_dump = c->stab_load = NULL;
}

/* ----------------------------------------------------------- copies */

/* Runs the copies of the live objects of a stripe job (w->obj, w->poff,
 * w->ok, w->gen set); KVS_OK or the error that failed all of them. */
static int copy_stripes(conn_worker *w, int dir, const kvs_task *t, size_t start, size_t n)
{
    const size_t ppo = t->ppo;
    const uint64_t *addrs = t->paddrs + start * ppo;
    const uint64_t *lens = t->plens + start * ppo;
#ifdef KVS_HAVE_CUDA
    kvs_connector *c = w->c;
    if (c->backend == BK_CUDA) {
        if (!w->pcw) {
            kvs_cuda_pworker *pw = NULL;
            if (kvs_cuda_pworker_create(c->cx, c->device, &pw) != KVS_OK) return KVS_ERR_CUDA;
            w->pcw = pw;
        }
        uint64_t dobj[CONN_JOB_MAX_BLOCKS];
        for (size_t i = 0; i < n; i++)
            dobj[i] = w->ok[i] && !w->staged[i] && w->ent[i] ? w->ent[i]->dptr : 0;
        if (dir == TASK_LOAD)
            return kvs_cuda_copy_parts_ra(w->pcw, n, w->obj, dobj, w->poff, addrs, lens, ppo,
                                          CONN_STAMP_OFF, w->ok, w->got, w->ra, w->ra_off,
                                          w->ra_skip);
        return kvs_cuda_copy_parts_ex(
            w->pcw, dir == TASK_DUMP ? KVS_CUDA_DUMP : KVS_CUDA_LOAD, n, w->obj, dobj, w->poff,
            addrs, lens, ppo, CONN_HDR_BYTES, CONN_STAMP_OFF, offsetof(conn_hdr, generation),
            w->ok, w->gen, w->got, dir == TASK_DUMP ? t->event : NULL);
    }
#endif
    conn_host_copy_stripes(w, dir, addrs, lens, ppo, n);
    return KVS_OK;
}

void conn_host_copy_stripes(conn_worker *w, int dir, const uint64_t *addrs,
                            const uint64_t *lens, size_t ppo, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!w->ok[i]) continue;
        uint8_t *o = (uint8_t *)w->obj[i] + w->poff[i];
        if (dir == TASK_LOAD) w->got[i] = conn_read_stamp(w->obj[i]);
        for (size_t k = 0; k < ppo; k++) {
            void *p = (void *)(uintptr_t)addrs[i * ppo + k];
            size_t len = (size_t)lens[i * ppo + k];
            if (dir == TASK_DUMP)
                memcpy(o, p, len);
            else
                memcpy(p, o, len);
            o += len;
        }
        if (dir == TASK_DUMP) {
            conn_write_stamp(w->obj[i], w->gen[i]);
            memcpy(&w->got[i], (const uint8_t *)w->obj[i] + offsetof(conn_hdr, generation),
                   sizeof w->got[i]);
        }
    }
}

/* Stripe bytes of object i of t. */
static uint64_t stripe_bytes(const kvs_task *t, size_t i) { return t->pbytes[i] / t->stripes; }

/* ------------------------------------------------------------- dump */

/* Reserves the job's new entries (SE_BUSY, ours) and opens them. */
static void reserve_new(conn_worker *w, const kvs_task *t, struct conn_stab *tb,
                        conn_sent **re, size_t nr)
{
    kvs_connector *c = w->c;
    kvs_key rk[CONN_JOB_MAX_BLOCKS];
    uint64_t rsz[CONN_JOB_MAX_BLOCKS];
    int st_new[CONN_JOB_MAX_BLOCKS];
    for (size_t k = 0; k < nr; k++) {
        rk[k] = re[k]->key;
        rsz[k] = re[k]->g.bytes;
    }
    memset(w->slots, 0, nr * sizeof w->slots[0]);
    int rc = kvs_reserve_batch(c->cl, rk, rsz, nr, w->slots);
    for (size_t k = 0; k < nr; k++) {
        conn_sent *e = re[k];
        kvs_slot *sl = &w->slots[k];
        int st = rc < 0 ? rc : sl->status;
        st_new[k] = SE_FAILED;
        if (st == KVS_ERR_EXISTS) { /* stored, or being stored by another writer */
            atomic_fetch_add(&c->n_skipped, 1);
            st_new[k] = SE_SKIP;
            continue;
        }
        if (st != KVS_OK) {
            e->status = st;
            continue;
        }
        e->slot = *sl;
        e->held = 1;
        if (sl->size < e->g.bytes) {
            e->status = KVS_ERR_INTERNAL;
            continue;
        }
        if (conn_direct_ok(c, t, sl, e->g.bytes)) {
            e->staged = 0;
            e->gen = conn_hdr_write(c, sl->ptr, &e->key, &e->g);
#ifdef KVS_HAVE_CUDA
            if (c->backend == BK_CUDA) e->dptr = kvs_cuda_translate(c->cx, sl->ptr, e->g.bytes);
#endif
        } else {
            e->staged = 1;
            e->gen = conn_hdr_write(c, &e->hdr, &e->key, &e->g);
        }
        st_new[k] = SE_OPEN;
    }
    pthread_mutex_lock(&tb->mu);
    for (size_t k = 0; k < nr; k++) re[k]->state = st_new[k];
    pthread_cond_broadcast(&tb->cv);
    pthread_mutex_unlock(&tb->mu);
}

void conn_run_stripe_dump(conn_worker *w, struct conn_job *j)
{
    kvs_connector *c = w->c;
    kvs_task *t = j->task;
    struct conn_stab *tb = c->stab_dump;
    const kvs_key *keys = t->keys + j->start;
    int *res = t->results + j->start;
    const size_t n = j->n;
    const uint32_t s = t->stripe;
    uint64_t t0 = kvs_now_ns();
    reap(c, tb, 1);

    /* 1: each object's entry; the new ones are this job's to reserve */
    conn_sent *re[CONN_JOB_MAX_BLOCKS];
    uint64_t hs[CONN_JOB_MAX_BLOCKS];
    size_t nr = 0;
    key_hashes(keys, n, hs);
    pthread_mutex_lock(&tb->mu);
    for (size_t i = 0; i < n; i++) {
        w->ent[i] = NULL;
        w->ok[i] = 0;
        w->staged[i] = 0;
        w->obj[i] = NULL;
        res[i] = KVS_OK;
        conn_obj g = conn_task_obj(c, t, j->start + i);
        conn_sent *e = stab_get(tb, &keys[i], hs[i], t->stripes, &g, t0);
        if (e && (e->state == SE_FAILED || e->state == SE_SKIP) && !e->held && !e->users &&
            e->stripes == t->stripes && bit_test(e, s)) {
            /* a stripe seen before on a closed entry: a new round of dumps of
             * this object, which asks the master afresh */
            stab_unlink(tb, e);
            ent_free(e);
            e = stab_get(tb, &keys[i], hs[i], t->stripes, &g, t0);
        }
        if (!e) {
            res[i] = KVS_ERR_NOMEM;
            continue;
        }
        if (e->stripes != t->stripes || e->g.bytes != g.bytes || e->g.fp != g.fp) {
            res[i] = KVS_ERR_INVALID; /* an open object of this key has another geometry */
            continue;
        }
        e->users++;
        w->ent[i] = e;
        if (e->state == SE_NEW) {
            e->state = SE_BUSY;
            re[nr++] = e;
        }
    }
    pthread_mutex_unlock(&tb->mu);
    if (nr) reserve_new(w, t, tb, re, nr);
    uint64_t t1 = kvs_now_ns();

    /* 2: claim this stripe of every open object */
    conn_sent *es[CONN_JOB_MAX_BLOCKS];
    int act[CONN_JOB_MAX_BLOCKS];
    size_t idx[CONN_JOB_MAX_BLOCKS];
    size_t k = 0, live = 0;
    uint64_t tn = t1;
    pthread_mutex_lock(&tb->mu);
    wait_open(tb, w->ent, n);
    for (size_t i = 0; i < n; i++) {
        conn_sent *e = w->ent[i];
        if (!e) continue;
        int first = !bit_test(e, s);
        if (first) bit_set(e, s);
        if (e->state == SE_OPEN && first) {
            uint64_t sb = stripe_bytes(t, j->start + i);
            w->ok[i] = 1;
            w->gen[i] = e->gen;
            if (e->staged) {
                w->staged[i] = 1;
                w->sizes[i] = CONN_HDR_BYTES + sb;
                w->poff[i] = CONN_HDR_BYTES;
            } else {
                w->obj[i] = e->slot.ptr;
                w->poff[i] = CONN_HDR_BYTES + (uint64_t)s * sb;
            }
            live++;
            continue;
        }
        /* nothing to copy: stored already, a stripe claimed before, or failed */
        res[i] = e->state == SE_FAILED ? e->status : KVS_OK;
        if (first) e->ndone++;
        e->users--;
        w->ent[i] = NULL;
        int a = settle(tb, e, 1, tn);
        if (a != ACT_NONE) {
            es[k] = e;
            act[k] = a;
            idx[k++] = i;
        }
    }
    pthread_mutex_unlock(&tb->mu);

    /* 3: copy the stripes */
    if (live) {
        conn_assign_staging(w, t, n, res);
        for (size_t i = 0; i < n; i++) {
            if (!w->ok[i] || !w->ent[i]->staged) continue;
            if (!w->staged[i] || !w->obj[i]) { /* no staging memory: res[i] says so */
                w->ok[i] = 0;
                continue;
            }
            memcpy(w->obj[i], &w->ent[i]->hdr, sizeof w->ent[i]->hdr); /* view stamp 0 */
        }
        int rc = atomic_load(&t->cancelled) ? KVS_ERR_CLOSED
                                             : copy_stripes(w, TASK_DUMP, t, j->start, n);
        for (size_t i = 0; i < n; i++) {
            if (!w->ok[i]) continue;
            if (rc != KVS_OK) {
                res[i] = rc;
                continue;
            }
            if (w->got[i] != w->gen[i] || conn_read_stamp(w->obj[i]) != w->gen[i]) {
                KVS_LOGW("connector: view check failed on a stripe dump; "
                         "re-registering the mapping");
                conn_copy_forget(w, i);
                res[i] = KVS_ERR_CUDA;
                continue;
            }
            if (w->staged[i]) {
                uint64_t sb = stripe_bytes(t, j->start + i);
                int wr = kvs_slot_write(c->cl, &w->ent[i]->slot, CONN_HDR_BYTES + (uint64_t)s * sb,
                                        (uint8_t *)w->obj[i] + CONN_HDR_BYTES, sb);
                if (wr != KVS_OK) res[i] = wr;
            }
        }
    }
    uint64_t t2 = kvs_now_ns();

    /* 4: settle; the job that finished an object's last stripe publishes it */
    uint64_t bytes = 0, failed = 0;
    tn = kvs_now_ns();
    pthread_mutex_lock(&tb->mu);
    for (size_t i = 0; i < n; i++) {
        conn_sent *e = w->ent[i];
        if (!e) continue;
        e->users--;
        e->ndone++;
        if (res[i] == KVS_OK) {
            bytes += stripe_bytes(t, j->start + i);
        } else if (e->state == SE_OPEN) {
            e->state = SE_FAILED;
            e->status = res[i];
        }
        int a = settle(tb, e, 1, tn);
        if (a != ACT_NONE) {
            es[k] = e;
            act[k] = a;
            idx[k++] = i;
        }
    }
    pthread_mutex_unlock(&tb->mu);
    for (size_t i = 0; i < n; i++)
        if (res[i] != KVS_OK && res[i] != KVS_ERR_CLOSED) failed++;
    if (k) finish_entries(c, es, act, k, res, idx);
    atomic_fetch_add(&c->n_failed, failed);
    atomic_fetch_add(&c->n_bytes_dumped, bytes);
    if (c->profile) conn_profile_add(c, t0, t1, t2);
}

/* ------------------------------------------------------------- load */

/* Acquires the job's new entries (SE_BUSY, ours), reads and checks their
 * headers against the geometry g of their first caller. */
static void acquire_new(conn_worker *w, const kvs_task *t, struct conn_stab *tb,
                        conn_sent **ae, size_t na)
{
    kvs_connector *c = w->c;
    kvs_key ak[CONN_JOB_MAX_BLOCKS];
    int st_new[CONN_JOB_MAX_BLOCKS];
    for (size_t k = 0; k < na; k++) ak[k] = ae[k]->key;
    memset(w->slots, 0, na * sizeof w->slots[0]);
    int rc = kvs_acquire_batch(c->cl, ak, na, w->slots);
    for (size_t k = 0; k < na; k++) {
        conn_sent *e = ae[k];
        kvs_slot *sl = &w->slots[k];
        int st = rc < 0 ? rc : sl->status;
        st_new[k] = SE_FAILED;
        if (st != KVS_OK) {
            e->status = st;
            continue;
        }
        e->slot = *sl;
        e->held = 1;
        st = conn_size_status(&e->g, sl->size); /* mismatch: nothing copied */
        if (st == KVS_ERR_TOO_LARGE && sl->ptr && sl->size >= CONN_HDR_BYTES) {
            /* not a parts object of the connector at all (e.g. one shard
             * written from host memory under the same key): a miss */
            conn_hdr h;
            memcpy(&h, sl->ptr, sizeof h);
            if (h.magic != CONN_MAGIC || !(h.flags & CONN_FLAG_PARTS)) st = KVS_ERR_NOT_FOUND;
        }
        if (st == KVS_OK && conn_direct_ok(c, t, sl, e->g.bytes)) {
            e->staged = 0;
            st = conn_hdr_check(c, sl->ptr, &e->key, &e->g, &e->gen);
            if (st == KVS_OK) memcpy(&e->hdr, sl->ptr, sizeof e->hdr);
#ifdef KVS_HAVE_CUDA
            if (st == KVS_OK && c->backend == BK_CUDA)
                e->dptr = kvs_cuda_translate(c->cx, sl->ptr, e->g.bytes);
#endif
        } else if (st == KVS_OK) {
            e->staged = 1;
            st = kvs_slot_read(c->cl, sl, 0, &e->hdr, sizeof e->hdr);
            if (st == KVS_OK) st = conn_hdr_status(&e->hdr, &e->key, &e->g);
            e->gen = e->hdr.generation;
        }
        if (st != KVS_OK) {
            e->status = st;
            continue;
        }
        st_new[k] = SE_OPEN;
    }
    pthread_mutex_lock(&tb->mu);
    for (size_t k = 0; k < na; k++) ae[k]->state = st_new[k];
    pthread_cond_broadcast(&tb->cv);
    pthread_mutex_unlock(&tb->mu);
}

/* KVS_OK if an open load entry e serves an object of geometry g for key
 * (the geometry its header was checked against at acquisition: no need to
 * check again; another one: checked now). */
static int entry_fits(const conn_sent *e, const kvs_key *key, const conn_obj *g)
{
    if (g->bytes == e->g.bytes && g->fp == e->g.fp && g->payload == e->g.payload &&
        g->n_tensors == e->g.n_tensors && g->flags == e->g.flags)
        return KVS_OK;
    int st = conn_size_status(g, e->slot.size);
    if (st == KVS_OK) st = conn_hdr_status(&e->hdr, key, g);
    return st;
}

/* Read-ahead of load jobs (see the top of this file). Host backend: none. */

/* Queues a reference for conn_stripes_retire. */
static void ra_retire(conn_worker *w, struct kvs_cuda_ahead *b)
{
    if (!b) return;
#ifdef KVS_HAVE_CUDA
    if (w->nretire == CONN_RA_RETIRE) kvs_cuda_ahead_unref(b); /* not reached: sized for a job */
    else w->retire[w->nretire++] = b;
#endif
}

void conn_stripes_retire(conn_worker *w)
{
#ifdef KVS_HAVE_CUDA
    for (size_t q = 0; q < w->nretire; q++) kvs_cuda_ahead_unref(w->retire[q]);
#endif
    w->nretire = 0;
}

/* Whether a stripe of r's window other than s is still to be loaded. */
static int window_pending(const conn_sent *e, const struct conn_ra *r, uint32_t s)
{
    for (uint32_t t = r->stripe; t < r->stripe + r->n; t++)
        if (t != s && !bit_test(e, t)) return 1;
    return 0;
}

/* Before a load job of stripe s copies (under tb->mu): each live object
 * takes the buffer holding stripe s, if one was read ahead (w->ra[i], a
 * reference of the job's own; the entry keeps its reference while other
 * stripes of that window are to be loaded), lets go of windows with
 * nothing left to load, and asks for the next window when fewer than
 * ra_depth stripes past s were asked for (w->ra_from[i], w->ra_n[i]).
 *
 * Windows: a buffer holds ra_depth consecutive stripes of each object of
 * a job, copied as ONE range per object (the stripes are contiguous in the
 * object). On an H200 the host cost of enqueueing a copy (about 0.8 us an
 * entry of cudaMemcpyBatchAsync, several times that when four workers
 * contend for the driver) bounded UCM's layerwise loads when every stripe
 * was its own entry (8k tokens: 128 entries and ~350 us of host time per
 * job and layer against 150 us of link time; bench/RESULTS.md). Asking for
 * the next window as soon as fewer than ra_depth stripes are ahead keeps
 * up to two windows in flight: the one being consumed and the next. */
static void ra_claim(conn_worker *w, const kvs_task *t, struct conn_stab *tb, size_t start,
                     size_t n, uint32_t s)
{
    kvs_connector *c = w->c;
    if (c->backend != BK_CUDA) return;
    pthread_mutex_lock(&tb->mu);
    for (size_t i = 0; i < n; i++) {
        conn_sent *e = w->ent[i];
        if (!w->ok[i] || !e || e->staged) continue;
        uint64_t sb = stripe_bytes(t, start + i);
        for (int q = 0; q < CONN_RA_SLOTS; q++) {
            struct conn_ra *r = &e->ra[q];
            if (!r->buf) continue;
            int in = s >= r->stripe && s < r->stripe + r->n;
            int pending = window_pending(e, r, s);
            if (in && r->bytes == sb && !w->ra[i]) {
                w->ra[i] = r->buf;
                w->ra_off[i] = r->off;
                w->ra_skip[i] = (uint64_t)(s - r->stripe) * sb;
                if (pending) { /* the entry keeps its reference; the job takes one */
#ifdef KVS_HAVE_CUDA
                    kvs_cuda_ahead_ref(r->buf);
#endif
                    continue;
                }
                /* the last stripe of the window: the entry's reference is the job's */
            } else if (pending && !(in && r->bytes != sb)) {
                continue;
            } else {
                ra_retire(w, r->buf);
            }
            r->buf = NULL;
        }
        if (!c->readahead || e->ra_upto >= s + c->ra_depth) continue;
        uint32_t from = (e->ra_upto > s ? e->ra_upto : s) + 1;
        while (from < e->stripes && bit_test(e, from)) from++;
        if (from >= e->stripes) continue;
        uint32_t to = from + c->ra_depth - 1;
        if (to >= e->stripes) to = e->stripes - 1;
        w->ra_from[i] = from;
        w->ra_n[i] = to - from + 1;
        e->ra_upto = to;
    }
    pthread_mutex_unlock(&tb->mu);
}

/* Starts the windows ra_claim asked for: one buffer per distinct window
 * (the objects of a job normally share one). A window that does not fit
 * the arena is tried again with half as many stripes; what is not started
 * is asked for again by a later job (ra_keep). */
static void ra_start(conn_worker *w, const kvs_task *t, size_t start, size_t n, uint32_t s)
{
    for (size_t i = 0; i < n; i++) w->ra_buf[i] = 0xff;
    for (uint32_t k = 0; k < CONN_RA_BUFS; k++) w->ra_new[k] = NULL;
#ifdef KVS_HAVE_CUDA
    kvs_connector *c = w->c;
    if (c->backend != BK_CUDA || !c->readahead) return;
    if (!w->pcw) {
        kvs_cuda_pworker *pw = NULL;
        if (kvs_cuda_pworker_create(c->cx, c->device, &pw) != KVS_OK) return;
        w->pcw = pw;
    }
    uint8_t want[CONN_JOB_MAX_BLOCKS], done[CONN_JOB_MAX_BLOCKS];
    uint64_t dobj[CONN_JOB_MAX_BLOCKS], off[CONN_JOB_MAX_BLOCKS], len[CONN_JOB_MAX_BLOCKS];
    memset(done, 0, n);
    (void)s;
    for (uint32_t k = 0; k < CONN_RA_BUFS; k++) {
        size_t first = 0;
        while (first < n && (done[first] || !w->ra_n[first])) first++;
        if (first == n) break;
        const uint32_t from = w->ra_from[first];
        uint32_t cnt = w->ra_n[first];
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            want[i] = !done[i] && w->ra_n[i] && w->ra_from[i] == from && w->ra_n[i] == cnt;
            if (!want[i]) continue;
            done[i] = 1;
            m++;
        }
        int rc = KVS_ERR_NO_SPACE;
        while (m && rc == KVS_ERR_NO_SPACE) {
            for (size_t i = 0; i < n; i++) {
                if (!want[i]) continue;
                uint64_t sb = stripe_bytes(t, start + i);
                dobj[i] = w->ent[i]->dptr;
                off[i] = CONN_HDR_BYTES + (uint64_t)from * sb;
                len[i] = (uint64_t)cnt * sb;
            }
            rc = kvs_cuda_ahead_start(w->pcw, n, want, w->obj, dobj, off, len, CONN_STAMP_OFF,
                                      c->readahead, &w->ra_new[k], w->ra_new_off[k]);
            if (rc == KVS_ERR_NO_SPACE && cnt > 1) {
                cnt /= 2; /* the nearer stripes first */
                rc = KVS_ERR_NO_SPACE;
            } else if (rc == KVS_ERR_NO_SPACE) {
                break;
            }
        }
        if (rc != KVS_OK) continue;
        for (size_t i = 0; i < n; i++)
            if (want[i] && w->ra_new_off[k][i] != UINT64_MAX) {
                w->ra_buf[i] = (uint8_t)k;
                w->ra_n[i] = cnt; /* what the buffer holds */
            }
    }
#else
    (void)w, (void)t, (void)start, (void)n, (void)s;
#endif
}

/* After a load job's copies, under tb->mu: entry e (object i of the job)
 * keeps the buffer its next window was read ahead into; stripes asked for
 * but not read ahead are asked for again by a later job. */
static void ra_keep(conn_worker *w, conn_sent *e, size_t i, uint64_t sb, int res)
{
    if (!w->ra_n[i]) return;
    const uint32_t from = w->ra_from[i];
#ifdef KVS_HAVE_CUDA
    uint8_t k = w->ra_buf[i];
    if (k != 0xff && res == KVS_OK && e->state == SE_OPEN) {
        struct kvs_cuda_ahead *b = w->ra_new[k];
        for (int q = 0; q < CONN_RA_SLOTS && b; q++) {
            struct conn_ra *r = &e->ra[q];
            if (r->buf) continue;
            kvs_cuda_ahead_ref(b);
            r->buf = b;
            r->off = w->ra_new_off[k][i];
            r->bytes = sb;
            r->stripe = from;
            r->n = w->ra_n[i];
            if (e->ra_upto > from + r->n - 1) e->ra_upto = from + r->n - 1; /* the rest later */
            return;
        }
    }
#else
    (void)sb, (void)res;
#endif
    if (e->ra_upto >= from) e->ra_upto = from - 1; /* not read ahead: ask again */
}

/* Hands the job's read-ahead references to the retire list. */
static void ra_done(conn_worker *w, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        ra_retire(w, w->ra[i]);
        w->ra[i] = NULL;
        w->ra_n[i] = 0;
    }
    for (uint32_t k = 0; k < CONN_RA_BUFS; k++) {
        ra_retire(w, w->ra_new[k]);
        w->ra_new[k] = NULL;
    }
}

void conn_run_stripe_load(conn_worker *w, struct conn_job *j)
{
    kvs_connector *c = w->c;
    kvs_task *t = j->task;
    struct conn_stab *tb = c->stab_load;
    const kvs_key *keys = t->keys + j->start;
    int *res = t->results + j->start;
    const size_t n = j->n;
    const uint32_t s = t->stripe;
    uint64_t t0 = kvs_now_ns();
    reap(c, tb, 0);

    /* 1: each object's entry; the new ones are this job's to acquire */
    conn_sent *ae[CONN_JOB_MAX_BLOCKS];
    uint64_t hs[CONN_JOB_MAX_BLOCKS];
    size_t na = 0;
    key_hashes(keys, n, hs);
    pthread_mutex_lock(&tb->mu);
    for (size_t i = 0; i < n; i++) {
        w->ent[i] = NULL;
        w->ok[i] = 0;
        w->staged[i] = 0;
        w->obj[i] = NULL;
        w->ra[i] = NULL;
        w->ra_n[i] = 0;
        res[i] = KVS_OK;
        conn_obj g = conn_task_obj(c, t, j->start + i);
        conn_sent *e = stab_get(tb, &keys[i], hs[i], t->stripes, &g, t0);
        if (!e) {
            res[i] = KVS_ERR_NOMEM;
            continue;
        }
        if (e->stripes != t->stripes) {
            res[i] = KVS_ERR_INVALID; /* an open load of this key has another stripe count */
            continue;
        }
        e->users++;
        w->ent[i] = e;
        if (e->state == SE_NEW) {
            e->state = SE_BUSY;
            ae[na++] = e;
        }
    }
    pthread_mutex_unlock(&tb->mu);
    if (na) acquire_new(w, t, tb, ae, na);
    uint64_t t1 = kvs_now_ns();

    /* 2: which objects to copy from */
    conn_sent *es[CONN_JOB_MAX_BLOCKS];
    int act[CONN_JOB_MAX_BLOCKS];
    int st0[CONN_JOB_MAX_BLOCKS];
    size_t k = 0, live = 0, nbad = 0, nra = 0;
    uint64_t tn = t1;
    /* states under the lock; the checks of open entries (immutable once
     * open, and held by this job) outside it */
    pthread_mutex_lock(&tb->mu);
    wait_open(tb, w->ent, n);
    for (size_t i = 0; i < n; i++)
        if (w->ent[i])
            st0[i] = w->ent[i]->state == SE_OPEN     ? KVS_OK
                     : w->ent[i]->state == SE_FAILED ? w->ent[i]->status
                                                     : KVS_ERR_INTERNAL;
    pthread_mutex_unlock(&tb->mu);
    for (size_t i = 0; i < n; i++) {
        conn_sent *e = w->ent[i];
        if (!e) continue;
        int st = st0[i];
        if (st == KVS_OK) {
            conn_obj g = conn_task_obj(c, t, j->start + i);
            st = entry_fits(e, &keys[i], &g);
        }
        if (st == KVS_OK && kvs_slot_lease_valid(c->cl, &e->slot) != 1)
            st = KVS_ERR_LEASE_LOST_; /* the lease ran out: ask again next time */
        if (st == KVS_OK) {
            uint64_t sb = stripe_bytes(t, j->start + i);
            w->ok[i] = 1;
            w->gen[i] = e->gen;
            if (e->staged) {
                w->staged[i] = 1;
                w->sizes[i] = CONN_HDR_BYTES + sb;
                w->poff[i] = CONN_HDR_BYTES;
            } else {
                w->obj[i] = e->slot.ptr;
                w->poff[i] = CONN_HDR_BYTES + (uint64_t)s * sb;
            }
            live++;
            continue;
        }
        st0[i] = st;
        nbad++;
    }
    if (nbad) {
        pthread_mutex_lock(&tb->mu);
        for (size_t i = 0; i < n; i++) {
            conn_sent *e = w->ent[i];
            if (!e || w->ok[i]) continue;
            int st = st0[i];
            if (st == KVS_ERR_LEASE_LOST_) {
                st = KVS_ERR_NOT_FOUND;
                if (e->state == SE_OPEN) {
                    e->state = SE_FAILED;
                    e->status = st;
                }
            }
            res[i] = st;
            e->users--;
            w->ent[i] = NULL;
            int a = settle(tb, e, 0, tn);
            if (a != ACT_NONE) {
                es[k] = e;
                act[k++] = a;
            }
        }
        pthread_mutex_unlock(&tb->mu);
    }

    /* 3: copy the stripes out (staged: read from the slot first) */
    if (live && c->backend == BK_CUDA) {
        uint64_t tr = kvs_now_ns();
        ra_claim(w, t, tb, j->start, n, s);
        uint64_t tc = c->profile ? kvs_now_ns() : 0;
        ra_start(w, t, j->start, n, s); /* before this job waits for anything */
        if (c->profile) conn_profile_ra(c, tr, tc);
    }
    if (live) {
        conn_assign_staging(w, t, n, res);
        for (size_t i = 0; i < n; i++) {
            if (!w->ok[i] || !w->ent[i]->staged) continue;
            if (!w->staged[i] || !w->obj[i]) { /* no staging memory: res[i] says so */
                w->ok[i] = 0;
                continue;
            }
            uint64_t sb = stripe_bytes(t, j->start + i);
            res[i] = kvs_slot_read(c->cl, &w->ent[i]->slot, CONN_HDR_BYTES + (uint64_t)s * sb,
                                   (uint8_t *)w->obj[i] + CONN_HDR_BYTES, sb);
            if (res[i] != KVS_OK) {
                w->ok[i] = 0;
                continue;
            }
            conn_write_stamp(w->obj[i], w->gen[i]); /* what the GPU must read back */
        }
        int rc = atomic_load(&t->cancelled) ? KVS_ERR_CLOSED
                                             : copy_stripes(w, TASK_LOAD, t, j->start, n);
        for (size_t i = 0; i < n; i++) {
            if (!w->ok[i]) continue;
            if (rc != KVS_OK) {
                res[i] = rc;
                continue;
            }
            res[i] = KVS_ERR_NOT_FOUND;
            if (w->got[i] != w->gen[i]) {
                KVS_LOGW("connector: view check failed on a stripe load: miss");
                conn_copy_forget(w, i);
                continue;
            }
            conn_sent *e = w->ent[i];
            if (!e->staged && memcmp(e->slot.ptr, &e->hdr, sizeof e->hdr)) {
                /* the header checked at acquisition, byte for byte, or a miss */
                KVS_LOGD("connector: striped object changed during load: miss");
                continue;
            }
            if (kvs_slot_lease_valid(c->cl, &e->slot) != 1) continue;
            res[i] = KVS_OK;
            if (w->ra[i]) nra++;
        }
    }
    uint64_t t2 = kvs_now_ns();

    /* 4: settle; the job that loaded an object's last stripe releases it */
    uint64_t ok = 0, miss = 0, fail = 0, bytes = 0;
    atomic_fetch_add(&c->n_readahead, nra);
    tn = kvs_now_ns();
    pthread_mutex_lock(&tb->mu);
    for (size_t i = 0; i < n; i++) {
        conn_sent *e = w->ent[i];
        if (!e) continue;
        ra_keep(w, e, i, stripe_bytes(t, j->start + i), res[i]);
        e->users--;
        if (res[i] == KVS_OK) {
            if (!bit_test(e, s)) {
                bit_set(e, s);
                e->ndone++;
            }
        } else if (e->state == SE_OPEN) {
            e->state = SE_FAILED; /* not served again: the next call asks afresh */
            e->status = res[i];
        }
        int a = settle(tb, e, 0, tn);
        if (a != ACT_NONE) {
            es[k] = e;
            act[k++] = a;
        }
    }
    pthread_mutex_unlock(&tb->mu);
    ra_done(w, n);
    if (k) {
        conn_stripes_retire(w); /* every copy from those objects done before their leases go */
        finish_entries(c, es, act, k, NULL, NULL);
    }
    for (size_t i = 0; i < n; i++) {
        if (res[i] == KVS_OK) {
            ok++;
            bytes += stripe_bytes(t, j->start + i);
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
    if (c->profile) conn_profile_add(c, t0, t1, t2);
}
