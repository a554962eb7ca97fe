/* libFuzzer target: the metadata service.
 *
 * Input byte 0 picks the mode:
 *   (b0 & 0x0f) == 0x0f  raw bytes: the rest is written to a real in-process
 *                        HTTP server (src/metadata/http.c + the metadata
 *                        handler) over loopback, then the write side is shut
 *                        and the reply read until EOF (crash/hang detection).
 *   otherwise            a sequence of requests to kvs_metadata_handle on a
 *                        fresh store with small limits, each checked against
 *                        a reference model (status, body, key count):
 *                          op byte: bits 0-2 method, bit 3 no key
 *                          u8 key length, key bytes
 *                          u8 body length, body bytes */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "kvshelf/errors.h"
#include "metadata/http.h"
#include "metadata/metadata.h"

/* ---------- reference model ---------- */

#define M_KEYS 8
#define M_KEY_BYTES 16
#define M_VALUE 64
#define M_TOTAL 256

typedef struct mentry {
    int used;
    char key[M_KEY_BYTES + 1];
    size_t klen, vlen;
    uint8_t val[M_VALUE];
} mentry;

typedef struct model {
    mentry e[M_KEYS];
    size_t count, bytes;
} model;

static mentry *mfind(model *m, const char *k)
{
    for (int i = 0; i < M_KEYS; i++)
        if (m->e[i].used && !strcmp(m->e[i].key, k)) return &m->e[i];
    return NULL;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* Expected status of one request; applies it to the model. */
static int model_apply(model *m, const char *method, const char *rawkey, const uint8_t *body,
                       size_t blen, const uint8_t **want_body, size_t *want_len)
{
    *want_body = NULL;
    const char *k = rawkey ? rawkey : "";
    while (is_space(*k)) k++;
    size_t kl = strlen(k);
    while (kl > 0 && is_space(k[kl - 1])) kl--;
    if (kl == 0 || kl > M_KEY_BYTES) return 400;
    char key[M_KEY_BYTES + 1];
    memcpy(key, k, kl);
    key[kl] = '\0';
    mentry *e = mfind(m, key);
    if (!strcmp(method, "GET")) {
        if (!e) return 404;
        *want_body = e->val;
        *want_len = e->vlen;
        return 200;
    }
    if (!strcmp(method, "DELETE")) {
        if (!e) return 404;
        m->bytes -= e->klen + e->vlen;
        m->count--;
        e->used = 0;
        return 200;
    }
    if (strcmp(method, "PUT") != 0) return 405;
    if (blen > M_VALUE) return 413;
    if (e) {
        if (strstr(key, "rpc_meta"))
            return (e->vlen == blen && (blen == 0 || !memcmp(e->val, body, blen))) ? 200 : 400;
        if (m->bytes - e->vlen + blen > M_TOTAL) return 507;
        m->bytes = m->bytes - e->vlen + blen;
        if (blen) memcpy(e->val, body, blen);
        e->vlen = blen;
        return 200;
    }
    if (m->count >= M_KEYS || m->bytes + kl + blen > M_TOTAL) return 507;
    for (int i = 0; i < M_KEYS; i++)
        if (!m->e[i].used) {
            e = &m->e[i];
            break;
        }
    if (!e) abort();
    e->used = 1;
    memcpy(e->key, key, kl + 1);
    e->klen = kl;
    e->vlen = blen;
    if (blen) memcpy(e->val, body, blen);
    m->count++;
    m->bytes += kl + blen;
    return 200;
}

static void run_handler(const uint8_t *data, size_t size)
{
    static const char *methods[8] = {"GET", "PUT", "DELETE", "PUT", "GET", "POST", "", "get"};
    kvs_metadata_limits lim = {.max_keys = M_KEYS, .max_key_bytes = M_KEY_BYTES,
                               .max_value_bytes = M_VALUE, .max_total_bytes = M_TOTAL};
    kvs_metadata *md = kvs_metadata_new_ex(&lim);
    if (!md) return;
    model *m = calloc(1, sizeof *m);
    if (!m) {
        kvs_metadata_free(md);
        return;
    }
    size_t off = 0;
    while (off + 2 <= size) {
        uint8_t op = data[off++];
        size_t kl = data[off++];
        if (kl > size - off) kl = size - off;
        char key[256];
        memcpy(key, data + off, kl);
        key[kl] = '\0'; /* an embedded NUL shortens it, as a C string would */
        off += kl;
        size_t bl = off < size ? data[off++] : 0;
        if (bl > size - off) bl = size - off;
        const uint8_t *body = data + off;
        off += bl;

        const char *method = methods[op & 7];
        const char *kp = (op & 8) ? NULL : key;
        kvs_http_request req = {.method = method, .path = "/metadata", .key = kp,
                                .body = bl ? body : NULL, .body_len = bl};
        kvs_http_response resp;
        memset(&resp, 0xa5, sizeof resp);
        kvs_metadata_handle(md, &req, &resp);
        const uint8_t *wb;
        size_t wl = 0;
        int want = model_apply(m, method, kp, body, bl, &wb, &wl);
        if (resp.status == 500) abort(); /* only on out of memory */
        if (resp.status != want) abort();
        if (!resp.content_type || (resp.body_len && !resp.body)) abort();
        if (wb && (resp.body_len != wl || (wl && memcmp(resp.body, wb, wl) != 0))) abort();
        free(resp.body);
        if (kvs_metadata_count(md) != m->count || kvs_metadata_bytes(md) != m->bytes) abort();
    }
    free(m);
    kvs_metadata_free(md);
}

/* ---------- raw bytes to a real server ---------- */

static kvs_http_server *g_srv;
static kvs_metadata *g_md;
static uint16_t g_port;

static void route(void *ud, const kvs_http_request *req, kvs_http_response *resp)
{
    if (req->path && !strcmp(req->path, "/metadata")) {
        kvs_metadata_handle(ud, req, resp);
        return;
    }
    resp->status = 404;
    resp->content_type = "text/plain";
    resp->body = NULL;
    resp->body_len = 0;
}

static int start_server(void)
{
    if (g_srv) return 0;
    signal(SIGPIPE, SIG_IGN);
    kvs_metadata_limits lim = {.max_keys = 1024, .max_total_bytes = 8u << 20};
    g_md = kvs_metadata_new_ex(&lim);
    if (!g_md) return -1;
    g_port = 0;
    if (kvs_http_start("127.0.0.1", &g_port, route, g_md, &g_srv) != KVS_OK) return -1;
    return 0;
}

static void run_raw(const uint8_t *data, size_t size)
{
    if (start_server() != 0) return;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(g_port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = 3};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return;
    }
    size_t off = 0;
    while (off < size) {
        ssize_t n = send(fd, data + off, size - off, MSG_NOSIGNAL);
        if (n <= 0) break;
        off += (size_t)n;
    }
    shutdown(fd, SHUT_WR);
    char buf[4096];
    while (recv(fd, buf, sizeof buf, 0) > 0) {
    }
    close(fd);
}

/* libFuzzer entry point: see the comment at the top of the file. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) return 0;
    if ((data[0] & 0x0f) == 0x0f) run_raw(data + 1, size - 1);
    else run_handler(data + 1, size - 1);
    return 0;
}
