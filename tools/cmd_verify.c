/* kvshelf verify — "never wrong bytes" checker for fault tests (issue 12).
 *
 * Every value this command writes says whose it is: a 32-byte header
 *   u64 magic ("KKSVRFY1"), u64 hash of the key, u64 version, u64 length
 * followed by a body derived from (key hash, version, length). A read is
 * checked against the key asked for and the versions the reader may see:
 * another key's value ("foreign"), an older or never written version of
 * this key ("stale"), or any byte that differs from what the header promises
 * ("corrupt") is a wrong read. Wrong reads are counted, never fatal: misses
 * and errors are allowed under faults, a wrong read never is.
 *
 * Two ways to run:
 *  - load (default): --threads workers, each owning --keys keys, pick a key
 *    at random and put it (when absent), rewrite it (remove + put of the
 *    next version, --rewrite percent of the time) or get and check it, until
 *    --duration, --ops or SIGTERM/SIGINT. Each key's acceptable versions are
 *    tracked: after a successful put only that version; a failed put adds its
 *    version (its bytes may or may not have been published); a successful
 *    remove (or a miss of it) leaves none (a hit is then wrong).
 *  - --script: one operation per line on stdin, one JSON line per result on
 *    stdout (tests drive exact sequences with it):
 *      put KEY VERSION SIZE     write version VERSION of KEY, SIZE bytes
 *      get KEY [V1,V2,...]      read KEY; a hit must be one of these versions
 *                               ("-" or nothing: none, any hit is wrong)
 *      rm KEY                   remove KEY
 *      stats                    print the totals so far
 *      quit                     (or end of input)
 *
 * The report (stdout; one JSON line with --json) has ops, puts, put_ok,
 * gets, hits, misses, errors, wrong, wrong_bytes (bytes of wrong reads that
 * are not what the expected value holds), foreign, stale, corrupt and the
 * error codes seen. --progress FILE rewrites that JSON (atomically) every
 * 100 ms while the load runs. Exit status: 1 if any read was wrong (or the
 * client could not be opened), 0 otherwise, 2 bad usage.
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
#include <time.h>
#include <unistd.h>

#include "kvshelf/kvshelf.h"
#include "tools/client_config.h"
#include "tools/commands.h"

#define VHDR 32u
#define VMAGIC 0x3159465256534b4bull /* "KKSVRFY1" as little-endian bytes */
#define VGOLDEN 0x9e3779b97f4a7c15ull
#define VTBL 4096u
#define VNERR 32
#define VKEY 200

static uint64_t vtbl[VTBL];

static uint64_t vmix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t vnow_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t key_hash(const void *p, size_t n)
{
    const uint8_t *s = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
    return vmix(h ^ 0x6b65792d68617368ull);
}

static uint64_t body_seed(uint64_t kh, uint64_t ver, uint64_t len)
{
    return vmix(kh ^ vmix(ver * VGOLDEN + len));
}

/* Writes the value of (key hash, version) of `len` (>= VHDR) bytes. */
static void make_value(uint8_t *p, uint64_t len, uint64_t kh, uint64_t ver)
{
    uint64_t h[4] = {VMAGIC, kh, ver, len};
    memcpy(p, h, VHDR);
    uint64_t s = body_seed(kh, ver, len), j = 0, i = VHDR;
    for (; i + 8 <= len; i += 8, j++) {
        uint64_t v = s ^ vtbl[j & (VTBL - 1)];
        memcpy(p + i, &v, 8);
    }
    if (i < len) {
        uint64_t v = s ^ vtbl[j & (VTBL - 1)];
        memcpy(p + i, &v, (size_t)(len - i));
    }
}

static uint64_t diff_bytes(const uint8_t *a, const uint8_t *b, size_t n)
{
    uint64_t d = 0;
    for (size_t i = 0; i < n; i++) d += a[i] != b[i];
    return d;
}

enum { VR_OK = 0, VR_FOREIGN, VR_STALE, VR_CORRUPT };
static const char *const kind_names[] = {"ok", "foreign", "stale", "corrupt"};

/* Which versions a read may return: (floor, last] and/or a list. */
typedef struct accept_set {
    uint64_t floor, last;
    const uint64_t *list;
    int nlist;
} accept_set;

static int accepted(const accept_set *a, uint64_t v)
{
    if (v > a->floor && v <= a->last) return 1;
    for (int i = 0; i < a->nlist; i++)
        if (a->list[i] == v) return 1;
    return 0;
}

typedef struct check_res {
    int kind;
    uint64_t bad_bytes, found_ver;
    int found_key; /* the header names the key asked for */
} check_res;

static void check_value(const uint8_t *p, uint64_t size, uint64_t kh, const accept_set *a,
                        check_res *out)
{
    memset(out, 0, sizeof *out);
    uint64_t h[4] = {0, 0, 0, 0};
    if (size >= VHDR) memcpy(h, p, VHDR);
    out->found_ver = h[2];
    out->found_key = h[1] == kh;
    if (size < VHDR || h[0] != VMAGIC) {
        out->kind = VR_CORRUPT;
        out->bad_bytes = size;
        return;
    }
    if (h[1] != kh) {
        out->kind = VR_FOREIGN;
        out->bad_bytes = size;
        return;
    }
    if (!accepted(a, h[2])) {
        out->kind = VR_STALE;
        out->bad_bytes = size;
        return;
    }
    if (h[3] != size) {
        out->kind = VR_CORRUPT;
        out->bad_bytes = size;
        return;
    }
    uint64_t s = body_seed(kh, h[2], size), j = 0, i = VHDR, bad = 0;
    for (; i + 8 <= size; i += 8, j++) {
        uint64_t v = s ^ vtbl[j & (VTBL - 1)], got;
        memcpy(&got, p + i, 8);
        if (got != v) bad += diff_bytes(p + i, (const uint8_t *)&v, 8);
    }
    if (i < size) {
        uint64_t v = s ^ vtbl[j & (VTBL - 1)];
        bad += diff_bytes(p + i, (const uint8_t *)&v, (size_t)(size - i));
    }
    if (bad) {
        out->kind = VR_CORRUPT;
        out->bad_bytes = bad;
    }
}

/* ------------------------------------------------------------------ */
/* counters                                                             */

typedef struct vstats {
    _Atomic uint64_t ops, puts, put_ok, gets, hits, misses, errors, wrong, wrong_bytes;
    _Atomic uint64_t foreign, stale, corrupt, removes, remove_ok, bytes_put, bytes_got;
    _Atomic uint64_t errs[VNERR];
} vstats;

static vstats g_st;

static void count_err(int rc)
{
    atomic_fetch_add(&g_st.errors, 1);
    int k = -rc;
    if (k < 0 || k >= VNERR) k = VNERR - 1;
    atomic_fetch_add(&g_st.errs[k], 1);
}

typedef struct vopts {
    kvs_config cfg;
    int threads, keys, rewrite, json, quiet, script, zero_copy, write_delay_us;
    uint64_t lo, hi, ops_limit, seed;
    double duration;
    char prefix[128];
    const char *progress;
} vopts;

static volatile sig_atomic_t g_stop;
static uint64_t g_start_ns;

static void on_stop(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void print_report(FILE *f, const vopts *o, kvs_client *c, const char *fatal)
{
    fprintf(f, "{\"mode\":\"%s\",\"prefix\":\"%s\",\"seconds\":%.3f", o->script ? "script" : "load",
            o->prefix, (double)(vnow_ns() - g_start_ns) / 1e9);
#define F(name) fprintf(f, ",\"" #name "\":%" PRIu64, atomic_load(&g_st.name))
    F(ops); F(puts); F(put_ok); F(gets); F(hits); F(misses); F(errors); F(wrong);
    F(wrong_bytes); F(foreign); F(stale); F(corrupt); F(removes); F(remove_ok);
    F(bytes_put); F(bytes_got);
#undef F
    fprintf(f, ",\"error_codes\":{");
    int first = 1;
    for (int k = 1; k < VNERR; k++) {
        uint64_t n = atomic_load(&g_st.errs[k]);
        if (!n) continue;
        fprintf(f, "%s\"%s\":%" PRIu64, first ? "" : ",", kvs_errname(-k), n);
        first = 0;
    }
    fprintf(f, "}");
    if (c) {
        kvs_client_counters cc;
        memset(&cc, 0, sizeof cc);
        kvs_client_get_counters(c, &cc);
        fprintf(f, ",\"reconnects\":%" PRIu64, cc.reconnects);
    }
    if (fatal) fprintf(f, ",\"fatal\":\"%s\"", fatal);
    fprintf(f, "}\n");
}

static void write_progress(const vopts *o, kvs_client *c)
{
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", o->progress) >= (int)sizeof tmp) return;
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    print_report(f, o, c, NULL);
    if (fclose(f) == 0) rename(tmp, o->progress);
}

/* ------------------------------------------------------------------ */
/* operations                                                           */

typedef struct vctx {
    kvs_client *c;
    const vopts *o;
    uint8_t *buf; /* o->hi bytes */
} vctx;

/* Puts version `ver` of key (len bytes). Returns the status. */
static int op_put(vctx *x, const char *key, uint32_t klen, uint64_t ver, uint64_t len)
{
    uint64_t kh = key_hash(key, klen);
    int rc;
    atomic_fetch_add(&g_st.ops, 1);
    atomic_fetch_add(&g_st.puts, 1);
    if (x->o->zero_copy) {
        kvs_key k = {key, klen};
        kvs_slot s;
        memset(&s, 0, sizeof s);
        rc = kvs_reserve_batch(x->c, &k, &len, 1, &s);
        if (rc >= 0) rc = s.status;
        if (rc == KVS_OK) {
            int w = KVS_OK;
            if (x->o->write_delay_us) {
                /* a slow writer (a device copy in flight): 64 KiB pieces with
                 * a pause after each, in place or through the transfer engine */
                make_value(x->buf, len, kh, ver);
                for (uint64_t off = 0; off < len && w == KVS_OK; off += 65536) {
                    uint64_t n = len - off < 65536 ? len - off : 65536;
                    if (s.ptr)
                        memcpy((uint8_t *)s.ptr + off, x->buf + off, n);
                    else
                        w = kvs_slot_write(x->c, &s, off, x->buf + off, n);
                    usleep((useconds_t)x->o->write_delay_us);
                }
            } else if (s.ptr) {
                make_value(s.ptr, len, kh, ver); /* straight into the segment */
            } else {
                make_value(x->buf, len, kh, ver);
                w = kvs_slot_write(x->c, &s, 0, x->buf, len);
            }
            uint8_t ok = w == KVS_OK;
            int res = KVS_OK;
            int n = kvs_commit_batch(x->c, &k, &s, &ok, 1, &res);
            rc = w != KVS_OK ? w : n < 0 ? n : res;
        }
    } else {
        make_value(x->buf, len, kh, ver);
        rc = kvs_put(x->c, key, klen, x->buf, len);
    }
    if (rc == KVS_OK) {
        atomic_fetch_add(&g_st.put_ok, 1);
        atomic_fetch_add(&g_st.bytes_put, len);
    } else {
        count_err(rc);
    }
    return rc;
}

static int op_remove(vctx *x, const char *key, uint32_t klen)
{
    atomic_fetch_add(&g_st.ops, 1);
    atomic_fetch_add(&g_st.removes, 1);
    int rc = kvs_remove(x->c, key, klen);
    if (rc == KVS_OK)
        atomic_fetch_add(&g_st.remove_ok, 1);
    else if (rc != KVS_ERR_NOT_FOUND)
        count_err(rc);
    return rc;
}

/* Gets key and checks it. Returns the status; *cr gets the check (kind
 * VR_OK on a miss or error), *size the size read. */
static int op_get(vctx *x, const char *key, uint32_t klen, const accept_set *a, check_res *cr,
                  uint64_t *size)
{
    atomic_fetch_add(&g_st.ops, 1);
    atomic_fetch_add(&g_st.gets, 1);
    memset(cr, 0, sizeof *cr);
    *size = 0;
    int rc;
    if (x->o->zero_copy) {
        kvs_key k = {key, klen};
        kvs_slot s;
        memset(&s, 0, sizeof s);
        rc = kvs_acquire_batch(x->c, &k, 1, &s);
        if (rc >= 0) rc = s.status;
        if (rc == KVS_OK) {
            if (s.size > x->o->hi) {
                rc = KVS_ERR_TOO_LARGE;
            } else if (s.ptr) {
                memcpy(x->buf, s.ptr, s.size);
            } else {
                rc = kvs_slot_read(x->c, &s, 0, x->buf, s.size);
            }
            if (rc == KVS_OK && !kvs_slot_lease_valid(x->c, &s)) rc = KVS_ERR_NOT_FOUND;
            *size = s.size;
            kvs_release_batch(x->c, &s, 1);
        }
    } else {
        rc = kvs_get(x->c, key, klen, x->buf, x->o->hi, size);
    }
    if (rc == KVS_ERR_NOT_FOUND) {
        atomic_fetch_add(&g_st.misses, 1);
        return rc;
    }
    if (rc != KVS_OK) {
        count_err(rc);
        return rc;
    }
    atomic_fetch_add(&g_st.hits, 1);
    atomic_fetch_add(&g_st.bytes_got, *size);
    check_value(x->buf, *size, key_hash(key, klen), a, cr);
    if (cr->kind != VR_OK) {
        uint64_t n = atomic_fetch_add(&g_st.wrong, 1) + 1;
        atomic_fetch_add(&g_st.wrong_bytes, cr->bad_bytes);
        atomic_fetch_add(cr->kind == VR_FOREIGN ? &g_st.foreign
                         : cr->kind == VR_STALE ? &g_st.stale
                                               : &g_st.corrupt,
                         1);
        if (n <= 20)
            fprintf(stderr,
                    "verify: WRONG %s read of key %.*s: %" PRIu64 " bytes, header version %" PRIu64
                    " (accepted (%" PRIu64 ",%" PRIu64 "]%s), %" PRIu64 " bytes wrong\n",
                    kind_names[cr->kind], (int)klen, key, *size, cr->found_ver, a->floor, a->last,
                    a->nlist ? " + list" : "", cr->bad_bytes);
    }
    return rc;
}

/* ------------------------------------------------------------------ */
/* load                                                                 */

typedef struct kstate {
    uint64_t floor, last; /* versions (floor, last] may be stored */
} kstate;

typedef struct vworker {
    pthread_t th;
    int id;
    vctx x;
    kstate *ks;
    uint64_t rng;
} vworker;

static _Atomic uint64_t g_claimed;
static uint64_t g_deadline_ns;

static uint64_t next_rand(uint64_t *s)
{
    *s += VGOLDEN;
    return vmix(*s);
}

static uint64_t draw_size(const vopts *o, uint64_t r)
{
    if (o->lo >= o->hi) return o->lo;
    double u = (double)(r >> 11) / 9007199254740992.0;
    double v = exp(log((double)o->lo) + u * (log((double)o->hi) - log((double)o->lo)));
    uint64_t s = (uint64_t)v;
    return s < o->lo ? o->lo : s > o->hi ? o->hi : s;
}

static void do_put_key(vworker *w, const char *key, uint32_t klen, kstate *k)
{
    uint64_t v = k->last + 1;
    uint64_t len = draw_size(w->x.o, next_rand(&w->rng));
    int rc = op_put(&w->x, key, klen, v, len);
    k->last = v;
    if (rc == KVS_OK) k->floor = v - 1;
}

static void *worker_main(void *arg)
{
    vworker *w = arg;
    const vopts *o = w->x.o;
    char key[VKEY];
    while (!g_stop) {
        if (g_deadline_ns && vnow_ns() >= g_deadline_ns) break;
        if (o->ops_limit && atomic_fetch_add(&g_claimed, 1) >= o->ops_limit) break;
        uint64_t r = next_rand(&w->rng);
        uint32_t i = (uint32_t)(r % (uint64_t)o->keys);
        int n = snprintf(key, sizeof key, "%s/%d/%u", o->prefix, w->id, i);
        uint32_t klen = (uint32_t)(n < (int)sizeof key ? n : (int)sizeof key - 1);
        kstate *k = &w->ks[i];
        uint64_t err_before = atomic_load(&g_st.errors);
        if (k->floor == k->last) {
            do_put_key(w, key, klen, k);
        } else if ((int)((r >> 32) % 100) < o->rewrite) {
            int rc = op_remove(&w->x, key, klen);
            if (rc == KVS_OK || rc == KVS_ERR_NOT_FOUND) k->floor = k->last;
            if (!g_stop) do_put_key(w, key, klen, k);
        } else {
            accept_set a = {k->floor, k->last, NULL, 0};
            check_res cr;
            uint64_t size;
            op_get(&w->x, key, klen, &a, &cr, &size);
        }
        if (atomic_load(&g_st.errors) != err_before) {
            /* the master or a peer is down: do not spin on instant failures */
            struct timespec ts = {0, 2 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

static int run_load(vopts *o, kvs_client *c)
{
    vworker *w = calloc((size_t)o->threads, sizeof *w);
    if (!w) return -1;
    int started = 0, rc = 0;
    if (o->duration > 0) g_deadline_ns = g_start_ns + (uint64_t)(o->duration * 1e9);
    for (int i = 0; i < o->threads; i++) {
        w[i].id = i;
        w[i].x.c = c;
        w[i].x.o = o;
        w[i].x.buf = malloc(o->hi);
        w[i].ks = calloc((size_t)o->keys, sizeof(kstate));
        w[i].rng = vmix(o->seed + (uint64_t)i * 7919u + 1);
        if (!w[i].x.buf || !w[i].ks) {
            rc = -1;
            break;
        }
    }
    if (rc == 0)
        for (int i = 0; i < o->threads; i++) {
            if (pthread_create(&w[i].th, NULL, worker_main, &w[i])) break;
            started++;
        }
    uint64_t last_line = vnow_ns();
    while (rc == 0) {
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
        if (o->progress) write_progress(o, c);
        uint64_t t = vnow_ns();
        if (!o->quiet && t - last_line >= 2000000000ull) {
            last_line = t;
            fprintf(stderr,
                    "verify: %6.1f s  ops %" PRIu64 "  hits %" PRIu64 "  misses %" PRIu64
                    "  errors %" PRIu64 "  wrong %" PRIu64 "\n",
                    (double)(t - g_start_ns) / 1e9, atomic_load(&g_st.ops),
                    atomic_load(&g_st.hits), atomic_load(&g_st.misses), atomic_load(&g_st.errors),
                    atomic_load(&g_st.wrong));
        }
        if (g_stop || (g_deadline_ns && t >= g_deadline_ns) ||
            (o->ops_limit && atomic_load(&g_claimed) >= o->ops_limit))
            break;
    }
    g_stop = 1;
    for (int i = 0; i < started; i++) pthread_join(w[i].th, NULL);
    if (o->progress) write_progress(o, c);
    for (int i = 0; i < o->threads; i++) {
        free(w[i].x.buf);
        free(w[i].ks);
    }
    free(w);
    return rc;
}

/* ------------------------------------------------------------------ */
/* script                                                               */

static void json_key(FILE *f, const char *k)
{
    fputc('"', f);
    for (; *k; k++) {
        unsigned char ch = (unsigned char)*k;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static int run_script(vopts *o, kvs_client *c)
{
    vctx x = {c, o, malloc(o->hi)};
    if (!x.buf) return -1;
    char line[1024];
    while (!g_stop && fgets(line, sizeof line, stdin)) {
        char op[16] = "", key[VKEY] = "", a3[512] = "", a4[64] = "";
        int n = sscanf(line, "%15s %199s %511s %63s", op, key, a3, a4);
        if (n <= 0) continue;
        uint64_t t0 = vnow_ns();
        uint32_t klen = (uint32_t)strlen(key);
        if (!strcmp(op, "quit")) break;
        if (!strcmp(op, "stats")) {
            print_report(stdout, o, c, NULL);
        } else if (!strcmp(op, "put") && n == 4) {
            uint64_t ver = strtoull(a3, NULL, 10), len = 0;
            if (kvs_parse_size(a4, &len) < 0 || len < VHDR || len > o->hi) {
                printf("{\"op\":\"put\",\"error\":\"bad size (%u..%" PRIu64 ")\"}\n", VHDR, o->hi);
            } else {
                int rc = op_put(&x, key, klen, ver, len);
                printf("{\"op\":\"put\",\"key\":");
                json_key(stdout, key);
                printf(",\"version\":%" PRIu64 ",\"size\":%" PRIu64 ",\"status\":\"%s\",\"ms\":%.3f}\n",
                       ver, len, kvs_errname(rc), (double)(vnow_ns() - t0) / 1e6);
            }
        } else if (!strcmp(op, "get") && n >= 2) {
            uint64_t list[64];
            int nl = 0;
            if (n >= 3 && strcmp(a3, "-")) {
                char *save = NULL;
                for (char *t = strtok_r(a3, ",", &save); t && nl < 64; t = strtok_r(NULL, ",", &save))
                    list[nl++] = strtoull(t, NULL, 10);
            }
            accept_set a = {0, 0, list, nl};
            check_res cr;
            uint64_t size = 0;
            int rc = op_get(&x, key, klen, &a, &cr, &size);
            const char *res = rc == KVS_ERR_NOT_FOUND ? "miss"
                              : rc != KVS_OK          ? "error"
                              : cr.kind != VR_OK       ? "wrong"
                                                      : "hit";
            printf("{\"op\":\"get\",\"key\":");
            json_key(stdout, key);
            printf(",\"status\":\"%s\",\"result\":\"%s\",\"size\":%" PRIu64, kvs_errname(rc), res,
                   size);
            if (rc == KVS_OK)
                printf(",\"kind\":\"%s\",\"found_version\":%" PRIu64
                       ",\"found_key\":%s,\"wrong_bytes\":%" PRIu64,
                       kind_names[cr.kind], cr.found_ver, cr.found_key ? "true" : "false",
                       cr.bad_bytes);
            printf(",\"ms\":%.3f}\n", (double)(vnow_ns() - t0) / 1e6);
        } else if (!strcmp(op, "rm") && n >= 2) {
            int rc = op_remove(&x, key, klen);
            printf("{\"op\":\"rm\",\"key\":");
            json_key(stdout, key);
            printf(",\"status\":\"%s\"}\n", kvs_errname(rc));
        } else {
            printf("{\"op\":\"%s\",\"error\":\"unknown or incomplete command\"}\n", op);
        }
        fflush(stdout);
    }
    free(x.buf);
    return 0;
}

/* ------------------------------------------------------------------ */

static void usage(FILE *f)
{
    fprintf(f,
"usage: kvshelf verify [options]\n"
"\n"
"Writes values that encode their key and version, rewrites them, and checks\n"
"every read against the key and the versions it may hold. Wrong reads\n"
"(another key's bytes, an old version, any corrupt byte) are counted, never\n"
"fatal; misses and errors are allowed (faults), wrong reads are not.\n"
"\n"
"  --threads N         workers (default 2), each with its own keys\n"
"  --keys N            keys per worker (default 32)\n"
"  --sizes A[-B]       value size, or a log-uniform range (default 4K-256K)\n"
"  --rewrite PCT       percent of operations on a stored key that remove it\n"
"                      and put its next version (default 30; the rest: gets)\n"
"  --duration SEC      stop after SEC seconds (default: at SIGTERM/SIGINT or --ops)\n"
"  --ops N             stop after N operations\n"
"  --zero-copy         write through kvs_reserve_batch/commit (in place when the\n"
"                      segment is mapped) and read through kvs_acquire_batch\n"
"  --write-delay-us N  implies --zero-copy: write values in 64 KiB pieces with a\n"
"                      pause of N us after each (a slow writer, e.g. a device\n"
"                      copy still in flight when the put is given up)\n"
"  --script            run the operations given on stdin (see the source header)\n"
"  --progress FILE     rewrite the JSON report into FILE every 100 ms\n"
"  --prefix P          key prefix (default verify-<pid>-<time>)\n"
"  --seed N            random seed\n"
"  --master ADDR       master address host:port or unix:/path\n"
"  --config FILE       JSON configuration (Mooncake keys)\n"
"  --segment-size N    bytes this client contributes (default 0)\n"
"  --secret S          shared secret\n"
"  --timeout-ms N      per-request timeout\n"
"  --json              print the report as one JSON line\n"
"  --quiet             no progress lines on stderr\n"
"\n"
"Exit status: 0 no wrong read, 1 wrong reads (or no client), 2 bad usage.\n");
}

int kvs_cmd_verify(int argc, char **argv)
{
    static vopts o;
    memset(&o, 0, sizeof o);
    memset(&g_st, 0, sizeof g_st);
    kvs_config_init(&o.cfg);
    o.threads = 2;
    o.keys = 32;
    o.rewrite = 30;
    o.lo = 4096;
    o.hi = 256 << 10;
    o.seed = (uint64_t)getpid() ^ vnow_ns();
    enum {
        O_THREADS = 256, O_KEYS, O_SIZES, O_REWRITE, O_DURATION, O_OPS, O_ZC, O_SCRIPT, O_PROGRESS,
        O_PREFIX, O_SEED, O_MASTER, O_CONFIG, O_SEGSIZE, O_SECRET, O_TIMEOUT, O_JSON, O_QUIET,
        O_HELP, O_WDELAY
    };
    static const struct option lo[] = {
        {"threads", required_argument, 0, O_THREADS},   {"keys", required_argument, 0, O_KEYS},
        {"sizes", required_argument, 0, O_SIZES},       {"size", required_argument, 0, O_SIZES},
        {"rewrite", required_argument, 0, O_REWRITE},   {"duration", required_argument, 0, O_DURATION},
        {"ops", required_argument, 0, O_OPS},           {"zero-copy", no_argument, 0, O_ZC},
        {"script", no_argument, 0, O_SCRIPT},           {"progress", required_argument, 0, O_PROGRESS},
        {"prefix", required_argument, 0, O_PREFIX},     {"seed", required_argument, 0, O_SEED},
        {"master", required_argument, 0, O_MASTER},     {"config", required_argument, 0, O_CONFIG},
        {"segment-size", required_argument, 0, O_SEGSIZE},
        {"secret", required_argument, 0, O_SECRET},     {"timeout-ms", required_argument, 0, O_TIMEOUT},
        {"json", no_argument, 0, O_JSON},               {"quiet", no_argument, 0, O_QUIET},
        {"write-delay-us", required_argument, 0, O_WDELAY},
        {"help", no_argument, 0, O_HELP},               {0, 0, 0, 0}};
    const char *config_file = NULL, *master = NULL, *secret = NULL, *segsize = NULL;
    long timeout_ms = -1;
    char err[512] = "";
    optind = 1;
    opterr = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        char *end = NULL;
        switch (ch) {
        case O_THREADS:
        case O_KEYS:
        case O_REWRITE: {
            long v = strtol(optarg, &end, 10);
            long max = ch == O_THREADS ? 256 : ch == O_KEYS ? 1000000 : 100;
            if (!*optarg || *end || v < (ch == O_REWRITE ? 0 : 1) || v > max) {
                fprintf(stderr, "kvshelf verify: bad value '%s'\n", optarg);
                return 2;
            }
            if (ch == O_THREADS) o.threads = (int)v;
            else if (ch == O_KEYS) o.keys = (int)v;
            else o.rewrite = (int)v;
            break;
        }
        case O_SIZES: {
            char tmp[128];
            snprintf(tmp, sizeof tmp, "%s", optarg);
            char *dash = strchr(tmp, '-');
            if (dash) *dash = 0;
            if (kvs_parse_size(tmp, &o.lo) < 0 ||
                (dash ? kvs_parse_size(dash + 1, &o.hi) : (o.hi = o.lo, 0)) < 0 || o.lo < 64 ||
                o.hi < o.lo || o.hi > (1ull << 32)) {
                fprintf(stderr, "kvshelf verify: bad --sizes '%s' (64 bytes .. 4 GiB)\n", optarg);
                return 2;
            }
            break;
        }
        case O_DURATION:
            o.duration = strtod(optarg, &end);
            if (end == optarg || *end || !(o.duration > 0)) {
                fprintf(stderr, "kvshelf verify: bad --duration '%s'\n", optarg);
                return 2;
            }
            break;
        case O_OPS:
            o.ops_limit = strtoull(optarg, &end, 10);
            if (end == optarg || *end || !o.ops_limit) {
                fprintf(stderr, "kvshelf verify: bad --ops '%s'\n", optarg);
                return 2;
            }
            break;
        case O_ZC: o.zero_copy = 1; break;
        case O_WDELAY: {
            long v = strtol(optarg, &end, 10);
            if (!*optarg || *end || v < 0 || v > 1000000) {
                fprintf(stderr, "kvshelf verify: bad --write-delay-us '%s'\n", optarg);
                return 2;
            }
            o.write_delay_us = (int)v;
            o.zero_copy = 1;
            break;
        }
        case O_SCRIPT: o.script = 1; break;
        case O_PROGRESS: o.progress = optarg; break;
        case O_PREFIX:
            if (!optarg[0] || strlen(optarg) > 100) {
                fprintf(stderr, "kvshelf verify: --prefix must be 1..100 bytes\n");
                return 2;
            }
            snprintf(o.prefix, sizeof o.prefix, "%s", optarg);
            break;
        case O_SEED: o.seed = strtoull(optarg, NULL, 10); break;
        case O_MASTER: master = optarg; break;
        case O_CONFIG: config_file = optarg; break;
        case O_SEGSIZE: segsize = optarg; break;
        case O_SECRET: secret = optarg; break;
        case O_TIMEOUT:
            timeout_ms = strtol(optarg, &end, 10);
            if (end == optarg || *end || timeout_ms <= 0 || timeout_ms > 3600000) {
                fprintf(stderr, "kvshelf verify: bad --timeout-ms '%s'\n", optarg);
                return 2;
            }
            break;
        case O_JSON: o.json = 1; break;
        case O_QUIET: o.quiet = 1; break;
        case O_HELP:
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvshelf verify: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    kvs_cli_client_opts co = {config_file, master, segsize, secret, timeout_ms};
    if (kvs_cli_client_config("verify", &co, &o.cfg)) return 2;
    if (!o.prefix[0])
        snprintf(o.prefix, sizeof o.prefix, "verify-%ld-%llx", (long)getpid(),
                 (unsigned long long)(vnow_ns() & 0xffffffffffull));
    for (uint32_t i = 0; i < VTBL; i++) vtbl[i] = vmix(0x7665726966790000ull + i);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop; /* no SA_RESTART: a blocked fgets returns */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    g_start_ns = vnow_ns();

    kvs_client *c = NULL;
    int rc = kvs_client_open(&o.cfg, &c, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "kvshelf verify: cannot open client: %s%s%s\n", kvs_strerror(rc),
                err[0] ? ": " : "", err);
        print_report(stdout, &o, NULL, kvs_errname(rc));
        return 1;
    }
    rc = o.script ? run_script(&o, c) : run_load(&o, c);
    if (o.json || o.script) {
        print_report(stdout, &o, c, rc < 0 ? "out of memory" : NULL);
    } else {
        printf("%-10s %-10s %-10s %-10s %-10s %-8s %-12s\n", "ops", "puts_ok", "hits", "misses",
               "errors", "wrong", "wrong_bytes");
        printf("%-10" PRIu64 " %-10" PRIu64 " %-10" PRIu64 " %-10" PRIu64 " %-10" PRIu64
               " %-8" PRIu64 " %-12" PRIu64 "\n",
               atomic_load(&g_st.ops), atomic_load(&g_st.put_ok), atomic_load(&g_st.hits),
               atomic_load(&g_st.misses), atomic_load(&g_st.errors), atomic_load(&g_st.wrong),
               atomic_load(&g_st.wrong_bytes));
    }
    fflush(stdout);
    kvs_client_close(c);
    if (rc < 0) return 1;
    return atomic_load(&g_st.wrong) ? 1 : 0;
}
