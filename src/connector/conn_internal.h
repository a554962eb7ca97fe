/* Internals of the KV connector, shared by its files (one job each):
 *   connector.c  open/close, layout registration, counters, accessors
 *   keys.c       namespaces, store keys, layout and parts fingerprints
 *   header.c     object geometry, header build and checks, generations
 *   task.c       task objects, job sizing, kvs_task_* (wait/check/results)
 *   queue.c      job queue, backpressure, worker threads, shutdown
 *   copy.c       per-worker copy state: direct or staged memory, backend dispatch
 *   host_copy.c  host copy backend (memcpy)
 *   dump.c       one dump job (blocks and parts)
 *   load.c       one load job (blocks and parts)
 *   blocks.c     block dump/load entry points (registered layout)
 *   parts.c      parts dump/load entry points (explicit parts)
 *   stripes.c    striped parts objects: open-object tables, stripe jobs
 *   lookup.c     lookup and lookup_prefix
 *   profile.c    KVSHELF_CONNECTOR_PROFILE timings
 * CUDA copy backends live in src/cuda/. Not installed; not a public interface.
 *
 * Flow of one job (up to CONN_JOB_BYTES of objects of one task):
 *   dump: reserve_batch -> header + copy straight into the slot (or into
 *         staging, then slot_write) -> view check -> commit_batch
 *   load: acquire_batch -> check size and header -> copy out of the object
 *         -> re-check header, lease, GPU view -> release_batch
 */
#ifndef KVS_CONN_INTERNAL_H
#define KVS_CONN_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "kvshelf/client.h"
#include "kvshelf/connector.h"
#ifdef KVS_HAVE_CUDA
#include "cuda/kvs_cuda.h"
#endif

/* ------------------------------------------------------------ constants */

#define CONN_MAGIC 0x4253564bu /* "KVSB" little-endian */
#define CONN_VERSION 1
#define CONN_HDR_BYTES 64u
#define CONN_FLAG_CHECKSUM 1u
#define CONN_FLAG_PARTS 2u /* an object of kvs_connector_dump_parts */
#define CONN_JOB_BYTES (128ull << 20) /* most bytes per job (one reserve/acquire) */
#define CONN_JOB_MAX_BLOCKS 128
#define CONN_MAX_BLOCK_BYTES (1ull << 30)
#define CONN_DEFAULT_WORKERS 2      /* host backend */
#define CONN_RA_MAX_DEPTH 16        /* stripes of one read-ahead window (KVSHELF_READAHEAD_DEPTH) */
#define CONN_RA_BUFS 4              /* read-ahead buffers one job starts at most */
#define CONN_RA_SLOTS 4             /* read-ahead buffers an open load object keeps */
#define CONN_RA_RETIRE (CONN_JOB_MAX_BLOCKS * (CONN_RA_SLOTS + 1) + CONN_RA_BUFS)
#define CONN_DEFAULT_CUDA_WORKERS 4 /* CUDA: 2 left the link ~5% idle in RPC gaps */
#define CONN_DEFAULT_INFLIGHT 65536
#define CONN_KEY_MAX (KVS_CONNECTOR_PREFIX_BYTES + KVS_HASH_MAX)

enum { BK_NONE = 0, BK_HOST = 1, BK_CUDA = 2 };
enum { TASK_DUMP = 1, TASK_LOAD = 2 };

/* Stored object header (little-endian hosts only; x86-64 and arm64). */
typedef struct conn_hdr {
    uint32_t magic;
    uint16_t version;
    uint16_t hdr_bytes;
    uint32_t n_tensors;
    uint32_t flags;
    uint64_t key_stamp;   /* xxh3-64 of the full store key */
    uint64_t payload_len; /* bytes after the header */
    uint64_t layout_fp;   /* kvs layout fingerprint */
    uint64_t generation;  /* nonce of this write, never 0 */
    uint64_t checksum;    /* xxh3-64 of the payload when CONN_FLAG_CHECKSUM */
    uint64_t view_stamp;  /* == generation once the payload copy completed */
} conn_hdr;
_Static_assert(sizeof(conn_hdr) == CONN_HDR_BYTES, "header is 64 bytes");
#define CONN_STAMP_OFF 56u
_Static_assert(offsetof(conn_hdr, view_stamp) == CONN_STAMP_OFF, "stamp offset");

typedef struct conn_tensor {
    uint64_t base, block_stride, chunk_bytes, chunk_stride, payload_off;
    uint32_t count;
} conn_tensor;

/* -------------------------------------------------------------- objects */

struct conn_job {
    struct kvs_task *task;
    size_t start, n;
    struct conn_job *next;
};

struct kvs_task {
    int kind;
    size_t n;
    uint8_t *keymem;
    kvs_key *keys; /* full store keys */
    uint32_t *bids;
    int *results;
    struct conn_job *jobs;
    size_t njobs;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t jobs_left; /* under mu */
    int done;         /* under mu */
    atomic_int refs;  /* 1 for the caller + 1 per unfinished job */
    atomic_int cancelled;
    void *event; /* CUDA event snapshot or NULL; freed when the last job ends */
    int gate_dev;         /* CUDA device for kvs_task_gpu_wait, -1: not a CUDA task */
    int gated;            /* under mu: a GPU gate waits for this task */
    uint32_t gate_ticket; /* under mu */
    /* parts tasks (kvs_connector_dump_parts/load_parts; parts.c) */
    int parts;       /* 1: a parts task (bids unused) */
    size_t ppo;      /* parts per object */
    uint64_t *paddrs; /* n*ppo part addresses */
    uint64_t *plens;  /* n*ppo part lengths */
    uint64_t *pfp;    /* n fingerprints (part sizes and tag) */
    uint64_t *pbytes; /* n payload lengths (sum of the object's parts, x stripes) */
    uint32_t stripe;  /* striped parts tasks (stripes > 1; stripes.c): the stripe moved */
    uint32_t stripes; /* stripes per object; 1: whole objects */
};

typedef struct conn_worker {
    struct kvs_connector *c;
    pthread_t th;
    int started;
    void *cw; /* kvs_cuda_worker */
    int cuda_err;
    uint8_t *staging; /* staged objects of a job (copy.c), grown on demand */
    size_t staging_cap;
    kvs_slot slots[CONN_JOB_MAX_BLOCKS];
    kvs_key ck[CONN_JOB_MAX_BLOCKS];
    kvs_slot cs[CONN_JOB_MAX_BLOCKS];
    uint8_t cok[CONN_JOB_MAX_BLOCKS];
    int cres[CONN_JOB_MAX_BLOCKS];
    uint8_t ok[CONN_JOB_MAX_BLOCKS];
    uint8_t reserved[CONN_JOB_MAX_BLOCKS];
    uint8_t staged[CONN_JOB_MAX_BLOCKS];
    void *obj[CONN_JOB_MAX_BLOCKS];
    uint64_t gen[CONN_JOB_MAX_BLOCKS];
    uint64_t got[CONN_JOB_MAX_BLOCKS];
    uint64_t sizes[CONN_JOB_MAX_BLOCKS];
    void *pcw; /* kvs_cuda_pworker for parts jobs, created on first use */
    /* stripe jobs (stripes.c) */
    struct conn_sent *ent[CONN_JOB_MAX_BLOCKS]; /* open object of each job object */
    uint64_t poff[CONN_JOB_MAX_BLOCKS];        /* offset of the stripe in w->obj[i] */
    /* read-ahead of stripe loads (stripes.c, CUDA): the buffer each object
     * loads from (NULL: its host memory), where the object's window starts
     * in it (ra_off) and this stripe within the window (ra_skip); the
     * window of stripes this job reads ahead for each object (ra_n[i]
     * stripes from ra_from[i]; 0: none) and the buffers started for them
     * (one per distinct window); references to drop once the job's results
     * are out */
    struct kvs_cuda_ahead *ra[CONN_JOB_MAX_BLOCKS];
    uint64_t ra_off[CONN_JOB_MAX_BLOCKS];
    uint64_t ra_skip[CONN_JOB_MAX_BLOCKS];
    uint32_t ra_from[CONN_JOB_MAX_BLOCKS];
    uint32_t ra_n[CONN_JOB_MAX_BLOCKS];
    uint8_t ra_buf[CONN_JOB_MAX_BLOCKS]; /* index in ra_new, or 0xff: not started */
    struct kvs_cuda_ahead *ra_new[CONN_RA_BUFS];
    uint64_t ra_new_off[CONN_RA_BUFS][CONN_JOB_MAX_BLOCKS];
    struct kvs_cuda_ahead *retire[CONN_RA_RETIRE];
    size_t nretire;
} conn_worker;

struct kvs_connector {
    kvs_client *cl;
    int device;
    char ns[KVS_NAMESPACE_MAX + 1];
    uint32_t rank, world;
    uint32_t max_inflight;
    int drop_when_full, checksum, force_staging;
    uint8_t (*prefixes)[KVS_CONNECTOR_PREFIX_BYTES]; /* per rank (all ranks on lookup-only) */

    /* layout (immutable once have_layout) */
    int have_layout;
    conn_tensor *T;
    size_t nt;
    uint32_t num_blocks;
    uint64_t payload_bytes, block_bytes, layout_fp;
    uint32_t job_blocks;

    int backend;
    const char *backend_name;
#ifdef KVS_HAVE_CUDA
    kvs_cuda_ctx *cx;
#endif

    pthread_mutex_t mu;
    pthread_cond_t work_cv, space_cv, idle_cv;
    struct conn_job *qhead, *qtail;
    uint64_t inflight; /* blocks queued or being copied */
    int closing, stop, callers;
    conn_worker *workers;
    uint32_t nworkers;

    uint64_t gen_base;
    atomic_uint_fast64_t gen_ctr;
    /* open striped objects (stripes.c): dumps being filled, loads under lease */
    struct conn_stab *stab_dump, *stab_load;
    uint64_t readahead; /* bytes of device memory for stripe loads' read-ahead (0: off) */
    uint32_t ra_depth;  /* stripes per read-ahead window (1..CONN_RA_MAX_DEPTH) */
    /* KVSHELF_CONNECTOR_PROFILE=1: time spent per phase, printed at close */
    int profile;
    atomic_uint_fast64_t t_meta, t_copy, t_finish, n_jobs;
    atomic_uint_fast64_t t_ra, n_ra; /* stripe loads: starting read-ahead (part of t_copy) */
    atomic_uint_fast64_t t_ra_claim;  /* of which taking the buffers (ra_claim) */
    atomic_uint_fast64_t n_dumped, n_loaded, n_missed, n_failed, n_dropped, n_skipped,
        n_bytes_dumped, n_bytes_loaded, n_readahead;
};

/* What the header of one object of a task must say (header.c). */
typedef struct conn_obj {
    uint64_t bytes;     /* whole object: header + payload */
    uint64_t payload;   /* payload_len */
    uint32_t n_tensors; /* tensors (blocks) or parts per object (parts) */
    uint32_t flags;     /* 0 (block) or CONN_FLAG_PARTS */
    uint64_t fp;        /* layout_fp */
} conn_obj;

/* ------------------------------------------------- shared functions */

static inline uint64_t conn_read_stamp(const void *obj)
{
    uint64_t v;
    __atomic_load((const uint64_t *)((const uint8_t *)obj + CONN_STAMP_OFF), &v,
                  __ATOMIC_ACQUIRE);
    return v;
}

static inline void conn_write_stamp(void *obj, uint64_t v)
{
    __atomic_store((uint64_t *)((uint8_t *)obj + CONN_STAMP_OFF), &v, __ATOMIC_RELEASE);
}

/* keys.c ---------------------------------------------------------------- */

/* 1 if h is a valid block hash (1..KVS_HASH_MAX bytes). */
int conn_valid_hash(const kvs_key *h);

/* The KVS_CONNECTOR_PREFIX_BYTES namespace bytes of (ns, world, rank). */
void conn_make_prefix(const char *ns, uint32_t world, uint32_t rank,
                      uint8_t out[KVS_CONNECTOR_PREFIX_BYTES]);

/* Writes at p the store key prefix (KVS_CONNECTOR_PREFIX_BYTES, none when
 * NULL) + hash bytes and returns that key (p must have room). */
kvs_key conn_key_at(uint8_t *p, const uint8_t *prefix, const kvs_key *hash);

/* Layout fingerprint of valid tensors (per tensor chunk_bytes and count;
 * never addresses or strides); 0 only when out of memory. */
uint64_t conn_layout_fp(const kvs_tensor_layout *tensors, size_t n);

/* Fingerprint of a parts object: its ppo part lengths and tag; never 0. */
uint64_t conn_parts_fp(size_t ppo, const uint64_t *lens, uint64_t tag);

/* header.c -------------------------------------------------------------- */

/* A fresh non-zero generation nonce. */
uint64_t conn_next_gen(kvs_connector *c);

/* Geometry of object i of task t. */
conn_obj conn_task_obj(const kvs_connector *c, const kvs_task *t, size_t i);

/* Writes the header of a new object g of key at obj (view stamp 0) and
 * returns its generation. */
uint64_t conn_hdr_write(kvs_connector *c, void *obj, const kvs_key *key, const conn_obj *g);

/* Stores the payload checksum in the header at obj (payload copied). */
void conn_hdr_seal(void *obj, const conn_obj *g);

/* KVS_OK if a stored object of `size` bytes can be g, else its load result. */
int conn_size_status(const conn_obj *g, uint64_t size);

/* KVS_OK if h heads a complete object g of key, else its load result: block
 * objects miss (KVS_ERR_NOT_FOUND); parts objects see connector.h. */
int conn_hdr_status(const conn_hdr *h, const kvs_key *key, const conn_obj *g);

/* Before a load copies: checks the header of the object at obj (and, when
 * the connector checksums, its payload). KVS_OK and *gen = its generation,
 * or the load result. */
int conn_hdr_check(const kvs_connector *c, const void *obj, const kvs_key *key,
                   const conn_obj *g, uint64_t *gen);

/* task.c ---------------------------------------------------------------- */

/* A new task of n objects: store keys are the namespace prefix + hashes[i]
 * (raw_keys 0) or hashes[i] as given (raw_keys 1); bids may be NULL; jobs of
 * at most job_blocks objects. Results start as KVS_ERR_CLOSED. NULL when out
 * of memory. The caller owns one reference (kvs_task_free). */
kvs_task *conn_task_new(kvs_connector *c, int kind, const kvs_key *hashes, const uint32_t *bids,
                        size_t n, size_t job_blocks, int raw_keys);

/* Objects per job for objects of at most obj_bytes (CONN_JOB_BYTES or
 * KVSHELF_CONNECTOR_JOB_MB per job, CONN_JOB_MAX_BLOCKS, max_inflight). */
uint32_t conn_job_blocks(const kvs_connector *c, uint64_t obj_bytes);

/* Starts task t (caller inside conn_enter): snapshots after_event (may be
 * NULL; CUDA), queues the jobs, then leaves (conn_leave) and returns KVS_OK
 * with *task = t. On an error nothing started: t is dropped. */
int conn_task_start(kvs_connector *c, kvs_task *t, void *after_event, kvs_task **task);

/* Drops a task that was never queued (its jobs finish unrun). */
void conn_task_drop(kvs_task *t);

/* Marks one job finished (its results written) / sets every result of a job
 * / fails every object of a job with rc (counted failed). */
void conn_job_finish(struct conn_job *j);
void conn_job_set_all(struct conn_job *j, int status);
void conn_job_fail(kvs_connector *c, struct conn_job *j, int rc);

/* queue.c --------------------------------------------------------------- */

/* Enter/leave a public call that uses the client or the queue (close waits
 * until none is inside). conn_enter returns KVS_OK or KVS_ERR_CLOSED. */
int conn_enter(kvs_connector *c);
void conn_leave(kvs_connector *c);

/* Queues the task's jobs with backpressure (caller inside conn_enter). */
void conn_task_submit(kvs_connector *c, kvs_task *t);

/* Starts c->nworkers worker threads (c->workers allocated): KVS_OK or
 * KVS_ERR_NOMEM. */
int conn_workers_start(kvs_connector *c);

/* Close: refuses new calls, waits for callers inside, fails queued jobs
 * with KVS_ERR_CLOSED, stops and joins the workers. */
void conn_queue_close(kvs_connector *c);

/* copy.c ---------------------------------------------------------------- */

/* A worker thread's copy state: set up on the thread as it starts / freed
 * as it ends. */
void conn_worker_init(conn_worker *w);
void conn_worker_exit(conn_worker *w);

/* 1 if the copies of t can use the slot's direct pointer for len bytes. */
int conn_direct_ok(const kvs_connector *c, const kvs_task *t, const kvs_slot *s, uint64_t len);

/* Gives staged objects (w->staged[i], w->sizes[i] bytes) their staging
 * memory; an object that gets none fails with KVS_ERR_NOMEM. */
void conn_assign_staging(conn_worker *w, const kvs_task *t, size_t n, int *res);

/* Runs the copies of objects w->ok[i] of job (t, start, n) on the backend.
 * dump: objects filled, view stamp written; load: w->got[i] = view stamp,
 * objects copied out. Returns KVS_OK or the error that failed every object. */
int conn_copy(conn_worker *w, int dir, const kvs_task *t, size_t start, size_t n);

/* Object i failed the view check after a copy: forget a stale GPU mapping. */
void conn_copy_forget(conn_worker *w, size_t i);

/* Every object still w->ok[i] of n gets ok 0 and result status. */
void conn_fail_live(conn_worker *w, size_t n, int *res, int status);

/* host_copy.c ----------------------------------------------------------- */

/* Host backend of conn_copy for block tasks (bids) and parts tasks (ppo
 * parts per object at addrs/lens). */
void conn_host_copy_blocks(conn_worker *w, int dir, const uint32_t *bids, size_t n);
void conn_host_copy_parts(conn_worker *w, int dir, const uint64_t *addrs, const uint64_t *lens,
                          size_t ppo, size_t n);

/* stripes.c ------------------------------------------------------------- */

#define CONN_MAX_STRIPES 65536u

/* Creates the open-object tables of c (KVS_OK or KVS_ERR_NOMEM). */
int conn_stripes_init(kvs_connector *c);

/* At close, after the queue stopped: abandons the dumps still open and
 * releases the loads still leased, then frees the tables. Safe when
 * conn_stripes_init did not run or failed. */
void conn_stripes_close(kvs_connector *c);

/* Gives up every striped object no call held for its table's idle time
 * (dumps abandoned, loads released); a worker calls it while no job comes. */
void conn_stripes_reap_idle(kvs_connector *c);

/* Runs one dump / load job of a striped parts task (t->stripes > 1). */
void conn_run_stripe_dump(conn_worker *w, struct conn_job *j);
void conn_run_stripe_load(conn_worker *w, struct conn_job *j);

/* Drops the read-ahead references a load job left to w (w->retire): the
 * worker calls it after the job's results are out, so the waits for
 * copies and the frees are off the caller's path. */
void conn_stripes_retire(conn_worker *w);

/* Host backend of a stripe job: ppo parts of each object i with w->ok[i]
 * at w->obj[i] + w->poff[i]; dump: gen[i] written at the stamp and the
 * generation word read back into got[i]; load: got[i] = the stamp. */
void conn_host_copy_stripes(conn_worker *w, int dir, const uint64_t *addrs,
                            const uint64_t *lens, size_t ppo, size_t n);

/* Fingerprint of a striped parts object: that of an object of reps*ppo
 * parts, lens repeated reps times (conn_parts_fp of the whole list). */
uint64_t conn_parts_fp_rep(size_t ppo, const uint64_t *lens, uint32_t reps, uint64_t tag);

/* dump.c / load.c ------------------------------------------------------- */

/* Runs one dump / load job on worker w (results written). */
void conn_run_dump(conn_worker *w, struct conn_job *j);
void conn_run_load(conn_worker *w, struct conn_job *j);

/* profile.c ------------------------------------------------------------- */

/* Adds one block job's phase times (ns stamps; profiling on) / prints the
 * totals (close). */
void conn_profile_add(kvs_connector *c, uint64_t t0, uint64_t t1, uint64_t t2);
/* Adds the time a stripe load job spent taking its read-ahead buffers (t0 to
 * t_claimed) and starting the next ones (to now). */
void conn_profile_ra(kvs_connector *c, uint64_t t0, uint64_t t_claimed);
void conn_profile_print(const kvs_connector *c);

#endif
