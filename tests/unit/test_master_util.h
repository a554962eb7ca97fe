/* Helpers shared by the test_master_* unit tests: a master on a fake clock,
 * and a tiny in-memory client that encodes request frames, feeds them to
 * kvs_master_feed and decodes the responses. Header-only (static). */
#ifndef KVS_TEST_MASTER_UTIL_H
#define KVS_TEST_MASTER_UTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/util.h"
#include "kvshelf/errors.h"
#include "master/master_int.h"
#include "proto/proto.h"

#define T0 1000000ull /* fake clock start (ms) */

static uint64_t tm_ep; /* write epoch of the last kvs_m_put_start (tests) */

static inline kvs_master *tm_master(const char *secret, void (*tweak)(kvs_master_opts *))
{
    kvs_master_opts o;
    kvs_master_opts_init(&o);
    o.secret = secret;
    if (tweak) tweak(&o);
    kvs_master *m = NULL;
    assert_int_equal(kvs_master_new(&o, &m), KVS_OK);
    kvs_master_set_time(m, T0);
    return m;
}

static inline void tm_key(char *buf, size_t cap, int i) { snprintf(buf, cap, "key-%06d", i); }

/* Registers a client on host `host` (first byte of host id) directly. */
static inline uint64_t tm_client(kvs_master *m, uint8_t host)
{
    uint8_t hid[16] = {host ? host : 1};
    uint64_t id = 0;
    assert_int_equal(kvs_m_hello(m, "testhost", hid, 42, (uint32_t)getuid(), KVS_ROLE_CLIENT, &id),
                     KVS_OK);
    return id;
}

static inline uint32_t tm_mount(kvs_master *m, uint64_t client, uint64_t size, uint8_t host)
{
    uint8_t hid[16] = {host ? host : 1};
    uint32_t seg = 0;
    static unsigned n; /* each segment has its own memory, so its own name */
    char name[32];
    snprintf(name, sizeof name, "shm-%u", n++);
    assert_int_equal(kvs_m_mount(m, client, size, name, "127.0.0.1:1", hid, 1, &seg), KVS_OK);
    return seg;
}

/* PUT_START + PUT_END(ok) of one object; returns the put-start status. */
static inline int tm_put(kvs_master *m, uint64_t client, const char *key, uint64_t size)
{
    uint32_t seg;
    uint64_t off, obj;
    int rc = kvs_m_put_start(m, client, key, (uint32_t)strlen(key), size, &seg, &off, &obj, &tm_ep);
    if (rc != KVS_OK) return rc;
    assert_int_equal(kvs_m_put_end(m, client, key, (uint32_t)strlen(key), obj, 1), KVS_OK);
    return KVS_OK;
}

static inline int tm_exists(kvs_master *m, const char *key)
{
    return kvs_m_exists(m, key, (uint32_t)strlen(key));
}

/* ---- frame-level client ---- */

typedef struct tm_conn {
    kvs_master *m;
    kvs_mconn st;
    kvs_wbuf out;   /* responses from the master */
    size_t out_pos; /* next undecoded response byte */
    uint8_t nonce[16];
    int closed;     /* the master asked to close */
    uint64_t client_id;
} tm_conn;

typedef struct tm_resp {
    kvs_frame_hdr h;
    const uint8_t *body;
} tm_resp;

/* Starts a connection from a peer with kernel-reported uid `peer_uid` (-1:
 * a TCP peer) and reads the CHALLENGE. */
static inline void tm_open_peer(tm_conn *c, kvs_master *m, int local, int peer_uid)
{
    memset(c, 0, sizeof *c);
    c->m = m;
    kvs_wbuf_init(&c->out);
    kvs_mconn_init(m, &c->st, local, peer_uid, &c->out);
    kvs_frame_hdr h;
    assert_true(c->out.len >= KVS_FRAME_HDR);
    assert_int_equal(kvs_frame_hdr_decode(c->out.data, KVS_MAX_BODY, &h), KVS_OK);
    assert_int_equal(h.type, KVS_MSG_CHALLENGE);
    assert_int_equal(h.body_len, 20);
    memcpy(c->nonce, c->out.data + KVS_FRAME_HDR + 4, 16);
    c->out_pos = KVS_FRAME_HDR + h.body_len;
}

/* Starts a connection (local: a unix peer of our own uid; else a TCP peer)
 * and reads the CHALLENGE. */
static inline void tm_open(tm_conn *c, kvs_master *m, int local)
{
    tm_open_peer(c, m, local, local ? (int)getuid() : -1);
}

static inline void tm_close(tm_conn *c) { kvs_wbuf_free(&c->out); }

/* Feeds raw bytes; returns the feed status. */
static inline int tm_feed_raw(tm_conn *c, const uint8_t *p, size_t n, size_t *consumed)
{
    size_t used = 0;
    int rc = kvs_master_feed(c->m, &c->st, p, n, &c->out, &used);
    if (consumed) *consumed = used;
    if (rc != KVS_OK) c->closed = 1;
    return rc;
}

/* Wraps body `b` in a frame of `type` with request `flags` and feeds it. */
static inline int tm_send_flags(tm_conn *c, uint16_t type, uint16_t flags, const kvs_wbuf *b,
                                uint64_t req_id)
{
    kvs_wbuf f;
    kvs_wbuf_init(&f);
    size_t s = kvs_wbuf_begin_frame(&f, type, flags, 0, req_id);
    if (b && b->len) kvs_wbuf_put(&f, b->data, b->len);
    kvs_wbuf_end_frame(&f, s);
    size_t used;
    int rc = tm_feed_raw(c, f.data, f.len, &used);
    if (rc == KVS_OK) assert_int_equal(used, f.len);
    kvs_wbuf_free(&f);
    return rc;
}

/* Wraps body `b` in a frame of `type` and feeds it. */
static inline int tm_send(tm_conn *c, uint16_t type, const kvs_wbuf *b, uint64_t req_id)
{
    return tm_send_flags(c, type, 0, b, req_id);
}

/* Next response frame (must exist). */
static inline tm_resp tm_next(tm_conn *c)
{
    tm_resp r;
    assert_true(c->out.len - c->out_pos >= KVS_FRAME_HDR);
    assert_int_equal(kvs_frame_hdr_decode(c->out.data + c->out_pos, KVS_MAX_BODY, &r.h), KVS_OK);
    assert_true(r.h.flags & KVS_F_RESPONSE);
    assert_true(c->out.len - c->out_pos - KVS_FRAME_HDR >= r.h.body_len);
    r.body = c->out.data + c->out_pos + KVS_FRAME_HDR;
    c->out_pos += KVS_FRAME_HDR + r.h.body_len;
    return r;
}

static inline int tm_pending(const tm_conn *c) { return c->out.len > c->out_pos; }

static inline void tm_hello_body(kvs_wbuf *b, const char *secret, const uint8_t nonce[16],
                                 uint32_t version)
{
    uint8_t hid[16] = {1}, auth[32];
    kvs_auth_compute(secret, nonce, auth);
    kvs_wbuf_u32(b, version);
    kvs_wbuf_u32(b, KVS_ROLE_CLIENT);
    kvs_wbuf_u64(b, (uint64_t)getpid());
    kvs_wbuf_u32(b, (uint32_t)getuid());
    kvs_wbuf_str(b, "unit-test");
    kvs_wbuf_put(b, hid, 16);
    kvs_wbuf_put(b, auth, 32);
}

/* Full HELLO exchange; returns the response status. */
static inline int tm_hello(tm_conn *c, const char *secret)
{
    kvs_wbuf b;
    kvs_wbuf_init(&b);
    tm_hello_body(&b, secret, c->nonce, KVS_PROTO_VERSION);
    tm_send(c, KVS_MSG_HELLO, &b, 1);
    kvs_wbuf_free(&b);
    tm_resp r = tm_next(c);
    assert_int_equal(r.h.type, KVS_MSG_HELLO);
    assert_int_equal(r.h.req_id, 1);
    if (r.h.status == KVS_OK) {
        kvs_rbuf rb;
        kvs_rbuf_init(&rb, r.body, r.h.body_len);
        c->client_id = kvs_rbuf_u64(&rb);
        (void)kvs_rbuf_u32(&rb);
        (void)kvs_rbuf_u32(&rb);
        assert_int_equal(kvs_rbuf_finish(&rb), KVS_OK);
    }
    return r.h.status;
}

#endif
