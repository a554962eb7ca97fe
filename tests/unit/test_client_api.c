/* The client API against a real `kvshelf master` (KVSHELF_BIN): put/get of
 * many sizes byte-exact (same-host shared memory and, with KVSHELF_NO_SHM,
 * the TCP transfer engine incl. values split into chunks), batches,
 * exists/remove, registered memory, zero-copy slots, stats, counters,
 * many threads, and a storage node that dies. */
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "client/client_ext.h"
#include "client/client_internal.h"
#include "kvshelf/kvshelf.h"
#include "test_proc_util.h"

/* ---- helpers: processes ---- */

/* Starts `kvshelf master` on 127.0.0.1:port (0 = any) with extra args. */
static int start_master(proc *p, int port, const char *extra1, const char *extra2)
{
    const char *extra[] = {extra1, extra1 ? extra2 : NULL, NULL};
    return start_master_argv(p, port, extra);
}

static kvs_client *open_client(const proc *m, uint64_t seg)
{
    kvs_config cfg;
    kvs_config_init(&cfg);
    master_addr(m, cfg.master_server_address, sizeof cfg.master_server_address);
    cfg.global_segment_size = seg;
    cfg.timeout_ms = 2000;
    char err[512] = "";
    kvs_client *c = NULL;
    int rc = kvs_client_open(&cfg, &c, err, sizeof err);
    if (rc) fprintf(stderr, "open: %s (%s)\n", err, kvs_errname(rc));
    assert_int_equal(rc, KVS_OK);
    return c;
}

static void fill(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 12345;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (uint8_t)(x >> 11);
    }
}

/* ---- fixture: a master and one client with a segment ---- */

typedef struct fix {
    proc m;
    proc node; /* killed by teardown if a test leaves it running */
    proc m2;   /* a second master (test_node_dies) */
    kvs_client *c;
} fix;

static int setup(void **state)
{
    fix *f = calloc(1, sizeof *f);
    assert_int_equal(start_master(&f->m, 0, NULL, NULL), 0);
    f->c = open_client(&f->m, 256ull << 20);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fix *f = *state;
    kvs_client_close(f->c);
    stop_proc(&f->node, SIGKILL);
    stop_proc(&f->m2, SIGTERM);
    stop_proc(&f->m, SIGTERM);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", f->m.dir);
    if (system(cmd)) {
    }
    free(f);
    return 0;
}

static const uint64_t sizes[] = {1, 2, 100, 4095, 4096, 4097, 65536, 1000000, 4194304, 4194305,
                                 9000001};

static void round_trips(kvs_client *put_c, kvs_client *get_c, const char *prefix)
{
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        uint64_t n = sizes[i];
        uint8_t *in = malloc(n), *out = malloc(n + 16);
        fill(in, n, i + 7);
        char key[64];
        int kl = snprintf(key, sizeof key, "%s-%zu", prefix, i);
        assert_int_equal(kvs_put(put_c, key, (uint32_t)kl, in, n), KVS_OK);
        uint64_t size = 0;
        memset(out, 0xEE, n + 16);
        assert_int_equal(kvs_get(get_c, key, (uint32_t)kl, out, n + 16, &size), KVS_OK);
        assert_int_equal(size, n);
        assert_memory_equal(in, out, n);
        assert_int_equal(out[n], 0xEE); /* nothing written past the value */
        /* buffer too small: size still reported */
        if (n > 1) {
            size = 0;
            assert_int_equal(kvs_get(get_c, key, (uint32_t)kl, out, n - 1, &size),
                             KVS_ERR_TOO_LARGE);
            assert_int_equal(size, n);
        }
        assert_int_equal(kvs_exists(get_c, key, (uint32_t)kl), 1);
        free(in);
        free(out);
    }
}

static void test_put_get_sizes(void **state)
{
    fix *f = *state;
    round_trips(f->c, f->c, "same");
    /* a second client (no segment) reads and writes through shared memory */
    kvs_client *b = open_client(&f->m, 0);
    round_trips(b, f->c, "b2a");
    round_trips(f->c, b, "a2b");
    kvs_client_close(b);
}

static void test_tcp_path(void **state)
{
    fix *f = *state;
    /* KVSHELF_NO_SHM: this client maps nothing, so bytes go over TCP to the
     * transfer server of f->c, with values split into 4 MiB chunks */
    setenv("KVSHELF_NO_SHM", "1", 1);
    kvs_client *b = open_client(&f->m, 0);
    unsetenv("KVSHELF_NO_SHM");
    round_trips(b, f->c, "tcp-w");
    round_trips(f->c, b, "tcp-r");
    /* a zero-copy slot over TCP has no pointer; slot_read/write move bytes */
    kvs_key k = {"slot-tcp", 8};
    uint64_t sz = 5u << 20;
    kvs_slot s;
    assert_int_equal(kvs_reserve_batch(b, &k, &sz, 1, &s), 1);
    assert_null(s.ptr);
    uint8_t *in = malloc(sz), *out = malloc(sz);
    fill(in, sz, 3);
    assert_int_equal(kvs_slot_write(b, &s, 0, in, 1000), KVS_OK);
    assert_int_equal(kvs_slot_write(b, &s, 1000, in + 1000, sz - 1000), KVS_OK);
    assert_int_equal(kvs_slot_write(b, &s, sz - 1, in, 2), KVS_ERR_INVALID);
    assert_int_equal(kvs_commit_batch(b, &k, &s, NULL, 1, NULL), 1);
    kvs_slot r;
    assert_int_equal(kvs_acquire_batch(b, &k, 1, &r), 1);
    assert_null(r.ptr);
    assert_int_equal(r.size, sz);
    assert_int_equal(kvs_slot_read(b, &r, 0, out, sz), KVS_OK);
    assert_memory_equal(in, out, sz);
    assert_int_equal(kvs_slot_lease_valid(b, &r), 1);
    assert_int_equal(kvs_release_batch(b, &r, 1), KVS_OK);
    free(in);
    free(out);
    kvs_client_close(b);
}

static void test_batches(void **state)
{
    fix *f = *state;
    enum { N = 300 };
    kvs_item items[N];
    uint8_t *vals[N];
    char keys[N][32];
    for (int i = 0; i < N; i++) {
        uint64_t n = (uint64_t)(i * 977 % 70000) + 1;
        vals[i] = malloc(n);
        fill(vals[i], n, (uint64_t)i);
        int kl = snprintf(keys[i], sizeof keys[i], "batch-%d", i);
        items[i] = (kvs_item){{keys[i], (uint32_t)kl}, vals[i], n, 0, 99};
    }
    items[17].key.len = 0; /* invalid key: only this item fails */
    assert_int_equal(kvs_put_batch(f->c, items, N), N - 1);
    assert_int_equal(items[17].status, KVS_ERR_INVALID);
    assert_int_equal(items[18].status, KVS_OK);
    /* again: all exist now */
    items[17].key.len = (uint32_t)strlen(keys[17]);
    assert_int_equal(kvs_put_batch(f->c, items, N), 1);
    assert_int_equal(items[18].status, KVS_ERR_EXISTS);
    /* get batch into fresh buffers, with a miss in the middle */
    kvs_item g[N + 1];
    uint8_t *outs[N + 1];
    for (int i = 0; i < N; i++) {
        outs[i] = malloc(items[i].len);
        g[i] = (kvs_item){items[i].key, outs[i], items[i].len, 0, 0};
    }
    outs[N] = malloc(10);
    g[N] = (kvs_item){{"missing", 7}, outs[N], 10, 0, 0};
    assert_int_equal(kvs_get_batch(f->c, g, N + 1), N);
    assert_int_equal(g[N].status, KVS_ERR_NOT_FOUND);
    for (int i = 0; i < N; i++) {
        assert_int_equal(g[i].status, KVS_OK);
        assert_int_equal(g[i].size, items[i].len);
        assert_memory_equal(outs[i], vals[i], items[i].len);
    }
    /* exists / remove batches */
    kvs_key ks[N + 1];
    for (int i = 0; i <= N; i++) ks[i] = g[i].key;
    uint8_t ex[N + 1];
    assert_int_equal(kvs_exists_batch(f->c, ks, N + 1, ex), KVS_OK);
    for (int i = 0; i < N; i++) assert_int_equal(ex[i], 1);
    assert_int_equal(ex[N], 0);
    int res[N + 1];
    assert_int_equal(kvs_remove_batch(f->c, ks, N + 1, res), N);
    assert_int_equal(res[N], KVS_ERR_NOT_FOUND);
    assert_int_equal(kvs_exists_batch(f->c, ks, N + 1, ex), KVS_OK);
    for (int i = 0; i <= N; i++) assert_int_equal(ex[i], 0);
    assert_int_equal(kvs_remove(f->c, "batch-1", 7), KVS_ERR_NOT_FOUND);
    for (int i = 0; i <= N; i++) free(outs[i]);
    for (int i = 0; i < N; i++) free(vals[i]);
}

static void test_registered(void **state)
{
    fix *f = *state;
    size_t n = 8u << 20;
    uint8_t *reg = malloc(n), *other = malloc(4096);
    assert_int_equal(kvs_register_memory(f->c, reg, n), KVS_OK);
    assert_int_equal(kvs_register_memory(f->c, reg + 100, 10), KVS_ERR_INVALID);
    assert_int_equal(kvs_register_memory(f->c, reg - 10, 20), KVS_ERR_INVALID);
    assert_int_equal(kvs_register_memory(f->c, NULL, 10), KVS_ERR_INVALID);
    fill(reg, 3u << 20, 11);
    assert_int_equal(kvs_put_from(f->c, "reg", 3, reg, 3u << 20), KVS_OK);
    assert_int_equal(kvs_put_from(f->c, "reg2", 4, other, 100), KVS_ERR_NOT_REGISTERED);
    assert_int_equal(kvs_put_from(f->c, "reg3", 4, reg + n - 10, 100), KVS_ERR_NOT_REGISTERED);
    /* just past the end of the region (was accepted through an unsigned wrap) */
    assert_int_equal(kvs_put_from(f->c, "reg4", 4, reg + n + 16, 100), KVS_ERR_NOT_REGISTERED);
    assert_int_equal(kvs_put_from(f->c, "reg5", 4, reg + n, 1), KVS_ERR_NOT_REGISTERED);
    assert_int_equal(kvs_put_from(f->c, "reg6", 4, reg + n - 1, 1), KVS_OK);
    uint64_t size = 0;
    assert_int_equal(kvs_get_into(f->c, "reg", 3, reg + (4u << 20), 4u << 20, &size), KVS_OK);
    assert_int_equal(size, 3u << 20);
    assert_memory_equal(reg, reg + (4u << 20), 3u << 20);
    assert_int_equal(kvs_get_into(f->c, "reg", 3, other, 4096, &size), KVS_ERR_NOT_REGISTERED);
    assert_int_equal(kvs_unregister_memory(f->c, reg + 1), KVS_ERR_NOT_FOUND);
    assert_int_equal(kvs_unregister_memory(f->c, reg), KVS_OK);
    assert_int_equal(kvs_get_into(f->c, "reg", 3, reg, n, &size), KVS_ERR_NOT_REGISTERED);
    free(reg);
    free(other);
}

static void test_slots(void **state)
{
    fix *f = *state;
    kvs_client *b = open_client(&f->m, 0); /* no segment: writes land in f->c's, mapped */
    enum { N = 4 };
    kvs_key keys[N] = {{"s0", 2}, {"s1", 2}, {"s2", 2}, {"s3", 2}};
    uint64_t sizes[N] = {4096, 1 << 20, 123, 7 << 20};
    kvs_slot s[N];
    assert_int_equal(kvs_reserve_batch(b, keys, sizes, N, s), N);
    for (int i = 0; i < N; i++) {
        assert_int_equal(s[i].status, KVS_OK);
        assert_non_null(s[i].ptr); /* same host: a direct pointer */
        assert_int_equal(s[i].size, sizes[i]);
        fill(s[i].ptr, sizes[i], (uint64_t)i + 100);
    }
    /* not visible before commit */
    assert_int_equal(kvs_exists(b, "s0", 2), 0);
    uint8_t ok[N] = {1, 1, 0, 1}; /* abandon s2 */
    int res[N];
    assert_int_equal(kvs_commit_batch(b, keys, s, ok, N, res), 3);
    for (int i = 0; i < N; i++) assert_int_equal(res[i], KVS_OK);
    assert_int_equal(kvs_exists(b, "s2", 2), 0);
    /* reserving an existing key fails per slot */
    kvs_slot again;
    assert_int_equal(kvs_reserve_batch(b, keys, sizes, 1, &again), 0);
    assert_int_equal(again.status, KVS_ERR_EXISTS);

    kvs_slot r[N];
    assert_int_equal(kvs_acquire_batch(f->c, keys, N, r), 3);
    assert_int_equal(r[2].status, KVS_ERR_NOT_FOUND);
    for (int i = 0; i < N; i++) {
        if (i == 2) continue;
        assert_non_null(r[i].ptr);
        assert_int_equal(r[i].size, sizes[i]);
        uint8_t *want = malloc(sizes[i]);
        fill(want, sizes[i], (uint64_t)i + 100);
        assert_memory_equal(r[i].ptr, want, sizes[i]);
        uint8_t part[64];
        assert_int_equal(kvs_slot_read(f->c, &r[i], sizes[i] - 50, part, 50), KVS_OK);
        assert_memory_equal(part, want + sizes[i] - 50, 50);
        assert_int_equal(kvs_slot_read(f->c, &r[i], sizes[i] - 50, part, 51), KVS_ERR_INVALID);
        assert_int_equal(kvs_slot_lease_valid(f->c, &r[i]), 1);
        free(want);
    }
    assert_int_equal(kvs_slot_lease_valid(f->c, &r[2]), 0);
    assert_int_equal(kvs_release_batch(f->c, r, N), KVS_OK);
    /* more slots than one message carries: sent in chunks */
    enum { M = 70000 };
    char(*mk)[12] = malloc((size_t)M * 12);
    kvs_key *mkeys = malloc(M * sizeof *mkeys);
    kvs_slot *ms = malloc(M * sizeof *ms);
    for (int i = 0; i < M; i++) {
        int l = snprintf(mk[i], 12, "m-%d", i);
        mkeys[i] = (kvs_key){mk[i], (uint32_t)l};
    }
    mkeys[M - 1] = keys[0];
    assert_int_equal(kvs_acquire_batch(f->c, mkeys, M, ms), 1);
    assert_int_equal(ms[0].status, KVS_ERR_NOT_FOUND);
    assert_int_equal(ms[M - 2].status, KVS_ERR_NOT_FOUND);
    assert_int_equal(ms[M - 1].status, KVS_OK);
    assert_int_equal(kvs_release_batch(f->c, ms, M), KVS_OK);
    free(mk);
    free(mkeys);
    free(ms);
    /* the object of the normal API is the same */
    uint8_t buf[4096];
    uint64_t size;
    assert_int_equal(kvs_get(b, "s0", 2, buf, sizeof buf, &size), KVS_OK);
    assert_int_equal(size, 4096);
    kvs_client_close(b);
}

/* A mapped slot holds its segment's write fence from reserve to commit,
 * and a commit ends it exactly once: committing a slot twice (or a forged
 * copy of it) ends no other slot's fence, so the owner still cannot fence
 * past a slot whose writer is inside. */
static void test_double_commit(void **state)
{
    fix *f = *state;
    kvs_client *b = open_client(&f->m, 0); /* mapped writes into f->c's segment */
    kvs_key keys[2] = {{"dc-x", 4}, {"dc-y", 4}};
    uint64_t sizes2[2] = {4096, 4096};
    kvs_slot s[2];
    assert_int_equal(kvs_reserve_batch(b, keys, sizes2, 2, s), 2);
    assert_non_null(s[0].ptr);
    assert_non_null(s[1].ptr);
    assert_int_equal(kvs_resv_count(b->resv), 2);
    memset(s[0].ptr, 1, 4096);
    assert_int_equal(kvs_commit_batch(b, &keys[0], &s[0], NULL, 1, NULL), 1);
    uint8_t sixteen[16] = {0};
    /* committed: no longer ours to write into */
    assert_int_equal(kvs_slot_write(b, &s[0], 0, sixteen, sizeof sixteen), KVS_ERR_INVALID);
    /* again: the master answers as it likes (publishing is idempotent) */
    assert_true(kvs_commit_batch(b, &keys[0], &s[0], NULL, 1, NULL) >= 0);
    assert_int_equal(kvs_resv_count(b->resv), 1);
    kvs_slot forged = s[1];
    forged.ptr = s[0].ptr; /* another slot's handle with this one's address */
    assert_int_equal(kvs_commit_batch(b, &keys[1], &forged, NULL, 1, NULL) >= 0, 1);
    assert_int_equal(kvs_resv_count(b->resv), 1); /* y's reservation still outstanding */
    /* y's writer is still inside: the owner cannot fence past it */
    kvs_segment *seg = &f->c->seg;
    uint64_t e = kvs_segment_epoch(seg);
    assert_int_equal(kvs_segment_fence(seg, e + 1), KVS_ERR_BUSY);
    memset(s[1].ptr, 2, 4096); /* y's bytes, written under its fence */
    assert_true(kvs_commit_batch(b, &keys[1], &s[1], NULL, 1, NULL) >= 0);
    assert_int_equal(kvs_resv_count(b->resv), 0);
    assert_int_equal(kvs_segment_fence(seg, e + 1), KVS_OK);
    kvs_client_close(b);
}

static void test_stats_counters(void **state)
{
    fix *f = *state;
    kvs_client_counters c0, c1;
    kvs_client_get_counters(f->c, &c0);
    assert_int_equal(kvs_put(f->c, "cnt", 3, "abc", 3), KVS_OK);
    char buf[8];
    uint64_t size;
    assert_int_equal(kvs_get(f->c, "cnt", 3, buf, sizeof buf, &size), KVS_OK);
    assert_int_equal(kvs_get(f->c, "nope", 4, buf, sizeof buf, &size), KVS_ERR_NOT_FOUND);
    kvs_client_get_counters(f->c, &c1);
    assert_int_equal(c1.puts, c0.puts + 1);
    assert_int_equal(c1.gets, c0.gets + 2);
    assert_int_equal(c1.hits, c0.hits + 1);
    assert_int_equal(c1.misses, c0.misses + 1);
    assert_int_equal(c1.bytes_put, c0.bytes_put + 3);
    assert_int_equal(c1.bytes_got, c0.bytes_got + 3);
    char *json = NULL;
    assert_int_equal(kvs_client_stats_json(f->c, &json), KVS_OK);
    cJSON *j = cJSON_Parse(json);
    assert_non_null(j);
    cJSON *segs = cJSON_GetObjectItem(j, "segments");
    assert_true(cJSON_IsArray(segs));
    assert_int_equal(cJSON_GetArraySize(segs), 1);
    cJSON_Delete(j);
    free(json);
}

static void test_invalid_args(void **state)
{
    fix *f = *state;
    char big[KVS_KEY_MAX + 1];
    memset(big, 'k', sizeof big);
    assert_int_equal(kvs_put(f->c, big, sizeof big, "x", 1), KVS_ERR_INVALID);
    assert_int_equal(kvs_put(f->c, big, KVS_KEY_MAX, "x", 1), KVS_OK);
    assert_int_equal(kvs_put(f->c, NULL, 1, "x", 1), KVS_ERR_INVALID);
    assert_int_equal(kvs_put(f->c, "k", 1, NULL, 5), KVS_ERR_INVALID);
    assert_int_equal(kvs_get(NULL, "k", 1, big, 1, NULL), KVS_ERR_INVALID);
    assert_int_equal(kvs_put_batch(f->c, NULL, 0), 0);
    /* binary keys with NUL bytes are distinct keys */
    assert_int_equal(kvs_put(f->c, "a\0b", 3, "1", 1), KVS_OK);
    assert_int_equal(kvs_put(f->c, "a\0c", 3, "2", 1), KVS_OK);
    char v = 0;
    uint64_t sz;
    assert_int_equal(kvs_get(f->c, "a\0c", 3, &v, 1, &sz), KVS_OK);
    assert_int_equal(v, '2');
    kvs_client_close(NULL);
    kvs_config cfg;
    kvs_config_init(&cfg);
    snprintf(cfg.master_server_address, sizeof cfg.master_server_address, "127.0.0.1:1");
    cfg.global_segment_size = 0;
    kvs_client *c = NULL;
    char err[256] = "";
    assert_int_equal(kvs_client_open(&cfg, &c, err, sizeof err), KVS_ERR_CONN);
    assert_null(c);
    assert_true(strlen(err) > 0);
    snprintf(cfg.protocol, sizeof cfg.protocol, "carrier-pigeon");
    assert_int_equal(kvs_client_open(&cfg, &c, err, sizeof err), KVS_ERR_CONFIG);
}

struct thr {
    kvs_client *c;
    int id;
    int errors;
};

static void *thr_main(void *arg)
{
    struct thr *t = arg;
    for (int it = 0; it < 40; it++) {
        char key[64];
        int kl = snprintf(key, sizeof key, "t%d-%d", t->id, it);
        uint64_t n = (uint64_t)((t->id * 131 + it * 7919) % 300000) + 1;
        uint8_t *in = malloc(n), *out = malloc(n);
        fill(in, n, (uint64_t)(t->id * 1000 + it));
        uint64_t size = 0;
        if (kvs_put(t->c, key, (uint32_t)kl, in, n) != KVS_OK) t->errors++;
        else if (kvs_get(t->c, key, (uint32_t)kl, out, n, &size) != KVS_OK || size != n ||
                 memcmp(in, out, n))
            t->errors++;
        free(in);
        free(out);
    }
    return NULL;
}

static void test_threads(void **state)
{
    fix *f = *state;
    setenv("KVSHELF_NO_SHM", "1", 1);
    kvs_client *b = open_client(&f->m, 0); /* over TCP */
    unsetenv("KVSHELF_NO_SHM");
    enum { T = 8 };
    pthread_t th[T];
    struct thr t[T];
    for (int i = 0; i < T; i++) {
        t[i] = (struct thr){i % 2 ? f->c : b, i, 0};
        pthread_create(&th[i], NULL, thr_main, &t[i]);
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(t[i].errors, 0);
    }
    kvs_client_close(b);
}

/* A remote slot whose kvs_slot_write failed (its node stopped mid-write:
 * part of the bytes missing, part maybe still on their way) is never
 * published, even when the caller commits it with ok: the commit reports
 * KVS_ERR_UNAVAILABLE and the key stays absent. */
static void test_failed_slot_write_not_published(void **state)
{
    fix *f = *state;
    memcpy(f->m2.dir, f->m.dir, sizeof f->m2.dir);
    assert_int_equal(start_master(&f->m2, 0, NULL, NULL), 0);
    char addr[64];
    master_addr(&f->m2, addr, sizeof addr);
    proc *node = &f->node;
    char *argv[] = {(char *)bin(), "node", "--master", addr, "--segment-size", "64MiB", NULL};
    assert_int_equal(posix_spawnp(&node->pid, argv[0], NULL, NULL, argv, environ), 0);
    setenv("KVSHELF_NO_SHM", "1", 1);
    kvs_client *b = open_client(&f->m2, 0); /* timeout 2000 ms */
    unsetenv("KVSHELF_NO_SHM");
    kvs_key k = {"fsw", 3};
    uint64_t sz = 32u << 20;
    kvs_slot s;
    int got = 0;
    for (int i = 0; i < 200 && got != 1; i++) { /* until the node's segment is mounted */
        got = kvs_reserve_batch(b, &k, &sz, 1, &s);
        if (got != 1) sleep_ms(25);
    }
    assert_int_equal(got, 1);
    assert_null(s.ptr);
    uint8_t *in = malloc(sz);
    fill(in, sz, 9);
    assert_int_equal(kvs_slot_write(b, &s, 0, in, 4096), KVS_OK);
    kill(node->pid, SIGSTOP);
    assert_int_not_equal(kvs_slot_write(b, &s, 0, in, sz), KVS_OK); /* times out */
    kill(node->pid, SIGCONT);
    int res = KVS_OK;
    assert_int_equal(kvs_commit_batch(b, &k, &s, NULL, 1, &res), 0);
    assert_int_equal(res, KVS_ERR_UNAVAILABLE);
    assert_int_equal(kvs_exists(b, "fsw", 3), 0);
    /* committed again (the mark is gone with the first commit): still never
     * published -- a remote slot this client no longer holds is refused */
    assert_int_equal(kvs_commit_batch(b, &k, &s, NULL, 1, &res), 0);
    assert_int_equal(res, KVS_ERR_INVALID);
    assert_int_equal(kvs_exists(b, "fsw", 3), 0);
    assert_int_equal(kvs_resv_count(b->resv), 0);
    /* the key can be written again, in full */
    assert_int_equal(kvs_put(b, "fsw", 3, in, 1 << 20), KVS_OK);
    free(in);
    kvs_client_close(b);
}

/* A storage node that dies: its objects become unavailable (or misses),
 * quickly and without a hang; the rest of the pool keeps working. */
static void test_node_dies(void **state)
{
    fix *f = *state;
    /* a pool whose only segment is the node's */
    memcpy(f->m2.dir, f->m.dir, sizeof f->m2.dir);
    assert_int_equal(start_master(&f->m2, 0, NULL, NULL), 0);
    char addr[64];
    master_addr(&f->m2, addr, sizeof addr);
    proc *node = &f->node;
    char *argv[] = {(char *)bin(), "node", "--master", addr, "--segment-size", "64MiB", NULL};
    assert_int_equal(posix_spawnp(&node->pid, argv[0], NULL, NULL, argv, environ), 0);
    /* wait for its segment to appear */
    setenv("KVSHELF_NO_SHM", "1", 1);
    kvs_client *b = open_client(&f->m2, 0);
    unsetenv("KVSHELF_NO_SHM");
    int nsegs = 0;
    for (int i = 0; i < 200 && nsegs < 1; i++) {
        char *json = NULL;
        if (kvs_client_stats_json(b, &json) == KVS_OK) {
            cJSON *j = cJSON_Parse(json);
            nsegs = cJSON_GetArraySize(cJSON_GetObjectItem(j, "segments"));
            cJSON_Delete(j);
        }
        free(json);
        sleep_ms(25);
    }
    assert_int_equal(nsegs, 1);
    /* fill until some objects live on the node's segment */
    enum { N = 64 };
    static uint8_t val[1 << 20];
    fill(val, sizeof val, 1);
    kvs_item items[N];
    char keys[N][16];
    for (int i = 0; i < N; i++) {
        snprintf(keys[i], sizeof keys[i], "nd-%d", i);
        items[i] = (kvs_item){{keys[i], (uint32_t)strlen(keys[i])}, val, sizeof val, 0, 0};
    }
    assert_int_equal(kvs_put_batch(b, items, N), N);
    stop_proc(node, SIGKILL);
    static uint8_t out[N][1 << 20];
    for (int i = 0; i < N; i++) items[i].buf = out[i];
    uint64_t t0 = 0;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t0 = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    int ok = kvs_get_batch(b, items, N);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t el = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000 - t0;
    int unavailable = 0;
    for (int i = 0; i < N; i++) {
        if (items[i].status == KVS_OK) assert_memory_equal(out[i], val, sizeof val);
        else {
            assert_true(items[i].status == KVS_ERR_UNAVAILABLE ||
                        items[i].status == KVS_ERR_NOT_FOUND);
            unavailable++;
        }
    }
    assert_int_equal(ok + unavailable, N);
    fprintf(stderr, "node died: %d of %d items unavailable, get_batch took %llu ms\n", unavailable, N, (unsigned long long)el);
    assert_int_equal(unavailable, N);
    assert_true(el < 3000);
    kvs_client_counters cnt;
    kvs_client_get_counters(b, &cnt);
    assert_true(cnt.errors + cnt.misses >= N);
    kvs_client_close(b);
}

/* Same-host gets copy early from where the client last saw the object
 * (loccache.h) and keep the copy only when the master names the same
 * object: a replaced or removed value is never returned stale. */
static void getx(kvs_client *c, const char *key, const uint8_t *want, size_t n, uint8_t *out)
{
    uint64_t size = 0;
    memset(out, 0xEE, n);
    assert_int_equal(kvs_get(c, key, (uint32_t)strlen(key), out, n, &size), KVS_OK);
    assert_int_equal(size, n);
    assert_memory_equal(out, want, n);
}

/* Opens a client with no segment; with `remote` it maps nothing either
 * (KVSHELF_NO_SHM), so its bytes all cross the transfer engine. */
static kvs_client *open_reader(fix *f, int remote)
{
    if (remote) setenv("KVSHELF_NO_SHM", "1", 1);
    kvs_client *b = open_client(&f->m, 0);
    unsetenv("KVSHELF_NO_SHM");
    return b;
}

/* Early copies (same host: memcpy from the mapped segment) and early reads
 * (remote: T_READ to the remembered place), both started while GET is on
 * its way: kept when the answer names the same object, redone otherwise. */
static void early_case(fix *f, int remote)
{
    enum { N = 1 << 20 };
    uint8_t *x = malloc(N), *y = malloc(N), *out = malloc(N);
    fill(x, N, 1);
    fill(y, N, 2);
    kvs_client *b = open_reader(f, remote); /* reads f->c's segment */
    kvs_client_counters c0, c1;
    assert_int_equal(kvs_put(f->c, "e", 1, x, N), KVS_OK);
    kvs_client_get_counters(b, &c0);
    getx(b, "e", x, N, out); /* b has not seen "e": the plain path */
    getx(b, "e", x, N, out); /* now it has: the early copy is kept */
    kvs_client_get_counters(b, &c1);
    assert_int_equal(c1.early_kept, c0.early_kept + 1);
    assert_int_equal(c1.early_wasted, c0.early_wasted);
    /* replaced under the same key with the same size (likely the same
     * place): the early copy of the old object is redone */
    assert_int_equal(kvs_remove(f->c, "e", 1), KVS_OK);
    assert_int_equal(kvs_put(f->c, "e", 1, y, N), KVS_OK);
    getx(b, "e", y, N, out);
    kvs_client_get_counters(b, &c0);
    assert_int_equal(c0.early_wasted, c1.early_wasted + 1);
    getx(b, "e", y, N, out);
    kvs_client_get_counters(b, &c1);
    assert_int_equal(c1.early_kept, c0.early_kept + 1);
    /* removed: a miss */
    assert_int_equal(kvs_remove(f->c, "e", 1), KVS_OK);
    uint64_t size = 0;
    assert_int_equal(kvs_get(b, "e", 1, out, N, &size), KVS_ERR_NOT_FOUND);
    assert_int_equal(kvs_get(b, "e", 1, out, N, &size), KVS_ERR_NOT_FOUND);
    /* too small a buffer: no early copy, TOO_LARGE with the size */
    assert_int_equal(kvs_put(f->c, "e", 1, x, N), KVS_OK);
    getx(b, "e", x, N, out);
    size = 0;
    assert_int_equal(kvs_get(b, "e", 1, out, N - 1, &size), KVS_ERR_TOO_LARGE);
    assert_int_equal(size, N);
    /* a client remembers where its own puts went (remote: b's puts land in
     * f->c's segment over TCP) */
    kvs_client *own = remote ? b : f->c, *other = remote ? f->c : b;
    kvs_client_get_counters(own, &c0);
    assert_int_equal(kvs_put(own, "w", 1, y, N), KVS_OK);
    getx(own, "w", y, N, out);
    kvs_client_get_counters(own, &c1);
    assert_int_equal(c1.early_kept, c0.early_kept + 1);
    /* batch: kept items and redone items side by side ("w" replaced by
     * the other client) */
    assert_int_equal(kvs_remove(other, "w", 1), KVS_OK);
    assert_int_equal(kvs_put(other, "w", 1, x, N), KVS_OK);
    uint8_t *out2 = malloc(N);
    memset(out, 0, N);
    kvs_item it[2] = {{{"e", 1}, out, N, 0, 0}, {{"w", 1}, out2, N, 0, 0}};
    kvs_client_get_counters(own, &c0);
    assert_int_equal(kvs_get_batch(own, it, 2), 2);
    assert_memory_equal(out, x, N);
    assert_memory_equal(out2, x, N);
    kvs_client_get_counters(own, &c1);
    assert_int_equal(c1.early_wasted, c0.early_wasted + 1); /* "w" changed */
    assert_int_equal(c1.early_kept, c0.early_kept + 1);     /* "e" did not */
    /* the segment the remembered place names is gone (its owner closed):
     * the early read fails or is not tried, and the get is a miss. d's
     * segment has the most free space, so d's put lands there. */
    if (remote) {
        kvs_client *d = open_client(&f->m, 512u << 20);
        assert_int_equal(kvs_put(d, "gone", 4, x, 4096), KVS_OK);
        getx(b, "gone", x, 4096, out);
        kvs_client_close(d);
        assert_int_equal(kvs_get(b, "gone", 4, out, N, &size), KVS_ERR_NOT_FOUND);
        getx(b, "e", x, N, out); /* and the connection to f->c still serves */
    }
    kvs_client_close(b);
    /* KVSHELF_LOC_CACHE=0: never early */
    setenv("KVSHELF_LOC_CACHE", "0", 1);
    kvs_client *z = open_reader(f, remote);
    unsetenv("KVSHELF_LOC_CACHE");
    getx(z, "e", x, N, out);
    getx(z, "e", x, N, out);
    kvs_client_get_counters(z, &c1);
    assert_int_equal(c1.early_kept + c1.early_wasted, 0);
    kvs_client_close(z);
    free(x);
    free(y);
    free(out);
    free(out2);
}

static void test_early_copy(void **state) { early_case(*state, 0); }
static void test_early_read_remote(void **state) { early_case(*state, 1); }

/* A writer keeps replacing one key (each value all one byte) while a
 * reader gets it: every value a get returns is whole, never a mix. */
typedef struct churn {
    kvs_client *c;
    atomic_int stop;
} churn;

static void *churn_writer(void *arg)
{
    churn *ch = arg;
    enum { N = 256 << 10 };
    uint8_t *v = malloc(N);
    for (int i = 0; !atomic_load(&ch->stop) && i < 4000; i++) {
        memset(v, (uint8_t)(i % 251) + 1, N);
        kvs_remove(ch->c, "churn", 5);
        kvs_put(ch->c, "churn", 5, v, N);
    }
    free(v);
    return NULL;
}

static void churn_case(fix *f, int remote)
{
    enum { N = 256 << 10 };
    kvs_client *r = open_reader(f, remote);
    churn ch = {f->c, 0};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, churn_writer, &ch), 0);
    uint8_t *out = malloc(N);
    int ok = 0;
    for (int i = 0; i < 3000; i++) {
        uint64_t size = 0;
        int rc = kvs_get(r, "churn", 5, out, N, &size);
        if (rc == KVS_ERR_NOT_FOUND) continue;
        assert_int_equal(rc, KVS_OK);
        assert_int_equal(size, N);
        for (size_t k = 1; k < N; k++)
            if (out[k] != out[0]) fail_msg("torn value: byte %zu is %u, byte 0 is %u", k, out[k], out[0]);
        ok++;
    }
    atomic_store(&ch.stop, 1);
    pthread_join(t, NULL);
    kvs_client_counters cnt;
    kvs_client_get_counters(r, &cnt);
    print_message("churn (%s): %d whole values, early copies kept %llu, redone %llu\n",
                  remote ? "remote" : "same host", ok, (unsigned long long)cnt.early_kept,
                  (unsigned long long)cnt.early_wasted);
    assert_true(ok > 0);
    assert_true(cnt.early_kept + cnt.early_wasted > 0);
    free(out);
    kvs_client_close(r);
}

static void test_early_copy_churn(void **state) { churn_case(*state, 0); }
static void test_early_read_churn(void **state) { churn_case(*state, 1); }

/* Leases run out by the local clock (with a margin): after lease_ms a slot
 * is no longer valid. A lost master fails the next call with KVS_ERR_CONN. */
static void test_lease_expiry(void **state)
{
    fix *f = *state;
    memcpy(f->m2.dir, f->m.dir, sizeof f->m2.dir);
    assert_int_equal(start_master(&f->m2, 0, "--lease-ms", "300"), 0);
    kvs_client *a = open_client(&f->m2, 16u << 20);
    assert_int_equal(kvs_put(a, "L", 1, "lease", 5), KVS_OK);
    kvs_key k = {"L", 1};
    kvs_slot s;
    assert_int_equal(kvs_acquire_batch(a, &k, 1, &s), 1);
    assert_int_equal(kvs_slot_lease_valid(a, &s), 1);
    sleep_ms(320);
    assert_int_equal(kvs_slot_lease_valid(a, &s), 0);
    assert_int_equal(kvs_release_batch(a, &s, 1), KVS_OK);
    assert_int_equal(kvs_acquire_batch(a, &k, 1, &s), 1);
    assert_int_equal(kvs_slot_lease_valid(a, &s), 1);
    stop_proc(&f->m2, SIGKILL);
    /* the next call notices the lost master */
    assert_int_equal(kvs_exists(a, "L", 1), KVS_ERR_CONN);
    kvs_client_close(a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_put_get_sizes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tcp_path, setup, teardown),
        cmocka_unit_test_setup_teardown(test_batches, setup, teardown),
        cmocka_unit_test_setup_teardown(test_registered, setup, teardown),
        cmocka_unit_test_setup_teardown(test_slots, setup, teardown),
        cmocka_unit_test_setup_teardown(test_double_commit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_slot_write_not_published, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stats_counters, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_args, setup, teardown),
        cmocka_unit_test_setup_teardown(test_threads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_node_dies, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lease_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_early_copy, setup, teardown),
        cmocka_unit_test_setup_teardown(test_early_copy_churn, setup, teardown),
        cmocka_unit_test_setup_teardown(test_early_read_remote, setup, teardown),
        cmocka_unit_test_setup_teardown(test_early_read_churn, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
