/* KV connector: lookups (kvs_connector_lookup / lookup_prefix): which block
 * hashes are stored, for this rank or, on a lookup-only client, every rank. */
#include <stdlib.h>

#include "connector/conn_internal.h"

int kvs_connector_lookup(kvs_connector *c, const kvs_key *hashes, size_t n, uint8_t *hit)
{
    if (!c || (n && (!hashes || !hit))) return KVS_ERR_INVALID;
    if (!n) return KVS_OK;
    for (size_t i = 0; i < n; i++)
        if (!conn_valid_hash(&hashes[i])) return KVS_ERR_INVALID;
    uint32_t nr = c->device == -1 ? c->world : 1;
    if (n > SIZE_MAX / nr / CONN_KEY_MAX) return KVS_ERR_INVALID;
    size_t nk = n * nr;
    kvs_key *keys = malloc(nk * sizeof *keys);
    uint8_t *mem = malloc(nk * CONN_KEY_MAX);
    uint8_t *found = malloc(nk);
    int rc = keys && mem && found ? KVS_OK : KVS_ERR_NOMEM;
    if (rc == KVS_OK) rc = conn_enter(c);
    if (rc == KVS_OK) {
        uint8_t *p = mem;
        for (uint32_t r = 0; r < nr; r++)
            for (size_t i = 0; i < n; i++) {
                keys[r * n + i] = conn_key_at(p, c->prefixes[r], &hashes[i]);
                p += keys[r * n + i].len;
            }
        rc = kvs_exists_batch(c->cl, keys, nk, found);
        conn_leave(c);
        if (rc >= 0) {
            rc = KVS_OK;
            for (size_t i = 0; i < n; i++) {
                uint8_t h = 1;
                for (uint32_t r = 0; r < nr; r++) h &= found[r * n + i] ? 1 : 0;
                hit[i] = h;
            }
        }
    }
    free(keys);
    free(mem);
    free(found);
    return rc;
}

int kvs_connector_lookup_prefix(kvs_connector *c, const kvs_key *hashes, size_t n)
{
    if (!c || (n && !hashes) || n > INT32_MAX) return KVS_ERR_INVALID;
    if (!n) return 0;
    uint8_t *hit = malloc(n);
    if (!hit) return KVS_ERR_NOMEM;
    int rc = kvs_connector_lookup(c, hashes, n, hit);
    if (rc == KVS_OK) {
        size_t k = 0;
        while (k < n && hit[k]) k++;
        rc = (int)k;
    }
    free(hit);
    return rc;
}
