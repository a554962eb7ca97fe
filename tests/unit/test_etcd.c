/* The etcd client (src/common/etcd.h): parsing of the JSON gateway's
 * replies, which are bytes from another process (valid replies as etcd
 * 3.4 sends them, and malformed ones: wrong types, bad base64, int64s that
 * are not numbers, truncation), base64, etcd:// URLs, and, when the etcd
 * binary is installed, the calls against a real etcd started here (lease
 * grant, keepalive, create-if-absent, list, revoke: what the election
 * uses). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/etcd.h"
#include "common/metaclient.h"
#include "kvshelf/errors.h"
#include "test_etcd_util.h"

#define S(x) x, strlen(x)

static void test_b64(void **state)
{
    (void)state;
    const char *in[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    const char *out[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    for (size_t i = 0; i < 7; i++) {
        char e[32];
        assert_int_equal(kvs_b64_encode(in[i], strlen(in[i]), e), strlen(out[i]));
        assert_string_equal(e, out[i]);
        uint8_t d[32];
        size_t n = 99;
        assert_int_equal(kvs_b64_decode(e, strlen(e), d, &n), KVS_OK);
        assert_int_equal(n, strlen(in[i]));
        assert_memory_equal(d, in[i], n);
    }
    uint8_t bin[256], d[400];
    char e[400];
    for (int i = 0; i < 256; i++) bin[i] = (uint8_t)i;
    size_t n;
    kvs_b64_encode(bin, 256, e);
    assert_int_equal(kvs_b64_decode(e, strlen(e), d, &n), KVS_OK);
    assert_int_equal(n, 256);
    assert_memory_equal(d, bin, 256);
    assert_int_equal(kvs_b64_decode(S("Zm9v!"), d, &n), KVS_ERR_PROTO);
    assert_int_equal(kvs_b64_decode(S("Z"), d, &n), KVS_ERR_PROTO);
    assert_int_equal(kvs_b64_decode(S("Zm 9v"), d, &n), KVS_ERR_PROTO);
}

static void test_range(void **state)
{
    (void)state;
    /* as etcd 3.4 sends it: int64s as strings, bytes as base64 */
    const char *r =
        "{\"header\":{\"cluster_id\":\"1\",\"revision\":\"2\"},\"kvs\":[{\"key\":\"a2V5\","
        "\"create_revision\":\"2\",\"mod_revision\":\"3\",\"version\":\"1\",\"value\":\"AAEC/w==\","
        "\"lease\":\"4111120418571191815\"},{\"key\":\"azI=\"}],\"count\":\"2\"}";
    kvs_etcd_kv *kvs = NULL;
    size_t n = 0;
    assert_int_equal(kvs_etcd_parse_range(S(r), &kvs, &n), KVS_OK);
    assert_int_equal(n, 2);
    assert_int_equal(kvs[0].key_len, 3);
    assert_string_equal(kvs[0].key, "key");
    assert_int_equal(kvs[0].value_len, 4);
    assert_memory_equal(kvs[0].value, "\x00\x01\x02\xff", 4);
    assert_int_equal(kvs[0].lease, 4111120418571191815ll);
    assert_int_equal(kvs[0].create_revision, 2);
    assert_int_equal(kvs[0].mod_revision, 3);
    assert_string_equal(kvs[1].key, "k2");
    assert_int_equal(kvs[1].value_len, 0); /* an empty value is omitted */
    assert_string_equal(kvs[1].value, "");
    assert_int_equal(kvs[1].lease, 0);
    kvs_etcd_kvs_free(kvs, n);

    /* no key: no "kvs" at all */
    assert_int_equal(kvs_etcd_parse_range(S("{\"header\":{\"revision\":\"2\"}}"), &kvs, &n),
                     KVS_OK);
    assert_int_equal(n, 0);
    assert_null(kvs);
    assert_int_equal(kvs_etcd_parse_range(S("{\"kvs\":[]}"), &kvs, &n), KVS_OK);
    assert_int_equal(n, 0);
    /* numbers instead of strings are taken too */
    assert_int_equal(kvs_etcd_parse_range(S("{\"kvs\":[{\"key\":\"YQ==\",\"lease\":7}]}"), &kvs,
                                          &n),
                     KVS_OK);
    assert_int_equal(kvs[0].lease, 7);
    kvs_etcd_kvs_free(kvs, n);

    static const char *bad[] = {
        "", "null", "[]", "\"x\"", "{\"kvs\":{}}", "{\"kvs\":[1]}", "{\"kvs\":[[]]}",
        "{\"kvs\":[{\"key\":5}]}", "{\"kvs\":[{\"key\":\"%%%\"}]}",
        "{\"kvs\":[{\"key\":\"YQ==\",\"value\":true}]}",
        "{\"kvs\":[{\"key\":\"YQ==\",\"lease\":\"12x\"}]}",
        "{\"kvs\":[{\"key\":\"YQ==\",\"lease\":\"\"}]}",
        "{\"kvs\":[{\"key\":\"YQ==\",\"lease\":1.5}]}",
        "{\"kvs\":[{\"key\":\"YQ==\",\"lease\":1e300}]}",
        "{\"kvs\":[{\"key\":\"YQ==\",\"lease\":\"99999999999999999999999\"}]}",
        "{\"kvs\":[{\"key\":\"YQ==\"},{\"key\":\"Y\"}]}",
        "{\"kvs\":[{\"key\":\"YQ==\"}", /* truncated */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kvs = (kvs_etcd_kv *)1;
        n = 9;
        if (kvs_etcd_parse_range(S(bad[i]), &kvs, &n) != KVS_ERR_PROTO) fail_msg("%s", bad[i]);
        assert_null(kvs);
        assert_int_equal(n, 0);
    }
    /* not NUL-terminated: only `len` bytes are read */
    char buf[64];
    memcpy(buf, "{\"kvs\":[]}XXXXXXXXXX", 20);
    assert_int_equal(kvs_etcd_parse_range(buf, 10, &kvs, &n), KVS_OK);
    assert_int_equal(kvs_etcd_parse_range(buf, 9, &kvs, &n), KVS_ERR_PROTO);
}

static void test_lease_txn_error(void **state)
{
    (void)state;
    int64_t id, ttl;
    assert_int_equal(kvs_etcd_parse_lease(S("{\"header\":{},\"ID\":\"4111120418571191813\","
                                            "\"TTL\":\"2\"}"),
                                          &id, &ttl),
                     KVS_OK);
    assert_int_equal(id, 4111120418571191813ll);
    assert_int_equal(ttl, 2);
    /* a keepalive: under "result"; an expired lease has no TTL */
    assert_int_equal(kvs_etcd_parse_lease(S("{\"result\":{\"ID\":\"5\",\"TTL\":\"3\"}}"), &id, &ttl),
                     KVS_OK);
    assert_int_equal(id, 5);
    assert_int_equal(ttl, 3);
    assert_int_equal(kvs_etcd_parse_lease(S("{\"result\":{\"header\":{},\"ID\":\"5\"}}"), &id, &ttl),
                     KVS_OK);
    assert_int_equal(ttl, 0);
    assert_int_equal(kvs_etcd_parse_lease(S("{\"result\":7}"), &id, &ttl), KVS_ERR_PROTO);
    assert_int_equal(kvs_etcd_parse_lease(S("{\"TTL\":\"x\"}"), &id, &ttl), KVS_ERR_PROTO);
    assert_int_equal(kvs_etcd_parse_lease(S("{\"TTL\":[]}"), &id, &ttl), KVS_ERR_PROTO);
    assert_int_equal(kvs_etcd_parse_lease(S("{"), &id, &ttl), KVS_ERR_PROTO);
    assert_int_equal(id, 0);
    assert_int_equal(ttl, 0);

    int ok = 7;
    assert_int_equal(kvs_etcd_parse_txn(S("{\"header\":{},\"succeeded\":true,\"responses\":[]}"),
                                        &ok),
                     KVS_OK);
    assert_int_equal(ok, 1);
    assert_int_equal(kvs_etcd_parse_txn(S("{\"header\":{},\"responses\":[]}"), &ok), KVS_OK);
    assert_int_equal(ok, 0); /* false is omitted */
    assert_int_equal(kvs_etcd_parse_txn(S("{\"succeeded\":false}"), &ok), KVS_OK);
    assert_int_equal(ok, 0);
    assert_int_equal(kvs_etcd_parse_txn(S("{\"succeeded\":\"true\"}"), &ok), KVS_ERR_PROTO);
    assert_int_equal(ok, 0);
    assert_int_equal(kvs_etcd_parse_txn(S("true"), &ok), KVS_ERR_PROTO);

    int64_t d = 9;
    assert_int_equal(kvs_etcd_parse_deleted(S("{\"deleted\":\"1\"}"), &d), KVS_OK);
    assert_int_equal(d, 1);
    assert_int_equal(kvs_etcd_parse_deleted(S("{\"header\":{}}"), &d), KVS_OK);
    assert_int_equal(d, 0);
    assert_int_equal(kvs_etcd_parse_deleted(S("{\"deleted\":{}}"), &d), KVS_ERR_PROTO);

    int code;
    char msg[16];
    assert_int_equal(kvs_etcd_parse_error(S("{\"error\":\"etcdserver: requested lease not found\","
                                            "\"message\":\"etcdserver: requested lease not "
                                            "found\",\"code\":5}"),
                                          &code, msg, sizeof msg),
                     KVS_OK);
    assert_int_equal(code, 5);
    assert_string_equal(msg, "etcdserver: req"); /* truncated to the buffer */
    assert_int_equal(kvs_etcd_parse_error(S("{\"code\":-1}"), &code, msg, sizeof msg),
                     KVS_ERR_PROTO);
    assert_int_equal(kvs_etcd_parse_error(S("{\"code\":\"5\"}"), &code, msg, sizeof msg),
                     KVS_ERR_PROTO);
    assert_int_equal(kvs_etcd_parse_error(S("<html>"), &code, msg, sizeof msg), KVS_ERR_PROTO);
}

static void test_url(void **state)
{
    (void)state;
    char eps[256], pre[64];
    assert_int_equal(kvs_etcd_parse_url("etcd://127.0.0.1:2379", eps, sizeof eps, pre, sizeof pre),
                     KVS_OK);
    assert_string_equal(eps, "127.0.0.1:2379");
    assert_string_equal(pre, KVS_ETCD_DEFAULT_PREFIX);
    assert_int_equal(kvs_etcd_parse_url("etcd://a:1,b:2;c:3/my/pool/", eps, sizeof eps, pre,
                                        sizeof pre),
                     KVS_OK);
    assert_string_equal(eps, "a:1,b:2;c:3");
    assert_string_equal(pre, "my/pool");
    assert_int_equal(kvs_etcd_parse_url("etcd://h", eps, sizeof eps, pre, sizeof pre), KVS_OK);
    static const char *bad[] = {"", "http://a:1", "etcd://", "etcd:///x", "etcd://a:0",
                                "etcd://a:99999", "etcd://unix:/x", "etcd://a:1/p q",
                                "etcd://1:1,2:2,3:3,4:4,5:5,6:6,7:7,8:8,9:9", "etcd://,,"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (kvs_etcd_parse_url(bad[i], eps, sizeof eps, pre, sizeof pre) == KVS_OK)
            fail_msg("accepted '%s'", bad[i]);
    assert_int_equal(kvs_etcd_parse_url("etcd://127.0.0.1:2379", eps, 8, pre, sizeof pre),
                     KVS_ERR_TOO_LARGE);
    kvs_etcd *e = NULL;
    assert_int_equal(kvs_etcd_new("", 100, &e), KVS_ERR_INVALID);
    assert_int_equal(kvs_etcd_new("http://a:1", 100, &e), KVS_ERR_INVALID);
    assert_null(e);
}

/* ---- against a real etcd (skipped when it is not installed) ---- */

static void test_live(void **state)
{
    (void)state;
    te_etcd t;
    te_etcd_start(&t, "/tmp/kvs-etcd-XXXXXX", "etcd is not installed: skipping the live part\n");
    int cp = t.client_port;

    char ep[64];
    /* a dead endpoint first: requests go on to the next one */
    snprintf(ep, sizeof ep, "127.0.0.1:%d,127.0.0.1:%d", te_free_port(), cp);
    kvs_etcd *e = NULL;
    assert_int_equal(kvs_etcd_new(ep, 1000, &e), KVS_OK);
    te_etcd_wait(e, "t/leader");
    char *v = NULL;
    int64_t id = 0, id2 = 0, ttl = 0, lease = 0;
    assert_int_equal(kvs_etcd_lease_grant(e, 5, &id), KVS_OK);
    assert_int_equal(kvs_etcd_lease_grant(e, 5, &id2), KVS_OK);
    assert_true(id != 0 && id2 != 0 && id != id2);
    assert_int_equal(kvs_etcd_create(e, "t/leader", "127.0.0.1:1", 11, id), KVS_OK);
    assert_int_equal(kvs_etcd_create(e, "t/leader", "127.0.0.1:2", 11, id2), KVS_ERR_EXISTS);
    size_t n = 0;
    assert_int_equal(kvs_etcd_get(e, "t/leader", &v, &n, &lease), KVS_OK);
    assert_string_equal(v, "127.0.0.1:1");
    assert_int_equal(n, 11);
    assert_int_equal(lease, id);
    free(v);
    assert_int_equal(kvs_etcd_lease_keepalive(e, id, &ttl), KVS_OK);
    assert_int_equal(ttl, 5);
    assert_int_equal(kvs_etcd_put(e, "t/members/a", "A", 1, id), KVS_OK);
    assert_int_equal(kvs_etcd_put(e, "t/members/b", "\0B", 2, 0), KVS_OK);
    assert_int_equal(kvs_etcd_put(e, "t/membersX", "X", 1, 0), KVS_OK);
    kvs_etcd_kv *kvs = NULL;
    assert_int_equal(kvs_etcd_list(e, "t/members/", 0, &kvs, &n), KVS_OK);
    assert_int_equal(n, 2);
    assert_string_equal(kvs[0].key, "t/members/a");
    assert_int_equal(kvs[1].value_len, 2);
    assert_memory_equal(kvs[1].value, "\0B", 2);
    kvs_etcd_kvs_free(kvs, n);
    /* revoking the leader's lease takes its keys: the other one wins */
    assert_int_equal(kvs_etcd_lease_revoke(e, id), KVS_OK);
    assert_int_equal(kvs_etcd_lease_revoke(e, id), KVS_ERR_NOT_FOUND);
    assert_int_equal(kvs_etcd_lease_keepalive(e, id, &ttl), KVS_ERR_NOT_FOUND);
    assert_int_equal(kvs_etcd_get(e, "t/members/a", &v, NULL, NULL), KVS_ERR_NOT_FOUND);
    assert_int_equal(kvs_etcd_create(e, "t/leader", "127.0.0.1:2", 11, id2), KVS_OK);
    int64_t d = 0;
    assert_int_equal(kvs_etcd_delete(e, "t/membersX", &d), KVS_OK);
    assert_int_equal(d, 1);
    assert_int_equal(kvs_etcd_delete(e, "t/membersX", &d), KVS_OK);
    assert_int_equal(d, 0);
    kvs_etcd_free(e);

    /* the metadata client with an etcd:// metadata_server: keys as they are */
    char url[96];
    snprintf(url, sizeof url, "etcd://127.0.0.1:%d", cp);
    assert_int_equal(kvs_meta_put(url, "mooncake/ram/seg", NULL, "{\"a\":1}", 7, 2000), KVS_OK);
    assert_int_equal(kvs_meta_get(url, "mooncake/ram/seg", NULL, 2000, &v, &n), KVS_OK);
    assert_int_equal(n, 7);
    assert_string_equal(v, "{\"a\":1}");
    free(v);
    assert_int_equal(kvs_meta_delete(url, "mooncake/ram/seg", NULL, 2000), KVS_OK);
    assert_int_equal(kvs_meta_delete(url, "mooncake/ram/seg", NULL, 2000), KVS_ERR_NOT_FOUND);
    assert_int_equal(kvs_meta_get(url, "mooncake/ram/seg", NULL, 2000, &v, &n), KVS_ERR_NOT_FOUND);
    assert_null(v);

    te_etcd_stop(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_b64),
        cmocka_unit_test(test_range),
        cmocka_unit_test(test_lease_txn_error),
        cmocka_unit_test(test_url),
        cmocka_unit_test(test_live),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
