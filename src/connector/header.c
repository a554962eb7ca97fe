/* KV connector: stored object headers (conn_hdr): what an object of a task
 * must be, building a header on dump, checking one on load, generations.
 * See include/kvshelf/connector.h ("Stored object"). */
#include <stdatomic.h>
#include <string.h>
#include <xxhash.h>

#include "common/log.h"
#include "connector/conn_internal.h"

uint64_t conn_next_gen(kvs_connector *c)
{
    for (;;) {
        uint64_t g = c->gen_base + atomic_fetch_add(&c->gen_ctr, 1) * 0x9E3779B97F4A7C15ull;
        if (g) return g;
    }
}

conn_obj conn_task_obj(const kvs_connector *c, const kvs_task *t, size_t i)
{
    if (t->parts)
        return (conn_obj){.bytes = CONN_HDR_BYTES + t->pbytes[i],
                          .payload = t->pbytes[i],
                          .n_tensors = (uint32_t)(t->ppo * (t->stripes ? t->stripes : 1)),
                          .flags = CONN_FLAG_PARTS,
                          .fp = t->pfp[i]};
    return (conn_obj){.bytes = c->block_bytes,
                      .payload = c->payload_bytes,
                      .n_tensors = (uint32_t)c->nt,
                      .flags = 0,
                      .fp = c->layout_fp};
}

static uint64_t key_stamp(const kvs_key *key) { return XXH3_64bits(key->data, key->len); }

static uint64_t payload_sum(const void *obj, const conn_obj *g)
{
    return XXH3_64bits((const uint8_t *)obj + CONN_HDR_BYTES, g->payload);
}

uint64_t conn_hdr_write(kvs_connector *c, void *obj, const kvs_key *key, const conn_obj *g)
{
    conn_hdr h = {.magic = CONN_MAGIC,
                  .version = CONN_VERSION,
                  .hdr_bytes = CONN_HDR_BYTES,
                  .n_tensors = g->n_tensors,
                  .flags = g->flags,
                  .key_stamp = key_stamp(key),
                  .payload_len = g->payload,
                  .layout_fp = g->fp,
                  .generation = conn_next_gen(c),
                  .checksum = 0,
                  .view_stamp = 0};
    memcpy(obj, &h, sizeof h);
    return h.generation;
}

void conn_hdr_seal(void *obj, const conn_obj *g)
{
    conn_hdr *h = obj;
    h->checksum = payload_sum(obj, g);
    h->flags |= CONN_FLAG_CHECKSUM;
}

int conn_size_status(const conn_obj *g, uint64_t size)
{
    if (size == g->bytes) return KVS_OK;
    /* block: another layout under this key; parts: other part sizes */
    if (!(g->flags & CONN_FLAG_PARTS) || size < CONN_HDR_BYTES) return KVS_ERR_NOT_FOUND;
    return KVS_ERR_TOO_LARGE;
}

int conn_hdr_status(const conn_hdr *h, const kvs_key *key, const conn_obj *g)
{
    if (h->magic != CONN_MAGIC || h->version != CONN_VERSION || h->hdr_bytes != CONN_HDR_BYTES ||
        h->generation == 0 || h->view_stamp != h->generation || h->key_stamp != key_stamp(key))
        return KVS_ERR_NOT_FOUND;
    if (!(g->flags & CONN_FLAG_PARTS)) /* any other geometry is a miss */
        return h->n_tensors == g->n_tensors && h->payload_len == g->payload &&
                       h->layout_fp == g->fp
                   ? KVS_OK
                   : KVS_ERR_NOT_FOUND;
    if (!(h->flags & CONN_FLAG_PARTS)) return KVS_ERR_NOT_FOUND;
    if (h->payload_len != g->payload) return KVS_ERR_TOO_LARGE;
    if (h->n_tensors != g->n_tensors || h->layout_fp != g->fp) return KVS_ERR_CORRUPT;
    return KVS_OK;
}

int conn_hdr_check(const kvs_connector *c, const void *obj, const kvs_key *key,
                   const conn_obj *g, uint64_t *gen)
{
    conn_hdr h;
    memcpy(&h, obj, sizeof h);
    int st = conn_hdr_status(&h, key, g);
    if (st != KVS_OK) {
        KVS_LOGD("connector: header mismatch on load");
        return st;
    }
    if (c->checksum && (h.flags & CONN_FLAG_CHECKSUM) && payload_sum(obj, g) != h.checksum) {
        KVS_LOGW("connector: checksum mismatch on load");
        return g->flags & CONN_FLAG_PARTS ? KVS_ERR_CORRUPT : KVS_ERR_NOT_FOUND;
    }
    *gen = h.generation;
    return KVS_OK;
}
