/* Unit tests of the wire protocol codec (src/proto/proto.c): frame header,
 * write buffer, bounds-checked reader, and a round trip of every message
 * layout documented in proto.h, with every truncation and trailing bytes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvshelf/client.h"
#include "kvshelf/errors.h"
#include "proto/proto.h"

/* ---------- frame header ---------- */

static const uint16_t known_types[] = {
    KVS_MSG_CHALLENGE, KVS_MSG_HELLO,    KVS_MSG_HEARTBEAT, KVS_MSG_MOUNT,  KVS_MSG_UNMOUNT,
    KVS_MSG_PUT_START, KVS_MSG_PUT_END,  KVS_MSG_GET,       KVS_MSG_RELEASE, KVS_MSG_EXISTS,
    KVS_MSG_REMOVE,    KVS_MSG_SEGMENTS, KVS_MSG_STATS,     KVS_MSG_SHUTDOWN, KVS_MSG_T_READ,
    KVS_MSG_T_WRITE,   KVS_MSG_FENCE,    KVS_MSG_PROBE,     KVS_MSG_DIR_LOAD, KVS_MSG_DIR_SYNC,
};

static int is_known(uint32_t t)
{
    for (size_t i = 0; i < sizeof known_types / sizeof known_types[0]; i++)
        if (known_types[i] == t) return 1;
    return 0;
}

static void test_hdr_roundtrip(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof known_types / sizeof known_types[0]; i++) {
        kvs_frame_hdr h = {KVS_MAGIC, known_types[i], (uint16_t)(i & 1), (uint32_t)i * 1000,
                           i & 2 ? KVS_ERR_NOT_FOUND : 0, 0x0123456789abcdefull + i};
        uint8_t b[KVS_FRAME_HDR];
        kvs_frame_hdr_encode(&h, b);
        kvs_frame_hdr d;
        assert_int_equal(kvs_frame_hdr_decode(b, KVS_MAX_BODY, &d), KVS_OK);
        assert_int_equal(d.magic, h.magic);
        assert_int_equal(d.type, h.type);
        assert_int_equal(d.flags, h.flags);
        assert_int_equal(d.body_len, h.body_len);
        assert_int_equal(d.status, h.status);
        assert_int_equal(d.req_id, h.req_id);
        assert_string_not_equal(kvs_msg_name(h.type), "?");
    }
    /* Byte layout: little-endian, "KVS1" first. */
    kvs_frame_hdr h = {KVS_MAGIC, KVS_MSG_GET, KVS_F_RESPONSE, 0x01020304u, -3,
                       0x1122334455667788ull};
    uint8_t b[KVS_FRAME_HDR];
    kvs_frame_hdr_encode(&h, b);
    static const uint8_t want[KVS_FRAME_HDR] = {'K',  'V',  'S',  '1',  8,    0,    1,    0,
                                                0x04, 0x03, 0x02, 0x01, 0xfd, 0xff, 0xff, 0xff,
                                                0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11};
    assert_memory_equal(b, want, sizeof want);
    assert_string_equal(kvs_msg_name(KVS_MSG_PUT_START), "PUT_START");
    assert_string_equal(kvs_msg_name(KVS_MSG_T_WRITE), "T_WRITE");
    assert_string_equal(kvs_msg_name(0), "?");
    assert_string_equal(kvs_msg_name(0xffff), "?");
}

static void test_hdr_failures(void **state)
{
    (void)state;
    kvs_frame_hdr h = {KVS_MAGIC, KVS_MSG_HELLO, 0, 100, 0, 1}, d;
    uint8_t b[KVS_FRAME_HDR];

    /* Bad magic, one byte at a time. */
    for (int i = 0; i < 4; i++) {
        kvs_frame_hdr_encode(&h, b);
        b[i] ^= 0x20;
        assert_int_equal(kvs_frame_hdr_decode(b, KVS_MAX_BODY, &d), KVS_ERR_PROTO);
    }
    /* Every unknown type. */
    for (uint32_t t = 0; t <= 0xffff; t++) {
        h.type = (uint16_t)t;
        kvs_frame_hdr_encode(&h, b);
        int rc = kvs_frame_hdr_decode(b, KVS_MAX_BODY, &d);
        if (rc != (is_known(t) ? KVS_OK : KVS_ERR_PROTO)) fail_msg("type %u: rc %d", t, rc);
        if (!is_known(t) && strcmp(kvs_msg_name((uint16_t)t), "?") != 0) fail_msg("name %u", t);
    }
    h.type = KVS_MSG_HELLO;
    /* Known flag bits decode; unknown ones are refused. */
    h.flags = KVS_F_NOREPLY;
    kvs_frame_hdr_encode(&h, b);
    assert_int_equal(kvs_frame_hdr_decode(b, KVS_MAX_BODY, &d), KVS_OK);
    assert_int_equal(d.flags, KVS_F_NOREPLY);
    for (int bit = 2; bit < 16; bit++) {
        h.flags = (uint16_t)(1u << bit);
        kvs_frame_hdr_encode(&h, b);
        assert_int_equal(kvs_frame_hdr_decode(b, KVS_MAX_BODY, &d), KVS_ERR_PROTO);
    }
    h.flags = KVS_F_RESPONSE;
    /* body_len at and over the limit. */
    h.body_len = KVS_MAX_BODY;
    kvs_frame_hdr_encode(&h, b);
    assert_int_equal(kvs_frame_hdr_decode(b, KVS_MAX_BODY, &d), KVS_OK);
    h.body_len = KVS_MAX_BODY + 1;
    kvs_frame_hdr_encode(&h, b);
    assert_int_equal(kvs_frame_hdr_decode(b, KVS_MAX_BODY, &d), KVS_ERR_PROTO);
    h.body_len = 0xffffffffu;
    kvs_frame_hdr_encode(&h, b);
    assert_int_equal(kvs_frame_hdr_decode(b, KVS_MAX_BODY, &d), KVS_ERR_PROTO);
    h.body_len = 5;
    kvs_frame_hdr_encode(&h, b);
    assert_int_equal(kvs_frame_hdr_decode(b, 4, &d), KVS_ERR_PROTO);
    assert_int_equal(kvs_frame_hdr_decode(b, 5, &d), KVS_OK);
    assert_int_equal(kvs_frame_hdr_decode(b, 0xffffffffu, &d), KVS_OK);
}

/* ---------- write buffer ---------- */

static void test_wbuf_layout(void **state)
{
    (void)state;
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    kvs_wbuf_u8(&w, 0xab);
    kvs_wbuf_u16(&w, 0x1234);
    kvs_wbuf_u32(&w, 0xdeadbeef);
    kvs_wbuf_i32(&w, -2);
    kvs_wbuf_u64(&w, 0x0102030405060708ull);
    kvs_wbuf_bytes(&w, "xyz", 3);
    kvs_wbuf_str(&w, "hi");
    kvs_wbuf_str(&w, NULL);
    kvs_wbuf_bytes(&w, NULL, 0);
    static const uint8_t want[] = {0xab, 0x34, 0x12, 0xef, 0xbe, 0xad, 0xde, 0xfe, 0xff,
                                   0xff, 0xff, 8,    7,    6,    5,    4,    3,    2,
                                   1,    3,    0,    0,    0,    'x',  'y',  'z',  2,
                                   0,    0,    0,    'h',  'i',  0,    0,    0,    0,
                                   0,    0,    0,    0};
    assert_int_equal(w.err, 0);
    assert_int_equal(w.len, sizeof want);
    assert_memory_equal(w.data, want, sizeof want);

    /* Growth over many writes keeps every byte. */
    kvs_wbuf_reset(&w);
    assert_int_equal(w.len, 0);
    size_t cap = w.cap;
    assert_true(cap > 0);
    for (uint32_t i = 0; i < 100000; i++) kvs_wbuf_u32(&w, i);
    assert_int_equal(w.len, 400000);
    kvs_rbuf r;
    kvs_rbuf_init(&r, w.data, w.len);
    for (uint32_t i = 0; i < 100000; i++)
        if (kvs_rbuf_u32(&r) != i) fail_msg("at %u", i);
    assert_int_equal(kvs_rbuf_finish(&r), KVS_OK);
    kvs_wbuf_reset(&w);
    assert_true(w.cap >= 400000); /* reset keeps capacity */

    /* A reservation too large sets a sticky error; writes are then ignored. */
    assert_int_equal(kvs_wbuf_reserve(&w, SIZE_MAX), KVS_ERR_NOMEM);
    kvs_wbuf_u32(&w, 1);
    assert_int_equal(w.len, 0);
    assert_int_equal(w.err, KVS_ERR_NOMEM);
    assert_int_equal(kvs_wbuf_reserve(&w, 1), KVS_ERR_NOMEM);
    kvs_wbuf_reset(&w);
    assert_int_equal(w.err, 0);
    kvs_wbuf_u8(&w, 1);
    assert_int_equal(w.len, 1);
    kvs_wbuf_free(&w);
    assert_null(w.data);
    assert_int_equal(w.len, 0);
    kvs_wbuf_free(&w); /* twice is fine */
}

static void test_wbuf_frames(void **state)
{
    (void)state;
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    size_t f1 = kvs_wbuf_begin_frame(&w, KVS_MSG_HEARTBEAT, 0, 0, 7);
    kvs_wbuf_u64(&w, 42);
    kvs_wbuf_end_frame(&w, f1);
    size_t f2 = kvs_wbuf_begin_frame(&w, KVS_MSG_STATS, KVS_F_RESPONSE, KVS_ERR_BUSY, 8);
    kvs_wbuf_str(&w, "{}");
    kvs_wbuf_end_frame(&w, f2);
    size_t f3 = kvs_wbuf_begin_frame(&w, KVS_MSG_SHUTDOWN, 0, 0, 9);
    kvs_wbuf_end_frame(&w, f3);
    assert_int_equal(f1, 0);
    assert_int_equal(f2, KVS_FRAME_HDR + 8);
    assert_int_equal(w.len, 3 * KVS_FRAME_HDR + 8 + 6);

    kvs_frame_hdr h;
    assert_int_equal(kvs_frame_hdr_decode(w.data + f1, KVS_MAX_BODY, &h), KVS_OK);
    assert_int_equal(h.type, KVS_MSG_HEARTBEAT);
    assert_int_equal(h.body_len, 8);
    assert_int_equal(h.req_id, 7);
    assert_int_equal(kvs_frame_hdr_decode(w.data + f2, KVS_MAX_BODY, &h), KVS_OK);
    assert_int_equal(h.type, KVS_MSG_STATS);
    assert_int_equal(h.flags, KVS_F_RESPONSE);
    assert_int_equal(h.status, KVS_ERR_BUSY);
    assert_int_equal(h.body_len, 6);
    kvs_rbuf r;
    kvs_rbuf_init(&r, w.data + f2 + KVS_FRAME_HDR, h.body_len);
    char s[8];
    kvs_rbuf_str(&r, s, sizeof s);
    assert_int_equal(kvs_rbuf_finish(&r), KVS_OK);
    assert_string_equal(s, "{}");
    assert_int_equal(kvs_frame_hdr_decode(w.data + f3, KVS_MAX_BODY, &h), KVS_OK);
    assert_int_equal(h.body_len, 0);

    /* end_frame with a start past the end does nothing. */
    size_t len = w.len;
    kvs_wbuf_end_frame(&w, len);
    assert_int_equal(w.len, len);
    kvs_wbuf_free(&w);
}

/* ---------- reader ---------- */

static void test_rbuf_scalars(void **state)
{
    (void)state;
    static const uint8_t in[] = {0xab, 0x34, 0x12, 0xef, 0xbe, 0xad, 0xde, 0xfe, 0xff,
                                 0xff, 0xff, 8,    7,    6,    5,    4,    3,    2,    1};
    kvs_rbuf r;
    kvs_rbuf_init(&r, in, sizeof in);
    assert_int_equal(kvs_rbuf_u8(&r), 0xab);
    assert_int_equal(kvs_rbuf_u16(&r), 0x1234);
    assert_int_equal(kvs_rbuf_u32(&r), 0xdeadbeef);
    assert_int_equal(kvs_rbuf_i32(&r), -2);
    assert_int_equal(kvs_rbuf_u64(&r), 0x0102030405060708ull);
    assert_int_equal(kvs_rbuf_finish(&r), KVS_OK);

    /* Truncation of each scalar: error, zero value, sticky. */
    for (size_t len = 0; len < sizeof in; len++) {
        kvs_rbuf_init(&r, in, len);
        uint64_t sum = 0;
        sum += kvs_rbuf_u8(&r);
        sum += kvs_rbuf_u16(&r);
        sum += kvs_rbuf_u32(&r);
        sum += (uint32_t)kvs_rbuf_i32(&r);
        uint64_t last = kvs_rbuf_u64(&r);
        assert_int_equal(r.err, KVS_ERR_PROTO);
        assert_int_equal(last, 0);
        assert_int_equal(kvs_rbuf_finish(&r), KVS_ERR_PROTO);
        (void)sum;
    }
    /* Trailing bytes. */
    kvs_rbuf_init(&r, in, sizeof in);
    kvs_rbuf_u8(&r);
    assert_int_equal(r.err, 0);
    assert_int_equal(kvs_rbuf_finish(&r), KVS_ERR_PROTO);
    /* Empty body. */
    kvs_rbuf_init(&r, in, 0);
    assert_int_equal(kvs_rbuf_finish(&r), KVS_OK);
    assert_int_equal(kvs_rbuf_u8(&r), 0);
    assert_int_equal(kvs_rbuf_finish(&r), KVS_ERR_PROTO);
    /* After an error, reads that would fit still return 0. */
    kvs_rbuf_init(&r, in, 2);
    kvs_rbuf_u32(&r);
    assert_int_equal(kvs_rbuf_u8(&r), 0);
    assert_int_equal(r.pos, 0);
}

static void test_rbuf_raw(void **state)
{
    (void)state;
    const uint8_t in[] = {1, 2, 3, 4, 5};
    uint8_t out[8];
    kvs_rbuf r;
    kvs_rbuf_init(&r, in, sizeof in);
    kvs_rbuf_raw(&r, out, 3);
    assert_memory_equal(out, in, 3);
    kvs_rbuf_raw(&r, out, 0);
    memset(out, 0x77, sizeof out);
    kvs_rbuf_raw(&r, out, 3); /* only 2 left */
    assert_int_equal(r.err, KVS_ERR_PROTO);
    for (int i = 0; i < 3; i++) assert_int_equal(out[i], 0); /* zeroed on failure */
    assert_int_equal(out[3], 0x77);
}

static void put_u32le(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void test_rbuf_bytes(void **state)
{
    (void)state;
    uint8_t in[16];
    put_u32le(in, 5);
    memcpy(in + 4, "hello", 5);
    kvs_rbuf r;
    uint32_t n = 99;

    kvs_rbuf_init(&r, in, 9);
    const uint8_t *p = kvs_rbuf_bytes(&r, 5, &n);
    assert_non_null(p);
    assert_int_equal(n, 5);
    assert_memory_equal(p, "hello", 5);
    assert_ptr_equal(p, in + 4); /* no copy */
    assert_int_equal(kvs_rbuf_finish(&r), KVS_OK);

    /* Over the limit. */
    kvs_rbuf_init(&r, in, 9);
    assert_null(kvs_rbuf_bytes(&r, 4, &n));
    assert_int_equal(n, 0);
    assert_int_equal(r.err, KVS_ERR_PROTO);

    /* Declared length past the end (every truncation). */
    for (size_t len = 0; len < 9; len++) {
        kvs_rbuf_init(&r, in, len);
        n = 99;
        assert_null(kvs_rbuf_bytes(&r, 100, &n));
        assert_int_equal(n, 0);
        assert_int_equal(kvs_rbuf_finish(&r), KVS_ERR_PROTO);
    }
    /* A huge declared length never wraps. */
    put_u32le(in, 0xffffffffu);
    kvs_rbuf_init(&r, in, sizeof in);
    assert_null(kvs_rbuf_bytes(&r, 0xffffffffu, &n));
    assert_int_equal(r.err, KVS_ERR_PROTO);

    /* Zero-length bytes: non-NULL pointer, length 0. */
    put_u32le(in, 0);
    kvs_rbuf_init(&r, in, 4);
    p = kvs_rbuf_bytes(&r, 0, &n);
    assert_non_null(p);
    assert_int_equal(n, 0);
    assert_int_equal(kvs_rbuf_finish(&r), KVS_OK);
}

static void test_rbuf_str(void **state)
{
    (void)state;
    uint8_t in[16];
    char out[8];
    kvs_rbuf r;

    put_u32le(in, 7);
    memcpy(in + 4, "abcdefg", 7);
    kvs_rbuf_init(&r, in, 11);
    kvs_rbuf_str(&r, out, sizeof out); /* 7 chars + NUL: fits exactly */
    assert_int_equal(kvs_rbuf_finish(&r), KVS_OK);
    assert_string_equal(out, "abcdefg");

    kvs_rbuf_init(&r, in, 11);
    memset(out, 'x', sizeof out);
    kvs_rbuf_str(&r, out, 7); /* does not fit */
    assert_int_equal(r.err, KVS_ERR_PROTO);
    assert_string_equal(out, ""); /* left empty */

    /* A NUL byte inside. */
    put_u32le(in, 3);
    memcpy(in + 4, "a\0b", 3);
    kvs_rbuf_init(&r, in, 7);
    kvs_rbuf_str(&r, out, sizeof out);
    assert_int_equal(r.err, KVS_ERR_PROTO);
    assert_int_equal(kvs_rbuf_finish(&r), KVS_ERR_PROTO);

    /* Empty string. */
    put_u32le(in, 0);
    kvs_rbuf_init(&r, in, 4);
    kvs_rbuf_str(&r, out, sizeof out);
    assert_int_equal(kvs_rbuf_finish(&r), KVS_OK);
    assert_string_equal(out, "");

    /* Truncated. */
    put_u32le(in, 3);
    memcpy(in + 4, "abc", 3);
    for (size_t len = 0; len < 7; len++) {
        kvs_rbuf_init(&r, in, len);
        strcpy(out, "zz");
        kvs_rbuf_str(&r, out, sizeof out);
        assert_int_equal(r.err, KVS_ERR_PROTO);
        assert_string_equal(out, "");
    }
}

/* ---------- every message layout of proto.h ----------
 *
 * A layout is a list of tokens:
 *   u8 u16 u32 i32 u64   integers
 *   str                  str (<= STR_MAX bytes, no NUL)
 *   bytes                bytes (key, <= KVS_KEY_MAX)
 *   nonce auth hostid    u8[16] / u8[32] / u8[16]
 *   n{ ... }             u32 n (<= KVS_MAX_BATCH) then n groups
 *   bitmap               u32 n, then ceil(n/8) bytes
 *   rawall               the rest of the body (<= KVS_MAX_CHUNK)
 *   lenraw               u64 len (<= KVS_MAX_CHUNK), then len raw bytes
 * Encoding draws values from a PRNG and records them on a tape; decoding
 * checks against the tape. */

#define STR_MAX 255

typedef struct layout {
    const char *name;
    uint16_t type;
    int response;
    const char *tokens;
} layout;

static const layout layouts[] = {
    {"CHALLENGE", KVS_MSG_CHALLENGE, 0, "u32 nonce"},
    {"HELLO req", KVS_MSG_HELLO, 0, "u32 u32 u64 u32 str hostid auth"},
    {"HELLO resp", KVS_MSG_HELLO, 1, "u64 u32 u32"},
    {"HEARTBEAT req", KVS_MSG_HEARTBEAT, 0, "u64"},
    {"HEARTBEAT resp", KVS_MSG_HEARTBEAT, 1, ""},
    {"MOUNT req", KVS_MSG_MOUNT, 0, "u64 u64 str str hostid"},
    {"MOUNT resp", KVS_MSG_MOUNT, 1, "u32"},
    {"UNMOUNT req", KVS_MSG_UNMOUNT, 0, "u64 u32"},
    {"UNMOUNT resp", KVS_MSG_UNMOUNT, 1, ""},
    {"PUT_START req", KVS_MSG_PUT_START, 0, "u64 n{ bytes u64 }"},
    {"PUT_START resp", KVS_MSG_PUT_START, 1, "n{ i32 u32 u64 u64 }"},
    {"PUT_END req", KVS_MSG_PUT_END, 0, "u64 n{ bytes u64 u8 }"},
    {"PUT_END resp", KVS_MSG_PUT_END, 1, "n{ i32 }"},
    {"GET req", KVS_MSG_GET, 0, "u64 n{ bytes }"},
    {"GET resp", KVS_MSG_GET, 1, "n{ i32 u64 u32 u64 u64 u64 }"},
    {"RELEASE req", KVS_MSG_RELEASE, 0, "u64 n{ u64 }"},
    {"RELEASE resp", KVS_MSG_RELEASE, 1, ""},
    {"EXISTS req", KVS_MSG_EXISTS, 0, "n{ bytes }"},
    {"EXISTS resp", KVS_MSG_EXISTS, 1, "bitmap"},
    {"REMOVE req", KVS_MSG_REMOVE, 0, "n{ bytes }"},
    {"REMOVE resp", KVS_MSG_REMOVE, 1, "n{ i32 }"},
    {"SEGMENTS req", KVS_MSG_SEGMENTS, 0, ""},
    {"SEGMENTS resp", KVS_MSG_SEGMENTS, 1, "n{ u32 u64 u64 str str hostid u64 }"},
    {"STATS req", KVS_MSG_STATS, 0, ""},
    {"STATS resp", KVS_MSG_STATS, 1, "str"},
    {"SHUTDOWN req", KVS_MSG_SHUTDOWN, 0, ""},
    {"SHUTDOWN resp", KVS_MSG_SHUTDOWN, 1, ""},
    {"T_READ req", KVS_MSG_T_READ, 0, "u32 u64 u64"},
    {"T_READ resp", KVS_MSG_T_READ, 1, "rawall"},
    {"T_WRITE req", KVS_MSG_T_WRITE, 0, "u32 u64 lenraw"},
    {"T_WRITE resp", KVS_MSG_T_WRITE, 1, ""},
};

typedef struct tape {
    uint64_t num[4096];
    size_t nn, rn;
    uint8_t blob[1 << 16];
    size_t bn, rb;
    uint64_t rng;
    int mismatch;
} tape;

static uint64_t rnd(tape *t)
{
    t->rng ^= t->rng << 13;
    t->rng ^= t->rng >> 7;
    t->rng ^= t->rng << 17;
    return t->rng;
}

/* Encodes (w != NULL) or decodes (r != NULL) tokens [*pos, end of group). */
static void interp(const char **toks, size_t ntok, size_t *pos, tape *t, kvs_wbuf *w,
                   kvs_rbuf *r)
{
    while (*pos < ntok) {
        const char *k = toks[(*pos)++];
        if (!strcmp(k, "}")) return;
        if (!strcmp(k, "u8") || !strcmp(k, "u16") || !strcmp(k, "u32") || !strcmp(k, "i32") ||
            !strcmp(k, "u64")) {
            int bits = k[1] == '8' ? 8 : k[1] == '1' ? 16 : (k[1] == '3' || k[0] == 'i') ? 32 : 64;
            if (w) {
                uint64_t v = rnd(t);
                if (bits < 64) v &= (1ull << bits) - 1;
                t->num[t->nn++] = v;
                if (bits == 8) kvs_wbuf_u8(w, (uint8_t)v);
                else if (bits == 16) kvs_wbuf_u16(w, (uint16_t)v);
                else if (k[0] == 'i') kvs_wbuf_i32(w, (int32_t)(uint32_t)v);
                else if (bits == 32) kvs_wbuf_u32(w, (uint32_t)v);
                else kvs_wbuf_u64(w, v);
            } else {
                uint64_t v = bits == 8    ? kvs_rbuf_u8(r)
                             : bits == 16 ? kvs_rbuf_u16(r)
                             : k[0] == 'i' ? (uint32_t)kvs_rbuf_i32(r)
                             : bits == 32 ? kvs_rbuf_u32(r)
                                          : kvs_rbuf_u64(r);
                if (!r->err && v != t->num[t->rn]) t->mismatch = 1;
                t->rn++;
            }
        } else if (!strcmp(k, "str") || !strcmp(k, "bytes")) {
            int is_str = k[0] == 's';
            uint32_t maxl = is_str ? STR_MAX : KVS_KEY_MAX;
            if (w) {
                uint32_t n = (uint32_t)(rnd(t) % (maxl + 1));
                if (t->bn + n + 1 > sizeof t->blob) n = 0;
                uint8_t *b = t->blob + t->bn;
                for (uint32_t i = 0; i < n; i++) b[i] = is_str ? (uint8_t)('a' + rnd(t) % 26)
                                                               : (uint8_t)rnd(t);
                b[n] = 0;
                t->num[t->nn++] = n;
                t->bn += n + 1;
                if (is_str) kvs_wbuf_str(w, (const char *)b);
                else kvs_wbuf_bytes(w, b, n);
            } else {
                uint64_t n = t->num[t->rn++];
                const uint8_t *b = t->blob + t->rb;
                t->rb += n + 1;
                if (is_str) {
                    char out[STR_MAX + 1];
                    kvs_rbuf_str(r, out, sizeof out);
                    if (!r->err && (strlen(out) != n || memcmp(out, b, n))) t->mismatch = 1;
                } else {
                    uint32_t len;
                    const uint8_t *p = kvs_rbuf_bytes(r, maxl, &len);
                    if (!r->err && (!p || len != n || memcmp(p, b, n))) t->mismatch = 1;
                }
            }
        } else if (!strcmp(k, "nonce") || !strcmp(k, "auth") || !strcmp(k, "hostid")) {
            size_t n = k[0] == 'a' ? KVS_AUTH_LEN : 16;
            if (w) {
                uint8_t *b = t->blob + t->bn;
                for (size_t i = 0; i < n; i++) b[i] = (uint8_t)rnd(t);
                kvs_wbuf_put(w, b, n);
                t->bn += n;
            } else {
                uint8_t out[32];
                kvs_rbuf_raw(r, out, n);
                if (!r->err && memcmp(out, t->blob + t->rb, n)) t->mismatch = 1;
                t->rb += n;
            }
        } else if (!strcmp(k, "n{")) {
            size_t start = *pos;
            uint32_t n;
            if (w) {
                n = (uint32_t)(rnd(t) % 6);
                t->num[t->nn++] = n;
                kvs_wbuf_u32(w, n);
            } else {
                n = kvs_rbuf_u32(r);
                if (!r->err && (n > KVS_MAX_BATCH || n != t->num[t->rn])) t->mismatch = 1;
                t->rn++;
                if (r->err || t->mismatch) n = 0;
            }
            if (n == 0) { /* skip the group */
                int depth = 1;
                while (*pos < ntok && depth) {
                    if (!strcmp(toks[*pos], "n{")) depth++;
                    if (!strcmp(toks[*pos], "}")) depth--;
                    (*pos)++;
                }
            }
            for (uint32_t i = 0; i < n; i++) {
                *pos = start;
                interp(toks, ntok, pos, t, w, r);
            }
        } else if (!strcmp(k, "bitmap")) {
            if (w) {
                uint32_t n = (uint32_t)(rnd(t) % 40);
                t->num[t->nn++] = n;
                kvs_wbuf_u32(w, n);
                for (uint32_t i = 0; i < (n + 7) / 8; i++) {
                    uint8_t v = (uint8_t)rnd(t);
                    t->blob[t->bn++] = v;
                    kvs_wbuf_u8(w, v);
                }
            } else {
                uint32_t n = kvs_rbuf_u32(r);
                if (!r->err && n != t->num[t->rn]) t->mismatch = 1;
                t->rn++;
                if (n > KVS_MAX_BATCH) n = 0;
                uint8_t bm[KVS_MAX_BATCH / 8];
                kvs_rbuf_raw(r, bm, (n + 7) / 8);
                if (!r->err && !t->mismatch && memcmp(bm, t->blob + t->rb, (n + 7) / 8))
                    t->mismatch = 1;
                t->rb += (t->num[t->rn - 1] + 7) / 8;
            }
        } else if (!strcmp(k, "rawall") || !strcmp(k, "lenraw")) {
            int with_len = k[0] == 'l';
            if (w) {
                uint32_t n = (uint32_t)(rnd(t) % 3000);
                t->num[t->nn++] = n;
                if (with_len) kvs_wbuf_u64(w, n);
                for (uint32_t i = 0; i < n; i++) {
                    uint8_t v = (uint8_t)rnd(t);
                    t->blob[t->bn++] = v;
                    kvs_wbuf_u8(w, v);
                }
            } else {
                uint64_t want = t->num[t->rn++];
                uint64_t n = with_len ? kvs_rbuf_u64(r) : r->len - r->pos;
                if (r->err) continue;
                if (n > KVS_MAX_CHUNK || n > r->len - r->pos) {
                    r->err = KVS_ERR_PROTO;
                    continue;
                }
                if (n != want || memcmp(r->p + r->pos, t->blob + t->rb, n)) t->mismatch = 1;
                r->pos += n;
                t->rb += want;
            }
        } else {
            fail_msg("bad token %s", k);
        }
    }
}

static size_t split(const char *s, char *buf, size_t cap, const char **toks, size_t maxt)
{
    size_t n = 0;
    snprintf(buf, cap, "%s", s);
    for (char *p = strtok(buf, " "); p && n < maxt; p = strtok(NULL, " ")) toks[n++] = p;
    return n;
}

static void test_message_layouts(void **state)
{
    (void)state;
    tape *t = calloc(1, sizeof *t);
    assert_non_null(t);
    for (size_t li = 0; li < sizeof layouts / sizeof layouts[0]; li++) {
        const layout *L = &layouts[li];
        char buf[256];
        const char *toks[32];
        size_t ntok = split(L->tokens, buf, sizeof buf, toks, 32);
        for (int iter = 0; iter < 40; iter++) {
            memset(t, 0, sizeof *t);
            t->rng = 0x9e3779b97f4a7c15ull * (li * 131 + (size_t)iter + 1);
            kvs_wbuf w;
            kvs_wbuf_init(&w);
            size_t f = kvs_wbuf_begin_frame(&w, L->type, L->response ? KVS_F_RESPONSE : 0,
                                            L->response ? KVS_ERR_NOT_FOUND : 0, (uint64_t)iter);
            size_t pos = 0;
            interp(toks, ntok, &pos, t, &w, NULL);
            kvs_wbuf_end_frame(&w, f);
            assert_int_equal(w.err, 0);

            kvs_frame_hdr h;
            assert_int_equal(kvs_frame_hdr_decode(w.data, KVS_MAX_BODY, &h), KVS_OK);
            assert_int_equal(h.type, L->type);
            assert_int_equal(h.body_len, w.len - KVS_FRAME_HDR);
            assert_int_equal(h.req_id, (uint64_t)iter);
            const uint8_t *body = w.data + KVS_FRAME_HDR;

            /* Whole body: decodes, matches, fully consumed. */
            kvs_rbuf r;
            kvs_rbuf_init(&r, body, h.body_len);
            pos = 0;
            t->rn = t->rb = 0;
            interp(toks, ntok, &pos, t, NULL, &r);
            if (t->mismatch || kvs_rbuf_finish(&r) != KVS_OK)
                fail_msg("%s iter %d: round trip failed", L->name, iter);

            /* Every truncation fails (except where the layout ends in rawall,
             * whose length is the body's). */
            int open_end = strstr(L->tokens, "rawall") != NULL;
            for (size_t len = 0; len < h.body_len; len++) {
                kvs_rbuf_init(&r, body, len);
                pos = 0;
                t->rn = t->rb = 0;
                t->mismatch = 0;
                interp(toks, ntok, &pos, t, NULL, &r);
                int ok = kvs_rbuf_finish(&r) == KVS_OK && !t->mismatch;
                if (ok && !open_end)
                    fail_msg("%s iter %d: truncated to %zu of %u decoded", L->name, iter, len,
                             h.body_len);
            }
            /* Any changed byte is noticed (the checker itself works). */
            uint8_t *mut = malloc(h.body_len + 1);
            assert_non_null(mut);
            for (size_t at = 0; at < h.body_len; at++) {
                memcpy(mut, body, h.body_len);
                mut[at] ^= 0x41;
                kvs_rbuf_init(&r, mut, h.body_len);
                pos = 0;
                t->rn = t->rb = 0;
                t->mismatch = 0;
                interp(toks, ntok, &pos, t, NULL, &r);
                if (kvs_rbuf_finish(&r) == KVS_OK && !t->mismatch)
                    fail_msg("%s iter %d: byte %zu changed, not noticed", L->name, iter, at);
            }
            free(mut);
            /* Trailing bytes are rejected. */
            if (!open_end) {
                uint8_t *ext = malloc(h.body_len + 1);
                assert_non_null(ext);
                memcpy(ext, body, h.body_len);
                ext[h.body_len] = 0;
                kvs_rbuf_init(&r, ext, h.body_len + 1);
                pos = 0;
                t->rn = t->rb = 0;
                t->mismatch = 0;
                interp(toks, ntok, &pos, t, NULL, &r);
                assert_int_equal(t->mismatch, 0);
                assert_int_equal(kvs_rbuf_finish(&r), KVS_ERR_PROTO);
                free(ext);
            }
            kvs_wbuf_free(&w);
        }
    }
    free(t);
}

/* Keys and strings over their limits, batch counts over KVS_MAX_BATCH. */
static void test_over_limits(void **state)
{
    (void)state;
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    uint8_t key[KVS_KEY_MAX + 1];
    memset(key, 'k', sizeof key);
    kvs_wbuf_u64(&w, 1);
    kvs_wbuf_u32(&w, 1);
    kvs_wbuf_bytes(&w, key, KVS_KEY_MAX + 1);
    kvs_rbuf r;
    kvs_rbuf_init(&r, w.data, w.len);
    kvs_rbuf_u64(&r);
    kvs_rbuf_u32(&r);
    uint32_t n;
    assert_null(kvs_rbuf_bytes(&r, KVS_KEY_MAX, &n));
    assert_int_equal(kvs_rbuf_finish(&r), KVS_ERR_PROTO);

    /* A batch count far beyond the body does not make the reader overrun. */
    kvs_wbuf_reset(&w);
    kvs_wbuf_u32(&w, 0xffffffffu);
    kvs_wbuf_bytes(&w, "k", 1);
    kvs_rbuf_init(&r, w.data, w.len);
    uint32_t cnt = kvs_rbuf_u32(&r);
    assert_true(cnt > KVS_MAX_BATCH);
    uint32_t got = 0;
    for (uint32_t i = 0; i < cnt && !r.err; i++)
        if (kvs_rbuf_bytes(&r, KVS_KEY_MAX, &n)) got++;
    assert_int_equal(got, 1);
    assert_int_equal(r.err, KVS_ERR_PROTO);

    /* A str of 300 bytes into a 256-byte field. */
    char s[301];
    memset(s, 's', 300);
    s[300] = 0;
    kvs_wbuf_reset(&w);
    kvs_wbuf_str(&w, s);
    char out[256];
    kvs_rbuf_init(&r, w.data, w.len);
    kvs_rbuf_str(&r, out, sizeof out);
    assert_int_equal(r.err, KVS_ERR_PROTO);
    kvs_wbuf_free(&w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hdr_roundtrip),    cmocka_unit_test(test_hdr_failures),
        cmocka_unit_test(test_wbuf_layout),      cmocka_unit_test(test_wbuf_frames),
        cmocka_unit_test(test_rbuf_scalars),     cmocka_unit_test(test_rbuf_raw),
        cmocka_unit_test(test_rbuf_bytes),       cmocka_unit_test(test_rbuf_str),
        cmocka_unit_test(test_message_layouts),  cmocka_unit_test(test_over_limits),
    };
    return cmocka_run_group_tests_name("proto", tests, NULL, NULL);
}
