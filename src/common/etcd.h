/* A small client of etcd's v3 API through its JSON gateway (HTTP POST of
 * JSON to /v3/kv/range, /v3/kv/put, /v3/kv/txn, /v3/kv/deleterange,
 * /v3/lease/grant, /v3/lease/keepalive, /v3/lease/revoke), with libcurl and
 * cJSON. Used by the master's leader election (src/master/election.c), by
 * clients and nodes that find the leader from an
 * `etcd://host:port[,host:port][/prefix]` master_server_address, and by the
 * metadata client for an etcd:// metadata_server.
 *
 * Keys and values are bytes (base64 on the wire, as the gateway wants);
 * int64 fields arrive as JSON strings. Every reply is input from another
 * process: the parsers below check types and sizes and never trust a
 * length, and they are fuzzed (tests/fuzz/fuzz_etcd.c).
 *
 * Errors are negative kvs_error codes: KVS_ERR_INVALID (bad argument),
 * KVS_ERR_CONN (no endpoint answered), KVS_ERR_TIMEOUT, KVS_ERR_PROTO (a
 * reply that is not the JSON expected, or an HTTP status other than 200),
 * KVS_ERR_NOT_FOUND, KVS_ERR_EXISTS, KVS_ERR_TOO_LARGE, KVS_ERR_NOMEM. */
#ifndef KVS_COMMON_ETCD_H
#define KVS_COMMON_ETCD_H

#include <stddef.h>
#include <stdint.h>

#define KVS_ETCD_MAX_ENDPOINTS 8
#define KVS_ETCD_MAX_REPLY (8u << 20)   /* a reply larger than this is KVS_ERR_TOO_LARGE */
#define KVS_ETCD_DEFAULT_PREFIX "kvshelf"

typedef struct kvs_etcd kvs_etcd;

/* One key-value pair of a range reply: key and value are malloc'd and NUL-
 * terminated after their lengths (they may hold NUL bytes themselves). */
typedef struct kvs_etcd_kv {
    char *key;
    size_t key_len;
    char *value;
    size_t value_len;
    int64_t lease, create_revision, mod_revision;
} kvs_etcd_kv;

/* Splits "etcd://h:p[,h:p...][/prefix]" (';' also separates endpoints, as
 * Mooncake writes them) into `endpoints` ("h:p,h:p") and `prefix` (without
 * leading or trailing '/'; KVS_ETCD_DEFAULT_PREFIX when none is given).
 * KVS_OK, or KVS_ERR_INVALID (not etcd://, no endpoint, an endpoint that is
 * not host:port, more than KVS_ETCD_MAX_ENDPOINTS) / KVS_ERR_TOO_LARGE
 * (does not fit the buffers). Writes nothing on error except a truncated
 * empty string. */
int kvs_etcd_parse_url(const char *url, char *endpoints, size_t ecap, char *prefix, size_t pcap);

/* Creates a client of the endpoints "h:p[,h:p...]" (';' accepted too); each
 * request tries the endpoint that answered last, then the others, each
 * bounded by timeout_ms (<= 0: 1000). KVS_OK and *out (free with
 * kvs_etcd_free), KVS_ERR_INVALID, KVS_ERR_NOMEM, KVS_ERR_IO (libcurl
 * failed to initialise). The client is thread-safe (one request at a time). */
int kvs_etcd_new(const char *endpoints, int timeout_ms, kvs_etcd **out);

/* Frees the client. Safe with NULL. */
void kvs_etcd_free(kvs_etcd *e);

/* Reads `key` (NUL-terminated): KVS_OK with *val (malloc'd, NUL after its
 * *len bytes; caller frees) and its *lease (0 = none; lease may be NULL),
 * or KVS_ERR_NOT_FOUND, or a transport error. */
int kvs_etcd_get(kvs_etcd *e, const char *key, char **val, size_t *len, int64_t *lease);

/* Lists the keys that start with `prefix`: KVS_OK with *kvs (free with
 * kvs_etcd_kvs_free) and *n (may be 0), or an error. At most `limit` pairs
 * (0 = no limit). */
int kvs_etcd_list(kvs_etcd *e, const char *prefix, size_t limit, kvs_etcd_kv **kvs, size_t *n);

/* Stores `len` bytes at `val` under `key`, attached to lease `lease` (0 =
 * none). KVS_OK or an error. */
int kvs_etcd_put(kvs_etcd *e, const char *key, const void *val, size_t len, int64_t lease);

/* Stores `key` only if it does not exist (one transaction comparing its
 * create revision with 0), attached to `lease` (0 = none): KVS_OK if this
 * call created it, KVS_ERR_EXISTS if it existed, or a transport error. */
int kvs_etcd_create(kvs_etcd *e, const char *key, const void *val, size_t len, int64_t lease);

/* Deletes `key`; *deleted (may be NULL) gets how many keys went (0 or 1).
 * KVS_OK or a transport error. */
int kvs_etcd_delete(kvs_etcd *e, const char *key, int64_t *deleted);

/* Grants a lease of ttl_s seconds: KVS_OK and *id, or an error. */
int kvs_etcd_lease_grant(kvs_etcd *e, int64_t ttl_s, int64_t *id);

/* Renews lease `id` once: KVS_OK and *ttl_s (its TTL again, > 0), or
 * KVS_ERR_NOT_FOUND (the lease expired or was revoked), or a transport
 * error. */
int kvs_etcd_lease_keepalive(kvs_etcd *e, int64_t id, int64_t *ttl_s);

/* Revokes lease `id` (its keys go with it). KVS_OK, KVS_ERR_NOT_FOUND or a
 * transport error. */
int kvs_etcd_lease_revoke(kvs_etcd *e, int64_t id);

/* Frees what kvs_etcd_list / kvs_etcd_parse_range returned. Safe with NULL. */
void kvs_etcd_kvs_free(kvs_etcd_kv *kvs, size_t n);

/* ---- reply parsers (no I/O; `json` need not be NUL-terminated) ---- */

/* A /v3/kv/range reply: KVS_OK with *kvs (caller frees with
 * kvs_etcd_kvs_free; NULL when *n is 0) and *n, or KVS_ERR_PROTO (not the
 * JSON expected: wrong types, bad base64, an int64 that is not a number) /
 * KVS_ERR_NOMEM. */
int kvs_etcd_parse_range(const char *json, size_t len, kvs_etcd_kv **kvs, size_t *n);

/* A lease grant or keepalive reply (a keepalive's fields are under
 * "result"): KVS_OK with *id and *ttl_s (0 when the field is absent: etcd
 * omits zero values, and a keepalive of an expired lease has TTL 0), or
 * KVS_ERR_PROTO / KVS_ERR_NOMEM. */
int kvs_etcd_parse_lease(const char *json, size_t len, int64_t *id, int64_t *ttl_s);

/* A /v3/kv/txn reply: KVS_OK with *succeeded (0 or 1; absent means 0), or
 * KVS_ERR_PROTO / KVS_ERR_NOMEM. */
int kvs_etcd_parse_txn(const char *json, size_t len, int *succeeded);

/* A /v3/kv/deleterange reply: KVS_OK with *deleted, or KVS_ERR_PROTO /
 * KVS_ERR_NOMEM. */
int kvs_etcd_parse_deleted(const char *json, size_t len, int64_t *deleted);

/* An error reply ({"error": "...", "code": N, ...}): KVS_OK with the gRPC
 * code in *code and the message copied (NUL-terminated, truncated) into
 * msg[cap]; KVS_ERR_PROTO when it is not one. */
int kvs_etcd_parse_error(const char *json, size_t len, int *code, char *msg, size_t cap);

/* Standard base64 (with padding) of src[0..n) into dst, which must hold
 * kvs_b64_len(n) + 1 bytes; NUL-terminates and returns the length. */
size_t kvs_b64_encode(const void *src, size_t n, char *dst);
#define kvs_b64_len(n) ((((n) + 2) / 3) * 4)

/* Decodes standard base64 (padding optional, no whitespace) of src[0..n)
 * into dst (at least n / 4 * 3 + 3 bytes): KVS_OK and *out_len, or
 * KVS_ERR_PROTO on a character outside the alphabet or a bad length. */
int kvs_b64_decode(const char *src, size_t n, uint8_t *dst, size_t *out_len);

#endif
