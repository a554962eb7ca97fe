/* The table of outstanding mapped reservations (src/client/resv.h): each
 * reservation is taken out exactly once, only with its own address; the
 * table grows and stays consistent under many entries and threads. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "client/resv.h"
#include "kvshelf/errors.h"

static void test_take_once(void **st)
{
    (void)st;
    kvs_resv_table *t = kvs_resv_new();
    assert_non_null(t);
    char a, b;
    uint64_t ep = 0;
    assert_int_equal(kvs_resv_add(t, 7, &a, 3), KVS_OK);
    assert_int_equal(kvs_resv_add(t, 7, &b, 4), KVS_ERR_EXISTS); /* unchanged */
    assert_int_equal(kvs_resv_add(t, 8, &b, 4), KVS_OK);
    assert_int_equal(kvs_resv_count(t), 2);
    assert_int_equal(kvs_resv_take(t, 7, &b, &ep), 0); /* wrong address */
    assert_int_equal(kvs_resv_take(t, 9, &a, &ep), 0); /* unknown */
    assert_int_equal(kvs_resv_take(t, 7, &a, &ep), 1);
    assert_int_equal(ep, 3);
    assert_int_equal(kvs_resv_take(t, 7, &a, &ep), 0); /* only once */
    assert_int_equal(kvs_resv_take(t, 8, &b, &ep), 1);
    assert_int_equal(ep, 4);
    assert_int_equal(kvs_resv_count(t), 0);
    /* NULL table: nothing recorded, nothing taken */
    assert_int_equal(kvs_resv_add(NULL, 1, &a, 1), KVS_ERR_NOMEM);
    assert_int_equal(kvs_resv_take(NULL, 1, &a, &ep), 0);
    kvs_resv_free(t);
    kvs_resv_free(NULL);
}

enum { PER_THREAD = 20000, THREADS = 4 };
static char mem[THREADS * PER_THREAD];

static void *worker(void *arg)
{
    kvs_resv_table *t = arg;
    static _Atomic int next;
    int k = next++;
    uint64_t base = (uint64_t)k * PER_THREAD;
    int bad = 0;
    for (uint64_t i = 0; i < PER_THREAD; i++)
        bad |= kvs_resv_add(t, base + i, &mem[base + i], base + i + 1) != KVS_OK;
    for (uint64_t i = 0; i < PER_THREAD; i += 2) {
        uint64_t ep = 0;
        bad |= kvs_resv_take(t, base + i, &mem[base + i], &ep) != 1 || ep != base + i + 1;
    }
    return bad ? (void *)1 : NULL;
}

static void test_many_threads(void **st)
{
    (void)st;
    kvs_resv_table *t = kvs_resv_new();
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) pthread_create(&th[i], NULL, worker, t);
    for (int i = 0; i < THREADS; i++) {
        void *r;
        pthread_join(th[i], &r);
        assert_null(r);
    }
    assert_int_equal(kvs_resv_count(t), THREADS * PER_THREAD / 2);
    for (uint64_t i = 1; i < THREADS * PER_THREAD; i += 2) {
        uint64_t ep = 0;
        assert_int_equal(kvs_resv_take(t, i, &mem[i], &ep), 1);
        assert_int_equal(ep, i + 1);
    }
    assert_int_equal(kvs_resv_count(t), 0);
    kvs_resv_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_take_once),
        cmocka_unit_test(test_many_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
