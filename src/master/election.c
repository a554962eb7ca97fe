/* Leader election through etcd: see election.h. */
#include "master/election.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/etcd.h"
#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"

struct kvs_election {
    kvs_etcd *etcd;
    char prefix[256];
    char leader_key[300];
    char reign_key[300];
    char member_key[600];
    char advertise[256];
    uint32_t ttl_s;
    uint64_t period_ms;   /* lease renewal */
    uint64_t poll_ms;     /* campaign retry */
    pthread_t th;
    int started;

    pthread_mutex_t mu;   /* guards the fields below */
    pthread_cond_t cv;
    int stop;
    int serving;          /* the caller serves a term (between wait_leader and served) */
    int leader;           /* this process holds the leader key */
    int64_t lease_id;
    uint64_t lease_ok_ms; /* when the last successful grant/renewal was sent */
    kvs_election_info info;

    _Atomic uint64_t until_ms; /* serve deadline (0 = may not) */
};

/* 80 % of the TTL after the last renewal was sent. Caller holds mu. */
static uint64_t deadline_locked(const kvs_election *el)
{
    return el->lease_ok_ms + (uint64_t)el->ttl_s * 800u;
}

/* Gives leadership up: no more serving, the lease revoked (its keys go
 * with it, so a standby wins at once). Called without mu. */
static void step_down(kvs_election *el, const char *why)
{
    pthread_mutex_lock(&el->mu);
    int was = el->leader;
    el->leader = 0;
    atomic_store(&el->until_ms, 0);
    int64_t id = el->lease_id;
    el->lease_id = 0;
    el->info.role = KVS_ROLE_STANDBY;
    el->info.lease_id = 0;
    if (was) el->info.step_downs++;
    pthread_cond_broadcast(&el->cv);
    pthread_mutex_unlock(&el->mu);
    if (was) KVS_LOGW("election: stepping down as leader: %s", why);
    if (id) kvs_etcd_lease_revoke(el->etcd, id); /* best effort */
}

/* Records a new reign in etcd (`<prefix>/reign`, no lease: it outlives
 * every master): *floor gets the one recorded before (0: none), *reign this
 * term's, above it and at least the wall clock. Nothing may be served
 * before it is recorded: the next leader refuses directories older than
 * it (master.h, kvs_master_set_reign). */
static int reign_claim(kvs_election *el, uint64_t *floor, uint64_t *reign)
{
    char *v = NULL;
    *floor = 0;
    int rc = kvs_etcd_get(el->etcd, el->reign_key, &v, NULL, NULL);
    if (rc == KVS_OK) {
        char *end = NULL;
        unsigned long long f = strtoull(v, &end, 10);
        if (end == v || *end) {
            KVS_LOGW("election: %s holds '%.40s', not a reign number: taken as 0", el->reign_key,
                     v);
            f = 0;
        }
        *floor = f;
    } else if (rc != KVS_ERR_NOT_FOUND) {
        free(v);
        return rc;
    }
    free(v);
    *reign = KVS_MAX(kvs_wall_ms(), *floor + 1);
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%llu", (unsigned long long)*reign);
    return kvs_etcd_put(el->etcd, el->reign_key, buf, (size_t)n, 0);
}

static void *el_main(void *p)
{
    kvs_election *el = p;
    uint64_t next_renew = 0;
    int64_t member_lease = 0; /* the lease the member key was stored under */
    pthread_mutex_lock(&el->mu);
    while (!el->stop) {
        int64_t id = el->lease_id;
        int leader = el->leader, serving = el->serving;
        pthread_mutex_unlock(&el->mu);
        uint64_t now = kvs_now_ms();
        int ok = 1;
        if (!id) {
            int64_t nid = 0;
            int rc = kvs_etcd_lease_grant(el->etcd, el->ttl_s, &nid);
            if (rc == KVS_OK) {
                pthread_mutex_lock(&el->mu);
                el->lease_id = nid;
                el->lease_ok_ms = now;
                el->info.lease_id = nid;
                pthread_mutex_unlock(&el->mu);
                id = nid;
                next_renew = now + el->period_ms;
            } else {
                ok = 0;
                KVS_LOGD("election: lease grant: %s", kvs_strerror(rc));
            }
        } else if (now >= next_renew) {
            int64_t ttl = 0;
            int rc = kvs_etcd_lease_keepalive(el->etcd, id, &ttl);
            next_renew = now + el->period_ms;
            if (rc == KVS_OK) {
                pthread_mutex_lock(&el->mu);
                el->lease_ok_ms = now;
                if (el->leader) atomic_store(&el->until_ms, deadline_locked(el));
                pthread_mutex_unlock(&el->mu);
            } else if (rc == KVS_ERR_NOT_FOUND) {
                step_down(el, "the etcd lease expired");
                pthread_mutex_lock(&el->mu);
                el->lease_id = 0; /* a new one next round */
                el->info.lease_id = 0;
                pthread_mutex_unlock(&el->mu);
                id = 0;
                leader = 0;
            } else {
                ok = 0;
                KVS_LOGD("election: lease renewal: %s", kvs_strerror(rc));
            }
        }
        if (id && member_lease != id && /* for `kvshelf status`: who stands by */
            kvs_etcd_put(el->etcd, el->member_key, el->advertise, strlen(el->advertise), id) ==
                KVS_OK)
            member_lease = id;
        if (leader && id) { /* still named by the leader key? */
            char *v = NULL;
            int64_t lease = 0;
            int rc = kvs_etcd_get(el->etcd, el->leader_key, &v, NULL, &lease);
            if (rc == KVS_OK && (strcmp(v, el->advertise) != 0 || lease != id)) {
                free(v);
                v = NULL;
                step_down(el, "the leader key names another master");
                leader = 0;
            } else if (rc == KVS_ERR_NOT_FOUND) {
                step_down(el, "the leader key is gone");
                leader = 0;
            } else if (rc != KVS_OK) {
                ok = 0;
            }
            free(v);
        }
        pthread_mutex_lock(&el->mu);
        if (el->leader && kvs_now_ms() >= atomic_load(&el->until_ms)) {
            pthread_mutex_unlock(&el->mu);
            step_down(el, "no lease renewal from etcd in time");
            pthread_mutex_lock(&el->mu);
            leader = 0;
        }
        serving = el->serving;
        id = el->lease_id;
        pthread_mutex_unlock(&el->mu);
        if (!leader && !serving && id) { /* campaign */
            int rc = kvs_etcd_create(el->etcd, el->leader_key, el->advertise,
                                     strlen(el->advertise), id);
            char *v = NULL;
            int64_t klease = 0;
            if (rc == KVS_ERR_EXISTS &&
                kvs_etcd_get(el->etcd, el->leader_key, &v, NULL, &klease) == KVS_OK) {
                /* ours already: a transaction that succeeded although its reply was
                 * lost (this lease is never attached to a key of an earlier term:
                 * stepping down revokes it) */
                if (klease == id && !strcmp(v, el->advertise)) rc = KVS_OK;
                pthread_mutex_lock(&el->mu);
                kvs_strlcpy(el->info.leader, v, sizeof el->info.leader);
                pthread_mutex_unlock(&el->mu);
            }
            free(v);
            uint64_t floor = 0, reign = 0;
            if (rc == KVS_OK && (rc = reign_claim(el, &floor, &reign)) != KVS_OK) {
                step_down(el, "the new reign could not be recorded in etcd"); /* revokes the key */
                KVS_LOGW("election: won, but %s could not be recorded (%s): standing by",
                         el->reign_key, kvs_strerror(rc));
                rc = KVS_ERR_IO;
            }
            if (rc == KVS_OK) {
                pthread_mutex_lock(&el->mu);
                el->info.reign = reign;
                el->info.reign_floor = floor;
                el->leader = 1;
                el->serving = 1;
                el->info.role = KVS_ROLE_LEADER;
                el->info.terms++;
                kvs_strlcpy(el->info.leader, el->advertise, sizeof el->info.leader);
                atomic_store(&el->until_ms, deadline_locked(el));
                pthread_cond_broadcast(&el->cv);
                pthread_mutex_unlock(&el->mu);
                KVS_LOGW("election: this master (%s) is the leader now (lease %lld, TTL %u s; "
                         "reign %llu after %llu)",
                         el->advertise, (long long)id, el->ttl_s, (unsigned long long)reign,
                         (unsigned long long)floor);
            } else if (rc != KVS_ERR_EXISTS) {
                ok = 0;
            }
        }
        pthread_mutex_lock(&el->mu);
        el->info.etcd_ok = ok;
        if (el->stop) break;
        uint64_t wait = el->leader ? el->period_ms : el->poll_ms;
        if (el->leader && next_renew > kvs_now_ms())
            wait = KVS_MIN(wait, next_renew - kvs_now_ms());
        kvs_cond_wait_ms(&el->cv, &el->mu, wait);
    }
    pthread_mutex_unlock(&el->mu);
    return NULL;
}

int kvs_election_start(const kvs_election_opts *o, kvs_election **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!o || !o->endpoints || !*o->endpoints || !o->advertise || !*o->advertise) {
        snprintf(err, errlen, "etcd endpoints and an advertised address are required");
        return KVS_ERR_INVALID;
    }
    uint32_t ttl = o->ttl_s ? o->ttl_s : KVS_ELECTION_DEFAULT_TTL_S;
    if (ttl > 3600) {
        snprintf(err, errlen, "etcd lease TTL %u s is too long (at most 3600)", ttl);
        return KVS_ERR_INVALID;
    }
    kvs_election *el = calloc(1, sizeof *el);
    if (!el) return KVS_ERR_NOMEM;
    const char *prefix = o->prefix && *o->prefix ? o->prefix : KVS_ETCD_DEFAULT_PREFIX;
    if (kvs_strlcpy(el->prefix, prefix, sizeof el->prefix) ||
        kvs_strlcpy(el->advertise, o->advertise, sizeof el->advertise)) {
        snprintf(err, errlen, "etcd prefix or advertised address too long");
        free(el);
        return KVS_ERR_INVALID;
    }
    snprintf(el->leader_key, sizeof el->leader_key, "%s/leader", el->prefix);
    snprintf(el->reign_key, sizeof el->reign_key, "%s/reign", el->prefix);
    snprintf(el->member_key, sizeof el->member_key, "%s/members/%s", el->prefix, el->advertise);
    el->ttl_s = ttl;
    el->period_ms = KVS_MAX((uint64_t)100, (uint64_t)ttl * 1000 / 4);
    el->poll_ms = KVS_MIN((uint64_t)500, KVS_MAX((uint64_t)100, (uint64_t)ttl * 1000 / 8));
    /* each request well inside a renewal period */
    int rc = kvs_etcd_new(o->endpoints, (int)KVS_MAX((uint64_t)200, el->period_ms), &el->etcd);
    if (rc != KVS_OK) {
        snprintf(err, errlen, "invalid etcd endpoints '%s'", o->endpoints);
        free(el);
        return rc;
    }
    pthread_mutex_init(&el->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&el->cv, &ca);
    pthread_condattr_destroy(&ca);
    atomic_store(&el->until_ms, 0);
    if (pthread_create(&el->th, NULL, el_main, el) != 0) {
        snprintf(err, errlen, "cannot start the election thread");
        kvs_etcd_free(el->etcd);
        pthread_cond_destroy(&el->cv);
        pthread_mutex_destroy(&el->mu);
        free(el);
        return KVS_ERR_IO;
    }
    el->started = 1;
    *out = el;
    return KVS_OK;
}

int kvs_election_wait_leader(kvs_election *el, volatile sig_atomic_t *stop)
{
    pthread_mutex_lock(&el->mu);
    int rc = KVS_ERR_CLOSED;
    while (!(stop && *stop)) {
        if (el->leader && el->serving && kvs_now_ms() < atomic_load(&el->until_ms)) {
            rc = KVS_OK;
            break;
        }
        kvs_cond_wait_ms(&el->cv, &el->mu, 100); /* a signal sets *stop without waking the cv */
    }
    pthread_mutex_unlock(&el->mu);
    return rc;
}

const _Atomic uint64_t *kvs_election_serve_until(kvs_election *el) { return &el->until_ms; }

void kvs_election_served(kvs_election *el)
{
    int still = 0;
    pthread_mutex_lock(&el->mu);
    still = el->leader;
    pthread_mutex_unlock(&el->mu);
    if (still) step_down(el, "the master stopped serving");
    pthread_mutex_lock(&el->mu);
    el->serving = 0;
    pthread_cond_broadcast(&el->cv);
    pthread_mutex_unlock(&el->mu);
}

void kvs_election_get_info(kvs_election *el, kvs_election_info *out)
{
    pthread_mutex_lock(&el->mu);
    *out = el->info;
    pthread_mutex_unlock(&el->mu);
}

void kvs_election_stop(kvs_election *el)
{
    if (!el) return;
    pthread_mutex_lock(&el->mu);
    el->stop = 1;
    pthread_cond_broadcast(&el->cv);
    pthread_mutex_unlock(&el->mu);
    if (el->started) pthread_join(el->th, NULL);
    pthread_mutex_lock(&el->mu);
    int was = el->leader;
    int64_t id = el->lease_id;
    el->leader = 0;
    atomic_store(&el->until_ms, 0);
    pthread_mutex_unlock(&el->mu);
    if (was) KVS_LOGW("election: giving up leadership (%s)", el->advertise);
    if (id) kvs_etcd_lease_revoke(el->etcd, id); /* the leader key goes with it */
    kvs_etcd_free(el->etcd);
    pthread_cond_destroy(&el->cv);
    pthread_mutex_destroy(&el->mu);
    free(el);
}
