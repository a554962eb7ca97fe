/* Shared by test_connector_host.c and test_connector_gpu.c: a real pool
 * (`kvshelf master --embedded` in a temporary runtime dir, binary from
 * $KVSHELF_BIN), KV caches in the layouts engines use (in host or GPU
 * memory), and the test bodies, which run unchanged on either memory.
 *
 * Layouts (elements of 2 bytes):
 *   vllm     per layer [2, NB, bs, H, D]: K and V as two tensors per layer
 *   hnd      per layer [NB, 2, H, bs, D]: K and V strided inside each block
 *   mla      per layer [NB, bs, dim]
 *   perhead  per layer and K/V [H, NB*bs, D]: H chunks per block
 *   odd      per layer [NB, bs, 37] with bs 5: 370-byte chunks (unaligned)
 */
#ifndef TEST_CONNECTOR_UTIL_H
#define TEST_CONNECTOR_UTIL_H

/* A test binary built without CUDA uses none of the bodies. */
#pragma GCC diagnostic ignored "-Wunused-function"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvshelf/kvshelf.h"
#ifdef KVS_HAVE_CUDA
#include "cuda/kvs_cuda.h"
#endif

extern char **environ;

/* ------------------------------------------------------------------ pool */

typedef struct tpool {
    pid_t pid;
    char dir[256];
    kvs_config cfg;
} tpool;

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

/* Starts `kvshelf master --embedded` with a segment of seg_bytes and any
 * extra args (NULL-terminated). Returns 0 or -1. */
static int pool_start(tpool *p, uint64_t seg_bytes, ...)
{
    memset(p, 0, sizeof *p);
    const char *bin = getenv("KVSHELF_BIN");
    if (!bin || !*bin) bin = "build/bin/kvshelf";
    if (access(bin, X_OK)) {
        fprintf(stderr, "test: kvshelf binary %s not found (set KVSHELF_BIN)\n", bin);
        return -1;
    }
    snprintf(p->dir, sizeof p->dir, "/tmp/kvs-conn-test-XXXXXX");
    if (!mkdtemp(p->dir)) return -1;
    char seg[32];
    snprintf(seg, sizeof seg, "%llu", (unsigned long long)seg_bytes);
    const char *argv[32] = {"kvshelf", "master", "--embedded", "--runtime-dir", p->dir,
                            "--segment-size", seg};
    int k = 7;
    va_list ap;
    va_start(ap, seg_bytes);
    const char *a;
    while (k < 31 && (a = va_arg(ap, const char *))) argv[k++] = a;
    va_end(ap);
    argv[k] = NULL;
    if (posix_spawn(&p->pid, bin, NULL, NULL, (char *const *)argv, environ)) return -1;
    char sock[300];
    snprintf(sock, sizeof sock, "%s/master.sock", p->dir);
    for (int i = 0; i < 1000; i++) {
        if (access(sock, F_OK) == 0) break;
        int st;
        if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
            p->pid = 0;
            return -1;
        }
        usleep(10000);
    }
    if (access(sock, F_OK)) return -1;
    kvs_config_init(&p->cfg);
    snprintf(p->cfg.runtime_dir, sizeof p->cfg.runtime_dir, "%s", p->dir);
    p->cfg.master_server_address[0] = 0;
    p->cfg.global_segment_size = 0;
    p->cfg.local_buffer_size = 64ull << 20;
    return 0;
}

static void pool_stop(tpool *p)
{
    if (p->pid > 0) {
        kill(p->pid, SIGTERM);
        int st;
        for (int i = 0; i < 500; i++) {
            if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
                p->pid = 0;
                break;
            }
            usleep(10000);
        }
        if (p->pid > 0) {
            kill(p->pid, SIGKILL);
            waitpid(p->pid, &st, 0);
        }
        p->pid = 0;
    }
    if (p->dir[0]) nftw(p->dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
    p->dir[0] = 0;
}

/* ----------------------------------------------------------- KV caches */

/* Test memory mode: 0 host tensors (device -2), 1 GPU tensors (device 0). */
static int g_gpu;
static const char *g_backend = "auto";

static void *tmem_alloc(size_t n)
{
#ifdef KVS_HAVE_CUDA
    if (g_gpu) return kvs_cuda_dev_alloc(0, n);
#endif
    return malloc(n);
}

static void tmem_free(void *p)
{
#ifdef KVS_HAVE_CUDA
    if (g_gpu) {
        kvs_cuda_dev_free(p);
        return;
    }
#endif
    free(p);
}

static void tmem_put(void *dst, const void *src, size_t n)
{
#ifdef KVS_HAVE_CUDA
    if (g_gpu) {
        assert_int_equal(kvs_cuda_memcpy(dst, src, n), KVS_OK);
        return;
    }
#endif
    memcpy(dst, src, n);
}

static void tmem_get(void *dst, const void *src, size_t n)
{
#ifdef KVS_HAVE_CUDA
    if (g_gpu) {
        assert_int_equal(kvs_cuda_memcpy(dst, src, n), KVS_OK);
        return;
    }
#endif
    memcpy(dst, src, n);
}

#define TKV_MAXA 64
#define TKV_MAXT 128

typedef struct tkv {
    const char *name;
    size_t na, nt;
    uint8_t *alloc[TKV_MAXA]; /* tensor memory (host or device) */
    size_t allocsz[TKV_MAXA];
    uint8_t *shadow[TKV_MAXA]; /* host copy used for checks */
    int tens_alloc[TKV_MAXT];  /* which allocation each tensor lives in */
    kvs_tensor_layout lay[TKV_MAXT];
    uint32_t nb;
} tkv;

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void fill_random(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 0x1234567ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = rng_next(&s);
        memcpy(p + i, &v, 8);
    }
    for (; i < n; i++) p[i] = (uint8_t)rng_next(&s);
}

static int tkv_add_alloc(tkv *kv, size_t n)
{
    int a = (int)kv->na++;
    assert_true(kv->na <= TKV_MAXA);
    kv->alloc[a] = tmem_alloc(n);
    assert_non_null(kv->alloc[a]);
    kv->allocsz[a] = n;
    kv->shadow[a] = malloc(n);
    assert_non_null(kv->shadow[a]);
    return a;
}

static void tkv_add_tensor(tkv *kv, int a, uint64_t off, uint64_t block_stride,
                           uint64_t chunk_bytes, uint64_t chunk_stride, uint32_t count)
{
    size_t t = kv->nt++;
    assert_true(kv->nt <= TKV_MAXT);
    kv->tens_alloc[t] = a;
    kv->lay[t] = (kvs_tensor_layout){(uint64_t)(uintptr_t)kv->alloc[a] + off, block_stride,
                                     chunk_bytes, chunk_stride, count};
}

/* Builds a KV cache of `name` with L layers, H heads, D dims, bs tokens per
 * block, nb blocks, filled with random bytes from `seed`. */
static void tkv_make(tkv *kv, const char *name, int L, int H, int D, int bs, uint32_t nb,
                     uint64_t seed)
{
    memset(kv, 0, sizeof *kv);
    kv->name = name;
    kv->nb = nb;
    const uint64_t e = 2;
    for (int l = 0; l < L; l++) {
        if (!strcmp(name, "vllm")) {
            uint64_t blk = (uint64_t)bs * H * D * e;
            int a = tkv_add_alloc(kv, 2 * nb * blk);
            tkv_add_tensor(kv, a, 0, blk, blk, blk, 1);
            tkv_add_tensor(kv, a, nb * blk, blk, blk, blk, 1);
        } else if (!strcmp(name, "hnd")) {
            uint64_t half = (uint64_t)H * bs * D * e;
            int a = tkv_add_alloc(kv, nb * 2 * half);
            tkv_add_tensor(kv, a, 0, 2 * half, half, half, 1);
            tkv_add_tensor(kv, a, half, 2 * half, half, half, 1);
        } else if (!strcmp(name, "mla")) {
            uint64_t blk = (uint64_t)bs * D * e;
            int a = tkv_add_alloc(kv, nb * blk);
            tkv_add_tensor(kv, a, 0, blk, blk, blk, 1);
        } else if (!strcmp(name, "perhead")) {
            uint64_t tok = (uint64_t)nb * bs;
            for (int kvi = 0; kvi < 2; kvi++) {
                int a = tkv_add_alloc(kv, (uint64_t)H * tok * D * e);
                tkv_add_tensor(kv, a, 0, (uint64_t)bs * D * e, (uint64_t)bs * D * e,
                               tok * D * e, (uint32_t)H);
            }
        } else if (!strcmp(name, "odd")) {
            uint64_t blk = 5 * 37 * e;
            int a = tkv_add_alloc(kv, nb * blk + 3);
            tkv_add_tensor(kv, a, 3, blk, blk, blk, 1); /* odd base address too */
        } else {
            fail_msg("unknown layout %s", name);
        }
    }
    for (size_t a = 0; a < kv->na; a++) {
        fill_random(kv->shadow[a], kv->allocsz[a], seed * 1000 + a);
        tmem_put(kv->alloc[a], kv->shadow[a], kv->allocsz[a]);
    }
}

/* Re-reads the tensors into the shadow copies. */
static void tkv_sync(tkv *kv)
{
    for (size_t a = 0; a < kv->na; a++) tmem_get(kv->shadow[a], kv->alloc[a], kv->allocsz[a]);
}

/* Host copies of the shadows (a snapshot). */
static uint8_t **tkv_snapshot(const tkv *kv)
{
    uint8_t **s = calloc(kv->na, sizeof *s);
    assert_non_null(s);
    for (size_t a = 0; a < kv->na; a++) {
        s[a] = malloc(kv->allocsz[a]);
        assert_non_null(s[a]);
        memcpy(s[a], kv->shadow[a], kv->allocsz[a]);
    }
    return s;
}

static void tkv_snapshot_free(const tkv *kv, uint8_t **s)
{
    for (size_t a = 0; a < kv->na; a++) free(s[a]);
    free(s);
}

/* 1 if block ba of snapshot A (of cache ka) equals block bb of snapshot B
 * (of cache kb, same geometry, maybe other num_blocks), every tensor. */
static int block_equal2(const tkv *ka, uint8_t **A, uint32_t ba, const tkv *kb, uint8_t **B,
                        uint32_t bb)
{
    assert_int_equal(ka->nt, kb->nt);
    for (size_t t = 0; t < ka->nt; t++) {
        const kvs_tensor_layout *La = &ka->lay[t], *Lb = &kb->lay[t];
        int a = ka->tens_alloc[t], b = kb->tens_alloc[t];
        uint64_t offa = La->base - (uint64_t)(uintptr_t)ka->alloc[a];
        uint64_t offb = Lb->base - (uint64_t)(uintptr_t)kb->alloc[b];
        for (uint32_t c = 0; c < La->count; c++) {
            uint64_t oa = offa + ba * La->block_stride + c * La->chunk_stride;
            uint64_t ob = offb + bb * Lb->block_stride + c * Lb->chunk_stride;
            if (memcmp(A[a] + oa, B[b] + ob, La->chunk_bytes)) return 0;
        }
    }
    return 1;
}

static int block_equal(const tkv *kv, uint8_t **A, uint32_t ba, uint8_t **B, uint32_t bb)
{
    return block_equal2(kv, A, ba, kv, B, bb);
}

/* ------------------------------------------------------------- helpers */

static tpool g_pool;
static unsigned g_ns_ctr;

static void make_ns(char *out, size_t cap, const char *tag)
{
    snprintf(out, cap, "test/%s/%d/%u/%llu", tag, (int)getpid(), g_ns_ctr++,
             (unsigned long long)time(NULL));
}

static kvs_connector *open_conn(const tpool *p, const char *ns, int device,
                                const kvs_connector_opts *extra)
{
    kvs_connector_opts o = {0};
    if (extra) o = *extra;
    o.ns = ns;
    if (!o.backend) o.backend = g_backend;
    kvs_connector *c = NULL;
    char err[256] = "";
    int rc = kvs_connector_open(&p->cfg, device, &o, &c, err, sizeof err);
    if (rc != KVS_OK) fail_msg("kvs_connector_open: %s (%s)", kvs_strerror(rc), err);
    return c;
}

static int dev_id(void) { return g_gpu ? 0 : -2; }

static kvs_connector *open_kv(const tpool *p, const char *ns, tkv *kv,
                              const kvs_connector_opts *extra)
{
    kvs_connector *c = open_conn(p, ns, dev_id(), extra);
    assert_int_equal(kvs_connector_register_layout(c, kv->lay, kv->nt, kv->nb), KVS_OK);
    return c;
}

typedef struct hashes {
    uint8_t (*h)[32];
    kvs_key *k;
    size_t n;
} hashes;

static void hashes_make(hashes *hs, size_t n, uint64_t seed)
{
    hs->n = n;
    hs->h = calloc(n ? n : 1, 32);
    hs->k = calloc(n ? n : 1, sizeof *hs->k);
    assert_true(hs->h && hs->k);
    for (size_t i = 0; i < n; i++) {
        fill_random(hs->h[i], 32, seed * 7919 + i + 1);
        hs->k[i] = (kvs_key){hs->h[i], 32};
    }
}

static void hashes_free(hashes *hs)
{
    free(hs->h);
    free(hs->k);
}

/* Runs a task to completion; returns the number of KVS_OK blocks. */
/* src[i] = i, dst[i] = nb - 1 - i: load into other block ids, reversed. */
static void ids_reversed(uint32_t *src, uint32_t *dst, uint32_t n, uint32_t nb)
{
    for (uint32_t i = 0; i < n; i++) {
        src[i] = i;
        dst[i] = nb - 1 - i;
    }
}

static int run_task(kvs_task *t, int *res, size_t n)
{
    assert_non_null(t);
    assert_int_equal(kvs_task_wait(t, 60000), KVS_OK);
    assert_int_equal(kvs_task_check(t), 1);
    assert_int_equal(kvs_task_size(t), n);
    int ok = kvs_task_results(t, res, n);
    kvs_task_free(t);
    return ok;
}

static int do_dump(kvs_connector *c, const kvs_key *k, const uint32_t *ids, size_t n, int *res)
{
    kvs_task *t = NULL;
    assert_int_equal(kvs_connector_dump(c, k, ids, n, NULL, &t), KVS_OK);
    return run_task(t, res, n);
}

static int do_load(kvs_connector *c, const kvs_key *k, const uint32_t *ids, size_t n, int *res)
{
    kvs_task *t = NULL;
    assert_int_equal(kvs_connector_load(c, k, ids, n, &t), KVS_OK);
    return run_task(t, res, n);
}

/* Checks a load: blocks with res OK hold src's bytes from `before`; blocks
 * not loaded into are unchanged. */
static void check_loaded(tkv *kv, uint8_t **before, const uint32_t *src, const uint32_t *dst,
                         size_t n, const int *res)
{
    tkv_sync(kv);
    uint8_t *touched = calloc(kv->nb, 1);
    assert_non_null(touched);
    for (size_t i = 0; i < n; i++) {
        touched[dst[i]] = 1;
        if (res[i] == KVS_OK && !block_equal(kv, before, src[i], kv->shadow, dst[i]))
            fail_msg("%s: block %u loaded into %u differs", kv->name, src[i], dst[i]);
    }
    for (uint32_t b = 0; b < kv->nb; b++)
        if (!touched[b] && !block_equal(kv, before, b, kv->shadow, b))
            fail_msg("%s: block %u was not loaded into but changed", kv->name, b);
    free(touched);
}

static void tkv_free(tkv *kv)
{
    for (size_t a = 0; a < kv->na; a++) {
        tmem_free(kv->alloc[a]);
        free(kv->shadow[a]);
    }
    kv->na = kv->nt = 0;
}

/* ------------------------------------------------------------ the tests */

/* dump, lookup, load into other block ids, byte-exact, for one layout. */
static void roundtrip(const char *layout, const kvs_connector_opts *extra)
{
    tkv kv;
    const uint32_t nb = 96, n = 40;
    tkv_make(&kv, layout, 3, 4, 64, 16, nb, 11);
    char ns[128];
    make_ns(ns, sizeof ns, layout);
    kvs_connector *c = open_kv(&g_pool, ns, &kv, extra);
    uint64_t bb = kvs_connector_block_bytes(c);
    assert_true(bb > 64);
    hashes hs;
    hashes_make(&hs, n, 1);
    uint32_t src[40], dst[40];
    int res[40];
    uint8_t hit[40];
    ids_reversed(src, dst, n, nb);
    assert_int_equal(kvs_connector_lookup(c, hs.k, n, hit), KVS_OK);
    for (uint32_t i = 0; i < n; i++) assert_int_equal(hit[i], 0);
    assert_int_equal(kvs_connector_lookup_prefix(c, hs.k, n), 0);

    assert_int_equal(do_dump(c, hs.k, src, n, res), (int)n);
    assert_int_equal(kvs_connector_lookup(c, hs.k, n, hit), KVS_OK);
    for (uint32_t i = 0; i < n; i++) assert_int_equal(hit[i], 1);
    assert_int_equal(kvs_connector_lookup_prefix(c, hs.k, n), (int)n);

    uint8_t **before = tkv_snapshot(&kv);
    int nl = do_load(c, hs.k, dst, n, res);
    for (uint32_t i = 0; i < n && nl != (int)n; i++)
        if (res[i]) fprintf(stderr, "block %u: %s\n", i, kvs_errname(res[i]));
    assert_int_equal(nl, (int)n);
    check_loaded(&kv, before, src, dst, n, res);

    /* a second dump of the same hashes is skipped, not an error */
    assert_int_equal(do_dump(c, hs.k, src, n, res), (int)n);
    kvs_connector_counters ct;
    kvs_connector_get_counters(c, &ct);
    assert_int_equal(ct.dumped_blocks, n);
    assert_int_equal(ct.skipped_blocks, n);
    assert_int_equal(ct.loaded_blocks, n);
    assert_int_equal(ct.bytes_loaded, (uint64_t)n * (bb - 64));
    assert_int_equal(ct.missed_blocks, 0);
    assert_int_equal(ct.failed_blocks, 0);

    /* another connector (a restarted engine: other addresses, other
     * num_blocks) with the same ns and geometry loads them too */
    tkv kv2;
    tkv_make(&kv2, layout, 3, 4, 64, 16, nb + 8, 12);
    kvs_connector *c2 = open_kv(&g_pool, ns, &kv2, extra);
    assert_int_equal(kvs_connector_layout_fingerprint(c2), kvs_connector_layout_fingerprint(c));
    uint8_t **before2 = tkv_snapshot(&kv2);
    for (uint32_t i = 0; i < n; i++) dst[i] = nb + 7 - i;
    assert_int_equal(do_load(c2, hs.k, dst, n, res), (int)n);
    tkv_sync(&kv2);
    for (uint32_t i = 0; i < n; i++)
        assert_true(block_equal2(&kv, before, src[i], &kv2, kv2.shadow, dst[i]));
    (void)before2;
    tkv_snapshot_free(&kv2, before2);
    kvs_connector_close(c2);
    tkv_free(&kv2);

    tkv_snapshot_free(&kv, before);
    kvs_connector_close(c);
    hashes_free(&hs);
    tkv_free(&kv);
}

static void test_layout_vllm(void **s) { (void)s; roundtrip("vllm", NULL); }
static void test_layout_hnd(void **s) { (void)s; roundtrip("hnd", NULL); }
static void test_layout_mla(void **s) { (void)s; roundtrip("mla", NULL); }
static void test_layout_perhead(void **s) { (void)s; roundtrip("perhead", NULL); }
static void test_layout_odd(void **s) { (void)s; roundtrip("odd", NULL); }

static void test_staging_path(void **s)
{
    (void)s;
    kvs_connector_opts o = {.force_staging = 1};
    roundtrip("vllm", &o);
    roundtrip("perhead", &o);
    roundtrip("odd", &o); /* objects of 1,174 bytes: staging keeps them aligned */
}

static void test_checksum_roundtrip(void **s)
{
    (void)s;
    kvs_connector_opts o = {.checksum = 1};
    roundtrip("hnd", &o);
}

/* Partial prefix hits and misses in one load. */
static void test_prefix_and_misses(void **s)
{
    (void)s;
    tkv kv;
    const uint32_t nb = 64, n = 20;
    tkv_make(&kv, "vllm", 2, 2, 32, 16, nb, 21);
    char ns[128];
    make_ns(ns, sizeof ns, "prefix");
    kvs_connector *c = open_kv(&g_pool, ns, &kv, NULL);
    hashes hs;
    hashes_make(&hs, n, 2);
    uint32_t src[20], dst[20];
    int res[20];
    uint8_t hit[20];
    for (uint32_t i = 0; i < n; i++) {
        src[i] = i;
        dst[i] = 32 + i;
    }
    /* store blocks 0..7 and 10: prefix 8, hole at 8..9 */
    assert_int_equal(do_dump(c, hs.k, src, 8, res), 8);
    assert_int_equal(do_dump(c, hs.k + 10, src + 10, 1, res), 1);
    assert_int_equal(kvs_connector_lookup_prefix(c, hs.k, n), 8);
    assert_int_equal(kvs_connector_lookup(c, hs.k, n, hit), KVS_OK);
    for (uint32_t i = 0; i < n; i++) assert_int_equal(hit[i], i < 8 || i == 10);
    assert_int_equal(kvs_connector_lookup_prefix(c, hs.k, 0), 0);

    uint8_t **before = tkv_snapshot(&kv);
    assert_int_equal(do_load(c, hs.k, dst, n, res), 9);
    for (uint32_t i = 0; i < n; i++)
        assert_int_equal(res[i], (i < 8 || i == 10) ? KVS_OK : KVS_ERR_NOT_FOUND);
    check_loaded(&kv, before, src, dst, n, res);
    kvs_connector_counters ct;
    kvs_connector_get_counters(c, &ct);
    assert_int_equal(ct.missed_blocks, n - 9);

    /* another namespace sees nothing */
    char ns2[128];
    make_ns(ns2, sizeof ns2, "prefix-other");
    kvs_connector *o = open_conn(&g_pool, ns2, -1, NULL);
    assert_int_equal(kvs_connector_lookup_prefix(o, hs.k, n), 0);
    kvs_connector_close(o);

    tkv_snapshot_free(&kv, before);
    kvs_connector_close(c);
    hashes_free(&hs);
    tkv_free(&kv);
}

/* Blocks removed by another client between lookup and load become misses. */
static void test_removed_between_lookup_and_load(void **s)
{
    (void)s;
    tkv kv;
    const uint32_t nb = 64, n = 24;
    tkv_make(&kv, "perhead", 2, 4, 32, 16, nb, 31);
    char ns[128];
    make_ns(ns, sizeof ns, "removed");
    kvs_connector *c = open_kv(&g_pool, ns, &kv, NULL);
    hashes hs;
    hashes_make(&hs, n, 3);
    uint32_t src[24], dst[24];
    int res[24];
    for (uint32_t i = 0; i < n; i++) {
        src[i] = i;
        dst[i] = 63 - i;
    }
    assert_int_equal(do_dump(c, hs.k, src, n, res), (int)n);
    assert_int_equal(kvs_connector_lookup_prefix(c, hs.k, n), (int)n);

    kvs_client *other = NULL;
    char err[256];
    assert_int_equal(kvs_client_open(&g_pool.cfg, &other, err, sizeof err), KVS_OK);
    int removed = 0;
    for (uint32_t i = 0; i < n; i += 3) {
        uint8_t key[KVS_CONNECTOR_PREFIX_BYTES + KVS_HASH_MAX];
        int kl = kvs_connector_store_key(ns, 1, 0, &hs.k[i], key, sizeof key);
        assert_int_equal(kl, KVS_CONNECTOR_PREFIX_BYTES + 32);
        assert_int_equal(kvs_remove(other, key, (uint32_t)kl), KVS_OK);
        removed++;
    }
    uint8_t **before = tkv_snapshot(&kv);
    assert_int_equal(do_load(c, hs.k, dst, n, res), (int)n - removed);
    for (uint32_t i = 0; i < n; i++)
        assert_int_equal(res[i], i % 3 == 0 ? KVS_ERR_NOT_FOUND : KVS_OK);
    check_loaded(&kv, before, src, dst, n, res);
    assert_int_equal(kvs_connector_lookup_prefix(c, hs.k, n), 0);

    tkv_snapshot_free(&kv, before);
    kvs_client_close(other);
    kvs_connector_close(c);
    hashes_free(&hs);
    tkv_free(&kv);
}

/* Objects that are not what the header says are misses, never loaded:
 * garbage under the key, a header from another layout, a corrupted payload
 * (caught with checksums). */
static void test_bad_objects_are_misses(void **s)
{
    (void)s;
    tkv kv;
    const uint32_t nb = 32, n = 4;
    tkv_make(&kv, "vllm", 2, 2, 32, 16, nb, 41);
    char ns[128];
    make_ns(ns, sizeof ns, "bad");
    kvs_connector_opts o = {.checksum = 1};
    kvs_connector *c = open_kv(&g_pool, ns, &kv, &o);
    uint64_t bb = kvs_connector_block_bytes(c);
    hashes hs;
    hashes_make(&hs, n, 4);
    uint32_t src[4] = {0, 1, 2, 3}, dst[4] = {20, 21, 22, 23};
    int res[4];
    assert_int_equal(do_dump(c, hs.k, src, n, res), (int)n);

    kvs_client *other = NULL;
    char err[256];
    assert_int_equal(kvs_client_open(&g_pool.cfg, &other, err, sizeof err), KVS_OK);
    uint8_t key[4][KVS_CONNECTOR_PREFIX_BYTES + KVS_HASH_MAX];
    int kl[4];
    for (int i = 0; i < 4; i++) kl[i] = kvs_connector_store_key(ns, 1, 0, &hs.k[i], key[i], sizeof key[i]);
    uint8_t *obj = malloc(bb), *garbage = malloc(bb);
    assert_true(obj && garbage);
    fill_random(garbage, bb, 99);
    uint64_t sz = 0;
    /* 0: garbage of the right size */
    assert_int_equal(kvs_remove(other, key[0], kl[0]), KVS_OK);
    assert_int_equal(kvs_put(other, key[0], kl[0], garbage, bb), KVS_OK);
    /* 1: the object of block 1 stored under key 2's name (key stamp mismatch) */
    assert_int_equal(kvs_get(other, key[1], kl[1], obj, bb, &sz), KVS_OK);
    assert_int_equal(sz, bb);
    assert_int_equal(kvs_remove(other, key[2], kl[2]), KVS_OK);
    assert_int_equal(kvs_put(other, key[2], kl[2], obj, bb), KVS_OK);
    /* 3: one payload byte flipped (checksum mismatch) */
    assert_int_equal(kvs_get(other, key[3], kl[3], obj, bb, &sz), KVS_OK);
    obj[bb - 1] ^= 0x5a;
    assert_int_equal(kvs_remove(other, key[3], kl[3]), KVS_OK);
    assert_int_equal(kvs_put(other, key[3], kl[3], obj, bb), KVS_OK);

    uint8_t **before = tkv_snapshot(&kv);
    assert_int_equal(do_load(c, hs.k, dst, n, res), 1);
    assert_int_equal(res[0], KVS_ERR_NOT_FOUND);
    assert_int_equal(res[1], KVS_OK);
    assert_int_equal(res[2], KVS_ERR_NOT_FOUND);
    assert_int_equal(res[3], KVS_ERR_NOT_FOUND);
    check_loaded(&kv, before, src, dst, n, res);
    tkv_snapshot_free(&kv, before);

    /* a connector with the same ns but another layout: its blocks are
     * misses for us (size or fingerprint), ours for it */
    tkv kv2;
    tkv_make(&kv2, "perhead", 2, 2, 32, 16, nb, 42); /* same bytes per block, other layout */
    kvs_connector *c2 = open_kv(&g_pool, ns, &kv2, NULL);
    assert_int_equal(kvs_connector_block_bytes(c2), bb);
    assert_true(kvs_connector_layout_fingerprint(c2) != kvs_connector_layout_fingerprint(c));
    assert_int_equal(do_load(c2, hs.k + 1, dst, 1, res), 0);
    assert_int_equal(res[0], KVS_ERR_NOT_FOUND);
    kvs_connector_close(c2);
    tkv_free(&kv2);

    free(obj);
    free(garbage);
    kvs_client_close(other);
    kvs_connector_close(c);
    hashes_free(&hs);
    tkv_free(&kv);
}

/* A lookup-only client (scheduler) with world_size 2 hits only blocks that
 * every rank stored. */
static void test_lookup_only_all_ranks(void **s)
{
    (void)s;
    tkv kv0, kv1;
    const uint32_t nb = 32, n = 10;
    tkv_make(&kv0, "mla", 2, 1, 64, 16, nb, 51);
    tkv_make(&kv1, "mla", 2, 1, 64, 16, nb, 52);
    char ns[128];
    make_ns(ns, sizeof ns, "tp");
    kvs_connector_opts o0 = {.world_size = 2, .rank = 0}, o1 = {.world_size = 2, .rank = 1};
    kvs_connector *r0 = open_kv(&g_pool, ns, &kv0, &o0);
    kvs_connector *r1 = open_kv(&g_pool, ns, &kv1, &o1);
    kvs_connector_opts ol = {.world_size = 2};
    kvs_connector *sched = open_conn(&g_pool, ns, -1, &ol);
    assert_string_equal(kvs_connector_backend(sched), "none");
    assert_int_equal(kvs_connector_block_bytes(sched), 0);
    hashes hs;
    hashes_make(&hs, n, 5);
    uint32_t ids[10];
    int res[10];
    uint8_t hit[10];
    for (uint32_t i = 0; i < n; i++) ids[i] = i;
    assert_int_equal(do_dump(r0, hs.k, ids, n, res), (int)n);
    assert_int_equal(do_dump(r1, hs.k, ids, 6, res), 6);
    assert_int_equal(kvs_connector_lookup(sched, hs.k, n, hit), KVS_OK);
    for (uint32_t i = 0; i < n; i++) assert_int_equal(hit[i], i < 6);
    assert_int_equal(kvs_connector_lookup_prefix(sched, hs.k, n), 6);
    /* each rank sees its own blocks only */
    assert_int_equal(kvs_connector_lookup_prefix(r0, hs.k, n), (int)n);
    assert_int_equal(kvs_connector_lookup_prefix(r1, hs.k, n), 6);
    /* rank 1 cannot load rank 0's blocks */
    uint32_t dst[4] = {20, 21, 22, 23};
    assert_int_equal(do_load(r1, hs.k + 6, dst, 4, res), 0);
    /* the scheduler cannot dump, load or take a layout */
    kvs_task *t = NULL;
    assert_int_equal(kvs_connector_dump(sched, hs.k, ids, 1, NULL, &t), KVS_ERR_UNSUPPORTED);
    assert_int_equal(kvs_connector_load(sched, hs.k, ids, 1, &t), KVS_ERR_UNSUPPORTED);
    assert_null(t);
    assert_int_equal(kvs_connector_register_layout(sched, kv0.lay, kv0.nt, nb),
                     KVS_ERR_UNSUPPORTED);
    /* store keys are reproducible and differ per rank */
    uint8_t k0[80], k1[80];
    assert_int_equal(kvs_connector_store_key(ns, 2, 0, &hs.k[0], k0, sizeof k0), 48);
    assert_int_equal(kvs_connector_store_key(ns, 2, 1, &hs.k[0], k1, sizeof k1), 48);
    assert_memory_not_equal(k0, k1, 16);
    assert_memory_equal(k0 + 16, hs.h[0], 32);
    assert_int_equal(kvs_connector_store_key(ns, 2, 2, &hs.k[0], k1, sizeof k1), KVS_ERR_INVALID);
    assert_int_equal(kvs_connector_store_key(ns, 2, 0, &hs.k[0], k1, 40), KVS_ERR_TOO_LARGE);
    kvs_connector_close(sched);
    kvs_connector_close(r0);
    kvs_connector_close(r1);
    hashes_free(&hs);
    tkv_free(&kv0);
    tkv_free(&kv1);
}

static void test_invalid_arguments(void **s)
{
    (void)s;
    tkv kv;
    tkv_make(&kv, "vllm", 1, 1, 16, 16, 8, 61);
    char ns[128];
    make_ns(ns, sizeof ns, "invalid");
    kvs_connector *c = open_conn(&g_pool, ns, dev_id(), NULL);
    hashes hs;
    hashes_make(&hs, 2, 6);
    uint32_t ids[2] = {0, 1}, bad[2] = {0, 8};
    kvs_task *t = NULL;
    uint8_t hit[2];
    /* no layout yet */
    assert_int_equal(kvs_connector_block_bytes(c), 0);
    assert_int_equal(kvs_connector_dump(c, hs.k, ids, 2, NULL, &t), KVS_ERR_LAYOUT);
    assert_int_equal(kvs_connector_load(c, hs.k, ids, 2, &t), KVS_ERR_LAYOUT);
    assert_int_equal(kvs_connector_register_layout(c, kv.lay, 0, 8), KVS_ERR_INVALID);
    kvs_tensor_layout z = kv.lay[0];
    z.chunk_bytes = 0;
    assert_int_equal(kvs_connector_register_layout(c, &z, 1, 8), KVS_ERR_INVALID);
    assert_int_equal(kvs_connector_register_layout(c, kv.lay, kv.nt, 8), KVS_OK);
    assert_int_equal(kvs_connector_register_layout(c, kv.lay, kv.nt, 8), KVS_ERR_INVALID);
    /* block id out of range, bad hashes */
    assert_int_equal(kvs_connector_dump(c, hs.k, bad, 2, NULL, &t), KVS_ERR_LAYOUT);
    assert_int_equal(kvs_connector_load(c, hs.k, bad, 2, &t), KVS_ERR_LAYOUT);
    kvs_key longk = {hs.h[0], KVS_HASH_MAX + 1}, zk = {hs.h[0], 0};
    assert_int_equal(kvs_connector_dump(c, &longk, ids, 1, NULL, &t), KVS_ERR_INVALID);
    assert_int_equal(kvs_connector_lookup(c, &zk, 1, hit), KVS_ERR_INVALID);
    assert_int_equal(kvs_connector_lookup(c, hs.k, 1, NULL), KVS_ERR_INVALID);
    assert_int_equal(kvs_connector_dump(NULL, hs.k, ids, 1, NULL, &t), KVS_ERR_INVALID);
    if (!g_gpu) {
        int ev = 0;
        assert_int_equal(kvs_connector_dump(c, hs.k, ids, 1, &ev, &t), KVS_ERR_INVALID);
    }
    /* an empty task finishes at once */
    assert_int_equal(kvs_connector_dump(c, hs.k, ids, 0, NULL, &t), KVS_OK);
    assert_int_equal(kvs_task_wait(t, 0), KVS_OK);
    assert_int_equal(kvs_task_results(t, NULL, 0), 0);
    kvs_task_free(t);
    kvs_task_free(NULL);
    assert_int_equal(kvs_task_wait(NULL, 0), KVS_ERR_INVALID);
    kvs_connector_close(c);
    kvs_connector_close(NULL);

    /* open: bad options */
    kvs_connector_opts o = {0};
    char err[256];
    kvs_connector *x = NULL;
    assert_int_equal(kvs_connector_open(&g_pool.cfg, -2, &o, &x, err, sizeof err),
                     KVS_ERR_INVALID);
    o.ns = ns;
    o.rank = 2;
    o.world_size = 2;
    assert_int_equal(kvs_connector_open(&g_pool.cfg, -2, &o, &x, err, sizeof err),
                     KVS_ERR_INVALID);
    o.rank = 0;
    o.backend = "bogus";
    assert_int_equal(kvs_connector_open(&g_pool.cfg, -2, &o, &x, err, sizeof err),
                     KVS_ERR_CONFIG);
    assert_true(strlen(err) > 0);
    o.backend = "cuda-kernel";
    assert_int_equal(kvs_connector_open(&g_pool.cfg, -2, &o, &x, err, sizeof err),
                     KVS_ERR_CONFIG);
    o.backend = "host";
    assert_int_equal(kvs_connector_open(&g_pool.cfg, 0, &o, &x, err, sizeof err),
                     KVS_ERR_CONFIG);
    assert_null(x);
    hashes_free(&hs);
    tkv_free(&kv);
}

/* Many tasks from many threads at once, dumps and loads interleaved. */
typedef struct thr_arg {
    kvs_connector *c;
    tkv *kv;
    uint8_t **orig;
    int idx;
    int failures;
} thr_arg;

#define THR_N 6
#define THR_BLOCKS 8

static void *thr_main(void *p)
{
    thr_arg *a = p;
    hashes hs;
    hs.n = THR_BLOCKS;
    uint8_t h[THR_BLOCKS][32];
    kvs_key k[THR_BLOCKS];
    uint32_t src[THR_BLOCKS], dst[THR_BLOCKS];
    int res[THR_BLOCKS];
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < THR_BLOCKS; i++) {
            fill_random(h[i], 32, (uint64_t)a->idx * 100000 + (uint64_t)round * 100 + i + 777);
            k[i] = (kvs_key){h[i], 32};
            src[i] = (uint32_t)(a->idx * THR_BLOCKS + i);                      /* 0..47 */
            dst[i] = (uint32_t)(THR_N * THR_BLOCKS + a->idx * THR_BLOCKS + i); /* 48..95 */
        }
        /* several tasks in flight from this thread */
        kvs_task *t1 = NULL, *t2 = NULL;
        if (kvs_connector_dump(a->c, k, src, THR_BLOCKS / 2, NULL, &t1) ||
            kvs_connector_dump(a->c, k + THR_BLOCKS / 2, src + THR_BLOCKS / 2, THR_BLOCKS / 2,
                               NULL, &t2)) {
            a->failures++;
            break;
        }
        if (kvs_task_wait(t1, -1) || kvs_task_wait(t2, -1) ||
            kvs_task_results(t1, res, THR_BLOCKS) != THR_BLOCKS / 2 ||
            kvs_task_results(t2, res, THR_BLOCKS) != THR_BLOCKS / 2)
            a->failures++;
        kvs_task_free(t1);
        kvs_task_free(t2);
        kvs_task *t = NULL;
        if (kvs_connector_load(a->c, k, dst, THR_BLOCKS, &t) || kvs_task_wait(t, -1) ||
            kvs_task_results(t, res, THR_BLOCKS) != THR_BLOCKS)
            a->failures++;
        kvs_task_free(t);
    }
    (void)hs;
    return NULL;
}

static void test_concurrent_tasks(void **s)
{
    (void)s;
    tkv kv;
    const uint32_t nb = 2 * THR_N * THR_BLOCKS;
    tkv_make(&kv, "hnd", 2, 2, 32, 16, nb, 71);
    char ns[128];
    make_ns(ns, sizeof ns, "concurrent");
    kvs_connector_opts o = {.num_workers = 4};
    kvs_connector *c = open_kv(&g_pool, ns, &kv, &o);
    uint8_t **orig = tkv_snapshot(&kv);
    pthread_t th[THR_N];
    thr_arg args[THR_N];
    for (int i = 0; i < THR_N; i++) {
        args[i] = (thr_arg){c, &kv, orig, i, 0};
        assert_int_equal(pthread_create(&th[i], NULL, thr_main, &args[i]), 0);
    }
    for (int i = 0; i < THR_N; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(args[i].failures, 0);
    }
    /* after the last round every dst block holds its src block */
    tkv_sync(&kv);
    for (uint32_t b = 0; b < THR_N * THR_BLOCKS; b++) {
        assert_true(block_equal(&kv, orig, b, kv.shadow, b + THR_N * THR_BLOCKS));
        assert_true(block_equal(&kv, orig, b, kv.shadow, b));
    }
    kvs_connector_counters ct;
    kvs_connector_get_counters(c, &ct);
    assert_int_equal(ct.dumped_blocks, 4 * THR_N * THR_BLOCKS);
    assert_int_equal(ct.loaded_blocks, 4 * THR_N * THR_BLOCKS);
    tkv_snapshot_free(&kv, orig);
    kvs_connector_close(c);
    tkv_free(&kv);
}

/* A large cache used by the timeout / close tests: many bytes per task. */
static void big_kv(tkv *kv, uint32_t nb) { tkv_make(kv, "vllm", 8, 8, 64, 16, nb, 81); }

static void test_wait_timeout(void **s)
{
    (void)s;
    tkv kv;
    const uint32_t nb = 256;
    big_kv(&kv, nb); /* 256 KiB per block object, 64 MiB in all */
    char ns[128];
    make_ns(ns, sizeof ns, "timeout");
    kvs_connector_opts o = {.num_workers = 1};
    kvs_connector *c = open_kv(&g_pool, ns, &kv, &o);
    hashes hs;
    hashes_make(&hs, nb, 8);
    uint32_t *ids = calloc(nb, sizeof *ids);
    for (uint32_t i = 0; i < nb; i++) ids[i] = i;
    kvs_task *big = NULL, *small = NULL;
    assert_int_equal(kvs_connector_dump(c, hs.k, ids, nb - 1, NULL, &big), KVS_OK);
    assert_int_equal(kvs_connector_dump(c, hs.k + nb - 1, ids + nb - 1, 1, NULL, &small), KVS_OK);
    /* the small task is queued behind the big one on the only worker */
    uint64_t t0 = (uint64_t)time(NULL);
    assert_int_equal(kvs_task_wait(small, 0), KVS_ERR_TIMEOUT);
    assert_int_equal(kvs_task_check(small), 0);
    assert_int_equal(kvs_task_results(small, NULL, 0), KVS_ERR_BUSY);
    assert_int_equal(kvs_task_wait(small, 1), KVS_ERR_TIMEOUT);
    assert_int_equal(kvs_task_wait(small, -1), KVS_OK);
    assert_int_equal(kvs_task_wait(big, 60000), KVS_OK);
    assert_true((uint64_t)time(NULL) - t0 < 60);
    assert_int_equal(kvs_task_results(big, NULL, 0), (int)nb - 1);
    assert_int_equal(kvs_task_results(small, NULL, 0), 1);
    kvs_task_free(big);
    kvs_task_free(small);
    kvs_connector_close(c);
    free(ids);
    hashes_free(&hs);
    tkv_free(&kv);
}

/* Closing with tasks queued and running: no hang, no leak, every task ends
 * with OK or KVS_ERR_CLOSED per block; tasks outlive the connector; a task
 * freed while running is fine. */
static void test_close_in_flight(void **s)
{
    (void)s;
    tkv kv;
    const uint32_t nb = 256;
    big_kv(&kv, nb);
    for (int variant = 0; variant < 3; variant++) {
        char ns[128];
        make_ns(ns, sizeof ns, "close");
        kvs_connector_opts o = {.num_workers = 2};
        kvs_connector *c = open_kv(&g_pool, ns, &kv, &o);
        hashes hs;
        hashes_make(&hs, nb, 9 + variant);
        uint32_t *ids = calloc(nb, sizeof *ids);
        for (uint32_t i = 0; i < nb; i++) ids[i] = i;
        kvs_task *t[8] = {0};
        for (int i = 0; i < 4; i++)
            assert_int_equal(kvs_connector_dump(c, hs.k + i * 64, ids + i * 64, 64, NULL, &t[i]),
                             KVS_OK);
        if (variant >= 1)
            for (int i = 4; i < 8; i++)
                assert_int_equal(
                    kvs_connector_load(c, hs.k + (i - 4) * 64, ids + (i - 4) * 64, 64, &t[i]),
                    KVS_OK);
        if (variant == 2) { /* free some while running */
            kvs_task_free(t[1]);
            kvs_task_free(t[5]);
            t[1] = t[5] = NULL;
        }
        kvs_connector_close(c);
        for (int i = 0; i < 8; i++) {
            if (!t[i]) continue;
            assert_int_equal(kvs_task_wait(t[i], 0), KVS_OK);
            int res[64];
            kvs_task_results(t[i], res, 64);
            for (int b = 0; b < 64; b++)
                assert_true(res[b] == KVS_OK || res[b] == KVS_ERR_CLOSED ||
                            res[b] == KVS_ERR_NOT_FOUND);
            kvs_task_free(t[i]);
        }
        free(ids);
        hashes_free(&hs);
    }
    tkv_free(&kv);
}

/* Bounded queue: with drop_when_full dumps over max_inflight are dropped and
 * counted; without, the caller waits and everything is stored. */
static void test_backpressure(void **s)
{
    (void)s;
    tkv kv;
    const uint32_t nb = 128;
    big_kv(&kv, nb);
    hashes hs;
    hashes_make(&hs, nb, 10);
    uint32_t *ids = calloc(nb, sizeof *ids);
    for (uint32_t i = 0; i < nb; i++) ids[i] = i;
    for (int drop = 0; drop < 2; drop++) {
        char ns[128];
        make_ns(ns, sizeof ns, drop ? "drop" : "block");
        kvs_connector_opts o = {.num_workers = 1, .max_inflight = 4, .drop_when_full = drop};
        kvs_connector *c = open_kv(&g_pool, ns, &kv, &o);
        kvs_task *t[32];
        for (int i = 0; i < 32; i++)
            assert_int_equal(kvs_connector_dump(c, hs.k + i * 4, ids + i * 4, 4, NULL, &t[i]),
                             KVS_OK);
        int stored = 0, busy = 0;
        for (int i = 0; i < 32; i++) {
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
            assert_int_equal(stored + busy, (int)nb);
        } else {
            assert_int_equal(busy, 0);
            assert_int_equal(stored, (int)nb);
            assert_int_equal(ct.dropped_blocks, 0);
        }
        assert_int_equal(kvs_connector_lookup_prefix(c, hs.k, nb) >= (drop ? 4 : (int)nb), 1);
        kvs_connector_close(c);
    }
    free(ids);
    hashes_free(&hs);
    tkv_free(&kv);
}

/* A pool too small for everything: old blocks are evicted; loads of them
 * are misses and every block reported loaded is byte-exact. */
static void test_eviction_makes_misses(void **s)
{
    (void)s;
    tpool small;
    assert_int_equal(pool_start(&small, 24ull << 20, NULL), 0);
    tkv kv;
    const uint32_t nb = 256;
    big_kv(&kv, nb); /* 256 KiB objects: 24 MiB holds < 96 */
    char ns[128];
    make_ns(ns, sizeof ns, "evict");
    kvs_connector *c = open_kv(&small, ns, &kv, NULL);
    hashes hs;
    hashes_make(&hs, nb, 12);
    uint32_t *ids = calloc(nb, sizeof *ids), *dst = calloc(nb, sizeof *dst);
    int *res = calloc(nb, sizeof *res);
    for (uint32_t i = 0; i < nb; i++) ids[i] = i;
    /* A = blocks 0..31 dumped first, then B = 32..159 fills the pool */
    assert_int_equal(do_dump(c, hs.k, ids, 32, res), 32);
    int okb = do_dump(c, hs.k + 32, ids + 32, 128, res);
    assert_true(okb > 0);
    for (uint32_t i = 0; i < 32; i++) dst[i] = 200 + i;
    uint8_t **before = tkv_snapshot(&kv);
    int loaded = do_load(c, hs.k, dst, 32, res);
    assert_true(loaded < 32); /* at least some of A was evicted */
    check_loaded(&kv, before, ids, dst, 32, res);
    for (uint32_t i = 0; i < 32; i++) assert_true(res[i] == KVS_OK || res[i] == KVS_ERR_NOT_FOUND);
    tkv_snapshot_free(&kv, before);
    kvs_connector_close(c);
    free(ids);
    free(dst);
    free(res);
    hashes_free(&hs);
    tkv_free(&kv);
    pool_stop(&small);
}

static int group_setup(void **s)
{
    (void)s;
    setenv("KVSHELF_CONNECTOR_JOB_MB", "1", 1); /* several jobs per task */
    return pool_start(&g_pool, 512ull << 20, NULL);
}

static int group_teardown(void **s)
{
    (void)s;
    pool_stop(&g_pool);
    return 0;
}

/* kvs_task_gpu_wait: a CUDA load gates the caller's stream (once per
 * task) and loads the same bytes; a host connector has no GPU to gate. */
static void test_gpu_wait(void **s)
{
    (void)s;
    tkv kv;
    const uint32_t nb = 64, n = 24;
    tkv_make(&kv, "vllm", 4, 2, 64, 16, nb, 31);
    char ns[128];
    make_ns(ns, sizeof ns, "gate");
    kvs_connector *c = open_kv(&g_pool, ns, &kv, NULL);
    hashes hs;
    hashes_make(&hs, n, 77);
    uint32_t src[24], dst[24];
    int res[24];
    ids_reversed(src, dst, n, nb);
    assert_int_equal(do_dump(c, hs.k, src, n, res), (int)n);
    uint8_t **before = tkv_snapshot(&kv);
    kvs_task *t = NULL;
    assert_int_equal(kvs_connector_load(c, hs.k, dst, n, &t), KVS_OK);
    if (g_gpu) {
        /* the legacy default stream is refused (test_connector_gpu.c gates real streams) */
        assert_int_equal(kvs_task_gpu_wait(t, NULL), KVS_ERR_INVALID);
    } else {
        assert_int_equal(kvs_task_gpu_wait(t, NULL), KVS_ERR_UNSUPPORTED);
    }
    assert_int_equal(kvs_task_gpu_wait(NULL, NULL), KVS_ERR_INVALID);
    assert_int_equal(run_task(t, res, n), (int)n);
    check_loaded(&kv, before, src, dst, n, res);
    /* a finished task gates nothing */
    assert_int_equal(kvs_connector_load(c, hs.k, dst, n, &t), KVS_OK);
    assert_int_equal(kvs_task_wait(t, 60000), KVS_OK);
    assert_int_equal(kvs_task_gpu_wait(t, NULL), g_gpu ? KVS_ERR_INVALID : KVS_ERR_UNSUPPORTED);
    assert_int_equal(kvs_task_results(t, res, n), (int)n);
    kvs_task_free(t);
    tkv_snapshot_free(&kv, before);
    hashes_free(&hs);
    kvs_connector_close(c);
    tkv_free(&kv);
}

#define CONNECTOR_COMMON_TESTS                                                               \
    cmocka_unit_test(test_layout_vllm), cmocka_unit_test(test_layout_hnd),                   \
        cmocka_unit_test(test_layout_mla), cmocka_unit_test(test_layout_perhead),            \
        cmocka_unit_test(test_layout_odd), cmocka_unit_test(test_staging_path),              \
        cmocka_unit_test(test_checksum_roundtrip), cmocka_unit_test(test_prefix_and_misses), \
        cmocka_unit_test(test_removed_between_lookup_and_load),                              \
        cmocka_unit_test(test_bad_objects_are_misses),                                       \
        cmocka_unit_test(test_lookup_only_all_ranks), cmocka_unit_test(test_invalid_arguments), \
        cmocka_unit_test(test_concurrent_tasks), cmocka_unit_test(test_wait_timeout),        \
        cmocka_unit_test(test_close_in_flight), cmocka_unit_test(test_backpressure),         \
        cmocka_unit_test(test_eviction_makes_misses), cmocka_unit_test(test_gpu_wait)

#endif
