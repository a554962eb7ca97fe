/* Internals of the client library, shared by client.c (lifecycle, master
 * connection, heartbeats, reconnects, segment table), ops.c (the data API)
 * and embedded.c (the host-local pool). */
#ifndef KVS_CLIENT_INTERNAL_H
#define KVS_CLIENT_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "client/client_ext.h"
#include "client/loccache.h"
#include "client/resv.h"
#include "client/rpc.h"
#include "common/net.h"
#include "kvshelf/client.h"
#include "proto/proto.h"
#include "segment/directory.h"
#include "segment/segment.h"
#include "transfer/transfer.h"

/* One segment of the pool as SEGMENTS reported it. */
typedef struct kvs_seginfo {
    uint32_t id;
    uint64_t size;
    char shm_name[KVS_SHM_NAME_MAX];
    char transfer_addr[KVS_XFER_ADDR_MAX];
    uint8_t *base; /* mapped in this process (same host), else NULL */
    kvs_segment *seg; /* the mapping of base (its write fencing), or NULL */
} kvs_seginfo;

/* Immutable snapshot of the segment table, sorted by id; replaced whole. */
typedef struct kvs_segtab {
    uint32_t gen; /* connection generation it was fetched on */
    size_t n;
    size_t nmapped; /* segments with base != NULL */
    kvs_seginfo v[];
} kvs_segtab;

/* A registered memory region. */
typedef struct kvs_region {
    uintptr_t start, end;
} kvs_region;

/* What a call needs of the current master connection. */
typedef struct kvs_conn_ref {
    kvs_rpc *rpc; /* referenced; kvs_conn_put() drops it */
    uint64_t client_id;
    uint32_t gen;
    uint32_t lease_ms;
} kvs_conn_ref;

struct kvs_client {
    kvs_config cfg;
    kvs_client_opts opts;
    int embedded;
    char runtime_dir[512];
    kvs_addr master;
    char master_text[600];
    /* master_server_address "etcd://...": the leader is looked up in etcd
     * (<prefix>/leader) before every connect (failover); NULL otherwise */
    struct kvs_etcd *etcd;
    char etcd_leader_key[300];
    char etcd_leader[300]; /* the leader this connection goes to (guarded by mu) */
    pthread_t lw;          /* leader watch thread (etcd only; stops with hb_stop) */
    int lw_started;
    int timeout_ms;
    uint8_t host_id[KVS_HOST_ID_LEN];
    uint64_t t0_ms; /* clock origin of lease deadlines in slot handles */
    int no_shm;     /* KVSHELF_NO_SHM: never map other processes' segments */

    /* master connection */
    pthread_mutex_t mu; /* rpc, client_id, gen, ttl/lease, seg_id */
    kvs_rpc *rpc;
    uint64_t client_id;
    uint32_t gen;
    uint32_t ttl_ms, lease_ms;
    uint64_t connected_ms;
    pthread_mutex_t conn_mu; /* serializes (re)connects; guards the fields below */
    pthread_cond_t conn_cv;  /* an attempt ended, or the client is closing */
    int connecting;          /* a thread is connecting (conn_mu released meanwhile) */
    uint64_t retry_at_ms;    /* no attempt before (back-off after a failed one) */
    int backoff_ms;
    uint64_t jitter;         /* PRNG state of the back-off's jitter */

    /* own segment */
    int have_seg;
    atomic_int seg_mounted; /* a MOUNT of seg was ever sent (client.c mount_segment) */
    kvs_segment seg;
    kvs_xfer_server *xsrv;
    uint32_t seg_id; /* under mu; 0 = not mounted */
    kvs_dir *dir;    /* the segment's directory of complete objects, or NULL */
    uint64_t dir_reg; /* under mu: directory registration of seg_id's MOUNT */
    pthread_t dsync; /* directory sync thread (client.c dir_main) */
    int dsync_started;

    /* pool segments */
    pthread_rwlock_t tab_lock;
    kvs_segtab *tab;
    pthread_mutex_t refresh_mu;
    kvs_shm_cache *shm;
    kvs_xfer_client *xc;
    kvs_loccache *lc; /* where recently used objects lie; NULL = off */
    kvs_resv_table *resv; /* mapped reservations holding a write fence (resv.h) */

    /* registered memory (sorted by start) */
    pthread_mutex_t reg_mu;
    kvs_region *regs;
    size_t nregs, capregs;

    /* heartbeat thread */
    pthread_t hb;
    int hb_started;
    pthread_mutex_t hb_mu;
    pthread_cond_t hb_cv;
    int hb_stop;

    /* lifecycle: calls in progress, closing flag */
    atomic_int active;
    atomic_int closing;

    atomic_uint_fast64_t n_puts, n_gets, n_hits, n_misses, n_errors, n_reconnects, n_bytes_put,
        n_bytes_got, n_early_kept, n_early_wasted;
};

/* ---- client.c ---- */

/* Marks a call in progress; KVS_ERR_CLOSED if the client is closing. Every
 * successful kvs_enter is paired with kvs_leave. */
int kvs_enter(kvs_client *c);
void kvs_leave(kvs_client *c);

/* Gets the live master connection, reconnecting if needed. Reconnect
 * attempts are paced by an exponential back-off with jitter (10 ms .. 1 s);
 * a call that finds the master away waits, at most its timeout_ms, for the
 * attempt in progress or the next one allowed, and returns the result of
 * its own attempt, or KVS_ERR_CONN at its deadline. KVS_OK or KVS_ERR_CONN
 * / KVS_ERR_CLOSED / KVS_ERR_AUTH. */
int kvs_conn_get(kvs_client *c, kvs_conn_ref *out);
void kvs_conn_put(kvs_conn_ref *cr);

/* One request/reply on the connection in `cr`. A frame status of
 * KVS_ERR_NOT_FOUND on a request that names the client means the master no
 * longer knows it: the connection is dropped (the next call reconnects,
 * says HELLO and re-mounts) and KVS_ERR_CONN is returned. Transport
 * failures are KVS_ERR_CONN (or KVS_ERR_CLOSED while closing). */
int kvs_conn_call(kvs_client *c, kvs_conn_ref *cr, uint16_t type, const kvs_wbuf *body,
                  int names_client, uint8_t **resp, uint32_t *resp_len);

/* kvs_conn_call in two halves (see kvs_rpc_start): start sends the request
 * (`body` must have no error; KVS_OK or the transport error the request
 * already failed with), finish waits for the reply and interprets
 * it like kvs_conn_call. Every start is followed by one finish. */
int kvs_conn_start(kvs_conn_ref *cr, kvs_rpc_req *q, uint16_t type, const kvs_wbuf *body);
int kvs_conn_finish(kvs_client *c, kvs_conn_ref *cr, kvs_rpc_req *q, int names_client,
                    uint8_t **resp, uint32_t *resp_len);


/* Finds segment `id` of generation `gen` in the current table without
 * refreshing it: 1 (copied into *out) or 0. */
int kvs_seg_peek(kvs_client *c, uint32_t gen, uint32_t id, kvs_seginfo *out);

/* Finds segment `id` of connection generation `gen`, refreshing the table
 * once if it is unknown. KVS_OK (copied into *out) or KVS_ERR_UNAVAILABLE. */
int kvs_seg_find(kvs_client *c, uint32_t gen, uint32_t id, kvs_seginfo *out);

/* Current connection generation (0 = never connected). */
uint32_t kvs_client_gen(kvs_client *c);

/* ---- embedded.c ---- */

/* Resolves and prepares the runtime directory (created 0700; refused if
 * owned by another uid or writable by group/others). */
int kvs_embedded_prepare_dir(const kvs_config *cfg, char *dir, size_t cap, char *err,
                             size_t errlen);

/* Makes sure the pool's master answers on unix:DIR/master.sock, starting
 * `kvshelf master --embedded` (under DIR/pool.lock) if `spawn` and nothing
 * answers. KVS_OK, KVS_ERR_UNAVAILABLE (nothing runs and !spawn),
 * KVS_ERR_CONN (started but never answered) or KVS_ERR_IO. */
int kvs_embedded_ensure(const kvs_config *cfg, const char *dir, int spawn, char *err,
                        size_t errlen);

/* Creates the segment c contributes (c->seg, global_segment_size bytes),
 * like kvs_segment_create; but for the embedded pool's own segment client
 * (`kvshelf master --embedded`), first adopts the segment of the pool's
 * previous master if that one was killed (its memory still in /dev/shm,
 * named by DIR/pool.segment, its owner lock free, the same segment, no
 * writer of the dead pool inside): *adopted = 1, c->dir attached to its
 * directory as it was and c->seg_mounted set, so that connecting mounts it
 * like a node after a master restart (fence, MOUNT, DIR_LOAD). Else a new
 * segment, named in DIR/pool.segment for the next master (*adopted = 0,
 * c->dir untouched). KVS_OK or kvs_segment_create's errors. */
int kvs_embedded_segment_open(kvs_client *c, int *adopted);

#endif
