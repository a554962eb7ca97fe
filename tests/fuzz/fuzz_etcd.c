/* libFuzzer target: the parsers of etcd's JSON gateway replies and of
 * etcd:// addresses (src/common/etcd.h). A reply is bytes from another
 * process (etcd, or whatever answers on its port): any input must be
 * accepted or rejected without a crash, a leak or reading past its length.
 *
 * Input byte 0 picks the parser (mod 7): range, lease (grant/keepalive),
 * txn, deleterange, error, URL, base64; the rest is its input (never NUL-
 * terminated for the reply parsers: they get a copy of exactly that many
 * bytes on the heap, so ASan sees any read past the end). What a parser
 * accepts is checked: lengths match the NUL-terminated copies, base64 that
 * decodes re-encodes to the same bytes. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/etcd.h"
#include "kvshelf/errors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > (1u << 20)) return 0;
    int mode = data[0] % 7;
    size_t n = size - 1;
    char *in = malloc(n ? n : 1);
    if (!in) return 0;
    memcpy(in, data + 1, n);
    switch (mode) {
    case 0: {
        kvs_etcd_kv *kvs = NULL;
        size_t cnt = 0;
        int rc = kvs_etcd_parse_range(in, n, &kvs, &cnt);
        if (rc == KVS_OK) {
            for (size_t i = 0; i < cnt; i++) {
                if (kvs[i].key[kvs[i].key_len] != '\0' || kvs[i].value[kvs[i].value_len] != '\0')
                    abort();
            }
        } else if (kvs || cnt) {
            abort();
        }
        kvs_etcd_kvs_free(kvs, cnt);
        break;
    }
    case 1: {
        int64_t id, ttl;
        if (kvs_etcd_parse_lease(in, n, &id, &ttl) != KVS_OK && (id || ttl)) abort();
        break;
    }
    case 2: {
        int ok;
        int rc = kvs_etcd_parse_txn(in, n, &ok);
        if (ok != 0 && ok != 1) abort();
        if (rc != KVS_OK && ok) abort();
        break;
    }
    case 3: {
        int64_t d;
        if (kvs_etcd_parse_deleted(in, n, &d) != KVS_OK && d) abort();
        break;
    }
    case 4: {
        int code;
        char msg[32];
        if (kvs_etcd_parse_error(in, n, &code, msg, sizeof msg) == KVS_OK &&
            (code < 0 || code > 1000 || !memchr(msg, '\0', sizeof msg)))
            abort();
        break;
    }
    case 5: {
        char *s = malloc(n + 1);
        if (!s) break;
        memcpy(s, in, n);
        s[n] = '\0';
        char eps[256], pre[64];
        if (kvs_etcd_parse_url(s, eps, sizeof eps, pre, sizeof pre) == KVS_OK) {
            if (!eps[0] || !pre[0] || strlen(eps) >= sizeof eps || strlen(pre) >= sizeof pre)
                abort();
            kvs_etcd *e = NULL;
            if (kvs_etcd_new(eps, 10, &e) == KVS_OK) kvs_etcd_free(e); /* no request made */
        }
        free(s);
        break;
    }
    default: {
        uint8_t *out = malloc(n / 4 * 3 + 3);
        size_t ol = 0;
        if (out && kvs_b64_decode(in, n, out, &ol) == KVS_OK) {
            if (ol > n / 4 * 3 + 2) abort();
            char *re = malloc(kvs_b64_len(ol) + 1);
            if (re) {
                size_t rl = kvs_b64_encode(out, ol, re);
                uint8_t *back = malloc(rl / 4 * 3 + 3);
                size_t bl = 0;
                if (back && (kvs_b64_decode(re, rl, back, &bl) != KVS_OK || bl != ol ||
                             memcmp(back, out, ol)))
                    abort();
                free(back);
                free(re);
            }
        }
        free(out);
        break;
    }
    }
    free(in);
    return 0;
}
