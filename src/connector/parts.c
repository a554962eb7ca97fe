/* KV connector: dumps and loads of objects given as explicit parts
 * (kvs_connector_dump_parts / load_parts; see include/kvshelf/connector.h):
 * arguments checked, parts' addresses, lengths and fingerprints copied into
 * a task. No registered layout: each task carries its parts. The jobs run
 * as block jobs do (dump.c, load.c); those of striped objects in stripes.c. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "connector/conn_internal.h"

#define PARTS_MAX_PPO (1u << 16)

/* ---------------------------------------------------------------- start */

static int start_parts(kvs_connector *c, int kind, const kvs_key *hashes, size_t n,
                       const uint64_t *addrs, const uint64_t *lens, size_t ppo, void *ev,
                       const kvs_parts_opts *opts, kvs_task **task)
{
    if (!c || !task) return KVS_ERR_INVALID;
    *task = NULL;
    if (n && (!hashes || !addrs || !lens)) return KVS_ERR_INVALID;
    if (!ppo || ppo > PARTS_MAX_PPO || n > SIZE_MAX / 16 / ppo) return KVS_ERR_INVALID;
    if (c->device == -1) return KVS_ERR_UNSUPPORTED;
    if (ev && c->backend != BK_CUDA) return KVS_ERR_INVALID;
    int raw = opts && opts->raw_keys;
    uint32_t stripes = opts && opts->stripes > 1 ? opts->stripes : 1;
    uint32_t stripe = stripes > 1 ? opts->stripe : 0;
    if (stripes > CONN_MAX_STRIPES || stripe >= stripes || (uint64_t)ppo * stripes > (1u << 24))
        return KVS_ERR_INVALID;
    if (stripes > 1 && c->backend == BK_NONE) return KVS_ERR_UNSUPPORTED;
    uint64_t max_obj = CONN_HDR_BYTES;
    for (size_t i = 0; i < n; i++) {
        if (raw ? !hashes[i].data || hashes[i].len < 1 || hashes[i].len > KVS_KEY_MAX
                : !conn_valid_hash(&hashes[i]))
            return KVS_ERR_INVALID;
        uint64_t sum = CONN_HDR_BYTES;
        for (size_t k = 0; k < ppo; k++) {
            uint64_t a = addrs[i * ppo + k], l = lens[i * ppo + k];
            if (!a || !l) return KVS_ERR_INVALID;
            if (l > CONN_MAX_BLOCK_BYTES || sum + l > CONN_MAX_BLOCK_BYTES)
                return KVS_ERR_TOO_LARGE;
            sum += l;
        }
        /* a striped object holds `stripes` of these */
        if (stripes > 1 && (sum - CONN_HDR_BYTES) * stripes > CONN_MAX_BLOCK_BYTES - CONN_HDR_BYTES)
            return KVS_ERR_TOO_LARGE;
        if (sum > max_obj) max_obj = sum; /* a job moves one stripe of each object */
    }

    int rc = conn_enter(c);
    if (rc != KVS_OK) return rc;
    kvs_task *t = conn_task_new(c, kind, hashes, NULL, n, conn_job_blocks(c, max_obj), raw);
    if (t) {
        t->parts = 1;
        t->ppo = ppo;
        t->stripe = stripe;
        t->stripes = stripes;
        size_t np = n * ppo;
        if (!np) np = 1;
        t->paddrs = malloc(np * sizeof *t->paddrs);
        t->plens = malloc(np * sizeof *t->plens);
        t->pfp = malloc((n ? n : 1) * sizeof *t->pfp);
        t->pbytes = malloc((n ? n : 1) * sizeof *t->pbytes);
        rc = t->paddrs && t->plens && t->pfp && t->pbytes ? KVS_OK : KVS_ERR_NOMEM;
    } else {
        rc = KVS_ERR_NOMEM;
    }
    if (rc == KVS_OK) {
        memcpy(t->paddrs, addrs, n * ppo * sizeof *addrs);
        memcpy(t->plens, lens, n * ppo * sizeof *lens);
        const uint64_t *tags = opts ? opts->tags : NULL;
        for (size_t i = 0; i < n; i++) {
            const uint64_t *li = lens + i * ppo;
            uint64_t sum = 0;
            for (size_t k = 0; k < ppo; k++) sum += li[k];
            t->pbytes[i] = sum * stripes;
            /* objects of the same lengths and tag as the one before share its
             * fingerprint (the common case: every object alike) */
            if (i && (tags ? tags[i] == tags[i - 1] : 1) && !memcmp(li, li - ppo, ppo * sizeof *li))
                t->pfp[i] = t->pfp[i - 1];
            else
                t->pfp[i] = conn_parts_fp_rep(ppo, li, stripes, tags ? tags[i] : 0);
            if (!t->pfp[i]) rc = KVS_ERR_NOMEM;
        }
    }
    if (rc != KVS_OK) {
        if (t) conn_task_drop(t); /* nothing started */
        conn_leave(c);
        return rc;
    }
    return conn_task_start(c, t, ev, task);
}

int kvs_connector_dump_parts_ex(kvs_connector *c, const kvs_key *hashes, size_t n,
                                const uint64_t *addrs, const uint64_t *lens,
                                size_t parts_per_obj, void *after_event,
                                const kvs_parts_opts *opts, kvs_task **task)
{
    return start_parts(c, TASK_DUMP, hashes, n, addrs, lens, parts_per_obj, after_event, opts,
                       task);
}

int kvs_connector_load_parts_ex(kvs_connector *c, const kvs_key *hashes, size_t n,
                                const uint64_t *addrs, const uint64_t *lens,
                                size_t parts_per_obj, const kvs_parts_opts *opts,
                                kvs_task **task)
{
    return start_parts(c, TASK_LOAD, hashes, n, addrs, lens, parts_per_obj, NULL, opts, task);
}

int kvs_connector_dump_parts(kvs_connector *c, const kvs_key *hashes, size_t n,
                             const uint64_t *addrs, const uint64_t *lens, size_t parts_per_obj,
                             void *after_event, kvs_task **task)
{
    return start_parts(c, TASK_DUMP, hashes, n, addrs, lens, parts_per_obj, after_event, NULL,
                       task);
}

int kvs_connector_load_parts(kvs_connector *c, const kvs_key *hashes, size_t n,
                             const uint64_t *addrs, const uint64_t *lens, size_t parts_per_obj,
                             kvs_task **task)
{
    return start_parts(c, TASK_LOAD, hashes, n, addrs, lens, parts_per_obj, NULL, NULL, task);
}
