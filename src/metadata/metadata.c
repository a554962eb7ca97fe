/* Mooncake-compatible metadata store: see metadata.h.
 *
 * A chained hash table (xxh3 of the key) under one rwlock: GETs share it,
 * PUT/DELETE take it exclusively. Values are raw bytes. */
#include "metadata/metadata.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kvshelf/errors.h"

#define MD_DEFAULT_MAX_KEYS 65536u
#define MD_DEFAULT_MAX_KEY 4096u
#define MD_DEFAULT_MAX_TOTAL (1024ull << 20)
#define MD_INITIAL_BUCKETS 64u

#define MD_CT "application/json; charset=utf-8"

typedef struct md_entry {
    struct md_entry *next;
    uint64_t hash;
    size_t key_len, val_len;
    char *key;
    uint8_t *val;
} md_entry;

struct kvs_metadata {
    pthread_rwlock_t lock;
    md_entry **buckets;
    size_t nbuckets; /* power of two */
    size_t count;
    size_t bytes; /* sum of key_len + val_len */
    kvs_metadata_limits lim;
};

/* Creates a store with `lim` (NULL = defaults). See metadata.h. */
kvs_metadata *kvs_metadata_new_ex(const kvs_metadata_limits *lim)
{
    kvs_metadata *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    if (lim) m->lim = *lim;
    if (!m->lim.max_keys) m->lim.max_keys = MD_DEFAULT_MAX_KEYS;
    if (!m->lim.max_key_bytes) m->lim.max_key_bytes = MD_DEFAULT_MAX_KEY;
    if (!m->lim.max_value_bytes) m->lim.max_value_bytes = KVS_HTTP_MAX_BODY;
    if (!m->lim.max_total_bytes) m->lim.max_total_bytes = (size_t)MD_DEFAULT_MAX_TOTAL;
    m->nbuckets = MD_INITIAL_BUCKETS;
    m->buckets = calloc(m->nbuckets, sizeof *m->buckets);
    if (!m->buckets || pthread_rwlock_init(&m->lock, NULL) != 0) {
        free(m->buckets);
        free(m);
        return NULL;
    }
    return m;
}

/* Creates a store with the default limits. See metadata.h. */
kvs_metadata *kvs_metadata_new(void) { return kvs_metadata_new_ex(NULL); }

/* Frees the store and all entries. See metadata.h. */
void kvs_metadata_free(kvs_metadata *m)
{
    if (!m) return;
    for (size_t i = 0; i < m->nbuckets; i++) {
        md_entry *e = m->buckets[i];
        while (e) {
            md_entry *n = e->next;
            free(e->key);
            free(e->val);
            free(e);
            e = n;
        }
    }
    free(m->buckets);
    pthread_rwlock_destroy(&m->lock);
    free(m);
}

static md_entry **find_slot(kvs_metadata *m, const char *key, size_t klen, uint64_t h)
{
    md_entry **pp = &m->buckets[h & (m->nbuckets - 1)];
    while (*pp) {
        md_entry *e = *pp;
        if (e->hash == h && e->key_len == klen && memcmp(e->key, key, klen) == 0) return pp;
        pp = &e->next;
    }
    return pp;
}

static void maybe_grow(kvs_metadata *m)
{
    if (m->count < m->nbuckets || m->nbuckets > (SIZE_MAX / 2) / sizeof(md_entry *)) return;
    size_t nb = m->nbuckets * 2;
    md_entry **b = calloc(nb, sizeof *b);
    if (!b) return; /* keep the old table: slower but correct */
    for (size_t i = 0; i < m->nbuckets; i++) {
        md_entry *e = m->buckets[i];
        while (e) {
            md_entry *n = e->next;
            size_t j = e->hash & (nb - 1);
            e->next = b[j];
            b[j] = e;
            e = n;
        }
    }
    free(m->buckets);
    m->buckets = b;
    m->nbuckets = nb;
}

/* Stores a copy; `rpc_rule` applies Mooncake's duplicate-rpc_meta check and
 * then returns 1 for "unchanged" and KVS_ERR_EXISTS for a conflicting value.
 * On KVS_ERR_NO_SPACE, *keys_full (may be NULL) tells the key count from the
 * byte budget. */
static int md_put(kvs_metadata *m, const char *key, const void *val, size_t len, int rpc_rule,
                  int *keys_full)
{
    if (keys_full) *keys_full = 0;
    if (!m || !key || !*key || (len && !val)) return KVS_ERR_INVALID;
    size_t klen = strlen(key);
    if (klen > m->lim.max_key_bytes || len > m->lim.max_value_bytes) return KVS_ERR_TOO_LARGE;
    uint64_t h = kvs_hash64(key, klen);

    /* Allocate outside the lock. */
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy) return KVS_ERR_NOMEM;
    if (len) memcpy(copy, val, len);

    int rc = KVS_OK;
    pthread_rwlock_wrlock(&m->lock);
    md_entry **pp = find_slot(m, key, klen, h);
    md_entry *e = *pp;
    if (e) {
        if (rpc_rule && strstr(key, "rpc_meta")) {
            rc = e->val_len == len && (len == 0 || memcmp(e->val, copy, len) == 0)
                     ? 1
                     : KVS_ERR_EXISTS;
        } else if (m->bytes - e->val_len + len > m->lim.max_total_bytes) {
            rc = KVS_ERR_NO_SPACE;
        } else {
            m->bytes = m->bytes - e->val_len + len;
            free(e->val);
            e->val = copy;
            e->val_len = len;
            copy = NULL;
        }
    } else if (m->count >= m->lim.max_keys) {
        rc = KVS_ERR_NO_SPACE;
        if (keys_full) *keys_full = 1;
    } else if (m->bytes + klen + len > m->lim.max_total_bytes) {
        rc = KVS_ERR_NO_SPACE;
    } else {
        e = calloc(1, sizeof *e);
        char *kc = e ? malloc(klen + 1) : NULL;
        if (!e || !kc) {
            free(e);
            rc = KVS_ERR_NOMEM;
        } else {
            memcpy(kc, key, klen + 1);
            e->key = kc;
            e->key_len = klen;
            e->hash = h;
            e->val = copy;
            e->val_len = len;
            copy = NULL;
            *pp = e;
            m->count++;
            m->bytes += klen + len;
            maybe_grow(m);
        }
    }
    pthread_rwlock_unlock(&m->lock);
    free(copy);
    return rc;
}

/* Stores a copy of val under key (replacing). See metadata.h. */
int kvs_metadata_put(kvs_metadata *m, const char *key, const void *val, size_t len)
{
    return md_put(m, key, val, len, 0, NULL);
}

/* Returns a malloc'd copy of the value. See metadata.h. */
int kvs_metadata_get(kvs_metadata *m, const char *key, char **val, size_t *len)
{
    if (!m || !key || !val) return KVS_ERR_INVALID;
    *val = NULL;
    size_t klen = strlen(key);
    uint64_t h = kvs_hash64(key, klen);
    int rc = KVS_OK;
    pthread_rwlock_rdlock(&m->lock);
    md_entry *e = *find_slot(m, key, klen, h);
    if (!e) {
        rc = KVS_ERR_NOT_FOUND;
    } else {
        char *c = malloc(e->val_len + 1);
        if (!c) {
            rc = KVS_ERR_NOMEM;
        } else {
            if (e->val_len) memcpy(c, e->val, e->val_len);
            c[e->val_len] = '\0';
            *val = c;
            if (len) *len = e->val_len;
        }
    }
    pthread_rwlock_unlock(&m->lock);
    return rc;
}

/* Removes key. See metadata.h. */
int kvs_metadata_delete(kvs_metadata *m, const char *key)
{
    if (!m || !key) return KVS_ERR_INVALID;
    size_t klen = strlen(key);
    uint64_t h = kvs_hash64(key, klen);
    md_entry *e;
    pthread_rwlock_wrlock(&m->lock);
    md_entry **pp = find_slot(m, key, klen, h);
    e = *pp;
    if (e) {
        *pp = e->next;
        m->count--;
        m->bytes -= e->key_len + e->val_len;
    }
    pthread_rwlock_unlock(&m->lock);
    if (!e) return KVS_ERR_NOT_FOUND;
    free(e->key);
    free(e->val);
    free(e);
    return KVS_OK;
}

/* Number of keys. See metadata.h. */
size_t kvs_metadata_count(kvs_metadata *m)
{
    if (!m) return 0;
    pthread_rwlock_rdlock(&m->lock);
    size_t n = m->count;
    pthread_rwlock_unlock(&m->lock);
    return n;
}

/* Bytes of keys and values. See metadata.h. */
size_t kvs_metadata_bytes(kvs_metadata *m)
{
    if (!m) return 0;
    pthread_rwlock_rdlock(&m->lock);
    size_t n = m->bytes;
    pthread_rwlock_unlock(&m->lock);
    return n;
}

static void reply(kvs_http_response *resp, int status, const char *text)
{
    resp->status = status;
    resp->content_type = MD_CT;
    size_t n = strlen(text);
    resp->body = malloc(n + 1);
    if (resp->body) {
        memcpy(resp->body, text, n + 1);
        resp->body_len = n;
    } else {
        resp->body_len = 0;
    }
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* Serves one metadata request. See metadata.h. */
void kvs_metadata_handle(kvs_metadata *m, const kvs_http_request *req, kvs_http_response *resp)
{
    if (!resp) return;
    memset(resp, 0, sizeof *resp);
    if (!m || !req || !req->method) {
        reply(resp, 500, "internal error");
        return;
    }
    /* Mooncake strips whitespace around the key and requires it non-empty. */
    const char *k = req->key ? req->key : "";
    while (is_space(*k)) k++;
    size_t kl = strlen(k);
    while (kl > 0 && is_space(k[kl - 1])) kl--;
    if (kl == 0) {
        reply(resp, 400, "metadata key is required");
        return;
    }
    if (kl > m->lim.max_key_bytes) {
        reply(resp, 400, "metadata key too long");
        return;
    }
    char kbuf[256];
    char *key = kl < sizeof kbuf ? kbuf : malloc(kl + 1);
    if (!key) {
        reply(resp, 500, "out of memory");
        return;
    }
    memcpy(key, k, kl);
    key[kl] = '\0';

    if (!strcmp(req->method, "GET")) {
        char *val = NULL;
        size_t len = 0;
        int rc = kvs_metadata_get(m, key, &val, &len);
        if (rc == KVS_OK) {
            resp->status = 200;
            resp->content_type = MD_CT;
            resp->body = val;
            resp->body_len = len;
        } else if (rc == KVS_ERR_NOT_FOUND) {
            reply(resp, 404, "metadata not found");
        } else {
            reply(resp, 500, "out of memory");
        }
    } else if (!strcmp(req->method, "PUT")) {
        if (req->body_len && !req->body) {
            reply(resp, 400, "invalid request");
        } else {
            int keys_full = 0;
            int rc = md_put(m, key, req->body, req->body_len, 1, &keys_full);
            switch (rc) {
            case KVS_OK: reply(resp, 200, "metadata updated"); break;
            case 1: reply(resp, 200, "metadata unchanged"); break;
            case KVS_ERR_EXISTS: reply(resp, 400, "Duplicate rpc_meta key not allowed"); break;
            case KVS_ERR_TOO_LARGE: reply(resp, 413, "metadata value too large"); break;
            case KVS_ERR_NO_SPACE:
                reply(resp, 507,
                      keys_full ? "metadata key budget exhausted" : "metadata size budget exhausted");
                break;
            case KVS_ERR_INVALID: reply(resp, 400, "invalid request"); break;
            default: reply(resp, 500, "out of memory"); break;
            }
        }
    } else if (!strcmp(req->method, "DELETE")) {
        int rc = kvs_metadata_delete(m, key);
        if (rc == KVS_OK)
            reply(resp, 200, "metadata deleted");
        else
            reply(resp, 404, "metadata not found");
    } else {
        reply(resp, 405, "Method not allowed");
    }
    if (key != kbuf) free(key);
}

/* kvs_http_handler forwarding to kvs_metadata_handle. See metadata.h. */
void kvs_metadata_http_handler(void *ud, const kvs_http_request *req, kvs_http_response *resp)
{
    kvs_metadata_handle(ud, req, resp);
}
