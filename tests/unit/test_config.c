/* Unit tests of the configuration loader (src/common/config.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvshelf/config.h"
#include "kvshelf/errors.h"

static const char *env_vars[] = {
    "KVSHELF_CONFIG",          "MOONCAKE_CONFIG_PATH",          "KVSHELF_LOCAL_HOSTNAME",
    "KVSHELF_METADATA_SERVER", "KVSHELF_MASTER_SERVER_ADDRESS", "KVSHELF_PROTOCOL",
    "KVSHELF_DEVICE_NAME",     "KVSHELF_GLOBAL_SEGMENT_SIZE",   "KVSHELF_LOCAL_BUFFER_SIZE",
    "KVSHELF_SECRET",          "KVSHELF_TIMEOUT_MS",            "KVSHELF_RUNTIME_DIR",
};

static int clear_env(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof env_vars / sizeof env_vars[0]; i++) unsetenv(env_vars[i]);
    return 0;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

static void test_defaults(void **state)
{
    (void)state;
    kvs_config c;
    kvs_config_init(&c);
    assert_string_equal(c.local_hostname, "127.0.0.1");
    assert_string_equal(c.metadata_server, "");
    assert_string_equal(c.master_server_address, "");
    assert_string_equal(c.protocol, "tcp");
    assert_string_equal(c.device_name, "");
    assert_string_equal(c.secret, "");
    assert_int_equal(c.global_segment_size, 3355443200ULL);
    assert_int_equal(c.local_buffer_size, 1073741824ULL);
    assert_int_equal(c.timeout_ms, 5000);
    assert_true(c.runtime_dir[0] == '/');
    char err[256] = "x";
    assert_int_equal(kvs_config_validate(&c, err, sizeof err), KVS_OK);
    assert_string_equal(err, "");
}

static void test_runtime_dir_default(void **state)
{
    (void)state;
    kvs_config c;
    setenv("XDG_RUNTIME_DIR", "/run/user/4242", 1);
    kvs_config_init(&c);
    assert_string_equal(c.runtime_dir, "/run/user/4242/kvshelf");
    unsetenv("XDG_RUNTIME_DIR");
    kvs_config_init(&c);
    char want[64];
    snprintf(want, sizeof want, "/tmp/kvshelf-%u", (unsigned)getuid());
    assert_string_equal(c.runtime_dir, want);
    setenv("XDG_RUNTIME_DIR", "relative/dir", 1); /* not absolute: ignored */
    kvs_config_init(&c);
    assert_string_equal(c.runtime_dir, want);
    /* KVSHELF_RUNTIME_DIR is the default before XDG (all processes agree on
     * where the pool secret is); a relative one is ignored */
    setenv("XDG_RUNTIME_DIR", "/run/user/4242", 1);
    setenv("KVSHELF_RUNTIME_DIR", "/tmp/kvs-rd", 1);
    kvs_config_init(&c);
    assert_string_equal(c.runtime_dir, "/tmp/kvs-rd");
    setenv("KVSHELF_RUNTIME_DIR", "rel", 1);
    kvs_config_init(&c);
    assert_string_equal(c.runtime_dir, "/run/user/4242/kvshelf");
    unsetenv("KVSHELF_RUNTIME_DIR");
    unsetenv("XDG_RUNTIME_DIR");
}

static void test_json_all_keys(void **state)
{
    (void)state;
    kvs_config c;
    kvs_config_init(&c);
    char err[256];
    const char *j = "{\"local_hostname\":\"10.0.0.5\",\"metadata_server\":"
                    "\"http://10.0.0.1:8080/metadata\",\"master_server_address\":\"10.0.0.1:50051\","
                    "\"protocol\":\"tcp\",\"device_name\":\"mlx5_0,mlx5_1\","
                    "\"global_segment_size\":3355443200,\"local_buffer_size\":\"512MiB\","
                    "\"secret\":\"s3cret\",\"timeout_ms\":250,\"runtime_dir\":\"/tmp/kvs-x\"}";
    assert_int_equal(kvs_config_load_json(&c, j, err, sizeof err), KVS_OK);
    assert_string_equal(c.local_hostname, "10.0.0.5");
    assert_string_equal(c.metadata_server, "http://10.0.0.1:8080/metadata");
    assert_string_equal(c.master_server_address, "10.0.0.1:50051");
    assert_string_equal(c.device_name, "mlx5_0,mlx5_1");
    assert_int_equal(c.global_segment_size, 3355443200ULL);
    assert_int_equal(c.local_buffer_size, 512ull << 20);
    assert_string_equal(c.secret, "s3cret");
    assert_int_equal(c.timeout_ms, 250);
    assert_string_equal(c.runtime_dir, "/tmp/kvs-x");
    assert_int_equal(kvs_config_validate(&c, err, sizeof err), KVS_OK);
}

/* A Mooncake config file as users have them. */
static void test_mooncake_file(void **state)
{
    (void)state;
    char path[] = "/tmp/kvs_test_config_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    write_file(path, "{\n  \"local_hostname\": \"localhost\",\n"
                     "  \"metadata_server\": \"P2PHANDSHAKE\",\n"
                     "  \"global_segment_size\": 3355443200,\n"
                     "  \"local_buffer_size\": 1073741824,\n"
                     "  \"protocol\": \"tcp\",\n  \"device_name\": \"\",\n"
                     "  \"master_server_address\": \"localhost:50051\"\n}\n");
    kvs_config c;
    kvs_config_init(&c);
    char err[256];
    assert_int_equal(kvs_config_load_file(&c, path, err, sizeof err), KVS_OK);
    assert_string_equal(c.local_hostname, "localhost");
    assert_string_equal(c.metadata_server, "P2PHANDSHAKE");
    assert_string_equal(c.master_server_address, "localhost:50051");
    assert_int_equal(kvs_config_validate(&c, err, sizeof err), KVS_OK);

    /* Errors in a file name the file. */
    write_file(path, "{\"local_hostname\": \"a\",\n \"bogus\": 1}");
    assert_int_equal(kvs_config_load_file(&c, path, err, sizeof err), KVS_ERR_CONFIG);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "bogus"));
    assert_string_equal(c.local_hostname, "localhost"); /* unchanged */

    write_file(path, "{\"local_hostname\": \"a\",\n \"protocol\": }");
    assert_int_equal(kvs_config_load_file(&c, path, err, sizeof err), KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "line 2"));
    unlink(path);

    assert_int_equal(kvs_config_load_file(&c, path, err, sizeof err), KVS_ERR_IO);
    assert_non_null(strstr(err, path));
    assert_int_equal(kvs_config_load_file(&c, "/", err, sizeof err) < 0, 1);
}

static void test_unknown_key(void **state)
{
    (void)state;
    kvs_config c, before;
    kvs_config_init(&c);
    before = c;
    char err[512];
    assert_int_equal(
        kvs_config_load_json(&c, "{\"protocol\":\"tcp\",\"master_addr\":\"x:1\"}", err, sizeof err),
        KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "unknown key 'master_addr'"));
    assert_memory_equal(&c, &before, sizeof c);
}

/* "store": "kvshelf" is this loader's own pool (accepted); "mooncake" is
 * refused with what to use instead; anything else names the valid values. */
static void test_store_key(void **state)
{
    (void)state;
    kvs_config c, before;
    kvs_config_init(&c);
    char err[512];
    assert_int_equal(kvs_config_load_json(&c, "{\"store\":\"kvshelf\",\"protocol\":\"tcp\"}", err,
                                          sizeof err),
                     KVS_OK);
    kvs_config_init(&c);
    before = c;
    assert_int_equal(kvs_config_load_json(&c,
                                          "{\"store\":\"mooncake\",\"master_server_address\":"
                                          "\"127.0.0.1:50051\"}",
                                          err, sizeof err),
                     KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "Mooncake"));
    assert_non_null(strstr(err, "MooncakeBlockStore"));
    assert_memory_equal(&c, &before, sizeof c);
    assert_int_equal(kvs_config_load_json(&c, "{\"store\":\"redis\"}", err, sizeof err),
                     KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "'redis'"));
    assert_int_equal(kvs_config_load_json(&c, "{\"store\":3}", err, sizeof err), KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "a number"));
}

static void test_wrong_types(void **state)
{
    (void)state;
    static const struct {
        const char *json, *want1, *want2;
    } cases[] = {
        {"{\"local_hostname\":5}", "local_hostname", "a number"},
        {"{\"protocol\":true}", "protocol", "a boolean"},
        {"{\"protocol\":\"udp\"}", "protocol", "'udp'"},
        {"{\"global_segment_size\":-1}", "global_segment_size", "-1"},
        {"{\"global_segment_size\":1.5}", "global_segment_size", "1.5"},
        {"{\"global_segment_size\":\"lots\"}", "global_segment_size", "'lots'"},
        {"{\"global_segment_size\":[1]}", "global_segment_size", "an array"},
        {"{\"local_buffer_size\":\"12XB\"}", "local_buffer_size", "'12XB'"},
        {"{\"local_buffer_size\":1e30}", "local_buffer_size", "size"},
        {"{\"timeout_ms\":0}", "timeout_ms", "0"},
        {"{\"timeout_ms\":-5}", "timeout_ms", "-5"},
        {"{\"timeout_ms\":\"abc\"}", "timeout_ms", "'abc'"},
        {"{\"timeout_ms\":1e12}", "timeout_ms", "1000000000000"},
        {"{\"timeout_ms\":null}", "timeout_ms", "null"},
        {"{\"device_name\":\"mlx5_0, mlx5_1\"}", "device_name", "spaces"},
        {"{\"secret\":{}}", "secret", "an object"},
        {"[1,2]", "JSON object", "an array"},
        {"\"x\"", "JSON object", "a string"},
        {"", "invalid JSON", "line 1"},
        {"{", "invalid JSON", "line 1"},
        {"{\"a\":1} trailing", "invalid JSON", "column"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kvs_config c, before;
        kvs_config_init(&c);
        before = c;
        char err[512];
        int rc = kvs_config_load_json(&c, cases[i].json, err, sizeof err);
        if (rc != KVS_ERR_CONFIG || !strstr(err, cases[i].want1) || !strstr(err, cases[i].want2))
            fail_msg("case %zu %s: rc %d err '%s'", i, cases[i].json, rc, err);
        assert_memory_equal(&c, &before, sizeof c);
    }
}

static void test_too_long_string(void **state)
{
    (void)state;
    kvs_config c;
    kvs_config_init(&c);
    char json[1200], err[256];
    char longv[600];
    memset(longv, 'a', sizeof longv - 1);
    longv[sizeof longv - 1] = '\0';
    snprintf(json, sizeof json, "{\"local_hostname\":\"%s\"}", longv);
    assert_int_equal(kvs_config_load_json(&c, json, err, sizeof err), KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "local_hostname"));
    assert_non_null(strstr(err, "too long"));
    /* 255 bytes fit in local_hostname[256]. */
    longv[255] = '\0';
    snprintf(json, sizeof json, "{\"local_hostname\":\"%s\"}", longv);
    assert_int_equal(kvs_config_load_json(&c, json, err, sizeof err), KVS_OK);
    assert_int_equal(strlen(c.local_hostname), 255);
}

static void test_protocol_case(void **state)
{
    (void)state;
    kvs_config c;
    kvs_config_init(&c);
    char err[256];
    assert_int_equal(kvs_config_load_json(&c, "{\"protocol\":\"TCP\"}", err, sizeof err), KVS_OK);
    assert_string_equal(c.protocol, "tcp");
    assert_int_equal(kvs_config_load_json(&c, "{\"protocol\":\"rdma\"}", err, sizeof err), KVS_OK);
    assert_string_equal(c.protocol, "rdma");
    assert_int_equal(kvs_config_validate(&c, err, sizeof err), KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "rdma"));
    assert_non_null(strstr(err, "not built"));
}

static void test_parse_size(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        uint64_t want;
    } ok[] = {
        {"0", 0},
        {"1073741824", 1073741824ull},
        {"1K", 1024},
        {"1KB", 1024},
        {"1KiB", 1024},
        {"1k", 1024},
        {"64MiB", 64ull << 20},
        {"64 MB", 64ull << 20},
        {"2G", 2ull << 30},
        {"2gb", 2ull << 30},
        {"3.125GiB", 3355443200ull},
        {"1.5K", 1536},
        {"0.5", 0},
        {"1T", 1ull << 40},
        {"1TiB", 1ull << 40},
        {"  10  ", 10},
        {"100B", 100},
        {"18446744073709551615", UINT64_MAX},
        {"16383P", 16383ull << 50},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        uint64_t v = 12345;
        if (kvs_parse_size(ok[i].text, &v) != KVS_OK || v != ok[i].want)
            fail_msg("'%s' -> %llu", ok[i].text, (unsigned long long)v);
    }
    static const char *bad[] = {"",     " ",     "abc",   "-1",   "1X",     "1 K B", "1..5",
                                "1.5.5", ".",    "K",     "1e9",  "0x10",   "18446744073709551616",
                                "16384P", "1KiBs", "9999999999999999999999999999999999999",
                                "+5"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t v = 7;
        if (kvs_parse_size(bad[i], &v) != KVS_ERR_CONFIG) fail_msg("'%s' accepted", bad[i]);
        assert_int_equal(v, 7);
    }
    uint64_t v;
    assert_int_equal(kvs_parse_size(NULL, &v), KVS_ERR_INVALID);
    assert_int_equal(kvs_parse_size("1", NULL), KVS_ERR_INVALID);
}

static void test_env(void **state)
{
    (void)state;
    kvs_config c;
    kvs_config_init(&c);
    char err[512];
    setenv("KVSHELF_LOCAL_HOSTNAME", "192.168.1.7", 1);
    setenv("KVSHELF_SECRET", "abc", 1);
    setenv("KVSHELF_GLOBAL_SEGMENT_SIZE", "1GiB", 1);
    setenv("KVSHELF_LOCAL_BUFFER_SIZE", "", 1); /* empty number: ignored */
    setenv("KVSHELF_TIMEOUT_MS", "1234", 1);
    setenv("KVSHELF_MASTER_SERVER_ADDRESS", "unix:/tmp/m.sock", 1);
    setenv("KVSHELF_PROTOCOL", "tcp", 1);
    setenv("KVSHELF_DEVICE_NAME", "", 1);
    setenv("KVSHELF_METADATA_SERVER", "http://127.0.0.1:23790/metadata", 1);
    setenv("KVSHELF_RUNTIME_DIR", "/tmp/kvs-env", 1);
    assert_int_equal(kvs_config_load_env(&c, err, sizeof err), KVS_OK);
    assert_string_equal(c.local_hostname, "192.168.1.7");
    assert_string_equal(c.secret, "abc");
    assert_int_equal(c.global_segment_size, 1ull << 30);
    assert_int_equal(c.local_buffer_size, KVS_DEFAULT_LOCAL_BUFFER_SIZE);
    assert_int_equal(c.timeout_ms, 1234);
    assert_string_equal(c.master_server_address, "unix:/tmp/m.sock");
    assert_string_equal(c.runtime_dir, "/tmp/kvs-env");
    assert_int_equal(kvs_config_validate(&c, err, sizeof err), KVS_OK);

    /* A bad variable is named; the config stays unchanged. */
    kvs_config before = c;
    setenv("KVSHELF_TIMEOUT_MS", "soon", 1);
    assert_int_equal(kvs_config_load_env(&c, err, sizeof err), KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "KVSHELF_TIMEOUT_MS"));
    assert_non_null(strstr(err, "soon"));
    assert_memory_equal(&c, &before, sizeof c);
    setenv("KVSHELF_TIMEOUT_MS", "0", 1);
    assert_int_equal(kvs_config_load_env(&c, err, sizeof err), KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "KVSHELF_TIMEOUT_MS"));
    unsetenv("KVSHELF_TIMEOUT_MS");
    setenv("KVSHELF_PROTOCOL", "quic", 1);
    assert_int_equal(kvs_config_load_env(&c, err, sizeof err), KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "KVSHELF_PROTOCOL"));
    clear_env(NULL);
}

static void test_env_file_then_vars(void **state)
{
    (void)state;
    char path[] = "/tmp/kvs_test_envcfg_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    write_file(path, "{\"timeout_ms\": 77, \"master_server_address\": \"127.0.0.1:1\"}");
    char err[512];
    kvs_config c;

    /* MOONCAKE_CONFIG_PATH is used when KVSHELF_CONFIG is unset. */
    kvs_config_init(&c);
    setenv("MOONCAKE_CONFIG_PATH", path, 1);
    assert_int_equal(kvs_config_load_env(&c, err, sizeof err), KVS_OK);
    assert_int_equal(c.timeout_ms, 77);

    /* Variables override the file. */
    kvs_config_init(&c);
    setenv("KVSHELF_CONFIG", path, 1);
    setenv("MOONCAKE_CONFIG_PATH", "/nonexistent/x.json", 1);
    setenv("KVSHELF_TIMEOUT_MS", "99", 1);
    assert_int_equal(kvs_config_load_env(&c, err, sizeof err), KVS_OK);
    assert_int_equal(c.timeout_ms, 99);
    assert_string_equal(c.master_server_address, "127.0.0.1:1");

    /* A missing file is an error naming the variable. */
    unsetenv("KVSHELF_CONFIG");
    kvs_config before = c;
    assert_int_equal(kvs_config_load_env(&c, err, sizeof err), KVS_ERR_IO);
    assert_non_null(strstr(err, "MOONCAKE_CONFIG_PATH"));
    assert_memory_equal(&c, &before, sizeof c);
    clear_env(NULL);
    unlink(path);
}

static void expect_invalid(const kvs_config *c, const char *want)
{
    char err[512];
    int rc = kvs_config_validate(c, err, sizeof err);
    if (rc != KVS_ERR_CONFIG || !strstr(err, want))
        fail_msg("validate: rc %d err '%s', wanted '%s'", rc, err, want);
}

static void test_validate(void **state)
{
    (void)state;
    kvs_config c;
    char err[512];

    kvs_config_init(&c);
    strcpy(c.local_hostname, "10.1.2.3");
    expect_invalid(&c, "secret");
    strcpy(c.secret, "x");
    assert_int_equal(kvs_config_validate(&c, err, sizeof err), KVS_OK);

    static const char *loop[] = {"localhost", "127.0.0.1", "127.5.5.5", "::1", "[::1]:1234",
                                 "localhost:9000"};
    for (size_t i = 0; i < sizeof loop / sizeof loop[0]; i++) {
        kvs_config_init(&c);
        strcpy(c.local_hostname, loop[i]);
        if (kvs_config_validate(&c, err, sizeof err) != KVS_OK) fail_msg("%s: %s", loop[i], err);
    }
    kvs_config_init(&c);
    c.local_hostname[0] = '\0';
    expect_invalid(&c, "local_hostname");
    kvs_config_init(&c);
    strcpy(c.local_hostname, "unix:/x");
    expect_invalid(&c, "local_hostname");

    kvs_config_init(&c);
    c.timeout_ms = 0;
    expect_invalid(&c, "timeout_ms");
    c.timeout_ms = -1;
    expect_invalid(&c, "timeout_ms");

    kvs_config_init(&c);
    strcpy(c.protocol, "udp");
    expect_invalid(&c, "protocol");

    static const char *good_master[] = {"127.0.0.1:50001", "host", "[::1]:5", "unix:/tmp/s",
                                        "etcd://127.0.0.1:2379", "etcd://a:1,b:2/pool",
                                        "etcd://10.0.0.1:2379;10.0.0.2:2379"};
    for (size_t i = 0; i < sizeof good_master / sizeof good_master[0]; i++) {
        kvs_config_init(&c);
        strcpy(c.master_server_address, good_master[i]);
        if (kvs_config_validate(&c, err, sizeof err) != KVS_OK)
            fail_msg("%s: %s", good_master[i], err);
    }
    static const char *bad_master[] = {"host:", "host:99999", "host:0", ":5", "unix:",
                                       "[::1", "h:x", "etcd://", "etcd://h:0", "etcd://h:1/a b"};
    for (size_t i = 0; i < sizeof bad_master / sizeof bad_master[0]; i++) {
        kvs_config_init(&c);
        strcpy(c.master_server_address, bad_master[i]);
        expect_invalid(&c, "master_server_address");
    }

    static const char *good_md[] = {"", "P2PHANDSHAKE", "http://127.0.0.1:8080/metadata",
                                    "http://localhost/metadata", "http://[::1]:23790/metadata",
                                    "https://meta.example.com/x?y=1", "http://h:1",
                                    "etcd://x:2379", "etcd://127.0.0.1:2379,127.0.0.1:2380"};
    for (size_t i = 0; i < sizeof good_md / sizeof good_md[0]; i++) {
        kvs_config_init(&c);
        strcpy(c.metadata_server, good_md[i]);
        if (kvs_config_validate(&c, err, sizeof err) != KVS_OK)
            fail_msg("%s: %s", good_md[i], err);
    }
    static const char *bad_md[] = {"127.0.0.1:2379", "etcd://", "etcd://x:0", "redis://x", "http://",
                                   "http:///metadata", "http://h:0/x", "http://h:99999/",
                                   "http://a b/", "ftp://h/", "p2phandshake",
                                   "http://user:pw@h/"};
    for (size_t i = 0; i < sizeof bad_md / sizeof bad_md[0]; i++) {
        kvs_config_init(&c);
        strcpy(c.metadata_server, bad_md[i]);
        expect_invalid(&c, "metadata_server");
    }

    kvs_config_init(&c);
    c.global_segment_size = 0;
    assert_int_equal(kvs_config_validate(&c, err, sizeof err), KVS_OK);
    c.global_segment_size = 100;
    expect_invalid(&c, "global_segment_size");
    c.global_segment_size = 1ull << 60;
    expect_invalid(&c, "global_segment_size");
    kvs_config_init(&c);
    c.local_buffer_size = 1ull << 60;
    expect_invalid(&c, "local_buffer_size");

    kvs_config_init(&c);
    strcpy(c.runtime_dir, "relative");
    expect_invalid(&c, "runtime_dir");

    kvs_config_init(&c);
    strcpy(c.device_name, "a b");
    expect_invalid(&c, "device_name");

    kvs_config_init(&c);
    memset(c.secret, 'x', sizeof c.secret); /* not NUL-terminated */
    expect_invalid(&c, "secret");
}

static void test_null_args(void **state)
{
    (void)state;
    kvs_config c;
    kvs_config_init(&c);
    char err[64];
    assert_int_equal(kvs_config_load_json(NULL, "{}", err, sizeof err), KVS_ERR_INVALID);
    assert_int_equal(kvs_config_load_json(&c, NULL, err, sizeof err), KVS_ERR_INVALID);
    assert_int_equal(kvs_config_load_file(&c, NULL, err, sizeof err), KVS_ERR_INVALID);
    assert_int_equal(kvs_config_load_env(NULL, err, sizeof err), KVS_ERR_INVALID);
    assert_int_equal(kvs_config_validate(NULL, err, sizeof err), KVS_ERR_INVALID);
    /* err may be NULL; messages are truncated to errlen and NUL-terminated. */
    assert_int_equal(kvs_config_load_json(&c, "{\"zzz\":1}", NULL, 0), KVS_ERR_CONFIG);
    char tiny[8];
    memset(tiny, 'q', sizeof tiny);
    assert_int_equal(kvs_config_load_json(&c, "{\"zzz\":1}", tiny, sizeof tiny), KVS_ERR_CONFIG);
    assert_int_equal(strlen(tiny), 7);
    kvs_config_init(NULL); /* no crash */
    /* Empty object changes nothing. */
    kvs_config before = c;
    assert_int_equal(kvs_config_load_json(&c, "{}", err, sizeof err), KVS_OK);
    assert_memory_equal(&c, &before, sizeof c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_defaults, clear_env),
        cmocka_unit_test_setup(test_runtime_dir_default, clear_env),
        cmocka_unit_test_setup(test_json_all_keys, clear_env),
        cmocka_unit_test_setup(test_mooncake_file, clear_env),
        cmocka_unit_test_setup(test_unknown_key, clear_env),
        cmocka_unit_test_setup(test_wrong_types, clear_env),
        cmocka_unit_test_setup(test_too_long_string, clear_env),
        cmocka_unit_test_setup(test_protocol_case, clear_env),
        cmocka_unit_test_setup(test_parse_size, clear_env),
        cmocka_unit_test_setup(test_env, clear_env),
        cmocka_unit_test_setup(test_env_file_then_vars, clear_env),
        cmocka_unit_test_setup(test_validate, clear_env),
        cmocka_unit_test_setup(test_null_args, clear_env),
        cmocka_unit_test_setup(test_store_key, clear_env),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
