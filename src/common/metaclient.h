/* A tiny client of Mooncake's HTTP metadata protocol (libcurl):
 * GET|PUT|DELETE <url>?key=K against a `metadata_server` URL such as
 * "http://127.0.0.1:23790/metadata". Used by clients that publish their
 * segment descriptor when metadata_server is set.
 *
 * An "etcd://host:port[,host:port]" URL stores the keys in etcd instead,
 * as they are (its v3 JSON gateway, src/common/etcd.h; no secret sent).
 *
 * Each call is independent (one connection per call), thread-safe, and
 * bounded by timeout_ms (<= 0 means KVS_DEFAULT_TIMEOUT_MS). Proxies from the
 * environment are ignored; only http:// and https:// URLs are used.
 * Keys are URL-encoded here; pass them raw (NUL-terminated).
 * `secret` (NULL or "" = none) is sent as "Authorization: Bearer <secret>",
 * which a kvshelf master with a secret requires for /metadata; a server
 * that refuses the credentials (401, 403) gives KVS_ERR_AUTH.
 * Errors: KVS_ERR_INVALID (NULL/empty url or key, not an http(s) or etcd URL),
 * KVS_ERR_NOT_FOUND (404), KVS_ERR_CONN (cannot connect), KVS_ERR_TIMEOUT,
 * KVS_ERR_TOO_LARGE (413, or a reply over KVS_METACLIENT_MAX_VALUE),
 * KVS_ERR_EXISTS (400 on a PUT: Mooncake's duplicate rpc_meta rule),
 * KVS_ERR_NO_SPACE (507), KVS_ERR_AUTH (401, 403), KVS_ERR_PROTO (any other status),
 * KVS_ERR_NOMEM, KVS_ERR_IO (other libcurl failures). */
#ifndef KVS_METACLIENT_H
#define KVS_METACLIENT_H

#include <stddef.h>

#define KVS_METACLIENT_MAX_VALUE (64u << 20)

/* Fetches the value of `key`: on KVS_OK *val is a malloc'd copy with a NUL
 * after its *len bytes (caller frees; len may be NULL). On error *val = NULL. */
int kvs_meta_get(const char *url, const char *key, const char *secret, int timeout_ms,
                 char **val, size_t *len);

/* Stores `len` bytes at `val` under `key` (sent as application/json, as
 * Mooncake does; the bytes are not checked). */
int kvs_meta_put(const char *url, const char *key, const char *secret, const void *val,
                 size_t len, int timeout_ms);

/* Deletes `key`; KVS_ERR_NOT_FOUND if the server did not have it. */
int kvs_meta_delete(const char *url, const char *key, const char *secret, int timeout_ms);

#endif
