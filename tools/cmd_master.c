/* kvshelf master: runs the master daemon (RPC event loop, HTTP metrics and
 * embedded metadata service), or with --embedded the host-local pool (the
 * master on a unix socket plus, in the same process, a client that serves
 * the pool's shared-memory segment). */
#include <errno.h>
#include <netdb.h>
#include <sys/socket.h>
#include <dirent.h>
#include <getopt.h>
#include <pthread.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"
#include "client/client_ext.h"
#include "kvshelf/client.h"
#include "kvshelf/config.h"
#include "kvshelf/errors.h"
#include "common/etcd.h"
#include "master/election.h"
#include "master/master.h"
#include "master/server.h"
#include "master/web.h"
#include "segment/segment.h"
#include "segment/prefault.h"
#include "tools/commands.h"

#define MAX_LISTEN 8

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

typedef struct opts {
    const char *listen[MAX_LISTEN];
    int nlisten;
    const char *http;      /* NULL = default */
    const char *secret;
    const char *port_file;
    const char *runtime_dir;
    uint64_t segment_size;
    int embedded, no_metadata, no_local_socket, detach;
    uint32_t busy_poll_us;
    uint32_t max_conns, hello_ms; /* 0 = defaults */
    const char *etcd;       /* failover: etcd endpoints (NULL = a single master) */
    const char *etcd_prefix;
    uint32_t etcd_ttl_s;
    const char *advertise;
    kvs_master_opts mo;
} opts;

/* A uid for --allow-uid: a number or a user name. */
static int parse_uid(const char *s, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (s[0] >= '0' && s[0] <= '9' && !errno && *end == '\0' && v < 0xffffffffUL) {
        *out = (uint32_t)v;
        return 0;
    }
    struct passwd pw, *res = NULL;
    char buf[4096];
    if (getpwnam_r(s, &pw, buf, sizeof buf, &res) == 0 && res) {
        *out = (uint32_t)res->pw_uid;
        return 0;
    }
    fprintf(stderr, "kvshelf master: --allow-uid: '%s' is not a uid or a user name\n", s);
    return -1;
}

static void usage(FILE *f)
{
    fprintf(f,
"usage: kvshelf master [options]\n"
"\n"
"Runs the kvshelf master: object index, space allocation, eviction, leases,\n"
"client liveness and metrics. Metadata only: bytes never pass through it.\n"
"\n"
"options:\n"
"  --listen ADDR          RPC address: host:port, [v6]:port or unix:/path; repeat for\n"
"                         several (default 127.0.0.1:50001; port 0 picks a free port)\n"
"  --http ADDR|off        HTTP address for /metrics, /health and /metadata\n"
"                         (default 127.0.0.1:9003; off in --embedded mode)\n"
"  --no-metadata          do not serve the embedded metadata service at /metadata\n"
"  --secret S             shared secret clients must prove in HELLO (default: env\n"
"                         KVSHELF_SECRET). Required when any address is not loopback;\n"
"                         then /metadata and every HTTP write need the header\n"
"                         'Authorization: Bearer S' too. Without it the master uses\n"
"                         this user's pool secret, <runtime dir>/secret (created once,\n"
"                         mode 0600), which the user's own clients read from there:\n"
"                         other users of the host are refused on every port\n"
"  --allow-uid UID        also accept unix-socket clients of this uid (or user name)\n"
"                         without the secret, besides the master's own uid and root;\n"
"                         repeat for several (not with a configured secret)\n"
"  --client-ttl-ms N      expire a client silent for N ms: unmount its segments,\n"
"                         drop their objects, revoke its puts (default 10000)\n"
"  --lease-ms N           read lease granted by GET (default 5000)\n"
"  --put-timeout-ms N     revoke a put not ended within N ms (default 30000)\n"
"                         (--client-ttl and --put-timeout are accepted as aliases)\n"
"  --evict-high F         start evicting a segment above this use (default 0.95;\n"
"                         a fraction, or a percentage such as 95)\n"
"  --evict-low F          evict down to this use (default 0.90)\n"
"  --no-local-socket      do not offer clients on this host a unix socket (by default\n"
"                         a master with only TCP listeners also listens on\n"
"                         <runtime dir>/master-<port>-<pid>.sock and same-host\n"
"                         clients switch to it during the handshake)\n"
"  --max-conns N          RPC connections open at once (default: the open-files limit\n"
"                         less max(32, limit/8), at most 65536). At the limit a new\n"
"                         connection replaces the oldest one that has not said HELLO\n"
"                         yet, else it is closed at once; out of descriptors, the\n"
"                         master stops accepting for 10 ms .. 1 s instead of spinning\n"
"  --hello-timeout-ms N   close a connection that has not completed HELLO within N ms\n"
"                         (default 3000)\n"
"  --disconnect-grace-ms N  expire a client N ms after its connection closed (a\n"
"                         crashed node: its segment leaves the pool then, not after\n"
"                         the TTL; default 1000, at most --client-ttl-ms)\n"
"  --busy-poll-us N       after serving requests, keep polling this long before\n"
"                         sleeping, so the next request is read without a wake-up\n"
"                         (default 100, or env KVSHELF_BUSY_POLL_US; 0 = never)\n"
"  --port-file F          after listening, write {\"rpc\":P,\"http\":Q} to F (P: first TCP\n"
"                         listener or 0, Q: HTTP port or 0)\n"
"  --log-level L          error, warn, info or debug (default: env KVSHELF_LOG, else warn)\n"
"  --embedded             run the host-local pool: listen on unix:DIR/master.sock only\n"
"                         (plus any --listen), write DIR/master.pid, and serve a shared-\n"
"                         memory segment of --segment-size bytes from this process\n"
"  --detach               fork and let the started process exit at once, so the master\n"
"                         is nobody's child (clients start the embedded pool this way:\n"
"                         an engine that kills its process tree leaves the pool alone);\n"
"                         it also leaves the CPU pinning it was started with (runs on\n"
"                         every CPU its cgroup allows)\n"
"  --runtime-dir DIR      the user's kvshelf directory: pool secret, unix sockets of\n"
"                         --embedded and of same-host clients (default env\n"
"                         KVSHELF_RUNTIME_DIR, else $XDG_RUNTIME_DIR/kvshelf, else\n"
"                         /tmp/kvshelf-<uid>)\n"
"  --segment-size N       bytes of the embedded pool (default 3355443200; suffixes K, M,\n"
"                         G, KiB, MiB, GiB...)\n"
"\n"
"failover (several masters, one leader, elected through etcd):\n"
"  --etcd HOST:PORT[,HOST:PORT]  etcd endpoints (its v3 JSON gateway, plain HTTP). The\n"
"                         master serves only while it holds the leader key\n"
"                         <prefix>/leader (= its --advertise address, attached to its\n"
"                         etcd lease); a standby listens on nothing and takes over\n"
"                         about one TTL after the leader died, then rebuilds the\n"
"                         index from the nodes' directories. Clients and nodes use\n"
"                         master_server_address = etcd://HOST:PORT[,HOST:PORT][/prefix]\n"
"  --etcd-prefix P        key prefix in etcd (default kvshelf)\n"
"  --etcd-ttl S           etcd lease TTL in seconds (default 3): a leader that cannot\n"
"                         renew its lease stops serving after 80 %% of it\n"
"  --advertise HOST:PORT  the RPC address clients reach this master at (default: the\n"
"                         first --listen host:port, which must then name a port).\n"
"                         A standby keeps its ports bound but listens (and writes\n"
"                         --port-file) only once elected; give every master the same\n"
"                         --lease-ms\n"
"  -h, --help             show this help\n"
"\n"
"Stops on SIGTERM/SIGINT or a SHUTDOWN request (kvshelf stop) and exits 0.\n");
}

static int parse_u32(const char *name, const char *s, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v == 0 || v > 0x7fffffffUL) {
        fprintf(stderr, "kvshelf master: %s: invalid value '%s' (a positive integer)\n", name, s);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

/* 0..100000 microseconds. */
static int parse_busy_poll(const char *name, const char *s, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v > 100000UL) {
        fprintf(stderr, "kvshelf master: %s: invalid value '%s' (0..100000 microseconds)\n",
                name, s);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int parse_frac(const char *name, const char *s, double *out)
{
    char *end;
    double v = strtod(s, &end);
    if (end != s && *end == '%') end++;
    if (end == s || *end || !(v > 0) || v > 100) {
        fprintf(stderr, "kvshelf master: %s: invalid value '%s' (0..1 or a percentage)\n", name,
                s);
        return -1;
    }
    *out = v > 1 ? v / 100.0 : v;
    return 0;
}

static int parse_level(const char *s)
{
    if (!strcasecmp(s, "error")) return KVS_LOG_ERROR;
    if (!strcasecmp(s, "warn") || !strcasecmp(s, "warning")) return KVS_LOG_WARN;
    if (!strcasecmp(s, "info")) return KVS_LOG_INFO;
    if (!strcasecmp(s, "debug")) return KVS_LOG_DEBUG;
    return -1;
}

enum {
    O_LISTEN = 256, O_HTTP, O_SECRET, O_TTL, O_LEASE, O_PUT_TIMEOUT, O_HIGH, O_LOW, O_NO_MD,
    O_PORT_FILE, O_LOG, O_EMBEDDED, O_RUNDIR, O_SEGSIZE, O_BUSY_POLL, O_NO_LOCAL, O_ALLOW_UID,
    O_MAX_CONNS, O_HELLO_MS, O_DISC_GRACE, O_DETACH, O_ETCD, O_ETCD_PREFIX, O_ETCD_TTL,
    O_ADVERTISE
};

static int parse_args(int argc, char **argv, opts *o)
{
    static const struct option lo[] = {
        {"listen", required_argument, 0, O_LISTEN},
        {"http", required_argument, 0, O_HTTP},
        {"secret", required_argument, 0, O_SECRET},
        {"client-ttl-ms", required_argument, 0, O_TTL},
        {"client-ttl", required_argument, 0, O_TTL},         /* alias (docs) */
        {"put-timeout", required_argument, 0, O_PUT_TIMEOUT}, /* alias (docs) */
        {"lease-ms", required_argument, 0, O_LEASE},
        {"put-timeout-ms", required_argument, 0, O_PUT_TIMEOUT},
        {"evict-high", required_argument, 0, O_HIGH},
        {"evict-low", required_argument, 0, O_LOW},
        {"no-metadata", no_argument, 0, O_NO_MD},
        {"port-file", required_argument, 0, O_PORT_FILE},
        {"log-level", required_argument, 0, O_LOG},
        {"embedded", no_argument, 0, O_EMBEDDED},
        {"detach", no_argument, 0, O_DETACH},
        {"runtime-dir", required_argument, 0, O_RUNDIR},
        {"segment-size", required_argument, 0, O_SEGSIZE},
        {"busy-poll-us", required_argument, 0, O_BUSY_POLL},
        {"no-local-socket", no_argument, 0, O_NO_LOCAL},
        {"allow-uid", required_argument, 0, O_ALLOW_UID},
        {"max-conns", required_argument, 0, O_MAX_CONNS},
        {"hello-timeout-ms", required_argument, 0, O_HELLO_MS},
        {"disconnect-grace-ms", required_argument, 0, O_DISC_GRACE},
        {"etcd", required_argument, 0, O_ETCD},
        {"etcd-prefix", required_argument, 0, O_ETCD_PREFIX},
        {"etcd-ttl", required_argument, 0, O_ETCD_TTL},
        {"advertise", required_argument, 0, O_ADVERTISE},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case O_LISTEN:
            if (o->nlisten >= MAX_LISTEN) {
                fprintf(stderr, "kvshelf master: at most %d --listen addresses\n", MAX_LISTEN);
                return 2;
            }
            o->listen[o->nlisten++] = optarg;
            break;
        case O_HTTP: o->http = optarg; break;
        case O_SECRET: o->secret = optarg; break;
        case O_TTL: if (parse_u32("--client-ttl-ms", optarg, &o->mo.client_ttl_ms)) return 2; break;
        case O_LEASE: if (parse_u32("--lease-ms", optarg, &o->mo.lease_ms)) return 2; break;
        case O_PUT_TIMEOUT:
            if (parse_u32("--put-timeout-ms", optarg, &o->mo.put_timeout_ms)) return 2;
            break;
        case O_HIGH: if (parse_frac("--evict-high", optarg, &o->mo.evict_high)) return 2; break;
        case O_LOW: if (parse_frac("--evict-low", optarg, &o->mo.evict_low)) return 2; break;
        case O_NO_MD: o->no_metadata = 1; break;
        case O_PORT_FILE: o->port_file = optarg; break;
        case O_LOG: {
            int l = parse_level(optarg);
            if (l < 0) {
                fprintf(stderr, "kvshelf master: --log-level: '%s' (error|warn|info|debug)\n",
                        optarg);
                return 2;
            }
            kvs_log_set_level(l);
            break;
        }
        case O_BUSY_POLL:
            if (parse_busy_poll("--busy-poll-us", optarg, &o->busy_poll_us)) return 2;
            break;
        case O_NO_LOCAL: o->no_local_socket = 1; break;
        case O_ALLOW_UID:
            if (o->mo.n_allow_uids >= KVS_MASTER_MAX_ALLOW_UIDS) {
                fprintf(stderr, "kvshelf master: at most %d --allow-uid\n",
                        KVS_MASTER_MAX_ALLOW_UIDS);
                return 2;
            }
            if (parse_uid(optarg, &o->mo.allow_uids[o->mo.n_allow_uids])) return 2;
            o->mo.n_allow_uids++;
            break;
        case O_MAX_CONNS: if (parse_u32("--max-conns", optarg, &o->max_conns)) return 2; break;
        case O_HELLO_MS: if (parse_u32("--hello-timeout-ms", optarg, &o->hello_ms)) return 2; break;
        case O_DISC_GRACE:
            if (parse_u32("--disconnect-grace-ms", optarg, &o->mo.disconnect_grace_ms)) return 2;
            break;
        case O_EMBEDDED: o->embedded = 1; break;
        case O_ETCD: o->etcd = optarg; break;
        case O_ETCD_PREFIX: o->etcd_prefix = optarg; break;
        case O_ETCD_TTL:
            if (parse_u32("--etcd-ttl", optarg, &o->etcd_ttl_s)) return 2;
            if (o->etcd_ttl_s > 3600) {
                fprintf(stderr, "kvshelf master: --etcd-ttl: at most 3600 seconds\n");
                return 2;
            }
            break;
        case O_ADVERTISE: o->advertise = optarg; break;
        case O_DETACH: o->detach = 1; break;
        case O_RUNDIR: o->runtime_dir = optarg; break;
        case O_SEGSIZE:
            if (kvs_parse_size(optarg, &o->segment_size) != KVS_OK || o->segment_size == 0) {
                fprintf(stderr, "kvshelf master: --segment-size: invalid size '%s'\n", optarg);
                return 2;
            }
            break;
        case 'h': usage(stdout); return 1;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvshelf master: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (o->mo.evict_low > o->mo.evict_high) {
        fprintf(stderr, "kvshelf master: --evict-low must not exceed --evict-high\n");
        return 2;
    }
    if (!o->etcd && (o->etcd_prefix || o->etcd_ttl_s || o->advertise)) {
        fprintf(stderr, "kvshelf master: --etcd-prefix, --etcd-ttl and --advertise need --etcd\n");
        return 2;
    }
    if (o->etcd && o->embedded) {
        fprintf(stderr, "kvshelf master: --etcd and --embedded do not go together\n");
        return 2;
    }
    if (o->etcd) {
        char eps[1024], pre[256], url[1100];
        snprintf(url, sizeof url, "etcd://%s", o->etcd);
        if (kvs_etcd_parse_url(url, eps, sizeof eps, pre, sizeof pre) != KVS_OK ||
            strchr(o->etcd, '/')) {
            fprintf(stderr, "kvshelf master: --etcd: '%s' is not host:port[,host:port]\n",
                    o->etcd);
            return 2;
        }
        if (o->etcd_prefix && (!o->etcd_prefix[0] || strlen(o->etcd_prefix) >= 200)) {
            fprintf(stderr, "kvshelf master: --etcd-prefix: empty or too long\n");
            return 2;
        }
        if (!o->advertise) {
            for (int i = 0; i < o->nlisten && !o->advertise; i++)
                if (strncmp(o->listen[i], "unix:", 5)) o->advertise = o->listen[i];
        }
        kvs_addr a;
        if (!o->advertise || kvs_addr_parse(o->advertise, 0, &a) != KVS_OK || a.is_unix ||
            a.port == 0) {
            fprintf(stderr, "kvshelf master: --etcd needs --advertise HOST:PORT (or a --listen "
                            "host:port with a fixed port): the address clients reach this "
                            "master at\n");
            return 2;
        }
    }
    return 0;
}

/* 0 if every address is loopback or a secret is set; else prints and 2. */
static int check_exposure(const opts *o, const char *http)
{
    if (o->secret && o->secret[0]) return 0;
    for (int i = 0; i < o->nlisten; i++) {
        kvs_addr a;
        if (kvs_addr_parse(o->listen[i], 50001, &a) != KVS_OK) {
            fprintf(stderr, "kvshelf master: invalid --listen address '%s'\n", o->listen[i]);
            return 2;
        }
        if (!kvs_addr_is_loopback(&a)) {
            fprintf(stderr,
                    "kvshelf master: refusing to listen on non-loopback address '%s' without a "
                    "secret (--secret or KVSHELF_SECRET)\n",
                    o->listen[i]);
            return 2;
        }
    }
    if (http) {
        kvs_addr a;
        if (kvs_addr_parse(http, 9003, &a) != KVS_OK || a.is_unix) {
            fprintf(stderr, "kvshelf master: invalid --http address '%s'\n", http);
            return 2;
        }
        if (!kvs_addr_is_loopback(&a)) {
            fprintf(stderr,
                    "kvshelf master: refusing to serve HTTP on non-loopback address '%s' without "
                    "a secret (--secret or KVSHELF_SECRET)\n",
                    http);
            return 2;
        }
    }
    return 0;
}

static int write_file_atomic(const char *path, const char *text)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof tmp) return -1;
    FILE *f = fopen(tmp, "w");
    if (!f) return -1;
    int ok = fputs(text, f) >= 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* Removes master-<port>-<pid>.sock files of masters that no longer run. */
static void remove_stale_sockets(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        unsigned port;
        int pid, n = 0;
        if (sscanf(e->d_name, "master-%u-%d.sock%n", &port, &pid, &n) != 2 ||
            e->d_name[n] != '\0' || pid <= 0)
            continue;
        if (kill(pid, 0) == 0 || errno != ESRCH) continue;
        char p[1024];
        if (snprintf(p, sizeof p, "%s/%s", dir, e->d_name) < (int)sizeof p) unlink(p);
    }
    closedir(d);
}

/* The unix socket offered to same-host clients (kvs_master_set_local_path):
 * a unix --listen address if there is one, else a new listener in the
 * runtime directory named after the TCP port and this process. Returns 0,
 * or -1 after printing why (a failure to create it is only a warning). */
static int setup_local_socket(kvs_server *srv, kvs_master *m, const opts *o, uint16_t rpc_port,
                              char *path, size_t cap)
{
    for (int i = 0; i < o->nlisten; i++)
        if (!strncmp(o->listen[i], "unix:", 5)) {
            kvs_master_set_local_path(m, o->listen[i] + 5);
            return 0;
        }
    if (o->embedded || !rpc_port) return 0; /* clients already use the unix socket */
    char dir[512];
    if (o->runtime_dir) {
        kvs_strlcpy(dir, o->runtime_dir, sizeof dir);
    } else {
        kvs_config c;
        kvs_config_init(&c);
        kvs_strlcpy(dir, c.runtime_dir, sizeof dir);
    }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        KVS_LOGW("no unix socket for same-host clients: cannot create %s: %s", dir,
                 strerror(errno));
        return 0;
    }
    remove_stale_sockets(dir);
    int n = snprintf(path, cap, "%s/master-%u-%d.sock", dir, rpc_port, (int)getpid());
    if (n < 0 || (size_t)n >= cap) {
        KVS_LOGW("no unix socket for same-host clients: path under %s too long", dir);
        path[0] = '\0';
        return 0;
    }
    char addr[128 + 8], err[512];
    snprintf(addr, sizeof addr, "unix:%s", path);
    if (kvs_server_listen(srv, addr, NULL, err, sizeof err) != KVS_OK) {
        KVS_LOGW("no unix socket for same-host clients: %s", err);
        path[0] = '\0';
        return 0;
    }
    kvs_master_set_local_path(m, path);
    KVS_LOGI("same-host clients switch to unix:%s", path);
    return 0;
}

typedef struct loop_arg {
    kvs_server *srv;
    volatile sig_atomic_t stop;
    int rc;
} loop_arg;

static void *loop_thread(void *p)
{
    loop_arg *a = p;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    a->rc = kvs_server_run(a->srv, &a->stop, 0);
    return NULL;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* How an embedded pool's start went, for the client that started it
 * (src/client/embedded.c): DIR/pool.starting while it starts (written
 * before its socket), then DIR/pool.ready once its segment is open, or
 * DIR/pool.failed holding "<kvshelf error code>\n<message>\n". With
 * --detach the process the client started exits 0 before the pool opens its
 * segment, so without these the client would only see the pool never
 * answer (a newcomer in a container with a 64 MiB /dev/shm waited 10 s for
 * "did not answer"). pool.failed is written once the master has closed and
 * removed its socket (after serve() returns), so that the client never
 * takes a failing master for a running pool. */
static int g_start_fail_code;
static char g_start_fail_msg[512];
static int g_ready; /* pool.ready was written: a later exit is not a failed start */

static void note_start_failure(const char *rundir, int code, const char *msg)
{
    char path[600], text[600];
    snprintf(path, sizeof path, "%s/pool.failed", rundir);
    snprintf(text, sizeof text, "%d\n%s\n", code, msg);
    if (write_file_atomic(path, text) != 0)
        KVS_LOGW("cannot write %s: %s", path, strerror(errno));
}

/* The embedded pool: loop on a thread, the segment's client on this one. */
static int run_embedded(kvs_master *m, kvs_server *srv, const opts *o, const char *sock_path)
{
    loop_arg la = {srv, 0, 0};
    pthread_t th;
    if (pthread_create(&th, NULL, loop_thread, &la) != 0) {
        KVS_LOGE("cannot start the event loop thread");
        return 1;
    }
    kvs_config cfg;
    kvs_config_init(&cfg);
    snprintf(cfg.master_server_address, sizeof cfg.master_server_address, "unix:%s", sock_path);
    kvs_strlcpy(cfg.runtime_dir, o->runtime_dir, sizeof cfg.runtime_dir);
    if (o->secret) kvs_strlcpy(cfg.secret, o->secret, sizeof cfg.secret);
    cfg.global_segment_size = o->segment_size;
    char err[512] = "";
    kvs_client *client = NULL;
    kvs_prefault_set_default(1); /* the pool's memory: populate it now */
    int rc = kvs_client_open(&cfg, &client, err, sizeof err);
    int status = 0;
    if (rc != KVS_OK) {
        KVS_LOGE("embedded pool: cannot open its segment client: %s (%s)", err, kvs_strerror(rc));
        g_start_fail_code = rc;
        kvs_strlcpy(g_start_fail_msg, err, sizeof g_start_fail_msg);
        status = 1;
    } else {
        KVS_LOGI("embedded pool ready: %llu bytes at unix:%s",
                 (unsigned long long)o->segment_size, sock_path);
        /* for the client that started it (embedded.c): the pool is up, its
         * segment open; before this it may still fail (pool.failed) */
        char ready[600], pid[32];
        snprintf(ready, sizeof ready, "%s/pool.ready", o->runtime_dir);
        snprintf(pid, sizeof pid, "%d\n", (int)getpid());
        if (write_file_atomic(ready, pid) != 0)
            KVS_LOGW("cannot write %s: %s", ready, strerror(errno));
        g_ready = 1;
        char starting[600];
        snprintf(starting, sizeof starting, "%s/pool.starting", o->runtime_dir);
        unlink(starting);
        for (;;) {
            if (g_stop) break;
            kvs_master_lock(m);
            int sd = kvs_master_shutdown_requested(m);
            kvs_master_unlock(m);
            if (sd) break;
            sleep_ms(50);
        }
        unlink(ready);
        kvs_client_close(client); /* unmounts while the loop still runs */
    }
    la.stop = 1;
    pthread_join(th, NULL);
    return status ? status : (la.rc == KVS_OK ? 0 : 1);
}

/* A detached master is nobody's child, and keeps nobody's CPU pinning
 * either: an engine worker that starts the pool is often pinned to one core
 * (vLLM's CPU workers are), and the pool would inherit that and serve every
 * engine of the host from that one core. Widens to every CPU the cgroup
 * allows (the kernel keeps the mask within the cpuset). */
static void widen_affinity(void)
{
    cpu_set_t before, all;
    if (sched_getaffinity(0, sizeof before, &before)) return;
    CPU_ZERO(&all);
    long n = sysconf(_SC_NPROCESSORS_CONF);
    for (long i = 0; i < n && i < CPU_SETSIZE; i++) CPU_SET((int)i, &all);
    if (sched_setaffinity(0, sizeof all, &all)) return;
    cpu_set_t after;
    if (!sched_getaffinity(0, sizeof after, &after) && CPU_COUNT(&after) != CPU_COUNT(&before))
        fprintf(stderr, "kvshelf master: --detach: CPU affinity widened from %d to %d CPUs\n",
                CPU_COUNT(&before), CPU_COUNT(&after));
}

/* A standby keeps its TCP ports while it waits (bound, not listening:
 * clients that try it are refused at once, and no other process's outgoing
 * connection takes the port as its ephemeral one meanwhile). Fills fds
 * (-1 where nothing was reserved). */
static void reserve_ports(const opts *o, const char *http, int *fds)
{
    for (int i = 0; i <= o->nlisten; i++) { /* the last one: the HTTP address */
        fds[i] = -1;
        const char *text = i < o->nlisten ? o->listen[i] : http;
        kvs_addr a;
        if (!text || kvs_addr_parse(text, 50001, &a) != KVS_OK || a.is_unix || a.port == 0)
            continue;
        struct addrinfo hints = {0}, *res = NULL;
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
        char port[16];
        snprintf(port, sizeof port, "%u", a.port);
        if (getaddrinfo(a.host[0] ? a.host : NULL, port, &hints, &res) != 0 || !res) continue;
        int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (fd >= 0 && bind(fd, res->ai_addr, res->ai_addrlen) != 0) {
            KVS_LOGW("standby: cannot reserve %s: %s", text, strerror(errno));
            close(fd);
            fd = -1;
        }
        freeaddrinfo(res);
        fds[i] = fd;
    }
}

static void release_ports(const opts *o, int *fds)
{
    for (int i = 0; i <= o->nlisten; i++)
        if (fds[i] >= 0) {
            close(fds[i]);
            fds[i] = -1;
        }
}

/* One term of serving: creates the master, listens, serves until stopped
 * (signal, SHUTDOWN) or, under an election, until the leadership lease
 * ended (*stepped_down = 1), then frees everything. Returns the exit status. */
static int serve(opts *o, const char *http, const char *sock_addr, const char *sock_path,
                 const char *pid_path, kvs_election *el, int *stepped_down)
{
    char local_path[108] = "";
    kvs_master *m = NULL;
    kvs_server *srv = NULL;
    kvs_master_web *web = NULL;
    int status = 1;
    char err[512] = "";
    int rc = kvs_master_new(&o->mo, &m);
    if (rc != KVS_OK) {
        fprintf(stderr, "kvshelf master: %s\n", kvs_strerror(rc));
        return rc == KVS_ERR_INVALID ? 2 : 1;
    }
    if (el) { /* the reign this term recorded in etcd, and the one before */
        kvs_election_info ei;
        kvs_election_get_info(el, &ei);
        kvs_master_set_reign(m, ei.reign, ei.reign_floor);
    }
    if (kvs_server_new(m, &srv) != KVS_OK) {
        fprintf(stderr, "kvshelf master: cannot create the event loop\n");
        goto out;
    }
    kvs_server_set_busy_poll(srv, o->busy_poll_us);
    kvs_server_set_max_conns(srv, o->max_conns);
    kvs_server_set_hello_ms(srv, o->hello_ms);
    kvs_server_set_gc(srv, kvs_segment_gc); /* orphaned segment files of dead clients */
    KVS_LOGI("at most %u RPC connections (--max-conns)", kvs_server_max_conns(srv));
    uint16_t rpc_port = 0, http_port = 0;
    if (o->embedded && kvs_server_listen(srv, sock_addr, NULL, err, sizeof err) != KVS_OK) {
        fprintf(stderr, "kvshelf master: %s\n", err);
        goto out;
    }
    for (int i = 0; i < o->nlisten; i++) {
        uint16_t p = 0;
        if (kvs_server_listen(srv, o->listen[i], &p, err, sizeof err) != KVS_OK) {
            fprintf(stderr, "kvshelf master: %s\n", err);
            goto out;
        }
        if (p && !rpc_port) rpc_port = p;
        KVS_LOGI("listening on %s%s", o->listen[i], p ? "" : " (unix)");
    }
    if (!o->no_local_socket && setup_local_socket(srv, m, o, rpc_port, local_path,
                                                 sizeof local_path) != 0)
        goto out;
    if (http) {
        rc = kvs_master_web_start(m, http, !o->no_metadata, o->secret, &http_port, &web, err,
                                  sizeof err);
        if (rc != KVS_OK) {
            fprintf(stderr, "kvshelf master: %s\n", err);
            goto out;
        }
        KVS_LOGI("HTTP on %s (port %u)%s", http, http_port,
                 o->no_metadata ? "" : ", metadata at /metadata");
    }
    if (o->port_file) {
        char buf[128];
        snprintf(buf, sizeof buf, "{\"rpc\":%u,\"http\":%u}\n", rpc_port, http_port);
        if (write_file_atomic(o->port_file, buf) != 0) {
            fprintf(stderr, "kvshelf master: cannot write %s: %s\n", o->port_file,
                    strerror(errno));
            goto out;
        }
    }
    if (o->embedded) {
        char buf[32];
        snprintf(buf, sizeof buf, "%d\n", (int)getpid());
        if (write_file_atomic(pid_path, buf) != 0) {
            fprintf(stderr, "kvshelf master: cannot write %s: %s\n", pid_path, strerror(errno));
            goto out;
        }
        status = run_embedded(m, srv, o, sock_path);
        unlink(pid_path);
    } else {
        if (el) kvs_server_set_serve_until(srv, kvs_election_serve_until(el));
        rc = kvs_server_run(srv, &g_stop, 1);
        if (rc == KVS_ERR_UNAVAILABLE && el) {
            *stepped_down = 1; /* a standby from now on: the caller campaigns again */
            status = 0;
        } else {
            status = rc == KVS_OK ? 0 : 1;
        }
    }
    KVS_LOGI("stopping");
    {
        kvs_server_counters sc;
        kvs_server_get_counters(srv, &sc);
        if (sc.refused || sc.evicted || sc.hello_timeouts || sc.accept_pauses)
            KVS_LOGW("connections: %llu accepted, %llu refused at the limit, %llu without HELLO "
                     "closed for newer ones, %llu without HELLO timed out, accepting paused "
                     "%llu times for want of descriptors",
                     (unsigned long long)sc.accepted, (unsigned long long)sc.refused,
                     (unsigned long long)sc.evicted, (unsigned long long)sc.hello_timeouts,
                     (unsigned long long)sc.accept_pauses);
    }
out:
    kvs_master_web_stop(web);
    kvs_server_free(srv); /* removes unix socket files */
    kvs_master_free(m);
    return status;
}

int kvs_cmd_master(int argc, char **argv)
{
    opts o;
    memset(&o, 0, sizeof o);
    kvs_master_opts_init(&o.mo);
    o.busy_poll_us = KVS_SERVER_BUSY_POLL_US;
    const char *bp = getenv("KVSHELF_BUSY_POLL_US");
    if (bp && *bp && parse_busy_poll("KVSHELF_BUSY_POLL_US", bp, &o.busy_poll_us)) return 2;
    o.segment_size = KVS_DEFAULT_GLOBAL_SEGMENT_SIZE;
    kvs_log_set_name("master");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int prc = parse_args(argc, argv, &o);
    if (prc) return prc == 1 ? 0 : prc;
    if (o.detach) { /* before any thread exists */
        pid_t child = fork();
        if (child < 0) {
            fprintf(stderr, "kvshelf master: --detach: fork: %s\n", strerror(errno));
            return 1;
        }
        if (child > 0) _exit(0); /* the launcher; the master goes on in the child */
        setsid();                /* no-op if the launcher already led a session */
        widen_affinity();
    }
    if (!o.secret) o.secret = getenv("KVSHELF_SECRET");
    if (o.secret && !o.secret[0]) o.secret = NULL;
    const char *http = o.http ? o.http : (o.embedded ? NULL : "127.0.0.1:9003");
    if (http && !strcmp(http, "off")) http = NULL;
    if (!o.embedded && o.nlisten == 0) o.listen[o.nlisten++] = "127.0.0.1:50001";
    if (check_exposure(&o, http)) return 2;

    char rundir[512], sock_path[600] = "", pid_path[600] = "", sock_addr[620] = "";
    char pool_secret[2 * KVS_POOL_SECRET_BYTES + 1] = "";
    const char *env_rd = getenv("KVSHELF_RUNTIME_DIR");
    if (!o.runtime_dir && env_rd && env_rd[0]) o.runtime_dir = env_rd;
    if (!o.runtime_dir) {
        kvs_config c;
        kvs_config_init(&c);
        kvs_strlcpy(rundir, c.runtime_dir, sizeof rundir);
    } else if (kvs_strlcpy(rundir, o.runtime_dir, sizeof rundir)) {
        fprintf(stderr, "kvshelf master: runtime directory path too long: %s\n", o.runtime_dir);
        return 2;
    }
    o.runtime_dir = rundir;
    if (o.secret && o.mo.n_allow_uids) {
        fprintf(stderr, "kvshelf master: --allow-uid has no effect with a configured secret "
                        "(every client must prove the secret)\n");
        return 2;
    }
    if (!o.secret) {
        /* private by default: this user's pool secret, kept in the runtime dir */
        kvs_config c;
        kvs_config_init(&c);
        kvs_strlcpy(c.runtime_dir, rundir, sizeof c.runtime_dir);
        char e2[512] = "";
        if (kvs_pool_secret(&c, pool_secret, sizeof pool_secret, e2, sizeof e2) != KVS_OK) {
            fprintf(stderr,
                    "kvshelf master: no secret configured and no pool secret: %s (give --secret, "
                    "or a usable --runtime-dir)\n",
                    e2);
            return 1;
        }
        o.mo.secret_is_pool = 1;
    }
    if (o.embedded) {
        if (mkdir(rundir, 0700) != 0 && errno != EEXIST) {
            fprintf(stderr, "kvshelf master: cannot create %s: %s\n", rundir, strerror(errno));
            return 1;
        }
        snprintf(sock_path, sizeof sock_path, "%s/master.sock", rundir);
        snprintf(pid_path, sizeof pid_path, "%s/master.pid", rundir);
        snprintf(sock_addr, sizeof sock_addr, "unix:%s", sock_path);
        if (strlen(sock_path) >= 108) {
            fprintf(stderr, "kvshelf master: socket path too long: %s\n", sock_path);
            return 2;
        }
    }

    o.mo.secret = o.secret ? o.secret : pool_secret;
    if (!o.etcd) {
        int dummy = 0;
        char starting[600] = "";
        if (o.embedded) { /* before the socket: a pool that answers says how its start goes */
            snprintf(starting, sizeof starting, "%s/pool.starting", rundir);
            char pid[32];
            snprintf(pid, sizeof pid, "%d\n", (int)getpid());
            if (write_file_atomic(starting, pid) != 0)
                KVS_LOGW("cannot write %s: %s", starting, strerror(errno));
        }
        int st = serve(&o, http, sock_addr, sock_path, pid_path, NULL, &dummy);
        if (starting[0]) unlink(starting);
        if (o.embedded && st != 0 && !g_ready) { /* a pool that ran is no failed start */
            if (!g_start_fail_msg[0])
                snprintf(g_start_fail_msg, sizeof g_start_fail_msg,
                         "the pool's master exited with status %d", st);
            note_start_failure(rundir, g_start_fail_code ? g_start_fail_code : KVS_ERR_IO,
                               g_start_fail_msg);
        }
        return st;
    }
    /* failover: serve only while elected */
    kvs_election_opts eo = {o.etcd, o.etcd_prefix, o.etcd_ttl_s, o.advertise};
    kvs_election *el = NULL;
    char eerr[512] = "";
    if (kvs_election_start(&eo, &el, eerr, sizeof eerr) != KVS_OK) {
        fprintf(stderr, "kvshelf master: %s\n", eerr);
        return 1;
    }
    KVS_LOGW("standby: campaigning for %s/leader in etcd %s as %s",
             o.etcd_prefix ? o.etcd_prefix : KVS_ETCD_DEFAULT_PREFIX, o.etcd, o.advertise);
    int status = 0;
    int reserved[MAX_LISTEN + 1];
    reserve_ports(&o, http, reserved);
    while (!g_stop) {
        if (kvs_election_wait_leader(el, &g_stop) != KVS_OK) break;
        int stepped_down = 0;
        release_ports(&o, reserved); /* listened on at once by serve() */
        status = serve(&o, http, sock_addr, sock_path, pid_path, el, &stepped_down);
        if (stepped_down) reserve_ports(&o, http, reserved);
        kvs_election_served(el);
        if (!stepped_down) break; /* stopped, SHUTDOWN, or an error */
        KVS_LOGW("standby again: campaigning in etcd %s as %s", o.etcd, o.advertise);
    }
    release_ports(&o, reserved);
    kvs_election_stop(el); /* a leader gives its key up: a standby takes over at once */
    return status;
}
