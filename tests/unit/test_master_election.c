/* Leader election through etcd (src/master/election.h) against a real etcd
 * started here (skipped when the etcd binary is not installed): exactly one
 * of two candidates leads; its serve deadline moves forward with its lease
 * renewals and stays within 80 % of the TTL; a leader that stops hands over
 * (its lease revoked: the other wins within a campaign period); a leader
 * that loses its lease behind its back (revoked in etcd, as if it expired)
 * steps down, and campaigns again only after its term was torn down. */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/etcd.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "master/election.h"
#include "test_etcd_util.h"

static int role(kvs_election *el)
{
    kvs_election_info i;
    kvs_election_get_info(el, &i);
    return i.role;
}

/* Waits up to ms for el to lead; 1 if it does. */
static int wait_role(kvs_election *el, int want, int ms)
{
    for (int t = 0; t < ms; t += 20) {
        if (role(el) == want) return 1;
        usleep(20000);
    }
    return role(el) == want;
}

static void test_election(void **state)
{
    (void)state;
    te_etcd t;
    te_etcd_start(&t, "/tmp/kvs-etcd-el-XXXXXX", "etcd is not installed: skipping\n");
    char ep[64];
    snprintf(ep, sizeof ep, "127.0.0.1:%d", t.client_port);
    kvs_etcd *e = NULL;
    assert_int_equal(kvs_etcd_new(ep, 1000, &e), KVS_OK);
    te_etcd_wait(e, "el/leader");
    char *v = NULL;

    char err[256];
    kvs_election *a = NULL, *b = NULL;
    kvs_election_opts oa = {ep, "el", 2, "127.0.0.1:1"}, ob = {ep, "el", 2, "127.0.0.1:2"};
    kvs_election_opts bad = {ep, "el", 2, ""};
    assert_int_equal(kvs_election_start(&bad, &b, err, sizeof err), KVS_ERR_INVALID);
    assert_int_equal(kvs_election_start(&oa, &a, err, sizeof err), KVS_OK);
    volatile sig_atomic_t stop = 0;
    assert_int_equal(kvs_election_wait_leader(a, &stop), KVS_OK);
    assert_int_equal(kvs_election_start(&ob, &b, err, sizeof err), KVS_OK);
    usleep(800000);
    assert_int_equal(role(a), KVS_ROLE_LEADER);
    assert_int_equal(role(b), KVS_ROLE_STANDBY); /* exactly one leader */
    kvs_election_info ib;
    kvs_election_get_info(b, &ib);
    assert_string_equal(ib.leader, "127.0.0.1:1");
    size_t n = 0;
    int64_t lease = 0;
    assert_int_equal(kvs_etcd_get(e, "el/leader", &v, &n, &lease), KVS_OK);
    assert_string_equal(v, "127.0.0.1:1");
    free(v);
    kvs_etcd_kv *kvs = NULL;
    assert_int_equal(kvs_etcd_list(e, "el/members/", 0, &kvs, &n), KVS_OK);
    assert_int_equal(n, 2);
    kvs_etcd_kvs_free(kvs, n);

    /* the deadline follows the renewals and never exceeds 80 % of the TTL */
    const _Atomic uint64_t *until = kvs_election_serve_until(a);
    uint64_t u1 = atomic_load(until);
    assert_true(u1 > kvs_now_ms() && u1 <= kvs_now_ms() + 1600);
    usleep(1200000);
    uint64_t u2 = atomic_load(until);
    assert_true(u2 > u1 && u2 > kvs_now_ms() && u2 <= kvs_now_ms() + 1600);

    /* its lease gone behind its back (as if etcd expired it): a steps down,
     * serves no more, and b wins */
    assert_int_equal(kvs_etcd_lease_revoke(e, lease), KVS_OK);
    assert_true(wait_role(b, KVS_ROLE_LEADER, 3000));
    assert_true(wait_role(a, KVS_ROLE_STANDBY, 3000));
    assert_int_equal(atomic_load(until), 0);
    /* a campaigns again only once its old term was torn down */
    kvs_election_served(a);
    usleep(600000);
    assert_int_equal(role(a), KVS_ROLE_STANDBY); /* b holds the key */
    assert_int_equal(kvs_election_wait_leader(b, &stop), KVS_OK);

    /* b stops: it revokes its lease, a wins within a campaign period or two */
    uint64_t t0 = kvs_now_ms();
    kvs_election_stop(b);
    assert_int_equal(kvs_election_wait_leader(a, &stop), KVS_OK);
    assert_true(kvs_now_ms() - t0 < 1500);
    kvs_election_info ia;
    kvs_election_get_info(a, &ia);
    assert_int_equal(ia.terms, 2);
    assert_int_equal(ia.step_downs, 1);
    stop = 1;
    kvs_election_stop(a);
    assert_int_equal(kvs_etcd_get(e, "el/leader", &v, NULL, NULL), KVS_ERR_NOT_FOUND);
    kvs_etcd_free(e);

    te_etcd_stop(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_election),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
