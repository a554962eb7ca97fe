/* Test helpers for tests that run real kvshelf processes: a master started
 * by the test on a port of its choice (0 = any free one, read back from its
 * --port-file), stopped by the test. Header-only (each test is one file). */
#ifndef KVS_TEST_PROC_UTIL_H
#define KVS_TEST_PROC_UTIL_H

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

extern char **environ;

typedef struct proc {
    pid_t pid;
    char dir[256]; /* its directory (port file, log): made on first start */
    int rpc_port;
} proc;

/* The kvshelf binary under test (KVSHELF_BIN, else found on PATH). */
static inline const char *bin(void)
{
    const char *b = getenv("KVSHELF_BIN");
    return b && *b ? b : "kvshelf";
}

static inline void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static inline uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Starts `kvshelf master` on 127.0.0.1:port (0 = any) with up to 8 extra
 * arguments (NULL-terminated list, or NULL); waits for its port file.
 * Returns 0, or -1 if it did not come up within 10 s. */
static inline int start_master_argv(proc *p, int port, const char *const *extra)
{
    if (!p->dir[0]) {
        snprintf(p->dir, sizeof p->dir, "/tmp/kvs-test-XXXXXX");
        if (!mkdtemp(p->dir)) return -1;
    }
    char pf[300], listen[64], log[300];
    snprintf(pf, sizeof pf, "%s/ports.json", p->dir);
    snprintf(log, sizeof log, "%s/master.log", p->dir);
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    unlink(pf);
    char *argv[20];
    int a = 0;
    argv[a++] = (char *)bin();
    argv[a++] = "master";
    argv[a++] = "--listen";
    argv[a++] = listen;
    argv[a++] = "--http";
    argv[a++] = "127.0.0.1:0";
    argv[a++] = "--port-file";
    argv[a++] = pf;
    for (int i = 0; extra && extra[i] && a < 18; i++) argv[a++] = (char *)extra[i];
    argv[a] = NULL;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 2, log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    int rc = posix_spawnp(&p->pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc) return -1;
    p->rpc_port = 0;
    for (int i = 0; i < 500; i++) {
        FILE *f = fopen(pf, "r");
        if (f) {
            char buf[256] = "";
            size_t n = fread(buf, 1, sizeof buf - 1, f);
            fclose(f);
            buf[n] = '\0';
            cJSON *j = cJSON_Parse(buf);
            cJSON *r = cJSON_GetObjectItem(j, "rpc");
            if (cJSON_IsNumber(r)) p->rpc_port = r->valueint;
            cJSON_Delete(j);
            if (p->rpc_port > 0) return 0;
        }
        sleep_ms(20);
    }
    return -1;
}

/* Sends sig (after SIGCONT, so a stopped process can act on it) and reaps. */
static inline void stop_proc(proc *p, int sig)
{
    if (p->pid > 0) {
        kill(p->pid, SIGCONT);
        kill(p->pid, sig);
        waitpid(p->pid, NULL, 0);
        p->pid = 0;
    }
}

static inline void master_addr(const proc *p, char *out, size_t cap)
{
    snprintf(out, cap, "127.0.0.1:%d", p->rpc_port);
}

#endif
