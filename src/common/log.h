/* Logging to stderr with a level set by KVSHELF_LOG (error, warn, info, debug;
 * default warn). Thread-safe: one write(2) per line. */
#ifndef KVS_LOG_H
#define KVS_LOG_H

enum kvs_log_level { KVS_LOG_ERROR = 0, KVS_LOG_WARN = 1, KVS_LOG_INFO = 2, KVS_LOG_DEBUG = 3 };

/* Current level (read once from KVSHELF_LOG). */
int kvs_log_level(void);
/* Overrides the level (e.g. from a --verbose flag). */
void kvs_log_set_level(int level);
/* Sets the component name printed on each line ("master", "client", ...). */
void kvs_log_set_name(const char *name);
void kvs_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Rate limit of one kind of message (a flood of refused connections must not
 * become a flood of log lines). Zero-initialize it (static storage or a
 * struct member); thread-safe. */
typedef struct kvs_log_limit {
    unsigned long long next_ms;    /* no line before this (monotonic ms) */
    unsigned long long suppressed; /* lines dropped since the last one written */
} kvs_log_limit;

/* Logs like kvs_log, but at most one line per interval_ms through `lim`;
 * the lines dropped meanwhile are counted and the next line written says how
 * many ("(N more like this suppressed since the last one)"). Returns 1 if the line was written
 * (or would have been, below the log level), 0 if it was suppressed. */
int kvs_log_limited(kvs_log_limit *lim, unsigned interval_ms, int level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define KVS_LOGE(...) kvs_log(KVS_LOG_ERROR, __VA_ARGS__)
#define KVS_LOGW(...) kvs_log(KVS_LOG_WARN, __VA_ARGS__)
#define KVS_LOGI(...) kvs_log(KVS_LOG_INFO, __VA_ARGS__)
#define KVS_LOGD(...)                                                                        \
    do {                                                                                     \
        if (kvs_log_level() >= KVS_LOG_DEBUG) kvs_log(KVS_LOG_DEBUG, __VA_ARGS__);           \
    } while (0)

#endif
