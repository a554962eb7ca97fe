/* Mooncake-compatible metadata service: an in-memory key -> value store
 * behind `GET|PUT|DELETE <url>?key=K`, answering as Mooncake's HTTP metadata
 * servers do (mooncake_http_metadata_server):
 *   no `key` (or only whitespace)  400 "metadata key is required"
 *   GET    200 + stored bytes, or 404 "metadata not found"
 *   PUT    200 "metadata updated" (the body is stored as raw bytes; JSON is
 *          not required). A key containing "rpc_meta" that already exists:
 *          same value 200 "metadata unchanged", other value 400
 *          "Duplicate rpc_meta key not allowed" (Mooncake's rule).
 *   DELETE 200 "metadata deleted", or 404 "metadata not found"
 *   other methods 405 "Method not allowed"
 * Every response has Content-Type application/json (as Mooncake's).
 * kvshelf's own limits: key longer than the limit 400 "metadata key too
 * long"; value over max_value_bytes 413 "metadata value too large"; store
 * full 507 "metadata key budget exhausted" / "metadata size budget
 * exhausted" (the texts of Mooncake's bounded server).
 * Thread-safe. */
#ifndef KVS_METADATA_H
#define KVS_METADATA_H

#include <stddef.h>

#include "metadata/http.h"

typedef struct kvs_metadata kvs_metadata;

/* Bounds of one store; 0 in a field means its default. */
typedef struct kvs_metadata_limits {
    size_t max_keys;        /* default 65536 */
    size_t max_key_bytes;   /* default 4096 */
    size_t max_value_bytes; /* default KVS_HTTP_MAX_BODY (16 MiB) */
    size_t max_total_bytes; /* keys + values, default 1 GiB */
} kvs_metadata_limits;

/* Creates an empty store with the default limits; NULL on out of memory. */
kvs_metadata *kvs_metadata_new(void);

/* Creates an empty store with `lim` (NULL = defaults); NULL on out of memory. */
kvs_metadata *kvs_metadata_new_ex(const kvs_metadata_limits *lim);

/* Frees the store and every value. Safe with NULL. */
void kvs_metadata_free(kvs_metadata *m);

/* Serves one HTTP request addressed to the metadata URL (the caller routes
 * by path; the path itself is not checked). Fills `resp` (body malloc'd,
 * content_type static). Never fails: errors become HTTP statuses. */
void kvs_metadata_handle(kvs_metadata *m, const kvs_http_request *req, kvs_http_response *resp);

/* A kvs_http_handler that forwards to kvs_metadata_handle (ud = the store),
 * for servers that serve nothing but metadata. */
void kvs_metadata_http_handler(void *ud, const kvs_http_request *req, kvs_http_response *resp);

/* Number of keys stored (for metrics). */
size_t kvs_metadata_count(kvs_metadata *m);

/* Bytes stored (keys + values, for metrics). */
size_t kvs_metadata_bytes(kvs_metadata *m);

/* In-process access (same rules as HTTP, without the rpc_meta rule).
 * kvs_metadata_put copies key and value; replaces an existing value.
 *   KVS_ERR_INVALID (NULL/empty key), KVS_ERR_TOO_LARGE (key or value over
 *   its limit), KVS_ERR_NO_SPACE (key count or byte limit), KVS_ERR_NOMEM.
 * kvs_metadata_get stores a malloc'd copy (NUL-terminated, not counted in
 *   *len) in *val (caller frees) and its length in *len (may be NULL);
 *   KVS_ERR_NOT_FOUND if absent.
 * kvs_metadata_delete: KVS_OK or KVS_ERR_NOT_FOUND. */
int kvs_metadata_put(kvs_metadata *m, const char *key, const void *val, size_t len);
int kvs_metadata_get(kvs_metadata *m, const char *key, char **val, size_t *len);
int kvs_metadata_delete(kvs_metadata *m, const char *key);

#endif
