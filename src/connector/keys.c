/* KV connector: key namespaces, store keys and fingerprints (layout and
 * parts). See include/kvshelf/connector.h ("Keys"). */
#include <string.h>
#include <xxhash.h>

#include "connector/conn_internal.h"

#define PARTS_FP_SEED 0x6b76737061727473ull /* "kvsparts" */

int conn_valid_hash(const kvs_key *h)
{
    return h && h->data && h->len >= 1 && h->len <= KVS_HASH_MAX;
}

void conn_make_prefix(const char *ns, uint32_t world, uint32_t rank,
                      uint8_t out[KVS_CONNECTOR_PREFIX_BYTES])
{
    static const char tag[] = "kvshelf-connector-v1";
    size_t nl = strlen(ns);
    uint8_t buf[sizeof tag + KVS_NAMESPACE_MAX + 1 + 8];
    size_t k = 0;
    memcpy(buf, tag, sizeof tag); /* includes the NUL */
    k += sizeof tag;
    memcpy(buf + k, ns, nl);
    k += nl;
    buf[k++] = 0;
    for (int i = 0; i < 4; i++) buf[k++] = (uint8_t)(world >> (8 * i));
    for (int i = 0; i < 4; i++) buf[k++] = (uint8_t)(rank >> (8 * i));
    XXH128_hash_t h = XXH3_128bits(buf, k);
    for (int i = 0; i < 8; i++) out[i] = (uint8_t)(h.low64 >> (8 * i));
    for (int i = 0; i < 8; i++) out[8 + i] = (uint8_t)(h.high64 >> (8 * i));
}

kvs_key conn_key_at(uint8_t *p, const uint8_t *prefix, const kvs_key *hash)
{
    const size_t pfx = prefix ? KVS_CONNECTOR_PREFIX_BYTES : 0;
    if (pfx) memcpy(p, prefix, pfx);
    memcpy(p + pfx, hash->data, hash->len);
    return (kvs_key){p, pfx + hash->len};
}

int kvs_connector_store_key(const char *ns, uint32_t world_size, uint32_t rank,
                            const kvs_key *hash, uint8_t *out, size_t cap)
{
    if (!ns || !*ns || strlen(ns) > KVS_NAMESPACE_MAX || !conn_valid_hash(hash) || !out)
        return KVS_ERR_INVALID;
    if (world_size == 0) world_size = 1;
    if (rank >= world_size) return KVS_ERR_INVALID;
    if (cap < KVS_CONNECTOR_PREFIX_BYTES + hash->len) return KVS_ERR_TOO_LARGE;
    uint8_t prefix[KVS_CONNECTOR_PREFIX_BYTES];
    conn_make_prefix(ns, world_size, rank, prefix);
    return (int)conn_key_at(out, prefix, hash).len;
}

uint64_t conn_layout_fp(const kvs_tensor_layout *tensors, size_t n)
{
    /* streamed: (version, n) then per tensor (chunk_bytes, count) */
    uint32_t v = CONN_VERSION;
    uint64_t nt = n;
    XXH3_state_t *st = XXH3_createState();
    if (!st) return 0;
    XXH3_64bits_reset(st);
    XXH3_64bits_update(st, &v, sizeof v);
    XXH3_64bits_update(st, &nt, sizeof nt);
    for (size_t i = 0; i < n; i++) {
        uint64_t geo[2] = {tensors[i].chunk_bytes, tensors[i].count};
        XXH3_64bits_update(st, geo, sizeof geo);
    }
    uint64_t fp = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    return fp ? fp : 1;
}

uint64_t conn_parts_fp(size_t ppo, const uint64_t *lens, uint64_t tag)
{
    /* lens then (ppo, tag), hashed in one pass over a small buffer when it fits */
    uint64_t buf[64 + 2];
    uint64_t fp;
    if (ppo <= 64) {
        memcpy(buf, lens, ppo * sizeof *lens);
        buf[ppo] = (uint64_t)ppo;
        buf[ppo + 1] = tag;
        fp = XXH3_64bits_withSeed(buf, (ppo + 2) * sizeof *buf, PARTS_FP_SEED);
    } else {
        uint64_t h = XXH3_64bits_withSeed(lens, ppo * sizeof *lens, PARTS_FP_SEED);
        uint64_t t3[3] = {h, (uint64_t)ppo, tag};
        fp = XXH3_64bits_withSeed(t3, sizeof t3, PARTS_FP_SEED ^ 1);
    }
    return fp ? fp : 1;
}

uint64_t conn_parts_fp_rep(size_t ppo, const uint64_t *lens, uint32_t reps, uint64_t tag)
{
    if (reps <= 1) return conn_parts_fp(ppo, lens, tag);
    size_t total = ppo * reps;
    if (total <= 64) {
        uint64_t buf[64];
        for (uint32_t r = 0; r < reps; r++) memcpy(buf + (size_t)r * ppo, lens, ppo * sizeof *lens);
        return conn_parts_fp(total, buf, tag);
    }
    /* the streaming hash of the repeated lengths equals the one-shot hash of
     * the whole list (conn_parts_fp's path for more than 64 parts) */
    XXH3_state_t *st = XXH3_createState();
    if (!st) return 0;
    XXH3_64bits_reset_withSeed(st, PARTS_FP_SEED);
    for (uint32_t r = 0; r < reps; r++) XXH3_64bits_update(st, lens, ppo * sizeof *lens);
    uint64_t h = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    uint64_t t3[3] = {h, (uint64_t)total, tag};
    uint64_t fp = XXH3_64bits_withSeed(t3, sizeof t3, PARTS_FP_SEED ^ 1);
    return fp ? fp : 1;
}
