/* kvshelf bench — throughput and latency of the store through the public
 * client API (include/kvshelf/), plus a byte-exact verification mode that the
 * integration tests drive and a mixed-size pool fill measurement.
 *
 * Phases: for each value size (--sizes) the chosen modes (--mode) run in the
 * order given, each over --count keys (one pass) or for --duration seconds.
 * Keys are "<prefix>/<size label>/<index>", so a later invocation with the
 * same --prefix and --sizes reads what an earlier one wrote. With --verify
 * every value is a pseudo-random byte stream derived from its key (and, for a
 * size range, its size is derived from the key too), and every read is
 * compared byte by byte: a wrong byte or size is a mismatch, never a miss.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "kvshelf/kvshelf.h"
#include "tools/client_config.h"
#include "tools/commands.h"

/* ------------------------------------------------------------------ */
/* modes                                                                */

enum {
    M_PUT,
    M_GET,
    M_GET_INTO,
    M_PUT_FROM,
    M_EXISTS,
    M_REMOVE,
    M_RW, /* per key: put, then get (and verify) — for long runs under faults */
    M_COUNT
};
static const char *const mode_names[M_COUNT] = {"put",    "get",    "get_into", "put_from",
                                                "exists", "remove", "rw"};

#define MAX_SIZES 16
#define MAX_PHASE_MODES 16
#define NERR 32 /* error codes -0 .. -31 */
#define TL_MAX 4096
#define LAT_CAP_MAX (16u << 20) /* latency samples kept per worker and row */

typedef struct size_spec {
    char label[40];
    uint64_t lo, hi; /* fixed size when lo == hi; log-uniform in [lo, hi] otherwise */
} size_spec;

typedef struct stat_row {
    uint64_t calls, ops, ok, miss, err, mismatch, bytes;
    uint64_t errs[NERR];
    uint64_t *lat; /* ns per call */
    size_t nlat, caplat;
    uint64_t lat_max;
} stat_row;

typedef struct opts {
    kvs_config cfg;
    size_spec sizes[MAX_SIZES];
    int nsizes;
    int modes[MAX_PHASE_MODES];
    int nmodes;
    int threads;
    int batch;
    uint64_t count;
    int count_set;
    double duration;
    int verify;
    int json;
    int quiet;
    int keep;
    int strict;
    int fill_mixed;
    uint64_t fill_lo, fill_hi, seed;
    char prefix[128];
} opts;

struct bench;

typedef struct worker {
    pthread_t th;
    int id;
    struct bench *b;
    stat_row rows[2];
    uint8_t *buf; /* value buffers: batch * max size */
    size_t buflen;
    int registered;
    char *keys; /* batch keys, KEYSTRIDE bytes each */
    kvs_key *kv;
    kvs_item *items;
    uint8_t *exists_out;
    uint64_t last_err;
} worker;

#define KEYSTRIDE 192
#define KVS_MAX_BATCH_CLI 65536u

typedef struct bench {
    opts *o;
    kvs_client *c;
    /* current phase */
    int mode;
    const size_spec *sz;
    uint64_t nkeys;         /* keys of this size known to exist (for reads) */
    _Atomic uint64_t next;  /* next key index to claim */
    _Atomic uint64_t done;  /* items done (progress) */
    uint64_t limit;         /* claim no index >= limit (0 = none, cycle for reads) */
    int cycle;              /* reads: wrap around nkeys until the deadline */
    int batch;              /* keys per call in this phase */
    uint64_t deadline_ns;   /* 0 = none */
    uint64_t run_start_ns;
    worker *w;
} bench;

static _Atomic uint64_t tl_ok[TL_MAX], tl_miss[TL_MAX], tl_err[TL_MAX];
static _Atomic int tl_last = -1;
static volatile sig_atomic_t g_interrupted;

/* ------------------------------------------------------------------ */
/* small helpers                                                        */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t hash_bytes(const void *p, size_t n)
{
    const uint8_t *s = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
    return mix64(h);
}

#define GOLDEN 0x9e3779b97f4a7c15ull

/* The value of a key: word j = mix64(seed + (j+1)*GOLDEN), little-endian. */
static void fill_pattern(uint8_t *p, uint64_t n, uint64_t seed)
{
    uint64_t j = 0, i = 0;
    for (; i + 8 <= n; i += 8, j++) {
        uint64_t v = mix64(seed + (j + 1) * GOLDEN);
        memcpy(p + i, &v, 8);
    }
    if (i < n) {
        uint64_t v = mix64(seed + (j + 1) * GOLDEN);
        memcpy(p + i, &v, (size_t)(n - i));
    }
}

/* 1 if p[0..n) is the pattern of seed. */
static int check_pattern(const uint8_t *p, uint64_t n, uint64_t seed)
{
    uint64_t j = 0, i = 0;
    for (; i + 8 <= n; i += 8, j++) {
        uint64_t v = mix64(seed + (j + 1) * GOLDEN), got;
        memcpy(&got, p + i, 8);
        if (got != v) return 0;
    }
    if (i < n) {
        uint64_t v = mix64(seed + (j + 1) * GOLDEN);
        if (memcmp(p + i, &v, (size_t)(n - i))) return 0;
    }
    return 1;
}

static uint64_t log_uniform(uint64_t lo, uint64_t hi, uint64_t r)
{
    if (lo >= hi) return lo;
    double u = (double)(r >> 11) / 9007199254740992.0; /* [0,1) */
    double v = exp(log((double)lo) + u * (log((double)hi) - log((double)lo)));
    uint64_t s = (uint64_t)v;
    if (s < lo) s = lo;
    if (s > hi) s = hi;
    return s;
}

static uint32_t make_key(char *out, const char *prefix, const size_spec *s, uint64_t i)
{
    int n = snprintf(out, KEYSTRIDE, "%s/%s/%" PRIu64, prefix, s->label, i);
    if (n < 0) n = 0;
    if (n >= KEYSTRIDE) n = KEYSTRIDE - 1;
    if (n > KVS_KEY_MAX) n = KVS_KEY_MAX;
    return (uint32_t)n;
}

static uint64_t key_size(const size_spec *s, const char *key, uint32_t klen)
{
    if (s->lo == s->hi) return s->lo;
    return log_uniform(s->lo, s->hi, hash_bytes(key, klen) ^ 0x5157a11ull);
}

static uint64_t key_seed(const char *key, uint32_t klen) { return hash_bytes(key, klen); }

static void row_lat(stat_row *r, uint64_t ns)
{
    if (ns > r->lat_max) r->lat_max = ns;
    if (r->nlat == r->caplat) {
        if (r->caplat >= LAT_CAP_MAX) return;
        size_t nc = r->caplat ? r->caplat * 2 : 4096;
        uint64_t *p = realloc(r->lat, nc * sizeof *p);
        if (!p) return;
        r->lat = p;
        r->caplat = nc;
    }
    r->lat[r->nlat++] = ns;
}

/* Timeline of the whole run in 1 s buckets: kind 1 = success (hit), 2 = miss,
 * 0 = error. */
static void tl_add(bench *b, int kind, uint64_t n)
{
    if (!n) return;
    uint64_t t = (now_ns() - b->run_start_ns) / 1000000000ull;
    if (t >= TL_MAX) t = TL_MAX - 1;
    if (kind == 1)
        atomic_fetch_add(&tl_ok[t], n);
    else if (kind == 2)
        atomic_fetch_add(&tl_miss[t], n);
    else
        atomic_fetch_add(&tl_err[t], n);
    int last = atomic_load(&tl_last);
    while ((int)t > last && !atomic_compare_exchange_weak(&tl_last, &last, (int)t)) {
    }
}

static void row_err(bench *b, stat_row *r, int rc)
{
    r->err++;
    int k = -rc;
    if (k < 0 || k >= NERR) k = NERR - 1;
    r->errs[k]++;
    tl_add(b, 0, 1);
}

static int is_fatal_code(int k)
{
    int rc = -k;
    return rc == KVS_ERR_INVALID || rc == KVS_ERR_NOMEM || rc == KVS_ERR_INTERNAL ||
           rc == KVS_ERR_NOT_REGISTERED || rc == KVS_ERR_TOO_LARGE;
}

/* ------------------------------------------------------------------ */
/* workers                                                              */

/* Claims up to `want` key indices; returns how many (0 = phase over). */
static size_t claim(bench *b, uint64_t *first, size_t want)
{
    if (g_interrupted) return 0;
    if (b->deadline_ns && now_ns() >= b->deadline_ns) return 0;
    uint64_t i = atomic_fetch_add(&b->next, want);
    if (b->cycle) {
        if (b->nkeys == 0) return 0;
        *first = i;
        return want;
    }
    if (b->limit && i >= b->limit) return 0;
    if (b->limit && i + want > b->limit) want = (size_t)(b->limit - i);
    *first = i;
    return want;
}

static void verify_item(bench *b, stat_row *r, const char *key, uint32_t klen, const uint8_t *buf,
                        uint64_t size)
{
    uint64_t exp = key_size(b->sz, key, klen);
    if (size != exp || !check_pattern(buf, size, key_seed(key, klen))) {
        r->mismatch++;
        if (r->mismatch <= 5)
            fprintf(stderr, "bench: MISMATCH key %.*s size %" PRIu64 " expected %" PRIu64 "\n",
                    (int)klen, key, size, exp);
    }
}

static void do_put(worker *w, stat_row *r, uint64_t first, size_t n, int from)
{
    bench *b = w->b;
    opts *o = b->o;
    uint64_t maxsz = b->sz->hi;
    for (size_t k = 0; k < n; k++) {
        char *key = w->keys + k * KEYSTRIDE;
        uint64_t idx = b->cycle ? (first + k) % (b->nkeys ? b->nkeys : 1) : first + k;
        w->kv[k].data = key;
        w->kv[k].len = make_key(key, o->prefix, b->sz, idx);
        uint64_t sz = key_size(b->sz, key, w->kv[k].len);
        uint8_t *vb = w->buf + k * maxsz;
        if (o->verify) fill_pattern(vb, sz, key_seed(key, w->kv[k].len));
        w->items[k].key = w->kv[k];
        w->items[k].buf = vb;
        w->items[k].len = sz;
        w->items[k].size = 0;
        w->items[k].status = 0;
    }
    uint64_t t0 = now_ns();
    if (n == 1) {
        kvs_item *it = &w->items[0];
        it->status = from ? kvs_put_from(b->c, it->key.data, it->key.len, it->buf, it->len)
                          : kvs_put(b->c, it->key.data, it->key.len, it->buf, it->len);
    } else {
        int rc = kvs_put_batch(b->c, w->items, n);
        if (rc < 0)
            for (size_t k = 0; k < n; k++) w->items[k].status = rc;
    }
    row_lat(r, now_ns() - t0);
    r->calls++;
    for (size_t k = 0; k < n; k++) {
        r->ops++;
        if (w->items[k].status == KVS_OK) {
            r->ok++;
            r->bytes += w->items[k].len;
            tl_add(b, 1, 1);
        } else {
            row_err(b, r, w->items[k].status);
        }
    }
}

static void do_get(worker *w, stat_row *r, uint64_t first, size_t n, int into)
{
    bench *b = w->b;
    opts *o = b->o;
    uint64_t maxsz = b->sz->hi;
    for (size_t k = 0; k < n; k++) {
        char *key = w->keys + k * KEYSTRIDE;
        uint64_t idx = b->cycle ? (first + k) % b->nkeys : first + k;
        w->kv[k].data = key;
        w->kv[k].len = make_key(key, o->prefix, b->sz, idx);
        w->items[k].key = w->kv[k];
        w->items[k].buf = w->buf + k * maxsz;
        w->items[k].len = maxsz;
        w->items[k].size = 0;
        w->items[k].status = 0;
    }
    uint64_t t0 = now_ns();
    if (n == 1) {
        kvs_item *it = &w->items[0];
        it->status = into ? kvs_get_into(b->c, it->key.data, it->key.len, it->buf, it->len,
                                         &it->size)
                          : kvs_get(b->c, it->key.data, it->key.len, it->buf, it->len, &it->size);
    } else {
        int rc = kvs_get_batch(b->c, w->items, n);
        if (rc < 0)
            for (size_t k = 0; k < n; k++) w->items[k].status = rc;
    }
    row_lat(r, now_ns() - t0);
    r->calls++;
    for (size_t k = 0; k < n; k++) {
        kvs_item *it = &w->items[k];
        r->ops++;
        if (it->status == KVS_OK) {
            r->ok++;
            r->bytes += it->size;
            tl_add(b, 1, 1);
            if (o->verify) verify_item(b, r, it->key.data, it->key.len, it->buf, it->size);
        } else if (it->status == KVS_ERR_NOT_FOUND) {
            r->miss++;
            tl_add(b, 2, 1);
        } else {
            row_err(b, r, it->status);
        }
    }
}

static void do_exists(worker *w, stat_row *r, uint64_t first, size_t n)
{
    bench *b = w->b;
    for (size_t k = 0; k < n; k++) {
        char *key = w->keys + k * KEYSTRIDE;
        uint64_t idx = b->cycle ? (first + k) % b->nkeys : first + k;
        w->kv[k].data = key;
        w->kv[k].len = make_key(key, b->o->prefix, b->sz, idx);
    }
    uint64_t t0 = now_ns();
    int rc;
    if (n == 1) {
        rc = kvs_exists(b->c, w->kv[0].data, w->kv[0].len);
        if (rc >= 0) {
            w->exists_out[0] = (uint8_t)(rc > 0);
            rc = KVS_OK;
        }
    } else {
        rc = kvs_exists_batch(b->c, w->kv, n, w->exists_out);
    }
    row_lat(r, now_ns() - t0);
    r->calls++;
    r->ops += n;
    if (rc < 0) {
        for (size_t k = 0; k < n; k++) row_err(b, r, rc);
        return;
    }
    uint64_t hits = 0;
    for (size_t k = 0; k < n; k++) hits += w->exists_out[k] ? 1 : 0;
    r->ok += hits;
    r->miss += n - hits;
    tl_add(b, 1, hits);
    tl_add(b, 2, n - hits);
}

static void do_remove(worker *w, stat_row *r, uint64_t first, size_t n)
{
    bench *b = w->b;
    int res[1024];
    if (n > 1024) n = 1024;
    for (size_t k = 0; k < n; k++) {
        char *key = w->keys + k * KEYSTRIDE;
        w->kv[k].data = key;
        w->kv[k].len = make_key(key, b->o->prefix, b->sz, first + k);
    }
    uint64_t t0 = now_ns();
    int rc;
    if (n == 1) {
        res[0] = kvs_remove(b->c, w->kv[0].data, w->kv[0].len);
        rc = KVS_OK;
    } else {
        rc = kvs_remove_batch(b->c, w->kv, n, res);
    }
    row_lat(r, now_ns() - t0);
    r->calls++;
    for (size_t k = 0; k < n; k++) {
        int s = rc < 0 ? rc : res[k];
        r->ops++;
        if (s == KVS_OK) {
            r->ok++;
            tl_add(b, 1, 1);
        } else if (s == KVS_ERR_NOT_FOUND) {
            r->miss++;
            tl_add(b, 2, 1);
        } else {
            row_err(b, r, s);
        }
    }
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    bench *b = w->b;
    size_t want = (size_t)b->batch;
    for (;;) {
        uint64_t first = 0;
        size_t n = claim(b, &first, want);
        if (!n) break;
        switch (b->mode) {
        case M_PUT: do_put(w, &w->rows[0], first, n, 0); break;
        case M_PUT_FROM: do_put(w, &w->rows[0], first, n, 1); break;
        case M_GET: do_get(w, &w->rows[0], first, n, 0); break;
        case M_GET_INTO: do_get(w, &w->rows[0], first, n, 1); break;
        case M_EXISTS: do_exists(w, &w->rows[0], first, n); break;
        case M_REMOVE: do_remove(w, &w->rows[0], first, n); break;
        case M_RW:
            /* put a new key, then read it back (a miss when the put failed) */
            do_put(w, &w->rows[0], first, 1, 0);
            do_get(w, &w->rows[1], first, 1, 0);
            break;
        }
        atomic_fetch_add(&b->done, n);
        /* the master or a peer is down: do not spin on instant failures */
        if (w->rows[0].err + w->rows[1].err != w->last_err) {
            w->last_err = w->rows[0].err + w->rows[1].err;
            struct timespec ts = {0, 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* results                                                              */

typedef struct result {
    char mode[16];
    char size[40];
    int batch, threads;
    double seconds;
    stat_row agg;
    double p50, p90, p99, p999, mean, max; /* us per call */
} result;

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(const uint64_t *v, size_t n, double p)
{
    if (!n) return 0;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    if (i >= n) i = n - 1;
    return (double)v[i] / 1000.0;
}

static void aggregate(result *res, worker *w, int nw, int row)
{
    stat_row *a = &res->agg;
    memset(a, 0, sizeof *a);
    size_t total = 0;
    for (int i = 0; i < nw; i++) total += w[i].rows[row].nlat;
    a->lat = total ? malloc(total * sizeof(uint64_t)) : NULL;
    double sum = 0;
    for (int i = 0; i < nw; i++) {
        stat_row *r = &w[i].rows[row];
        a->calls += r->calls;
        a->ops += r->ops;
        a->ok += r->ok;
        a->miss += r->miss;
        a->err += r->err;
        a->mismatch += r->mismatch;
        a->bytes += r->bytes;
        for (int k = 0; k < NERR; k++) a->errs[k] += r->errs[k];
        if (r->lat_max > a->lat_max) a->lat_max = r->lat_max;
        if (a->lat && r->nlat) { /* a thread that recorded nothing may have no array */
            memcpy(a->lat + a->nlat, r->lat, r->nlat * sizeof(uint64_t));
            a->nlat += r->nlat;
        }
        for (size_t k = 0; k < r->nlat; k++) sum += (double)r->lat[k];
    }
    if (a->nlat) qsort(a->lat, a->nlat, sizeof(uint64_t), cmp_u64);
    res->p50 = pct(a->lat, a->nlat, 0.50);
    res->p90 = pct(a->lat, a->nlat, 0.90);
    res->p99 = pct(a->lat, a->nlat, 0.99);
    res->p999 = pct(a->lat, a->nlat, 0.999);
    res->mean = a->nlat ? sum / (double)a->nlat / 1000.0 : 0;
    res->max = (double)a->lat_max / 1000.0;
    free(a->lat);
    a->lat = NULL;
    a->nlat = 0;
}

static void fmt_size(char *out, size_t cap, uint64_t v)
{
    if (v && v % (1ull << 30) == 0)
        snprintf(out, cap, "%" PRIu64 "G", v >> 30);
    else if (v && v % (1ull << 20) == 0)
        snprintf(out, cap, "%" PRIu64 "M", v >> 20);
    else if (v && v % 1024 == 0)
        snprintf(out, cap, "%" PRIu64 "K", v >> 10);
    else
        snprintf(out, cap, "%" PRIu64, v);
}

/* ------------------------------------------------------------------ */
/* phases                                                               */

static void *map_buf(size_t len)
{
    if (!len) len = 4096;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    memset(p, 0x5a, len); /* fault the pages in before measuring */
    return p;
}

static int needs_values(int mode)
{
    return mode == M_PUT || mode == M_PUT_FROM || mode == M_GET || mode == M_GET_INTO ||
           mode == M_RW;
}

static void progress(bench *b, uint64_t start, uint64_t *last_print, int final)
{
    opts *o = b->o;
    if (o->quiet) return;
    uint64_t t = now_ns();
    double el = (double)(t - start) / 1e9;
    if (!final && (el < 2.0 || (double)(t - *last_print) / 1e9 < 2.0)) return;
    if (final && el < 2.0) return;
    *last_print = t;
    uint64_t done = atomic_load(&b->done);
    uint64_t errs = 0;
    for (int i = 0; i < o->threads; i++) errs += b->w[i].rows[0].err + b->w[i].rows[1].err;
    fprintf(stderr, "bench: %-8s %-8s %7.1f s  %10" PRIu64 " ops  %10.0f ops/s  errors %" PRIu64 "%s\n",
            mode_names[b->mode], b->sz->label, el, done, el > 0 ? (double)done / el : 0.0, errs,
            final ? "  (done)" : "");
}

/* Runs one phase; appends 1 or 2 results. Returns the number of results or -1. */
static int run_phase(bench *b, int mode, const size_spec *sz, uint64_t *nkeys_io, result *out)
{
    opts *o = b->o;
    int nw = o->threads;
    int batch = mode == M_RW ? 1 : o->batch;
    if (mode == M_REMOVE && batch > 1024) batch = 1024;
    b->mode = mode;
    b->batch = batch;
    b->sz = sz;
    atomic_store(&b->next, 0);
    atomic_store(&b->done, 0);
    b->deadline_ns = 0;
    b->cycle = 0;
    b->limit = 0;
    b->nkeys = *nkeys_io;
    int writes = mode == M_PUT || mode == M_PUT_FROM || mode == M_RW;
    if (writes) {
        b->limit = o->count_set || o->duration <= 0 ? o->count : 0;
    } else if (mode == M_REMOVE) {
        b->limit = *nkeys_io;
    } else {
        b->limit = *nkeys_io;
        if (o->duration > 0) b->cycle = 1;
    }
    if (!writes && *nkeys_io == 0) return 0;

    worker *w = calloc((size_t)nw, sizeof *w);
    if (!w) return -1;
    b->w = w;
    int rc = 0;
    for (int i = 0; i < nw; i++) {
        w[i].id = i;
        w[i].b = b;
        w[i].keys = malloc((size_t)batch * KEYSTRIDE);
        w[i].kv = calloc((size_t)batch, sizeof(kvs_key));
        w[i].items = calloc((size_t)batch, sizeof(kvs_item));
        w[i].exists_out = calloc((size_t)batch, 1);
        if (!w[i].keys || !w[i].kv || !w[i].items || !w[i].exists_out) rc = -1;
        if (needs_values(mode)) {
            w[i].buflen = (size_t)batch * (size_t)sz->hi;
            w[i].buf = map_buf(w[i].buflen);
            if (!w[i].buf) rc = -1;
            if (rc == 0 && !o->verify && writes) fill_pattern(w[i].buf, w[i].buflen, 12345);
            if (rc == 0 && (mode == M_GET_INTO || mode == M_PUT_FROM)) {
                int r = kvs_register_memory(b->c, w[i].buf, w[i].buflen);
                if (r < 0) {
                    fprintf(stderr, "bench: kvs_register_memory: %s\n", kvs_strerror(r));
                    rc = -2;
                } else {
                    w[i].registered = 1;
                }
            }
        }
    }
    uint64_t start = now_ns();
    if (o->duration > 0) b->deadline_ns = start + (uint64_t)(o->duration * 1e9);
    int started = 0;
    if (rc == 0) {
        for (int i = 0; i < nw; i++) {
            if (pthread_create(&w[i].th, NULL, worker_main, &w[i])) break;
            started++;
        }
        uint64_t last = start;
        for (;;) {
            struct timespec ts = {0, 100 * 1000 * 1000};
            nanosleep(&ts, NULL);
            progress(b, start, &last, 0);
            /* workers end by themselves (count or deadline); poll their progress */
            uint64_t next = atomic_load(&b->next);
            int over = (b->deadline_ns && now_ns() >= b->deadline_ns) ||
                       (!b->cycle && b->limit && next >= b->limit) || g_interrupted;
            if (over) break;
        }
        for (int i = 0; i < started; i++) pthread_join(w[i].th, NULL);
    }
    uint64_t end = now_ns();
    uint64_t last_print = start;
    if (rc == 0) progress(b, start, &last_print, 1);
    int nres = 0;
    if (rc == 0 || rc == -2) {
        int rows = mode == M_RW ? 2 : 1;
        for (int row = 0; row < rows; row++) {
            result *r = &out[nres++];
            memset(r, 0, sizeof *r);
            snprintf(r->mode, sizeof r->mode, "%s",
                     mode == M_RW ? (row == 0 ? "rw_put" : "rw_get") : mode_names[mode]);
            snprintf(r->size, sizeof r->size, "%s", sz->label);
            r->batch = batch;
            r->threads = nw;
            r->seconds = (double)(end - start) / 1e9;
            aggregate(r, w, nw, row);
            if (rc == -2) {
                r->agg.err = 1;
                r->agg.errs[-KVS_ERR_NOT_REGISTERED]++;
            }
        }
    }
    if (writes) {
        uint64_t claimed = atomic_load(&b->next);
        if (b->limit && claimed > b->limit) claimed = b->limit;
        if (claimed > *nkeys_io) *nkeys_io = claimed;
    }
    for (int i = 0; i < nw; i++) {
        if (w[i].registered) kvs_unregister_memory(b->c, w[i].buf);
        if (w[i].buf) munmap(w[i].buf, w[i].buflen ? w[i].buflen : 4096);
        free(w[i].keys);
        free(w[i].kv);
        free(w[i].items);
        free(w[i].exists_out);
        free(w[i].rows[0].lat);
        free(w[i].rows[1].lat);
    }
    free(w);
    b->w = NULL;
    return rc == -1 ? -1 : nres;
}

/* Removes keys [0, n) of a size (best effort, not measured). */
static void cleanup_keys(bench *b, const size_spec *sz, uint64_t n)
{
    kvs_key kv[512];
    static char keys[512][KEYSTRIDE];
    int res[512];
    for (uint64_t i = 0; i < n;) {
        size_t m = 0;
        for (; m < 512 && i < n; m++, i++) {
            kv[m].data = keys[m];
            kv[m].len = make_key(keys[m], b->o->prefix, sz, i);
        }
        if (kvs_remove_batch(b->c, kv, m, res) < 0) return;
    }
}

/* ------------------------------------------------------------------ */
/* --fill-mixed                                                          */

typedef struct pool_stats {
    double capacity, used, objects, evictions;
    int have_cap, have_used, have_obj, have_ev;
} pool_stats;

static const cJSON *find_num(const cJSON *o, const char *const *names)
{
    if (!o) return NULL;
    for (const char *const *n = names; *n; n++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, *n);
        if (cJSON_IsNumber(v)) return v;
    }
    return NULL;
}

static int read_pool_stats(kvs_client *c, pool_stats *ps)
{
    char *js = NULL;
    memset(ps, 0, sizeof *ps);
    int rc = kvs_client_stats_json(c, &js);
    if (rc < 0) return rc;
    cJSON *root = cJSON_Parse(js);
    free(js);
    if (!root) return KVS_ERR_PROTO;
    static const char *const capn[] = {"capacity", "capacity_bytes", "total_bytes", "total", NULL};
    static const char *const usedn[] = {"used", "used_bytes", "allocated", "allocated_bytes", NULL};
    static const char *const objn[] = {"objects", "object_count", "num_objects", "keys", NULL};
    static const char *const evn[] = {"evictions", "evicted", "evicted_objects", "objects_evicted",
                                      NULL};
    const cJSON *scopes[4] = {root, cJSON_GetObjectItemCaseSensitive(root, "pool"),
                              cJSON_GetObjectItemCaseSensitive(root, "totals"),
                              cJSON_GetObjectItemCaseSensitive(root, "counters")};
    for (int s = 0; s < 4; s++) {
        const cJSON *v;
        if (!ps->have_cap && (v = find_num(scopes[s], capn))) ps->capacity = v->valuedouble, ps->have_cap = 1;
        if (!ps->have_used && (v = find_num(scopes[s], usedn))) ps->used = v->valuedouble, ps->have_used = 1;
        if (!ps->have_obj && (v = find_num(scopes[s], objn))) ps->objects = v->valuedouble, ps->have_obj = 1;
        if (!ps->have_ev && (v = find_num(scopes[s], evn))) ps->evictions = v->valuedouble, ps->have_ev = 1;
    }
    cJSON_Delete(root);
    return (ps->have_cap && ps->have_used) ? KVS_OK : KVS_ERR_PROTO;
}

typedef struct fill_result {
    int ran;
    uint64_t puts, bytes_put;
    double capacity, used_before_fail, usable_pct;
    char stop[32];
    double seconds;
} fill_result;

static int run_fill(bench *b, fill_result *fr)
{
    opts *o = b->o;
    memset(fr, 0, sizeof *fr);
    fr->ran = 1;
    uint64_t maxsz = o->fill_hi;
    uint8_t *buf = map_buf(maxsz);
    if (!buf) return -1;
    fill_pattern(buf, maxsz, 777);
    size_spec sz;
    snprintf(sz.label, sizeof sz.label, "fill");
    sz.lo = o->fill_lo;
    sz.hi = o->fill_hi;
    uint64_t rng = o->seed ? o->seed : 42;
    uint64_t t0 = now_ns();
    pool_stats ps;
    int rc = read_pool_stats(b->c, &ps);
    if (rc < 0) {
        fprintf(stderr, "bench: --fill-mixed: cannot read capacity/used from STATS: %s\n",
                kvs_strerror(rc));
        munmap(buf, maxsz);
        return -1;
    }
    uint64_t start_objects = (uint64_t)ps.objects;
    snprintf(fr->stop, sizeof fr->stop, "limit");
    uint64_t i = 0;
    uint64_t limit = o->count_set ? o->count : UINT64_MAX;
    while (i < limit && !g_interrupted) {
        rng += GOLDEN;
        uint64_t size = log_uniform(o->fill_lo, o->fill_hi, mix64(rng));
        char key[KEYSTRIDE];
        uint32_t klen = make_key(key, o->prefix, &sz, i);
        fr->capacity = ps.capacity;
        double used_before = ps.used;
        double ev_before = ps.evictions;
        int r = kvs_put(b->c, key, klen, buf, size);
        i++;
        if (r == KVS_ERR_NO_SPACE) {
            fr->used_before_fail = used_before;
            snprintf(fr->stop, sizeof fr->stop, "NO_SPACE");
            break;
        }
        if (r < 0) {
            fprintf(stderr, "bench: --fill-mixed: put: %s\n", kvs_strerror(r));
            fr->used_before_fail = used_before;
            snprintf(fr->stop, sizeof fr->stop, "%s", kvs_errname(r));
            break;
        }
        fr->puts++;
        fr->bytes_put += size;
        if (read_pool_stats(b->c, &ps) < 0) break;
        int evicted = (ps.have_ev && ps.evictions > ev_before) ||
                      (ps.have_obj && (uint64_t)ps.objects < start_objects + fr->puts);
        if (evicted) {
            fr->used_before_fail = used_before;
            fr->puts--;
            fr->bytes_put -= size;
            snprintf(fr->stop, sizeof fr->stop, "evicted");
            break;
        }
        fr->used_before_fail = ps.used;
    }
    fr->usable_pct = fr->capacity > 0 ? 100.0 * fr->used_before_fail / fr->capacity : 0;
    fr->seconds = (double)(now_ns() - t0) / 1e9;
    if (!o->keep) cleanup_keys(b, &sz, i);
    munmap(buf, maxsz);
    return 0;
}

/* ------------------------------------------------------------------ */
/* output                                                               */

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static void print_table(FILE *f, const result *res, int n)
{
    fprintf(f,
            "%-9s %-9s %5s %3s %9s %9s %7s %6s %4s %10s %10s %9s %9s %9s\n",
            "mode", "size", "batch", "thr", "ops", "ok", "miss", "err", "bad", "ops/s", "MiB/s",
            "p50_us", "p99_us", "max_us");
    for (int i = 0; i < n; i++) {
        const result *r = &res[i];
        double s = r->seconds > 0 ? r->seconds : 1e-9;
        fprintf(f,
                "%-9s %-9s %5d %3d %9" PRIu64 " %9" PRIu64 " %7" PRIu64 " %6" PRIu64 " %4" PRIu64
                " %10.0f %10.1f %9.1f %9.1f %9.1f\n",
                r->mode, r->size, r->batch, r->threads, r->agg.ops, r->agg.ok, r->agg.miss,
                r->agg.err, r->agg.mismatch, (double)r->agg.ops / s,
                (double)r->agg.bytes / s / 1048576.0, r->p50, r->p99, r->max);
        for (int k = 1; k < NERR; k++)
            if (r->agg.errs[k])
                fprintf(f, "          error %s x %" PRIu64 "\n", kvs_errname(-k), r->agg.errs[k]);
    }
}

static void print_json(FILE *f, bench *b, const result *res, int n, const fill_result *fr,
                       uint64_t fatal, const char *fatal_msg)
{
    opts *o = b->o;
    fprintf(f, "{\"master\":");
    json_str(f, o->cfg.master_server_address);
    fprintf(f, ",\"prefix\":");
    json_str(f, o->prefix);
    fprintf(f, ",\"threads\":%d,\"batch\":%d,\"verify\":%s,\"segment_size\":%" PRIu64,
            o->threads, o->batch, o->verify ? "true" : "false", o->cfg.global_segment_size);
    fprintf(f, ",\"results\":[");
    uint64_t t_ops = 0, t_ok = 0, t_miss = 0, t_err = 0, t_bad = 0;
    for (int i = 0; i < n; i++) {
        const result *r = &res[i];
        double s = r->seconds > 0 ? r->seconds : 1e-9;
        t_ops += r->agg.ops;
        t_ok += r->agg.ok;
        t_miss += r->agg.miss;
        t_err += r->agg.err;
        t_bad += r->agg.mismatch;
        fprintf(f,
                "%s{\"mode\":\"%s\",\"size\":\"%s\",\"batch\":%d,\"threads\":%d,\"calls\":%" PRIu64
                ",\"ops\":%" PRIu64 ",\"ok\":%" PRIu64 ",\"miss\":%" PRIu64 ",\"errors\":%" PRIu64
                ",\"mismatches\":%" PRIu64 ",\"bytes\":%" PRIu64
                ",\"seconds\":%.6f,\"ops_per_s\":%.1f,\"mib_per_s\":%.2f,\"gb_per_s\":%.4f"
                ",\"lat_us\":{\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"p999\":%.2f,\"mean\":%.2f,"
                "\"max\":%.2f},\"error_codes\":{",
                i ? "," : "", r->mode, r->size, r->batch, r->threads, r->agg.calls, r->agg.ops,
                r->agg.ok, r->agg.miss, r->agg.err, r->agg.mismatch, r->agg.bytes, r->seconds,
                (double)r->agg.ops / s, (double)r->agg.bytes / s / 1048576.0,
                (double)r->agg.bytes / s / 1e9, r->p50, r->p90, r->p99, r->p999, r->mean, r->max);
        int first = 1;
        for (int k = 1; k < NERR; k++)
            if (r->agg.errs[k]) {
                fprintf(f, "%s\"%s\":%" PRIu64, first ? "" : ",", kvs_errname(-k), r->agg.errs[k]);
                first = 0;
            }
        fprintf(f, "}}");
    }
    fprintf(f, "],\"totals\":{\"ops\":%" PRIu64 ",\"ok\":%" PRIu64 ",\"miss\":%" PRIu64
               ",\"errors\":%" PRIu64 ",\"mismatches\":%" PRIu64 "}",
            t_ops, t_ok, t_miss, t_err, t_bad);
    fprintf(f, ",\"fatal\":%" PRIu64, fatal);
    if (fatal_msg) {
        fprintf(f, ",\"fatal_message\":");
        json_str(f, fatal_msg);
    }
    int last = atomic_load(&tl_last);
    fprintf(f, ",\"timeline\":{\"bucket_s\":1,\"ok\":[");
    for (int i = 0; i <= last; i++) fprintf(f, "%s%" PRIu64, i ? "," : "", atomic_load(&tl_ok[i]));
    fprintf(f, "],\"miss\":[");
    for (int i = 0; i <= last; i++) fprintf(f, "%s%" PRIu64, i ? "," : "", atomic_load(&tl_miss[i]));
    fprintf(f, "],\"err\":[");
    for (int i = 0; i <= last; i++) fprintf(f, "%s%" PRIu64, i ? "," : "", atomic_load(&tl_err[i]));
    fprintf(f, "]}");
    if (b->c) {
        kvs_client_counters cc;
        memset(&cc, 0, sizeof cc);
        kvs_client_get_counters(b->c, &cc);
        fprintf(f,
                ",\"counters\":{\"puts\":%" PRIu64 ",\"gets\":%" PRIu64 ",\"hits\":%" PRIu64
                ",\"misses\":%" PRIu64 ",\"errors\":%" PRIu64 ",\"reconnects\":%" PRIu64
                ",\"bytes_put\":%" PRIu64 ",\"bytes_got\":%" PRIu64
                ",\"early_kept\":%" PRIu64 ",\"early_wasted\":%" PRIu64 "}",
                cc.puts, cc.gets, cc.hits, cc.misses, cc.errors, cc.reconnects, cc.bytes_put,
                cc.bytes_got, cc.early_kept, cc.early_wasted);
    }
    if (fr && fr->ran)
        fprintf(f,
                ",\"fill\":{\"puts\":%" PRIu64 ",\"bytes_put\":%" PRIu64
                ",\"capacity\":%.0f,\"used\":%.0f,\"usable_pct\":%.3f,\"stop\":\"%s\","
                "\"seconds\":%.3f}",
                fr->puts, fr->bytes_put, fr->capacity, fr->used_before_fail, fr->usable_pct,
                fr->stop, fr->seconds);
    fprintf(f, "}\n");
}

/* ------------------------------------------------------------------ */
/* options                                                              */

static void usage(FILE *f)
{
    fprintf(f,
"usage: kvshelf bench [options]\n"
"\n"
"Measures put/get/exists throughput and latency through the client API.\n"
"For each value size the modes run in the order given, over --count keys\n"
"(one pass) or for --duration seconds each.\n"
"\n"
"  --mode LIST         comma-separated: put, get, get_into, put_from, exists,\n"
"                      remove, rw (per key: put then get; for long runs)\n"
"                      (default put,get,exists)\n"
"  --sizes LIST        value sizes, e.g. 4K,64K,1M; a range A-B (e.g. 4K-1M)\n"
"                      draws each key's size log-uniformly (default 64K)\n"
"  --count N           keys per size (default 1000; with --duration: at most)\n"
"  --duration SEC      run each mode for SEC seconds (reads cycle over the keys)\n"
"  --threads N         concurrent callers on one client (default 1)\n"
"  --batch N           keys per call (batch put/get/exists/remove; default 1;\n"
"                      get_into/put_from with N > 1 use the batch calls on\n"
"                      registered buffers)\n"
"  --verify            values are derived from their key; every read is checked\n"
"                      byte by byte (mismatches are reported and fatal)\n"
"  --prefix P          key prefix (default bench-<pid>-<time>); reuse it to read\n"
"                      keys written by an earlier run\n"
"  --keep              leave the keys in the pool (default: remove them at the end)\n"
"  --fill-mixed        put log-uniform 4 KiB-16 MiB values (or the first --sizes\n"
"                      range) until the first NO_SPACE or eviction; report\n"
"                      used/capacity from the master's STATS\n"
"  --seed N            random seed of --fill-mixed (default 42)\n"
"  --master ADDR       master address host:port or unix:/path (default: the\n"
"                      configured one, else the embedded host-local pool)\n"
"  --config FILE       JSON configuration (Mooncake keys)\n"
"  --segment-size N    bytes this bench client contributes (default 0: none, so\n"
"                      reads of data held by a node go through the transfer engine;\n"
"                      with the embedded pool: the pool's size if this starts it)\n"
"  --secret S          shared secret\n"
"  --timeout-ms N      per-request timeout\n"
"  --json              print one JSON document on stdout instead of the table\n"
"  --quiet             no progress lines on stderr\n"
"  --strict            exit 1 on any error or miss (default: only on mismatches\n"
"                      and fatal errors)\n"
"  --help              this text\n"
"\n"
"KVSHELF_NO_SHM=1 makes the client map no other process's segment (all bytes\n"
"through the transfer engine, as from another host).\n"
"\n"
"Exit status: 0 ok, 1 mismatches/fatal errors (or any error with --strict),\n"
"2 bad usage. The configuration is the --config file, then KVSHELF_* variables,\n"
"then these options.\n");
}

static int parse_modes(opts *o, const char *s)
{
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s", s);
    o->nmodes = 0;
    char *save = NULL;
    for (char *t = strtok_r(tmp, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int m = -1;
        for (int i = 0; i < M_COUNT; i++)
            if (!strcmp(t, mode_names[i])) m = i;
        if (!strcmp(t, "get-into")) m = M_GET_INTO;
        if (!strcmp(t, "put-from")) m = M_PUT_FROM;
        if (!strcmp(t, "batch-exists") || !strcmp(t, "exists_batch")) m = M_EXISTS;
        if (m < 0) {
            fprintf(stderr, "kvshelf bench: unknown mode '%s'\n", t);
            return -1;
        }
        if (o->nmodes >= MAX_PHASE_MODES) return -1;
        o->modes[o->nmodes++] = m;
    }
    return o->nmodes ? 0 : -1;
}

static int parse_sizes(opts *o, const char *s)
{
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s", s);
    o->nsizes = 0;
    char *save = NULL;
    for (char *t = strtok_r(tmp, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (o->nsizes >= MAX_SIZES) return -1;
        size_spec *sp = &o->sizes[o->nsizes];
        char *dash = strchr(t, '-');
        if (dash) {
            *dash = 0;
            if (kvs_parse_size(t, &sp->lo) < 0 || kvs_parse_size(dash + 1, &sp->hi) < 0) goto bad;
        } else {
            if (kvs_parse_size(t, &sp->lo) < 0) goto bad;
            sp->hi = sp->lo;
        }
        if (sp->lo == 0 || sp->hi < sp->lo || sp->hi > (1ull << 34)) goto bad;
        if (sp->lo == sp->hi) {
            fmt_size(sp->label, sizeof sp->label, sp->lo);
        } else {
            char a[16], c[16];
            fmt_size(a, sizeof a, sp->lo);
            fmt_size(c, sizeof c, sp->hi);
            snprintf(sp->label, sizeof sp->label, "%s-%s", a, c);
        }
        o->nsizes++;
        continue;
    bad:
        fprintf(stderr, "kvshelf bench: bad size '%s'\n", t);
        return -1;
    }
    return o->nsizes ? 0 : -1;
}

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') return -1;
    *out = v;
    return 0;
}

static void on_sigint(int sig)
{
    (void)sig;
    g_interrupted = 1;
}

int kvs_cmd_bench(int argc, char **argv)
{
    static opts o; /* large; static keeps it off the stack */
    memset(&o, 0, sizeof o);
    kvs_config_init(&o.cfg);
    o.threads = 1;
    o.batch = 1;
    o.count = 1000;
    o.fill_lo = 4096;
    o.fill_hi = 16ull << 20;
    o.seed = 42;
    parse_sizes(&o, "64K");
    parse_modes(&o, "put,get,exists");

    enum {
        O_MODE = 256, O_SIZES, O_COUNT, O_DURATION, O_THREADS, O_BATCH, O_VERIFY, O_PREFIX, O_KEEP,
        O_FILL, O_SEED, O_MASTER, O_CONFIG, O_SEGSIZE, O_SECRET, O_TIMEOUT, O_JSON, O_QUIET,
        O_STRICT, O_HELP
    };
    static const struct option lo[] = {
        {"mode", required_argument, 0, O_MODE},         {"sizes", required_argument, 0, O_SIZES},
        {"size", required_argument, 0, O_SIZES},        {"count", required_argument, 0, O_COUNT},
        {"duration", required_argument, 0, O_DURATION}, {"threads", required_argument, 0, O_THREADS},
        {"batch", required_argument, 0, O_BATCH},       {"verify", no_argument, 0, O_VERIFY},
        {"prefix", required_argument, 0, O_PREFIX},     {"keep", no_argument, 0, O_KEEP},
        {"fill-mixed", no_argument, 0, O_FILL},         {"seed", required_argument, 0, O_SEED},
        {"master", required_argument, 0, O_MASTER},     {"config", required_argument, 0, O_CONFIG},
        {"segment-size", required_argument, 0, O_SEGSIZE},
        {"secret", required_argument, 0, O_SECRET},     {"timeout-ms", required_argument, 0, O_TIMEOUT},
        {"json", no_argument, 0, O_JSON},               {"quiet", no_argument, 0, O_QUIET},
        {"strict", no_argument, 0, O_STRICT},           {"help", no_argument, 0, O_HELP},
        {0, 0, 0, 0}};

    const char *config_file = NULL, *master = NULL, *secret = NULL, *segsize = NULL;
    int timeout_ms = -1, sizes_given = 0;
    char err[512] = "";
    optind = 1;
    opterr = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (ch) {
        case O_MODE:
            if (parse_modes(&o, optarg) < 0) return 2;
            break;
        case O_SIZES:
            if (parse_sizes(&o, optarg) < 0) return 2;
            sizes_given = 1;
            break;
        case O_COUNT:
            if (parse_u64(optarg, &o.count) < 0 || o.count == 0) {
                fprintf(stderr, "kvshelf bench: bad --count '%s'\n", optarg);
                return 2;
            }
            o.count_set = 1;
            break;
        case O_DURATION: {
            char *end;
            o.duration = strtod(optarg, &end);
            if (end == optarg || *end || !(o.duration > 0) || o.duration > 1e6) {
                fprintf(stderr, "kvshelf bench: bad --duration '%s'\n", optarg);
                return 2;
            }
            break;
        }
        case O_THREADS:
        case O_BATCH: {
            uint64_t v;
            if (parse_u64(optarg, &v) < 0 || v == 0 || v > (ch == O_THREADS ? 256u : KVS_MAX_BATCH_CLI)) {
                fprintf(stderr, "kvshelf bench: bad --%s '%s'\n", ch == O_THREADS ? "threads" : "batch",
                        optarg);
                return 2;
            }
            if (ch == O_THREADS)
                o.threads = (int)v;
            else
                o.batch = (int)v;
            break;
        }
        case O_VERIFY: o.verify = 1; break;
        case O_PREFIX:
            if (!optarg[0] || strlen(optarg) > 100) {
                fprintf(stderr, "kvshelf bench: --prefix must be 1..100 bytes\n");
                return 2;
            }
            snprintf(o.prefix, sizeof o.prefix, "%s", optarg);
            break;
        case O_KEEP: o.keep = 1; break;
        case O_FILL: o.fill_mixed = 1; break;
        case O_SEED:
            if (parse_u64(optarg, &o.seed) < 0) {
                fprintf(stderr, "kvshelf bench: bad --seed '%s'\n", optarg);
                return 2;
            }
            break;
        case O_MASTER: master = optarg; break;
        case O_CONFIG: config_file = optarg; break;
        case O_SEGSIZE: segsize = optarg; break;
        case O_SECRET: secret = optarg; break;
        case O_TIMEOUT: {
            uint64_t v;
            if (parse_u64(optarg, &v) < 0 || v == 0 || v > 3600000) {
                fprintf(stderr, "kvshelf bench: bad --timeout-ms '%s'\n", optarg);
                return 2;
            }
            timeout_ms = (int)v;
            break;
        }
        case O_JSON: o.json = 1; break;
        case O_QUIET: o.quiet = 1; break;
        case O_STRICT: o.strict = 1; break;
        case O_HELP:
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvshelf bench: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (o.fill_mixed && sizes_given && o.sizes[0].lo != o.sizes[0].hi) {
        o.fill_lo = o.sizes[0].lo;
        o.fill_hi = o.sizes[0].hi;
    }

    /* configuration: file, environment, then options */
    kvs_cli_client_opts co = {config_file, master, segsize, secret, timeout_ms};
    if (kvs_cli_client_config("bench", &co, &o.cfg)) return 2;
    if (!o.prefix[0])
        snprintf(o.prefix, sizeof o.prefix, "bench-%ld-%llx", (long)getpid(),
                 (unsigned long long)(now_ns() & 0xffffffffffull));

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    static bench b;
    memset(&b, 0, sizeof b);
    b.o = &o;
    b.run_start_ns = now_ns();
    for (int i = 0; i < TL_MAX; i++) {
        atomic_store(&tl_ok[i], 0);
        atomic_store(&tl_miss[i], 0);
        atomic_store(&tl_err[i], 0);
    }
    atomic_store(&tl_last, -1);

    int rc = kvs_client_open(&o.cfg, &b.c, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "kvshelf bench: cannot open client: %s%s%s\n", kvs_strerror(rc),
                err[0] ? ": " : "", err);
        if (o.json) {
            char msg[700];
            snprintf(msg, sizeof msg, "client open: %s: %s", kvs_errname(rc), err);
            print_json(stdout, &b, NULL, 0, NULL, 1, msg);
        }
        return 1;
    }

    int cap = o.nsizes * o.nmodes * 2 + 2;
    result *res = calloc((size_t)cap, sizeof *res);
    uint64_t nkeys[MAX_SIZES];
    int nres = 0, failed = 0;
    fill_result fr;
    memset(&fr, 0, sizeof fr);
    if (!res) {
        kvs_client_close(b.c);
        return 1;
    }
    if (o.fill_mixed) {
        if (run_fill(&b, &fr) < 0) failed = 1;
    } else {
        for (int s = 0; s < o.nsizes && !g_interrupted; s++) {
            int has_put = 0;
            for (int m = 0; m < o.nmodes; m++)
                if (o.modes[m] == M_PUT || o.modes[m] == M_PUT_FROM || o.modes[m] == M_RW) has_put = 1;
            nkeys[s] = has_put ? 0 : o.count;
            for (int m = 0; m < o.nmodes && !g_interrupted; m++) {
                int r = run_phase(&b, o.modes[m], &o.sizes[s], &nkeys[s], res + nres);
                if (r < 0) {
                    failed = 1;
                    break;
                }
                nres += r;
            }
        }
        if (!o.keep)
            for (int s = 0; s < o.nsizes; s++) {
                int removed = 0;
                for (int m = 0; m < o.nmodes; m++)
                    if (o.modes[m] == M_REMOVE) removed = 1;
                int has_put = 0;
                for (int m = 0; m < o.nmodes; m++)
                    if (o.modes[m] == M_PUT || o.modes[m] == M_PUT_FROM || o.modes[m] == M_RW)
                        has_put = 1;
                if (has_put && !removed) cleanup_keys(&b, &o.sizes[s], nkeys[s]);
            }
    }

    uint64_t fatal = failed, errors = 0, misses = 0;
    for (int i = 0; i < nres; i++) {
        fatal += res[i].agg.mismatch;
        errors += res[i].agg.err;
        misses += res[i].agg.miss;
        for (int k = 0; k < NERR; k++)
            if (res[i].agg.errs[k] && is_fatal_code(k)) fatal += res[i].agg.errs[k];
    }
    if (o.json) {
        print_json(stdout, &b, res, nres, &fr, fatal, failed ? "a phase could not run" : NULL);
    } else {
        print_table(stdout, res, nres);
        if (fr.ran)
            printf("fill-mixed: %" PRIu64 " puts, %.1f MiB; used %.1f of %.1f MiB = %.2f%% when "
                   "the first put did not fit (%s)\n",
                   fr.puts, (double)fr.bytes_put / 1048576.0, fr.used_before_fail / 1048576.0,
                   fr.capacity / 1048576.0, fr.usable_pct, fr.stop);
        if (fatal) printf("FATAL: %" PRIu64 " mismatches or fatal errors\n", fatal);
    }
    fflush(stdout);
    free(res);
    kvs_client_close(b.c);
    if (fatal) return 1;
    if (o.strict && (errors || misses)) return 1;
    return 0;
}
