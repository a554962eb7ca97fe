/* A small HTTP server over libmicrohttpd: see http.h.
 *
 * A pool of internal polling threads (MHD_USE_INTERNAL_POLLING_THREAD with
 * MHD_OPTION_THREAD_POOL_SIZE, poll()); each request's body is buffered into a
 * growing heap buffer (at most KVS_HTTP_MAX_BODY bytes) and the handler is
 * called once the whole request has arrived. Connections are bounded in
 * number and in idle time so a slow or garbage client cannot pin the server. */
#include "metadata/http.h"

#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include "common/log.h"
#include "kvshelf/errors.h"

#if MHD_VERSION < 0x00097002
typedef int kvs_mhd_result;
#else
typedef enum MHD_Result kvs_mhd_result;
#endif

#define HTTP_THREADS 4
#define HTTP_CONN_LIMIT 256
#define HTTP_CONN_TIMEOUT_S 15
#define HTTP_CONN_MEMORY (64u << 10)

struct kvs_http_server {
    struct MHD_Daemon *d;
    kvs_http_handler fn;
    void *ud;
};

/* Per-request state, kept in MHD's con_cls between calls. */
typedef struct req_ctx {
    uint8_t *buf;
    size_t len, cap;
    int too_large; /* body exceeded KVS_HTTP_MAX_BODY: reply 413 */
} req_ctx;

static void mhd_logger(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
    KVS_LOGI("http: %s", line); /* mostly client errors: not worth a warning */
}

static void request_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                              enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)c;
    (void)toe;
    req_ctx *ctx = *con_cls;
    if (ctx) {
        free(ctx->buf);
        free(ctx);
        *con_cls = NULL;
    }
}

static kvs_mhd_result send_simple(struct MHD_Connection *c, unsigned status, const char *text)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
    kvs_mhd_result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static int append_body(req_ctx *ctx, const char *data, size_t n)
{
    if (ctx->too_large) return 0;
    if (n > KVS_HTTP_MAX_BODY - ctx->len) {
        /* Over the limit: drop what we have and discard the rest. */
        ctx->too_large = 1;
        free(ctx->buf);
        ctx->buf = NULL;
        ctx->len = ctx->cap = 0;
        return 0;
    }
    if (ctx->len + n > ctx->cap) {
        size_t cap = ctx->cap ? ctx->cap : 4096;
        while (cap < ctx->len + n) cap *= 2;
        if (cap > KVS_HTTP_MAX_BODY) cap = KVS_HTTP_MAX_BODY;
        uint8_t *nb = realloc(ctx->buf, cap);
        if (!nb) return -1;
        ctx->buf = nb;
        ctx->cap = cap;
    }
    memcpy(ctx->buf + ctx->len, data, n);
    ctx->len += n;
    return 0;
}

static kvs_mhd_result access_handler(void *cls, struct MHD_Connection *c, const char *url,
                                     const char *method, const char *version,
                                     const char *upload_data, size_t *upload_data_size,
                                     void **con_cls)
{
    (void)version;
    kvs_http_server *s = cls;
    req_ctx *ctx = *con_cls;
    if (!ctx) {
        /* First call: headers only. Reject declared oversized bodies at once
         * (MHD then closes the connection without reading the body). */
        const char *cl =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl) {
            char *end = NULL;
            unsigned long long v = strtoull(cl, &end, 10);
            if (end != cl && v > KVS_HTTP_MAX_BODY)
                return send_simple(c, 413u, "request body too large\n");
        }
        ctx = calloc(1, sizeof *ctx);
        if (!ctx) return MHD_NO;
        *con_cls = ctx;
        return MHD_YES;
    }
    if (*upload_data_size != 0) {
        if (append_body(ctx, upload_data, *upload_data_size) != 0) return MHD_NO;
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (ctx->too_large) return send_simple(c, 413u, "request body too large\n");

    kvs_http_request req = {
        .method = method,
        .path = url,
        .key = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "key"),
        .body = ctx->buf,
        .body_len = ctx->len,
        .authorization = MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_AUTHORIZATION),
    };
    kvs_http_response resp = {0};
    s->fn(s->ud, &req, &resp);

    struct MHD_Response *r;
    if (resp.body && resp.body_len > 0) {
        r = MHD_create_response_from_buffer(resp.body_len, resp.body, MHD_RESPMEM_MUST_FREE);
        if (!r) free(resp.body);
    } else {
        free(resp.body);
        r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    }
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE,
                            resp.content_type ? resp.content_type : "text/plain; charset=utf-8");
    unsigned status = resp.status >= 100 && resp.status <= 599 ? (unsigned)resp.status : 500u;
    if (status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer realm=\"kvshelf\"");
    kvs_mhd_result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

/* Checks "Authorization: Bearer <secret>"; see http.h. */
int kvs_http_bearer_ok(const kvs_http_request *req, const char *secret)
{
    if (!req || !req->authorization || !secret || !*secret) return 0;
    const char *a = req->authorization;
    if (strncasecmp(a, "Bearer ", 7) != 0) return 0;
    a += 7;
    while (*a == ' ') a++;
    size_t n = strlen(a), m = strlen(secret);
    while (n > 0 && (a[n - 1] == ' ' || a[n - 1] == '\t')) n--;
    unsigned char diff = (unsigned char)(n != m);
    for (size_t i = 0; i < m; i++) diff |= (unsigned char)(secret[i] ^ (i < n ? a[i] : 0));
    return diff == 0;
}

/* Starts an HTTP server on host:*port; see http.h. `host` NULL or "" means
 * 127.0.0.1 (loopback by default); names are resolved with getaddrinfo and
 * the first address is used. The server owns nothing of the caller's but
 * keeps `fn`/`ud`, which must outlive it. Errors: KVS_ERR_INVALID (NULL
 * arguments), KVS_ERR_CONFIG (host does not resolve), KVS_ERR_NOMEM,
 * KVS_ERR_IO (bind/listen failed, e.g. port in use). */
int kvs_http_start(const char *host, uint16_t *port, kvs_http_handler fn, void *ud,
                   kvs_http_server **out)
{
    if (!port || !fn || !out) return KVS_ERR_INVALID;
    *out = NULL;
    if (!host || !*host) host = "127.0.0.1";
    /* Accept "[::1]" as well as "::1". */
    char hbuf[256];
    size_t hl = strlen(host);
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']' && hl - 2 < sizeof hbuf) {
        memcpy(hbuf, host + 1, hl - 2);
        hbuf[hl - 2] = '\0';
        host = hbuf;
    }

    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    char pstr[8];
    snprintf(pstr, sizeof pstr, "%u", (unsigned)*port);
    int gr = getaddrinfo(host, pstr, &hints, &res);
    if (gr != 0 || !res) {
        KVS_LOGE("http: cannot resolve '%s': %s", host, gai_strerror(gr));
        return KVS_ERR_CONFIG;
    }
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    memcpy(&ss, res->ai_addr, res->ai_addrlen <= sizeof ss ? res->ai_addrlen : sizeof ss);
    int family = res->ai_family;
    freeaddrinfo(res);

    kvs_http_server *s = calloc(1, sizeof *s);
    if (!s) return KVS_ERR_NOMEM;
    s->fn = fn;
    s->ud = ud;

    /* poll(), not epoll: with epoll MHD 0.9.75 misses a client's half-close
     * on a keep-alive connection and holds it until the timeout. */
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG | MHD_USE_POLL;
    if (family == AF_INET6) flags |= MHD_USE_IPv6;

    s->d = MHD_start_daemon(flags, *port, NULL, NULL, access_handler, s,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, (void *)NULL,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_THREAD_POOL_SIZE, (unsigned)HTTP_THREADS,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)HTTP_CONN_LIMIT,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)HTTP_CONN_TIMEOUT_S,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HTTP_CONN_MEMORY,
                            MHD_OPTION_NOTIFY_COMPLETED, request_completed, (void *)NULL,
                            MHD_OPTION_END);
    if (!s->d) {
        KVS_LOGE("http: cannot listen on %s:%u", host, (unsigned)*port);
        free(s);
        return KVS_ERR_IO;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    if (info && info->port) *port = info->port;
    *out = s;
    return KVS_OK;
}

/* Stops the daemon (joins its threads, so no handler runs afterwards) and
 * frees the server. Safe with NULL. */
void kvs_http_stop(kvs_http_server *s)
{
    if (!s) return;
    if (s->d) MHD_stop_daemon(s->d);
    free(s);
}
