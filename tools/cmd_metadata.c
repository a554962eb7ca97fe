/* `kvshelf metadata`: the Mooncake-compatible HTTP metadata service alone. */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "kvshelf/config.h"
#include "kvshelf/errors.h"
#include "metadata/metadata.h"
#include "tools/commands.h"

typedef struct md_route {
    kvs_metadata *md;
    const char *path;
    size_t path_len;
    const char *secret; /* NULL: no credentials asked */
} md_route;

static void route(void *ud, const kvs_http_request *req, kvs_http_response *resp)
{
    md_route *r = ud;
    const char *p = req->path ? req->path : "";
    size_t pl = strlen(p);
    if (pl > 1 && p[pl - 1] == '/') pl--; /* "/metadata/" == "/metadata" */
    if (pl == r->path_len && !strncmp(p, r->path, pl)) {
        if (r->secret && !kvs_http_bearer_ok(req, r->secret)) {
            resp->status = req->authorization ? 403 : 401;
            resp->content_type = "text/plain; charset=utf-8";
            resp->body = strdup(req->authorization ? "forbidden: wrong credentials\n"
                                                   : "unauthorized: send the header "
                                                     "'Authorization: Bearer <secret>'\n");
            resp->body_len = resp->body ? strlen(resp->body) : 0;
            return;
        }
        kvs_metadata_handle(r->md, req, resp);
        KVS_LOGD("%s %s key=%s body=%zu -> %d", req->method, p, req->key ? req->key : "-",
                 req->body_len, resp->status);
        return;
    }
    const char *text = "not found\n";
    resp->status = 404;
    if (!strcmp(p, "/health")) {
        text = "ok\n";
        resp->status = 200;
    }
    resp->content_type = "text/plain; charset=utf-8";
    resp->body = strdup(text);
    resp->body_len = resp->body ? strlen(text) : 0;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvshelf metadata [--addr HOST:PORT] [--path /metadata] [--port-file FILE]\n"
            "                        [--secret S] [--allow-remote] [--max-keys N] [--verbose]\n\n"
            "Runs the Mooncake-compatible HTTP metadata service (GET|PUT|DELETE\n"
            "<path>?key=K) alone, in memory. Set metadata_server to\n"
            "http://HOST:PORT/metadata in clients' configurations.\n\n"
            "  --addr HOST:PORT   listen address (default 127.0.0.1:%d; port 0 picks one)\n"
            "  --path PATH        URL path of the service (default /metadata)\n"
            "  --port-file FILE   after binding, write {\"http\":PORT} to FILE\n"
            "  --secret S         require the header 'Authorization: Bearer S' on every\n"
            "                     request to PATH (401 without it, 403 if wrong); then a\n"
            "                     non-loopback address needs no --allow-remote\n"
            "  --allow-remote     allow a non-loopback address without --secret (Mooncake's\n"
            "                     HTTP metadata protocol has no authentication: anyone who\n"
            "                     can reach it can read and change it)\n"
            "  --max-keys N       most keys stored (default 65536)\n"
            "  -v, --verbose      log requests and more\n"
            "  -h, --help         this text\n\n"
            "SIGINT/SIGTERM stop it (exit 0).\n",
            KVS_DEFAULT_METADATA_PORT);
}

static int write_port_file(const char *path, unsigned port)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return -1;
    FILE *f = fopen(tmp, "w");
    if (!f) return -1;
    int ok = fprintf(f, "{\"http\":%u}\n", port) > 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* Entry point of `kvshelf metadata` (see tools/commands.h): parses options,
 * serves until SIGINT/SIGTERM. Returns 0 on a clean stop, 1 if the server
 * cannot start, 2 on bad usage. */
int kvs_cmd_metadata(int argc, char **argv)
{
    static const struct option opts[] = {
        {"addr", required_argument, NULL, 'a'},     {"path", required_argument, NULL, 'p'},
        {"port-file", required_argument, NULL, 'f'}, {"allow-remote", no_argument, NULL, 'r'},
        {"max-keys", required_argument, NULL, 'k'}, {"verbose", no_argument, NULL, 'v'},
        {"secret", required_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0},
    };
    const char *addr_text = "127.0.0.1";
    const char *path = "/metadata";
    const char *port_file = NULL;
    int allow_remote = 0;
    const char *secret = NULL;
    kvs_metadata_limits lim = {0};
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":vh", opts, NULL)) != -1) {
        switch (c) {
        case 'a': addr_text = optarg; break;
        case 'p': path = optarg; break;
        case 'f': port_file = optarg; break;
        case 'r': allow_remote = 1; break;
        case 's':
            if (!optarg[0]) {
                fprintf(stderr, "kvshelf metadata: --secret must not be empty\n");
                return 2;
            }
            secret = optarg;
            break;
        case 'k': {
            char *end = NULL;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (errno || !end || *end || end == optarg || v == 0 || optarg[0] == '-') {
                fprintf(stderr, "kvshelf metadata: --max-keys '%s' is not a positive number\n",
                        optarg);
                return 2;
            }
            lim.max_keys = (size_t)v;
            break;
        }
        case 'v': kvs_log_set_level(KVS_LOG_DEBUG); break;
        case 'h': usage(stdout); return 0;
        case ':':
            fprintf(stderr, "kvshelf metadata: option '%s' needs a value\n", argv[optind - 1]);
            return 2;
        default:
            fprintf(stderr, "kvshelf metadata: unknown option '%s'\n\n", argv[optind - 1]);
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvshelf metadata: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (path[0] != '/') {
        fprintf(stderr, "kvshelf metadata: --path must start with '/' (got '%s')\n", path);
        return 2;
    }
    kvs_addr addr;
    if (kvs_addr_parse(addr_text, KVS_DEFAULT_METADATA_PORT, &addr) != KVS_OK || addr.is_unix) {
        fprintf(stderr, "kvshelf metadata: bad --addr '%s' (expected HOST:PORT)\n", addr_text);
        return 2;
    }
    if (!kvs_addr_is_loopback(&addr) && !allow_remote && !secret) {
        fprintf(stderr,
                "kvshelf metadata: refusing to listen on non-loopback address '%s' without\n"
                "--secret (clients then send 'Authorization: Bearer <secret>'). Add\n"
                "--allow-remote instead if this network is trusted.\n",
                addr_text);
        return 2;
    }
    kvs_log_set_name("metadata");

    /* Block the stop signals in every thread (MHD's inherit the mask) and
     * wait for them here. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    md_route r = {.md = kvs_metadata_new_ex(&lim), .path = path, .path_len = strlen(path),
                  .secret = secret};
    if (r.path_len > 1 && path[r.path_len - 1] == '/') r.path_len--;
    if (!r.md) {
        fprintf(stderr, "kvshelf metadata: out of memory\n");
        return 1;
    }
    uint16_t port = addr.port;
    kvs_http_server *srv = NULL;
    int rc = kvs_http_start(addr.host, &port, route, &r, &srv);
    if (rc != KVS_OK) {
        fprintf(stderr, "kvshelf metadata: cannot listen on %s:%u: %s\n", addr.host,
                (unsigned)addr.port, kvs_strerror(rc));
        kvs_metadata_free(r.md);
        return 1;
    }
    if (port_file && write_port_file(port_file, port) != 0) {
        fprintf(stderr, "kvshelf metadata: cannot write port file '%s': %s\n", port_file,
                strerror(errno));
        kvs_http_stop(srv);
        kvs_metadata_free(r.md);
        return 1;
    }
    int v6 = strchr(addr.host, ':') != NULL;
    fprintf(stderr, "kvshelf metadata: serving http://%s%s%s:%u%s\n", v6 ? "[" : "", addr.host,
            v6 ? "]" : "", (unsigned)port, path);

    int sig = 0;
    while (sigwait(&stop, &sig) != 0) {
    }
    KVS_LOGI("signal %d: stopping", sig);
    kvs_http_stop(srv);
    kvs_metadata_free(r.md);
    return 0;
}
