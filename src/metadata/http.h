/* A small HTTP server over libmicrohttpd (its own thread), shared by the
 * master (metrics, health, embedded metadata) and `kvshelf metadata`.
 * Requests are passed whole (body buffered, at most KVS_HTTP_MAX_BODY bytes;
 * larger bodies get 413) to one handler. */
#ifndef KVS_HTTP_H
#define KVS_HTTP_H

#include <stddef.h>
#include <stdint.h>

#define KVS_HTTP_MAX_BODY (16u << 20)

typedef struct kvs_http_request {
    const char *method;   /* "GET", "PUT", "POST", "DELETE", ... */
    const char *path;     /* URL path without the query, e.g. "/metadata" */
    const char *key;      /* value of the `key` query parameter, or NULL */
    const uint8_t *body;  /* request body (may be NULL when body_len == 0) */
    size_t body_len;
    const char *authorization; /* the Authorization header, or NULL */
} kvs_http_request;

typedef struct kvs_http_response {
    int status;                 /* HTTP status code */
    const char *content_type;   /* static string, e.g. "application/json" */
    char *body;                 /* malloc'd; the server frees it */
    size_t body_len;
} kvs_http_response;

/* Handles one request, fills `resp`. Called from the server's thread(s). */
typedef void (*kvs_http_handler)(void *ud, const kvs_http_request *req, kvs_http_response *resp);

typedef struct kvs_http_server kvs_http_server;

/* Starts serving on host:*port (port 0 = pick one; the chosen port is written
 * back). Returns KVS_OK and *out, or KVS_ERR_IO / KVS_ERR_CONFIG. */
int kvs_http_start(const char *host, uint16_t *port, kvs_http_handler fn, void *ud,
                   kvs_http_server **out);

/* Stops the server and frees it (waits for running handlers). Safe with NULL. */
void kvs_http_stop(kvs_http_server *s);

/* 1 if `req` carries the header "Authorization: Bearer <secret>" (the
 * scheme case-insensitive, compared in constant time), else 0; 0 when
 * secret is NULL or empty. A handler answers 401 when this fails (the
 * server adds "WWW-Authenticate: Bearer" to every 401). */
int kvs_http_bearer_ok(const kvs_http_request *req, const char *secret);

#endif
