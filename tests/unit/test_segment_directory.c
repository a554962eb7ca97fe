/* The segment directory (src/segment/directory.h): format, owner writes,
 * validation of everything read back (corrupt slots, overlaps, duplicate
 * keys, foreign or damaged headers), registrations, and the directory
 * region of a real segment seen by another mapping. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvshelf/errors.h"
#include "segment/directory.h"
#include "segment/segment.h"

#define DATA (64ull << 20)
#define NONCE 0x1234abcdull
#define SLOT0 KVS_DIR_HDR_SIZE

typedef struct seen {
    uint64_t n;
    uint64_t off[64];
    char key[64][32];
} seen;

static int collect(const kvs_dir_entry *e, void *ud)
{
    seen *s = ud;
    if (s->n < 64) {
        s->off[s->n] = e->offset;
        snprintf(s->key[s->n], sizeof s->key[0], "%.*s", (int)e->key_len, (const char *)e->key);
    }
    s->n++;
    return 0;
}

static uint8_t *new_mem(uint64_t nslots, uint64_t *bytes)
{
    *bytes = kvs_dir_bytes(nslots, 4096);
    uint8_t *m = calloc(1, *bytes);
    assert_non_null(m);
    return m;
}

static void test_add_del_reattach(void **state)
{
    (void)state;
    uint64_t bytes;
    uint8_t *mem = new_mem(100, &bytes);
    kvs_dir *d;
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 1, &d), KVS_OK);
    assert_true(kvs_dir_capacity(d) >= 100);
    assert_int_equal(kvs_dir_add(d, "a", 1, 0, 5000, 7), KVS_OK);
    assert_int_equal(kvs_dir_add(d, "b", 1, 8192, 4096, 8), KVS_OK);
    assert_int_equal(kvs_dir_add(d, "c", 1, 1 << 20, 1, 9), KVS_OK);
    assert_int_equal(kvs_dir_count(d), 3);
    assert_int_equal(kvs_dir_del(d, 8192), KVS_OK);
    assert_int_equal(kvs_dir_del(d, 12345), KVS_OK); /* nothing there */
    assert_int_equal(kvs_dir_count(d), 2);
    /* invalid entries are refused */
    assert_int_equal(kvs_dir_add(d, "x", 1, 100, 10, 1), KVS_ERR_INVALID);   /* misaligned */
    assert_int_equal(kvs_dir_add(d, "x", 1, DATA, 10, 1), KVS_ERR_INVALID);  /* out of bounds */
    assert_int_equal(kvs_dir_add(d, "x", 1, DATA - 4096, 4097, 1), KVS_ERR_INVALID);
    assert_int_equal(kvs_dir_add(d, "x", 0, 0, 10, 1), KVS_ERR_INVALID);     /* empty key */
    assert_int_equal(kvs_dir_add(d, "x", 1, 0, 0, 1), KVS_ERR_INVALID);      /* empty object */
    kvs_dir_close(d);

    seen s = {0};
    kvs_dir_stats st;
    assert_int_equal(kvs_dir_parse(mem, bytes, DATA, NONCE, collect, &s, NULL, 0, &st), KVS_OK);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.off[0], 0);
    assert_string_equal(s.key[0], "a");
    assert_int_equal(s.off[1], 1 << 20);
    assert_int_equal(st.corrupt + st.overlap + st.dup_keys, 0);
    /* another segment's directory (nonce, size) is not this one */
    assert_int_equal(kvs_dir_parse(mem, bytes, DATA, NONCE + 1, collect, &s, NULL, 0, &st),
                     KVS_ERR_CORRUPT);
    assert_int_equal(kvs_dir_parse(mem, bytes, DATA * 2, NONCE, collect, &s, NULL, 0, &st),
                     KVS_ERR_CORRUPT);
    /* attach again: the entries are there */
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 0, &d), KVS_OK);
    assert_int_equal(kvs_dir_count(d), 2);
    kvs_dir_entry *v;
    uint64_t n;
    assert_int_equal(kvs_dir_snapshot(d, &v, &n), KVS_OK);
    assert_int_equal(n, 2);
    assert_int_equal(v[1].offset, 1 << 20);
    assert_int_equal(v[1].size, 1);
    assert_int_equal(v[1].obj_id, 9);
    assert_memory_equal(v[1].key, "c", 1);
    free(v);
    /* same offset again replaces the entry */
    assert_int_equal(kvs_dir_add(d, "z", 1, 0, 4096, 10), KVS_OK);
    assert_int_equal(kvs_dir_count(d), 2);
    kvs_dir_close(d);
    free(mem);
}

static void test_header_damage(void **state)
{
    (void)state;
    uint64_t bytes;
    uint8_t *mem = new_mem(10, &bytes);
    kvs_dir *d;
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 1, &d), KVS_OK);
    assert_int_equal(kvs_dir_add(d, "a", 1, 0, 10, 1), KVS_OK);
    kvs_dir_close(d);
    for (size_t i = 0; i < 48; i++) {
        mem[i] ^= 0x40;
        assert_int_equal(kvs_dir_parse(mem, bytes, DATA, NONCE, NULL, NULL, NULL, 0, NULL),
                         KVS_ERR_CORRUPT);
        assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 0, &d), KVS_ERR_CORRUPT);
        mem[i] ^= 0x40;
    }
    assert_int_equal(kvs_dir_parse(mem, 10, DATA, NONCE, NULL, NULL, NULL, 0, NULL),
                     KVS_ERR_CORRUPT);
    assert_int_equal(kvs_dir_parse(NULL, 0, DATA, NONCE, NULL, NULL, NULL, 0, NULL),
                     KVS_ERR_CORRUPT);
    /* a directory shorter than its header says */
    assert_int_equal(kvs_dir_parse(mem, KVS_DIR_HDR_SIZE + KVS_DIR_SLOT_SIZE, DATA, NONCE, NULL,
                                   NULL, NULL, 0, NULL),
                     KVS_ERR_CORRUPT);
    free(mem);
}

static void test_corrupt_slots_rejected_and_cleared(void **state)
{
    (void)state;
    uint64_t bytes;
    uint8_t *mem = new_mem(10, &bytes);
    kvs_dir *d;
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 1, &d), KVS_OK);
    for (int i = 0; i < 4; i++) {
        char k[8];
        snprintf(k, sizeof k, "k%d", i);
        assert_int_equal(kvs_dir_add(d, k, 2, (uint64_t)i << 16, 100, (uint64_t)i), KVS_OK);
    }
    kvs_dir_close(d);
    /* find the slots by their offsets and damage three of them */
    for (uint64_t i = 0; i < 10; i++) {
        uint8_t *s = mem + SLOT0 + i * KVS_DIR_SLOT_SIZE;
        uint64_t off;
        memcpy(&off, s + 8, 8);
        uint32_t st;
        memcpy(&st, s, 4);
        if (st != KVS_DIR_LIVE) continue;
        if (off == 1u << 16) s[40] ^= 1;                      /* key byte: check fails */
        if (off == 2u << 16) {                                 /* key length past the max */
            uint32_t kl = 1000;
            memcpy(s + 4, &kl, 4);
        }
        if (off == 3u << 16) {                                 /* size past the data */
            uint64_t sz = DATA;
            memcpy(s + 16, &sz, 8);
        }
    }
    seen s = {0};
    kvs_dir_stats st;
    uint8_t bad[10];
    assert_int_equal(kvs_dir_parse(mem, bytes, DATA, NONCE, collect, &s, bad, sizeof bad, &st),
                     KVS_OK);
    assert_int_equal(s.n, 1);
    assert_string_equal(s.key[0], "k0");
    assert_int_equal(st.corrupt, 3);
    int nbad = 0;
    for (int i = 0; i < 10; i++) nbad += bad[i];
    assert_int_equal(nbad, 3);
    /* the owner attaching clears them: a second parse finds them gone */
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 0, &d), KVS_OK);
    assert_int_equal(kvs_dir_count(d), 1);
    kvs_dir_close(d);
    memset(&s, 0, sizeof s);
    assert_int_equal(kvs_dir_parse(mem, bytes, DATA, NONCE, collect, &s, NULL, 0, &st), KVS_OK);
    assert_int_equal(s.n, 1);
    assert_int_equal(st.corrupt, 0);
    free(mem);
}

/* Writes a valid-looking slot i by hand through a second handle's add. */
static void test_overlaps_and_duplicates(void **state)
{
    (void)state;
    uint64_t bytes;
    uint8_t *mem = new_mem(16, &bytes);
    kvs_dir *d;
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 1, &d), KVS_OK);
    assert_int_equal(kvs_dir_add(d, "big", 3, 0, 100000, 1), KVS_OK);       /* [0, 102400) */
    assert_int_equal(kvs_dir_add(d, "in", 2, 40960, 10, 2), KVS_OK);        /* inside big */
    assert_int_equal(kvs_dir_add(d, "next", 4, 102400, 4096, 3), KVS_OK);  /* touches, ok */
    assert_int_equal(kvs_dir_add(d, "dup", 3, 1 << 20, 10, 4), KVS_OK);
    assert_int_equal(kvs_dir_add(d, "dup", 3, 2 << 20, 10, 5), KVS_OK);
    assert_int_equal(kvs_dir_add(d, "fine", 4, 3 << 20, 10, 6), KVS_OK);
    kvs_dir_close(d);
    seen s = {0};
    kvs_dir_stats st;
    assert_int_equal(kvs_dir_parse(mem, bytes, DATA, NONCE, collect, &s, NULL, 0, &st), KVS_OK);
    assert_int_equal(s.n, 2);
    assert_string_equal(s.key[0], "next");
    assert_string_equal(s.key[1], "fine");
    assert_int_equal(st.overlap, 2);
    assert_int_equal(st.dup_keys, 1);
    free(mem);
}

static void test_full_and_registrations(void **state)
{
    (void)state;
    uint64_t bytes = KVS_DIR_HDR_SIZE + 3 * KVS_DIR_SLOT_SIZE;
    uint8_t *mem = calloc(1, bytes);
    kvs_dir *d;
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 1, &d), KVS_OK);
    assert_int_equal(kvs_dir_capacity(d), 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(kvs_dir_add(d, "k", 1, (uint64_t)i * 4096, 1, 0), KVS_OK);
    assert_int_equal(kvs_dir_add(d, "k", 1, 4 * 4096, 1, 0), KVS_ERR_NO_SPACE);
    assert_int_equal(kvs_dir_del(d, 4096), KVS_OK);
    uint64_t r1 = kvs_dir_new_registration(d);
    assert_int_equal(kvs_dir_add_if(d, r1, "k", 1, 4 * 4096, 1, 0), KVS_OK);
    uint64_t r2 = kvs_dir_new_registration(d);
    assert_true(r2 != r1);
    assert_int_equal(kvs_dir_del(d, 0), KVS_OK);
    assert_int_equal(kvs_dir_add_if(d, r1, "k", 1, 8 * 4096, 1, 0), KVS_ERR_UNAVAILABLE);
    assert_int_equal(kvs_dir_add_if(d, r2, "k", 1, 8 * 4096, 1, 0), KVS_OK);
    kvs_dir_close(d);
    free(mem);
}

/* The reign recorded in the header: 0 on a fresh directory, kept across a
 * re-attach, 0 again when its check is damaged or the directory is
 * formatted anew (a later master refuses such a directory: safe). */
static void test_reign_round_trip(void **state)
{
    (void)state;
    uint64_t bytes;
    uint8_t *mem = new_mem(10, &bytes);
    kvs_dir *d;
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 1, &d), KVS_OK);
    assert_int_equal(kvs_dir_reign(d), 0);
    kvs_dir_set_reign(d, 1764800000123ull);
    assert_int_equal(kvs_dir_reign(d), 1764800000123ull);
    assert_int_equal(kvs_dir_add(d, "a", 1, 0, 10, 1), KVS_OK);
    kvs_dir_close(d);
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 0, &d), KVS_OK);
    assert_int_equal(kvs_dir_reign(d), 1764800000123ull);
    assert_int_equal(kvs_dir_count(d), 1);
    kvs_dir_close(d);
    /* a damaged reign or check reads as 0 */
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 0, &d), KVS_OK);
    mem[48] ^= 1; /* the reign's low byte (header offset 48) */
    assert_int_equal(kvs_dir_reign(d), 0);
    mem[48] ^= 1;
    assert_int_equal(kvs_dir_reign(d), 1764800000123ull);
    mem[56] ^= 0x80; /* its check */
    assert_int_equal(kvs_dir_reign(d), 0);
    kvs_dir_set_reign(d, 7);
    assert_int_equal(kvs_dir_reign(d), 7);
    kvs_dir_close(d);
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 1, &d), KVS_OK); /* formatted */
    assert_int_equal(kvs_dir_reign(d), 0);
    assert_int_equal(kvs_dir_reign(NULL), 0);
    kvs_dir_close(d);
    free(mem);
}

/* Random adds and deletes against a model: the offset map (with its
 * backward-shift deletion) and the slots always agree. */
static void test_random_ops_match_model(void **state)
{
    (void)state;
    enum { N = 512, OFFS = 2048 };
    uint64_t bytes;
    uint8_t *mem = new_mem(N, &bytes);
    kvs_dir *d;
    assert_int_equal(kvs_dir_attach(mem, bytes, DATA, NONCE, 1, &d), KVS_OK);
    static uint8_t model[OFFS];
    memset(model, 0, sizeof model);
    uint64_t live = 0, rng = 88172645463325252ull;
    for (int step = 0; step < 20000; step++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        uint64_t o = rng % OFFS;
        char key[16];
        int kl = snprintf(key, sizeof key, "o%llu", (unsigned long long)o);
        if ((rng >> 20) & 1) {
            int rc = kvs_dir_add(d, key, (uint32_t)kl, o * 4096, 4096, o);
            if (model[o]) assert_int_equal(rc, KVS_OK);
            else if (live < kvs_dir_capacity(d)) {
                assert_int_equal(rc, KVS_OK);
                model[o] = 1;
                live++;
            } else
                assert_int_equal(rc, KVS_ERR_NO_SPACE);
        } else {
            assert_int_equal(kvs_dir_del(d, o * 4096), KVS_OK);
            if (model[o]) live--;
            model[o] = 0;
        }
        assert_int_equal(kvs_dir_count(d), live);
    }
    kvs_dir_close(d);
    seen s = {0};
    kvs_dir_stats st;
    assert_int_equal(kvs_dir_parse(mem, bytes, DATA, NONCE, collect, &s, NULL, 0, &st), KVS_OK);
    assert_int_equal(s.n, live);
    assert_int_equal(st.corrupt + st.overlap + st.dup_keys, 0);
    free(mem);
}

static void test_segment_has_directory(void **state)
{
    (void)state;
    setenv("KVSHELF_PREFAULT", "0", 1);
    kvs_segment s, m;
    assert_int_equal(kvs_segment_create(8 << 20, &s), KVS_OK);
    assert_non_null(s.dir);
    assert_true(s.dir_size >= kvs_dir_bytes(64, 4096));
    assert_int_equal(s.size, 8 << 20);
    kvs_dir *d;
    assert_int_equal(kvs_dir_attach(s.dir, s.dir_size, s.size, kvs_segment_nonce(&s), 1, &d),
                     KVS_OK);
    assert_int_equal(kvs_dir_add(d, "key", 3, 4096, 100, 1), KVS_OK);
    kvs_dir_close(d);
    /* another mapping of the same file sees the same directory */
    assert_int_equal(kvs_segment_map(s.name, 0, &m), KVS_OK);
    assert_int_equal(m.size, s.size);
    assert_int_equal(m.dir_size, s.dir_size);
    assert_int_equal(kvs_segment_nonce(&m), kvs_segment_nonce(&s));
    seen x = {0};
    assert_int_equal(
        kvs_dir_parse(m.dir, m.dir_size, m.size, kvs_segment_nonce(&m), collect, &x, NULL, 0, NULL),
        KVS_OK);
    assert_int_equal(x.n, 1);
    assert_string_equal(x.key[0], "key");
    assert_int_equal(kvs_segment_map(s.name, s.size + 1, &m), KVS_ERR_CORRUPT);
    kvs_segment_destroy(&m);
    kvs_segment_destroy(&s);
    /* no directory at all */
    setenv("KVSHELF_DIR_SLOTS", "0", 1);
    assert_int_equal(kvs_segment_create(1 << 20, &s), KVS_OK);
    assert_null(s.dir);
    assert_int_equal(s.dir_size, 0);
    assert_int_equal(kvs_segment_map(s.name, 0, &m), KVS_OK);
    assert_null(m.dir);
    kvs_segment_destroy(&m);
    kvs_segment_destroy(&s);
    unsetenv("KVSHELF_DIR_SLOTS");
    unsetenv("KVSHELF_PREFAULT");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_add_del_reattach),
        cmocka_unit_test(test_header_damage),
        cmocka_unit_test(test_corrupt_slots_rejected_and_cleared),
        cmocka_unit_test(test_overlaps_and_duplicates),
        cmocka_unit_test(test_full_and_registrations),
        cmocka_unit_test(test_reign_round_trip),
        cmocka_unit_test(test_random_ops_match_model),
        cmocka_unit_test(test_segment_has_directory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
