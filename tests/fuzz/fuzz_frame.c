/* libFuzzer target: the frame header decoder and the body codec reads of
 * every message layout in src/proto/proto.h.
 *
 * The input is read as a stream of frames (24-byte header + body). Each
 * header goes through kvs_frame_hdr_decode; each accepted body is decoded
 * with the layout its (type, response flag) selects, exactly as proto.h
 * documents it. A body that decodes completely is re-encoded with kvs_wbuf
 * and must give back the same bytes (the encoding is canonical). The whole
 * input is also decoded once with every layout. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvshelf/client.h"
#include "kvshelf/errors.h"
#include "proto/proto.h"

#define STR_CAP 256 /* hostname, shm_name, transfer_addr fields */

/* Layout tokens (see tests/unit/test_proto.c):
 * 'b' u8, 'h' u16, 'i' u32, 'I' i32, 'q' u64, 's' str, 'S' long str (json),
 * 'k' bytes (key), 'N' nonce/host id (16), 'A' auth (32), '{' u32 n then the
 * group up to '}' n times, 'm' bitmap, 'r' rest of body, 'l' u64 len + raw. */
typedef struct layout {
    uint16_t type;
    int response;
    const char *tok;
} layout;

static const layout layouts[] = {
    {KVS_MSG_CHALLENGE, 0, "iN"},
    {KVS_MSG_CHALLENGE, 1, "iN"},
    {KVS_MSG_HELLO, 0, "iiqisNA"},
    {KVS_MSG_HELLO, 1, "qii"},
    {KVS_MSG_HEARTBEAT, 0, "q"},
    {KVS_MSG_HEARTBEAT, 1, "{iq}"},
    {KVS_MSG_MOUNT, 0, "qqssNq"},
    {KVS_MSG_MOUNT, 1, "i"},
    {KVS_MSG_UNMOUNT, 0, "qi"},
    {KVS_MSG_UNMOUNT, 1, ""},
    {KVS_MSG_PUT_START, 0, "q{kq}"},
    {KVS_MSG_PUT_START, 1, "{Iiqqq}"},
    {KVS_MSG_PUT_END, 0, "q{kqb}"},
    {KVS_MSG_PUT_END, 1, "{I}"},
    {KVS_MSG_GET, 0, "q{k}"},
    {KVS_MSG_GET, 1, "{Iqiqqq}"},
    {KVS_MSG_RELEASE, 0, "q{q}"},
    {KVS_MSG_RELEASE, 1, ""},
    {KVS_MSG_EXISTS, 0, "{k}"},
    {KVS_MSG_EXISTS, 1, "m"},
    {KVS_MSG_REMOVE, 0, "{k}"},
    {KVS_MSG_REMOVE, 1, "{I}"},
    {KVS_MSG_SEGMENTS, 0, ""},
    {KVS_MSG_SEGMENTS, 1, "{iqqssNq}"},
    {KVS_MSG_STATS, 0, ""},
    {KVS_MSG_STATS, 1, "S"},
    {KVS_MSG_SHUTDOWN, 0, ""},
    {KVS_MSG_SHUTDOWN, 1, ""},
    {KVS_MSG_FENCE, 0, "qiq"},
    {KVS_MSG_FENCE, 1, ""},
    {KVS_MSG_DIR_LOAD, 0, "qib{kqq}"},
    {KVS_MSG_DIR_LOAD, 1, "{I}"},
    {KVS_MSG_DIR_SYNC, 0, "qiqi"},
    {KVS_MSG_DIR_SYNC, 1, "qb{bqqqk}"},
    {KVS_MSG_T_READ, 0, "iqqq"},
    {KVS_MSG_T_READ, 1, "r"},
    {KVS_MSG_T_WRITE, 0, "iqqqr"},
    {KVS_MSG_T_WRITE, 1, ""},
};

/* Decodes tokens from *t up to the end of the group (or string) with r and
 * re-encodes every value read into w. Returns on the first error. */
static void walk(const char **t, kvs_rbuf *r, kvs_wbuf *w)
{
    while (**t && **t != '}') {
        char c = *(*t)++;
        if (r->err) continue;
        switch (c) {
        case 'b': kvs_wbuf_u8(w, kvs_rbuf_u8(r)); break;
        case 'h': kvs_wbuf_u16(w, kvs_rbuf_u16(r)); break;
        case 'i': kvs_wbuf_u32(w, kvs_rbuf_u32(r)); break;
        case 'I': kvs_wbuf_i32(w, kvs_rbuf_i32(r)); break;
        case 'q': kvs_wbuf_u64(w, kvs_rbuf_u64(r)); break;
        case 's':
        case 'S': {
            static char big[KVS_MAX_BODY / 64];
            char small[STR_CAP];
            char *out = c == 's' ? small : big;
            size_t cap = c == 's' ? sizeof small : sizeof big;
            kvs_rbuf_str(r, out, cap);
            if (!r->err) {
                if (strlen(out) >= cap) abort(); /* the reader broke its contract */
                kvs_wbuf_str(w, out);
            }
            break;
        }
        case 'k': {
            uint32_t n = 0;
            const uint8_t *p = kvs_rbuf_bytes(r, KVS_KEY_MAX, &n);
            if (!r->err) {
                if (!p || n > KVS_KEY_MAX) abort();
                kvs_wbuf_bytes(w, p, n);
            }
            break;
        }
        case 'N':
        case 'A': {
            uint8_t b[32];
            size_t n = c == 'N' ? 16 : 32;
            kvs_rbuf_raw(r, b, n);
            kvs_wbuf_put(w, b, n);
            break;
        }
        case '{': {
            uint32_t n = kvs_rbuf_u32(r);
            if (!r->err && n > KVS_MAX_BATCH) r->err = KVS_ERR_PROTO;
            kvs_wbuf_u32(w, n);
            const char *start = *t;
            if (r->err) n = 0;
            for (uint32_t i = 0; i < n && !r->err; i++) {
                *t = start;
                walk(t, r, w);
            }
            /* Skip to after the matching '}'. */
            *t = start;
            int depth = 1;
            while (**t && depth) {
                if (**t == '{') depth++;
                if (**t == '}') depth--;
                (*t)++;
            }
            break;
        }
        case 'm': {
            uint32_t n = kvs_rbuf_u32(r);
            if (!r->err && n > KVS_MAX_BATCH) r->err = KVS_ERR_PROTO;
            if (r->err) break;
            kvs_wbuf_u32(w, n);
            static uint8_t bm[KVS_MAX_BATCH / 8];
            kvs_rbuf_raw(r, bm, (n + 7) / 8);
            kvs_wbuf_put(w, bm, (n + 7) / 8);
            break;
        }
        case 'r':
        case 'l': {
            uint64_t n = c == 'l' ? kvs_rbuf_u64(r) : r->len - r->pos;
            if (r->err) break;
            if (n > KVS_MAX_CHUNK || n > r->len - r->pos) {
                r->err = KVS_ERR_PROTO;
                break;
            }
            if (c == 'l') kvs_wbuf_u64(w, n);
            kvs_wbuf_put(w, r->p + r->pos, (size_t)n);
            r->pos += (size_t)n;
            break;
        }
        default: abort(); /* bad layout table */
        }
    }
    if (**t == '}') (*t)++;
}

static void decode_body(const char *tok, const uint8_t *body, size_t len)
{
    kvs_rbuf r;
    kvs_wbuf w;
    kvs_rbuf_init(&r, body, len);
    kvs_wbuf_init(&w);
    const char *t = tok;
    walk(&t, &r, &w);
    int rc = kvs_rbuf_finish(&r);
    if (rc == KVS_OK) {
        /* A body accepted by the reader re-encodes to the same bytes. */
        if (w.err || w.len != len || (len && memcmp(w.data, body, len) != 0)) abort();
    } else if (rc != KVS_ERR_PROTO || r.pos > r.len) {
        abort();
    }
    kvs_wbuf_free(&w);
}

/* libFuzzer entry point: see the comment at the top of the file. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* 1. As a stream of frames. */
    size_t off = 0;
    while (size - off >= KVS_FRAME_HDR) {
        kvs_frame_hdr h;
        uint32_t max_body = (uint32_t)(size - off - KVS_FRAME_HDR);
        int rc = kvs_frame_hdr_decode(data + off, KVS_MAX_BODY, &h);
        if (rc != KVS_OK) {
            if (rc != KVS_ERR_PROTO) abort();
            break; /* a server closes the connection here */
        }
        if (h.magic != KVS_MAGIC || h.body_len > KVS_MAX_BODY ||
            (h.flags & ~(KVS_F_RESPONSE | KVS_F_NOREPLY)) || kvs_msg_name(h.type)[0] == '?')
            abort(); /* decode accepted what it must reject */
        /* Round trip of the header itself. */
        uint8_t again[KVS_FRAME_HDR];
        kvs_frame_hdr_encode(&h, again);
        if (memcmp(again, data + off, KVS_FRAME_HDR) != 0) abort();
        off += KVS_FRAME_HDR;
        size_t blen = h.body_len <= max_body ? h.body_len : max_body; /* short read */
        for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++)
            if (layouts[i].type == h.type &&
                layouts[i].response == !!(h.flags & KVS_F_RESPONSE))
                decode_body(layouts[i].tok, data + off, blen);
        off += blen;
    }
    /* 2. The whole input as a body of every layout (a few KiB at most: the
     * layouts are linear in the input, but keep executions fast). */
    size_t n = size < 8192 ? size : 8192;
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++)
        decode_body(layouts[i].tok, data, n);
    /* 3. str reads with every small capacity (the buffer is exactly cap
     * bytes on the heap, so ASan sees any overrun). */
    for (size_t cap = 1; cap <= 8 && size >= 4; cap++) {
        char *out = malloc(cap);
        if (!out) return 0;
        kvs_rbuf r;
        kvs_rbuf_init(&r, data, size);
        kvs_rbuf_str(&r, out, cap);
        if (!r.err && strnlen(out, cap) >= cap) abort();
        free(out);
    }
    return 0;
}
