/* `kvshelf status` (the pool's state from the master's STATS) and
 * `kvshelf stop` (SHUTDOWN; for the embedded host-local pool). Neither
 * starts an embedded pool. */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "client/client_ext.h"
#include "common/etcd.h"
#include "common/log.h"
#include "common/net.h"
#include "common/util.h"
#include "kvshelf/kvshelf.h"
#include "tools/commands.h"
#include "tools/table.h"

typedef struct tool_opts {
    const char *master, *config, *secret;
    int json, verbose;
} tool_opts;

/* Parses the shared options; returns -1 to go on, else an exit status. */
static int parse(const char *name, int argc, char **argv, tool_opts *o, int allow_json,
                 void (*usage)(FILE *))
{
    enum { O_MASTER = 256, O_CONFIG, O_JSON, O_SECRET };
    static const struct option lo[] = {
        {"master", required_argument, 0, O_MASTER}, {"config", required_argument, 0, O_CONFIG},
        {"secret", required_argument, 0, O_SECRET}, {"json", no_argument, 0, O_JSON},
        {"verbose", no_argument, 0, 'v'},          {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    memset(o, 0, sizeof *o);
    optind = 1;
    opterr = 0;
    for (;;) {
        int ch = getopt_long(argc, argv, "vh", lo, NULL);
        if (ch < 0) break;
        switch (ch) {
        case O_MASTER: o->master = optarg; break;
        case O_CONFIG: o->config = optarg; break;
        case O_SECRET: o->secret = optarg; break;
        case O_JSON:
            if (!allow_json) goto bad;
            o->json = 1;
            break;
        case 'v': o->verbose = 1; break;
        case 'h': usage(stdout); return 0;
        default: goto bad;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvshelf %s: unexpected argument '%s'\n\n", name, argv[optind]);
        usage(stderr);
        return 2;
    }
    if (o->verbose) kvs_log_set_level(KVS_LOG_INFO);
    return -1;
bad:
    fprintf(stderr, "kvshelf %s: unknown or incomplete option '%s'\n\n", name, argv[optind - 1]);
    usage(stderr);
    return 2;
}

/* Config from --config, the environment, then --master/--secret. */
static int load_config(const char *name, const tool_opts *o, kvs_config *cfg)
{
    char err[512] = "";
    kvs_config_init(cfg);
    if ((o->config && kvs_config_load_file(cfg, o->config, err, sizeof err)) ||
        kvs_config_load_env(cfg, err, sizeof err)) {
        fprintf(stderr, "kvshelf %s: %s\n", name, err);
        return 2;
    }
    if (o->master &&
        kvs_strlcpy(cfg->master_server_address, o->master, sizeof cfg->master_server_address)) {
        fprintf(stderr, "kvshelf %s: --master is too long\n", name);
        return 2;
    }
    if (o->secret && kvs_strlcpy(cfg->secret, o->secret, sizeof cfg->secret)) {
        fprintf(stderr, "kvshelf %s: --secret is too long\n", name);
        return 2;
    }
    if (kvs_config_validate(cfg, err, sizeof err)) {
        fprintf(stderr, "kvshelf %s: %s\n", name, err);
        return 2;
    }
    return 0;
}

/* Opens a tool connection (no segment, never starts the embedded pool).
 * Returns 0, 3 when no embedded pool runs (message printed by the caller),
 * or 1 on failure (message printed). */
static int open_tool(const char *name, const kvs_config *cfg, kvs_client **c)
{
    char err[512] = "";
    kvs_client_opts opt = {KVS_ROLE_TOOL, 1, 1};
    int rc = kvs_client_open_opts(cfg, &opt, c, err, sizeof err);
    if (rc == KVS_ERR_UNAVAILABLE && !cfg->master_server_address[0]) return 3;
    if (rc) {
        fprintf(stderr, "kvshelf %s: %s (%s)\n", name, err[0] ? err : kvs_strerror(rc),
                kvs_errname(rc));
        return 1;
    }
    return 0;
}

/* ---- status ---- */

static void status_usage(FILE *f)
{
    fprintf(f,
            "usage: kvshelf status [--master ADDR] [--json] [--secret S] [--config FILE]\n\n"
            "Shows the pool: segments, capacity and use, objects, clients and counters.\n"
            "Without a master address (option, configuration or environment) it shows\n"
            "the embedded host-local pool of this user, and says so if none is running\n"
            "(it never starts one).\n\n"
            "  --master ADDR   master address, host:port or unix:/path, or\n"
            "                  etcd://host:port[,host:port][/prefix] (failover: also shows\n"
            "                  which master leads and which stand by)\n"
            "  --json          print the master's STATS JSON document as is\n"
            "  --secret S      shared secret (or KVSHELF_SECRET; default: this user's pool\n"
            "                  secret, <runtime dir>/secret)\n"
            "  --config FILE   JSON configuration (Mooncake keys)\n"
            "  -v, --verbose   log more\n"
            "  -h, --help      this text\n\n"
            "Exit status: 0 shown, 1 error, 2 bad usage, 3 no embedded pool is running.\n");
}

static void human(double v, char *out, size_t cap)
{
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int i = 0;
    while (v >= 1024 && i < 5) {
        v /= 1024;
        i++;
    }
    if (i == 0) snprintf(out, cap, "%.0f B", v);
    else snprintf(out, cap, "%.2f %s", v, u[i]);
}

static double num(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

static const char *str(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) && v->valuestring ? v->valuestring : "-";
}

static void print_table(const char *master, int embedded, const cJSON *root)
{
    char a[32], b[32];
    printf("master      %s%s\n", master, embedded ? "  (embedded host-local pool)" : "");
    printf("uptime      %.1f s\n", num(root, "uptime_s"));
    double cap = num(root, "capacity"), used = num(root, "used");
    human(cap, a, sizeof a);
    human(used, b, sizeof b);
    printf("capacity    %s, used %s (%.1f%%)\n", a, b, cap > 0 ? 100.0 * used / cap : 0.0);
    printf("objects     %.0f stored, %.0f being written, %.0f read leases\n",
           num(root, "objects"), num(root, "writing"), num(root, "leases"));
    const cJSON *rec = cJSON_GetObjectItemCaseSensitive(root, "recovery");
    if (cJSON_IsObject(rec)) {
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(rec, "complete")))
            printf("recovery    complete after %.1f s: %.0f objects taken back from the "
                   "segments' directories, %.0f entries refused\n",
                   num(rec, "complete_after_ms") / 1000.0, num(rec, "objects_recovered"),
                   num(rec, "entries_refused"));
        else
            printf("recovery    COLLECTING: %.0f segment(s) handed in their directory, %.0f "
                   "pending; %.0f objects taken back so far (lookups of the rest miss)\n",
                   num(rec, "segments_collected"), num(rec, "segments_pending"),
                   num(rec, "objects_recovered"));
    }
    const cJSON *segs = cJSON_GetObjectItemCaseSensitive(root, "segments");
    int ns = cJSON_IsArray(segs) ? cJSON_GetArraySize(segs) : 0;
    printf("\nsegments (%d)\n", ns);
    if (ns) {
        static const char *const cols[] = {"ID",   "SIZE", "USED",     "USE%",
                                           "OBJECTS", "HOST", "TRANSFER", "SHM"};
        kvs_table *t = kvs_table_new(8, cols, 0x1 | 0x8 | 0x10);
        const cJSON *s;
        cJSON_ArrayForEach(s, segs)
        {
            double sz = num(s, "size"), us = num(s, "used");
            char id[32], pct[16], nobj[32];
            human(sz, a, sizeof a);
            human(us, b, sizeof b);
            snprintf(id, sizeof id, "%.0f", num(s, "id"));
            snprintf(pct, sizeof pct, "%.1f%%", sz > 0 ? 100.0 * us / sz : 0.0);
            snprintf(nobj, sizeof nobj, "%.0f", num(s, "objects"));
            const char *row[] = {id, a, b, pct, nobj, str(s, "hostname"),
                                 str(s, "transfer_addr"), str(s, "shm_name")};
            kvs_table_add(t, row);
        }
        kvs_table_print(t, stdout, 2);
        kvs_table_free(t);
    }
    const cJSON *cls = cJSON_GetObjectItemCaseSensitive(root, "clients");
    int nc = cJSON_IsArray(cls) ? cJSON_GetArraySize(cls) : 0;
    printf("\nclients (%d)\n", nc);
    if (nc) {
        static const char *const cols[] = {"ID", "ROLE", "HOST", "PID", "LAST SEEN"};
        kvs_table *t = kvs_table_new(5, cols, 0x1 | 0x8);
        const cJSON *cl;
        cJSON_ArrayForEach(cl, cls)
        {
            char id[32], pid[32], seen[48];
            snprintf(id, sizeof id, "%.0f", num(cl, "id"));
            snprintf(pid, sizeof pid, "%.0f", num(cl, "pid"));
            snprintf(seen, sizeof seen, "%.1f s ago", num(cl, "last_seen_ms_ago") / 1000.0);
            const char *row[] = {id, str(cl, "role"), str(cl, "hostname"), pid, seen};
            kvs_table_add(t, row);
        }
        kvs_table_print(t, stdout, 2);
        kvs_table_free(t);
    }
    const cJSON *cn = cJSON_GetObjectItemCaseSensitive(root, "counters");
    if (cJSON_IsObject(cn)) {
        printf("\ncounters\n ");
        const cJSON *v;
        int col = 0;
        cJSON_ArrayForEach(v, cn)
        {
            if (!cJSON_IsNumber(v) || !v->string) continue;
            printf(" %s %.0f", v->string, v->valuedouble);
            if (++col % 6 == 0) printf("\n ");
        }
        printf("\n");
    }
}

/* ---- engines: the vLLM connectors' own view (kvshelf.vllm) ----
 * Each process running a kvshelf.vllm connector rewrites
 * <runtime dir>/engines/<pid>.json every few seconds: its pool address,
 * whether it reaches it, the last error and its counters. Files of dead
 * pids are removed here. Prints nothing when the folder does not exist. */
static void print_engines(const char *runtime_dir)
{
    char dir[1024];
    if (snprintf(dir, sizeof dir, "%s/engines", runtime_dir) >= (int)sizeof dir) return;
    DIR *d = opendir(dir);
    if (!d) return;
    static const char *const cols[] = {"PID",    "ROLE",  "POOL",  "STATE",   "HITS",
                                       "MISSES", "LOADS", "SAVES", "UPDATED", "LAST ERROR"};
    kvs_table *t = kvs_table_new(10, cols, 0x1 | 0x10 | 0x20 | 0x40 | 0x80);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    double now = (double)tv.tv_sec + tv.tv_usec / 1e6;
    int n = 0, pruned = 0;
    struct dirent *e;
    while (t && (e = readdir(d))) {
        const char *nm = e->d_name;
        size_t len = strlen(nm), digits = strspn(nm, "0123456789");
        if (digits == 0 || digits > 10 || len != digits + 5 || strcmp(nm + digits, ".json")) continue;
        long pid = strtol(nm, NULL, 10);
        char path[1400];
        snprintf(path, sizeof path, "%s/%s", dir, nm);
        if (pid <= 0 || (kill((pid_t)pid, 0) < 0 && errno == ESRCH)) {
            if (unlink(path) == 0) pruned++;
            continue;
        }
        FILE *f = fopen(path, "r");
        if (!f) continue;
        char buf[65536];
        size_t got = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[got] = '\0';
        cJSON *j = cJSON_Parse(buf);
        if (!cJSON_IsObject(j)) { /* being replaced, or not ours */
            cJSON_Delete(j);
            continue;
        }
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "counters");
        double upd = num(j, "updated"), every = num(j, "interval_s");
        if (every < 1) every = 5;
        char spid[32], hits[32], miss[32], loads[32], saves[32], ago[48], state[48];
        snprintf(spid, sizeof spid, "%ld", pid);
        snprintf(hits, sizeof hits, "%.0f", num(c, "hit_blocks"));
        snprintf(miss, sizeof miss, "%.0f", num(c, "miss_blocks"));
        snprintf(loads, sizeof loads, "%.0f", num(c, "loaded"));
        snprintf(saves, sizeof saves, "%.0f", num(c, "saved"));
        snprintf(ago, sizeof ago, "%.1f s ago", now - upd > 0 ? now - upd : 0.0);
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(j, "reachable");
        if (upd <= 0 || now - upd > 3 * every + 10)
            snprintf(state, sizeof state, "stale");
        else if (cJSON_IsTrue(r))
            snprintf(state, sizeof state, "ok");
        else
            snprintf(state, sizeof state, "UNREACHABLE %.0f s", num(j, "unreachable_s"));
        const char *err = str(j, "last_error");
        const char *row[] = {spid, str(j, "role"), str(j, "pool"), state, hits,
                             miss, loads,          saves,          ago,   cJSON_IsTrue(r) ? "-" : err};
        kvs_table_add(t, row);
        n++;
        cJSON_Delete(j);
    }
    closedir(d);
    printf("\nengines (%d)%s\n", n, n ? "  (vLLM connectors: kvshelf.vllm; HITS/MISSES/LOADS/SAVES in blocks)" : "");
    if (n) kvs_table_print(t, stdout, 2);
    if (pruned) printf("  (removed %d file%s of engines that are gone)\n", pruned, pruned > 1 ? "s" : "");
    kvs_table_free(t);
}

/* Failover (master_server_address "etcd://..."): the masters registered in
 * etcd and which of them is the leader, as a JSON object ({"etcd": URL,
 * "leader": ADDR or null, "masters": [{"address", "role"}]}), or NULL when
 * the address is not etcd:// or etcd did not answer (a message goes to
 * stderr then). The caller frees it. */
static cJSON *election_view(const kvs_config *cfg)
{
    const char *url = cfg->master_server_address;
    if (strncmp(url, "etcd://", 7) != 0) return NULL;
    char eps[1024], prefix[256], key[300];
    kvs_etcd *e = NULL;
    if (kvs_etcd_parse_url(url, eps, sizeof eps, prefix, sizeof prefix) != KVS_OK ||
        kvs_etcd_new(eps, 2000, &e) != KVS_OK)
        return NULL;
    char *leader = NULL;
    snprintf(key, sizeof key, "%s/leader", prefix);
    int lrc = kvs_etcd_get(e, key, &leader, NULL, NULL);
    kvs_etcd_kv *kvs = NULL;
    size_t n = 0;
    snprintf(key, sizeof key, "%s/members/", prefix);
    int mrc = lrc == KVS_OK || lrc == KVS_ERR_NOT_FOUND ? kvs_etcd_list(e, key, 1000, &kvs, &n)
                                                        : lrc;
    kvs_etcd_free(e);
    if (mrc != KVS_OK) {
        fprintf(stderr, "kvshelf status: etcd %s: %s\n", eps, kvs_strerror(mrc));
        free(leader);
        return NULL;
    }
    cJSON *v = cJSON_CreateObject();
    cJSON *arr = v ? cJSON_AddArrayToObject(v, "masters") : NULL;
    if (arr) {
        cJSON_AddStringToObject(v, "etcd", url);
        if (leader) cJSON_AddStringToObject(v, "leader", leader);
        else cJSON_AddNullToObject(v, "leader");
        for (size_t i = 0; i < n; i++) {
            cJSON *m = cJSON_CreateObject();
            if (!m) break;
            cJSON_AddStringToObject(m, "address", kvs[i].value);
            cJSON_AddStringToObject(m, "role", leader && !strcmp(leader, kvs[i].value)
                                                   ? "leader" : "standby");
            cJSON_AddItemToArray(arr, m);
        }
    }
    kvs_etcd_kvs_free(kvs, n);
    free(leader);
    return v;
}

static void print_election(const cJSON *v)
{
    const cJSON *l = cJSON_GetObjectItemCaseSensitive(v, "leader");
    printf("election    %s: leader %s\n",
           cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(v, "etcd")),
           cJSON_IsString(l) ? l->valuestring : "none (an election is under way)");
    const cJSON *m;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(v, "masters"))
    {
        printf("            %-8s %s\n",
               cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role")),
               cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "address")));
    }
}

int kvs_cmd_status(int argc, char **argv)
{
    tool_opts o;
    kvs_log_set_name("status");
    int prc = parse("status", argc, argv, &o, 1, status_usage);
    if (prc >= 0) return prc;
    kvs_config cfg;
    if ((prc = load_config("status", &o, &cfg))) return prc;
    signal(SIGPIPE, SIG_IGN);
    cJSON *ev = election_view(&cfg); /* failover: who leads (NULL without etcd) */
    kvs_client *c;
    int orc = open_tool("status", &cfg, &c);
    if (orc == 3) {
        char dir[512];
        kvs_embedded_runtime_dir(&cfg, dir, sizeof dir);
        if (o.json) {
            cJSON *j = cJSON_CreateObject();
            char *t = NULL;
            if (j && cJSON_AddFalseToObject(j, "running") &&
                cJSON_AddStringToObject(j, "runtime_dir", dir))
                t = cJSON_PrintUnformatted(j);
            if (t) printf("%s\n", t);
            free(t);
            cJSON_Delete(j);
        }
        fprintf(stderr,
                "kvshelf status: no embedded pool is running (runtime dir %s).\n"
                "It starts with the first program that opens a client without a master\n"
                "address; give --master ADDR to ask a standalone master.\n",
                dir);
        if (!o.json) print_engines(dir);
        return 3;
    }
    if (orc) {
        char dir[512];
        kvs_embedded_runtime_dir(&cfg, dir, sizeof dir);
        if (ev && o.json) {
            char *t = cJSON_PrintUnformatted(ev);
            if (t) printf("{\"election\":%s}\n", t);
            free(t);
        } else if (ev) {
            print_election(ev);
        }
        cJSON_Delete(ev);
        if (!o.json) print_engines(dir);
        return orc;
    }
    char *json = NULL;
    int rc = kvs_client_stats_json(c, &json);
    int status = 0;
    if (rc) {
        fprintf(stderr, "kvshelf status: STATS failed: %s (%s)\n", kvs_strerror(rc),
                kvs_errname(rc));
        status = 1;
    } else if (o.json && !ev) {
        printf("%s\n", json);
    } else if (o.json) { /* the STATS document with the election added */
        cJSON *root = cJSON_Parse(json);
        char *t = NULL;
        if (root && cJSON_AddItemToObject(root, "election", ev)) {
            ev = NULL;
            t = cJSON_PrintUnformatted(root);
        }
        printf("%s\n", t ? t : json);
        free(t);
        cJSON_Delete(root);
    } else {
        cJSON *root = cJSON_Parse(json);
        if (!root) {
            fprintf(stderr, "kvshelf status: the master sent invalid JSON\n");
            status = 1;
        } else {
            print_table(kvs_client_master_addr(c), kvs_client_is_embedded(c), root);
            if (ev) print_election(ev);
            cJSON_Delete(root);
            char dir[512];
            kvs_embedded_runtime_dir(&cfg, dir, sizeof dir);
            print_engines(dir);
        }
    }
    free(json);
    cJSON_Delete(ev);
    kvs_client_close(c);
    return status;
}

/* ---- stop ---- */

static void stop_usage(FILE *f)
{
    fprintf(f,
            "usage: kvshelf stop [--master ADDR] [--secret S] [--config FILE]\n\n"
            "Stops the embedded host-local pool of this user (its objects are lost),\n"
            "or the master at ADDR (allowed from the same host and user, or with the\n"
            "secret). Waits until it is gone. Programs still using the embedded pool\n"
            "start a new one when they next need it.\n\n"
            "  --master ADDR   master address, host:port or unix:/path\n"
            "  --secret S      shared secret (or KVSHELF_SECRET; default: this user's pool\n"
            "                  secret, <runtime dir>/secret)\n"
            "  --config FILE   JSON configuration (Mooncake keys)\n"
            "  -v, --verbose   log more\n"
            "  -h, --help      this text\n\n"
            "Exit status: 0 stopped (or nothing was running), 1 error, 2 bad usage.\n");
}

int kvs_cmd_stop(int argc, char **argv)
{
    tool_opts o;
    kvs_log_set_name("stop");
    int prc = parse("stop", argc, argv, &o, 0, stop_usage);
    if (prc >= 0) return prc;
    kvs_config cfg;
    if ((prc = load_config("stop", &o, &cfg))) return prc;
    signal(SIGPIPE, SIG_IGN);
    kvs_client *c;
    int orc = open_tool("stop", &cfg, &c);
    if (orc == 3) {
        char dir[512];
        kvs_embedded_runtime_dir(&cfg, dir, sizeof dir);
        fprintf(stderr, "kvshelf stop: no embedded pool is running (runtime dir %s)\n", dir);
        return 0;
    }
    if (orc) return orc;
    char addr_text[600];
    kvs_strlcpy(addr_text, kvs_client_master_addr(c), sizeof addr_text);
    int embedded = kvs_client_is_embedded(c);
    int rc = kvs_client_shutdown_master(c);
    kvs_client_close(c);
    if (rc) {
        fprintf(stderr, "kvshelf stop: the master at %s refused or failed: %s (%s)\n", addr_text,
                kvs_strerror(rc), kvs_errname(rc));
        return 1;
    }
    /* wait until it no longer accepts connections */
    kvs_addr a;
    int gone = 0;
    if (kvs_addr_parse(addr_text, KVS_DEFAULT_MASTER_PORT, &a) == KVS_OK) {
        uint64_t deadline = kvs_now_ms() + 10000;
        while (kvs_now_ms() < deadline) {
            int fd = kvs_connect(&a, 500);
            if (fd < 0) {
                gone = 1;
                break;
            }
            close(fd);
            struct timespec ts = {0, 50 * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    if (!gone) {
        fprintf(stderr, "kvshelf stop: asked %s to stop, but it still accepts connections\n",
                addr_text);
        return 1;
    }
    fprintf(stderr, "kvshelf stop: stopped %s%s\n", embedded ? "the embedded pool at " : "",
            addr_text);
    return 0;
}
