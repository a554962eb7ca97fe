/* Protocol tests: every message encoded, handled by kvs_master_feed, and
 * its response decoded; auth, pipelining, malformed frames. */
#include <cjson/cJSON.h>

#include "test_master_util.h"

static tm_conn C;

static void mount_seg(tm_conn *c, uint64_t size, uint32_t *seg)
{
    kvs_wbuf b;
    kvs_wbuf_init(&b);
    uint8_t hid[16] = {1};
    kvs_wbuf_u64(&b, c->client_id);
    kvs_wbuf_u64(&b, size);
    kvs_wbuf_str(&b, "kvshelf-test-shm");
    kvs_wbuf_str(&b, "127.0.0.1:7777");
    kvs_wbuf_put(&b, hid, 16);
    kvs_wbuf_u64(&b, 1); /* epoch */
    assert_int_equal(tm_send(c, KVS_MSG_MOUNT, &b, 2), KVS_OK);
    kvs_wbuf_free(&b);
    tm_resp r = tm_next(c);
    assert_int_equal(r.h.type, KVS_MSG_MOUNT);
    assert_int_equal(r.h.status, KVS_OK);
    assert_int_equal(r.h.body_len, 12); /* segment id, the master's reign */
    kvs_rbuf rb;
    kvs_rbuf_init(&rb, r.body, r.h.body_len);
    *seg = kvs_rbuf_u32(&rb);
    assert_true(kvs_rbuf_u64(&rb) > 0);
}

static void test_all_messages(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    tm_open(&C, m, 1);
    assert_int_equal(tm_hello(&C, NULL), KVS_OK);
    assert_true(C.client_id != 0);

    /* HEARTBEAT: known, then unknown */
    kvs_wbuf b;
    kvs_wbuf_init(&b);
    kvs_wbuf_u64(&b, C.client_id);
    tm_send(&C, KVS_MSG_HEARTBEAT, &b, 3);
    tm_resp r = tm_next(&C);
    assert_int_equal(r.h.status, KVS_OK);
    assert_int_equal(r.h.req_id, 3);
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id + 12345);
    tm_send(&C, KVS_MSG_HEARTBEAT, &b, 4);
    r = tm_next(&C);
    assert_int_equal(r.h.status, KVS_ERR_NOT_FOUND);

    uint32_t seg;
    mount_seg(&C, 64ull << 20, &seg);

    /* PUT_START 3 keys: ok, ok, duplicate of the first */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id);
    kvs_wbuf_u32(&b, 4);
    kvs_wbuf_bytes(&b, "a", 1);
    kvs_wbuf_u64(&b, 5000);
    kvs_wbuf_bytes(&b, "b\0b", 3);
    kvs_wbuf_u64(&b, 1 << 20);
    kvs_wbuf_bytes(&b, "a", 1);
    kvs_wbuf_u64(&b, 10);
    kvs_wbuf_bytes(&b, "", 0);
    kvs_wbuf_u64(&b, 10);
    tm_send(&C, KVS_MSG_PUT_START, &b, 5);
    r = tm_next(&C);
    assert_int_equal(r.h.status, KVS_OK);
    kvs_rbuf rb;
    kvs_rbuf_init(&rb, r.body, r.h.body_len);
    assert_int_equal(kvs_rbuf_u32(&rb), 4);
    int32_t sts[4];
    uint64_t offs[4], objs[4];
    for (int i = 0; i < 4; i++) {
        sts[i] = kvs_rbuf_i32(&rb);
        uint32_t sg = kvs_rbuf_u32(&rb);
        offs[i] = kvs_rbuf_u64(&rb);
        objs[i] = kvs_rbuf_u64(&rb);
        uint64_t ep = kvs_rbuf_u64(&rb);
        if (sts[i] == KVS_OK) assert_int_equal(sg, seg);
        if (sts[i] == KVS_OK) assert_int_equal(ep, 1); /* the epoch MOUNT gave */
    }
    assert_int_equal(kvs_rbuf_finish(&rb), KVS_OK);
    assert_int_equal(sts[0], KVS_OK);
    assert_int_equal(sts[1], KVS_OK);
    assert_int_equal(sts[2], KVS_ERR_EXISTS);
    assert_int_equal(sts[3], KVS_ERR_INVALID);
    assert_true(offs[0] != offs[1]);
    assert_true(objs[0] != objs[1]);

    /* EXISTS before PUT_END: invisible */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u32(&b, 2);
    kvs_wbuf_bytes(&b, "a", 1);
    kvs_wbuf_bytes(&b, "b\0b", 3);
    tm_send(&C, KVS_MSG_EXISTS, &b, 6);
    r = tm_next(&C);
    assert_int_equal(r.h.body_len, 5);
    assert_int_equal(r.body[4], 0);

    /* PUT_END: a ok, b abandoned, wrong obj id */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id);
    kvs_wbuf_u32(&b, 3);
    kvs_wbuf_bytes(&b, "a", 1);
    kvs_wbuf_u64(&b, objs[0]);
    kvs_wbuf_u8(&b, 1);
    kvs_wbuf_bytes(&b, "b\0b", 3);
    kvs_wbuf_u64(&b, objs[1]);
    kvs_wbuf_u8(&b, 0);
    kvs_wbuf_bytes(&b, "zz", 2);
    kvs_wbuf_u64(&b, 99);
    kvs_wbuf_u8(&b, 1);
    tm_send(&C, KVS_MSG_PUT_END, &b, 7);
    r = tm_next(&C);
    kvs_rbuf_init(&rb, r.body, r.h.body_len);
    assert_int_equal(kvs_rbuf_u32(&rb), 3);
    assert_int_equal(kvs_rbuf_i32(&rb), KVS_OK);
    assert_int_equal(kvs_rbuf_i32(&rb), KVS_OK);
    assert_int_equal(kvs_rbuf_i32(&rb), KVS_ERR_NOT_FOUND);
    assert_int_equal(kvs_rbuf_finish(&rb), KVS_OK);

    /* "b" was given up with writes possibly in flight: the next HEARTBEAT
     * asks the owner (this client) to fence its segment to epoch 2 */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id);
    tm_send(&C, KVS_MSG_HEARTBEAT, &b, 40);
    r = tm_next(&C);
    assert_int_equal(r.h.status, KVS_OK);
    kvs_rbuf_init(&rb, r.body, r.h.body_len);
    assert_int_equal(kvs_rbuf_u32(&rb), 1);
    assert_int_equal(kvs_rbuf_u32(&rb), seg);
    assert_int_equal(kvs_rbuf_u64(&rb), 2);
    assert_int_equal(kvs_rbuf_finish(&rb), KVS_OK);
    /* FENCE above the asked epoch, of an unknown segment, then the right one */
    uint64_t fences[3][2] = {{seg, 3}, {seg + 1000, 2}, {seg, 2}};
    int fence_st[3] = {KVS_ERR_INVALID, KVS_ERR_NOT_FOUND, KVS_OK};
    for (int i = 0; i < 3; i++) {
        kvs_wbuf_reset(&b);
        kvs_wbuf_u64(&b, C.client_id);
        kvs_wbuf_u32(&b, (uint32_t)fences[i][0]);
        kvs_wbuf_u64(&b, fences[i][1]);
        tm_send(&C, KVS_MSG_FENCE, &b, 41 + (uint64_t)i);
        r = tm_next(&C);
        assert_int_equal(r.h.status, fence_st[i]);
    }
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id);
    tm_send(&C, KVS_MSG_HEARTBEAT, &b, 44);
    r = tm_next(&C);
    assert_int_equal(r.h.body_len, 4); /* no fence wanted any more */

    /* EXISTS over 9 keys: only index 0 ("a") and 8 ("a") set */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u32(&b, 9);
    for (int i = 0; i < 9; i++) kvs_wbuf_bytes(&b, (i == 0 || i == 8) ? "a" : "b\0b", (i == 0 || i == 8) ? 1 : 3);
    tm_send(&C, KVS_MSG_EXISTS, &b, 8);
    r = tm_next(&C);
    assert_int_equal(r.h.body_len, 4 + 2);
    assert_int_equal(r.body[4], 0x01);
    assert_int_equal(r.body[5], 0x01);

    /* GET a (hit) and b (miss) */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id);
    kvs_wbuf_u32(&b, 2);
    kvs_wbuf_bytes(&b, "a", 1);
    kvs_wbuf_bytes(&b, "b\0b", 3);
    tm_send(&C, KVS_MSG_GET, &b, 9);
    r = tm_next(&C);
    kvs_rbuf_init(&rb, r.body, r.h.body_len);
    assert_int_equal(kvs_rbuf_u32(&rb), 2);
    assert_int_equal(kvs_rbuf_i32(&rb), KVS_OK);
    assert_int_equal(kvs_rbuf_u64(&rb), 5000);
    assert_int_equal(kvs_rbuf_u32(&rb), seg);
    assert_int_equal(kvs_rbuf_u64(&rb), offs[0]);
    assert_int_equal(kvs_rbuf_u64(&rb), objs[0]);
    uint64_t lease = kvs_rbuf_u64(&rb);
    assert_true(lease != 0);
    assert_int_equal(kvs_rbuf_i32(&rb), KVS_ERR_NOT_FOUND);
    (void)kvs_rbuf_u64(&rb);
    (void)kvs_rbuf_u32(&rb);
    (void)kvs_rbuf_u64(&rb);
    (void)kvs_rbuf_u64(&rb);
    assert_int_equal(kvs_rbuf_u64(&rb), 0); /* no lease on a miss */
    assert_int_equal(kvs_rbuf_finish(&rb), KVS_OK);
    assert_int_equal(m->leases.count, 1);

    /* RELEASE */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id);
    kvs_wbuf_u32(&b, 2);
    kvs_wbuf_u64(&b, lease);
    kvs_wbuf_u64(&b, 777);
    tm_send(&C, KVS_MSG_RELEASE, &b, 10);
    r = tm_next(&C);
    assert_int_equal(r.h.status, KVS_OK);
    assert_int_equal(r.h.body_len, 0);
    assert_int_equal(m->leases.count, 0);

    /* RELEASE flagged NOREPLY (how clients send it): released, no answer */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id);
    kvs_wbuf_u32(&b, 1);
    kvs_wbuf_bytes(&b, "a", 1);
    tm_send(&C, KVS_MSG_GET, &b, 12);
    r = tm_next(&C);
    kvs_rbuf_init(&rb, r.body, r.h.body_len);
    assert_int_equal(kvs_rbuf_u32(&rb), 1);
    assert_int_equal(kvs_rbuf_i32(&rb), KVS_OK);
    (void)kvs_rbuf_u64(&rb); /* size */
    (void)kvs_rbuf_u32(&rb); /* segment */
    (void)kvs_rbuf_u64(&rb); /* offset */
    (void)kvs_rbuf_u64(&rb); /* object */
    lease = kvs_rbuf_u64(&rb);
    assert_int_equal(kvs_rbuf_finish(&rb), KVS_OK);
    assert_int_equal(m->leases.count, 1);
    assert_false(tm_pending(&C));
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id);
    kvs_wbuf_u32(&b, 1);
    kvs_wbuf_u64(&b, lease);
    assert_int_equal(tm_send_flags(&C, KVS_MSG_RELEASE, KVS_F_NOREPLY, &b, 13), KVS_OK);
    assert_int_equal(m->leases.count, 0);
    assert_false(tm_pending(&C)); /* nothing appended */

    /* SEGMENTS */
    tm_send(&C, KVS_MSG_SEGMENTS, NULL, 11);
    r = tm_next(&C);
    kvs_rbuf_init(&rb, r.body, r.h.body_len);
    assert_int_equal(kvs_rbuf_u32(&rb), 1);
    assert_int_equal(kvs_rbuf_u32(&rb), seg);
    assert_int_equal(kvs_rbuf_u64(&rb), 64ull << 20);
    assert_int_equal(kvs_rbuf_u64(&rb), 8192); /* 5000 bytes rounded */
    char s1[64], s2[64];
    uint8_t hid[16];
    kvs_rbuf_str(&rb, s1, sizeof s1);
    kvs_rbuf_str(&rb, s2, sizeof s2);
    kvs_rbuf_raw(&rb, hid, 16);
    assert_string_equal(s1, "kvshelf-test-shm");
    assert_string_equal(s2, "127.0.0.1:7777");
    assert_int_equal(hid[0], 1);
    assert_int_equal(kvs_rbuf_u64(&rb), C.client_id);
    assert_int_equal(kvs_rbuf_finish(&rb), KVS_OK);

    /* STATS */
    tm_send(&C, KVS_MSG_STATS, NULL, 12);
    r = tm_next(&C);
    kvs_rbuf_init(&rb, r.body, r.h.body_len);
    uint32_t jl;
    const uint8_t *j = kvs_rbuf_bytes(&rb, KVS_MAX_BODY, &jl);
    assert_non_null(j);
    char *js = strndup((const char *)j, jl);
    cJSON *doc = cJSON_Parse(js);
    assert_non_null(doc);
    assert_int_equal((int)cJSON_GetObjectItem(doc, "objects")->valuedouble, 1);
    assert_int_equal((uint64_t)cJSON_GetObjectItem(doc, "capacity")->valuedouble, 64ull << 20);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(doc, "segments")), 1);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(doc, "clients")), 1);
    cJSON *cnt = cJSON_GetObjectItem(doc, "counters");
    assert_int_equal((int)cJSON_GetObjectItem(cnt, "puts")->valuedouble, 1);
    assert_int_equal((int)cJSON_GetObjectItem(cnt, "hits")->valuedouble, 2); /* two GETs of "a" */
    assert_int_equal((int)cJSON_GetObjectItem(cnt, "misses")->valuedouble, 1);
    assert_non_null(cJSON_GetObjectItem(cnt, "bad_frames"));
    assert_non_null(cJSON_GetObjectItem(doc, "uptime_s"));
    cJSON *sg = cJSON_GetArrayItem(cJSON_GetObjectItem(doc, "segments"), 0);
    assert_string_equal(cJSON_GetObjectItem(sg, "shm_name")->valuestring, "kvshelf-test-shm");
    assert_string_equal(cJSON_GetObjectItem(sg, "hostname")->valuestring, "unit-test");
    cJSON_Delete(doc);
    free(js);

    /* REMOVE a (ok) and missing */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u32(&b, 2);
    kvs_wbuf_bytes(&b, "a", 1);
    kvs_wbuf_bytes(&b, "a", 1);
    tm_send(&C, KVS_MSG_REMOVE, &b, 13);
    r = tm_next(&C);
    kvs_rbuf_init(&rb, r.body, r.h.body_len);
    assert_int_equal(kvs_rbuf_u32(&rb), 2);
    assert_int_equal(kvs_rbuf_i32(&rb), KVS_OK);
    assert_int_equal(kvs_rbuf_i32(&rb), KVS_ERR_NOT_FOUND);

    /* UNMOUNT by a non-owner, then by the owner */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id + 1);
    kvs_wbuf_u32(&b, seg);
    tm_send(&C, KVS_MSG_UNMOUNT, &b, 14);
    assert_int_equal(tm_next(&C).h.status, KVS_ERR_INVALID);
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, C.client_id);
    kvs_wbuf_u32(&b, seg);
    tm_send(&C, KVS_MSG_UNMOUNT, &b, 15);
    assert_int_equal(tm_next(&C).h.status, KVS_OK);
    assert_int_equal(m->segs.n, 0);

    /* SHUTDOWN from a local same-uid connection */
    tm_send(&C, KVS_MSG_SHUTDOWN, NULL, 16);
    assert_int_equal(tm_next(&C).h.status, KVS_OK);
    assert_true(kvs_master_shutdown_requested(m));
    assert_false(tm_pending(&C));
    assert_false(C.closed);

    kvs_wbuf_free(&b);
    tm_close(&C);
    kvs_master_free(m);
}

static void allow_4242(kvs_master_opts *o)
{
    o->allow_uids[0] = 4242;
    o->n_allow_uids = 1;
}

static void pool_secret_4242(kvs_master_opts *o)
{
    allow_4242(o);
    o->secret_is_pool = 1;
}

/* HELLO claiming uid 0, whatever the peer is. */
static int hello_claiming_root(tm_conn *c, const char *secret)
{
    uint8_t hid[16] = {1}, auth[32];
    kvs_auth_compute(secret, c->nonce, auth);
    kvs_wbuf b;
    kvs_wbuf_init(&b);
    kvs_wbuf_u32(&b, KVS_PROTO_VERSION);
    kvs_wbuf_u32(&b, KVS_ROLE_TOOL);
    kvs_wbuf_u64(&b, 1);
    kvs_wbuf_u32(&b, 0);
    kvs_wbuf_str(&b, "claims-root");
    kvs_wbuf_put(&b, hid, 16);
    kvs_wbuf_put(&b, auth, 32);
    tm_send(c, KVS_MSG_HELLO, &b, 1);
    kvs_wbuf_free(&b);
    return tm_next(c).h.status;
}

static void test_shutdown_refused_remote(void **st)
{
    (void)st;
    /* no secret: a TCP peer is refused outright, even claiming uid 0 */
    kvs_master *m = tm_master(NULL, allow_4242);
    tm_open(&C, m, 0);
    assert_int_equal(hello_claiming_root(&C, NULL), KVS_ERR_AUTH);
    assert_true(C.closed);
    tm_close(&C);
    /* a unix peer of a uid not allowed: refused */
    tm_open_peer(&C, m, 1, 4243);
    assert_int_equal(hello_claiming_root(&C, NULL), KVS_ERR_AUTH);
    assert_true(C.closed);
    tm_close(&C);
    /* an allowed uid may connect, but not SHUTDOWN (not the master's uid) */
    tm_open_peer(&C, m, 1, 4242);
    assert_int_equal(hello_claiming_root(&C, NULL), KVS_OK);
    tm_send(&C, KVS_MSG_SHUTDOWN, NULL, 2);
    assert_int_equal(tm_next(&C).h.status, KVS_ERR_AUTH);
    assert_false(C.closed);
    assert_false(kvs_master_shutdown_requested(m));
    tm_close(&C);
    kvs_master_free(m);

    /* the pool secret: TCP needs it; allowed unix uids do not */
    m = tm_master("pool-s", pool_secret_4242);
    tm_open(&C, m, 0);
    assert_int_equal(hello_claiming_root(&C, NULL), KVS_ERR_AUTH);
    tm_close(&C);
    tm_open_peer(&C, m, 1, 4242);
    assert_int_equal(hello_claiming_root(&C, NULL), KVS_OK);
    tm_send(&C, KVS_MSG_SHUTDOWN, NULL, 2);
    assert_int_equal(tm_next(&C).h.status, KVS_ERR_AUTH);
    tm_close(&C);
    tm_open_peer(&C, m, 1, 4243);
    assert_int_equal(hello_claiming_root(&C, "pool-s"), KVS_OK); /* the secret: any uid */
    tm_close(&C);
    assert_false(kvs_master_shutdown_requested(m));
    tm_open(&C, m, 0);
    assert_int_equal(hello_claiming_root(&C, "pool-s"), KVS_OK);
    tm_send(&C, KVS_MSG_SHUTDOWN, NULL, 2); /* proved the secret */
    assert_int_equal(tm_next(&C).h.status, KVS_OK);
    assert_true(kvs_master_shutdown_requested(m));
    tm_close(&C);
    kvs_master_free(m);

    /* a configured secret: needed on unix sockets too, whatever the uid */
    m = tm_master("s3cret", NULL);
    tm_open(&C, m, 1);
    assert_int_equal(hello_claiming_root(&C, NULL), KVS_ERR_AUTH);
    tm_close(&C);
    tm_open(&C, m, 1);
    assert_int_equal(hello_claiming_root(&C, "s3cret"), KVS_OK);
    tm_close(&C);
    kvs_master_free(m);
}

static void test_auth(void **st)
{
    (void)st;
    kvs_master *m = tm_master("s3cret", NULL);
    /* wrong secret: AUTH and close */
    tm_open(&C, m, 0);
    assert_int_equal(C.out.data[KVS_FRAME_HDR], 1); /* secret-required flag */
    assert_int_equal(tm_hello(&C, "wrong"), KVS_ERR_AUTH);
    assert_true(C.closed);
    tm_close(&C);
    /* request before HELLO: AUTH and close */
    tm_open(&C, m, 1);
    assert_int_equal(tm_send(&C, KVS_MSG_STATS, NULL, 5), KVS_ERR_AUTH);
    assert_int_equal(tm_next(&C).h.status, KVS_ERR_AUTH);
    tm_close(&C);
    /* right secret; a remote client may SHUTDOWN with the secret */
    tm_open(&C, m, 0);
    assert_int_equal(tm_hello(&C, "s3cret"), KVS_OK);
    tm_send(&C, KVS_MSG_SHUTDOWN, NULL, 2);
    assert_int_equal(tm_next(&C).h.status, KVS_OK);
    tm_close(&C);
    /* bad version */
    tm_open(&C, m, 1);
    kvs_wbuf b;
    kvs_wbuf_init(&b);
    tm_hello_body(&b, "s3cret", C.nonce, 99);
    assert_int_equal(tm_send(&C, KVS_MSG_HELLO, &b, 1), KVS_ERR_UNSUPPORTED);
    assert_int_equal(tm_next(&C).h.status, KVS_ERR_UNSUPPORTED);
    kvs_wbuf_free(&b);
    tm_close(&C);
    /* a big frame before HELLO is refused from its header alone */
    tm_open(&C, m, 1);
    kvs_frame_hdr h = {KVS_MAGIC, KVS_MSG_HELLO, 0, KVS_PREAUTH_MAX_BODY + 1, 0, 1};
    uint8_t hb[KVS_FRAME_HDR];
    kvs_frame_hdr_encode(&h, hb);
    assert_int_equal(tm_feed_raw(&C, hb, sizeof hb, NULL), KVS_ERR_PROTO);
    tm_close(&C);
    kvs_master_counters k;
    kvs_master_get_counters(m, &k);
    assert_int_equal(k.auth_failures, 2);
    assert_int_equal(k.bad_frames, 1);
    kvs_master_free(m);
}

static void test_pipelining_and_partial(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    tm_open(&C, m, 1);
    assert_int_equal(tm_hello(&C, NULL), KVS_OK);
    /* 50 HEARTBEATs in one buffer, the last one cut in half */
    kvs_wbuf f;
    kvs_wbuf_init(&f);
    for (int i = 0; i < 50; i++) {
        size_t s = kvs_wbuf_begin_frame(&f, KVS_MSG_HEARTBEAT, 0, 0, 100 + i);
        kvs_wbuf_u64(&f, C.client_id);
        kvs_wbuf_end_frame(&f, s);
    }
    size_t cut = f.len - 4, used = 0;
    assert_int_equal(tm_feed_raw(&C, f.data, cut, &used), KVS_OK);
    assert_int_equal(used, 49 * (KVS_FRAME_HDR + 8));
    assert_int_equal(kvs_master_frame_need(f.data + used, cut - used), KVS_FRAME_HDR + 8);
    for (int i = 0; i < 49; i++) assert_int_equal(tm_next(&C).h.req_id, 100 + i);
    assert_false(tm_pending(&C));
    assert_int_equal(tm_feed_raw(&C, f.data + used, f.len - used, &used), KVS_OK);
    assert_int_equal(tm_next(&C).h.req_id, 149);
    kvs_wbuf_free(&f);
    tm_close(&C);
    kvs_master_free(m);
}

/* Each malformed input closes the connection and is counted. */
static void bad_input(kvs_master *m, const uint8_t *p, size_t n)
{
    tm_open(&C, m, 1);
    assert_int_equal(tm_hello(&C, NULL), KVS_OK);
    assert_int_equal(tm_feed_raw(&C, p, n, NULL), KVS_ERR_PROTO);
    assert_false(tm_pending(&C));
    tm_close(&C);
}

static void frame(kvs_wbuf *f, uint16_t type, const kvs_wbuf *body)
{
    kvs_wbuf_reset(f);
    size_t s = kvs_wbuf_begin_frame(f, type, 0, 0, 1);
    if (body->len) kvs_wbuf_put(f, body->data, body->len);
    kvs_wbuf_end_frame(f, s);
}

static void test_malformed(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    kvs_wbuf f, b;
    kvs_wbuf_init(&f);
    kvs_wbuf_init(&b);
    uint64_t before = m->cnt.bad_frames;

    uint8_t junk[64];
    memset(junk, 0x41, sizeof junk); /* bad magic */
    bad_input(m, junk, sizeof junk);

    kvs_frame_hdr h = {KVS_MAGIC, KVS_MSG_GET, 0, KVS_MAX_BODY + 1, 0, 1}; /* oversize */
    uint8_t hb[KVS_FRAME_HDR];
    kvs_frame_hdr_encode(&h, hb);
    bad_input(m, hb, sizeof hb);
    h.body_len = 0;
    h.type = 77; /* unknown type */
    kvs_frame_hdr_encode(&h, hb);
    bad_input(m, hb, sizeof hb);
    h.type = KVS_MSG_T_READ; /* a transfer message sent to the master */
    kvs_frame_hdr_encode(&h, hb);
    bad_input(m, hb, sizeof hb);
    h.type = KVS_MSG_STATS;
    h.flags = KVS_F_RESPONSE; /* a response sent as a request */
    kvs_frame_hdr_encode(&h, hb);
    bad_input(m, hb, sizeof hb);

    /* batch count over KVS_MAX_BATCH */
    kvs_wbuf_u32(&b, KVS_MAX_BATCH + 1);
    frame(&f, KVS_MSG_EXISTS, &b);
    bad_input(m, f.data, f.len);
    /* count larger than the body can hold */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u32(&b, 1000);
    kvs_wbuf_bytes(&b, "a", 1);
    frame(&f, KVS_MSG_REMOVE, &b);
    bad_input(m, f.data, f.len);
    /* key over KVS_KEY_MAX */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u32(&b, 1);
    uint8_t big[300] = {0};
    kvs_wbuf_bytes(&b, big, sizeof big);
    frame(&f, KVS_MSG_EXISTS, &b);
    bad_input(m, f.data, f.len);
    /* trailing bytes */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, 1);
    kvs_wbuf_u8(&b, 0);
    frame(&f, KVS_MSG_HEARTBEAT, &b);
    bad_input(m, f.data, f.len);
    /* truncated body */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u32(&b, 7);
    frame(&f, KVS_MSG_HEARTBEAT, &b);
    bad_input(m, f.data, f.len);
    /* RELEASE count mismatch */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u64(&b, 1);
    kvs_wbuf_u32(&b, 2);
    kvs_wbuf_u64(&b, 5);
    frame(&f, KVS_MSG_RELEASE, &b);
    bad_input(m, f.data, f.len);
    /* STATS with a body */
    kvs_wbuf_reset(&b);
    kvs_wbuf_u8(&b, 0);
    frame(&f, KVS_MSG_STATS, &b);
    bad_input(m, f.data, f.len);

    assert_int_equal(m->cnt.bad_frames - before, 12);
    /* the master still serves a fresh connection */
    tm_open(&C, m, 1);
    assert_int_equal(tm_hello(&C, NULL), KVS_OK);
    tm_close(&C);
    kvs_wbuf_free(&f);
    kvs_wbuf_free(&b);
    kvs_master_free(m);
}

static void test_metrics_text(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    uint64_t c = tm_client(m, 1);
    tm_mount(m, c, 1 << 20, 1);
    assert_int_equal(tm_put(m, c, "k", 100), KVS_OK);
    size_t len = 0;
    char *t = kvs_master_metrics_text(m, 3, &len);
    assert_non_null(t);
    assert_int_equal(strlen(t), len);
    const char *want[] = {"# TYPE kvshelf_capacity_bytes gauge\nkvshelf_capacity_bytes 1048576\n",
                          "kvshelf_used_bytes 4096\n", "kvshelf_objects 1\n",
                          "kvshelf_segments 1\n", "kvshelf_clients 1\n",
                          "# TYPE kvshelf_puts_total counter\nkvshelf_puts_total 1\n",
                          "kvshelf_evictions_total 0\n", "kvshelf_bad_frames_total 0\n",
                          "kvshelf_metadata_keys 3\n", "# HELP kvshelf_auth_failures_total"};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        if (!strstr(t, want[i])) fail_msg("metrics lack '%s'", want[i]);
    }
    free(t);
    kvs_master_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_messages),
        cmocka_unit_test(test_shutdown_refused_remote),
        cmocka_unit_test(test_auth),
        cmocka_unit_test(test_pipelining_and_partial),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_metrics_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
