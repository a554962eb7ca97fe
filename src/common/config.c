/* Client configuration: defaults, JSON / file / environment overlays and
 * validation. See include/kvshelf/config.h for the keys.
 *
 * Every overlay works on a copy and writes it back only when every key was
 * accepted, so a failed load leaves the caller's config unchanged. Messages
 * name the key (or environment variable) and the offending value.
 * Environment: an empty KVSHELF_* variable for a string key sets it to "";
 * an empty one for a number/size key is ignored. */
#include "kvshelf/config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "common/etcd.h"
#include "common/net.h"
#include "kvshelf/errors.h"

#define CFG_MAX_FILE (1u << 20)
/* Sizes above this are surely mistakes (1 PiB). */
#define CFG_MAX_SIZE (1ull << 50)

enum field_type { F_STR, F_SIZE, F_INT, F_PROTOCOL, F_DEVICES };

typedef struct field {
    const char *key;
    const char *env;
    enum field_type type;
    size_t off;
    size_t cap; /* F_STR/F_PROTOCOL/F_DEVICES: size of the char array */
} field;

#define STR_FIELD(k, env, t) {#k, env, t, offsetof(kvs_config, k), sizeof(((kvs_config *)0)->k)}
#define NUM_FIELD(k, env, t) {#k, env, t, offsetof(kvs_config, k), 0}

static const field fields[] = {
    STR_FIELD(local_hostname, "KVSHELF_LOCAL_HOSTNAME", F_STR),
    STR_FIELD(metadata_server, "KVSHELF_METADATA_SERVER", F_STR),
    STR_FIELD(master_server_address, "KVSHELF_MASTER_SERVER_ADDRESS", F_STR),
    STR_FIELD(protocol, "KVSHELF_PROTOCOL", F_PROTOCOL),
    STR_FIELD(device_name, "KVSHELF_DEVICE_NAME", F_DEVICES),
    NUM_FIELD(global_segment_size, "KVSHELF_GLOBAL_SEGMENT_SIZE", F_SIZE),
    NUM_FIELD(local_buffer_size, "KVSHELF_LOCAL_BUFFER_SIZE", F_SIZE),
    STR_FIELD(secret, "KVSHELF_SECRET", F_STR),
    NUM_FIELD(timeout_ms, "KVSHELF_TIMEOUT_MS", F_INT),
    STR_FIELD(runtime_dir, "KVSHELF_RUNTIME_DIR", F_STR),
};

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void clearerr_(char *err, size_t errlen)
{
    if (err && errlen) err[0] = '\0';
}

/* Copies `text` into a short printable form for messages (quotes added by
 * the caller): at most 64 characters, control bytes as '?'. */
static const char *shown(const char *text, char buf[80])
{
    size_t n = 0;
    for (; text[n] && n < 64; n++) {
        unsigned char c = (unsigned char)text[n];
        buf[n] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    if (text[n]) {
        memcpy(buf + n, "...", 4);
    } else {
        buf[n] = '\0';
    }
    return buf;
}

/* Fills `cfg` with the defaults (see config.h). */
void kvs_config_init(kvs_config *cfg)
{
    if (!cfg) return;
    memset(cfg, 0, sizeof *cfg);
    strcpy(cfg->local_hostname, "127.0.0.1");
    strcpy(cfg->protocol, "tcp");
    cfg->global_segment_size = KVS_DEFAULT_GLOBAL_SEGMENT_SIZE;
    cfg->local_buffer_size = KVS_DEFAULT_LOCAL_BUFFER_SIZE;
    cfg->timeout_ms = KVS_DEFAULT_TIMEOUT_MS;
    /* KVSHELF_RUNTIME_DIR is the default too (not only an overlay of
     * kvs_config_load_env), so that every process of the user, configured
     * or not, finds the same pool secret and sockets there */
    const char *rd = getenv("KVSHELF_RUNTIME_DIR");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int n = -1;
    if (rd && rd[0] == '/') n = snprintf(cfg->runtime_dir, sizeof cfg->runtime_dir, "%s", rd);
    if ((n < 0 || (size_t)n >= sizeof cfg->runtime_dir) && xdg && xdg[0] == '/')
        n = snprintf(cfg->runtime_dir, sizeof cfg->runtime_dir, "%s/kvshelf", xdg);
    if (n < 0 || (size_t)n >= sizeof cfg->runtime_dir)
        snprintf(cfg->runtime_dir, sizeof cfg->runtime_dir, "/tmp/kvshelf-%u",
                 (unsigned)getuid());
}

static int suffix_mult(const char *s, uint64_t *mult)
{
    static const struct {
        const char *name;
        int shift;
    } sfx[] = {
        {"", 0},    {"b", 0},    {"k", 10},   {"kb", 10},  {"kib", 10}, {"m", 20},
        {"mb", 20}, {"mib", 20}, {"g", 30},   {"gb", 30},  {"gib", 30}, {"t", 40},
        {"tb", 40}, {"tib", 40}, {"p", 50},   {"pb", 50},  {"pib", 50},
    };
    for (size_t i = 0; i < sizeof sfx / sizeof sfx[0]; i++)
        if (!strcasecmp(s, sfx[i].name)) {
            *mult = 1ull << sfx[i].shift;
            return 1;
        }
    return 0;
}

/* Parses "123", "64MiB", "3.125 GB" (suffixes are powers of 1024, case
 * insensitive; a fraction of a byte is dropped). See config.h. */
int kvs_parse_size(const char *text, uint64_t *out)
{
    if (!text || !out) return KVS_ERR_INVALID;
    const char *p = text;
    while (isspace((unsigned char)*p)) p++;
    unsigned __int128 mant = 0, scale = 1;
    int digits = 0, frac = 0, in_frac = 0;
    for (;; p++) {
        if (*p >= '0' && *p <= '9') {
            if (digits >= 30) return KVS_ERR_CONFIG; /* absurdly long */
            mant = mant * 10 + (unsigned)(*p - '0');
            digits++;
            if (in_frac) {
                scale *= 10;
                frac++;
            }
        } else if (*p == '.' && !in_frac) {
            in_frac = 1;
        } else {
            break;
        }
    }
    if (digits == 0) return KVS_ERR_CONFIG;
    while (*p == ' ' || *p == '\t') p++;
    char suffix[8];
    size_t sl = 0;
    while (isalpha((unsigned char)*p)) {
        if (sl + 1 >= sizeof suffix) return KVS_ERR_CONFIG;
        suffix[sl++] = *p++;
    }
    suffix[sl] = '\0';
    while (isspace((unsigned char)*p)) p++;
    if (*p) return KVS_ERR_CONFIG;
    uint64_t mult;
    if (!suffix_mult(suffix, &mult)) return KVS_ERR_CONFIG;
    (void)frac;
    unsigned __int128 v = mant * mult / scale; /* mant < 10^30, mult <= 2^50: fits */
    if (v > UINT64_MAX) return KVS_ERR_CONFIG;
    *out = (uint64_t)v;
    return KVS_OK;
}

static int lowercase_into(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);
    if (n >= cap) return -1;
    for (size_t i = 0; i <= n; i++) dst[i] = (char)tolower((unsigned char)src[i]);
    return 0;
}

/* Applies a textual value (JSON string or environment variable) to field f
 * of cfg. `who` names it in messages (key or variable). */
static int apply_text(kvs_config *cfg, const field *f, const char *who, const char *text,
                      char *err, size_t errlen)
{
    char sb[80];
    char *dst = (char *)cfg + f->off;
    switch (f->type) {
    case F_STR:
    case F_DEVICES:
        if (strlen(text) >= f->cap) {
            seterr(err, errlen, "%s: value '%s' is too long (at most %zu bytes)", who,
                   shown(text, sb), f->cap - 1);
            return KVS_ERR_CONFIG;
        }
        if (f->type == F_DEVICES) {
            for (const char *c = text; *c; c++)
                if (isspace((unsigned char)*c)) {
                    seterr(err, errlen,
                           "%s: value '%s' must be NIC names separated by commas, without "
                           "spaces",
                           who, shown(text, sb));
                    return KVS_ERR_CONFIG;
                }
        }
        strcpy(dst, text);
        return KVS_OK;
    case F_PROTOCOL: {
        char low[16];
        if (lowercase_into(low, sizeof low, text) != 0 ||
            (strcmp(low, "tcp") != 0 && strcmp(low, "rdma") != 0)) {
            seterr(err, errlen, "%s: value '%s' is not a protocol (expected \"tcp\" or \"rdma\")",
                   who, shown(text, sb));
            return KVS_ERR_CONFIG;
        }
        strcpy(dst, low);
        return KVS_OK;
    }
    case F_SIZE: {
        uint64_t v;
        if (kvs_parse_size(text, &v) != KVS_OK) {
            seterr(err, errlen,
                   "%s: value '%s' is not a size (expected bytes, or a number with K, M, G, T, "
                   "KB, MB, GB, KiB, MiB, GiB, ... e.g. \"4GiB\")",
                   who, shown(text, sb));
            return KVS_ERR_CONFIG;
        }
        memcpy(dst, &v, sizeof v);
        return KVS_OK;
    }
    case F_INT: {
        const char *p = text;
        while (isspace((unsigned char)*p)) p++;
        char *end = NULL;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        while (end && isspace((unsigned char)*end)) end++;
        if (end == p || !end || *end || errno || v < INT_MIN || v > INT_MAX) {
            seterr(err, errlen, "%s: value '%s' is not an integer", who, shown(text, sb));
            return KVS_ERR_CONFIG;
        }
        if (v <= 0) {
            seterr(err, errlen, "%s: value %lld must be greater than 0", who, v);
            return KVS_ERR_CONFIG;
        }
        int iv = (int)v;
        memcpy(dst, &iv, sizeof iv);
        return KVS_OK;
    }
    }
    return KVS_ERR_INTERNAL;
}

static const char *json_type_name(const cJSON *v)
{
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    return "invalid";
}

static int apply_json(kvs_config *cfg, const field *f, const cJSON *v, char *err, size_t errlen)
{
    if (cJSON_IsString(v)) return apply_text(cfg, f, f->key, v->valuestring, err, errlen);
    if (cJSON_IsNumber(v) && (f->type == F_SIZE || f->type == F_INT)) {
        double d = v->valuedouble;
        if (!isfinite(d) || d != floor(d)) {
            seterr(err, errlen, "%s: value %g is not a whole number", f->key, d);
            return KVS_ERR_CONFIG;
        }
        char *dst = (char *)cfg + f->off;
        if (f->type == F_SIZE) {
            if (d < 0 || d >= 18446744073709551616.0) {
                seterr(err, errlen, "%s: value %.0f is not a size in bytes", f->key, d);
                return KVS_ERR_CONFIG;
            }
            uint64_t u = (uint64_t)d;
            memcpy(dst, &u, sizeof u);
            return KVS_OK;
        }
        if (d <= 0 || d > INT_MAX) {
            seterr(err, errlen, "%s: value %.0f must be between 1 and %d", f->key, d, INT_MAX);
            return KVS_ERR_CONFIG;
        }
        int iv = (int)d;
        memcpy(dst, &iv, sizeof iv);
        return KVS_OK;
    }
    seterr(err, errlen, "%s: expected %s, got %s", f->key,
           f->type == F_SIZE   ? "a size (number or string like \"4GiB\")"
           : f->type == F_INT ? "an integer"
                              : "a string",
           json_type_name(v));
    return KVS_ERR_CONFIG;
}

static int load_json_into(kvs_config *cfg, const char *text, size_t len, const char *origin,
                          char *err, size_t errlen)
{
    char tmp[400];
    const char *end = NULL;
    /* text[len] is NUL: parse it too so trailing garbage is rejected. */
    cJSON *root = cJSON_ParseWithLengthOpts(text, len + 1, &end, 1);
    if (!root) {
        size_t off = end && end >= text ? (size_t)(end - text) : 0;
        size_t line = 1, col = 1;
        for (size_t i = 0; i < off && i < len; i++) {
            if (text[i] == '\n') {
                line++;
                col = 1;
            } else {
                col++;
            }
        }
        seterr(err, errlen, "%s%sinvalid JSON near line %zu, column %zu", origin ? origin : "",
               origin ? ": " : "", line, col);
        return KVS_ERR_CONFIG;
    }
    int rc = KVS_OK;
    if (!cJSON_IsObject(root)) {
        seterr(err, errlen, "%s%sconfiguration must be a JSON object, got %s",
               origin ? origin : "", origin ? ": " : "", json_type_name(root));
        rc = KVS_ERR_CONFIG;
    }
    for (const cJSON *it = root->child; rc == KVS_OK && it; it = it->next) {
        const field *f = NULL;
        for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
            if (it->string && !strcmp(it->string, fields[i].key)) f = &fields[i];
        if (!f && it->string && !strcmp(it->string, "store")) {
            /* the store the configuration selects (the Python package reads
             * it too): kvshelf's own pool is what this loader configures */
            char sb[80];
            if (cJSON_IsString(it) && !strcmp(it->valuestring, "kvshelf")) continue;
            if (cJSON_IsString(it) && !strcmp(it->valuestring, "mooncake"))
                seterr(tmp, sizeof tmp,
                       "'store': 'mooncake' selects a Mooncake Store, which the kvshelf client "
                       "library and CLI do not speak (Mooncake offers no C interface): use it "
                       "through the Python package (kvshelf.mooncake_store.MooncakeBlockStore, "
                       "or the vLLM connector / UCM stores given this configuration), or drop "
                       "the key for kvshelf's own pool");
            else if (cJSON_IsString(it))
                seterr(tmp, sizeof tmp, "'store' must be \"kvshelf\" or \"mooncake\", got '%s'",
                       shown(it->valuestring, sb));
            else
                seterr(tmp, sizeof tmp, "'store' must be \"kvshelf\" or \"mooncake\", got %s",
                       json_type_name(it));
            rc = KVS_ERR_CONFIG;
        } else if (!f) {
            char sb[80];
            seterr(tmp, sizeof tmp,
                   "unknown key '%s' (known: local_hostname, metadata_server, "
                   "master_server_address, protocol, device_name, global_segment_size, "
                   "local_buffer_size, secret, timeout_ms, runtime_dir, store)",
                   shown(it->string ? it->string : "", sb));
            rc = KVS_ERR_CONFIG;
        } else {
            rc = apply_json(cfg, f, it, tmp, sizeof tmp);
        }
        if (rc != KVS_OK)
            seterr(err, errlen, "%s%s%s", origin ? origin : "", origin ? ": " : "", tmp);
    }
    cJSON_Delete(root);
    return rc;
}

/* Overlays a JSON object given as text; cfg unchanged on error. See config.h. */
int kvs_config_load_json(kvs_config *cfg, const char *json_text, char *err, size_t errlen)
{
    clearerr_(err, errlen);
    if (!cfg || !json_text) {
        seterr(err, errlen, "NULL configuration or JSON text");
        return KVS_ERR_INVALID;
    }
    kvs_config c = *cfg;
    int rc = load_json_into(&c, json_text, strlen(json_text), NULL, err, errlen);
    if (rc == KVS_OK) *cfg = c;
    return rc;
}

static int load_file_into(kvs_config *cfg, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        seterr(err, errlen, "cannot open configuration file '%s': %s", path, strerror(errno));
        return KVS_ERR_IO;
    }
    char *buf = malloc(CFG_MAX_FILE + 1);
    if (!buf) {
        fclose(f);
        seterr(err, errlen, "out of memory reading '%s'", path);
        return KVS_ERR_NOMEM;
    }
    size_t n = fread(buf, 1, CFG_MAX_FILE + 1, f);
    int rerr = ferror(f);
    int saved = errno;
    fclose(f);
    int rc;
    if (rerr) {
        seterr(err, errlen, "cannot read configuration file '%s': %s", path, strerror(saved));
        rc = KVS_ERR_IO;
    } else if (n > CFG_MAX_FILE) {
        seterr(err, errlen, "configuration file '%s' is larger than %u bytes", path,
               CFG_MAX_FILE);
        rc = KVS_ERR_CONFIG;
    } else if (memchr(buf, '\0', n)) {
        seterr(err, errlen, "configuration file '%s' contains a NUL byte", path);
        rc = KVS_ERR_CONFIG;
    } else {
        buf[n] = '\0';
        rc = load_json_into(cfg, buf, n, path, err, errlen);
    }
    free(buf);
    return rc;
}

/* Overlays the JSON file at `path`; cfg unchanged on error. See config.h. */
int kvs_config_load_file(kvs_config *cfg, const char *path, char *err, size_t errlen)
{
    clearerr_(err, errlen);
    if (!cfg || !path) {
        seterr(err, errlen, "NULL configuration or path");
        return KVS_ERR_INVALID;
    }
    kvs_config c = *cfg;
    int rc = load_file_into(&c, path, err, errlen);
    if (rc == KVS_OK) *cfg = c;
    return rc;
}

/* Overlays KVSHELF_CONFIG / MOONCAKE_CONFIG_PATH then the KVSHELF_* variables;
 * cfg unchanged on error. See config.h. */
int kvs_config_load_env(kvs_config *cfg, char *err, size_t errlen)
{
    clearerr_(err, errlen);
    if (!cfg) {
        seterr(err, errlen, "NULL configuration");
        return KVS_ERR_INVALID;
    }
    kvs_config c = *cfg;
    const char *file = getenv("KVSHELF_CONFIG");
    const char *which = "KVSHELF_CONFIG";
    if (!file || !*file) {
        file = getenv("MOONCAKE_CONFIG_PATH");
        which = "MOONCAKE_CONFIG_PATH";
    }
    if (file && *file) {
        char tmp[400];
        int rc = load_file_into(&c, file, tmp, sizeof tmp);
        if (rc != KVS_OK) {
            seterr(err, errlen, "%s: %s", which, tmp);
            return rc;
        }
    }
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        const field *f = &fields[i];
        const char *v = getenv(f->env);
        if (!v) continue;
        if (!*v && (f->type == F_SIZE || f->type == F_INT)) continue;
        int rc = apply_text(&c, f, f->env, v, err, errlen);
        if (rc != KVS_OK) return rc;
    }
    *cfg = c;
    return KVS_OK;
}

static int valid_http_url(const char *u, const char **why)
{
    const char *rest = NULL;
    if (!strncmp(u, "http://", 7)) rest = u + 7;
    else if (!strncmp(u, "https://", 8)) rest = u + 8;
    if (!rest) {
        *why = "must be empty, \"P2PHANDSHAKE\" or an http:// URL";
        return 0;
    }
    size_t hl = strcspn(rest, "/?#");
    if (hl == 0) {
        *why = "has no host";
        return 0;
    }
    for (const char *c = u; *c; c++)
        if ((unsigned char)*c <= 0x20 || *c == 0x7f) {
            *why = "contains spaces or control characters";
            return 0;
        }
    char hostport[300];
    if (hl >= sizeof hostport) {
        *why = "has a host that is too long";
        return 0;
    }
    memcpy(hostport, rest, hl);
    hostport[hl] = '\0';
    if (strchr(hostport, '@')) {
        *why = "must not contain credentials";
        return 0;
    }
    kvs_addr a;
    if (kvs_addr_parse(hostport, 80, &a) != KVS_OK || a.is_unix || a.port == 0) {
        *why = "has an invalid host or port";
        return 0;
    }
    return 1;
}

/* Checks the configuration as a whole. See config.h. */
int kvs_config_validate(const kvs_config *cfg, char *err, size_t errlen)
{
    clearerr_(err, errlen);
    if (!cfg) {
        seterr(err, errlen, "NULL configuration");
        return KVS_ERR_INVALID;
    }
    char sb[80];
    /* Fixed-size fields must be NUL-terminated (the struct may come from C code). */
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        const field *f = &fields[i];
        if (f->cap && !memchr((const char *)cfg + f->off, '\0', f->cap)) {
            seterr(err, errlen, "%s: value is not NUL-terminated", f->key);
            return KVS_ERR_CONFIG;
        }
    }
    if (!strcmp(cfg->protocol, "rdma")) {
        seterr(err, errlen,
               "protocol: \"rdma\" is not built in this version of kvshelf; use \"tcp\"");
        return KVS_ERR_CONFIG;
    }
    if (strcmp(cfg->protocol, "tcp") != 0) {
        seterr(err, errlen, "protocol: value '%s' is not a protocol (expected \"tcp\")",
               shown(cfg->protocol, sb));
        return KVS_ERR_CONFIG;
    }
    if (cfg->timeout_ms <= 0) {
        seterr(err, errlen, "timeout_ms: value %d must be greater than 0", cfg->timeout_ms);
        return KVS_ERR_CONFIG;
    }
    if (cfg->global_segment_size > CFG_MAX_SIZE) {
        seterr(err, errlen, "global_segment_size: value %llu is larger than 1 PiB",
               (unsigned long long)cfg->global_segment_size);
        return KVS_ERR_CONFIG;
    }
    if (cfg->global_segment_size != 0 && cfg->global_segment_size < 4096) {
        seterr(err, errlen,
               "global_segment_size: value %llu is too small (0 for none, or at least 4096)",
               (unsigned long long)cfg->global_segment_size);
        return KVS_ERR_CONFIG;
    }
    if (cfg->local_buffer_size > CFG_MAX_SIZE) {
        seterr(err, errlen, "local_buffer_size: value %llu is larger than 1 PiB",
               (unsigned long long)cfg->local_buffer_size);
        return KVS_ERR_CONFIG;
    }
    kvs_addr a;
    if (!cfg->local_hostname[0]) {
        seterr(err, errlen, "local_hostname: must not be empty");
        return KVS_ERR_CONFIG;
    }
    if (kvs_addr_parse(cfg->local_hostname, 0, &a) != KVS_OK || a.is_unix) {
        seterr(err, errlen, "local_hostname: value '%s' is not a host name or address",
               shown(cfg->local_hostname, sb));
        return KVS_ERR_CONFIG;
    }
    if (!kvs_addr_is_loopback(&a) && !cfg->secret[0]) {
        seterr(err, errlen,
               "secret: required because local_hostname '%s' is not a loopback address "
               "(set \"secret\" or KVSHELF_SECRET on every process of the pool)",
               shown(cfg->local_hostname, sb));
        return KVS_ERR_CONFIG;
    }
    if (!strncmp(cfg->master_server_address, "etcd://", 7)) { /* failover: leader in etcd */
        char eps[1024], pre[256];
        if (kvs_etcd_parse_url(cfg->master_server_address, eps, sizeof eps, pre, sizeof pre) !=
            KVS_OK) {
            seterr(err, errlen,
                   "master_server_address: value '%s' is not \"etcd://host:port[,host:port]"
                   "[/prefix]\"",
                   shown(cfg->master_server_address, sb));
            return KVS_ERR_CONFIG;
        }
    } else if (cfg->master_server_address[0]) {
        if (kvs_addr_parse(cfg->master_server_address, KVS_DEFAULT_MASTER_PORT, &a) != KVS_OK ||
            (!a.is_unix && a.port == 0)) {
            seterr(err, errlen,
                   "master_server_address: value '%s' is not \"host:port\" or \"unix:/path\"",
                   shown(cfg->master_server_address, sb));
            return KVS_ERR_CONFIG;
        }
    }
    const char *ms = cfg->metadata_server;
    if (ms[0] && strcmp(ms, "P2PHANDSHAKE") != 0) {
        const char *why = NULL;
        if (!strncmp(ms, "redis://", 8)) {
            seterr(err, errlen,
                   "metadata_server: '%s': redis metadata servers are not supported "
                   "yet; use an http:// or etcd:// URL, \"P2PHANDSHAKE\" or \"\"",
                   shown(ms, sb));
            return KVS_ERR_CONFIG;
        }
        if (!strncmp(ms, "etcd://", 7)) {
            char eps[1024], pre[256];
            if (kvs_etcd_parse_url(ms, eps, sizeof eps, pre, sizeof pre) != KVS_OK) {
                seterr(err, errlen, "metadata_server: value '%s' is not \"etcd://host:port"
                                    "[,host:port]\"",
                       shown(ms, sb));
                return KVS_ERR_CONFIG;
            }
        } else if (!valid_http_url(ms, &why)) {
            seterr(err, errlen, "metadata_server: value '%s' %s", shown(ms, sb), why);
            return KVS_ERR_CONFIG;
        }
    }
    if (cfg->runtime_dir[0] != '/') {
        seterr(err, errlen, "runtime_dir: value '%s' must be an absolute path",
               shown(cfg->runtime_dir, sb));
        return KVS_ERR_CONFIG;
    }
    for (const char *c = cfg->device_name; *c; c++)
        if (isspace((unsigned char)*c)) {
            seterr(err, errlen, "device_name: value '%s' must not contain spaces",
                   shown(cfg->device_name, sb));
            return KVS_ERR_CONFIG;
        }
    return KVS_OK;
}
