/* Test bodies of kvs_connector_dump_parts / load_parts, shared by
 * test_connector_parts.c (host memory, device -2) and
 * test_connector_parts_gpu.c (cudaMalloc'd parts, device 0). Objects are
 * made of parts of uneven sizes (odd lengths and addresses included)
 * scattered over one allocation; loads go into other memory and are
 * compared byte by byte; failed loads must leave the destination untouched
 * when the failure was found before copying. */
#ifndef TEST_CONNECTOR_PARTS_UTIL_H
#define TEST_CONNECTOR_PARTS_UTIL_H

#include "test_connector_util.h"

/* A set of n objects of ppo parts in one allocation (device or host). */
typedef struct pset {
    size_t n, ppo;
    uint8_t *mem;    /* tmem */
    uint8_t *shadow; /* host copy */
    size_t bytes;
    uint64_t *addrs, *lens; /* n*ppo */
} pset;

/* Part k of every object has lens_col[k] bytes; parts are laid out in
 * reverse object order with `gap` bytes between them (so an object's parts
 * are not adjacent), starting at an odd offset when odd != 0. */
static void pset_make(pset *p, size_t n, size_t ppo, const uint64_t *lens_col, size_t gap,
                      int odd, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    p->n = n;
    p->ppo = ppo;
    size_t per = 0;
    for (size_t k = 0; k < ppo; k++) per += lens_col[k] + gap;
    p->bytes = n * per + 64;
    p->mem = tmem_alloc(p->bytes);
    p->shadow = malloc(p->bytes);
    p->addrs = calloc(n * ppo + 1, sizeof *p->addrs);
    p->lens = calloc(n * ppo + 1, sizeof *p->lens);
    assert_true(p->mem && p->shadow && p->addrs && p->lens);
    fill_random(p->shadow, p->bytes, seed);
    tmem_put(p->mem, p->shadow, p->bytes);
    size_t off = odd ? 3 : 0;
    for (size_t i = n; i-- > 0;)
        for (size_t k = ppo; k-- > 0;) {
            p->addrs[i * ppo + k] = (uint64_t)(uintptr_t)(p->mem + off);
            p->lens[i * ppo + k] = lens_col[k];
            off += lens_col[k] + gap;
        }
    assert_true(off <= p->bytes);
}

static void pset_free(pset *p)
{
    tmem_free(p->mem);
    free(p->shadow);
    free(p->addrs);
    free(p->lens);
    memset(p, 0, sizeof *p);
}

static void pset_sync(pset *p) { tmem_get(p->shadow, p->mem, p->bytes); }

/* Host pointer into the shadow of part k of object i. */
static const uint8_t *pset_part(const pset *p, size_t i, size_t k)
{
    return p->shadow + (p->addrs[i * p->ppo + k] - (uint64_t)(uintptr_t)p->mem);
}

/* Object i of a (shadow) equals object j of b, part by part. */
static int pset_obj_equal(const pset *a, size_t i, const pset *b, size_t j)
{
    assert_int_equal(a->ppo, b->ppo);
    for (size_t k = 0; k < a->ppo; k++) {
        uint64_t la = a->lens[i * a->ppo + k];
        if (la != b->lens[j * b->ppo + k]) return 0;
        if (memcmp(pset_part(a, i, k), pset_part(b, j, k), la)) return 0;
    }
    return 1;
}

static int parts_run(kvs_task *t, int *res, size_t n)
{
    assert_non_null(t);
    assert_int_equal(kvs_task_wait(t, 120000), KVS_OK);
    assert_int_equal(kvs_task_size(t), n);
    int ok = kvs_task_results(t, res, n);
    kvs_task_free(t);
    return ok;
}

static int pdump(kvs_connector *c, const kvs_key *k, const pset *p, const kvs_parts_opts *o,
                 int *res)
{
    kvs_task *t = NULL;
    assert_int_equal(kvs_connector_dump_parts_ex(c, k, p->n, p->addrs, p->lens, p->ppo, NULL, o,
                                                 &t),
                     KVS_OK);
    return parts_run(t, res, p->n);
}

static int pload(kvs_connector *c, const kvs_key *k, const pset *p, const kvs_parts_opts *o,
                 int *res)
{
    kvs_task *t = NULL;
    assert_int_equal(
        kvs_connector_load_parts_ex(c, k, p->n, p->addrs, p->lens, p->ppo, o, &t), KVS_OK);
    return parts_run(t, res, p->n);
}

/* Dump n objects, load them into other memory, compare; dump again (all
 * skipped); lookups hit (namespaced keys). */
static void parts_roundtrip(const kvs_connector_opts *copts, int raw, int odd, size_t n)
{
    static const uint64_t cols[4] = {4096, 1000, 65536, 8};
    const size_t ppo = 4;
    char ns[128];
    make_ns(ns, sizeof ns, "parts-rt");
    kvs_connector *c = open_conn(&g_pool, ns, dev_id(), copts);
    pset src, dst;
    pset_make(&src, n, ppo, cols, odd ? 5 : 0, odd, 1);
    pset_make(&dst, n, ppo, cols, 16, 0, 2);
    hashes hs;
    hashes_make(&hs, n, 100 + (uint64_t)raw * 7 + (uint64_t)odd);
    uint8_t (*rk)[40] = calloc(n, 40);
    kvs_key *keys = hs.k;
    kvs_key *rkeys = calloc(n, sizeof *rkeys);
    assert_true(rk && rkeys);
    if (raw) { /* raw store keys, as the UCM stores use: "<ns>/<i>" */
        for (size_t i = 0; i < n; i++) {
            int l = snprintf((char *)rk[i], 40, "%.20s/%zu", ns + 5, i);
            rkeys[i] = (kvs_key){rk[i], (size_t)l};
        }
        keys = rkeys;
    }
    kvs_parts_opts o = {.raw_keys = raw};
    int *res = calloc(n, sizeof *res);
    assert_int_equal(pdump(c, keys, &src, &o, res), (int)n);
    kvs_connector_counters ct;
    kvs_connector_get_counters(c, &ct);
    assert_int_equal(ct.dumped_blocks, n);
    assert_int_equal(ct.bytes_dumped, n * (4096 + 1000 + 65536 + 8));
    assert_int_equal(pload(c, keys, &dst, &o, res), (int)n);
    pset_sync(&dst);
    for (size_t i = 0; i < n; i++) assert_true(pset_obj_equal(&src, i, &dst, i));
    /* dumped again: skipped, still OK */
    assert_int_equal(pdump(c, keys, &src, &o, res), (int)n);
    kvs_connector_get_counters(c, &ct);
    assert_int_equal(ct.skipped_blocks, n);
    assert_int_equal(ct.loaded_blocks, n);
    if (!raw) {
        uint8_t *hit = calloc(n, 1);
        assert_int_equal(kvs_connector_lookup(c, hs.k, n, hit), KVS_OK);
        for (size_t i = 0; i < n; i++) assert_int_equal(hit[i], 1);
        free(hit);
    } else { /* the raw keys are the store keys */
        kvs_client *cl = kvs_connector_client(c);
        for (size_t i = 0; i < n; i++)
            assert_int_equal(kvs_exists(cl, rkeys[i].data, (uint32_t)rkeys[i].len), 1);
    }
    free(res);
    free(rk);
    free(rkeys);
    hashes_free(&hs);
    pset_free(&src);
    pset_free(&dst);
    kvs_connector_close(c);
}

static void test_parts_roundtrip(void **s)
{
    (void)s;
    parts_roundtrip(NULL, 0, 0, 24);
}

static void test_parts_roundtrip_raw_odd(void **s)
{
    (void)s;
    parts_roundtrip(NULL, 1, 1, 17);
}

static void test_parts_staging(void **s)
{
    (void)s;
    kvs_connector_opts o = {.force_staging = 1};
    parts_roundtrip(&o, 0, 1, 9);
}

static void test_parts_checksum(void **s)
{
    (void)s;
    kvs_connector_opts o = {.checksum = 1};
    parts_roundtrip(&o, 1, 0, 7);
}

/* Many small objects in many jobs (KVSHELF_CONNECTOR_JOB_MB=1, 128 a job). */
static void test_parts_many_objects(void **s)
{
    (void)s;
    parts_roundtrip(NULL, 0, 0, 300);
    static const uint64_t cols[2] = {512, 300};
    char ns[128];
    make_ns(ns, sizeof ns, "parts-many");
    kvs_connector *c = open_conn(&g_pool, ns, dev_id(), NULL);
    const size_t n = 2000;
    pset src, dst;
    pset_make(&src, n, 2, cols, 0, 0, 3);
    pset_make(&dst, n, 2, cols, 0, 0, 4);
    hashes hs;
    hashes_make(&hs, n, 200);
    int *res = calloc(n, sizeof *res);
    assert_int_equal(pdump(c, hs.k, &src, NULL, res), (int)n);
    assert_int_equal(pload(c, hs.k, &dst, NULL, res), (int)n);
    pset_sync(&dst);
    for (size_t i = 0; i < n; i++) assert_true(pset_obj_equal(&src, i, &dst, i));
    free(res);
    hashes_free(&hs);
    pset_free(&src);
    pset_free(&dst);
    kvs_connector_close(c);
}

/* Absent keys are misses; loads into parts of other sizes, counts or tags
 * fail (TOO_LARGE / CORRUPT) and copy nothing; objects that are not parts
 * objects (kvs_put under the same raw key, block objects) are misses. */
static void test_parts_misses_and_mismatches(void **s)
{
    (void)s;
    char ns[128];
    make_ns(ns, sizeof ns, "parts-mm");
    kvs_connector *c = open_conn(&g_pool, ns, dev_id(), NULL);
    const size_t n = 6;
    static const uint64_t cols[2] = {2048, 512};
    pset src;
    pset_make(&src, n, 2, cols, 0, 0, 5);
    hashes hs;
    hashes_make(&hs, 2 * n, 300);
    uint64_t tags[6] = {11, 11, 11, 11, 11, 11};
    kvs_parts_opts to = {.tags = tags};
    int res[12];
    assert_int_equal(pdump(c, hs.k, &src, &to, res), (int)n);

    /* absent: the second half of the hashes */
    pset d;
    pset_make(&d, n, 2, cols, 0, 0, 6);
    pset_sync(&d);
    uint8_t *before = malloc(d.bytes);
    memcpy(before, d.shadow, d.bytes);
    assert_int_equal(pload(c, hs.k + n, &d, &to, res), 0);
    for (size_t i = 0; i < n; i++) assert_int_equal(res[i], KVS_ERR_NOT_FOUND);
    /* wrong tag: same sizes */
    uint64_t bad_tags[6] = {11, 12, 11, 0, 11, 11};
    kvs_parts_opts bt = {.tags = bad_tags};
    assert_int_equal(pload(c, hs.k, &d, &bt, res), (int)n - 2);
    assert_int_equal(res[1], KVS_ERR_CORRUPT);
    assert_int_equal(res[3], KVS_ERR_CORRUPT);
    pset_sync(&d);
    for (size_t i = 0; i < n; i++) {
        if (res[i] == KVS_OK) {
            assert_true(pset_obj_equal(&src, i, &d, i));
        } else {
            for (size_t k = 0; k < 2; k++)
                assert_memory_equal(pset_part(&d, i, k),
                                    before + (d.addrs[i * 2 + k] - (uint64_t)(uintptr_t)d.mem),
                                    d.lens[i * 2 + k]);
        }
    }
    pset_free(&d);
    free(before);

    /* other sizes: bigger total -> TOO_LARGE; same total, swapped -> CORRUPT;
     * one part of the same total -> CORRUPT. Nothing copied. */
    static const uint64_t big[2] = {2048, 520}, swapped[2] = {512, 2048}, one[1] = {2560};
    const uint64_t *shapes[3] = {big, swapped, one};
    const size_t ppos[3] = {2, 2, 1};
    const int want[3] = {KVS_ERR_TOO_LARGE, KVS_ERR_CORRUPT, KVS_ERR_CORRUPT};
    for (int v = 0; v < 3; v++) {
        pset m;
        pset_make(&m, n, ppos[v], shapes[v], 0, 0, 7 + (uint64_t)v);
        pset_sync(&m);
        uint8_t *b = malloc(m.bytes);
        memcpy(b, m.shadow, m.bytes);
        assert_int_equal(pload(c, hs.k, &m, &to, res), 0);
        for (size_t i = 0; i < n; i++) assert_int_equal(res[i], want[v]);
        pset_sync(&m);
        assert_memory_equal(m.shadow, b, m.bytes);
        free(b);
        pset_free(&m);
    }

    /* a plain kvs_put object of the right size under a raw key: a miss */
    kvs_client *cl = kvs_connector_client(c);
    char rk[64];
    int rl = snprintf(rk, sizeof rk, "%s/plain", ns);
    size_t osz = 64 + 2048 + 512;
    uint8_t *junk = malloc(osz);
    fill_random(junk, osz, 77);
    assert_int_equal(kvs_put(cl, rk, (uint32_t)rl, junk, osz), KVS_OK);
    pset one_obj;
    pset_make(&one_obj, 1, 2, cols, 0, 0, 8);
    kvs_key k1 = {(const uint8_t *)rk, (size_t)rl};
    kvs_parts_opts raw = {.raw_keys = 1};
    assert_int_equal(pload(c, &k1, &one_obj, &raw, res), 0);
    assert_int_equal(res[0], KVS_ERR_NOT_FOUND);
    /* the stats count misses and failures */
    kvs_connector_counters ct;
    kvs_connector_get_counters(c, &ct);
    assert_true(ct.missed_blocks >= n + 1);
    assert_true(ct.failed_blocks >= 2 + 3 * n);
    free(junk);
    pset_free(&one_obj);
    pset_free(&src);
    hashes_free(&hs);
    kvs_connector_close(c);
}

static void test_parts_invalid(void **s)
{
    (void)s;
    char ns[128];
    make_ns(ns, sizeof ns, "parts-inv");
    kvs_connector *c = open_conn(&g_pool, ns, dev_id(), NULL);
    static const uint64_t cols[1] = {256};
    pset p;
    pset_make(&p, 2, 1, cols, 0, 0, 9);
    hashes hs;
    hashes_make(&hs, 2, 400);
    kvs_task *t = (kvs_task *)1;
    assert_int_equal(kvs_connector_dump_parts(c, hs.k, 2, p.addrs, p.lens, 0, NULL, &t),
                     KVS_ERR_INVALID);
    assert_null(t);
    assert_int_equal(kvs_connector_dump_parts(c, hs.k, 2, NULL, p.lens, 1, NULL, &t),
                     KVS_ERR_INVALID);
    assert_int_equal(kvs_connector_load_parts(c, hs.k, 2, p.addrs, NULL, 1, &t), KVS_ERR_INVALID);
    assert_int_equal(kvs_connector_load_parts(NULL, hs.k, 2, p.addrs, p.lens, 1, &t),
                     KVS_ERR_INVALID);
    assert_int_equal(kvs_connector_load_parts(c, hs.k, 2, p.addrs, p.lens, 1, NULL),
                     KVS_ERR_INVALID);
    uint64_t zl[2] = {256, 0}, za[2] = {p.addrs[0], 0};
    assert_int_equal(kvs_connector_dump_parts(c, hs.k, 2, p.addrs, zl, 1, NULL, &t),
                     KVS_ERR_INVALID);
    assert_int_equal(kvs_connector_dump_parts(c, hs.k, 2, za, p.lens, 1, NULL, &t),
                     KVS_ERR_INVALID);
    uint64_t huge[2] = {1ull << 30, 1};
    assert_int_equal(kvs_connector_dump_parts(c, hs.k, 2, p.addrs, huge, 1, NULL, &t),
                     KVS_ERR_TOO_LARGE);
    kvs_key longk = {hs.h[0], KVS_HASH_MAX + 1};
    assert_int_equal(kvs_connector_dump_parts(c, &longk, 1, p.addrs, p.lens, 1, NULL, &t),
                     KVS_ERR_INVALID);
    uint8_t kbig[KVS_KEY_MAX + 1] = {1};
    kvs_key rawbig = {kbig, KVS_KEY_MAX + 1};
    kvs_parts_opts raw = {.raw_keys = 1};
    assert_int_equal(
        kvs_connector_dump_parts_ex(c, &rawbig, 1, p.addrs, p.lens, 1, NULL, &raw, &t),
        KVS_ERR_INVALID);
    if (!g_gpu) {
        int ev = 0;
        assert_int_equal(kvs_connector_dump_parts(c, hs.k, 2, p.addrs, p.lens, 1, &ev, &t),
                         KVS_ERR_INVALID);
    }
    /* an empty task finishes at once */
    assert_int_equal(kvs_connector_dump_parts(c, hs.k, 0, p.addrs, p.lens, 1, NULL, &t), KVS_OK);
    assert_int_equal(kvs_task_wait(t, 0), KVS_OK);
    assert_int_equal(kvs_task_results(t, NULL, 0), 0);
    kvs_task_free(t);
    /* no layout needed, and a layout does not get in the way */
    assert_int_equal(kvs_connector_block_bytes(c), 0);
    kvs_connector_close(c);
    /* lookup-only connectors move nothing */
    kvs_connector *lk = open_conn(&g_pool, ns, -1, NULL);
    assert_int_equal(kvs_connector_load_parts(lk, hs.k, 2, p.addrs, p.lens, 1, &t),
                     KVS_ERR_UNSUPPORTED);
    kvs_connector_close(lk);
    hashes_free(&hs);
    pset_free(&p);
}

/* Parts tasks from many threads at once, dumps and loads interleaved. */
typedef struct pthr_arg {
    kvs_connector *c;
    int idx;
    int failures;
} pthr_arg;

#define PTHR_N 6
#define PTHR_OBJ 10

static void *pthr_main(void *arg)
{
    pthr_arg *a = arg;
    static const uint64_t cols[3] = {1024, 333, 4096};
    for (int round = 0; round < 4; round++) {
        pset src, dst;
        pset_make(&src, PTHR_OBJ, 3, cols, 8, round & 1, (uint64_t)a->idx * 100 + round + 1);
        pset_make(&dst, PTHR_OBJ, 3, cols, 0, 0, (uint64_t)a->idx * 100 + round + 50);
        hashes hs;
        hashes_make(&hs, PTHR_OBJ, (uint64_t)a->idx * 1000 + round + 5000);
        kvs_task *t1 = NULL, *t2 = NULL, *t3 = NULL;
        int res[PTHR_OBJ];
        size_t h = PTHR_OBJ / 2;
        if (kvs_connector_dump_parts(a->c, hs.k, h, src.addrs, src.lens, 3, NULL, &t1) ||
            kvs_connector_dump_parts(a->c, hs.k + h, PTHR_OBJ - h, src.addrs + h * 3,
                                     src.lens + h * 3, 3, NULL, &t2)) {
            a->failures++;
        } else {
            if (kvs_task_wait(t1, -1) || kvs_task_wait(t2, -1) ||
                kvs_task_results(t1, res, PTHR_OBJ) != (int)h ||
                kvs_task_results(t2, res, PTHR_OBJ) != (int)(PTHR_OBJ - h))
                a->failures++;
            if (kvs_connector_load_parts(a->c, hs.k, PTHR_OBJ, dst.addrs, dst.lens, 3, &t3) ||
                kvs_task_wait(t3, -1) || kvs_task_results(t3, res, PTHR_OBJ) != PTHR_OBJ)
                a->failures++;
            pset_sync(&dst);
            for (size_t i = 0; i < PTHR_OBJ; i++)
                if (!pset_obj_equal(&src, i, &dst, i)) a->failures++;
        }
        kvs_task_free(t1);
        kvs_task_free(t2);
        kvs_task_free(t3);
        hashes_free(&hs);
        pset_free(&src);
        pset_free(&dst);
    }
    return NULL;
}

static void test_parts_concurrent(void **s)
{
    (void)s;
    char ns[128];
    make_ns(ns, sizeof ns, "parts-conc");
    kvs_connector_opts o = {.num_workers = 4};
    kvs_connector *c = open_conn(&g_pool, ns, dev_id(), &o);
    pthread_t th[PTHR_N];
    pthr_arg args[PTHR_N];
    for (int i = 0; i < PTHR_N; i++) {
        args[i] = (pthr_arg){c, i, 0};
        assert_int_equal(pthread_create(&th[i], NULL, pthr_main, &args[i]), 0);
    }
    for (int i = 0; i < PTHR_N; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(args[i].failures, 0);
    }
    kvs_connector_counters ct;
    kvs_connector_get_counters(c, &ct);
    assert_int_equal(ct.dumped_blocks, 4 * PTHR_N * PTHR_OBJ);
    assert_int_equal(ct.loaded_blocks, 4 * PTHR_N * PTHR_OBJ);
    kvs_connector_close(c);
}

/* Bounded queue: drop_when_full drops parts dumps over max_inflight; without
 * it every object is stored. Block tasks and parts tasks share the queue. */
static void test_parts_backpressure(void **s)
{
    (void)s;
    static const uint64_t cols[2] = {128 << 10, 128 << 10};
    const size_t n = 64;
    pset src;
    pset_make(&src, n, 2, cols, 0, 0, 12);
    hashes hs;
    hashes_make(&hs, n, 600);
    for (int drop = 0; drop < 2; drop++) {
        char ns[128];
        make_ns(ns, sizeof ns, drop ? "parts-drop" : "parts-block");
        kvs_connector_opts o = {.num_workers = 1, .max_inflight = 4, .drop_when_full = drop};
        kvs_connector *c = open_conn(&g_pool, ns, dev_id(), &o);
        kvs_task *t[16];
        for (int i = 0; i < 16; i++)
            assert_int_equal(kvs_connector_dump_parts(c, hs.k + i * 4, 4, src.addrs + i * 8,
                                                      src.lens + i * 8, 2, NULL, &t[i]),
                             KVS_OK);
        int stored = 0, busy = 0;
        for (int i = 0; i < 16; i++) {
            int res[4];
            assert_int_equal(kvs_task_wait(t[i], -1), KVS_OK);
            stored += kvs_task_results(t[i], res, 4);
            for (int b = 0; b < 4; b++) busy += res[b] == KVS_ERR_BUSY;
            kvs_task_free(t[i]);
        }
        kvs_connector_counters ct;
        kvs_connector_get_counters(c, &ct);
        if (drop) {
            assert_true(busy > 0);
            assert_int_equal(ct.dropped_blocks, (uint64_t)busy);
            assert_int_equal(stored + busy, (int)n);
        } else {
            assert_int_equal(busy, 0);
            assert_int_equal(stored, (int)n);
        }
        kvs_connector_close(c);
    }
    hashes_free(&hs);
    pset_free(&src);
}

/* Close with parts tasks in flight: every object ends OK or CLOSED (or a
 * miss for loads), tasks outlive the connector. */
static void test_parts_close_in_flight(void **s)
{
    (void)s;
    static const uint64_t cols[2] = {256 << 10, 64 << 10};
    const size_t n = 64;
    pset src, dst;
    pset_make(&src, n, 2, cols, 0, 0, 13);
    pset_make(&dst, n, 2, cols, 0, 0, 14);
    hashes hs;
    hashes_make(&hs, n, 700);
    char ns[128];
    make_ns(ns, sizeof ns, "parts-close");
    kvs_connector_opts o = {.num_workers = 2};
    kvs_connector *c = open_conn(&g_pool, ns, dev_id(), &o);
    kvs_task *t[2] = {0};
    assert_int_equal(kvs_connector_dump_parts(c, hs.k, n, src.addrs, src.lens, 2, NULL, &t[0]),
                     KVS_OK);
    assert_int_equal(kvs_connector_load_parts(c, hs.k, n, dst.addrs, dst.lens, 2, &t[1]), KVS_OK);
    kvs_connector_close(c);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(kvs_task_wait(t[i], 0), KVS_OK);
        int res[64];
        kvs_task_results(t[i], res, n);
        for (size_t b = 0; b < n; b++)
            assert_true(res[b] == KVS_OK || res[b] == KVS_ERR_CLOSED ||
                        res[b] == KVS_ERR_NOT_FOUND);
        kvs_task_free(t[i]);
    }
    hashes_free(&hs);
    pset_free(&src);
    pset_free(&dst);
}

static int parts_group_setup(void **s)
{
    (void)s;
    setenv("KVSHELF_CONNECTOR_JOB_MB", "1", 1); /* several jobs per task */
    return pool_start(&g_pool, 512ull << 20, NULL);
}

static int parts_group_teardown(void **s)
{
    (void)s;
    pool_stop(&g_pool);
    return 0;
}

#define CONNECTOR_PARTS_TESTS                                                                  \
    cmocka_unit_test(test_parts_roundtrip), cmocka_unit_test(test_parts_roundtrip_raw_odd),    \
        cmocka_unit_test(test_parts_staging), cmocka_unit_test(test_parts_checksum),           \
        cmocka_unit_test(test_parts_many_objects),                                             \
        cmocka_unit_test(test_parts_misses_and_mismatches), cmocka_unit_test(test_parts_invalid), \
        cmocka_unit_test(test_parts_concurrent), cmocka_unit_test(test_parts_backpressure),    \
        cmocka_unit_test(test_parts_close_in_flight)

#endif
