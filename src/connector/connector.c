/* KV connector: open and close, layout registration, counters and
 * accessors. The rest of the connector is listed in conn_internal.h. See
 * include/kvshelf/connector.h. */
#include "kvshelf/connector.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "connector/conn_internal.h"

static void set_err(char *err, size_t errlen, const char *fmt, const char *a)
{
    if (err && errlen) snprintf(err, errlen, fmt, a ? a : "");
}

/* ------------------------------------------------------------ open/close */

int kvs_connector_open(const kvs_config *cfg, int device, const kvs_connector_opts *opts,
                       kvs_connector **out, char *err, size_t errlen)
{
    if (err && errlen) err[0] = 0;
    if (!cfg || !opts || !out) {
        set_err(err, errlen, "%snull argument", "");
        return KVS_ERR_INVALID;
    }
    *out = NULL;
    if (!opts->ns || !*opts->ns || strlen(opts->ns) > KVS_NAMESPACE_MAX) {
        set_err(err, errlen, "connector namespace (ns) must be 1..256 bytes%s", "");
        return KVS_ERR_INVALID;
    }
    uint32_t world = opts->world_size ? opts->world_size : 1;
    if (opts->rank >= world) {
        set_err(err, errlen, "rank must be below world_size%s", "");
        return KVS_ERR_INVALID;
    }
    if (device < -2) {
        set_err(err, errlen, "device must be >= 0, -1 (lookup-only) or -2 (host)%s", "");
        return KVS_ERR_INVALID;
    }
    const char *be = opts->backend && *opts->backend ? opts->backend : "auto";
    int backend = BK_NONE;
    int cuda_mode = 0;
    if (device == -1) {
        backend = BK_NONE;
    } else if (!strcmp(be, "host")) {
        if (device >= 0) {
            set_err(err, errlen, "backend \"host\" needs host tensors (device -2)%s", "");
            return KVS_ERR_CONFIG;
        }
        backend = BK_HOST;
    } else if (!strcmp(be, "auto") || !strcmp(be, "cuda-kernel") || !strcmp(be, "cuda-batch") ||
               !strcmp(be, "cuda")) {
        if (device == -2) {
            if (strcmp(be, "auto")) {
                set_err(err, errlen, "backend \"%s\" needs a CUDA device (device >= 0)", be);
                return KVS_ERR_CONFIG;
            }
            backend = BK_HOST;
        } else {
#ifdef KVS_HAVE_CUDA
            backend = BK_CUDA;
            cuda_mode = !strcmp(be, "cuda-batch")    ? KVS_CUDA_BATCH
                        : !strcmp(be, "cuda-kernel") ? KVS_CUDA_KERNEL
                                                     : KVS_CUDA_AUTO;
#else
            set_err(err, errlen, "this build of kvshelf has no CUDA support%s", "");
            return KVS_ERR_UNSUPPORTED;
#endif
        }
    } else {
        set_err(err, errlen, "unknown backend \"%s\" (auto, host, cuda-kernel, cuda-batch)", be);
        return KVS_ERR_CONFIG;
    }

    kvs_connector *c = calloc(1, sizeof *c);
    if (!c) return KVS_ERR_NOMEM;
    c->device = device;
    kvs_strlcpy(c->ns, opts->ns, sizeof c->ns);
    c->rank = opts->rank;
    c->world = world;
    c->max_inflight = opts->max_inflight ? opts->max_inflight : CONN_DEFAULT_INFLIGHT;
    c->drop_when_full = opts->drop_when_full != 0;
    c->checksum = opts->checksum != 0;
    c->force_staging = opts->force_staging != 0;
    const char *prof = getenv("KVSHELF_CONNECTOR_PROFILE");
    c->profile = prof && *prof && *prof != '0';
    c->backend = backend;
    c->backend_name = backend == BK_HOST ? "host" : backend == BK_NONE ? "none" : "cuda";
    uint32_t nprefix = device == -1 ? world : 1;
    c->prefixes = calloc(nprefix, sizeof *c->prefixes);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work_cv, NULL);
    pthread_cond_init(&c->space_cv, NULL);
    pthread_cond_init(&c->idle_cv, NULL);
    if (!c->prefixes) {
        kvs_connector_close(c);
        return KVS_ERR_NOMEM;
    }
    for (uint32_t r = 0; r < nprefix; r++)
        conn_make_prefix(c->ns, world, device == -1 ? r : c->rank, c->prefixes[r]);
    if (conn_stripes_init(c) != KVS_OK) {
        kvs_connector_close(c);
        return KVS_ERR_NOMEM;
    }
    if (kvs_random_bytes(&c->gen_base, sizeof c->gen_base) != KVS_OK)
        c->gen_base = kvs_now_ns() ^ ((uint64_t)getpid() << 32);
    atomic_init(&c->gen_ctr, 1);

#ifdef KVS_HAVE_CUDA
    if (backend == BK_CUDA) {
        int rc = kvs_cuda_ctx_create(device, cuda_mode, &c->cx, err, errlen);
        if (rc != KVS_OK) {
            kvs_connector_close(c);
            return rc;
        }
        c->backend_name = kvs_cuda_mode_name(cuda_mode);
    }
#else
    (void)cuda_mode;
#endif

    kvs_config cc = *cfg;
    /* A lookup-only client contributes no memory to a remote pool; in embedded
     * mode no client contributes its own, and the size says how large a pool
     * this client starts if it is the first (the scheduler often is). */
    if (device == -1 && cc.master_server_address[0]) cc.global_segment_size = 0;
    int rc = kvs_client_open(&cc, &c->cl, err, errlen);
    if (rc != KVS_OK) {
        kvs_connector_close(c);
        return rc;
    }

#ifdef KVS_HAVE_CUDA
    /* Pin the pool's segments now (seconds per ten GiB): a parts connector
     * (UCM's stores) registers no layout, and its first dump must not stall
     * (register_layout does the same for block connectors). */
    if (backend == BK_CUDA) kvs_cuda_preregister(c->cx);
#endif
    if (device != -1) {
        c->nworkers = opts->num_workers         ? opts->num_workers
                      : backend == BK_CUDA ? CONN_DEFAULT_CUDA_WORKERS
                                           : CONN_DEFAULT_WORKERS;
        if (c->nworkers > 256) c->nworkers = 256;
        c->workers = calloc(c->nworkers, sizeof *c->workers);
        if (!c->workers) {
            kvs_connector_close(c);
            return KVS_ERR_NOMEM;
        }
        if (conn_workers_start(c) != KVS_OK) {
            set_err(err, errlen, "cannot start worker threads%s", "");
            kvs_connector_close(c);
            return KVS_ERR_NOMEM;
        }
    }
    *out = c;
    return KVS_OK;
}

void kvs_connector_close(kvs_connector *c)
{
    if (!c) return;
    conn_profile_print(c);
    conn_queue_close(c);
    conn_stripes_close(c); /* open objects given up while the client still works */
    free(c->workers);
#ifdef KVS_HAVE_CUDA
    /* Unregister segment mappings before the client unmaps them. */
    kvs_cuda_ctx_destroy(c->cx);
#endif
    kvs_client_close(c->cl);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->work_cv);
    pthread_cond_destroy(&c->space_cv);
    pthread_cond_destroy(&c->idle_cv);
    free(c->prefixes);
    free(c->T);
    free(c);
}

/* --------------------------------------------------------------- layout */

int kvs_connector_register_layout(kvs_connector *c, const kvs_tensor_layout *tensors,
                                  size_t n_tensors, uint32_t num_blocks)
{
    if (!c || !tensors || !n_tensors || n_tensors > (1u << 20) || !num_blocks)
        return KVS_ERR_INVALID;
    if (c->device == -1) return KVS_ERR_UNSUPPORTED;
    conn_tensor *T = calloc(n_tensors, sizeof *T);
    if (!T) return KVS_ERR_NOMEM;
    uint64_t off = CONN_HDR_BYTES;
    int rc = KVS_OK;
    for (size_t i = 0; i < n_tensors; i++) {
        const kvs_tensor_layout *L = &tensors[i];
        if (!L->base || !L->chunk_bytes || !L->count || L->chunk_bytes > CONN_MAX_BLOCK_BYTES ||
            L->count > CONN_MAX_BLOCK_BYTES || (L->count > 1 && L->chunk_stride < L->chunk_bytes)) {
            rc = KVS_ERR_INVALID;
            break;
        }
        uint64_t bytes = L->chunk_bytes * L->count;
        if (bytes > CONN_MAX_BLOCK_BYTES || off + bytes > CONN_MAX_BLOCK_BYTES) {
            rc = KVS_ERR_TOO_LARGE;
            break;
        }
        T[i].base = L->base;
        T[i].block_stride = L->block_stride;
        T[i].payload_off = off;
        if (L->count == 1 || L->chunk_stride == L->chunk_bytes) { /* contiguous: one chunk */
            T[i].chunk_bytes = bytes;
            T[i].chunk_stride = bytes;
            T[i].count = 1;
        } else {
            T[i].chunk_bytes = L->chunk_bytes;
            T[i].chunk_stride = L->chunk_stride;
            T[i].count = L->count;
        }
        off += bytes;
    }
    /* The fingerprint covers what defines the object's bytes: per tensor,
     * chunk size and count, never addresses or strides. */
    uint64_t fp = rc == KVS_OK ? conn_layout_fp(tensors, n_tensors) : 0;
    if (rc == KVS_OK && !fp) rc = KVS_ERR_NOMEM;
    if (rc != KVS_OK) {
        free(T);
        return rc;
    }
    if (conn_enter(c) != KVS_OK) {
        free(T);
        return KVS_ERR_CLOSED;
    }
    pthread_mutex_lock(&c->mu);
    if (c->have_layout) {
        pthread_mutex_unlock(&c->mu);
        conn_leave(c);
        free(T);
        return KVS_ERR_INVALID;
    }
    c->T = T;
    c->nt = n_tensors;
    c->num_blocks = num_blocks;
    c->payload_bytes = off - CONN_HDR_BYTES;
    c->block_bytes = off;
    c->layout_fp = fp;
    c->job_blocks = conn_job_blocks(c, c->block_bytes);
#ifdef KVS_HAVE_CUDA
    if (c->backend == BK_CUDA) {
        kvs_cuda_tensor *ct = calloc(n_tensors, sizeof *ct);
        rc = ct ? KVS_OK : KVS_ERR_NOMEM;
        for (size_t i = 0; ct && i < n_tensors; i++)
            ct[i] = (kvs_cuda_tensor){T[i].base,        T[i].block_stride, T[i].chunk_bytes,
                                      T[i].chunk_stride, T[i].payload_off,  T[i].count};
        if (ct) rc = kvs_cuda_ctx_set_layout(c->cx, ct, n_tensors, CONN_STAMP_OFF);
        free(ct);
        if (rc == KVS_OK) {
            c->backend_name = kvs_cuda_mode_name(kvs_cuda_ctx_mode(c->cx));
            kvs_cuda_preregister(c->cx); /* pin the pool now, not in the first dump */
        }
        if (rc != KVS_OK) {
            c->T = NULL;
            pthread_mutex_unlock(&c->mu);
            conn_leave(c);
            free(T);
            return rc;
        }
    }
#endif
    c->have_layout = 1;
    pthread_mutex_unlock(&c->mu);
    conn_leave(c);
    return KVS_OK;
}

uint64_t kvs_connector_block_bytes(const kvs_connector *c)
{
    return c && c->have_layout ? c->block_bytes : 0;
}

uint64_t kvs_connector_layout_fingerprint(const kvs_connector *c)
{
    return c && c->have_layout ? c->layout_fp : 0;
}

/* ----------------------------------------------------------------- misc */

void kvs_connector_get_counters(kvs_connector *c, kvs_connector_counters *out)
{
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!c) return;
    out->dumped_blocks = atomic_load(&c->n_dumped);
    out->loaded_blocks = atomic_load(&c->n_loaded);
    out->missed_blocks = atomic_load(&c->n_missed);
    out->failed_blocks = atomic_load(&c->n_failed);
    out->dropped_blocks = atomic_load(&c->n_dropped);
    out->skipped_blocks = atomic_load(&c->n_skipped);
    out->bytes_dumped = atomic_load(&c->n_bytes_dumped);
    out->bytes_loaded = atomic_load(&c->n_bytes_loaded);
    out->readahead_stripes = atomic_load(&c->n_readahead);
}

const char *kvs_connector_backend(const kvs_connector *c)
{
    return c ? c->backend_name : "none";
}

kvs_client *kvs_connector_client(kvs_connector *c) { return c ? c->cl : NULL; }
