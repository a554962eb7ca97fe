/* Lease and liveness tests: lease expiry, remove under lease, unmount
 * under lease, client expiry (segments and puts), put timeout, heartbeat,
 * a closed connection does not expire its client. */
#include "test_master_util.h"

#define MIB (1ull << 20)

static uint64_t seg_used(kvs_master *m, uint32_t seg) { return kvs_seg_used(kvs_segs_find(&m->segs, seg)); }

static void test_lease_expiry(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    uint64_t c = tm_client(m, 1);
    uint32_t seg = tm_mount(m, c, 8 * MIB, 1);
    assert_int_equal(tm_put(m, c, "k", MIB), KVS_OK);
    kvs_m_loc l1, l2;
    assert_int_equal(kvs_m_get(m, c, "k", 1, &l1), KVS_OK);
    kvs_master_set_time(m, T0 + 1000);
    assert_int_equal(kvs_m_get(m, c, "k", 1, &l2), KVS_OK);
    assert_true(l1.lease_id != l2.lease_id);
    kvs_obj *o = kvs_index_find(&m->ix, "k", 1);
    assert_int_equal(o->leases, 2);
    assert_int_equal(o->lease_expiry_ms, T0 + 1000 + 5000);
    kvs_master_set_time(m, T0 + 4999);
    kvs_master_tick(m);
    assert_int_equal(o->leases, 2);
    kvs_master_set_time(m, T0 + 5000);
    kvs_master_tick(m);
    assert_int_equal(o->leases, 1);
    assert_int_equal(kvs_m_release(m, l1.lease_id), KVS_ERR_NOT_FOUND); /* expired */
    assert_int_equal(kvs_m_release(m, l2.lease_id), KVS_OK);
    assert_int_equal(kvs_m_release(m, l2.lease_id), KVS_ERR_NOT_FOUND);
    assert_int_equal(o->leases, 0);
    assert_int_equal(m->cnt.expired_leases, 1);
    assert_int_equal(seg_used(m, seg), MIB);
    kvs_master_free(m);
}

static void test_remove_under_lease(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    uint64_t c = tm_client(m, 1);
    uint32_t seg = tm_mount(m, c, 8 * MIB, 1);
    assert_int_equal(tm_put(m, c, "k", MIB), KVS_OK);
    kvs_m_loc l;
    assert_int_equal(kvs_m_get(m, c, "k", 1, &l), KVS_OK);
    assert_int_equal(kvs_m_remove(m, "k", 1), KVS_OK);
    assert_false(tm_exists(m, "k"));                 /* unlinked at once */
    assert_int_equal(seg_used(m, seg), MIB);         /* space still held */
    assert_int_equal(tm_put(m, c, "k", 2 * MIB), KVS_OK); /* key reusable */
    assert_int_equal(seg_used(m, seg), 3 * MIB);
    assert_int_equal(kvs_m_remove(m, "k", 1), KVS_OK);
    assert_int_equal(seg_used(m, seg), MIB);
    assert_int_equal(kvs_m_release(m, l.lease_id), KVS_OK);
    assert_int_equal(seg_used(m, seg), 0);
    assert_int_equal(m->n_objs, 0);
    /* the same through lease expiry */
    assert_int_equal(tm_put(m, c, "j", MIB), KVS_OK);
    assert_int_equal(kvs_m_get(m, c, "j", 1, &l), KVS_OK);
    assert_int_equal(kvs_m_remove(m, "j", 1), KVS_OK);
    kvs_master_set_time(m, T0 + 6000);
    kvs_m_heartbeat(m, c);
    kvs_master_tick(m);
    assert_int_equal(seg_used(m, seg), 0);
    assert_int_equal(m->n_objs, 0);
    kvs_master_free(m);
}

static void test_unmount_under_lease(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    uint64_t c = tm_client(m, 1), r = tm_client(m, 2);
    uint32_t seg = tm_mount(m, c, 8 * MIB, 1);
    assert_int_equal(tm_put(m, c, "k", MIB), KVS_OK);
    assert_int_equal(tm_put(m, c, "k2", MIB), KVS_OK);
    kvs_m_loc l;
    assert_int_equal(kvs_m_get(m, r, "k", 1, &l), KVS_OK);
    assert_int_equal(kvs_m_unmount(m, r, seg), KVS_ERR_INVALID); /* not the owner */
    assert_int_equal(kvs_m_unmount(m, c, seg), KVS_OK);
    assert_int_equal(kvs_m_unmount(m, c, seg), KVS_ERR_NOT_FOUND);
    assert_false(tm_exists(m, "k"));
    assert_false(tm_exists(m, "k2"));
    assert_int_equal(m->n_objs, 1); /* the leased record waits for its lease */
    assert_int_equal(kvs_m_release(m, l.lease_id), KVS_OK);
    assert_int_equal(m->n_objs, 0);
    assert_int_equal(tm_put(m, c, "k", MIB), KVS_ERR_NO_SPACE); /* no segment left */
    kvs_master_free(m);
}

static void short_ttl(kvs_master_opts *o)
{
    o->client_ttl_ms = 1000;
    o->put_timeout_ms = 3000;
}

static void test_client_expiry(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, short_ttl);
    uint64_t owner = tm_client(m, 1), writer = tm_client(m, 2);
    tm_mount(m, owner, 8 * MIB, 1);
    uint32_t seg2 = tm_mount(m, writer, 8 * MIB, 2);
    assert_int_equal(tm_put(m, owner, "stored", MIB), KVS_OK);
    uint32_t seg;
    uint64_t off, obj;
    assert_int_equal(kvs_m_put_start(m, writer, "inflight", 8, MIB, &seg, &off, &obj, &tm_ep), KVS_OK);
    assert_int_equal(seg, seg2);
    /* owner keeps heartbeating, writer goes silent */
    kvs_master_set_time(m, T0 + 900);
    assert_int_equal(kvs_m_heartbeat(m, owner), KVS_OK);
    kvs_master_tick(m);
    assert_int_equal(m->clients.count, 2);
    kvs_master_set_time(m, T0 + 1001);
    kvs_master_tick(m);
    assert_int_equal(m->clients.count, 1);
    assert_int_equal(kvs_m_heartbeat(m, writer), KVS_ERR_NOT_FOUND);
    assert_int_equal(m->segs.n, 1);       /* its segment unmounted */
    assert_int_equal(m->cnt.revoked_puts, 1);
    assert_int_equal(kvs_m_put_end(m, writer, "inflight", 8, obj, 1), KVS_ERR_NOT_FOUND);
    assert_true(tm_exists(m, "stored"));
    /* owner goes silent too: its objects are dropped */
    kvs_master_set_time(m, T0 + 2000);
    kvs_master_tick(m);
    assert_false(tm_exists(m, "stored"));
    assert_int_equal(m->segs.n, 0);
    assert_int_equal(m->cnt.expired_clients, 2);
    assert_int_equal(m->n_objs, 0);
    kvs_master_free(m);
}

static void test_put_timeout(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, short_ttl);
    uint64_t c = tm_client(m, 1);
    uint32_t sg = tm_mount(m, c, 8 * MIB, 1);
    uint32_t seg;
    uint64_t off, o1, o2;
    assert_int_equal(kvs_m_put_start(m, c, "slow", 4, MIB, &seg, &off, &o1, &tm_ep), KVS_OK);
    kvs_master_set_time(m, T0 + 500);
    assert_int_equal(kvs_m_put_start(m, c, "slow2", 5, MIB, &seg, &off, &o2, &tm_ep), KVS_OK);
    assert_int_equal(kvs_m_put_start(m, c, "slow", 4, MIB, &seg, &off, &o2, &tm_ep), KVS_ERR_EXISTS);
    for (uint64_t t = 600; t <= 3000; t += 200) { /* heartbeats keep the client */
        kvs_master_set_time(m, T0 + t);
        kvs_m_heartbeat(m, c);
        kvs_master_tick(m);
    }
    assert_int_equal(m->cnt.revoked_puts, 1);
    assert_int_equal(kvs_m_put_end(m, c, "slow", 4, o1, 1), KVS_ERR_NOT_FOUND);
    /* the revoked put's space waits for its owner's fence (a write may still land) */
    assert_int_equal(seg_used(m, sg), 2 * MIB);
    kvs_m_fence_req want[4];
    assert_int_equal(kvs_m_fences_wanted(m, c, want, 4), 1);
    assert_int_equal(want[0].segment_id, sg);
    assert_int_equal(want[0].epoch, 2);
    assert_int_equal(kvs_m_fence(m, c, sg, 2), KVS_OK);
    assert_int_equal(seg_used(m, sg), MIB);
    kvs_master_set_time(m, T0 + 3500);
    kvs_master_tick(m);
    assert_int_equal(m->cnt.revoked_puts, 2);
    /* slow2's reservation (epoch 1) is already below the fence: freed at once */
    assert_int_equal(seg_used(m, sg), 0);
    assert_int_equal(m->clients.count, 1);
    kvs_master_free(m);
}

/* Given-up puts and write epochs (proto.h "Write epochs"): space whose
 * writes may still be in flight is never handed out again before the owner
 * fenced the segment; a reservation older than a fence is never published;
 * a put given up with nothing in flight frees its space at once. */
static void test_fenced_reuse(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    uint64_t owner = tm_client(m, 1), writer = tm_client(m, 1);
    uint32_t sg = tm_mount(m, owner, 8 * MIB, 1);
    uint32_t seg;
    uint64_t offa, offb, offc, offd, offe, a, b, c, d, e, ep;
    kvs_m_fence_req want[4];
    /* A: given up with writes in flight (ok=0) */
    assert_int_equal(kvs_m_put_start(m, writer, "A", 1, MIB, &seg, &offa, &a, &ep), KVS_OK);
    assert_int_equal(ep, 1);
    assert_int_equal(kvs_m_put_end(m, writer, "A", 1, a, KVS_PUT_ABANDON), KVS_OK);
    assert_false(tm_exists(m, "A"));
    assert_int_equal(seg_used(m, sg), MIB); /* held */
    assert_int_equal(m->cnt.fenced_puts, 1);
    assert_int_equal(kvs_m_fences_wanted(m, owner, want, 4), 1);
    assert_int_equal(want[0].epoch, 2);
    assert_int_equal(kvs_m_fences_wanted(m, writer, want, 4), 0); /* only the owner fences */
    /* the key can be written again at once, elsewhere, under the new epoch */
    assert_int_equal(kvs_m_put_start(m, writer, "A", 1, MIB, &seg, &offb, &b, &ep), KVS_OK);
    assert_int_equal(ep, 2);
    assert_true(offb != offa);
    assert_int_equal(kvs_m_put_end(m, writer, "A", 1, b, KVS_PUT_PUBLISH), KVS_OK);
    /* C and D reserved under epoch 2; D given up (-> 3); C, all of whose
     * writes landed before any fence, is published; H (epoch 2 too) is
     * committed only after the owner fenced past it: refused */
    assert_int_equal(kvs_m_put_start(m, writer, "C", 1, MIB, &seg, &offc, &c, &ep), KVS_OK);
    assert_int_equal(kvs_m_put_start(m, writer, "H", 1, MIB, &seg, &offe, &e, &ep), KVS_OK);
    assert_int_equal(kvs_m_put_start(m, writer, "D", 1, MIB, &seg, &offd, &d, &ep), KVS_OK);
    assert_int_equal(kvs_m_put_end(m, writer, "D", 1, d, KVS_PUT_ABANDON), KVS_OK);
    /* the epoch handed out stays one step past the last confirmed fence (1):
     * D waits for the fence after next (3), asked once 2 is confirmed */
    assert_int_equal(kvs_m_fences_wanted(m, owner, want, 4), 1);
    assert_int_equal(want[0].epoch, 2);
    assert_int_equal(kvs_m_put_end(m, writer, "C", 1, c, KVS_PUT_PUBLISH), KVS_OK);
    assert_true(tm_exists(m, "C"));
    assert_int_equal(kvs_m_remove(m, "C", 1), KVS_OK);
    uint64_t offh = offe, h = e;
    assert_int_equal(seg_used(m, sg), 4 * MIB); /* A-old, A, H, D */
    /* held space is never handed out again before the fence */
    for (int i = 0; i < 4; i++) {
        char k[8];
        snprintf(k, sizeof k, "F%d", i);
        assert_int_equal(kvs_m_put_start(m, writer, k, (uint32_t)strlen(k), MIB, &seg, &offe, &e, &ep),
                         KVS_OK);
        assert_true(offe != offa && offe != offh && offe != offd);
        assert_int_equal(kvs_m_put_end(m, writer, k, (uint32_t)strlen(k), e, KVS_PUT_ABANDON_CLEAN),
                         KVS_OK);
    }
    /* a fence below the wanted epoch frees what it covers: A-old (1) */
    assert_int_equal(kvs_m_fence(m, owner, sg, 2), KVS_OK);
    assert_int_equal(seg_used(m, sg), 3 * MIB);
    assert_int_equal(kvs_m_fence(m, writer, sg, 3), KVS_ERR_INVALID); /* not the owner */
    assert_int_equal(kvs_m_fence(m, owner, sg, 4), KVS_ERR_INVALID);  /* never asked */
    assert_int_equal(kvs_m_fences_wanted(m, owner, want, 4), 1);
    assert_int_equal(want[0].epoch, 3); /* D, given up under 2 */
    assert_int_equal(kvs_m_fence(m, owner, sg, 3), KVS_OK); /* D */
    assert_int_equal(kvs_m_put_end(m, writer, "H", 1, h, KVS_PUT_PUBLISH), KVS_ERR_UNAVAILABLE);
    assert_false(tm_exists(m, "H"));
    assert_int_equal(seg_used(m, sg), MIB); /* H was below the fence: freed at once */
    assert_int_equal(kvs_m_fences_wanted(m, owner, want, 4), 0);
    assert_int_equal(m->cnt.fences, 2);
    /* given up with nothing in flight (ok=2): freed at once, no fence */
    assert_int_equal(kvs_m_put_start(m, writer, "E", 1, MIB, &seg, &offe, &e, &ep), KVS_OK);
    assert_int_equal(ep, 3);
    assert_int_equal(kvs_m_put_end(m, writer, "E", 1, e, KVS_PUT_ABANDON_CLEAN), KVS_OK);
    assert_int_equal(seg_used(m, sg), MIB);
    assert_int_equal(kvs_m_fences_wanted(m, owner, want, 4), 0);
    assert_int_equal(kvs_m_put_end(m, writer, "E", 1, e, 3), KVS_ERR_INVALID); /* bad ok */
    /* the owner unmounts: held space goes with the segment */
    assert_int_equal(kvs_m_put_start(m, writer, "G", 1, MIB, &seg, &offe, &e, &ep), KVS_OK);
    assert_int_equal(kvs_m_put_end(m, writer, "G", 1, e, KVS_PUT_ABANDON), KVS_OK);
    assert_int_equal(kvs_m_unmount(m, owner, sg), KVS_OK);
    assert_int_equal(m->n_objs, 0);
    /* a MOUNT without an epoch is refused */
    uint8_t hid[16] = {1};
    assert_int_equal(kvs_m_mount(m, owner, 4 * MIB, "shm-x", "127.0.0.1:1", hid, 0, &seg),
                     KVS_ERR_INVALID);
    kvs_master_free(m);
}

static void test_closed_connection_keeps_client(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, short_ttl);
    tm_conn c;
    tm_open(&c, m, 1);
    assert_int_equal(tm_hello(&c, NULL), KVS_OK);
    uint64_t id = c.client_id;
    tm_close(&c); /* connection gone: nothing happens until the TTL */
    kvs_master_set_time(m, T0 + 999);
    kvs_master_tick(m);
    assert_non_null(kvs_clients_find(&m->clients, id));
    /* any request on a connection refreshes its client */
    tm_open(&c, m, 1);
    assert_int_equal(tm_hello(&c, NULL), KVS_OK);
    kvs_master_set_time(m, T0 + 1500);
    tm_send(&c, KVS_MSG_SEGMENTS, NULL, 2);
    (void)tm_next(&c);
    kvs_master_set_time(m, T0 + 2400);
    kvs_master_tick(m);
    assert_null(kvs_clients_find(&m->clients, id));
    assert_non_null(kvs_clients_find(&m->clients, c.client_id));
    tm_close(&c);
    kvs_master_free(m);
}

/* A client that reconnects mounts the same memory again before its old
 * registration expired: the stale segment and its objects are dropped, so
 * two allocators never hand out the same bytes. */
static void test_remount_same_memory(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL);
    uint8_t hid[16] = {7};
    uint64_t c1 = tm_client(m, 7), other = tm_client(m, 8);
    uint32_t s1 = 0, s2 = 0, s3 = 0;
    assert_int_equal(kvs_m_mount(m, c1, 8 << 20, "kvshelf-0-1-0", "127.0.0.1:1", hid, 1, &s1),
                     KVS_OK);
    assert_int_equal(tm_put(m, c1, "old", 4096), KVS_OK);
    assert_true(tm_exists(m, "old"));
    /* same name on another host is other memory: kept */
    uint8_t hid8[16] = {8};
    assert_int_equal(kvs_m_mount(m, other, 8 << 20, "kvshelf-0-1-0", "127.0.0.1:2", hid8, 1, &s3),
                     KVS_OK);
    uint64_t c2 = tm_client(m, 7); /* the same process after a reconnect */
    assert_int_equal(kvs_m_mount(m, c2, 8 << 20, "kvshelf-0-1-0", "127.0.0.1:1", hid, 1, &s2),
                     KVS_OK);
    assert_int_not_equal(s1, s2);
    assert_false(tm_exists(m, "old"));
    assert_null(kvs_segs_find(&m->segs, s1));
    assert_non_null(kvs_segs_find(&m->segs, s2));
    assert_non_null(kvs_segs_find(&m->segs, s3));
    kvs_master_free(m);
}

/* Read leases outlive a registration: memory mounted again takes no
 * placements until the leases granted on its earlier registration ran out
 * (exactly, when this master knew it; a whole lease when it did not), so a
 * reader still inside its lease never sees its bytes overwritten. A fresh
 * segment (epoch 1) takes placements at once. */
static void test_remount_waits_for_leases(void **st)
{
    (void)st;
    kvs_master *m = tm_master(NULL, NULL); /* lease_ms 5000 */
    uint8_t hid[16] = {7};
    uint64_t c1 = tm_client(m, 7), reader = tm_client(m, 9);
    uint32_t s1 = 0, s2 = 0, s3 = 0, seg;
    uint64_t off, obj, ep;
    assert_int_equal(kvs_m_mount(m, c1, 8 << 20, "mem-a", "127.0.0.1:1", hid, 1, &s1), KVS_OK);
    assert_int_equal(tm_put(m, c1, "k", 4096), KVS_OK);
    kvs_m_loc loc;
    kvs_master_set_time(m, T0 + 1000);
    assert_int_equal(kvs_m_get(m, reader, "k", 1, &loc), KVS_OK); /* lease to T0+6000 */
    /* the owner reconnects at T0+2000 and mounts the same memory (fenced to 3) */
    kvs_master_set_time(m, T0 + 2000);
    uint64_t c2 = tm_client(m, 7);
    assert_int_equal(kvs_m_mount(m, c2, 8 << 20, "mem-a", "127.0.0.1:1", hid, 3, &s2), KVS_OK);
    assert_int_equal(kvs_m_put_start(m, c2, "n", 1, 4096, &seg, &off, &obj, &ep), KVS_ERR_NO_SPACE);
    kvs_master_set_time(m, T0 + 5999);
    assert_int_equal(kvs_m_put_start(m, c2, "n", 1, 4096, &seg, &off, &obj, &ep), KVS_ERR_NO_SPACE);
    kvs_master_set_time(m, T0 + 6000);
    assert_int_equal(kvs_m_put_start(m, c2, "n", 1, 4096, &seg, &off, &obj, &ep), KVS_OK);
    assert_int_equal(seg, s2);
    assert_int_equal(ep, 3);
    /* mounted again with no lease ever granted on it: placements at once */
    uint64_t c3 = tm_client(m, 7);
    assert_int_equal(kvs_m_mount(m, c3, 8 << 20, "mem-a", "127.0.0.1:1", hid, 5, &s3), KVS_OK);
    assert_int_equal(kvs_m_put_start(m, c3, "p", 1, 4096, &seg, &off, &obj, &ep), KVS_OK);
    assert_int_equal(seg, s3);
    /* memory this master never saw, mounted before (epoch > 1: a master
     * before a restart): one whole lease */
    uint8_t hid2[16] = {2};
    uint64_t c4 = tm_client(m, 2);
    assert_int_equal(kvs_m_mount(m, c4, 8 << 20, "mem-b", "127.0.0.1:2", hid2, 7, &s1), KVS_OK);
    assert_int_equal(kvs_m_unmount(m, c3, s3), KVS_OK);
    assert_int_equal(kvs_m_put_start(m, c4, "q", 1, 4096, &seg, &off, &obj, &ep), KVS_ERR_NO_SPACE);
    kvs_master_set_time(m, T0 + 6000 + 5000);
    assert_int_equal(kvs_m_put_start(m, c4, "q", 1, 4096, &seg, &off, &obj, &ep), KVS_OK);
    assert_int_equal(seg, s1);
    /* a fresh segment: at once */
    uint64_t c5 = tm_client(m, 3);
    uint8_t hid3[16] = {3};
    assert_int_equal(kvs_m_unmount(m, c4, s1), KVS_OK);
    assert_int_equal(kvs_m_mount(m, c5, 8 << 20, "mem-c", "127.0.0.1:3", hid3, 1, &s1), KVS_OK);
    assert_int_equal(kvs_m_put_start(m, c5, "r", 1, 4096, &seg, &off, &obj, &ep), KVS_OK);
    /* its registration ends (unmount, or the owner expired) and the memory
     * comes back: this master remembers it, so it waits exactly for the
     * leases granted on it -- none here: at once; one granted: until it ends */
    assert_int_equal(kvs_m_put_end(m, c5, "r", 1, obj, KVS_PUT_PUBLISH), KVS_OK);
    assert_int_equal(kvs_m_unmount(m, c5, s1), KVS_OK);
    assert_int_equal(kvs_m_mount(m, c5, 8 << 20, "mem-c", "127.0.0.1:3", hid3, 3, &s1), KVS_OK);
    assert_int_equal(kvs_m_put_start(m, c5, "r", 1, 4096, &seg, &off, &obj, &ep), KVS_OK);
    assert_int_equal(kvs_m_put_end(m, c5, "r", 1, obj, KVS_PUT_PUBLISH), KVS_OK);
    uint64_t t = kvs_master_now(m);
    assert_int_equal(kvs_m_get(m, reader, "r", 1, &loc), KVS_OK);
    assert_int_equal(kvs_m_unmount(m, c5, s1), KVS_OK);
    kvs_master_set_time(m, t + 100);
    assert_int_equal(kvs_m_mount(m, c5, 8 << 20, "mem-c", "127.0.0.1:3", hid3, 5, &s1), KVS_OK);
    assert_int_equal(kvs_m_put_start(m, c5, "s", 1, 4096, &seg, &off, &obj, &ep), KVS_ERR_NO_SPACE);
    kvs_master_set_time(m, t + 5000);
    assert_int_equal(kvs_m_put_start(m, c5, "s", 1, 4096, &seg, &off, &obj, &ep), KVS_OK);
    kvs_master_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lease_expiry),
        cmocka_unit_test(test_remove_under_lease),
        cmocka_unit_test(test_unmount_under_lease),
        cmocka_unit_test(test_client_expiry),
        cmocka_unit_test(test_put_timeout),
        cmocka_unit_test(test_fenced_reuse),
        cmocka_unit_test(test_closed_connection_keeps_client),
        cmocka_unit_test(test_remount_same_memory),
        cmocka_unit_test(test_remount_waits_for_leases),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
