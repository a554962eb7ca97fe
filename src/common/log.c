#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static int g_level = -1;
static char g_name[32] = "kvshelf";

int kvs_log_level(void)
{
    int l = __atomic_load_n(&g_level, __ATOMIC_RELAXED);
    if (l >= 0) return l;
    const char *e = getenv("KVSHELF_LOG");
    l = KVS_LOG_WARN;
    if (e) {
        if (!strcasecmp(e, "error")) l = KVS_LOG_ERROR;
        else if (!strcasecmp(e, "warn")) l = KVS_LOG_WARN;
        else if (!strcasecmp(e, "info")) l = KVS_LOG_INFO;
        else if (!strcasecmp(e, "debug")) l = KVS_LOG_DEBUG;
    }
    __atomic_store_n(&g_level, l, __ATOMIC_RELAXED);
    return l;
}

void kvs_log_set_level(int level) { __atomic_store_n(&g_level, level, __ATOMIC_RELAXED); }

void kvs_log_set_name(const char *name)
{
    snprintf(g_name, sizeof g_name, "%s", name ? name : "kvshelf");
}

/* Writes one formatted line (prefix, message, optional suffix) with one
 * write(2). */
static void log_line(int level, const char *suffix, const char *fmt, va_list ap)
{
    static const char *names[] = {"ERROR", "WARN", "INFO", "DEBUG"};
    char line[1024];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%02d:%02d:%02d.%03ld %s[%d] %s: ", tm.tm_hour,
                     tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000, g_name, (int)getpid(),
                     names[level < 0 ? 0 : level > 3 ? 3 : level]);
    if (n < (int)sizeof line) n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    if (suffix && n < (int)sizeof line) n += snprintf(line + n, sizeof line - (size_t)n, "%s", suffix);
    if (n >= (int)sizeof line - 1) n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(2, line, (size_t)n);
    (void)w;
}

void kvs_log(int level, const char *fmt, ...)
{
    if (level > kvs_log_level()) return;
    va_list ap;
    va_start(ap, fmt);
    log_line(level, NULL, fmt, ap);
    va_end(ap);
}

int kvs_log_limited(kvs_log_limit *lim, unsigned interval_ms, int level, const char *fmt, ...)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned long long now = (unsigned long long)ts.tv_sec * 1000ull +
                             (unsigned long long)ts.tv_nsec / 1000000ull;
    unsigned long long next = __atomic_load_n(&lim->next_ms, __ATOMIC_RELAXED);
    /* one thread wins each interval; the others count themselves as dropped */
    if (now < next || !__atomic_compare_exchange_n(&lim->next_ms, &next, now + interval_ms, 0,
                                                   __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        __atomic_fetch_add(&lim->suppressed, 1, __ATOMIC_RELAXED);
        return 0;
    }
    unsigned long long dropped = __atomic_exchange_n(&lim->suppressed, 0, __ATOMIC_RELAXED);
    if (level > kvs_log_level()) return 1;
    char suffix[96] = "";
    if (dropped)
        snprintf(suffix, sizeof suffix, " (%llu more like this suppressed since the last one)",
                 dropped);
    va_list ap;
    va_start(ap, fmt);
    log_line(level, dropped ? suffix : NULL, fmt, ap);
    va_end(ap);
    return 1;
}
