/* `kvshelf master` as a process (binary from $KVSHELF_BIN; skipped when
 * absent): refuses non-loopback without a secret (exit 2), --help exits 0,
 * --port-file reports the chosen ports, /health and /metrics answer over
 * HTTP, RPC answers over TCP, SIGTERM exits 0. */
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cjson/cJSON.h>

#include "common/net.h"
#include "test_master_util.h"

extern char **environ;

static const char *bin(void)
{
    const char *b = getenv("KVSHELF_BIN");
    return (b && *b && access(b, X_OK) == 0) ? b : NULL;
}

static int run_wait(char *const argv[], int quiet)
{
    pid_t pid;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    if (quiet) {
        posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
        posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    }
    assert_int_equal(posix_spawn(&pid, argv[0], &fa, NULL, argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void test_usage_errors(void **st)
{
    (void)st;
    const char *b = bin();
    if (!b) skip();
    char *a1[] = {(char *)b, "master", "--help", NULL};
    assert_int_equal(run_wait(a1, 1), 0);
    char *a2[] = {(char *)b, "master", "--listen", "0.0.0.0:0", "--http", "off", NULL};
    assert_int_equal(run_wait(a2, 1), 2);
    char *a3[] = {(char *)b, "master", "--http", "0.0.0.0:0", NULL};
    assert_int_equal(run_wait(a3, 1), 2);
    char *a4[] = {(char *)b, "master", "--lease-ms", "zero", NULL};
    assert_int_equal(run_wait(a4, 1), 2);
    char *a5[] = {(char *)b, "master", "--evict-high", "0.5", "--evict-low", "0.8", NULL};
    assert_int_equal(run_wait(a5, 1), 2);
}

static char *http_get(uint16_t port, const char *path)
{
    kvs_addr a;
    memset(&a, 0, sizeof a);
    snprintf(a.host, sizeof a.host, "127.0.0.1");
    a.port = port;
    int fd = kvs_connect(&a, 2000);
    assert_true(fd >= 0);
    kvs_set_timeouts(fd, 5000);
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: x\r\n\r\n", path);
    assert_int_equal(kvs_write_full(fd, req, (size_t)n), KVS_OK);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap + 1);
    ssize_t r;
    while ((r = recv(fd, buf + len, cap - len, 0)) > 0) len += (size_t)r;
    buf[len] = 0;
    close(fd);
    return buf;
}

static void test_run_and_stop(void **st)
{
    (void)st;
    const char *b = bin();
    if (!b) skip();
    char pf[128], rd[64] = "/tmp/kvs-test-rd-XXXXXX", sp[128];
    snprintf(pf, sizeof pf, "/tmp/kvs-test-master-ports-%d.json", (int)getpid());
    unlink(pf);
    assert_non_null(mkdtemp(rd));
    snprintf(sp, sizeof sp, "%s/secret", rd);
    char *argv[] = {(char *)b, "master", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
                    "--port-file", pf, "--lease-ms", "1234", "--client-ttl-ms", "4321",
                    "--runtime-dir", rd, NULL};
    pid_t pid;
    assert_int_equal(posix_spawn(&pid, b, NULL, NULL, argv, environ), 0);
    char text[256] = "";
    for (int i = 0; i < 500 && !text[0]; i++) {
        FILE *f = fopen(pf, "r");
        if (f) {
            if (!fgets(text, sizeof text, f)) text[0] = 0;
            fclose(f);
        }
        if (!text[0]) usleep(10000);
    }
    cJSON *j = cJSON_Parse(text);
    assert_non_null(j);
    uint16_t rpc = (uint16_t)cJSON_GetObjectItem(j, "rpc")->valuedouble;
    uint16_t http = (uint16_t)cJSON_GetObjectItem(j, "http")->valuedouble;
    cJSON_Delete(j);
    assert_true(rpc && http);

    char *h = http_get(http, "/health");
    assert_non_null(strstr(h, "200"));
    assert_non_null(strstr(h, "\r\n\r\nok"));
    free(h);
    h = http_get(http, "/metrics");
    assert_non_null(strstr(h, "kvshelf_segments 0"));
    assert_non_null(strstr(h, "# TYPE kvshelf_hits_total counter"));
    free(h);

    /* no secret configured: the master made a pool secret, 0600, in its dir */
    struct stat sst;
    assert_int_equal(stat(sp, &sst), 0);
    assert_int_equal(sst.st_mode & 0777, 0600);
    char secret[80] = "";
    FILE *sf = fopen(sp, "r");
    assert_non_null(sf);
    assert_non_null(fgets(secret, sizeof secret, sf));
    fclose(sf);
    secret[strcspn(secret, "\n")] = '\0';
    assert_int_equal(strlen(secret), 64);

    /* RPC: CHALLENGE, HELLO -> ttl and lease from the flags. TCP needs the
     * secret: first without it (refused), then with it. */
    kvs_addr a;
    memset(&a, 0, sizeof a);
    snprintf(a.host, sizeof a.host, "127.0.0.1");
    a.port = rpc;
    for (int with = 0; with < 2; with++) {
        int fd = kvs_connect(&a, 2000);
        assert_true(fd >= 0);
        kvs_set_timeouts(fd, 5000);
        uint8_t hb[KVS_FRAME_HDR], body[512];
        kvs_frame_hdr fh;
        assert_int_equal(kvs_read_full(fd, hb, sizeof hb), KVS_OK);
        assert_int_equal(kvs_frame_hdr_decode(hb, KVS_MAX_BODY, &fh), KVS_OK);
        assert_int_equal(fh.type, KVS_MSG_CHALLENGE);
        /* flags, nonce, then (TCP) host tag + the unix socket for same-host clients */
        assert_true(fh.body_len > 20 + 32 + 4 && fh.body_len <= sizeof body);
        assert_int_equal(kvs_read_full(fd, body, fh.body_len), KVS_OK);
        kvs_wbuf w;
        kvs_wbuf_init(&w);
        size_t s = kvs_wbuf_begin_frame(&w, KVS_MSG_HELLO, 0, 0, 5);
        tm_hello_body(&w, with ? secret : NULL, body + 4, KVS_PROTO_VERSION);
        kvs_wbuf_end_frame(&w, s);
        assert_int_equal(kvs_write_full(fd, w.data, w.len), KVS_OK);
        kvs_wbuf_free(&w);
        assert_int_equal(kvs_read_full(fd, hb, sizeof hb), KVS_OK);
        assert_int_equal(kvs_frame_hdr_decode(hb, KVS_MAX_BODY, &fh), KVS_OK);
        if (!with) {
            assert_int_equal(fh.status, KVS_ERR_AUTH);
            close(fd);
            continue;
        }
        assert_int_equal(fh.status, KVS_OK);
        assert_int_equal(fh.body_len, 16);
        assert_int_equal(kvs_read_full(fd, body, 16), KVS_OK);
        kvs_rbuf r;
        kvs_rbuf_init(&r, body, 16);
        (void)kvs_rbuf_u64(&r);
        assert_int_equal(kvs_rbuf_u32(&r), 4321);
        assert_int_equal(kvs_rbuf_u32(&r), 1234);
        close(fd);
    }

    kill(pid, SIGTERM);
    int stt;
    assert_int_equal(waitpid(pid, &stt, 0), pid);
    assert_true(WIFEXITED(stt));
    assert_int_equal(WEXITSTATUS(stt), 0);
    unlink(pf);
    unlink(sp);
    rmdir(rd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_usage_errors),
        cmocka_unit_test(test_run_and_stop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
