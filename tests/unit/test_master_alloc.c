/* Allocator tests: no overlapping ranges (randomized, checked against a
 * page bitmap), coalescing, invalid frees, and fill >= 95 % for mixed
 * 4 KiB..16 MiB objects, from empty and after churn. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvshelf/errors.h"
#include "master/alloc.h"

static uint64_t rng_state = 0x12345678abcdefull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

typedef struct range {
    uint64_t off, size;
} range;

static void test_bitmap_random(void **st)
{
    (void)st;
    const uint64_t cap = 64ull << 20, pages = cap / KVS_ALLOC_GRAIN;
    uint8_t *bm = calloc(pages, 1);
    range *live = calloc(pages, sizeof *live);
    size_t nlive = 0;
    uint64_t used = 0;
    kvs_alloc *a = kvs_alloc_new(cap);
    assert_non_null(a);
    for (int it = 0; it < 200000; it++) {
        if (nlive == 0 || (rnd() % 100) < 55) {
            uint64_t size = 1 + rnd() % (256 * KVS_ALLOC_GRAIN);
            uint64_t off;
            int rc = kvs_alloc_alloc(a, size, &off);
            if (rc == KVS_ERR_NO_SPACE) continue;
            assert_int_equal(rc, KVS_OK);
            assert_int_equal(off % KVS_ALLOC_GRAIN, 0);
            uint64_t len = kvs_alloc_round(size);
            assert_true(off + len <= cap);
            for (uint64_t p = off / KVS_ALLOC_GRAIN; p < (off + len) / KVS_ALLOC_GRAIN; p++) {
                assert_int_equal(bm[p], 0);
                bm[p] = 1;
            }
            live[nlive++] = (range){off, size};
            used += len;
        } else {
            size_t i = rnd() % nlive;
            range r = live[i];
            live[i] = live[--nlive];
            assert_int_equal(kvs_alloc_release(a, r.off, r.size), KVS_OK);
            uint64_t len = kvs_alloc_round(r.size);
            for (uint64_t p = r.off / KVS_ALLOC_GRAIN; p < (r.off + len) / KVS_ALLOC_GRAIN; p++)
                bm[p] = 0;
            used -= len;
        }
        if (it % 1000 == 0) {
            kvs_alloc_stats s;
            kvs_alloc_get_stats(a, &s);
            assert_int_equal(s.used, used);
            assert_int_equal(s.allocations, nlive);
        }
    }
    while (nlive) {
        range r = live[--nlive];
        assert_int_equal(kvs_alloc_release(a, r.off, r.size), KVS_OK);
    }
    kvs_alloc_stats s;
    kvs_alloc_get_stats(a, &s);
    assert_int_equal(s.used, 0);
    assert_int_equal(s.free_extents, 1);
    assert_int_equal(s.largest_free, cap);
    kvs_alloc_destroy(a);
    free(bm);
    free(live);
}

static void test_coalesce(void **st)
{
    (void)st;
    kvs_alloc *a = kvs_alloc_new(10 * KVS_ALLOC_GRAIN + 100); /* rounded down */
    kvs_alloc_stats s;
    kvs_alloc_get_stats(a, &s);
    assert_int_equal(s.capacity, 10 * KVS_ALLOC_GRAIN);
    uint64_t x, y, z, w;
    assert_int_equal(kvs_alloc_alloc(a, 1, &x), KVS_OK);
    assert_int_equal(kvs_alloc_alloc(a, KVS_ALLOC_GRAIN, &y), KVS_OK);
    assert_int_equal(kvs_alloc_alloc(a, KVS_ALLOC_GRAIN + 1, &z), KVS_OK);
    assert_int_equal(kvs_alloc_alloc(a, 6 * KVS_ALLOC_GRAIN, &w), KVS_OK);
    assert_int_equal(kvs_alloc_alloc(a, 1, &w), KVS_ERR_NO_SPACE);
    assert_int_equal(kvs_alloc_release(a, w, 6 * KVS_ALLOC_GRAIN), KVS_OK);
    kvs_alloc_get_stats(a, &s);
    assert_int_equal(s.used, 4 * KVS_ALLOC_GRAIN);
    assert_int_equal(s.largest_free, 6 * KVS_ALLOC_GRAIN);
    assert_int_equal(s.allocations, 3);
    (void)x;
    (void)y;
    (void)z;
    kvs_alloc_destroy(a);

    a = kvs_alloc_new(8 * KVS_ALLOC_GRAIN);
    uint64_t o[8];
    for (int i = 0; i < 8; i++) assert_int_equal(kvs_alloc_alloc(a, KVS_ALLOC_GRAIN, &o[i]), KVS_OK);
    /* free 1 and 3: two extents; free 2: one merged extent of 3 pages */
    assert_int_equal(kvs_alloc_release(a, o[1], KVS_ALLOC_GRAIN), KVS_OK);
    assert_int_equal(kvs_alloc_release(a, o[3], KVS_ALLOC_GRAIN), KVS_OK);
    kvs_alloc_get_stats(a, &s);
    assert_int_equal(s.free_extents, 2);
    assert_int_equal(s.largest_free, KVS_ALLOC_GRAIN);
    assert_false(kvs_alloc_fits(a, 2 * KVS_ALLOC_GRAIN));
    assert_int_equal(kvs_alloc_release(a, o[2], KVS_ALLOC_GRAIN), KVS_OK);
    kvs_alloc_get_stats(a, &s);
    assert_int_equal(s.free_extents, 1);
    assert_int_equal(s.largest_free, 3 * KVS_ALLOC_GRAIN);
    assert_true(kvs_alloc_fits(a, 3 * KVS_ALLOC_GRAIN));
    /* merge with the successor only, then the predecessor only */
    assert_int_equal(kvs_alloc_release(a, o[0], KVS_ALLOC_GRAIN), KVS_OK);
    assert_int_equal(kvs_alloc_release(a, o[4], KVS_ALLOC_GRAIN), KVS_OK);
    kvs_alloc_get_stats(a, &s);
    assert_int_equal(s.free_extents, 1);
    assert_int_equal(s.largest_free, 5 * KVS_ALLOC_GRAIN);
    /* best fit: a 1-page hole at 7 is preferred over the 5-page one */
    assert_int_equal(kvs_alloc_release(a, o[7], KVS_ALLOC_GRAIN), KVS_OK);
    uint64_t b;
    assert_int_equal(kvs_alloc_alloc(a, 100, &b), KVS_OK);
    assert_int_equal(b, o[7]);
    /* invalid releases */
    assert_int_equal(kvs_alloc_release(a, o[0], KVS_ALLOC_GRAIN), KVS_ERR_INVALID); /* double */
    assert_int_equal(kvs_alloc_release(a, o[5] + 1, 1), KVS_ERR_INVALID);           /* misaligned */
    assert_int_equal(kvs_alloc_release(a, 8 * KVS_ALLOC_GRAIN, 1), KVS_ERR_INVALID); /* out */
    assert_int_equal(kvs_alloc_release(a, o[5], 0), KVS_ERR_INVALID);
    assert_int_equal(kvs_alloc_alloc(a, 0, &b), KVS_ERR_INVALID);
    assert_int_equal(kvs_alloc_release(a, o[5], 2 * KVS_ALLOC_GRAIN), KVS_OK);
    assert_int_equal(kvs_alloc_release(a, o[7], KVS_ALLOC_GRAIN), KVS_OK);
    kvs_alloc_get_stats(a, &s);
    assert_int_equal(s.used, 0);
    assert_int_equal(s.free_extents, 1);
    kvs_alloc_destroy(a);
}

/* log-uniform in [4 KiB, 16 MiB], any byte count */
static uint64_t mixed_size(void)
{
    double u = (double)(rnd() >> 11) / 9007199254740992.0;
    return (uint64_t)(4096.0 * pow(4096.0, u));
}

typedef struct pool {
    kvs_alloc *a;
    range *live;
    size_t n, cap;
} pool;

/* Allocates mixed sizes until one fails; returns the fill fraction then. */
static double fill(pool *p)
{
    for (;;) {
        uint64_t size = mixed_size(), off;
        if (kvs_alloc_alloc(p->a, size, &off) != KVS_OK) break;
        if (p->n == p->cap) {
            p->cap = p->cap ? p->cap * 2 : 1024;
            p->live = realloc(p->live, p->cap * sizeof *p->live);
        }
        p->live[p->n++] = (range){off, size};
    }
    kvs_alloc_stats s;
    kvs_alloc_get_stats(p->a, &s);
    return (double)s.used / (double)s.capacity;
}

static void check_fill(uint64_t cap, int rounds)
{
    pool p = {kvs_alloc_new(cap), NULL, 0, 0};
    double f = fill(&p), worst = f;
    print_message("pool %llu MiB: first fill %.2f%% (%zu objects)\n",
                  (unsigned long long)(cap >> 20), 100 * f, p.n);
    assert_true(f >= 0.95);
    for (int r = 0; r < rounds; r++) {
        /* free a random half */
        for (size_t i = 0; i < p.n; i++) {
            size_t j = i + rnd() % (p.n - i);
            range t = p.live[i];
            p.live[i] = p.live[j];
            p.live[j] = t;
        }
        size_t keep = p.n / 2;
        for (size_t i = keep; i < p.n; i++)
            assert_int_equal(kvs_alloc_release(p.a, p.live[i].off, p.live[i].size), KVS_OK);
        p.n = keep;
        f = fill(&p);
        kvs_alloc_stats s;
        kvs_alloc_get_stats(p.a, &s);
        if (f < worst) worst = f;
        assert_true(f >= 0.95);
        if (r == rounds - 1)
            print_message("  after %d churn rounds: last %.2f%%, worst %.2f%%, %llu free extents\n",
                          rounds, 100 * f, 100 * worst, (unsigned long long)s.free_extents);
    }
    kvs_alloc_destroy(p.a);
    free(p.live);
}

static void test_fill_mixed_4g(void **st)
{
    (void)st;
    check_fill(4ull << 30, 20);
}

static void test_fill_mixed_3200m(void **st)
{
    (void)st;
    check_fill(3355443200ull, 20);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bitmap_random),
        cmocka_unit_test(test_coalesce),
        cmocka_unit_test(test_fill_mixed_4g),
        cmocka_unit_test(test_fill_mixed_3200m),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
