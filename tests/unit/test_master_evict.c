/* Eviction tests: LRU order, never leased or in-flight objects, watermarks,
 * placement on the writer's host, then the segment with most free space. */
#include "test_master_util.h"

#define MIB (1ull << 20)

static void no_watermark(kvs_master_opts *o)
{
    o->evict_high = 1.0;
    o->evict_low = 1.0;
}

static void test_lru_order(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, no_watermark);
    uint64_t c = tm_client(m, 1);
    tm_mount(m, c, 10 * MIB, 1);
    char k[32];
    for (int i = 0; i < 10; i++) {
        tm_key(k, sizeof k, i);
        assert_int_equal(tm_put(m, c, k, MIB), KVS_OK);
    }
    /* touch 0 and 1 with GET (and release), so 2 is now the oldest */
    for (int i = 0; i < 2; i++) {
        kvs_m_loc loc;
        tm_key(k, sizeof k, i);
        assert_int_equal(kvs_m_get(m, c, k, (uint32_t)strlen(k), &loc), KVS_OK);
        assert_int_equal(kvs_m_release(m, loc.lease_id), KVS_OK);
    }
    assert_int_equal(tm_put(m, c, "new-1", MIB), KVS_OK);
    tm_key(k, sizeof k, 2);
    assert_false(tm_exists(m, k));
    assert_int_equal(tm_put(m, c, "new-2", 2 * MIB), KVS_OK);
    for (int i = 0; i < 10; i++) {
        tm_key(k, sizeof k, i);
        /* 2, 3 and 4 went (3 and 4 were adjacent to make 2 MiB contiguous or not) */
        if (i == 0 || i == 1) assert_true(tm_exists(m, k));
    }
    tm_key(k, sizeof k, 3);
    assert_false(tm_exists(m, k));
    assert_true(m->cnt.evictions >= 2);
    kvs_master_free(m);
}

static void test_never_leased_or_writing(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, no_watermark);
    uint64_t c = tm_client(m, 1);
    tm_mount(m, c, 4 * MIB, 1);
    /* a: complete + leased; b: being written; x, y: complete */
    assert_int_equal(tm_put(m, c, "a", MIB), KVS_OK);
    uint32_t seg;
    uint64_t off, objb;
    assert_int_equal(kvs_m_put_start(m, c, "b", 1, MIB, &seg, &off, &objb, &tm_ep), KVS_OK);
    assert_int_equal(tm_put(m, c, "x", MIB), KVS_OK);
    assert_int_equal(tm_put(m, c, "y", MIB), KVS_OK);
    kvs_m_loc la;
    assert_int_equal(kvs_m_get(m, c, "a", 1, &la), KVS_OK);
    /* needs 2 MiB: only x and y may go */
    assert_int_equal(tm_put(m, c, "z", 2 * MIB), KVS_OK);
    assert_true(tm_exists(m, "a"));
    assert_false(tm_exists(m, "x"));
    assert_false(tm_exists(m, "y"));
    assert_int_equal(kvs_m_put_end(m, c, "b", 1, objb, 1), KVS_OK);
    /* now everything left is leased (a) or needed; z and b are evictable,
     * but 4 MiB never fits beside the leased a */
    assert_int_equal(tm_put(m, c, "huge", 4 * MIB), KVS_ERR_NO_SPACE);
    assert_true(tm_exists(m, "a"));
    /* larger than any segment */
    assert_int_equal(tm_put(m, c, "toolarge", 5 * MIB), KVS_ERR_TOO_LARGE);
    assert_int_equal(kvs_m_release(m, la.lease_id), KVS_OK);
    assert_int_equal(tm_put(m, c, "huge2", 4 * MIB), KVS_OK);
    assert_false(tm_exists(m, "a"));
    kvs_master_free(m);
}

static void test_watermarks(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL); /* 95 % / 90 % */
    uint64_t c = tm_client(m, 1);
    uint32_t seg = tm_mount(m, c, 100 * MIB, 1);
    char k[32];
    int i;
    for (i = 0; i < 95; i++) {
        tm_key(k, sizeof k, i);
        assert_int_equal(tm_put(m, c, k, MIB), KVS_OK);
    }
    assert_int_equal(m->cnt.evictions, 0); /* at 95 %, not above */
    tm_key(k, sizeof k, i);
    assert_int_equal(tm_put(m, c, k, MIB), KVS_OK); /* 96 % > high: down below 90 % */
    kvs_seg *s = kvs_segs_find(&m->segs, seg);
    uint64_t used = kvs_seg_used(s);
    assert_true(used < 90 * MIB);
    assert_true(used >= 89 * MIB);
    /* the oldest went first */
    assert_false(tm_exists(m, "key-000000"));
    assert_true(tm_exists(m, "key-000095"));
    assert_int_equal(m->cnt.evictions, 96 - used / MIB);
    kvs_master_free(m);
}

static void test_placement(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, no_watermark);
    uint64_t ca = tm_client(m, 0xA), cb = tm_client(m, 0xB), cc = tm_client(m, 0xC);
    uint32_t sa = tm_mount(m, ca, 8 * MIB, 0xA);
    uint32_t sb1 = tm_mount(m, cb, 8 * MIB, 0xB);
    uint32_t sb2 = tm_mount(m, cb, 16 * MIB, 0xB);
    uint32_t seg;
    uint64_t off, obj;
    /* writer on host A: its own segment although others have more room */
    assert_int_equal(kvs_m_put_start(m, ca, "a1", 1, MIB, &seg, &off, &obj, &tm_ep), KVS_OK);
    assert_int_equal(seg, sa);
    /* writer on host C (no segment): the one with most free space */
    assert_int_equal(kvs_m_put_start(m, cc, "c1", 2, MIB, &seg, &off, &obj, &tm_ep), KVS_OK);
    assert_int_equal(seg, sb2);
    /* writer on host B: among its two, most free first */
    assert_int_equal(kvs_m_put_start(m, cb, "b1", 2, 12 * MIB, &seg, &off, &obj, &tm_ep), KVS_OK);
    assert_int_equal(seg, sb2);
    assert_int_equal(kvs_m_put_start(m, cb, "b2", 2, 4 * MIB, &seg, &off, &obj, &tm_ep), KVS_OK);
    assert_int_equal(seg, sb1);
    /* host A full locally (7 MiB free) for 8 MiB: goes elsewhere, nothing evicted */
    assert_int_equal(kvs_m_put_start(m, ca, "a2", 2, 8 * MIB, &seg, &off, &obj, &tm_ep), KVS_ERR_NO_SPACE);
    assert_int_equal(kvs_m_put_start(m, ca, "a3", 2, 4 * MIB, &seg, &off, &obj, &tm_ep), KVS_OK);
    assert_int_equal(seg, sa);
    assert_int_equal(kvs_m_put_start(m, ca, "a4", 2, 4 * MIB, &seg, &off, &obj, &tm_ep), KVS_OK);
    assert_int_equal(seg, sb1);
    kvs_master_free(m);
}

/* A full pool of two segments loses its least recently used objects first,
 * whatever segment they are in: after churn (and reads that make the older
 * objects of one segment recent again), every object written since still
 * exists while the pool holds fewer of them than it has room for. Placing
 * by free space alone fed the segment that evicted last until it evicted
 * its own newest objects (CI: 2 of 60 fresh 1 MiB objects missed). */
static void test_full_pool_evicts_oldest_anywhere(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL); /* 95 % / 90 % */
    uint64_t c = tm_client(m, 1);
    tm_mount(m, c, 40 * MIB, 1);
    tm_mount(m, c, 40 * MIB, 1);
    char k[32];
    for (int i = 0; i < 200; i++) { /* churn: 2.5 pools */
        tm_key(k, sizeof k, i);
        assert_int_equal(tm_put(m, c, k, MIB), KVS_OK);
    }
    assert_true(m->cnt.evictions > 100);
    for (int i = 0; i < 200; i++) { /* reads make the survivors recent */
        kvs_m_loc loc;
        tm_key(k, sizeof k, i);
        if (kvs_m_get(m, c, k, (uint32_t)strlen(k), &loc) == KVS_OK)
            assert_int_equal(kvs_m_release(m, loc.lease_id), KVS_OK);
    }
    for (int round = 0; round < 3; round++) {
        /* 60 fresh objects: the pool holds at least 72 (90 % of 80 MiB) */
        for (int i = 0; i < 60; i++) {
            snprintf(k, sizeof k, "fresh-%d-%03d", round, i);
            assert_int_equal(tm_put(m, c, k, MIB), KVS_OK);
        }
        for (int i = 0; i < 60; i++) {
            snprintf(k, sizeof k, "fresh-%d-%03d", round, i);
            assert_true(tm_exists(m, k));
        }
    }
    kvs_master_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lru_order),
        cmocka_unit_test(test_never_leased_or_writing),
        cmocka_unit_test(test_watermarks),
        cmocka_unit_test(test_placement),
        cmocka_unit_test(test_full_pool_evicts_oldest_anywhere),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
