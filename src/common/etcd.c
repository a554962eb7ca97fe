/* etcd v3 JSON-gateway client: see etcd.h. */
#include "common/etcd.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "common/http.h"
#include "common/log.h"
#include "common/net.h"
#include "common/util.h"
#include "kvshelf/errors.h"

#define EP_MAX 300

struct kvs_etcd {
    pthread_mutex_t mu;
    CURL *curl;
    char ep[KVS_ETCD_MAX_ENDPOINTS][EP_MAX];
    int nep;
    int cur;           /* the endpoint that answered last */
    int timeout_ms;
};

/* ---- base64 ---- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t kvs_b64_encode(const void *src, size_t n, char *dst)
{
    const uint8_t *s = src;
    size_t o = 0, i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        dst[o++] = B64[v >> 18];
        dst[o++] = B64[(v >> 12) & 63];
        dst[o++] = B64[(v >> 6) & 63];
        dst[o++] = B64[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0);
        dst[o++] = B64[v >> 18];
        dst[o++] = B64[(v >> 12) & 63];
        dst[o++] = i + 1 < n ? B64[(v >> 6) & 63] : '=';
        dst[o++] = '=';
    }
    dst[o] = '\0';
    return o;
}

static int b64_val(char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62; /* the URL-safe alphabet too */
    if (c == '/' || c == '_') return 63;
    return -1;
}

int kvs_b64_decode(const char *src, size_t n, uint8_t *dst, size_t *out_len)
{
    while (n && src[n - 1] == '=') n--;
    if (n % 4 == 1) return KVS_ERR_PROTO;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64_val(src[i]);
        if (v < 0) return KVS_ERR_PROTO;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            dst[o++] = (uint8_t)(acc >> bits);
        }
    }
    *out_len = o;
    return KVS_OK;
}

/* ---- JSON helpers ---- */

/* An int64 field given as a JSON string (etcd's way) or a number; absent
 * is 0. 0 or -1 (wrong type, not a whole number). */
static int json_i64(const cJSON *o, const char *name, int64_t *out)
{
    *out = 0;
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!it || cJSON_IsNull(it)) return 0;
    if (cJSON_IsString(it) && it->valuestring) {
        const char *s = it->valuestring;
        if (!*s) return -1;
        char *end;
        errno = 0;
        long long v = strtoll(s, &end, 10);
        if (errno || *end) return -1;
        *out = (int64_t)v;
        return 0;
    }
    if (cJSON_IsNumber(it)) {
        double d = it->valuedouble;
        if (!(d >= -9.0e15 && d <= 9.0e15) || d != (double)(int64_t)d) return -1;
        *out = (int64_t)d;
        return 0;
    }
    return -1;
}

/* A bytes field (base64 string) into a malloc'd, NUL-terminated buffer;
 * absent is empty. 0, -1 (malformed) or -2 (no memory). */
static int json_bytes(const cJSON *o, const char *name, char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, name);
    const char *s = "";
    if (it && !cJSON_IsNull(it)) {
        if (!cJSON_IsString(it) || !it->valuestring) return -1;
        s = it->valuestring;
    }
    size_t n = strlen(s);
    char *b = malloc(n / 4 * 3 + 4);
    if (!b) return -2;
    if (kvs_b64_decode(s, n, (uint8_t *)b, len) != KVS_OK) {
        free(b);
        return -1;
    }
    b[*len] = '\0';
    *out = b;
    return 0;
}

static cJSON *parse(const char *json, size_t len)
{
    if (!json || !len) return NULL;
    return cJSON_ParseWithLength(json, len);
}

void kvs_etcd_kvs_free(kvs_etcd_kv *kvs, size_t n)
{
    if (!kvs) return;
    for (size_t i = 0; i < n; i++) {
        free(kvs[i].key);
        free(kvs[i].value);
    }
    free(kvs);
}

int kvs_etcd_parse_range(const char *json, size_t len, kvs_etcd_kv **kvs, size_t *n)
{
    *kvs = NULL;
    *n = 0;
    cJSON *root = parse(json, len);
    if (!root) return KVS_ERR_PROTO;
    int rc = KVS_ERR_PROTO;
    if (!cJSON_IsObject(root)) goto out;
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(root, "kvs");
    if (!arr || cJSON_IsNull(arr)) {
        rc = KVS_OK;
        goto out;
    }
    if (!cJSON_IsArray(arr)) goto out;
    int cnt = cJSON_GetArraySize(arr);
    if (cnt <= 0) {
        rc = KVS_OK;
        goto out;
    }
    kvs_etcd_kv *v = calloc((size_t)cnt, sizeof *v);
    if (!v) {
        rc = KVS_ERR_NOMEM;
        goto out;
    }
    size_t k = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr)
    {
        if (k >= (size_t)cnt) break;
        kvs_etcd_kv *e = &v[k++];
        if (!cJSON_IsObject(it) || json_bytes(it, "key", &e->key, &e->key_len) != 0 ||
            json_bytes(it, "value", &e->value, &e->value_len) != 0 ||
            json_i64(it, "lease", &e->lease) || json_i64(it, "create_revision", &e->create_revision) ||
            json_i64(it, "mod_revision", &e->mod_revision)) {
            kvs_etcd_kvs_free(v, k);
            goto out; /* malformed (a failed malloc reads the same: rare, and harmless) */
        }
    }
    *kvs = v;
    *n = k;
    rc = KVS_OK;
out:
    cJSON_Delete(root);
    return rc;
}

int kvs_etcd_parse_lease(const char *json, size_t len, int64_t *id, int64_t *ttl_s)
{
    *id = 0;
    *ttl_s = 0;
    cJSON *root = parse(json, len);
    if (!root) return KVS_ERR_PROTO;
    int rc = KVS_ERR_PROTO;
    const cJSON *o = root;
    if (cJSON_IsObject(root)) {
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(root, "result");
        if (r) o = r;
        if (cJSON_IsObject(o) && !json_i64(o, "ID", id) && !json_i64(o, "TTL", ttl_s)) rc = KVS_OK;
    }
    cJSON_Delete(root);
    if (rc != KVS_OK) *id = *ttl_s = 0;
    return rc;
}

int kvs_etcd_parse_txn(const char *json, size_t len, int *succeeded)
{
    *succeeded = 0;
    cJSON *root = parse(json, len);
    if (!root) return KVS_ERR_PROTO;
    int rc = KVS_ERR_PROTO;
    if (cJSON_IsObject(root)) {
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(root, "succeeded");
        if (!s || cJSON_IsNull(s)) {
            rc = KVS_OK;
        } else if (cJSON_IsBool(s)) {
            *succeeded = cJSON_IsTrue(s) ? 1 : 0;
            rc = KVS_OK;
        }
    }
    cJSON_Delete(root);
    return rc;
}

int kvs_etcd_parse_deleted(const char *json, size_t len, int64_t *deleted)
{
    *deleted = 0;
    cJSON *root = parse(json, len);
    if (!root) return KVS_ERR_PROTO;
    int rc = cJSON_IsObject(root) && !json_i64(root, "deleted", deleted) ? KVS_OK : KVS_ERR_PROTO;
    cJSON_Delete(root);
    if (rc != KVS_OK) *deleted = 0;
    return rc;
}

int kvs_etcd_parse_error(const char *json, size_t len, int *code, char *msg, size_t cap)
{
    *code = 0;
    if (msg && cap) msg[0] = '\0';
    cJSON *root = parse(json, len);
    if (!root) return KVS_ERR_PROTO;
    int rc = KVS_ERR_PROTO;
    if (cJSON_IsObject(root)) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(root, "code");
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(root, "message");
        if (!cJSON_IsString(m)) m = cJSON_GetObjectItemCaseSensitive(root, "error");
        if (cJSON_IsNumber(c) && c->valuedouble >= 0 && c->valuedouble <= 1000) {
            *code = (int)c->valuedouble;
            if (msg && cap && cJSON_IsString(m) && m->valuestring)
                kvs_strlcpy(msg, m->valuestring, cap);
            rc = KVS_OK;
        }
    }
    cJSON_Delete(root);
    return rc;
}

int kvs_etcd_parse_url(const char *url, char *endpoints, size_t ecap, char *prefix, size_t pcap)
{
    if (ecap) endpoints[0] = '\0';
    if (pcap) prefix[0] = '\0';
    if (!url || strncmp(url, "etcd://", 7) != 0) return KVS_ERR_INVALID;
    const char *p = url + 7;
    size_t hl = strcspn(p, "/");
    if (hl == 0) return KVS_ERR_INVALID;
    if (hl >= ecap) return KVS_ERR_TOO_LARGE;
    char eps[1024];
    if (hl >= sizeof eps) return KVS_ERR_TOO_LARGE;
    memcpy(eps, p, hl);
    eps[hl] = '\0';
    /* check every endpoint */
    int n = 0;
    char *save = NULL, tmp[1024];
    memcpy(tmp, eps, hl + 1);
    for (char *t = strtok_r(tmp, ",;", &save); t; t = strtok_r(NULL, ",;", &save)) {
        kvs_addr a;
        if (++n > KVS_ETCD_MAX_ENDPOINTS || strlen(t) >= EP_MAX ||
            kvs_addr_parse(t, 2379, &a) != KVS_OK || a.is_unix || a.port == 0)
            return KVS_ERR_INVALID;
    }
    if (n == 0) return KVS_ERR_INVALID;
    const char *pre = p + hl;
    while (*pre == '/') pre++;
    size_t pl = strlen(pre);
    while (pl && pre[pl - 1] == '/') pl--;
    if (pl == 0) {
        pre = KVS_ETCD_DEFAULT_PREFIX;
        pl = strlen(pre);
    }
    if (pl >= pcap) return KVS_ERR_TOO_LARGE;
    for (size_t i = 0; i < pl; i++)
        if ((unsigned char)pre[i] <= 0x20 || pre[i] == 0x7f) return KVS_ERR_INVALID;
    memcpy(endpoints, eps, hl + 1);
    memcpy(prefix, pre, pl);
    prefix[pl] = '\0';
    return KVS_OK;
}

/* ---- transport ---- */

int kvs_etcd_new(const char *endpoints, int timeout_ms, kvs_etcd **out)
{
    *out = NULL;
    if (!endpoints || !*endpoints) return KVS_ERR_INVALID;
    if (!kvs_http_init()) return KVS_ERR_IO;
    kvs_etcd *e = calloc(1, sizeof *e);
    if (!e) return KVS_ERR_NOMEM;
    char tmp[KVS_ETCD_MAX_ENDPOINTS * EP_MAX];
    if (kvs_strlcpy(tmp, endpoints, sizeof tmp)) {
        free(e);
        return KVS_ERR_INVALID;
    }
    char *save = NULL;
    for (char *t = strtok_r(tmp, ",;", &save); t; t = strtok_r(NULL, ",;", &save)) {
        while (*t == ' ') t++;
        if (!*t) continue;
        kvs_addr a;
        if (e->nep >= KVS_ETCD_MAX_ENDPOINTS || strncmp(t, "http", 4) == 0 ||
            kvs_addr_parse(t, 2379, &a) != KVS_OK || a.is_unix || a.port == 0) {
            free(e);
            return KVS_ERR_INVALID;
        }
        kvs_addr_format(&a, e->ep[e->nep], EP_MAX); /* with the port (2379 by default) */
        e->nep++;
    }
    if (!e->nep) {
        free(e);
        return KVS_ERR_INVALID;
    }
    e->curl = curl_easy_init();
    if (!e->curl) {
        free(e);
        return KVS_ERR_NOMEM;
    }
    e->timeout_ms = timeout_ms > 0 ? timeout_ms : 1000;
    pthread_mutex_init(&e->mu, NULL);
    *out = e;
    return KVS_OK;
}

void kvs_etcd_free(kvs_etcd *e)
{
    if (!e) return;
    curl_easy_cleanup(e->curl);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

/* POSTs `body` to `path` on one endpoint after another until one answers.
 * KVS_OK with the reply in *reply (malloc'd, NUL-terminated, *rlen bytes)
 * when the status is 200; an error reply maps its gRPC code (5 = not
 * found); else a transport error. */
static int post(kvs_etcd *e, const char *path, const char *body, char **reply, size_t *rlen)
{
    *reply = NULL;
    *rlen = 0;
    int rc = KVS_ERR_CONN;
    pthread_mutex_lock(&e->mu);
    for (int t = 0; t < e->nep; t++) {
        int i = (e->cur + t) % e->nep;
        char url[EP_MAX + 64];
        snprintf(url, sizeof url, "http://%s%s", e->ep[i], path);
        kvs_http_sink s = {.max = KVS_ETCD_MAX_REPLY};
        CURL *c = e->curl;
        curl_easy_reset(c);
        struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
        if (!h) {
            rc = KVS_ERR_NOMEM;
            break;
        }
        kvs_http_setup(c, url, e->timeout_ms, 0, &s);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
        CURLcode cc = curl_easy_perform(c);
        long status = 0;
        if (cc == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
        curl_slist_free_all(h);
        if (cc != CURLE_OK) {
            free(s.buf);
            rc = s.too_large ? KVS_ERR_TOO_LARGE
                 : cc == CURLE_OPERATION_TIMEDOUT ? KVS_ERR_TIMEOUT
                                                  : KVS_ERR_CONN;
            KVS_LOGD("etcd %s%s: %s", e->ep[i], path, curl_easy_strerror(cc));
            continue; /* the next endpoint */
        }
        e->cur = i;
        if (status == 200) {
            if (!s.buf) s.buf = calloc(1, 1);
            if (!s.buf) {
                rc = KVS_ERR_NOMEM;
                break;
            }
            *reply = s.buf;
            *rlen = s.len;
            rc = KVS_OK;
            break;
        }
        int code = 0;
        char msg[200] = "";
        if (s.buf && kvs_etcd_parse_error(s.buf, s.len, &code, msg, sizeof msg) == KVS_OK &&
            code == 5)
            rc = KVS_ERR_NOT_FOUND;
        else
            rc = KVS_ERR_PROTO;
        KVS_LOGD("etcd %s%s: HTTP %ld code %d %s", e->ep[i], path, status, code, msg);
        free(s.buf);
        if (status == 503 || status == 502) continue; /* that member is not ready: the next */
        break;
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* base64 of a NUL-terminated key or `n` bytes, malloc'd. */
static char *b64(const void *p, size_t n)
{
    char *o = malloc(kvs_b64_len(n) + 1);
    if (o) kvs_b64_encode(p, n, o);
    return o;
}

/* The smallest key after every key that starts with `prefix` (etcd's
 * range_end for a prefix), base64, malloc'd. */
static char *prefix_end_b64(const char *prefix)
{
    size_t n = strlen(prefix);
    char *t = malloc(n + 1);
    if (!t) return NULL;
    memcpy(t, prefix, n + 1);
    while (n && (uint8_t)t[n - 1] == 0xff) n--;
    char *o;
    if (n == 0) {
        o = b64("\0", 1); /* every key */
    } else {
        t[n - 1] = (char)((uint8_t)t[n - 1] + 1);
        o = b64(t, n);
    }
    free(t);
    return o;
}

static int range(kvs_etcd *e, const char *key, int is_prefix, size_t limit, kvs_etcd_kv **kvs,
                 size_t *n)
{
    char *k = b64(key, strlen(key));
    char *end = is_prefix ? prefix_end_b64(key) : NULL;
    char *body = NULL;
    int rc = KVS_ERR_NOMEM;
    if (k && (!is_prefix || end)) {
        size_t bl = strlen(k) + (end ? strlen(end) : 0) + 96;
        body = malloc(bl);
        if (body) {
            if (end)
                snprintf(body, bl, "{\"key\":\"%s\",\"range_end\":\"%s\",\"limit\":\"%zu\"}", k,
                         end, limit);
            else
                snprintf(body, bl, "{\"key\":\"%s\"}", k);
            char *r;
            size_t rl;
            rc = post(e, "/v3/kv/range", body, &r, &rl);
            if (rc == KVS_OK) {
                rc = kvs_etcd_parse_range(r, rl, kvs, n);
                free(r);
            }
        }
    }
    free(body);
    free(k);
    free(end);
    return rc;
}

int kvs_etcd_get(kvs_etcd *e, const char *key, char **val, size_t *len, int64_t *lease)
{
    if (val) *val = NULL;
    if (!e || !key || !*key || !val) return KVS_ERR_INVALID;
    kvs_etcd_kv *kvs;
    size_t n;
    int rc = range(e, key, 0, 0, &kvs, &n);
    if (rc != KVS_OK) return rc;
    if (n == 0) return KVS_ERR_NOT_FOUND;
    *val = kvs[0].value;
    if (len) *len = kvs[0].value_len;
    if (lease) *lease = kvs[0].lease;
    kvs[0].value = NULL;
    kvs_etcd_kvs_free(kvs, n);
    return KVS_OK;
}

int kvs_etcd_list(kvs_etcd *e, const char *prefix, size_t limit, kvs_etcd_kv **kvs, size_t *n)
{
    *kvs = NULL;
    *n = 0;
    if (!e || !prefix || !*prefix) return KVS_ERR_INVALID;
    return range(e, prefix, 1, limit, kvs, n);
}

/* A put (request body of /v3/kv/put, or the requestPut of a txn). */
static char *put_json(const char *key, const void *val, size_t len, int64_t lease)
{
    char *k = b64(key, strlen(key)), *v = b64(val ? val : "", len), *body = NULL;
    if (k && v) {
        size_t bl = strlen(k) + strlen(v) + 96;
        body = malloc(bl);
        if (body)
            snprintf(body, bl, "{\"key\":\"%s\",\"value\":\"%s\",\"lease\":\"%lld\"}", k, v,
                     (long long)lease);
    }
    free(k);
    free(v);
    return body;
}

int kvs_etcd_put(kvs_etcd *e, const char *key, const void *val, size_t len, int64_t lease)
{
    if (!e || !key || !*key || (len && !val)) return KVS_ERR_INVALID;
    char *body = put_json(key, val, len, lease);
    if (!body) return KVS_ERR_NOMEM;
    char *r;
    size_t rl;
    int rc = post(e, "/v3/kv/put", body, &r, &rl);
    free(body);
    if (rc == KVS_OK) free(r);
    return rc;
}

int kvs_etcd_create(kvs_etcd *e, const char *key, const void *val, size_t len, int64_t lease)
{
    if (!e || !key || !*key || (len && !val)) return KVS_ERR_INVALID;
    char *put = put_json(key, val, len, lease);
    char *k = b64(key, strlen(key));
    char *body = NULL;
    int rc = KVS_ERR_NOMEM;
    if (put && k) {
        size_t bl = strlen(put) + strlen(k) + 200;
        body = malloc(bl);
        if (body) {
            snprintf(body, bl,
                     "{\"compare\":[{\"target\":\"CREATE\",\"result\":\"EQUAL\",\"key\":\"%s\","
                     "\"create_revision\":\"0\"}],\"success\":[{\"request_put\":%s}]}",
                     k, put);
            char *r;
            size_t rl;
            rc = post(e, "/v3/kv/txn", body, &r, &rl);
            if (rc == KVS_OK) {
                int ok = 0;
                rc = kvs_etcd_parse_txn(r, rl, &ok);
                if (rc == KVS_OK && !ok) rc = KVS_ERR_EXISTS;
                free(r);
            }
        }
    }
    free(body);
    free(put);
    free(k);
    return rc;
}

int kvs_etcd_delete(kvs_etcd *e, const char *key, int64_t *deleted)
{
    if (deleted) *deleted = 0;
    if (!e || !key || !*key) return KVS_ERR_INVALID;
    char *k = b64(key, strlen(key));
    if (!k) return KVS_ERR_NOMEM;
    size_t bl = strlen(k) + 32;
    char *body = malloc(bl);
    int rc = KVS_ERR_NOMEM;
    if (body) {
        snprintf(body, bl, "{\"key\":\"%s\"}", k);
        char *r;
        size_t rl;
        rc = post(e, "/v3/kv/deleterange", body, &r, &rl);
        if (rc == KVS_OK) {
            int64_t d = 0;
            rc = kvs_etcd_parse_deleted(r, rl, &d);
            if (deleted) *deleted = d;
            free(r);
        }
    }
    free(body);
    free(k);
    return rc;
}

int kvs_etcd_lease_grant(kvs_etcd *e, int64_t ttl_s, int64_t *id)
{
    *id = 0;
    if (!e || ttl_s <= 0) return KVS_ERR_INVALID;
    char body[64];
    snprintf(body, sizeof body, "{\"TTL\":\"%lld\"}", (long long)ttl_s);
    char *r;
    size_t rl;
    int rc = post(e, "/v3/lease/grant", body, &r, &rl);
    if (rc != KVS_OK) return rc;
    int64_t ttl = 0;
    rc = kvs_etcd_parse_lease(r, rl, id, &ttl);
    free(r);
    if (rc == KVS_OK && (*id == 0 || ttl <= 0)) rc = KVS_ERR_PROTO;
    return rc;
}

int kvs_etcd_lease_keepalive(kvs_etcd *e, int64_t id, int64_t *ttl_s)
{
    *ttl_s = 0;
    if (!e || id == 0) return KVS_ERR_INVALID;
    char body[64];
    snprintf(body, sizeof body, "{\"ID\":\"%lld\"}", (long long)id);
    char *r;
    size_t rl;
    int rc = post(e, "/v3/lease/keepalive", body, &r, &rl);
    if (rc != KVS_OK) return rc;
    int64_t got = 0;
    rc = kvs_etcd_parse_lease(r, rl, &got, ttl_s);
    free(r);
    if (rc == KVS_OK && *ttl_s <= 0) rc = KVS_ERR_NOT_FOUND;
    return rc;
}

int kvs_etcd_lease_revoke(kvs_etcd *e, int64_t id)
{
    if (!e || id == 0) return KVS_ERR_INVALID;
    char body[64];
    snprintf(body, sizeof body, "{\"ID\":\"%lld\"}", (long long)id);
    char *r;
    size_t rl;
    int rc = post(e, "/v3/lease/revoke", body, &r, &rl);
    if (rc == KVS_OK) free(r);
    return rc;
}
