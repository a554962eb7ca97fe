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

#define KVS_LOGE(...) kvs_log(KVS_LOG_ERROR, __VA_ARGS__)
#define KVS_LOGW(...) kvs_log(KVS_LOG_WARN, __VA_ARGS__)
#define KVS_LOGI(...) kvs_log(KVS_LOG_INFO, __VA_ARGS__)
#define KVS_LOGD(...)                                                                        \
    do {                                                                                     \
        if (kvs_log_level() >= KVS_LOG_DEBUG) kvs_log(KVS_LOG_DEBUG, __VA_ARGS__);           \
    } while (0)

#endif
