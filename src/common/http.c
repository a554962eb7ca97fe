/* libcurl plumbing shared by the etcd and metadata clients: see http.h. */
#include "common/http.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_init_ok;

static void global_init(void) { g_init_ok = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK; }

int kvs_http_init(void)
{
    pthread_once(&g_once, global_init);
    return g_init_ok;
}

static size_t on_data(char *p, size_t size, size_t n, void *ud)
{
    kvs_http_sink *s = ud;
    size_t bytes = size * n;
    if (s->too_large || bytes > s->max - s->len) {
        s->too_large = 1;
        return 0; /* aborts the transfer */
    }
    if (s->len + bytes + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 1024;
        while (cap < s->len + bytes + 1) cap *= 2;
        char *nb = realloc(s->buf, cap);
        if (!nb) return 0;
        s->buf = nb;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, p, bytes);
    s->len += bytes;
    s->buf[s->len] = '\0';
    return bytes;
}

void kvs_http_setup(CURL *c, const char *url, int timeout_ms, int with_https, kvs_http_sink *s)
{
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt(c, CURLOPT_PROXY, "");
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, with_https ? "http,https" : "http");
#else
    curl_easy_setopt(c, CURLOPT_PROTOCOLS,
                     (long)(with_https ? CURLPROTO_HTTP | CURLPROTO_HTTPS : CURLPROTO_HTTP));
#endif
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, s);
}
