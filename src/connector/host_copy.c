/* KV connector: host copy backend (device -2): memcpy between host tensors
 * or parts and the objects of a job, view stamps written/read by the CPU. */
#include <stdint.h>
#include <string.h>

#include "connector/conn_internal.h"

/* obj: start of the object (payload_off counts the header). */
static void gather(const kvs_connector *c, uint32_t bid, uint8_t *obj)
{
    for (size_t t = 0; t < c->nt; t++) {
        const conn_tensor *T = &c->T[t];
        const uint8_t *src = (const uint8_t *)(uintptr_t)(T->base + (uint64_t)bid * T->block_stride);
        uint8_t *dst = obj + T->payload_off;
        for (uint32_t k = 0; k < T->count; k++)
            memcpy(dst + (uint64_t)k * T->chunk_bytes, src + (uint64_t)k * T->chunk_stride,
                   T->chunk_bytes);
    }
}

static void scatter(const kvs_connector *c, uint32_t bid, const uint8_t *obj)
{
    for (size_t t = 0; t < c->nt; t++) {
        const conn_tensor *T = &c->T[t];
        uint8_t *dst = (uint8_t *)(uintptr_t)(T->base + (uint64_t)bid * T->block_stride);
        const uint8_t *src = obj + T->payload_off;
        for (uint32_t k = 0; k < T->count; k++)
            memcpy(dst + (uint64_t)k * T->chunk_stride, src + (uint64_t)k * T->chunk_bytes,
                   T->chunk_bytes);
    }
}

void conn_host_copy_blocks(conn_worker *w, int dir, const uint32_t *bids, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!w->ok[i]) continue;
        if (dir == TASK_DUMP) {
            gather(w->c, bids[i], (uint8_t *)w->obj[i]);
            conn_write_stamp(w->obj[i], w->gen[i]);
        } else {
            w->got[i] = conn_read_stamp(w->obj[i]);
            scatter(w->c, bids[i], (const uint8_t *)w->obj[i]);
        }
    }
}

void conn_host_copy_parts(conn_worker *w, int dir, const uint64_t *addrs, const uint64_t *lens,
                          size_t ppo, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!w->ok[i]) continue;
        uint8_t *o = (uint8_t *)w->obj[i] + CONN_HDR_BYTES;
        if (dir == TASK_LOAD) w->got[i] = conn_read_stamp(w->obj[i]);
        for (size_t k = 0; k < ppo; k++) {
            void *p = (void *)(uintptr_t)addrs[i * ppo + k];
            size_t len = (size_t)lens[i * ppo + k];
            if (dir == TASK_DUMP)
                memcpy(o, p, len);
            else
                memcpy(p, o, len);
            o += len;
        }
        if (dir == TASK_DUMP) conn_write_stamp(w->obj[i], w->gen[i]);
    }
}
