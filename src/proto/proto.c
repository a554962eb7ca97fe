/* Frame header and byte codec (see proto.h for the contract). */
#include "proto.h"

#include <stdlib.h>
#include <string.h>

#include "kvshelf/errors.h"

static void put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get_le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t get_le64(const uint8_t *p)
{
    return (uint64_t)get_le32(p) | ((uint64_t)get_le32(p + 4) << 32);
}

void kvs_frame_hdr_encode(const kvs_frame_hdr *h, uint8_t out[KVS_FRAME_HDR])
{
    put_le32(out, h->magic);
    put_le16(out + 4, h->type);
    put_le16(out + 6, h->flags);
    put_le32(out + 8, h->body_len);
    put_le32(out + 12, (uint32_t)h->status);
    put_le64(out + 16, h->req_id);
}

const char *kvs_msg_name(uint16_t type)
{
    switch (type) {
    case KVS_MSG_CHALLENGE: return "CHALLENGE";
    case KVS_MSG_HELLO: return "HELLO";
    case KVS_MSG_HEARTBEAT: return "HEARTBEAT";
    case KVS_MSG_MOUNT: return "MOUNT";
    case KVS_MSG_UNMOUNT: return "UNMOUNT";
    case KVS_MSG_PUT_START: return "PUT_START";
    case KVS_MSG_PUT_END: return "PUT_END";
    case KVS_MSG_GET: return "GET";
    case KVS_MSG_RELEASE: return "RELEASE";
    case KVS_MSG_EXISTS: return "EXISTS";
    case KVS_MSG_REMOVE: return "REMOVE";
    case KVS_MSG_SEGMENTS: return "SEGMENTS";
    case KVS_MSG_STATS: return "STATS";
    case KVS_MSG_SHUTDOWN: return "SHUTDOWN";
    case KVS_MSG_FENCE: return "FENCE";
    case KVS_MSG_PROBE: return "PROBE";
    case KVS_MSG_DIR_LOAD: return "DIR_LOAD";
    case KVS_MSG_DIR_SYNC: return "DIR_SYNC";
    case KVS_MSG_T_READ: return "T_READ";
    case KVS_MSG_T_WRITE: return "T_WRITE";
    default: return "?";
    }
}

int kvs_frame_hdr_decode(const uint8_t in[KVS_FRAME_HDR], uint32_t max_body, kvs_frame_hdr *h)
{
    h->magic = get_le32(in);
    h->type = get_le16(in + 4);
    h->flags = get_le16(in + 6);
    h->body_len = get_le32(in + 8);
    h->status = (int32_t)get_le32(in + 12);
    h->req_id = get_le64(in + 16);
    if (h->magic != KVS_MAGIC) return KVS_ERR_PROTO;
    if (kvs_msg_name(h->type)[0] == '?') return KVS_ERR_PROTO;
    if (h->flags & ~(KVS_F_RESPONSE | KVS_F_NOREPLY)) return KVS_ERR_PROTO;
    if (h->body_len > max_body) return KVS_ERR_PROTO;
    return KVS_OK;
}

/* ---- write buffer ---- */

void kvs_wbuf_init(kvs_wbuf *w) { memset(w, 0, sizeof *w); }

void kvs_wbuf_free(kvs_wbuf *w)
{
    free(w->data);
    memset(w, 0, sizeof *w);
}

void kvs_wbuf_reset(kvs_wbuf *w)
{
    w->len = 0;
    w->err = 0;
}

int kvs_wbuf_reserve(kvs_wbuf *w, size_t extra)
{
    if (w->err) return w->err;
    if (extra > SIZE_MAX / 2 - w->len) {
        w->err = KVS_ERR_NOMEM;
        return w->err;
    }
    size_t need = w->len + extra;
    if (need <= w->cap) return KVS_OK;
    size_t cap = w->cap ? w->cap : 256;
    while (cap < need) cap *= 2;
    uint8_t *d = realloc(w->data, cap);
    if (!d) {
        w->err = KVS_ERR_NOMEM;
        return w->err;
    }
    w->data = d;
    w->cap = cap;
    return KVS_OK;
}

void kvs_wbuf_put(kvs_wbuf *w, const void *p, size_t n)
{
    if (kvs_wbuf_reserve(w, n) != KVS_OK) return;
    if (n) memcpy(w->data + w->len, p, n);
    w->len += n;
}

void kvs_wbuf_u8(kvs_wbuf *w, uint8_t v) { kvs_wbuf_put(w, &v, 1); }

void kvs_wbuf_u16(kvs_wbuf *w, uint16_t v)
{
    uint8_t b[2];
    put_le16(b, v);
    kvs_wbuf_put(w, b, 2);
}

void kvs_wbuf_u32(kvs_wbuf *w, uint32_t v)
{
    uint8_t b[4];
    put_le32(b, v);
    kvs_wbuf_put(w, b, 4);
}

void kvs_wbuf_i32(kvs_wbuf *w, int32_t v) { kvs_wbuf_u32(w, (uint32_t)v); }

void kvs_wbuf_u64(kvs_wbuf *w, uint64_t v)
{
    uint8_t b[8];
    put_le64(b, v);
    kvs_wbuf_put(w, b, 8);
}

void kvs_wbuf_bytes(kvs_wbuf *w, const void *p, uint32_t n)
{
    kvs_wbuf_u32(w, n);
    kvs_wbuf_put(w, p, n);
}

void kvs_wbuf_str(kvs_wbuf *w, const char *s)
{
    size_t n = s ? strlen(s) : 0;
    kvs_wbuf_bytes(w, s, (uint32_t)n);
}

size_t kvs_wbuf_begin_frame(kvs_wbuf *w, uint16_t type, uint16_t flags, int32_t status,
                            uint64_t req_id)
{
    size_t start = w->len;
    kvs_frame_hdr h = {KVS_MAGIC, type, flags, 0, status, req_id};
    uint8_t b[KVS_FRAME_HDR];
    kvs_frame_hdr_encode(&h, b);
    kvs_wbuf_put(w, b, sizeof b);
    return start;
}

void kvs_wbuf_end_frame(kvs_wbuf *w, size_t frame_start)
{
    if (w->err || w->len < frame_start + KVS_FRAME_HDR) return;
    size_t body = w->len - frame_start - KVS_FRAME_HDR;
    put_le32(w->data + frame_start + 8, (uint32_t)body);
}

/* ---- read buffer ---- */

void kvs_rbuf_init(kvs_rbuf *r, const void *p, size_t len)
{
    r->p = p;
    r->len = len;
    r->pos = 0;
    r->err = 0;
}

static const uint8_t *take(kvs_rbuf *r, size_t n)
{
    if (r->err) return NULL;
    if (n > r->len - r->pos) {
        r->err = KVS_ERR_PROTO;
        return NULL;
    }
    if (n == 0) return r->p ? r->p + r->pos : (const uint8_t *)"";
    const uint8_t *p = r->p + r->pos;
    r->pos += n;
    return p;
}

uint8_t kvs_rbuf_u8(kvs_rbuf *r)
{
    const uint8_t *p = take(r, 1);
    return p ? p[0] : 0;
}

uint16_t kvs_rbuf_u16(kvs_rbuf *r)
{
    const uint8_t *p = take(r, 2);
    return p ? get_le16(p) : 0;
}

uint32_t kvs_rbuf_u32(kvs_rbuf *r)
{
    const uint8_t *p = take(r, 4);
    return p ? get_le32(p) : 0;
}

int32_t kvs_rbuf_i32(kvs_rbuf *r) { return (int32_t)kvs_rbuf_u32(r); }

uint64_t kvs_rbuf_u64(kvs_rbuf *r)
{
    const uint8_t *p = take(r, 8);
    return p ? get_le64(p) : 0;
}

void kvs_rbuf_raw(kvs_rbuf *r, void *out, size_t n)
{
    const uint8_t *p = take(r, n);
    if (p) {
        if (n) memcpy(out, p, n);
    } else if (n) {
        memset(out, 0, n);
    }
}

const uint8_t *kvs_rbuf_bytes(kvs_rbuf *r, uint32_t max_len, uint32_t *len)
{
    uint32_t n = kvs_rbuf_u32(r);
    *len = 0;
    if (r->err) return NULL;
    if (n > max_len) {
        r->err = KVS_ERR_PROTO;
        return NULL;
    }
    const uint8_t *p = take(r, n);
    if (p) *len = n;
    return p;
}

void kvs_rbuf_str(kvs_rbuf *r, char *out, size_t cap)
{
    uint32_t n = 0;
    if (cap == 0) {
        r->err = KVS_ERR_PROTO;
        return;
    }
    out[0] = '\0';
    const uint8_t *p = kvs_rbuf_bytes(r, (uint32_t)(cap - 1), &n);
    if (!p) return;
    if (memchr(p, 0, n)) {
        r->err = KVS_ERR_PROTO;
        return;
    }
    memcpy(out, p, n);
    out[n] = '\0';
}

int kvs_rbuf_finish(kvs_rbuf *r)
{
    if (r->err) return KVS_ERR_PROTO;
    return r->pos == r->len ? KVS_OK : KVS_ERR_PROTO;
}
