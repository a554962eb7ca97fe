/* Internals of the KV connector shared by connector.c (layouts, block
 * dumps/loads, task engine) and parts.c (dumps/loads of objects given as
 * explicit parts). Not installed; not a public interface. */
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
    /* parts tasks (kvs_connector_dump_parts/load_parts; parts.c) */
    int parts;       /* 1: a parts task (bids unused) */
    size_t ppo;      /* parts per object */
    uint64_t *paddrs; /* n*ppo part addresses */
    uint64_t *plens;  /* n*ppo part lengths */
    uint64_t *pfp;    /* n fingerprints (part sizes and tag) */
    uint64_t *pbytes; /* n payload lengths (sum of the object's parts) */
};

typedef struct conn_worker {
    struct kvs_connector *c;
    pthread_t th;
    int started;
    void *cw; /* kvs_cuda_worker */
    int cuda_err;
    uint8_t *staging;
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
    /* parts jobs (parts.c) */
    void *pcw; /* kvs_cuda_pworker, created on first use */
    uint8_t *pstaging;
    size_t pstaging_cap;
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
    /* KVSHELF_CONNECTOR_PROFILE=1: time spent per phase, printed at close */
    int profile;
    atomic_uint_fast64_t t_meta, t_copy, t_finish, n_jobs;
    atomic_uint_fast64_t n_dumped, n_loaded, n_missed, n_failed, n_dropped, n_skipped,
        n_bytes_dumped, n_bytes_loaded;
};

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


/* 1 if h is a valid block hash (1..KVS_HASH_MAX bytes). */
int conn_valid_hash(const kvs_key *h);

/* A fresh non-zero generation nonce. */
uint64_t conn_next_gen(kvs_connector *c);

/* Enter/leave a public call that uses the client or the queue (close waits
 * until none is inside). conn_enter returns KVS_OK or KVS_ERR_CLOSED. */
int conn_enter(kvs_connector *c);
void conn_leave(kvs_connector *c);

/* A new task of n objects: store keys are the namespace prefix + hashes[i]
 * (raw_keys 0) or hashes[i] as given (raw_keys 1); bids may be NULL; jobs of
 * at most job_blocks objects. Results start as KVS_ERR_CLOSED. NULL when out
 * of memory. The caller owns one reference (kvs_task_free). */
kvs_task *conn_task_new(kvs_connector *c, int kind, const kvs_key *hashes, const uint32_t *bids,
                        size_t n, size_t job_blocks, int raw_keys);

/* Queues the task's jobs with backpressure (caller inside conn_enter). */
void conn_task_submit(kvs_connector *c, kvs_task *t);

/* Marks one job finished / sets every result of a job. */
void conn_job_finish(struct conn_job *j);
void conn_job_set_all(struct conn_job *j, int status);

/* parts.c: runs one job of a parts task on worker w (results written). */
void conn_run_parts(conn_worker *w, struct conn_job *j);

/* parts.c: frees worker w's parts state; called on the worker thread as it ends. */
void conn_parts_worker_exit(conn_worker *w);

#endif
