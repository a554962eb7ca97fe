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
    if (!strcmp(p, "/metadata") || !strncmp(p, "/metadata/", 10)) {
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

int kvs_master_web_start(kvs_master *m, const char *addr, int with_metadata, uint16_t *port,
                         kvs_master_web **out, char *err, size_t errlen)
{
    kvs_addr a;
    if (kvs_addr_parse(addr, 9003, &a) != KVS_OK || a.is_unix) {
        snprintf(err, errlen, "invalid HTTP address '%s' (want host:port)", addr);
        return KVS_ERR_CONFIG;
    }
    kvs_master_web *w = calloc(1, sizeof *w);
    if (!w) return KVS_ERR_NOMEM;
    w->m = m;
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
