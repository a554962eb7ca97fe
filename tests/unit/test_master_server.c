/* Server tests over real sockets: TCP and unix listeners, CHALLENGE/HELLO,
 * pipelined requests, a garbage connection closed while another keeps being
 * served, SHUTDOWN stopping the loop, unix socket file removed. Also the
 * HTTP routes (called directly). */
#include <pthread.h>
#include <stdio.h>
#include <sys/socket.h>

#include "common/net.h"
#include "master/server.h"
#include "master/web.h"
#include "test_master_util.h"

typedef struct srv_ctx {
    kvs_server *srv;
    volatile sig_atomic_t stop;
    int rc;
} srv_ctx;

static void *run(void *p)
{
    srv_ctx *x = p;
    x->rc = kvs_server_run(x->srv, &x->stop, 1);
    return NULL;
}

static int dial(const char *addr)
{
    kvs_addr a;
    assert_int_equal(kvs_addr_parse(addr, 0, &a), KVS_OK);
    int fd = kvs_connect(&a, 2000);
    assert_true(fd >= 0);
    kvs_set_timeouts(fd, 5000);
    return fd;
}

static void read_frame(int fd, kvs_frame_hdr *h, uint8_t *body, size_t cap)
{
    uint8_t hb[KVS_FRAME_HDR];
    assert_int_equal(kvs_read_full(fd, hb, sizeof hb), KVS_OK);
    assert_int_equal(kvs_frame_hdr_decode(hb, KVS_MAX_BODY, h), KVS_OK);
    assert_true(h->body_len <= cap);
    if (h->body_len) assert_int_equal(kvs_read_full(fd, body, h->body_len), KVS_OK);
}

static void send_frame(int fd, uint16_t type, uint64_t req_id, const kvs_wbuf *b)
{
    kvs_wbuf f;
    kvs_wbuf_init(&f);
    size_t s = kvs_wbuf_begin_frame(&f, type, 0, 0, req_id);
    if (b && b->len) kvs_wbuf_put(&f, b->data, b->len);
    kvs_wbuf_end_frame(&f, s);
    assert_int_equal(kvs_write_full(fd, f.data, f.len), KVS_OK);
    kvs_wbuf_free(&f);
}

/* CHALLENGE + HELLO with `secret` (NULL: none); checks the reply's status
 * is `want`; returns the client id (0 when refused). */
static uint64_t handshake_as(int fd, const char *secret, int want)
{
    kvs_frame_hdr h;
    uint8_t body[4096];
    read_frame(fd, &h, body, sizeof body);
    assert_int_equal(h.type, KVS_MSG_CHALLENGE);
    kvs_wbuf b;
    kvs_wbuf_init(&b);
    tm_hello_body(&b, secret, body + 4, KVS_PROTO_VERSION);
    send_frame(fd, KVS_MSG_HELLO, 1, &b);
    kvs_wbuf_free(&b);
    read_frame(fd, &h, body, sizeof body);
    assert_int_equal(h.status, want);
    if (want != KVS_OK) return 0;
    kvs_rbuf r;
    kvs_rbuf_init(&r, body, h.body_len);
    return kvs_rbuf_u64(&r);
}

#define POOL_SECRET "unit-pool-secret"

static void pool_secret(kvs_master_opts *o) { o->secret_is_pool = 1; }

static void test_server(void **st)
{
    (void)st;
    kvs_master *m = tm_master(POOL_SECRET, pool_secret);
    kvs_master_set_time(m, 0); /* real clock: the loop ticks */
    kvs_server *srv;
    assert_int_equal(kvs_server_new(m, &srv), KVS_OK);
    char err[256], path[128], uaddr[160], taddr[64];
    uint16_t port = 0;
    assert_int_equal(kvs_server_listen(srv, "127.0.0.1:0", &port, err, sizeof err), KVS_OK);
    assert_true(port != 0);
    snprintf(path, sizeof path, "/tmp/kvs-test-master-%d.sock", (int)getpid());
    snprintf(uaddr, sizeof uaddr, "unix:%s", path);
    snprintf(taddr, sizeof taddr, "127.0.0.1:%u", port);
    assert_int_equal(kvs_server_listen(srv, uaddr, NULL, err, sizeof err), KVS_OK);
    assert_true(kvs_server_listen(srv, "256.1.1.1:1", NULL, err, sizeof err) < 0);
    srv_ctx x = {srv, 0, -1};
    pthread_t th;
    pthread_create(&th, NULL, run, &x);

    /* TCP needs the secret; the unix socket takes our uid (SO_PEERCRED) */
    int a = dial(taddr), u = dial(uaddr);
    assert_int_equal(handshake_as(a, NULL, KVS_ERR_AUTH), 0);
    uint8_t c0;
    assert_true(recv(a, &c0, 1, 0) <= 0); /* closed by the master */
    close(a);
    a = dial(taddr);
    uint64_t ida = handshake_as(a, POOL_SECRET, KVS_OK);
    uint64_t idu = handshake_as(u, NULL, KVS_OK);
    assert_true(ida && idu && ida != idu);

    /* garbage on a third connection: closed, others unaffected */
    int g = dial(taddr);
    uint8_t junk[100];
    memset(junk, 0xEE, sizeof junk);
    kvs_frame_hdr h;
    static uint8_t body[1 << 16];
    read_frame(g, &h, body, sizeof body); /* CHALLENGE */
    assert_int_equal(kvs_write_full(g, junk, sizeof junk), KVS_OK);
    uint8_t c;
    assert_true(recv(g, &c, 1, 0) <= 0); /* closed by the master */
    close(g);

    /* pipelined: 100 EXISTS in one write */
    kvs_wbuf all, b;
    kvs_wbuf_init(&all);
    kvs_wbuf_init(&b);
    for (int i = 0; i < 100; i++) {
        size_t s = kvs_wbuf_begin_frame(&all, KVS_MSG_EXISTS, 0, 0, 1000 + i);
        kvs_wbuf_u32(&all, 1);
        kvs_wbuf_bytes(&all, "k", 1);
        kvs_wbuf_end_frame(&all, s);
    }
    assert_int_equal(kvs_write_full(a, all.data, all.len), KVS_OK);
    for (int i = 0; i < 100; i++) {
        read_frame(a, &h, body, sizeof body);
        assert_int_equal(h.req_id, 1000 + i);
        assert_int_equal(h.status, KVS_OK);
    }
    /* a large EXISTS (65536 keys) and its bitmap */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u32(&b, KVS_MAX_BATCH);
    for (uint32_t i = 0; i < KVS_MAX_BATCH; i++) kvs_wbuf_bytes(&b, &i, 4);
    send_frame(u, KVS_MSG_EXISTS, 7, &b);
    read_frame(u, &h, body, sizeof body);
    assert_int_equal(h.body_len, 4 + KVS_MAX_BATCH / 8);

    /* SHUTDOWN over the unix socket stops the loop */
    send_frame(u, KVS_MSG_SHUTDOWN, 9, NULL);
    read_frame(u, &h, body, sizeof body);
    assert_int_equal(h.status, KVS_OK);
    pthread_join(th, NULL);
    assert_int_equal(x.rc, KVS_OK);
    kvs_server_free(srv);
    assert_int_not_equal(access(path, F_OK), 0);
    close(a);
    close(u);
    kvs_wbuf_free(&all);
    kvs_wbuf_free(&b);
    kvs_master_free(m);
}

static void test_web_routes(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    kvs_master_web *w = NULL;
    char err[256];
    uint16_t port = 0;
    int rc = kvs_master_web_start(m, "127.0.0.1:0", 1, NULL, &port, &w, err, sizeof err);
    if (rc != KVS_OK) {
        print_message("HTTP not available here (%s): skipping\n", err);
        kvs_master_free(m);
        skip();
    }
    assert_true(port != 0);
    kvs_http_request rq = {"GET", "/health", NULL, NULL, 0};
    kvs_http_response rs;
    memset(&rs, 0, sizeof rs);
    kvs_master_web_route(w, &rq, &rs);
    assert_int_equal(rs.status, 200);
    assert_int_equal(rs.body_len, 2);
    assert_memory_equal(rs.body, "ok", 2);
    free(rs.body);
    rq.path = "/metrics";
    memset(&rs, 0, sizeof rs);
    kvs_master_web_route(w, &rq, &rs);
    assert_int_equal(rs.status, 200);
    assert_non_null(strstr(rs.body, "kvshelf_capacity_bytes 0"));
    assert_non_null(strstr(rs.content_type, "0.0.4"));
    free(rs.body);
    rq.path = "/nope";
    memset(&rs, 0, sizeof rs);
    kvs_master_web_route(w, &rq, &rs);
    assert_int_equal(rs.status, 404);
    free(rs.body);
    rq.path = "/metadata";
    rq.key = "missing";
    memset(&rs, 0, sizeof rs);
    kvs_master_web_route(w, &rq, &rs);
    assert_int_equal(rs.status, 404);
    free(rs.body);
    kvs_master_web_stop(w);
    kvs_master_free(m);
}

/* Routes one request; returns the status (body freed). */
static int route1(kvs_master_web *w, const char *method, const char *path, const char *key,
                  const char *auth, const char *body)
{
    kvs_http_request rq = {method, path, key, (const uint8_t *)body, body ? strlen(body) : 0,
                           auth};
    kvs_http_response rs;
    memset(&rs, 0, sizeof rs);
    kvs_master_web_route(w, &rq, &rs);
    free(rs.body);
    return rs.status;
}

/* With a secret: /metadata and every write need "Authorization: Bearer";
 * loopback reads of /health and /metrics stay open; beyond loopback only
 * /health does, and no secret there refuses to start. */
static void test_web_auth(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    kvs_master_web *w = NULL;
    char err[256];
    uint16_t port = 0;
    int rc = kvs_master_web_start(m, "127.0.0.1:0", 1, "websec", &port, &w, err, sizeof err);
    if (rc != KVS_OK) {
        print_message("HTTP not available here (%s): skipping\n", err);
        kvs_master_free(m);
        skip();
    }
    const char *ok = "Bearer websec";
    assert_int_equal(route1(w, "PUT", "/metadata", "k", NULL, "v1"), 401);
    assert_int_equal(route1(w, "PUT", "/metadata", "k", "Bearer nope", "v1"), 403);
    assert_int_equal(route1(w, "PUT", "/metadata", "k", ok, "v1"), 200);
    assert_int_equal(route1(w, "GET", "/metadata", "k", NULL, NULL), 401);
    assert_int_equal(route1(w, "DELETE", "/metadata", "k", "websec", NULL), 403);
    assert_int_equal(route1(w, "GET", "/metadata", "k", ok, NULL), 200);
    assert_int_equal(route1(w, "GET", "/health", NULL, NULL, NULL), 200);
    assert_int_equal(route1(w, "GET", "/metrics", NULL, NULL, NULL), 200);
    assert_int_equal(route1(w, "POST", "/health", NULL, NULL, "x"), 401);
    assert_int_equal(route1(w, "DELETE", "/metadata", "k", ok, NULL), 200);
    kvs_master_web_stop(w);
    w = NULL;
    /* beyond loopback: a secret is required, and guards /metrics too */
    assert_int_equal(kvs_master_web_start(m, "0.0.0.0:0", 1, NULL, &port, &w, err, sizeof err),
                     KVS_ERR_CONFIG);
    assert_null(w);
    assert_int_equal(kvs_master_web_start(m, "0.0.0.0:0", 1, "websec", &port, &w, err,
                                          sizeof err),
                     KVS_OK);
    assert_int_equal(route1(w, "GET", "/metrics", NULL, NULL, NULL), 401);
    assert_int_equal(route1(w, "GET", "/metrics", NULL, ok, NULL), 200);
    assert_int_equal(route1(w, "GET", "/health", NULL, NULL, NULL), 200);
    kvs_master_web_stop(w);
    kvs_master_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_server),
        cmocka_unit_test(test_web_routes),
        cmocka_unit_test(test_web_auth),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
