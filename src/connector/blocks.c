/* KV connector: block dumps and loads (kvs_connector_dump / load): blocks of
 * the registered layout, checked and started as tasks. */
#include "connector/conn_internal.h"

static int start_blocks(kvs_connector *c, int kind, const kvs_key *hashes,
                        const uint32_t *block_ids, size_t n, void *after_event, kvs_task **task)
{
    if (!c || !task || (n && (!hashes || !block_ids))) return KVS_ERR_INVALID;
    *task = NULL;
    if (c->device == -1) return KVS_ERR_UNSUPPORTED;
    if (!c->have_layout) return KVS_ERR_LAYOUT;
    if (after_event && c->backend != BK_CUDA) return KVS_ERR_INVALID;
    for (size_t i = 0; i < n; i++) {
        if (!conn_valid_hash(&hashes[i])) return KVS_ERR_INVALID;
        if (block_ids[i] >= c->num_blocks) return KVS_ERR_LAYOUT;
    }
    int rc = conn_enter(c);
    if (rc != KVS_OK) return rc;
    kvs_task *t = conn_task_new(c, kind, hashes, block_ids, n, c->job_blocks, 0);
    if (!t) {
        conn_leave(c);
        return KVS_ERR_NOMEM;
    }
    return conn_task_start(c, t, after_event, task);
}

int kvs_connector_dump(kvs_connector *c, const kvs_key *hashes, const uint32_t *block_ids,
                       size_t n, void *after_event, kvs_task **task)
{
    return start_blocks(c, TASK_DUMP, hashes, block_ids, n, after_event, task);
}

int kvs_connector_load(kvs_connector *c, const kvs_key *hashes, const uint32_t *block_ids,
                       size_t n, kvs_task **task)
{
    return start_blocks(c, TASK_LOAD, hashes, block_ids, n, NULL, task);
}
