/* Index tests: insert/find/remove many binary keys through table growth;
 * treap ordered searches against a sorted reference. */
#include "master/tree.h"
#include "test_master_util.h"

static void test_index_many(void **st)
{
    (void)st;
    kvs_index ix;
    assert_int_equal(kvs_index_init(&ix), KVS_OK);
    enum { N = 50000 };
    kvs_obj **objs = calloc(N, sizeof *objs);
    for (int i = 0; i < N; i++) {
        uint8_t key[12] = {0};
        memcpy(key + 4, &i, sizeof i); /* keys with NUL bytes */
        assert_null(kvs_index_find(&ix, key, sizeof key));
        objs[i] = kvs_obj_new(key, sizeof key);
        objs[i]->obj_id = (uint64_t)i;
        kvs_index_insert(&ix, objs[i]);
    }
    assert_int_equal(ix.count, N);
    assert_true(ix.mask + 1 >= N);
    for (int i = 0; i < N; i++) {
        uint8_t key[12] = {0};
        memcpy(key + 4, &i, sizeof i);
        kvs_obj *o = kvs_index_find(&ix, key, sizeof key);
        assert_ptr_equal(o, objs[i]);
        assert_null(kvs_index_find(&ix, key, sizeof key - 1)); /* prefix is another key */
    }
    for (int i = 0; i < N; i += 2) kvs_index_remove(&ix, objs[i]);
    kvs_index_remove(&ix, objs[0]); /* no-op when unlinked */
    assert_int_equal(ix.count, N / 2);
    for (int i = 0; i < N; i++) {
        uint8_t key[12] = {0};
        memcpy(key + 4, &i, sizeof i);
        kvs_obj *o = kvs_index_find(&ix, key, sizeof key);
        if (i % 2) assert_ptr_equal(o, objs[i]);
        else assert_null(o);
        assert_int_equal(objs[i]->linked, i % 2);
    }
    for (int i = 0; i < N; i++) free(objs[i]);
    free(objs);
    kvs_index_destroy(&ix);
}

typedef struct tn {
    kvs_tnode n;
} tn;

static void test_tree_order(void **st)
{
    (void)st;
    enum { N = 4000 };
    kvs_tree t;
    kvs_tree_init(&t, 7);
    tn *v = calloc(N, sizeof *v);
    uint8_t *in = calloc(N, 1);
    for (int i = 0; i < N; i++) {
        v[i].n.k1 = (uint64_t)(i * 7919 % N);
        v[i].n.k2 = (uint64_t)i;
    }
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < N; i++) {
            int want = (i * 31 + round * 17) % 3 != 0;
            if (want && !in[i]) kvs_tree_insert(&t, &v[i].n);
            if (!want && in[i]) kvs_tree_remove(&t, &v[i].n);
            in[i] = (uint8_t)want;
        }
        /* compare ceil/lower against a linear scan */
        for (uint64_t q = 0; q < N; q += 13) {
            kvs_tnode *c = kvs_tree_ceil(&t, q, 0), *l = kvs_tree_lower(&t, q, 0);
            kvs_tnode *bc = NULL, *bl = NULL;
            for (int i = 0; i < N; i++) {
                if (!in[i]) continue;
                kvs_tnode *n = &v[i].n;
                int ge = n->k1 > q || (n->k1 == q);
                if (ge && (!bc || n->k1 < bc->k1 || (n->k1 == bc->k1 && n->k2 < bc->k2))) bc = n;
                if (!ge && (!bl || n->k1 > bl->k1 || (n->k1 == bl->k1 && n->k2 > bl->k2))) bl = n;
            }
            assert_ptr_equal(c, bc);
            assert_ptr_equal(l, bl);
        }
        size_t cnt = 0;
        for (int i = 0; i < N; i++) cnt += in[i];
        assert_int_equal(t.count, cnt);
    }
    free(v);
    free(in);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_index_many),
        cmocka_unit_test(test_tree_order),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
