/* The busy-poll budget adapts to the host: no spinning while every core has
 * a runnable task (the thread that would produce the reply would lose its
 * core to the spinner), the configured budget when a core is free. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/spin.h"

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* Loads given as files in /proc/loadavg's format. */
static void test_fake_loads(void **state)
{
    (void)state;
    char path[] = "/tmp/kvs-loadavg-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    int cpus = (int)sysconf(_SC_NPROCESSORS_ONLN), r, c;
    char text[128];
    /* only the caller runs: spin */
    write_file(path, "0.50 0.40 0.30 1/321 4242\n");
    kvs_spin_set_source(path);
    assert_int_equal(kvs_spin_ns(), 50000);
    kvs_spin_last_sample(&r, &c);
    assert_int_equal(r, 1);
    assert_int_equal(c, cpus);
    /* as many runnable tasks as cores: no core free for the peer */
    snprintf(text, sizeof text, "3.00 2.00 1.00 %d/321 4242\n", cpus);
    write_file(path, text);
    kvs_spin_set_source(path);
    assert_int_equal(kvs_spin_ns(), 0);
    assert_int_equal(kvs_spin_ns(), 0); /* until the next sample */
    /* a core free again, seen at the next sample (every KVS_SPIN_SAMPLE_MS) */
    snprintf(text, sizeof text, "3.00 2.00 1.00 %d/321 4242\n", cpus - 1 > 0 ? cpus - 1 : 0);
    write_file(path, text);
    sleep_ms(KVS_SPIN_SAMPLE_MS + 20);
    assert_int_equal(kvs_spin_ns(), 50000);
    /* unreadable or garbage: no information, keep the configured budget */
    write_file(path, "garbage\n");
    kvs_spin_set_source(path);
    assert_int_equal(kvs_spin_ns(), 50000);
    unlink(path);
    kvs_spin_set_source("/nonexistent/loadavg");
    assert_int_equal(kvs_spin_ns(), 50000);
    kvs_spin_set_source(NULL);
}

static atomic_int g_stop;

static void *burn(void *arg)
{
    (void)arg;
    volatile uint64_t x = 0;
    while (!atomic_load(&g_stop)) x++;
    return NULL;
}

/* The real host: with a busy thread on every core, the budget drops to 0. */
static void test_busy_host(void **state)
{
    (void)state;
    int cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    pthread_t th[256];
    int n = cpus < 256 ? cpus : 256;
    atomic_store(&g_stop, 0);
    for (int i = 0; i < n; i++) assert_int_equal(pthread_create(&th[i], NULL, burn, NULL), 0);
    kvs_spin_set_source(NULL);
    uint64_t budget = 1;
    for (int i = 0; i < 40 && budget; i++) {
        sleep_ms(KVS_SPIN_SAMPLE_MS + 10);
        budget = kvs_spin_ns();
    }
    atomic_store(&g_stop, 1);
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    int r, c;
    kvs_spin_last_sample(&r, &c);
    if (budget) fail_msg("still spinning with %d busy threads on %d cpus (last sample %d)", n, c, r);
}

int main(void)
{
    setenv("KVSHELF_SPIN_US", "50", 1);
    unsetenv("KVSHELF_SPIN_ADAPT");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fake_loads),
        cmocka_unit_test(test_busy_host),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
