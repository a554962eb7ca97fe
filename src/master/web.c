/* HTTP routes of the master (see web.h). */
#include "master/web.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/net.h"
#include "kvshelf/errors.h"
#include "metadata/metadata.h"

struct kvs_master_web {
    kvs_master *m;
    kvs_metadata *md;
    kvs_http_server *http;
    char secret[256]; /* configured secret ("" = none) */
    int public_addr;  /* the HTTP address is not loopback */
};

static void text(kvs_http_response *resp, int status, const char *ctype, const char *s)
{
    resp->status = status;
    resp->content_type = ctype;
    resp->body = strdup(s);
    resp->body_len = resp->body ? strlen(s) : 0;
    if (!resp->body) resp->status = 500;
}

void kvs_master_web_route(kvs_master_web *w, const kvs_http_request *req,
                          kvs_http_response *resp)
{
    const char *p = req->path ? req->path : "";
    int is_get = req->method && (!strcmp(req->method, "GET") || !strcmp(req->method, "HEAD"));
    int is_md = !strcmp(p, "/metadata") || !strncmp(p, "/metadata/", 10);
    /* with a secret: /metadata and every write; beyond loopback: all but /health */
    int guarded = w->secret[0] && (is_md || !is_get || (w->public_addr && strcmp(p, "/health")));
    if (guarded && !kvs_http_bearer_ok(req, w->secret)) {
        if (req->authorization)
            text(resp, 403, "text/plain", "forbidden: wrong credentials\n");
        else
            text(resp, 401, "text/plain",
                 "unauthorized: send the header 'Authorization: Bearer <secret>'\n");
        return;
    }
    if (is_md) {
        if (w->md) kvs_metadata_handle(w->md, req, resp);
        else text(resp, 404, "text/plain", "metadata service disabled (--no-metadata)\n");
        return;
    }
    if (!strcmp(p, "/health")) {
        if (is_get) text(resp, 200, "text/plain", "ok");
        else text(resp, 405, "text/plain", "method not allowed\n");
        return;
    }
    if (!strcmp(p, "/metrics")) {
        if (!is_get) {
            text(resp, 405, "text/plain", "method not allowed\n");
            return;
        }
        long keys = w->md ? (long)kvs_metadata_count(w->md) : -1;
        size_t len = 0;
        kvs_master_lock(w->m);
        char *body = kvs_master_metrics_text(w->m, keys, &len);
        kvs_master_unlock(w->m);
        if (!body) {
            text(resp, 500, "text/plain", "out of memory\n");
            return;
        }
        resp->status = 200;
        resp->content_type = "text/plain; version=0.0.4; charset=utf-8";
        resp->body = body;
        resp->body_len = len;
        return;
    }
    if (!strcmp(p, "/stats") && is_get) {
        kvs_master_lock(w->m);
        char *body = kvs_master_stats_json(w->m);
        kvs_master_unlock(w->m);
        if (!body) {
            text(resp, 500, "text/plain", "out of memory\n");
            return;
        }
        resp->status = 200;
        resp->content_type = "application/json";
        resp->body = body;
        resp->body_len = strlen(body);
        return;
    }
    text(resp, 404, "text/plain", "not found\n");
}

static void handler(void *ud, const kvs_http_request *req, kvs_http_response *resp)
{
    kvs_master_web_route(ud, req, resp);
}

int kvs_master_web_start(kvs_master *m, const char *addr, int with_metadata,
                         const char *secret, uint16_t *port, kvs_master_web **out, char *err,
                         size_t errlen)
{
    kvs_addr a;
    if (kvs_addr_parse(addr, 9003, &a) != KVS_OK || a.is_unix) {
        snprintf(err, errlen, "invalid HTTP address '%s' (want host:port)", addr);
        return KVS_ERR_CONFIG;
    }
    int public_addr = !kvs_addr_is_loopback(&a);
    if ((public_addr && (!secret || !*secret)) || (secret && strlen(secret) >= 256)) {
        snprintf(err, errlen, "refusing to serve HTTP on '%s' without a secret (or too long)",
                 addr);
        return KVS_ERR_CONFIG;
    }
    kvs_master_web *w = calloc(1, sizeof *w);
    if (!w) return KVS_ERR_NOMEM;
    w->m = m;
    w->public_addr = public_addr;
    if (secret) snprintf(w->secret, sizeof w->secret, "%s", secret);
    if (with_metadata && !(w->md = kvs_metadata_new())) {
        free(w);
        return KVS_ERR_NOMEM;
    }
    uint16_t p = a.port;
    int rc = kvs_http_start(a.host, &p, handler, w, &w->http);
    if (rc != KVS_OK) {
        snprintf(err, errlen, "cannot serve HTTP on '%s': %s", addr, kvs_strerror(rc));
        kvs_metadata_free(w->md);
        free(w);
        return rc;
    }
    if (port) *port = p;
    *out = w;
    return KVS_OK;
}

void kvs_master_web_stop(kvs_master_web *w)
{
    if (!w) return;
    kvs_http_stop(w->http);
    kvs_metadata_free(w->md);
    free(w);
}
