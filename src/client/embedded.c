/* The embedded host-local pool: with no master_server_address, every process
 * of a user on a host shares one `kvshelf master --embedded` found through a
 * unix socket in the runtime directory, started on first use (under a file
 * lock, so racing processes start only one) and outliving the processes that
 * use it. */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client/client_internal.h"
#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"

extern char **environ;

#define START_WAIT_MS 10000
#define START_READY_MS 180000 /* a pool that answers gets this long to open its segment */

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

void kvs_embedded_runtime_dir(const kvs_config *cfg, char *out, size_t cap)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR"), *rd = getenv("KVSHELF_RUNTIME_DIR");
    if (cfg && cfg->runtime_dir[0]) snprintf(out, cap, "%s", cfg->runtime_dir);
    else if (rd && rd[0] == '/') snprintf(out, cap, "%s", rd);
    else if (xdg && xdg[0] == '/') snprintf(out, cap, "%s/kvshelf", xdg);
    else snprintf(out, cap, "/tmp/kvshelf-%u", (unsigned)getuid());
    size_t n = strlen(out);
    while (n > 1 && out[n - 1] == '/') out[--n] = '\0';
}

/* mkdir -p with mode 0700 for every missing component. */
static int mkdirs(const char *path)
{
    char tmp[PATH_MAX];
    if (kvs_strlcpy(tmp, path, sizeof tmp)) return -1;
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(tmp, 0700) < 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    if (mkdir(tmp, 0700) < 0 && errno != EEXIST) return -1;
    return 0;
}

int kvs_embedded_prepare_dir(const kvs_config *cfg, char *dir, size_t cap, char *err,
                             size_t errlen)
{
    kvs_embedded_runtime_dir(cfg, dir, cap);
    if (dir[0] != '/') {
        seterr(err, errlen, "runtime_dir '%s' must be an absolute path", dir);
        return KVS_ERR_CONFIG;
    }
    if (strlen(dir) + sizeof "/master.sock" > sizeof(((kvs_addr *)0)->path)) {
        seterr(err, errlen, "runtime_dir '%s' is too long for a unix socket path", dir);
        return KVS_ERR_CONFIG;
    }
    if (mkdirs(dir) < 0) {
        seterr(err, errlen, "cannot create runtime_dir '%s': %s", dir, strerror(errno));
        return KVS_ERR_IO;
    }
    struct stat st;
    if (lstat(dir, &st) < 0) {
        seterr(err, errlen, "runtime_dir '%s': %s", dir, strerror(errno));
        return KVS_ERR_IO;
    }
    if (!S_ISDIR(st.st_mode)) {
        seterr(err, errlen, "runtime_dir '%s' is not a directory (a symlink?); refusing it", dir);
        return KVS_ERR_CONFIG;
    }
    if (st.st_uid != getuid()) {
        seterr(err, errlen, "runtime_dir '%s' is owned by uid %u, not by us (uid %u); refusing it",
               dir, (unsigned)st.st_uid, (unsigned)getuid());
        return KVS_ERR_CONFIG;
    }
    if (st.st_mode & 022) {
        seterr(err, errlen,
               "runtime_dir '%s' is writable by group or others (mode %03o); refusing it "
               "(chmod 700 it)",
               dir, (unsigned)(st.st_mode & 0777));
        return KVS_ERR_CONFIG;
    }
    return KVS_OK;
}

/* ---- the pool secret ---- */

#define SECRET_FILE "secret"
#define SECRET_HEX (2 * KVS_POOL_SECRET_BYTES)

/* Reads DIR/secret through the open directory `dfd`: KVS_OK (out filled),
 * KVS_ERR_NOT_FOUND (no such file), KVS_ERR_CONFIG (not a regular file of
 * ours with mode 0600, or not SECRET_HEX hex digits), KVS_ERR_IO. */
static int read_secret(int dfd, const char *dir, char *out, size_t cap, char *err,
                       size_t errlen)
{
    int fd = openat(dfd, SECRET_FILE, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ENOENT) return KVS_ERR_NOT_FOUND;
        seterr(err, errlen, "cannot open %s/" SECRET_FILE ": %s", dir, strerror(errno));
        return errno == ELOOP ? KVS_ERR_CONFIG : KVS_ERR_IO;
    }
    struct stat st;
    char buf[SECRET_HEX + 2];
    ssize_t n = -1;
    int rc = KVS_OK;
    if (fstat(fd, &st) < 0) {
        seterr(err, errlen, "%s/" SECRET_FILE ": %s", dir, strerror(errno));
        rc = KVS_ERR_IO;
    } else if (!S_ISREG(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 077)) {
        seterr(err, errlen,
               "%s/" SECRET_FILE " is not a regular file of uid %u with mode 0600; refusing it",
               dir, (unsigned)getuid());
        rc = KVS_ERR_CONFIG;
    } else {
        do n = read(fd, buf, sizeof buf); while (n < 0 && errno == EINTR);
        if (n < 0) {
            seterr(err, errlen, "cannot read %s/" SECRET_FILE ": %s", dir, strerror(errno));
            rc = KVS_ERR_IO;
        }
    }
    close(fd);
    if (rc) return rc;
    if (n == SECRET_HEX + 1 && buf[SECRET_HEX] == '\n') n--;
    int ok = n == SECRET_HEX && cap > SECRET_HEX;
    for (ssize_t i = 0; ok && i < n; i++)
        ok = (buf[i] >= '0' && buf[i] <= '9') || (buf[i] >= 'a' && buf[i] <= 'f');
    if (!ok) {
        seterr(err, errlen,
               "%s/" SECRET_FILE " does not hold %d hex digits; remove it to make a new one",
               dir, SECRET_HEX);
        return KVS_ERR_CONFIG;
    }
    memcpy(out, buf, SECRET_HEX);
    out[SECRET_HEX] = '\0';
    return KVS_OK;
}

/* Creates DIR/secret from random bytes, whole or not at all: written to a
 * new file (O_EXCL, 0600) and then linked under its name, which fails if
 * another process made it first (its secret is then the one kept).
 * KVS_OK (out filled), KVS_ERR_EXISTS (lost the race) or an error. */
static int create_secret(int dfd, const char *dir, char *out, size_t cap, char *err,
                         size_t errlen)
{
    uint8_t raw[KVS_POOL_SECRET_BYTES];
    if (cap <= SECRET_HEX || kvs_random_bytes(raw, sizeof raw) != KVS_OK) {
        seterr(err, errlen, "cannot draw random bytes for the pool secret");
        return KVS_ERR_IO;
    }
    static const char hex[] = "0123456789abcdef";
    char text[SECRET_HEX + 1];
    for (size_t i = 0; i < sizeof raw; i++) {
        text[2 * i] = hex[raw[i] >> 4];
        text[2 * i + 1] = hex[raw[i] & 15];
    }
    text[SECRET_HEX] = '\n';
    char tmp[64];
    snprintf(tmp, sizeof tmp, SECRET_FILE ".%ld.%02x%02x", (long)getpid(), raw[0], raw[1]);
    int fd = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        seterr(err, errlen, "cannot create %s/%s: %s", dir, tmp, strerror(errno));
        return KVS_ERR_IO;
    }
    int ok = kvs_write_full(fd, text, sizeof text) == KVS_OK && fsync(fd) == 0;
    ok = close(fd) == 0 && ok;
    int rc = KVS_OK;
    if (!ok) {
        seterr(err, errlen, "cannot write %s/%s: %s", dir, tmp, strerror(errno));
        rc = KVS_ERR_IO;
    } else if (linkat(dfd, tmp, dfd, SECRET_FILE, 0) != 0) {
        if (errno == EEXIST) {
            rc = KVS_ERR_EXISTS;
        } else {
            seterr(err, errlen, "cannot create %s/" SECRET_FILE ": %s", dir, strerror(errno));
            rc = KVS_ERR_IO;
        }
    }
    unlinkat(dfd, tmp, 0);
    if (rc == KVS_OK) {
        memcpy(out, text, SECRET_HEX);
        out[SECRET_HEX] = '\0';
    }
    memset(raw, 0, sizeof raw);
    memset(text, 0, sizeof text);
    return rc;
}

int kvs_pool_secret(const kvs_config *cfg, char *out, size_t cap, char *err, size_t errlen)
{
    if (!out || cap <= SECRET_HEX) {
        seterr(err, errlen, "no room for the pool secret");
        return KVS_ERR_INVALID;
    }
    out[0] = '\0';
    char dir[PATH_MAX];
    int rc = kvs_embedded_prepare_dir(cfg, dir, sizeof dir, err, errlen);
    if (rc) return rc;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) {
        seterr(err, errlen, "cannot open runtime_dir '%s': %s", dir, strerror(errno));
        return KVS_ERR_IO;
    }
    rc = read_secret(dfd, dir, out, cap, err, errlen);
    if (rc == KVS_ERR_NOT_FOUND) {
        rc = create_secret(dfd, dir, out, cap, err, errlen);
        if (rc == KVS_ERR_EXISTS) rc = read_secret(dfd, dir, out, cap, err, errlen);
        if (rc == KVS_OK) KVS_LOGD("pool secret in %s/" SECRET_FILE, dir);
    }
    close(dfd);
    if (rc == KVS_OK && err && errlen) err[0] = '\0';
    return rc;
}

/* 1 if a master answers on the socket (connects and sends its CHALLENGE). */
static int pool_answers(const char *dir)
{
    kvs_addr a;
    memset(&a, 0, sizeof a);
    a.is_unix = 1;
    snprintf(a.path, sizeof a.path, "%s/master.sock", dir);
    int fd = kvs_connect(&a, 1000);
    if (fd < 0) return 0;
    kvs_set_timeouts(fd, 1000);
    uint8_t hb[KVS_FRAME_HDR];
    kvs_frame_hdr h;
    int ok = kvs_read_full(fd, hb, sizeof hb) == KVS_OK &&
             kvs_frame_hdr_decode(hb, 4096, &h) == KVS_OK && h.type == KVS_MSG_CHALLENGE;
    close(fd);
    return ok;
}

static int executable(const char *p) { return p && access(p, X_OK) == 0; }

/* Finds the kvshelf binary: $KVSHELF_BIN; this very program when it is
 * the kvshelf command (/proc/self/exe: however it was invoked, relative
 * path or not, whatever PATH says); next to the code of libkvshelf
 * (../bin/kvshelf or bin/kvshelf beside the shared library or the Python
 * extension, whose path is made absolute); else "kvshelf" from PATH
 * (*use_path = 1). */
static void find_binary(char *out, size_t cap, int *use_path)
{
    *use_path = 0;
    const char *env = getenv("KVSHELF_BIN");
    if (env && *env) {
        snprintf(out, cap, "%s", env);
        return;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        const char *b = strrchr(exe, '/');
        if (b && !strcmp(b + 1, "kvshelf") && executable(exe)) {
            kvs_strlcpy(out, exe, cap);
            return;
        }
    }
    Dl_info di;
    char lib[PATH_MAX];
    if (dladdr((void *)&kvs_embedded_ensure, &di) && di.dli_fname && di.dli_fname[0] &&
        realpath(di.dli_fname, lib)) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%s", lib);
        char *slash = strrchr(dir, '/');
        const char *base = slash ? slash + 1 : dir;
        char self[PATH_MAX];
        snprintf(self, sizeof self, "%s", lib);
        if (slash) *slash = '\0';
        if (!strcmp(base, "kvshelf") && executable(self)) { /* the CLI itself */
            snprintf(out, cap, "%s", self);
            return;
        }
        const char *rel[] = {"../bin/kvshelf", "bin/kvshelf"};
        for (size_t i = 0; i < KVS_ARRAY_LEN(rel); i++) {
            char cand[PATH_MAX + 32];
            snprintf(cand, sizeof cand, "%s/%s", dir, rel[i]);
            if (executable(cand)) {
                kvs_strlcpy(out, cand, cap);
                return;
            }
        }
    }
    snprintf(out, cap, "kvshelf");
    *use_path = 1;
}

static void *reaper_main(void *arg)
{
    pid_t pid = (pid_t)(intptr_t)arg;
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    return NULL;
}

static int spawn_master(const kvs_config *cfg, const char *dir, pid_t *pid, char *err,
                        size_t errlen)
{
    char bin[PATH_MAX];
    int use_path;
    find_binary(bin, sizeof bin, &use_path);
    char size[32], log[PATH_MAX];
    uint64_t n = cfg->global_segment_size ? cfg->global_segment_size
                                          : KVS_DEFAULT_GLOBAL_SEGMENT_SIZE;
    snprintf(size, sizeof size, "%llu", (unsigned long long)n);
    snprintf(log, sizeof log, "%s/master.log", dir);
    /* --detach: the master forks once more and the process we start exits,
     * so the pool is nobody's child: an engine that kills its process tree
     * at shutdown (vLLM does) leaves it and its objects alone. */
    char *argv[] = {bin, "master", "--embedded", "--detach", "--runtime-dir", (char *)dir,
                    "--segment-size", size, NULL};

    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_init(&at);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    sigset_t none, defs;
    sigemptyset(&none);
    sigemptyset(&defs);
    sigaddset(&defs, SIGTERM);
    sigaddset(&defs, SIGINT);
    sigaddset(&defs, SIGHUP);
    sigaddset(&defs, SIGPIPE);
    sigaddset(&defs, SIGCHLD);
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setsigdefault(&at, &defs);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK |
                                      POSIX_SPAWN_SETSIGDEF);
    /* the engine's preloads (vLLM's CPU workers preload an OpenMP runtime
     * and an allocator) are not the pool's: it runs without LD_PRELOAD */
    size_t ne = 0;
    while (environ[ne]) ne++;
    char **envp = malloc((ne + 1) * sizeof *envp);
    int rc = envp ? 0 : ENOMEM;
    if (envp) {
        size_t k = 0;
        for (size_t i = 0; i < ne; i++)
            if (strncmp(environ[i], "LD_PRELOAD=", 11)) envp[k++] = environ[i];
        envp[k] = NULL;
        rc = use_path ? posix_spawnp(pid, bin, &fa, &at, argv, envp)
                      : posix_spawn(pid, bin, &fa, &at, argv, envp);
        free(envp);
    }
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    if (rc) {
        seterr(err, errlen,
               "cannot start the embedded pool (%s master --embedded): %s; set KVSHELF_BIN to "
               "the kvshelf binary",
               bin, strerror(rc));
        return KVS_ERR_IO;
    }
    KVS_LOGI("client: starting the embedded pool (%s, %s bytes) in %s", bin, size, dir);
    return KVS_OK;
}

/* The report of a pool that could not start (tools/cmd_master.c
 * note_start_failure): 1 with *code (a kvshelf error code; KVS_ERR_IO when
 * the file holds none) and its message, else 0. */
static int read_start_failure(const char *path, int *code, char *msg, size_t cap)
{
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char line[32] = "";
    int ok = fgets(line, sizeof line, f) != NULL;
    long c = ok ? strtol(line, NULL, 10) : 0;
    *code = c < 0 && c > -1000 ? (int)c : KVS_ERR_IO;
    msg[0] = 0;
    if (ok && fgets(msg, (int)cap, f)) msg[strcspn(msg, "\n")] = 0;
    fclose(f);
    if (!msg[0]) kvs_strlcpy(msg, "no reason given", cap);
    return 1;
}

int kvs_embedded_ensure(const kvs_config *cfg, const char *dir, int spawn, char *err,
                        size_t errlen)
{
    /* a pool that answers while it still starts (DIR/pool.starting): wait
     * for its starter, which holds pool.lock until it is ready or failed */
    char starting[PATH_MAX];
    snprintf(starting, sizeof starting, "%s/pool.starting", dir);
    if (pool_answers(dir) && (!spawn || access(starting, F_OK) != 0)) return KVS_OK;
    if (!spawn) {
        seterr(err, errlen, "no embedded pool is running (runtime dir %s)", dir);
        return KVS_ERR_UNAVAILABLE;
    }
    char lock[PATH_MAX];
    snprintf(lock, sizeof lock, "%s/pool.lock", dir);
    int lfd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (lfd < 0) {
        seterr(err, errlen, "cannot open %s: %s", lock, strerror(errno));
        return KVS_ERR_IO;
    }
    while (flock(lfd, LOCK_EX) < 0 && errno == EINTR) {
    }
    int rc = KVS_OK;
    if (pool_answers(dir)) goto out; /* another process started it meanwhile */
    pid_t pid;
    /* what the pool says of this start: ready (its segment open) or failed
     * (why); either file from an earlier start is not this one's */
    char failed[PATH_MAX], ready[PATH_MAX];
    snprintf(failed, sizeof failed, "%s/pool.failed", dir);
    snprintf(ready, sizeof ready, "%s/pool.ready", dir);
    unlink(failed);
    unlink(ready);
    unlink(starting);
    rc = spawn_master(cfg, dir, &pid, err, errlen);
    if (rc) goto out;
    const uint64_t t_spawn = kvs_now_ms();
    uint64_t deadline = t_spawn + START_WAIT_MS;
    int exited = 0, reaped = 0, wst = 0, failed_at_start = 0, answered = 0, vanished = 0;
    uint64_t gone_since = 0; /* when a pool that answered stopped answering */
    rc = KVS_ERR_CONN;
    while (kvs_now_ms() < deadline) {
        if (!reaped && waitpid(pid, &wst, WNOHANG) == pid) {
            reaped = 1; /* the launcher ends once the pool runs on its own */
            if (!WIFEXITED(wst) || WEXITSTATUS(wst) != 0) {
                exited = 1;
                break;
            }
        }
        if (pool_answers(dir)) {
            /* ready; or no word at all: a kvshelf binary from before these
             * files ($KVSHELF_BIN, PATH), which answers once it serves */
            if (access(ready, F_OK) == 0 ||
                (access(starting, F_OK) != 0 && access(failed, F_OK) != 0)) {
                rc = KVS_OK;
                break;
            }
            /* up, still opening its segment (populating a big one takes
             * seconds): wait longer for ready or failed */
            answered = 1;
            gone_since = 0;
            if (deadline < t_spawn + START_READY_MS) deadline = t_spawn + START_READY_MS;
        } else if (answered && access(failed, F_OK) != 0) {
            uint64_t now = kvs_now_ms();
            if (!gone_since) gone_since = now;
            if (now - gone_since >= 2000) { /* answered, then gone for 2 s with no word */
                vanished = 1;
                break;
            }
        }
        int code = 0;
        char why[512];
        if (read_start_failure(failed, &code, why, sizeof why)) {
            seterr(err, errlen, "the embedded pool could not start: %s (log: %s/master.log)", why,
                   dir);
            rc = code;
            failed_at_start = 1;
            break;
        }
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (rc != KVS_OK && !failed_at_start && !vanished && !exited && pool_answers(dir)) {
        /* it answers and took longer than START_READY_MS to open its
         * segment: it runs, use it */
        KVS_LOGW("client: the embedded pool in %s answers but is not ready after %d s; using it",
                 dir, START_READY_MS / 1000);
        rc = KVS_OK;
    }
    if (!reaped && rc == KVS_OK) {
        /* reap the launcher when it ends, so it never lingers as a zombie */
        pthread_t th;
        pthread_attr_t pa;
        pthread_attr_init(&pa);
        pthread_attr_setdetachstate(&pa, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&pa, 64u << 10);
        pthread_create(&th, &pa, reaper_main, (void *)(intptr_t)pid);
        pthread_attr_destroy(&pa);
    } else if (failed_at_start) {
        /* err says why, from the pool itself */
    } else if (vanished) {
        seterr(err, errlen, "the embedded pool stopped while it was starting; see %s/master.log",
               dir);
    } else if (exited) {
        seterr(err, errlen,
               "the embedded pool exited at start (status %d); see %s/master.log",
               WIFEXITED(wst) ? WEXITSTATUS(wst) : -1, dir);
    } else {
        seterr(err, errlen, "the embedded pool did not %s within %d s; see %s/master.log",
               answered ? "get ready" : "answer", (int)((deadline - t_spawn) / 1000), dir);
    }
out:
    flock(lfd, LOCK_UN);
    close(lfd);
    return rc;
}

/* ---- the pool's own segment across a kill -9 of its master (issue 17) ----
 * `kvshelf master --embedded` owns the pool's segment through a client of
 * its own. It names that segment in DIR/pool.segment and marks the segment
 * with that record's path (segment.h), so that when the master is killed
 * the segment's memory stays in /dev/shm, kvs_segment_gc leaves it alone,
 * and the next master of DIR adopts it with its directory instead of
 * starting empty. The adopted segment then goes through the path of a node
 * whose master restarted (client.c mount_segment): fenced past every epoch
 * the dead master handed out, mounted with its directory, every listed
 * object handed in (DIR_LOAD) and a hit again. */

#define ADOPT_BUSY_MS 500    /* an owner lock held this long: its owner still runs */
#define ADOPT_FENCE_MS 10000 /* writers of the dead pool get this long to leave */

static void nap_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* 1 if c is the pool's own segment client: `kvshelf master --embedded`
 * opens it with master_server_address "unix:DIR/master.sock" and
 * runtime_dir DIR (tools/cmd_master.c run_embedded). */
static int pool_owner(const kvs_client *c)
{
    if (c->embedded || !c->cfg.runtime_dir[0]) return 0;
    char want[sizeof c->master_text];
    int n = snprintf(want, sizeof want, "unix:%s/master.sock", c->cfg.runtime_dir);
    return n > 0 && (size_t)n < sizeof want && !strcmp(want, c->master_text);
}

/* Adopts the segment the pool record `rec` names, if a dead master left it:
 * KVS_OK (c->seg owned, fenced past the dead pool's writers, c->dir
 * attached to its directory as it was) or why not (nothing to adopt, its
 * owner runs, not the same segment, a writer stuck inside). */
static int adopt(kvs_client *c, const char *rec, uint64_t size)
{
    char name[KVS_SHM_NAME_MAX];
    int rc = kvs_segment_pool_record_read(rec, name, sizeof name);
    if (rc != KVS_OK) {
        if (rc != KVS_ERR_NOT_FOUND)
            KVS_LOGW("embedded pool: ignoring the pool record %s (%s)", rec, kvs_strerror(rc));
        return rc;
    }
    uint64_t t0 = kvs_now_ms();
    /* BUSY: its owner runs, or a gc holds the owner lock for a moment */
    /* its own size: the pool keeps the size its first master gave it, as a
     * running pool does for every client that finds it */
    while ((rc = kvs_segment_adopt(name, rec, 0, &c->seg)) == KVS_ERR_BUSY &&
           kvs_now_ms() - t0 < ADOPT_BUSY_MS)
        nap_ms(10);
    if (rc != KVS_OK) {
        if (rc == KVS_ERR_BUSY)
            KVS_LOGW("embedded pool: the segment %s of the previous pool is still owned by a "
                     "running process; starting with a new segment",
                     name);
        else if (rc != KVS_ERR_NOT_FOUND)
            KVS_LOGW("embedded pool: not adopting the segment %s of the previous pool: %s",
                     name, kvs_strerror(rc));
        return rc;
    }
    /* Writers of the dead pool (other processes mapping the segment) may
     * still be inside a write under one of its reservations: wait until
     * none is (the fence mount_segment runs again, at once then, before it
     * mounts; one that cannot pass would fail the mount). */
    uint64_t epoch = kvs_segment_epoch(&c->seg);
    while ((rc = kvs_segment_fence(&c->seg, epoch + 2)) == KVS_ERR_BUSY &&
           kvs_now_ms() - t0 < ADOPT_FENCE_MS)
        nap_ms(10);
    if (rc == KVS_OK && c->seg.dir) {
        /* its directory as it was: validated again, rejected slots cleared */
        rc = kvs_dir_attach(c->seg.dir, c->seg.dir_size, c->seg.size, kvs_segment_nonce(&c->seg),
                            0, &c->dir);
        if (rc == KVS_ERR_CORRUPT) {
            KVS_LOGW("embedded pool: the adopted segment's directory has a bad header: its "
                     "objects are lost");
            rc = kvs_dir_attach(c->seg.dir, c->seg.dir_size, c->seg.size,
                                kvs_segment_nonce(&c->seg), 1, &c->dir);
        }
    }
    if (rc != KVS_OK) {
        KVS_LOGW("embedded pool: cannot adopt the segment %s of the previous pool (%s%s); "
                 "starting with a new segment",
                 name, kvs_strerror(rc),
                 rc == KVS_ERR_BUSY ? ": a writer of the dead pool is still inside it" : "");
        kvs_segment_destroy(&c->seg); /* ours now: unlinked */
        return rc;
    }
    if (c->seg.size != (size + kvs_page_size() - 1) / kvs_page_size() * kvs_page_size())
        KVS_LOGI("embedded pool: the adopted segment keeps its %llu bytes (%llu asked)",
                 (unsigned long long)c->seg.size, (unsigned long long)size);
    /* mounted before (by the dead master): mount_segment fences it and hands
     * its directory to the master, as a node does after a master restart */
    atomic_store(&c->seg_mounted, 1);
    KVS_LOGI("embedded pool: adopted the segment %s of the previous pool (%llu bytes, write "
             "epoch %llu, %llu objects in its directory) in %llu ms",
             name, (unsigned long long)c->seg.size,
             (unsigned long long)kvs_segment_epoch(&c->seg),
             (unsigned long long)(c->dir ? kvs_dir_count(c->dir) : 0),
             (unsigned long long)(kvs_now_ms() - t0));
    return KVS_OK;
}

int kvs_embedded_segment_open(kvs_client *c, int *adopted)
{
    *adopted = 0;
    uint64_t size = c->cfg.global_segment_size;
    char rec[KVS_SEG_POOL_PATH_MAX];
    int n = pool_owner(c) ? snprintf(rec, sizeof rec, "%s/" KVS_SEG_POOL_RECORD,
                                     c->cfg.runtime_dir)
                          : -1;
    if (n < 0 || (size_t)n >= sizeof rec) return kvs_segment_create(size, &c->seg);
    if (adopt(c, rec, size) == KVS_OK) {
        *adopted = 1;
        return KVS_OK;
    }
    int rc = kvs_segment_create(size, &c->seg);
    if (rc != KVS_OK) return rc;
    /* marked first, named second: the gc keeps it only once both hold */
    int wrc = kvs_segment_set_pool(&c->seg, rec);
    if (wrc == KVS_OK) wrc = kvs_segment_pool_record_write(rec, c->seg.name);
    if (wrc != KVS_OK)
        KVS_LOGW("embedded pool: cannot write %s (%s): a pool started after a kill -9 of "
                 "this one starts empty",
                 rec, kvs_strerror(wrc));
    return KVS_OK;
}
