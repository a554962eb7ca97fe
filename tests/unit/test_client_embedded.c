/* The embedded host-local pool in a temporary runtime directory: the first
 * client starts `kvshelf master --embedded` (KVSHELF_BIN), processes share
 * it (racing starters start only one), it outlives its clients, zero-copy
 * pointers map its segment, `kvshelf status`/`stop` see and end it, and
 * unsafe runtime directories are refused. */
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
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

#include "client/client_ext.h"
#include "kvshelf/kvshelf.h"

typedef struct fix {
    char dir[256];
} fix;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void cfg_for(const fix *f, kvs_config *cfg)
{
    kvs_config_init(cfg);
    snprintf(cfg->runtime_dir, sizeof cfg->runtime_dir, "%s/rt", f->dir);
    cfg->global_segment_size = 64u << 20;
    cfg->timeout_ms = 3000;
}

/* pid of the pool's master from DIR/master.pid, or -1 */
static pid_t pool_pid(const fix *f)
{
    char p[300];
    snprintf(p, sizeof p, "%s/rt/master.pid", f->dir);
    FILE *fp = fopen(p, "r");
    if (!fp) return -1;
    long v = -1;
    if (fscanf(fp, "%ld", &v) != 1) v = -1;
    fclose(fp);
    return (pid_t)v;
}

static int run_cli(const fix *f, const char *args)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "KVSHELF_RUNTIME_DIR=%s/rt \"%s\" %s >/dev/null 2>&1", f->dir,
             getenv("KVSHELF_BIN") ? getenv("KVSHELF_BIN") : "kvshelf", args);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int setup(void **state)
{
    fix *f = calloc(1, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/kvs-emb-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fix *f = *state;
    pid_t pid = pool_pid(f);
    if (pid > 0) {
        kill(pid, SIGTERM);
        for (int i = 0; i < 100 && kill(pid, 0) == 0; i++) sleep_ms(50);
        kill(pid, SIGKILL);
    }
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", f->dir);
    if (system(cmd)) {
    }
    free(f);
    return 0;
}

static void test_start_share_stop(void **state)
{
    fix *f = *state;
    kvs_config cfg;
    cfg_for(f, &cfg);
    /* nothing runs yet: status says so (exit 3) and does not start one */
    assert_int_equal(run_cli(f, "status"), 3);
    kvs_client_opts nospawn = {0, 0, 1};
    kvs_client *c = NULL;
    char err[512] = "";
    assert_int_equal(kvs_client_open_opts(&cfg, &nospawn, &c, err, sizeof err),
                     KVS_ERR_UNAVAILABLE);
    assert_non_null(strstr(err, "no embedded pool"));

    assert_int_equal(kvs_client_open(&cfg, &c, err, sizeof err), KVS_OK);
    assert_true(kvs_client_is_embedded(c));
    pid_t pid = pool_pid(f);
    assert_true(pid > 0);
    struct stat st;
    char p[300];
    snprintf(p, sizeof p, "%s/rt", f->dir);
    assert_int_equal(stat(p, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0700);

    static uint8_t val[3 << 20];
    for (size_t i = 0; i < sizeof val; i++) val[i] = (uint8_t)(i * 7 + 1);
    assert_int_equal(kvs_put(c, "e1", 2, val, sizeof val), KVS_OK);
    /* zero-copy: the pool's segment is mapped here */
    kvs_key k = {"e1", 2};
    kvs_slot s;
    assert_int_equal(kvs_acquire_batch(c, &k, 1, &s), 1);
    assert_non_null(s.ptr);
    assert_memory_equal(s.ptr, val, sizeof val);
    assert_int_equal(kvs_release_batch(c, &s, 1), KVS_OK);
    kvs_client_close(c);

    /* the pool outlives its clients; another process sees the object */
    pid_t ch = fork();
    if (ch == 0) {
        kvs_client *c2;
        if (kvs_client_open(&cfg, &c2, NULL, 0)) _exit(1);
        static uint8_t out[3 << 20];
        uint64_t size;
        int rc = kvs_get(c2, "e1", 2, out, sizeof out, &size);
        kvs_client_close(c2);
        _exit(rc == KVS_OK && size == sizeof out && !memcmp(out, val, sizeof out) ? 0 : 2);
    }
    int wst;
    assert_int_equal(waitpid(ch, &wst, 0), ch);
    assert_int_equal(WEXITSTATUS(wst), 0);
    assert_int_equal(pool_pid(f), pid); /* still the same pool */

    assert_int_equal(run_cli(f, "status"), 0);
    assert_int_equal(run_cli(f, "status --json"), 0);
    assert_int_equal(run_cli(f, "get e1"), 0);
    assert_int_equal(run_cli(f, "stop"), 0);
    for (int i = 0; i < 100 && kill(pid, 0) == 0; i++) sleep_ms(50);
    assert_int_not_equal(kill(pid, 0), 0);
    assert_int_equal(run_cli(f, "status"), 3);
    assert_int_equal(run_cli(f, "stop"), 0); /* nothing to stop */
}

/* Several processes open clients at once with no pool running: exactly one
 * pool starts, and all of them use it. */
static void test_racing_starters(void **state)
{
    fix *f = *state;
    kvs_config cfg;
    cfg_for(f, &cfg);
    enum { P = 6 };
    pid_t kids[P];
    for (int i = 0; i < P; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            kvs_client *c;
            if (kvs_client_open(&cfg, &c, NULL, 0)) _exit(1);
            char key[16], v[16];
            int kl = snprintf(key, sizeof key, "race-%d", i);
            int vl = snprintf(v, sizeof v, "val-%d", i);
            int rc = kvs_put(c, key, (uint32_t)kl, v, (uint64_t)vl);
            kvs_client_close(c);
            _exit(rc == KVS_OK ? 0 : 2);
        }
    }
    for (int i = 0; i < P; i++) {
        int wst;
        assert_int_equal(waitpid(kids[i], &wst, 0), kids[i]);
        assert_true(WIFEXITED(wst));
        assert_int_equal(WEXITSTATUS(wst), 0);
    }
    kvs_client *c;
    assert_int_equal(kvs_client_open(&cfg, &c, NULL, 0), KVS_OK);
    for (int i = 0; i < P; i++) {
        char key[16], v[16], want[16];
        int kl = snprintf(key, sizeof key, "race-%d", i);
        int wl = snprintf(want, sizeof want, "val-%d", i);
        uint64_t size;
        assert_int_equal(kvs_get(c, key, (uint32_t)kl, v, sizeof v, &size), KVS_OK);
        assert_int_equal(size, (uint64_t)wl);
        assert_memory_equal(v, want, (size_t)wl);
    }
    char *json = NULL;
    assert_int_equal(kvs_client_stats_json(c, &json), KVS_OK);
    assert_non_null(strstr(json, "\"segments\""));
    free(json);
    assert_int_equal(kvs_client_shutdown_master(c), KVS_OK);
    kvs_client_close(c);
}

static void test_unsafe_runtime_dir(void **state)
{
    fix *f = *state;
    kvs_config cfg;
    cfg_for(f, &cfg);
    char p[300];
    snprintf(p, sizeof p, "%s/rt", f->dir);
    assert_int_equal(mkdir(p, 0700), 0);
    assert_int_equal(chmod(p, 0777), 0);
    kvs_client *c = NULL;
    char err[512] = "";
    assert_int_equal(kvs_client_open(&cfg, &c, err, sizeof err), KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "writable"));
    assert_int_equal(chmod(p, 0700), 0);
    /* a symlink is refused too */
    rmdir(p);
    char target[300];
    snprintf(target, sizeof target, "%s/real", f->dir);
    assert_int_equal(mkdir(target, 0700), 0);
    assert_int_equal(symlink(target, p), 0);
    assert_int_equal(kvs_client_open(&cfg, &c, err, sizeof err), KVS_ERR_CONFIG);
    assert_null(c);
}

/* The pool secret: made once (0600, 64 hex digits, in a 0700 directory),
 * the same for every later caller, the same for racing first callers, no
 * temporary file left behind; a file that is not private, not a regular
 * file or not hex is refused. */
static void test_pool_secret(void **state)
{
    fix *f = *state;
    kvs_config cfg;
    cfg_for(f, &cfg);
    /* racing first callers (fresh directory) all get one secret */
    int fds[4][2];
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pipe(fds[i]), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            char s[80] = "";
            int rc = kvs_pool_secret(&cfg, s, sizeof s, NULL, 0);
            if (rc != KVS_OK) snprintf(s, sizeof s, "error %d", rc);
            ssize_t n = write(fds[i][1], s, strlen(s));
            _exit(n > 0 ? 0 : 1);
        }
        close(fds[i][1]);
    }
    char first[80] = "", err[512];
    for (int i = 0; i < 4; i++) {
        char got[80] = "";
        ssize_t n = read(fds[i][0], got, sizeof got - 1);
        close(fds[i][0]);
        assert_true(n == 64);
        if (!first[0]) memcpy(first, got, sizeof got);
        assert_string_equal(got, first);
        int st;
        assert_true(wait(&st) > 0);
    }
    char s[80];
    assert_int_equal(kvs_pool_secret(&cfg, s, sizeof s, err, sizeof err), KVS_OK);
    assert_string_equal(s, first);
    for (int i = 0; i < 64; i++) assert_non_null(strchr("0123456789abcdef", s[i]));
    char p[320];
    struct stat st;
    snprintf(p, sizeof p, "%s/rt", f->dir);
    assert_int_equal(stat(p, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0700);
    snprintf(p, sizeof p, "%s/rt/secret", f->dir);
    assert_int_equal(stat(p, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "test $(ls -A %s/rt | wc -l) -eq 1", f->dir);
    assert_int_equal(system(cmd), 0); /* only "secret" */
    assert_int_equal(kvs_pool_secret(&cfg, s, 64, err, sizeof err), KVS_ERR_INVALID);
    /* readable by others: refused */
    assert_int_equal(chmod(p, 0644), 0);
    assert_int_equal(kvs_pool_secret(&cfg, s, sizeof s, err, sizeof err), KVS_ERR_CONFIG);
    assert_non_null(strstr(err, "0600"));
    /* not hex: refused */
    assert_int_equal(unlink(p), 0);
    int fd = open(p, O_WRONLY | O_CREAT | O_EXCL, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "short\n", 6), 6);
    close(fd);
    assert_int_equal(kvs_pool_secret(&cfg, s, sizeof s, err, sizeof err), KVS_ERR_CONFIG);
    /* a symlink (to a private file): refused */
    char target[320];
    snprintf(target, sizeof target, "%s/real-secret", f->dir);
    assert_int_equal(rename(p, target), 0);
    assert_int_equal(symlink(target, p), 0);
    assert_int_equal(kvs_pool_secret(&cfg, s, sizeof s, err, sizeof err), KVS_ERR_CONFIG);
    /* gone: a new one is made, different from the first */
    assert_int_equal(unlink(p), 0);
    assert_int_equal(kvs_pool_secret(&cfg, s, sizeof s, err, sizeof err), KVS_OK);
    assert_string_not_equal(s, first);
}

int main(void)
{
    if (!getenv("KVSHELF_BIN")) fprintf(stderr, "note: KVSHELF_BIN not set; using PATH\n");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_start_share_stop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_racing_starters, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unsafe_runtime_dir, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pool_secret, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
