/* Helpers shared by the unit tests that run against a real etcd (test_etcd,
 * test_master_election): a single-member etcd started by the test on free
 * loopback ports, in a temporary data directory, and stopped by it.
 * Header-only (static). */
#ifndef KVS_TEST_ETCD_UTIL_H
#define KVS_TEST_ETCD_UTIL_H

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include "common/etcd.h"
#include "kvshelf/errors.h"

extern char **environ;

#define TE_ETCD_EXE "/usr/bin/etcd"

typedef struct te_etcd {
    pid_t pid;
    int client_port; /* its client URL: http://127.0.0.1:client_port */
    char dir[64];    /* its data directory (and etcd.log) */
} te_etcd;

/* A loopback TCP port free at the time of the call (-1 if none). */
static inline int te_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t l = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) ||
        getsockname(fd, (struct sockaddr *)&a, &l)) {
        if (fd >= 0) close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

/* Starts etcd in a new directory made from dir_template (mkdtemp), its
 * output in <dir>/etcd.log. It may not answer yet: see te_etcd_wait. When
 * the etcd binary is not installed, the test is skipped (skip_msg said). */
static inline void te_etcd_start(te_etcd *t, const char *dir_template, const char *skip_msg)
{
    if (access(TE_ETCD_EXE, X_OK) != 0) {
        print_message("%s", skip_msg);
        skip();
    }
    assert_true(strlen(dir_template) < sizeof t->dir);
    strcpy(t->dir, dir_template);
    assert_non_null(mkdtemp(t->dir));
    int cp = te_free_port(), pp = te_free_port();
    char cu[64], pu[64], cl[96], log[300];
    snprintf(cu, sizeof cu, "http://127.0.0.1:%d", cp);
    snprintf(pu, sizeof pu, "http://127.0.0.1:%d", pp);
    snprintf(cl, sizeof cl, "t=%s", pu);
    snprintf(log, sizeof log, "%s/etcd.log", t->dir);
    char *argv[] = {(char *)TE_ETCD_EXE, "--name", "t", "--data-dir", t->dir,
                    "--listen-client-urls", cu, "--advertise-client-urls", cu,
                    "--listen-peer-urls", pu, "--initial-advertise-peer-urls", pu,
                    "--initial-cluster", cl, NULL};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    assert_int_equal(posix_spawn(&t->pid, TE_ETCD_EXE, &fa, NULL, argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    t->client_port = cp;
}

/* Waits (up to 10 s) until etcd answers through e: a get of key, which
 * must not exist, says it does not. */
static inline void te_etcd_wait(kvs_etcd *e, const char *key)
{
    char *v = NULL;
    int rc = KVS_ERR_CONN;
    for (int i = 0; i < 100 && rc != KVS_ERR_NOT_FOUND; i++) {
        rc = kvs_etcd_get(e, key, &v, NULL, NULL);
        if (rc != KVS_ERR_NOT_FOUND) usleep(100000);
    }
    assert_int_equal(rc, KVS_ERR_NOT_FOUND);
}

/* Stops etcd and removes its directory. */
static inline void te_etcd_stop(te_etcd *t)
{
    kill(t->pid, SIGTERM);
    waitpid(t->pid, NULL, 0);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", t->dir);
    assert_int_equal(system(cmd), 0);
}

#endif
