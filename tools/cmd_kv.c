/* Debugging verbs: `kvshelf put KEY [VALUE|-]`, `kvshelf get KEY`,
 * `kvshelf rm KEY...`. They connect as tools (no segment of their own);
 * `put` starts the embedded pool if needed, `get` and `rm` do not. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client/client_ext.h"
#include "common/log.h"
#include "common/util.h"
#include "kvshelf/kvshelf.h"
#include "tools/commands.h"

typedef struct kv_opts {
    const char *master, *config, *secret;
    int verbose;
} kv_opts;

static void usage_put(FILE *f)
{
    fprintf(f,
            "usage: kvshelf put [options] KEY [VALUE|-]\n\n"
            "Stores VALUE (or standard input, with '-' or no VALUE) under KEY. A key\n"
            "already stored is not overwritten (exit 1, KVS_ERR_EXISTS): rm it first.\n");
}
static void usage_get(FILE *f)
{
    fprintf(f,
            "usage: kvshelf get [options] KEY\n\n"
            "Writes the value stored under KEY to standard output, as raw bytes.\n"
            "Exit 1 if it is not stored.\n");
}
static void usage_rm(FILE *f)
{
    fprintf(f,
            "usage: kvshelf rm [options] KEY...\n\n"
            "Removes the keys. Exit 1 if any was not stored or could not be removed.\n");
}

static void usage_common(FILE *f)
{
    fprintf(f,
            "\noptions:\n"
            "  --master ADDR   master address, host:port or unix:/path (default: the\n"
            "                  embedded host-local pool)\n"
            "  --secret S      shared secret (or KVSHELF_SECRET; default: this user's pool\n"
            "                  secret, <runtime dir>/secret)\n"
            "  --config FILE   JSON configuration (Mooncake keys)\n"
            "  -v, --verbose   log more\n"
            "  -h, --help      this text\n\n"
            "Keys are taken as the bytes of the argument. Exit status: 0 done,\n"
            "1 failure, 2 bad usage.\n");
}

/* Parses options; returns -1 to go on (positional args from optind), else
 * an exit status. */
static int parse(const char *name, int argc, char **argv, kv_opts *o, void (*usage)(FILE *))
{
    enum { O_MASTER = 256, O_CONFIG, O_SECRET };
    static const struct option lo[] = {
        {"master", required_argument, 0, O_MASTER}, {"config", required_argument, 0, O_CONFIG},
        {"secret", required_argument, 0, O_SECRET}, {"verbose", no_argument, 0, 'v'},
        {"help", no_argument, 0, 'h'},              {0, 0, 0, 0},
    };
    memset(o, 0, sizeof *o);
    optind = 1;
    opterr = 0;
    for (;;) {
        /* "+": stop at the first positional argument (a value may start with '-') */
        int ch = getopt_long(argc, argv, "+vh", lo, NULL);
        if (ch < 0) break;
        switch (ch) {
        case O_MASTER: o->master = optarg; break;
        case O_CONFIG: o->config = optarg; break;
        case O_SECRET: o->secret = optarg; break;
        case 'v': o->verbose = 1; break;
        case 'h':
            usage(stdout);
            usage_common(stdout);
            return 0;
        default:
            fprintf(stderr, "kvshelf %s: unknown or incomplete option '%s'\n\n", name,
                    argv[optind - 1]);
            usage(stderr);
            usage_common(stderr);
            return 2;
        }
    }
    if (o->verbose) kvs_log_set_level(KVS_LOG_INFO);
    return -1;
}

static int open_client(const char *name, const kv_opts *o, int spawn, kvs_client **c)
{
    kvs_config cfg;
    char err[512] = "";
    kvs_config_init(&cfg);
    if ((o->config && kvs_config_load_file(&cfg, o->config, err, sizeof err)) ||
        kvs_config_load_env(&cfg, err, sizeof err)) {
        fprintf(stderr, "kvshelf %s: %s\n", name, err);
        return 2;
    }
    if (o->master &&
        kvs_strlcpy(cfg.master_server_address, o->master, sizeof cfg.master_server_address)) {
        fprintf(stderr, "kvshelf %s: --master is too long\n", name);
        return 2;
    }
    if (o->secret && kvs_strlcpy(cfg.secret, o->secret, sizeof cfg.secret)) {
        fprintf(stderr, "kvshelf %s: --secret is too long\n", name);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    kvs_client_opts opt = {KVS_ROLE_TOOL, 1, !spawn};
    int rc = kvs_client_open_opts(&cfg, &opt, c, err, sizeof err);
    if (rc) {
        fprintf(stderr, "kvshelf %s: %s (%s)\n", name, err[0] ? err : kvs_strerror(rc),
                kvs_errname(rc));
        return rc == KVS_ERR_CONFIG ? 2 : 1;
    }
    return 0;
}

static int check_key(const char *name, const char *key)
{
    size_t n = strlen(key);
    if (n == 0 || n > KVS_KEY_MAX) {
        fprintf(stderr, "kvshelf %s: a key is 1 to %d bytes\n", name, KVS_KEY_MAX);
        return 2;
    }
    return 0;
}

/* Reads all of stdin into a malloc'd buffer. */
static int read_stdin(uint8_t **out, uint64_t *len)
{
    size_t cap = 1 << 16, n = 0;
    uint8_t *p = malloc(cap);
    if (!p) return -1;
    for (;;) {
        if (n == cap) {
            uint8_t *q = realloc(p, cap * 2);
            if (!q) {
                free(p);
                return -1;
            }
            p = q;
            cap *= 2;
        }
        size_t r = fread(p + n, 1, cap - n, stdin);
        n += r;
        if (r == 0) {
            if (ferror(stdin)) {
                free(p);
                return -1;
            }
            break;
        }
    }
    *out = p;
    *len = n;
    return 0;
}

int kvs_cmd_put(int argc, char **argv)
{
    kv_opts o;
    kvs_log_set_name("put");
    int rc = parse("put", argc, argv, &o, usage_put);
    if (rc >= 0) return rc;
    int npos = argc - optind;
    if (npos < 1 || npos > 2) {
        fprintf(stderr, "kvshelf put: give KEY and optionally VALUE (or '-' for stdin)\n\n");
        usage_put(stderr);
        usage_common(stderr);
        return 2;
    }
    const char *key = argv[optind];
    if ((rc = check_key("put", key))) return rc;
    const char *val = npos == 2 ? argv[optind + 1] : "-";
    uint8_t *buf = NULL;
    uint64_t len;
    if (!strcmp(val, "-")) {
        if (read_stdin(&buf, &len)) {
            fprintf(stderr, "kvshelf put: cannot read standard input: %s\n", strerror(errno));
            return 1;
        }
    } else {
        len = strlen(val);
    }
    kvs_client *c;
    if ((rc = open_client("put", &o, 1, &c))) {
        free(buf);
        return rc;
    }
    int st = kvs_put(c, key, (uint32_t)strlen(key), buf ? (const void *)buf : val, len);
    kvs_client_close(c);
    free(buf);
    if (st) {
        fprintf(stderr, "kvshelf put: %s: %s (%s)\n", key, kvs_strerror(st), kvs_errname(st));
        return 1;
    }
    return 0;
}

int kvs_cmd_get(int argc, char **argv)
{
    kv_opts o;
    kvs_log_set_name("get");
    int rc = parse("get", argc, argv, &o, usage_get);
    if (rc >= 0) return rc;
    if (argc - optind != 1) {
        fprintf(stderr, "kvshelf get: give exactly one KEY\n\n");
        usage_get(stderr);
        usage_common(stderr);
        return 2;
    }
    const char *key = argv[optind];
    if ((rc = check_key("get", key))) return rc;
    kvs_client *c;
    if ((rc = open_client("get", &o, 0, &c))) return rc;
    uint64_t cap = 1 << 20, size = 0;
    uint8_t *buf = NULL;
    int st = KVS_ERR_NOMEM;
    for (int tries = 0; tries < 4; tries++) {
        uint8_t *nb = realloc(buf, cap ? cap : 1);
        if (!nb) {
            st = KVS_ERR_NOMEM;
            break;
        }
        buf = nb;
        st = kvs_get(c, key, (uint32_t)strlen(key), buf, cap, &size);
        if (st != KVS_ERR_TOO_LARGE) break;
        cap = size; /* it grew (or we guessed too small): try again with its size */
    }
    kvs_client_close(c);
    if (st) {
        fprintf(stderr, "kvshelf get: %s: %s (%s)\n", key, kvs_strerror(st), kvs_errname(st));
        free(buf);
        return 1;
    }
    int out_ok = fwrite(buf, 1, size, stdout) == size && fflush(stdout) == 0;
    free(buf);
    if (!out_ok) {
        fprintf(stderr, "kvshelf get: cannot write standard output: %s\n", strerror(errno));
        return 1;
    }
    return 0;
}

int kvs_cmd_rm(int argc, char **argv)
{
    kv_opts o;
    kvs_log_set_name("rm");
    int rc = parse("rm", argc, argv, &o, usage_rm);
    if (rc >= 0) return rc;
    int n = argc - optind;
    if (n < 1) {
        fprintf(stderr, "kvshelf rm: give one or more KEYs\n\n");
        usage_rm(stderr);
        usage_common(stderr);
        return 2;
    }
    for (int i = 0; i < n; i++)
        if ((rc = check_key("rm", argv[optind + i]))) return rc;
    kvs_key *keys = calloc((size_t)n, sizeof *keys);
    int *res = calloc((size_t)n, sizeof *res);
    if (!keys || !res) {
        free(keys);
        free(res);
        fprintf(stderr, "kvshelf rm: out of memory\n");
        return 1;
    }
    for (int i = 0; i < n; i++)
        keys[i] = (kvs_key){argv[optind + i], (uint32_t)strlen(argv[optind + i])};
    kvs_client *c;
    if ((rc = open_client("rm", &o, 0, &c))) {
        free(keys);
        free(res);
        return rc;
    }
    int removed = kvs_remove_batch(c, keys, (size_t)n, res);
    kvs_client_close(c);
    int status = 0;
    if (removed < 0) {
        fprintf(stderr, "kvshelf rm: %s (%s)\n", kvs_strerror(removed), kvs_errname(removed));
        status = 1;
    } else {
        for (int i = 0; i < n; i++) {
            if (res[i] == KVS_OK) continue;
            fprintf(stderr, "kvshelf rm: %s: %s (%s)\n", argv[optind + i], kvs_strerror(res[i]),
                    kvs_errname(res[i]));
            status = 1;
        }
    }
    free(keys);
    free(res);
    return status;
}
