/* libcurl plumbing shared by the etcd client (etcd.c) and the Mooncake
 * metadata client (metaclient.c): the one-time global init, a reply sink
 * with a size limit, and the options every request of theirs sets. */
#ifndef KVS_HTTP_H
#define KVS_HTTP_H

#include <stddef.h>

#include <curl/curl.h>

/* curl_global_init, once per process. 1 if it succeeded. */
int kvs_http_init(void);

/* A reply body being received: malloc'd, NUL-terminated, len bytes. More
 * than max bytes sets too_large and aborts the transfer (CURLE_WRITE_ERROR). */
typedef struct kvs_http_sink {
    char *buf;
    size_t len, cap;
    size_t max;
    int too_large;
} kvs_http_sink;

/* Sets the options of one request on c: url, no signals, timeout_ms to
 * connect and for the whole request, no proxy, only http (and https if
 * with_https), the reply body into *s. */
void kvs_http_setup(CURL *c, const char *url, int timeout_ms, int with_https, kvs_http_sink *s);

#endif
