/* Unit tests of the metadata service: the store and its handler
 * (src/metadata/metadata.c), the HTTP server (src/metadata/http.c) over
 * loopback on a port chosen at run time, and the libcurl client
 * (src/common/metaclient.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/metaclient.h"
#include "kvshelf/errors.h"
#include "metadata/http.h"
#include "metadata/metadata.h"

/* ---------- handler level ---------- */

typedef struct reply {
    int status;
    char *body;
    size_t len;
    const char *ct;
} reply;

static reply call(kvs_metadata *m, const char *method, const char *key, const void *body,
                  size_t len)
{
    kvs_http_request req = {.method = method, .path = "/metadata", .key = key,
                            .body = body, .body_len = len};
    kvs_http_response resp;
    memset(&resp, 0x5a, sizeof resp); /* handler must initialise everything */
    kvs_metadata_handle(m, &req, &resp);
    reply r = {resp.status, resp.body, resp.body_len, resp.content_type};
    return r;
}

static void expect(kvs_metadata *m, const char *method, const char *key, const char *body,
                   int status, const char *want_body)
{
    reply r = call(m, method, key, body, body ? strlen(body) : 0);
    if (r.status != status || (want_body && (r.len != strlen(want_body) ||
                                             memcmp(r.body, want_body, r.len) != 0)))
        fail_msg("%s key=%s: got %d '%.*s', want %d '%s'", method, key ? key : "(null)",
                 r.status, (int)r.len, r.body ? r.body : "", status,
                 want_body ? want_body : "*");
    assert_non_null(r.ct);
    assert_non_null(strstr(r.ct, "application/json"));
    free(r.body);
}

static void test_handler_basic(void **state)
{
    (void)state;
    kvs_metadata *m = kvs_metadata_new();
    assert_non_null(m);
    expect(m, "GET", "a", NULL, 404, "metadata not found");
    expect(m, "PUT", "a", "{\"x\":1}", 200, "metadata updated");
    expect(m, "GET", "a", NULL, 200, "{\"x\":1}");
    assert_int_equal(kvs_metadata_count(m), 1);
    expect(m, "PUT", "a", "not json at all", 200, "metadata updated"); /* raw bytes */
    expect(m, "GET", "a", NULL, 200, "not json at all");
    expect(m, "PUT", "empty", "", 200, "metadata updated");
    expect(m, "GET", "empty", NULL, 200, "");
    expect(m, "DELETE", "a", NULL, 200, "metadata deleted");
    expect(m, "DELETE", "a", NULL, 404, "metadata not found");
    expect(m, "GET", "a", NULL, 404, "metadata not found");
    assert_int_equal(kvs_metadata_count(m), 1);
    /* Missing / blank key: 400 before the method is looked at (as Mooncake). */
    expect(m, "GET", NULL, NULL, 400, "metadata key is required");
    expect(m, "PUT", "", "x", 400, "metadata key is required");
    expect(m, "DELETE", "  \t", NULL, 400, "metadata key is required");
    expect(m, "POST", NULL, NULL, 400, "metadata key is required");
    /* Other methods: 405. */
    expect(m, "POST", "a", "x", 405, "Method not allowed");
    expect(m, "HEAD", "a", NULL, 405, "Method not allowed");
    expect(m, "get", "a", NULL, 405, "Method not allowed");
    /* Keys are trimmed. */
    expect(m, "PUT", "  k  ", "v", 200, NULL);
    expect(m, "GET", "k", NULL, 200, "v");
    kvs_metadata_free(m);
    kvs_metadata_free(NULL);
}

static void test_handler_binary_value(void **state)
{
    (void)state;
    kvs_metadata *m = kvs_metadata_new();
    uint8_t v[300];
    for (size_t i = 0; i < sizeof v; i++) v[i] = (uint8_t)i;
    reply r = call(m, "PUT", "bin", v, sizeof v);
    assert_int_equal(r.status, 200);
    free(r.body);
    r = call(m, "GET", "bin", NULL, 0);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.len, sizeof v);
    assert_memory_equal(r.body, v, sizeof v);
    free(r.body);
    kvs_metadata_free(m);
}

static void test_handler_rpc_meta(void **state)
{
    (void)state;
    kvs_metadata *m = kvs_metadata_new();
    expect(m, "PUT", "mooncake/rpc_meta/node1", "{\"ip\":\"a\"}", 200, "metadata updated");
    expect(m, "PUT", "mooncake/rpc_meta/node1", "{\"ip\":\"a\"}", 200, "metadata unchanged");
    expect(m, "PUT", "mooncake/rpc_meta/node1", "{\"ip\":\"b\"}", 400,
           "Duplicate rpc_meta key not allowed");
    expect(m, "GET", "mooncake/rpc_meta/node1", NULL, 200, "{\"ip\":\"a\"}");
    expect(m, "DELETE", "mooncake/rpc_meta/node1", NULL, 200, NULL);
    expect(m, "PUT", "mooncake/rpc_meta/node1", "{\"ip\":\"b\"}", 200, "metadata updated");
    /* The rule is HTTP's: the in-process API replaces. */
    assert_int_equal(kvs_metadata_put(m, "mooncake/rpc_meta/node1", "z", 1), KVS_OK);
    kvs_metadata_free(m);
}

static void test_handler_limits(void **state)
{
    (void)state;
    kvs_metadata_limits lim = {.max_keys = 3, .max_key_bytes = 8, .max_value_bytes = 10,
                               .max_total_bytes = 30};
    kvs_metadata *m = kvs_metadata_new_ex(&lim);
    assert_non_null(m);
    expect(m, "PUT", "123456789", "v", 400, "metadata key too long");
    expect(m, "PUT", "k", "01234567890", 413, "metadata value too large");
    expect(m, "PUT", "k1", "0123456789", 200, NULL);
    expect(m, "PUT", "k2", "0123456789", 200, NULL);
    expect(m, "PUT", "k3", "0123456789", 507, "metadata size budget exhausted"); /* 24+12 > 30 */
    expect(m, "PUT", "k3", "0", 200, NULL);
    expect(m, "PUT", "k4", "0", 507, "metadata key budget exhausted"); /* 3 keys */
    expect(m, "PUT", "k3", "0123456789", 507, NULL);         /* replacing also counts bytes */
    assert_int_equal(kvs_metadata_count(m), 3);
    assert_int_equal(kvs_metadata_bytes(m), 2 + 10 + 2 + 10 + 2 + 1);
    expect(m, "DELETE", "k1", NULL, 200, NULL);
    expect(m, "PUT", "k4", "0", 200, NULL);
    assert_int_equal(kvs_metadata_put(m, "k5", "0", 1), KVS_ERR_NO_SPACE);
    assert_int_equal(kvs_metadata_put(m, "k2", "01234567890", 11), KVS_ERR_TOO_LARGE);
    assert_int_equal(kvs_metadata_put(m, "", "0", 1), KVS_ERR_INVALID);
    assert_int_equal(kvs_metadata_put(m, NULL, "0", 1), KVS_ERR_INVALID);
    char *v = NULL;
    size_t n = 0;
    assert_int_equal(kvs_metadata_get(m, "k2", &v, &n), KVS_OK);
    assert_int_equal(n, 10);
    assert_string_equal(v, "0123456789");
    free(v);
    assert_int_equal(kvs_metadata_get(m, "nope", &v, &n), KVS_ERR_NOT_FOUND);
    assert_null(v);
    assert_int_equal(kvs_metadata_delete(m, "nope"), KVS_ERR_NOT_FOUND);
    kvs_metadata_free(m);
}

static void test_handler_many_keys(void **state)
{
    (void)state;
    kvs_metadata *m = kvs_metadata_new();
    char k[32], v[32];
    for (int i = 0; i < 20000; i++) {
        snprintf(k, sizeof k, "key-%d", i);
        snprintf(v, sizeof v, "%d", i * 7);
        assert_int_equal(kvs_metadata_put(m, k, v, strlen(v)), KVS_OK);
    }
    assert_int_equal(kvs_metadata_count(m), 20000);
    for (int i = 0; i < 20000; i += 3) {
        snprintf(k, sizeof k, "key-%d", i);
        assert_int_equal(kvs_metadata_delete(m, k), KVS_OK);
    }
    for (int i = 0; i < 20000; i++) {
        snprintf(k, sizeof k, "key-%d", i);
        char *got = NULL;
        int rc = kvs_metadata_get(m, k, &got, NULL);
        if (i % 3 == 0) {
            assert_int_equal(rc, KVS_ERR_NOT_FOUND);
        } else {
            assert_int_equal(rc, KVS_OK);
            snprintf(v, sizeof v, "%d", i * 7);
            assert_string_equal(got, v);
            free(got);
        }
    }
    kvs_metadata_free(m);
}

/* ---------- real HTTP on loopback ---------- */

typedef struct server {
    kvs_metadata *md;
    kvs_http_server *http;
    uint16_t port;
    char url[128];
} server;

static void route(void *ud, const kvs_http_request *req, kvs_http_response *resp)
{
    server *s = ud;
    if (req->path && !strcmp(req->path, "/private")) { /* needs "Bearer tok" */
        if (!kvs_http_bearer_ok(req, "tok")) {
            resp->status = req->authorization ? 403 : 401;
            resp->content_type = "text/plain";
            resp->body = strdup("no");
            resp->body_len = resp->body ? 2 : 0;
            return;
        }
        kvs_metadata_handle(s->md, req, resp);
        return;
    }
    if (req->path && !strcmp(req->path, "/metadata")) {
        kvs_metadata_handle(s->md, req, resp);
        return;
    }
    resp->status = 404;
    resp->content_type = "text/plain";
    resp->body = strdup("no such path");
    resp->body_len = resp->body ? strlen(resp->body) : 0;
}

static int server_setup(void **state)
{
    server *s = calloc(1, sizeof *s);
    if (!s) return -1;
    s->md = kvs_metadata_new();
    s->port = 0;
    if (!s->md || kvs_http_start("127.0.0.1", &s->port, route, s, &s->http) != KVS_OK) return -1;
    if (s->port == 0) return -1;
    snprintf(s->url, sizeof s->url, "http://127.0.0.1:%u/metadata", (unsigned)s->port);
    *state = s;
    return 0;
}

static int server_teardown(void **state)
{
    server *s = *state;
    kvs_http_stop(s->http);
    kvs_metadata_free(s->md);
    free(s);
    return 0;
}

static size_t sink_cb(char *p, size_t sz, size_t n, void *ud)
{
    (void)p;
    size_t *total = ud;
    *total += sz * n;
    return sz * n;
}

/* Raw request with libcurl; returns the status. */
static long raw(const char *method, const char *url, const void *body, size_t len,
                const char *extra_header)
{
    CURL *c = curl_easy_init();
    assert_non_null(c);
    size_t got = 0;
    struct curl_slist *h = NULL;
    if (extra_header) h = curl_slist_append(h, extra_header);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_PROXY, "");
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 20000L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink_cb);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &got);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    if (h) curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    if (body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, (const char *)body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    }
    long status = 0;
    CURLcode cc = curl_easy_perform(c);
    if (cc == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    else status = -(long)cc;
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    return status;
}

/* The metadata client sends "Authorization: Bearer <secret>"; a server
 * that checks it refuses missing or wrong credentials (KVS_ERR_AUTH) and
 * changes nothing. */
static void test_http_bearer(void **state)
{
    server *s = *state;
    char url[160], *v = NULL;
    size_t n = 0;
    snprintf(url, sizeof url, "http://127.0.0.1:%u/private", (unsigned)s->port);
    assert_int_equal(kvs_meta_put(url, "k", "tok", "v1", 2, 2000), KVS_OK);
    assert_int_equal(kvs_meta_put(url, "k", NULL, "v2", 2, 2000), KVS_ERR_AUTH);
    assert_int_equal(kvs_meta_put(url, "k", "tok2", "v2", 2, 2000), KVS_ERR_AUTH);
    assert_int_equal(kvs_meta_put(url, "k", "to", "v2", 2, 2000), KVS_ERR_AUTH);
    assert_int_equal(kvs_meta_get(url, "k", NULL, 2000, &v, &n), KVS_ERR_AUTH);
    assert_null(v);
    assert_int_equal(kvs_meta_delete(url, "k", "", 2000), KVS_ERR_AUTH);
    assert_int_equal(kvs_meta_get(url, "k", "tok", 2000, &v, &n), KVS_OK);
    assert_int_equal(n, 2);
    assert_memory_equal(v, "v1", 2);
    free(v);
    char kurl[180];
    snprintf(kurl, sizeof kurl, "%s?key=k", url);
    assert_int_equal(raw("GET", kurl, NULL, 0, "Authorization: bearer tok"), 200);
    assert_int_equal(raw("GET", kurl, NULL, 0, "Authorization: Basic dG9r"), 403);
    assert_int_equal(raw("GET", kurl, NULL, 0, NULL), 401);
    assert_int_equal(kvs_meta_delete(url, "k", "tok", 2000), KVS_OK);
    kvs_http_request rq = {"GET", "/", NULL, NULL, 0, NULL};
    assert_false(kvs_http_bearer_ok(&rq, "tok"));
    rq.authorization = "Bearer tok";
    assert_false(kvs_http_bearer_ok(&rq, ""));
    assert_false(kvs_http_bearer_ok(&rq, NULL));
    assert_true(kvs_http_bearer_ok(&rq, "tok"));
    rq.authorization = "Bearer tokk";
    assert_false(kvs_http_bearer_ok(&rq, "tok"));
}

static void test_http_roundtrip(void **state)
{
    server *s = *state;
    char *v = NULL;
    size_t n = 0;
    assert_int_equal(kvs_meta_get(s->url, "k", NULL, 2000, &v, &n), KVS_ERR_NOT_FOUND);
    assert_null(v);
    assert_int_equal(kvs_meta_put(s->url, "k", NULL, "{\"a\":1}", 7, 2000), KVS_OK);
    assert_int_equal(kvs_meta_get(s->url, "k", NULL, 2000, &v, &n), KVS_OK);
    assert_int_equal(n, 7);
    assert_string_equal(v, "{\"a\":1}");
    free(v);
    assert_int_equal(kvs_meta_put(s->url, "k", NULL, "", 0, 2000), KVS_OK);
    assert_int_equal(kvs_meta_get(s->url, "k", NULL, 2000, &v, &n), KVS_OK);
    assert_int_equal(n, 0);
    assert_string_equal(v, "");
    free(v);
    assert_int_equal(kvs_meta_delete(s->url, "k", NULL, 2000), KVS_OK);
    assert_int_equal(kvs_meta_delete(s->url, "k", NULL, 2000), KVS_ERR_NOT_FOUND);

    /* Keys with characters that need escaping travel intact. */
    const char *odd = "mooncake/ram/host:1234 a&b=c?d#e%f+g/ü";
    assert_int_equal(kvs_meta_put(s->url, odd, NULL, "x", 1, 2000), KVS_OK);
    assert_int_equal(kvs_metadata_get(s->md, odd, &v, NULL), KVS_OK);
    free(v);
    assert_int_equal(kvs_meta_get(s->url, odd, NULL, 2000, &v, NULL), KVS_OK);
    assert_string_equal(v, "x");
    free(v);

    /* Binary values, NUL bytes included. */
    uint8_t bin[1000];
    for (size_t i = 0; i < sizeof bin; i++) bin[i] = (uint8_t)(i * 13);
    assert_int_equal(kvs_meta_put(s->url, "bin", NULL, bin, sizeof bin, 2000), KVS_OK);
    assert_int_equal(kvs_meta_get(s->url, "bin", NULL, 2000, &v, &n), KVS_OK);
    assert_int_equal(n, sizeof bin);
    assert_memory_equal(v, bin, sizeof bin);
    free(v);

    /* A URL with a query of its own. */
    char u2[160];
    snprintf(u2, sizeof u2, "%s?x=1", s->url);
    assert_int_equal(kvs_meta_get(u2, "bin", NULL, 2000, &v, &n), KVS_OK);
    free(v);

    /* rpc_meta conflict maps to KVS_ERR_EXISTS. */
    assert_int_equal(kvs_meta_put(s->url, "rpc_meta/x", NULL, "1", 1, 2000), KVS_OK);
    assert_int_equal(kvs_meta_put(s->url, "rpc_meta/x", NULL, "1", 1, 2000), KVS_OK);
    assert_int_equal(kvs_meta_put(s->url, "rpc_meta/x", NULL, "2", 1, 2000), KVS_ERR_EXISTS);

    /* Argument errors. */
    assert_int_equal(kvs_meta_get(NULL, "k", NULL, 1000, &v, &n), KVS_ERR_INVALID);
    assert_int_equal(kvs_meta_get(s->url, "", NULL, 1000, &v, &n), KVS_ERR_INVALID);
    assert_int_equal(kvs_meta_get(s->url, "k", NULL, 1000, NULL, &n), KVS_ERR_INVALID);
    assert_int_equal(kvs_meta_put("file:///etc/passwd", "k", NULL, "x", 1, 1000), KVS_ERR_INVALID);
    assert_int_equal(kvs_meta_put(s->url, "k", NULL, NULL, 5, 1000), KVS_ERR_INVALID);
}

static void test_http_status_codes(void **state)
{
    server *s = *state;
    char u[256];
    snprintf(u, sizeof u, "%s?key=sc", s->url);
    assert_int_equal(raw("GET", u, NULL, 0, NULL), 404);
    assert_int_equal(raw("PUT", u, "{}", 2, NULL), 200);
    assert_int_equal(raw("GET", u, NULL, 0, NULL), 200);
    assert_int_equal(raw("POST", u, "{}", 2, NULL), 405);
    assert_int_equal(raw("PATCH", u, "{}", 2, NULL), 405);
    assert_int_equal(raw("DELETE", u, NULL, 0, NULL), 200);
    assert_int_equal(raw("DELETE", u, NULL, 0, NULL), 404);
    assert_int_equal(raw("GET", s->url, NULL, 0, NULL), 400);
    snprintf(u, sizeof u, "%s?key=", s->url);
    assert_int_equal(raw("PUT", u, "x", 1, NULL), 400);
    snprintf(u, sizeof u, "%s?other=1", s->url);
    assert_int_equal(raw("GET", u, NULL, 0, NULL), 400);
    snprintf(u, sizeof u, "http://127.0.0.1:%u/elsewhere?key=a", (unsigned)s->port);
    assert_int_equal(raw("GET", u, NULL, 0, NULL), 404);
    /* Chunked upload is buffered like any other. */
    snprintf(u, sizeof u, "%s?key=chunked", s->url);
    assert_int_equal(raw("PUT", u, "hello", 5, "Transfer-Encoding: chunked"), 200);
    char *v = NULL;
    assert_int_equal(kvs_metadata_get(s->md, "chunked", &v, NULL), KVS_OK);
    assert_string_equal(v, "hello");
    free(v);
}

static void test_http_large(void **state)
{
    server *s = *state;
    /* The largest accepted body: KVS_HTTP_MAX_BODY. */
    size_t n = KVS_HTTP_MAX_BODY;
    uint8_t *big = malloc(n + 1);
    assert_non_null(big);
    for (size_t i = 0; i < n + 1; i++) big[i] = (uint8_t)(i * 2654435761u >> 24);
    assert_int_equal(kvs_meta_put(s->url, "big", NULL, big, n, 20000), KVS_OK);
    char *v = NULL;
    size_t got = 0;
    assert_int_equal(kvs_meta_get(s->url, "big", NULL, 20000, &v, &got), KVS_OK);
    assert_int_equal(got, n);
    assert_memory_equal(v, big, n);
    free(v);
    /* One byte more: 413, declared (Content-Length) or chunked. */
    assert_int_equal(kvs_meta_put(s->url, "big2", NULL, big, n + 1, 20000), KVS_ERR_TOO_LARGE);
    char u[256];
    snprintf(u, sizeof u, "%s?key=big3", s->url);
    assert_int_equal(raw("PUT", u, big, n + 1, "Transfer-Encoding: chunked"), 413);
    assert_int_equal(kvs_metadata_get(s->md, "big2", &v, NULL), KVS_ERR_NOT_FOUND);
    assert_int_equal(kvs_metadata_get(s->md, "big3", &v, NULL), KVS_ERR_NOT_FOUND);
    free(big);
    /* The server still works. */
    assert_int_equal(kvs_meta_put(s->url, "after", NULL, "1", 1, 2000), KVS_OK);
}

typedef struct worker_arg {
    server *s;
    int id, ops, failures;
} worker_arg;

static void *worker(void *p)
{
    worker_arg *a = p;
    char key[64], val[128];
    for (int i = 0; i < a->ops; i++) {
        snprintf(key, sizeof key, "w%d/k%d", a->id, i);
        int vl = snprintf(val, sizeof val, "{\"worker\":%d,\"i\":%d}", a->id, i);
        if (kvs_meta_put(a->s->url, key, NULL, val, (size_t)vl, 5000) != KVS_OK) a->failures++;
        char *got = NULL;
        size_t n = 0;
        if (kvs_meta_get(a->s->url, key, NULL, 5000, &got, &n) != KVS_OK || n != (size_t)vl ||
            memcmp(got, val, n) != 0)
            a->failures++;
        free(got);
        if (i % 2 == 0 && kvs_meta_delete(a->s->url, key, NULL, 5000) != KVS_OK) a->failures++;
        /* A key every worker writes. */
        if (kvs_meta_put(a->s->url, "shared", NULL, val, (size_t)vl, 5000) != KVS_OK) a->failures++;
    }
    return NULL;
}

static void test_http_concurrent(void **state)
{
    server *s = *state;
    enum { W = 16, OPS = 100 };
    pthread_t t[W];
    worker_arg a[W];
    size_t before = kvs_metadata_count(s->md);
    for (int i = 0; i < W; i++) {
        a[i] = (worker_arg){.s = s, .id = i, .ops = OPS};
        assert_int_equal(pthread_create(&t[i], NULL, worker, &a[i]), 0);
    }
    for (int i = 0; i < W; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(a[i].failures, 0);
    }
    assert_int_equal(kvs_metadata_count(s->md), before + W * OPS / 2 + 1);
}

/* Garbage and idle connections do not stop the server from serving others. */
static void test_http_garbage(void **state)
{
    server *s = *state;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(s->port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int idle[8];
    for (int i = 0; i < 8; i++) {
        idle[i] = socket(AF_INET, SOCK_STREAM, 0);
        assert_true(idle[i] >= 0);
        assert_int_equal(connect(idle[i], (struct sockaddr *)&sa, sizeof sa), 0);
        if (i % 2 == 0) {
            static const char half[] = "PUT /metadata?key=x HTTP/1.1\r\nContent-Length: 100\r\n";
            assert_true(write(idle[i], half, sizeof half - 1) > 0);
        }
    }
    static const char *junk[] = {
        "\x00\x01\x02garbage\r\n\r\n",
        "GET /metadata?key=%zz HTTP/1.1\r\nHost: x\r\n\r\n",
        "PUT /metadata?key=a HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        "PUT /metadata?key=a HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        "PUT /metadata?key=a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "GET http://evil/metadata?key=a HTTP/1.1\r\n\r\n",
        "GET / HTTP/9.9\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof junk / sizeof junk[0]; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        assert_true(fd >= 0);
        assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
        size_t len = i == 0 ? 14 : strlen(junk[i]);
        assert_true(write(fd, junk[i], len) > 0);
        shutdown(fd, SHUT_WR);
        char buf[512];
        struct timeval tv = {.tv_sec = 5};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        while (read(fd, buf, sizeof buf) > 0) {
        }
        close(fd);
    }
    assert_int_equal(kvs_meta_put(s->url, "alive", NULL, "1", 1, 2000), KVS_OK);
    char *v = NULL;
    assert_int_equal(kvs_meta_get(s->url, "alive", NULL, 2000, &v, NULL), KVS_OK);
    free(v);
    for (int i = 0; i < 8; i++) close(idle[i]);
}

static void test_http_start_errors(void **state)
{
    server *s = *state;
    kvs_http_server *h = NULL;
    uint16_t port = s->port; /* taken */
    assert_int_equal(kvs_http_start("127.0.0.1", &port, route, s, &h), KVS_ERR_IO);
    assert_null(h);
    port = 0;
    assert_int_equal(kvs_http_start("no-such-host.invalid", &port, route, s, &h),
                     KVS_ERR_CONFIG);
    assert_int_equal(kvs_http_start("127.0.0.1", NULL, route, s, &h), KVS_ERR_INVALID);
    assert_int_equal(kvs_http_start("127.0.0.1", &port, NULL, s, &h), KVS_ERR_INVALID);
    /* NULL host = loopback; "localhost" resolves. */
    port = 0;
    assert_int_equal(kvs_http_start(NULL, &port, route, s, &h), KVS_OK);
    assert_true(port != 0);
    kvs_http_stop(h);
    port = 0;
    assert_int_equal(kvs_http_start("localhost", &port, route, s, &h), KVS_OK);
    kvs_http_stop(h);
    kvs_http_stop(NULL);
    /* IPv6 loopback, when the host has it. */
    port = 0;
    if (kvs_http_start("::1", &port, route, s, &h) == KVS_OK) {
        char url[128];
        snprintf(url, sizeof url, "http://[::1]:%u/metadata", (unsigned)port);
        assert_int_equal(kvs_meta_put(url, "v6", NULL, "1", 1, 2000), KVS_OK);
        kvs_http_stop(h);
    }
}

static void test_client_unreachable(void **state)
{
    (void)state;
    /* Find a port nobody listens on: bind, note it, close. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    close(fd);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%u/metadata", (unsigned)ntohs(sa.sin_port));
    char *v = NULL;
    assert_int_equal(kvs_meta_get(url, "k", NULL, 1000, &v, NULL), KVS_ERR_CONN);

    /* A server that accepts and never answers: timeout. */
    fd = socket(AF_INET, SOCK_STREAM, 0);
    sa.sin_port = 0;
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(fd, 4), 0);
    sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    snprintf(url, sizeof url, "http://127.0.0.1:%u/metadata", (unsigned)ntohs(sa.sin_port));
    assert_int_equal(kvs_meta_put(url, "k", NULL, "1", 1, 300), KVS_ERR_TIMEOUT);
    close(fd);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_handler_basic),
        cmocka_unit_test(test_handler_binary_value),
        cmocka_unit_test(test_handler_rpc_meta),
        cmocka_unit_test(test_handler_limits),
        cmocka_unit_test(test_handler_many_keys),
        cmocka_unit_test_setup_teardown(test_http_roundtrip, server_setup, server_teardown),
        cmocka_unit_test_setup_teardown(test_http_status_codes, server_setup, server_teardown),
        cmocka_unit_test_setup_teardown(test_http_large, server_setup, server_teardown),
        cmocka_unit_test_setup_teardown(test_http_concurrent, server_setup, server_teardown),
        cmocka_unit_test_setup_teardown(test_http_garbage, server_setup, server_teardown),
        cmocka_unit_test_setup_teardown(test_http_start_errors, server_setup, server_teardown),
        cmocka_unit_test(test_client_unreachable),
        cmocka_unit_test_setup_teardown(test_http_bearer, server_setup, server_teardown),
    };
    int rc = cmocka_run_group_tests_name("metadata", tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
