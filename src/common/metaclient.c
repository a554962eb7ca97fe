/* Client of the Mooncake HTTP metadata protocol: see metaclient.h. */
#include "common/metaclient.h"

#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "common/etcd.h"
#include "common/http.h"
#include "common/log.h"
#include "kvshelf/config.h"
#include "kvshelf/errors.h"

static int build_url(CURL *c, const char *url, const char *key, char **out)
{
    char *ek = curl_easy_escape(c, key, (int)strlen(key));
    if (!ek) return KVS_ERR_NOMEM;
    const char *sep = strchr(url, '?') ? "&" : "?";
    size_t n = strlen(url) + strlen(sep) + 4 + strlen(ek) + 1;
    char *u = malloc(n);
    if (!u) {
        curl_free(ek);
        return KVS_ERR_NOMEM;
    }
    strcpy(u, url);
    strcat(u, sep);
    strcat(u, "key=");
    strcat(u, ek);
    curl_free(ek);
    *out = u;
    return KVS_OK;
}

static int map_curl(CURLcode cc)
{
    switch (cc) {
    case CURLE_OK: return KVS_OK;
    case CURLE_OPERATION_TIMEDOUT: return KVS_ERR_TIMEOUT;
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING: return KVS_ERR_CONN;
    case CURLE_OUT_OF_MEMORY: return KVS_ERR_NOMEM;
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT: return KVS_ERR_INVALID;
    default: return KVS_ERR_IO;
    }
}

/* One request against an etcd:// metadata server: the key is stored in
 * etcd as it is (as Mooncake does with an etcd metadata server). */
static int etcd_request(const char *method, const char *url, const char *key, const void *body,
                        size_t body_len, int timeout_ms, char **val, size_t *len)
{
    char eps[1024], prefix[256];
    if (kvs_etcd_parse_url(url, eps, sizeof eps, prefix, sizeof prefix) != KVS_OK)
        return KVS_ERR_INVALID;
    kvs_etcd *e = NULL;
    int rc = kvs_etcd_new(eps, timeout_ms, &e);
    if (rc != KVS_OK) return rc;
    if (!strcmp(method, "GET")) {
        rc = kvs_etcd_get(e, key, val, len, NULL);
        if (rc == KVS_OK && len && *len > KVS_METACLIENT_MAX_VALUE) {
            free(*val);
            *val = NULL;
            rc = KVS_ERR_TOO_LARGE;
        }
    } else if (!strcmp(method, "PUT")) {
        rc = body_len > KVS_METACLIENT_MAX_VALUE ? KVS_ERR_TOO_LARGE
                                                 : kvs_etcd_put(e, key, body, body_len, 0);
    } else {
        int64_t n = 0;
        rc = kvs_etcd_delete(e, key, &n);
        if (rc == KVS_OK && n == 0) rc = KVS_ERR_NOT_FOUND;
    }
    if (rc == KVS_ERR_NOT_FOUND && strcmp(method, "PUT") == 0) rc = KVS_ERR_PROTO;
    kvs_etcd_free(e);
    return rc;
}

/* One request. method: "GET", "PUT", "DELETE". */
static int request(const char *method, const char *url, const char *key, const char *secret,
                   const void *body, size_t body_len, int timeout_ms, char **val, size_t *len)
{
    if (val) *val = NULL;
    if (!url || !key || !*key || (body_len && !body)) return KVS_ERR_INVALID;
    if (timeout_ms <= 0) timeout_ms = KVS_DEFAULT_TIMEOUT_MS;
    if (!strncmp(url, "etcd://", 7))
        return etcd_request(method, url, key, body, body_len, timeout_ms, val, len);
    if (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0)
        return KVS_ERR_INVALID;
    if (!kvs_http_init()) return KVS_ERR_IO;
    if (timeout_ms <= 0) timeout_ms = KVS_DEFAULT_TIMEOUT_MS;

    CURL *c = curl_easy_init();
    if (!c) return KVS_ERR_NOMEM;
    char *full = NULL;
    int rc = build_url(c, url, key, &full);
    if (rc != KVS_OK) {
        curl_easy_cleanup(c);
        return rc;
    }
    struct curl_slist *hdrs = NULL;
    kvs_http_sink s = {.max = KVS_METACLIENT_MAX_VALUE};
    if (secret && *secret) {
        size_t al = strlen(secret) + sizeof "Authorization: Bearer ";
        char *auth = malloc(al);
        if (auth) snprintf(auth, al, "Authorization: Bearer %s", secret);
        hdrs = auth ? curl_slist_append(NULL, auth) : NULL;
        if (auth) {
            memset(auth, 0, al);
            free(auth);
        }
        if (!hdrs) {
            free(full);
            curl_easy_cleanup(c);
            return KVS_ERR_NOMEM;
        }
    }
    kvs_http_setup(c, full, timeout_ms, 1, &s);
    if (!strcmp(method, "PUT")) {
        struct curl_slist *h1 = curl_slist_append(hdrs, "Content-Type: application/json");
        struct curl_slist *h2 = h1 ? curl_slist_append(h1, "Expect:") : NULL;
        if (!h2) {
            curl_slist_free_all(h1 ? h1 : hdrs);
            free(full);
            curl_easy_cleanup(c);
            return KVS_ERR_NOMEM;
        }
        hdrs = h2;
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, "PUT");
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body_len ? (const char *)body : "");
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    } else if (!strcmp(method, "DELETE")) {
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, "DELETE");
    }

    if (hdrs) curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
    CURLcode cc = curl_easy_perform(c);
    long status = 0;
    if (cc == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (cc == CURLE_WRITE_ERROR && s.too_large) {
        rc = KVS_ERR_TOO_LARGE;
    } else if (cc != CURLE_OK) {
        rc = map_curl(cc);
        KVS_LOGD("metadata %s %s: %s", method, full, curl_easy_strerror(cc));
    } else if (status == 200) {
        rc = KVS_OK;
    } else {
        switch (status) {
        case 404: rc = KVS_ERR_NOT_FOUND; break;
        case 413: rc = KVS_ERR_TOO_LARGE; break;
        case 507: rc = KVS_ERR_NO_SPACE; break;
        case 401:
        case 403: rc = KVS_ERR_AUTH; break;
        case 400: rc = !strcmp(method, "PUT") ? KVS_ERR_EXISTS : KVS_ERR_PROTO; break;
        default: rc = KVS_ERR_PROTO; break;
        }
        KVS_LOGD("metadata %s %s: HTTP %ld", method, full, status);
    }
    if (rc == KVS_OK && val) {
        if (!s.buf) {
            s.buf = malloc(1);
            if (s.buf) s.buf[0] = '\0';
        }
        if (!s.buf) {
            rc = KVS_ERR_NOMEM;
        } else {
            *val = s.buf;
            if (len) *len = s.len;
            s.buf = NULL;
        }
    }
    free(s.buf);
    curl_slist_free_all(hdrs);
    free(full);
    curl_easy_cleanup(c);
    return rc;
}

/* GETs `key`; see metaclient.h. */
int kvs_meta_get(const char *url, const char *key, const char *secret, int timeout_ms,
                 char **val, size_t *len)
{
    if (!val) return KVS_ERR_INVALID;
    return request("GET", url, key, secret, NULL, 0, timeout_ms, val, len);
}

/* PUTs `key`; see metaclient.h. */
int kvs_meta_put(const char *url, const char *key, const char *secret, const void *val,
                 size_t len, int timeout_ms)
{
    return request("PUT", url, key, secret, val, len, timeout_ms, NULL, NULL);
}

/* DELETEs `key`; see metaclient.h. */
int kvs_meta_delete(const char *url, const char *key, const char *secret, int timeout_ms)
{
    return request("DELETE", url, key, secret, NULL, 0, timeout_ms, NULL, NULL);
}
