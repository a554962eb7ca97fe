/* Leader election of several masters through etcd (failover).
 *
 * Every master started with --etcd runs one election: a thread that holds
 * an etcd lease (granted with the TTL given, renewed every TTL/4) and
 * registers `<prefix>/members/<advertise>` under it. A master that is not
 * serving campaigns: one transaction creates `<prefix>/leader` = its
 * advertised RPC address, attached to its lease, only if the key does not
 * exist. The winner serves until its lease could have ended: the deadline
 * (kvs_election_serve_until) is the time the last successful renewal was
 * SENT plus 80 % of the TTL, which is before etcd can expire the lease (etcd
 * counts from when it received the renewal), so a leader that loses etcd
 * stops serving before any standby can win. It also steps down when the
 * leader key no longer names it. Stepping down revokes the lease (the key
 * goes at once) and waits for the caller to tear its master down
 * (kvs_election_served) before campaigning again: a new term always starts
 * from an empty master that rebuilds its index from the nodes.
 *
 * Standbys retry the transaction every TTL/8 (100..500 ms): after a leader
 * dies, one of them serves about a TTL later. A candidate that finds the
 * key already holding its own address under its own lease (a transaction
 * that succeeded although its reply was lost) takes it as won. */
#ifndef KVS_MASTER_ELECTION_H
#define KVS_MASTER_ELECTION_H

#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kvs_election kvs_election;

typedef struct kvs_election_opts {
    const char *endpoints; /* "host:port[,host:port]" of etcd (copied) */
    const char *prefix;    /* key prefix (copied; NULL: KVS_ETCD_DEFAULT_PREFIX) */
    uint32_t ttl_s;        /* lease TTL in seconds (0: KVS_ELECTION_DEFAULT_TTL_S) */
    const char *advertise; /* this master's RPC address as clients reach it (copied) */
} kvs_election_opts;

#define KVS_ELECTION_DEFAULT_TTL_S 3u

enum { KVS_ROLE_STANDBY = 0, KVS_ROLE_LEADER = 1 };

/* What the election knows (kvs_election_get_info). */
typedef struct kvs_election_info {
    int role;               /* KVS_ROLE_* */
    char leader[300];       /* the leader key's value last seen ("" = none) */
    uint64_t terms;         /* how many times this process won */
    uint64_t step_downs;    /* how many times it stepped down */
    int64_t lease_id;       /* current etcd lease (0 = none) */
    int etcd_ok;            /* the last etcd request succeeded */
    uint64_t reign;         /* this term's reign (recorded in etcd when it was won) */
    uint64_t reign_floor;   /* the reign recorded before it (0: none) */
} kvs_election_info;

/* Starts the election thread. KVS_OK and *out (stop and free with
 * kvs_election_stop), or KVS_ERR_INVALID (missing endpoints or advertise
 * address, ttl over 3600) / KVS_ERR_NOMEM / KVS_ERR_IO, with a message in
 * err. It does not wait for etcd: an unreachable etcd is retried. */
int kvs_election_start(const kvs_election_opts *o, kvs_election **out, char *err, size_t errlen);

/* Blocks until this master is the leader (KVS_OK: serve now, under
 * kvs_election_serve_until) or *stop becomes non-zero (KVS_ERR_CLOSED). */
int kvs_election_wait_leader(kvs_election *el, volatile sig_atomic_t *stop);

/* The monotonic time in ms (kvs_now_ms) until which the leader may serve;
 * 0 when it may not. For kvs_server_set_serve_until. Valid until
 * kvs_election_stop. */
const _Atomic uint64_t *kvs_election_serve_until(kvs_election *el);

/* The caller stopped serving the current term and freed its master: the
 * election may campaign again. */
void kvs_election_served(kvs_election *el);

/* Copies what the election knows into *out. */
void kvs_election_get_info(kvs_election *el, kvs_election_info *out);

/* Stops the thread; a leader gives its leadership up at once (deletes the
 * leader key and revokes its lease, best effort) so a standby takes over
 * without waiting for the TTL. Frees everything. Safe with NULL. */
void kvs_election_stop(kvs_election *el);

#endif
