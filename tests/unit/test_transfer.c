/* Transfer engine, in-process on loopback: server over a segment, client
 * round trips (split values, pipelined batches, many threads), bounds
 * checks and garbage frames closing only the offending connection, wrong
 * secrets, unknown segments, dead peers. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/net.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "proto/proto.h"
#include "segment/segment.h"
#include "transfer/transfer.h"

#define SEG_ID 7u
#define SEG_SIZE (64ull << 20)

struct fix {
    kvs_segment seg;
    kvs_xfer_server *srv;
    kvs_xfer_client *xc;
};

static int setup_secret(void **state, const char *secret, const char *client_secret)
{
    struct fix *f = calloc(1, sizeof *f);
    assert_non_null(f);
    assert_int_equal(kvs_segment_create(SEG_SIZE, &f->seg), KVS_OK);
    assert_int_equal(kvs_xfer_server_start("127.0.0.1", secret, &f->srv), KVS_OK);
    assert_int_equal(kvs_xfer_server_add_segment(f->srv, SEG_ID, &f->seg), KVS_OK);
    assert_int_equal(kvs_xfer_client_new(client_secret, 2000, &f->xc), KVS_OK);
    *state = f;
    return 0;
}

#define SECRET "unit-pool-secret" /* a transfer server always has one */

static int setup(void **state) { return setup_secret(state, SECRET, SECRET); }
static int setup_with_secret(void **state) { return setup_secret(state, "s3cret", "s3cret"); }

static int teardown(void **state)
{
    struct fix *f = *state;
    kvs_xfer_client_free(f->xc);
    kvs_xfer_server_stop(f->srv);
    kvs_segment_destroy(&f->seg);
    free(f);
    return 0;
}

static void fill(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (uint8_t)x;
    }
}

static int xfer1(struct fix *f, int write, uint64_t off, void *buf, uint64_t len)
{
    kvs_xfer_op op = {kvs_xfer_server_addr(f->srv), SEG_ID, off, buf, len, write, 0, 1};
    kvs_xfer_run(f->xc, &op, 1);
    return op.status;
}

static void test_round_trip_sizes(void **state)
{
    struct fix *f = *state;
    const uint64_t sizes[] = {1, 7, 4096, 65536, KVS_MAX_CHUNK - 1, KVS_MAX_CHUNK,
                              KVS_MAX_CHUNK + 123, 9ull << 20};
    uint64_t off = 0;
    for (size_t i = 0; i < KVS_ARRAY_LEN(sizes); i++) {
        uint64_t n = sizes[i];
        uint8_t *in = malloc(n), *out = malloc(n);
        fill(in, n, i + 1);
        memset(out, 0xAA, n);
        assert_int_equal(xfer1(f, 1, off, in, n), KVS_OK);
        assert_memory_equal((uint8_t *)f->seg.base + off, in, n); /* landed in the segment */
        assert_int_equal(xfer1(f, 0, off, out, n), KVS_OK);
        assert_memory_equal(in, out, n);
        off += (n + 4095) / 4096 * 4096;
        free(in);
        free(out);
    }
}

static void test_batch_pipelined(void **state)
{
    struct fix *f = *state;
    enum { N = 512, SZ = 65536 };
    uint8_t *in = malloc((size_t)N * SZ), *out = calloc(N, SZ);
    fill(in, (size_t)N * SZ, 99);
    kvs_xfer_op ops[N];
    for (int i = 0; i < N; i++)
        ops[i] = (kvs_xfer_op){kvs_xfer_server_addr(f->srv), SEG_ID, (uint64_t)i * SZ,
                               in + (size_t)i * SZ, SZ, 1, -1, 1};
    assert_int_equal(kvs_xfer_run(f->xc, ops, N), N);
    for (int i = 0; i < N; i++) {
        /* read back in reverse order, into distinct buffers */
        ops[i] = (kvs_xfer_op){kvs_xfer_server_addr(f->srv), SEG_ID,
                               (uint64_t)(N - 1 - i) * SZ, out + (size_t)i * SZ, SZ, 0, -1, 0};
    }
    assert_int_equal(kvs_xfer_run(f->xc, ops, N), N);
    for (int i = 0; i < N; i++)
        assert_memory_equal(out + (size_t)i * SZ, in + (size_t)(N - 1 - i) * SZ, SZ);
    free(in);
    free(out);
}

struct thr_arg {
    struct fix *f;
    int idx;
    int errors;
};

static void *thr_main(void *p)
{
    struct thr_arg *a = p;
    enum { SZ = 300000 };
    uint8_t *in = malloc(SZ), *out = malloc(SZ);
    uint64_t base = (uint64_t)a->idx * (1u << 20) + (32ull << 20);
    for (int it = 0; it < 50; it++) {
        fill(in, SZ, (uint64_t)a->idx * 1000 + (uint64_t)it);
        if (xfer1(a->f, 1, base, in, SZ) != KVS_OK) a->errors++;
        memset(out, 0, SZ);
        if (xfer1(a->f, 0, base, out, SZ) != KVS_OK || memcmp(in, out, SZ)) a->errors++;
    }
    free(in);
    free(out);
    return NULL;
}

static void test_threads(void **state)
{
    struct fix *f = *state;
    enum { T = 8 };
    pthread_t th[T];
    struct thr_arg a[T];
    for (int i = 0; i < T; i++) {
        a[i] = (struct thr_arg){f, i, 0};
        pthread_create(&th[i], NULL, thr_main, &a[i]);
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(a[i].errors, 0);
    }
}

static void test_unknown_segment(void **state)
{
    struct fix *f = *state;
    uint8_t buf[100];
    kvs_xfer_op op = {kvs_xfer_server_addr(f->srv), 12345, 0, buf, sizeof buf, 0, 0, 1};
    assert_int_equal(kvs_xfer_run(f->xc, &op, 1), 0);
    assert_int_equal(op.status, KVS_ERR_UNAVAILABLE);
    op.write = 1; /* the payload is drained and the connection stays usable */
    assert_int_equal(kvs_xfer_run(f->xc, &op, 1), 0);
    assert_int_equal(op.status, KVS_ERR_UNAVAILABLE);
    assert_int_equal(xfer1(f, 0, 0, buf, sizeof buf), KVS_OK);
}

static void test_out_of_bounds(void **state)
{
    struct fix *f = *state;
    uint8_t buf[64];
    uint64_t bad0;
    kvs_xfer_server_counters(f->srv, NULL, NULL, &bad0);
    assert_int_equal(xfer1(f, 0, SEG_SIZE - 10, buf, sizeof buf), KVS_ERR_UNAVAILABLE);
    assert_int_equal(xfer1(f, 1, UINT64_MAX - 5, buf, sizeof buf), KVS_ERR_UNAVAILABLE);
    uint64_t bad1;
    kvs_xfer_server_counters(f->srv, NULL, NULL, &bad1);
    assert_true(bad1 >= bad0 + 2);
    /* the client reconnects and the server still serves */
    assert_int_equal(xfer1(f, 0, 0, buf, sizeof buf), KVS_OK);
}

/* Connects and authenticates a raw socket. */
static int raw_conn(struct fix *f, const char *secret)
{
    kvs_addr a;
    assert_int_equal(kvs_addr_parse(kvs_xfer_server_addr(f->srv), 0, &a), KVS_OK);
    int fd = kvs_connect(&a, 2000);
    assert_true(fd >= 0);
    int rc = kvs_hs_client(fd, secret, KVS_ROLE_CLIENT, 2000, NULL, 0, NULL);
    if (rc) {
        close(fd);
        return rc;
    }
    return fd;
}

/* 1 if the server closed the connection (EOF within 2 s). */
static int closed_by_server(int fd)
{
    kvs_set_timeouts(fd, 2000);
    uint8_t b[4096];
    for (;;) {
        ssize_t r = recv(fd, b, sizeof b, 0);
        if (r == 0) return 1;
        if (r < 0) return 0; /* timeout: still open */
    }
}

static void test_garbage_frames(void **state)
{
    struct fix *f = *state;
    /* another client keeps working throughout */
    uint8_t buf[4096];
    fill(buf, sizeof buf, 5);
    assert_int_equal(xfer1(f, 1, 0, buf, sizeof buf), KVS_OK);
    int keep = raw_conn(f, SECRET); /* open across all the bad connections below */
    assert_true(keep >= 0);

    /* 1: random bytes */
    int fd = raw_conn(f, SECRET);
    uint8_t junk[64];
    fill(junk, sizeof junk, 77);
    assert_int_equal(kvs_write_full(fd, junk, sizeof junk), KVS_OK);
    assert_true(closed_by_server(fd));
    close(fd);

    /* 2: valid header, wrong type (a master message) */
    fd = raw_conn(f, SECRET);
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    size_t s = kvs_wbuf_begin_frame(&w, KVS_MSG_GET, 0, 0, 1);
    kvs_wbuf_put(&w, junk, 28);
    kvs_wbuf_end_frame(&w, s);
    assert_int_equal(kvs_write_full(fd, w.data, w.len), KVS_OK);
    assert_true(closed_by_server(fd));
    close(fd);

    /* 3: T_READ with a body length that does not match */
    fd = raw_conn(f, SECRET);
    kvs_wbuf_reset(&w);
    s = kvs_wbuf_begin_frame(&w, KVS_MSG_T_READ, 0, 0, 1);
    kvs_wbuf_u32(&w, SEG_ID);
    kvs_wbuf_u64(&w, 0);
    kvs_wbuf_u64(&w, 16);
    kvs_wbuf_u64(&w, 0);
    kvs_wbuf_u64(&w, 0); /* 8 bytes too many */
    kvs_wbuf_end_frame(&w, s);
    assert_int_equal(kvs_write_full(fd, w.data, w.len), KVS_OK);
    assert_true(closed_by_server(fd));
    close(fd);

    /* 4: T_READ beyond the segment end */
    fd = raw_conn(f, SECRET);
    kvs_wbuf_reset(&w);
    s = kvs_wbuf_begin_frame(&w, KVS_MSG_T_READ, 0, 0, 1);
    kvs_wbuf_u32(&w, SEG_ID);
    kvs_wbuf_u64(&w, SEG_SIZE);
    kvs_wbuf_u64(&w, 1);
    kvs_wbuf_u64(&w, 0);
    kvs_wbuf_end_frame(&w, s);
    assert_int_equal(kvs_write_full(fd, w.data, w.len), KVS_OK);
    assert_true(closed_by_server(fd));
    close(fd);

    /* 5: T_WRITE larger than a chunk */
    fd = raw_conn(f, SECRET);
    kvs_wbuf_reset(&w);
    s = kvs_wbuf_begin_frame(&w, KVS_MSG_T_WRITE, 0, 0, 1);
    kvs_wbuf_u32(&w, SEG_ID);
    kvs_wbuf_u64(&w, 0);
    kvs_wbuf_u64(&w, KVS_MAX_CHUNK + 1ull);
    kvs_wbuf_u64(&w, 1);
    kvs_wbuf_end_frame(&w, s);
    /* body_len claims 28 but len says more: mismatch */
    assert_int_equal(kvs_write_full(fd, w.data, w.len), KVS_OK);
    assert_true(closed_by_server(fd));
    close(fd);

    /* 6: a request before HELLO */
    kvs_addr a;
    kvs_addr_parse(kvs_xfer_server_addr(f->srv), 0, &a);
    fd = kvs_connect(&a, 2000);
    assert_true(fd >= 0);
    kvs_wbuf_reset(&w);
    s = kvs_wbuf_begin_frame(&w, KVS_MSG_T_READ, 0, 0, 1);
    kvs_wbuf_u32(&w, SEG_ID);
    kvs_wbuf_u64(&w, 0);
    kvs_wbuf_u64(&w, 16);
    kvs_wbuf_end_frame(&w, s);
    assert_int_equal(kvs_write_full(fd, w.data, w.len), KVS_OK);
    assert_true(closed_by_server(fd));
    close(fd);

    /* the connection opened before is still served */
    kvs_wbuf_reset(&w);
    s = kvs_wbuf_begin_frame(&w, KVS_MSG_T_READ, 0, 0, 42);
    kvs_wbuf_u32(&w, SEG_ID);
    kvs_wbuf_u64(&w, 0);
    kvs_wbuf_u64(&w, 100);
    kvs_wbuf_u64(&w, 0);
    kvs_wbuf_end_frame(&w, s);
    assert_int_equal(kvs_write_full(keep, w.data, w.len), KVS_OK);
    uint8_t hb[KVS_FRAME_HDR], body[100];
    kvs_set_timeouts(keep, 2000);
    assert_int_equal(kvs_read_full(keep, hb, sizeof hb), KVS_OK);
    kvs_frame_hdr h;
    assert_int_equal(kvs_frame_hdr_decode(hb, KVS_MAX_BODY, &h), KVS_OK);
    assert_int_equal(h.req_id, 42);
    assert_int_equal(h.status, KVS_OK);
    assert_int_equal(h.body_len, 100);
    assert_int_equal(kvs_read_full(keep, body, sizeof body), KVS_OK);
    assert_memory_equal(body, buf, sizeof body);
    close(keep);
    kvs_wbuf_free(&w);

    uint8_t out[4096];
    assert_int_equal(xfer1(f, 0, 0, out, sizeof out), KVS_OK);
    assert_memory_equal(out, buf, sizeof buf);
}

/* T_WRITE is fenced: a write under a stale epoch is answered
 * KVS_ERR_UNAVAILABLE and its bytes never land; the connection goes on. */
static void test_fenced_write(void **state)
{
    struct fix *f = *state;
    uint8_t in[8192], out[8192];
    fill(in, sizeof in, 5);
    memset(f->seg.base, 0xab, sizeof in);
    assert_int_equal(kvs_segment_fence(&f->seg, 3), KVS_OK);
    kvs_xfer_op op = {kvs_xfer_server_addr(f->srv), SEG_ID, 0, in, sizeof in, 1, 0, 2};
    assert_int_equal(kvs_xfer_run(f->xc, &op, 1), 0);
    assert_int_equal(op.status, KVS_ERR_UNAVAILABLE);
    for (size_t i = 0; i < sizeof in; i++) assert_int_equal(((uint8_t *)f->seg.base)[i], 0xab);
    op.epoch = 0; /* no epoch at all: refused too */
    assert_int_equal(kvs_xfer_run(f->xc, &op, 1), 0);
    op.epoch = 3; /* the current epoch: lands */
    assert_int_equal(kvs_xfer_run(f->xc, &op, 1), 1);
    assert_int_equal(xfer1(f, 0, 0, out, sizeof out), KVS_OK);
    assert_memory_equal(out, in, sizeof in);
}

static void test_wrong_secret(void **state)
{
    struct fix *f = *state;
    assert_int_equal(raw_conn(f, "wrong"), KVS_ERR_AUTH);
    assert_int_equal(raw_conn(f, ""), KVS_ERR_AUTH);
    kvs_xfer_client *bad;
    assert_int_equal(kvs_xfer_client_new("nope", 1000, &bad), KVS_OK);
    uint8_t buf[16];
    kvs_xfer_op op = {kvs_xfer_server_addr(f->srv), SEG_ID, 0, buf, sizeof buf, 0, 0, 0};
    kvs_xfer_run(bad, &op, 1);
    assert_int_equal(op.status, KVS_ERR_AUTH);
    kvs_xfer_client_free(bad);
    /* the right secret works */
    int fd = raw_conn(f, "s3cret");
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(xfer1(f, 0, 0, buf, sizeof buf), KVS_OK);
}

static void test_dead_peer(void **state)
{
    struct fix *f = *state;
    /* a port nobody listens on: reserve one, close it */
    kvs_addr a;
    kvs_addr_parse("127.0.0.1:0", 0, &a);
    int lfd = kvs_listen(&a);
    assert_true(lfd >= 0);
    close(lfd);
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%u", a.port);
    uint8_t buf[16];
    kvs_xfer_op ops[2] = {{peer, 1, 0, buf, sizeof buf, 0, 0, 0},
                          {kvs_xfer_server_addr(f->srv), SEG_ID, 0, buf, sizeof buf, 0, 0}};
    uint64_t t0 = kvs_now_ms();
    assert_int_equal(kvs_xfer_run(f->xc, ops, 2), 1);
    assert_int_equal(ops[0].status, KVS_ERR_UNAVAILABLE);
    assert_int_equal(ops[1].status, KVS_OK);
    assert_true(kvs_now_ms() - t0 < 2000);
}

static void test_server_stops_midway(void **state)
{
    struct fix *f = *state;
    uint8_t buf[256];
    assert_int_equal(xfer1(f, 0, 0, buf, sizeof buf), KVS_OK);
    char addr[KVS_XFER_ADDR_MAX];
    kvs_strlcpy(addr, kvs_xfer_server_addr(f->srv), sizeof addr);
    kvs_xfer_server_stop(f->srv);
    kvs_xfer_op op = {addr, SEG_ID, 0, buf, sizeof buf, 0, 0, 0};
    kvs_xfer_run(f->xc, &op, 1);
    assert_int_equal(op.status, KVS_ERR_UNAVAILABLE);
    /* restart for teardown */
    assert_int_equal(kvs_xfer_server_start("127.0.0.1", SECRET, &f->srv), KVS_OK);
}

static void test_refuse_public_without_secret(void **state)
{
    (void)state;
    kvs_xfer_server *s = NULL;
    assert_int_equal(kvs_xfer_server_start("0.0.0.0", "", &s), KVS_ERR_CONFIG);
    assert_null(s);
    /* loopback too: other users of the host must not read or write segments */
    assert_int_equal(kvs_xfer_server_start("127.0.0.1", "", &s), KVS_ERR_CONFIG);
    assert_null(s);
    assert_int_equal(kvs_xfer_server_start("127.0.0.1", NULL, &s), KVS_ERR_CONFIG);
    assert_null(s);
    assert_int_equal(kvs_xfer_server_start("0.0.0.0", "x", &s), KVS_OK);
    kvs_xfer_server_stop(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip_sizes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_batch_pipelined, setup, teardown),
        cmocka_unit_test_setup_teardown(test_threads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_segment, setup, teardown),
        cmocka_unit_test_setup_teardown(test_out_of_bounds, setup, teardown),
        cmocka_unit_test_setup_teardown(test_garbage_frames, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fenced_write, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_secret, setup_with_secret, teardown),
        cmocka_unit_test_setup_teardown(test_dead_peer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_server_stops_midway, setup, teardown),
        cmocka_unit_test(test_refuse_public_without_secret),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
