/* Adaptive busy-poll budget (see spin.h). */
#include "common/spin.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static uint64_t g_max_ns;
static int g_adapt, g_cpus;
static atomic_uint_fast64_t g_next_sample_ns;
static atomic_int g_busy, g_runnable;
static pthread_mutex_t g_src_mu = PTHREAD_MUTEX_INITIALIZER;
static char g_src[256] = "/proc/loadavg";

static void init(void)
{
    g_max_ns = kvs_env_u64("KVSHELF_SPIN_US", 50, 0, 10000, "microseconds") * 1000u;
    g_adapt = kvs_env_u64("KVSHELF_SPIN_ADAPT", 1, 0, 1, "0 or 1") != 0;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    g_cpus = n > 0 ? (int)n : 1;
}

/* Runnable tasks of the host (loadavg's "R/T" field), or -1. */
static int read_runnable(void)
{
    char path[256], buf[128];
    pthread_mutex_lock(&g_src_mu);
    memcpy(path, g_src, sizeof path);
    pthread_mutex_unlock(&g_src_mu);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = '\0';
    double a, b, c;
    int running, total;
    if (sscanf(buf, "%lf %lf %lf %d/%d", &a, &b, &c, &running, &total) != 5 || running < 0)
        return -1;
    return running;
}

uint64_t kvs_spin_ns(void)
{
    pthread_once(&g_once, init);
    if (!g_max_ns || !g_adapt) return g_max_ns;
    uint64_t now = kvs_now_ns();
    uint_fast64_t next = atomic_load(&g_next_sample_ns);
    if (now >= next &&
        atomic_compare_exchange_strong(&g_next_sample_ns, &next,
                                       now + KVS_SPIN_SAMPLE_MS * 1000000ull)) {
        int r = read_runnable();
        atomic_store(&g_runnable, r);
        /* r counts the caller itself: r >= cpus leaves no core for the peer */
        atomic_store(&g_busy, r >= 0 && r >= g_cpus);
    }
    return atomic_load(&g_busy) ? 0 : g_max_ns;
}

void kvs_spin_set_source(const char *path)
{
    pthread_mutex_lock(&g_src_mu);
    kvs_strlcpy(g_src, path ? path : "/proc/loadavg", sizeof g_src);
    pthread_mutex_unlock(&g_src_mu);
    atomic_store(&g_next_sample_ns, 0);
}

void kvs_spin_last_sample(int *runnable, int *cpus)
{
    pthread_once(&g_once, init);
    *runnable = atomic_load(&g_runnable);
    *cpus = g_cpus;
}
