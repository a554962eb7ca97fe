/* Bounded resources of the master: prompt expiry of a client whose
 * connection closed (fake clock), and the event loop's connection limit,
 * HELLO deadline and replacement of connections without HELLO over real
 * sockets. Also the rate-limited log helper. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/socket.h>

#include "common/log.h"
#include "common/net.h"
#include "master/server.h"
#include "test_master_util.h"

#define SECRET "unit-limits-secret"

/* ---- expiry after a disconnect (master only, fake clock) ---- */

static void test_disconnect_expiry(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL); /* ttl 10 s, grace default 1 s */
    uint64_t a = tm_client(m, 1), b = tm_client(m, 1);
    tm_mount(m, a, 1 << 20, 1);
    assert_int_equal(m->segs.n, 1);
    assert_int_equal(tm_put(m, b, "k1", 4096), KVS_OK);
    kvs_master_client_disconnected(m, a);
    kvs_master_client_disconnected(m, 987654321); /* unknown: ignored */
    kvs_master_set_time(m, T0 + 999);
    kvs_master_tick(m);
    assert_non_null(kvs_clients_find(&m->clients, a)); /* within the grace */
    kvs_master_set_time(m, T0 + 1000);
    kvs_master_tick(m);
    assert_null(kvs_clients_find(&m->clients, a)); /* long before the 10 s TTL */
    assert_int_equal(m->segs.n, 0);                 /* its segment left the pool */
    assert_int_equal(tm_exists(m, "k1"), 0);        /* with the objects in it */
    kvs_master_counters k;
    kvs_master_get_counters(m, &k);
    assert_int_equal(k.disconnected_clients, 1);
    assert_int_equal(k.expired_clients, 1);

    /* a client heard from after its connection closed (a request naming it
     * on another connection) lives on by its TTL */
    kvs_master_client_disconnected(m, b);
    kvs_master_set_time(m, T0 + 1500);
    assert_int_equal(kvs_m_heartbeat(m, b), KVS_OK);
    kvs_master_set_time(m, T0 + 5000);
    kvs_master_tick(m);
    assert_non_null(kvs_clients_find(&m->clients, b));
    assert_int_equal(m->clients.ndisconnected, 0);
    kvs_master_set_time(m, T0 + 1500 + 10001);
    kvs_master_tick(m); /* silent for the TTL */
    assert_null(kvs_clients_find(&m->clients, b));
    kvs_master_free(m);
}

static void short_grace(kvs_master_opts *o) { o->disconnect_grace_ms = 5000; o->client_ttl_ms = 2000; }

static void test_grace_capped_by_ttl(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, short_grace);
    uint64_t a = tm_client(m, 1);
    kvs_master_client_disconnected(m, a);
    kvs_master_set_time(m, T0 + 1999);
    kvs_master_tick(m);
    assert_non_null(kvs_clients_find(&m->clients, a));
    kvs_master_set_time(m, T0 + 2000); /* min(grace, ttl) */
    kvs_master_tick(m);
    assert_null(kvs_clients_find(&m->clients, a));
    kvs_master_free(m);
}

/* ---- the event loop over sockets ---- */

typedef struct srv_ctx {
    kvs_server *srv;
    volatile sig_atomic_t stop;
    int rc;
} srv_ctx;

static void *run(void *p)
{
    srv_ctx *x = p;
    x->rc = kvs_server_run(x->srv, &x->stop, 0);
    return NULL;
}

static int dial(uint16_t port)
{
    kvs_addr a;
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    assert_int_equal(kvs_addr_parse(addr, 0, &a), KVS_OK);
    int fd = kvs_connect(&a, 5000);
    assert_true(fd >= 0);
    kvs_set_timeouts(fd, 10000);
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

/* Reads the CHALLENGE; its nonce goes to nonce. */
static void read_challenge(int fd, uint8_t nonce[16])
{
    kvs_frame_hdr h;
    uint8_t body[4096];
    read_frame(fd, &h, body, sizeof body);
    assert_int_equal(h.type, KVS_MSG_CHALLENGE);
    memcpy(nonce, body + 4, 16);
}

static void hello(int fd, const uint8_t nonce[16])
{
    kvs_wbuf b, f;
    kvs_wbuf_init(&b);
    kvs_wbuf_init(&f);
    tm_hello_body(&b, SECRET, nonce, KVS_PROTO_VERSION);
    size_t s = kvs_wbuf_begin_frame(&f, KVS_MSG_HELLO, 0, 0, 1);
    kvs_wbuf_put(&f, b.data, b.len);
    kvs_wbuf_end_frame(&f, s);
    assert_int_equal(kvs_write_full(fd, f.data, f.len), KVS_OK);
    kvs_wbuf_free(&b);
    kvs_wbuf_free(&f);
    kvs_frame_hdr h;
    uint8_t body[256];
    read_frame(fd, &h, body, sizeof body);
    assert_int_equal(h.type, KVS_MSG_HELLO);
    assert_int_equal(h.status, KVS_OK);
}

/* 1 if the master closed fd (EOF or reset) within 10 s, reading past what
 * it sent first (a CHALLENGE). */
static int closed_by_peer(int fd)
{
    uint8_t buf[512];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) return 1;
        if (n < 0 && errno == EAGAIN) return 0; /* SO_RCVTIMEO: still open */
    }
}

/* 1 if fd has nothing to read and no EOF right now. */
static int open_and_quiet(int fd)
{
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, 0) == 0;
}

static size_t clients_now(kvs_master *m)
{
    kvs_master_lock(m);
    size_t n = m->clients.count;
    kvs_master_unlock(m);
    return n;
}

static void quick_grace(kvs_master_opts *o) { o->disconnect_grace_ms = 50; }

static void test_server_limits(void **st)
{
    (void)st;
    kvs_master *m = tm_master(SECRET, quick_grace);
    kvs_master_set_time(m, 0); /* real clock: the loop ticks */
    kvs_server *srv;
    assert_int_equal(kvs_server_new(m, &srv), KVS_OK);
    assert_true(kvs_server_max_conns(srv) >= 8);
    kvs_server_set_max_conns(srv, 3);
    assert_int_equal(kvs_server_max_conns(srv), 3);
    kvs_server_set_hello_ms(srv, 60000); /* no deadline in this test */
    char err[256];
    uint16_t port = 0;
    assert_int_equal(kvs_server_listen(srv, "127.0.0.1:0", &port, err, sizeof err), KVS_OK);
    srv_ctx x = {srv, 0, -1};
    pthread_t th;
    pthread_create(&th, NULL, run, &x);

    /* three connections without HELLO fill the room; a fourth replaces the
     * oldest of them */
    uint8_t nonce[4][16];
    int fd[4];
    for (int i = 0; i < 3; i++) {
        fd[i] = dial(port);
        read_challenge(fd[i], nonce[i]);
    }
    fd[3] = dial(port);
    read_challenge(fd[3], nonce[3]);
    assert_true(closed_by_peer(fd[0]));
    close(fd[0]);
    assert_true(open_and_quiet(fd[1]) && open_and_quiet(fd[2]));

    /* once all three have said HELLO, a new connection is closed at once,
     * with a CHALLENGE frame whose status says why (KVS_ERR_BUSY) and
     * nothing else, so that a client does not take the close for a server
     * of another protocol */
    for (int i = 1; i < 4; i++) hello(fd[i], nonce[i]);
    int extra = dial(port);
    uint8_t hb[KVS_FRAME_HDR], c;
    size_t got = 0;
    while (got < sizeof hb) {
        ssize_t r = recv(extra, hb + got, sizeof hb - got, 0);
        assert_true(r > 0);
        got += (size_t)r;
    }
    kvs_frame_hdr rh;
    assert_int_equal(kvs_frame_hdr_decode(hb, KVS_MAX_BODY, &rh), KVS_OK);
    assert_int_equal(rh.type, KVS_MSG_CHALLENGE);
    assert_int_equal(rh.status, KVS_ERR_BUSY);
    assert_int_equal(rh.body_len, 0);
    assert_int_equal(recv(extra, &c, 1, 0), 0);
    close(extra);
    size_t before = clients_now(m);
    assert_int_equal(before, 3);

    /* a closed connection: its client is expired after the grace (50 ms),
     * not after the TTL (10 s) */
    close(fd[1]);
    for (int i = 0; i < 500 && clients_now(m) != before - 1; i++) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(clients_now(m), before - 1);

    x.stop = 1;
    pthread_join(th, NULL);
    assert_int_equal(x.rc, KVS_OK);
    kvs_server_counters k;
    kvs_server_get_counters(srv, &k);
    assert_true(k.evicted >= 1);
    assert_true(k.refused >= 1);
    assert_int_equal(k.open, 2);
    kvs_server_free(srv);
    close(fd[2]);
    close(fd[3]);
    kvs_master_free(m);
}

static void test_server_hello_deadline(void **st)
{
    (void)st;
    kvs_master *m = tm_master(SECRET, NULL);
    kvs_master_set_time(m, 0);
    kvs_server *srv;
    assert_int_equal(kvs_server_new(m, &srv), KVS_OK);
    kvs_server_set_hello_ms(srv, 200);
    char err[256];
    uint16_t port = 0;
    assert_int_equal(kvs_server_listen(srv, "127.0.0.1:0", &port, err, sizeof err), KVS_OK);
    srv_ctx x = {srv, 0, -1};
    pthread_t th;
    pthread_create(&th, NULL, run, &x);
    uint8_t nonce[16], nonce2[16];
    int idle = dial(port), ok = dial(port);
    read_challenge(idle, nonce);
    read_challenge(ok, nonce2);
    hello(ok, nonce2);
    assert_true(closed_by_peer(idle)); /* no HELLO: closed by the deadline */
    assert_true(open_and_quiet(ok));   /* the authenticated one stays */
    x.stop = 1;
    pthread_join(th, NULL);
    kvs_server_counters k;
    kvs_server_get_counters(srv, &k);
    assert_int_equal(k.hello_timeouts, 1);
    assert_int_equal(k.open, 1);
    kvs_server_free(srv);
    close(idle);
    close(ok);
    kvs_master_free(m);
}

static void test_log_limited(void **st)
{
    (void)st;
    static kvs_log_limit lim;
    kvs_log_set_level(KVS_LOG_ERROR); /* counted, not printed */
    int written = 0;
    for (int i = 0; i < 10000; i++)
        written += kvs_log_limited(&lim, 60000, KVS_LOG_WARN, "line %d", i);
    assert_int_equal(written, 1);
    assert_int_equal(lim.suppressed, 9999);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_disconnect_expiry),
        cmocka_unit_test(test_grace_capped_by_ttl),
        cmocka_unit_test(test_server_limits),
        cmocka_unit_test(test_server_hello_deadline),
        cmocka_unit_test(test_log_limited),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
