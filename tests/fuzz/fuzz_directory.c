/* libFuzzer target: the segment directory's parser and owner handle
 * (src/segment/directory.h). A node's directory is memory another process
 * can write, so whatever it holds must be rejected or accepted without a
 * crash, and what is accepted must be within bounds and free of overlaps.
 *
 * Input byte 0 picks the mode:
 *   bit 0 set    the rest is laid over a freshly formatted directory (after
 *                its header), so the slots are fuzzed behind a valid header;
 *                with bit 1 also set, every live-marked slot gets a correct
 *                check first, so overlap and duplicate-key rules are reached
 *   bit 0 clear  the rest is the whole directory, header included
 * Then the parser runs, every accepted entry is checked (bounds, alignment,
 * key length, no overlap with the others), and the owner handle attaches to
 * a copy (clearing what it rejects), applies adds/deletes taken from the
 * input, and a second parse must find no corrupt slot. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "kvshelf/errors.h"
#include "segment/directory.h"

#define DATA (1ull << 24)
#define NONCE 0x5eedf00dull
#define NSLOTS 24

typedef struct acc {
    uint64_t n;
    uint64_t off[NSLOTS], end[NSLOTS];
} acc;

static int check_entry(const kvs_dir_entry *e, void *ud)
{
    acc *a = ud;
    if (e->key_len < 1 || e->key_len > KVS_DIR_KEY_MAX || e->size == 0 ||
        e->offset % KVS_DIR_GRAIN || e->offset >= DATA || e->size > DATA - e->offset)
        abort();
    uint64_t end = e->offset + ((e->size + KVS_DIR_GRAIN - 1) & ~(uint64_t)(KVS_DIR_GRAIN - 1));
    if (end > DATA) abort();
    for (uint64_t i = 0; i < a->n && i < NSLOTS; i++)
        if (e->offset < a->end[i] && a->off[i] < end) abort(); /* overlap accepted */
    if (a->n < NSLOTS) {
        a->off[a->n] = e->offset;
        a->end[a->n] = end;
    }
    a->n++;
    return 0;
}

/* Gives every live-marked slot a correct check (fields as they are, key
 * length clamped for the hash only). */
static void stamp(uint8_t *mem, uint64_t nslots)
{
    for (uint64_t i = 0; i < nslots; i++) {
        uint8_t *s = mem + KVS_DIR_HDR_SIZE + i * KVS_DIR_SLOT_SIZE;
        uint32_t st, kl;
        memcpy(&st, s, 4);
        if (st != KVS_DIR_LIVE) continue;
        memcpy(&kl, s + 4, 4);
        if (kl > KVS_DIR_KEY_MAX) continue;
        uint8_t buf[28 + KVS_DIR_KEY_MAX];
        memcpy(buf, s + 8, 24);      /* offset, size, obj_id */
        memcpy(buf + 24, s + 4, 4);  /* key_len */
        memcpy(buf + 28, s + 40, kl);
        uint64_t c = XXH3_64bits_withSeed(buf, 28 + (size_t)kl, NONCE);
        memcpy(s + 32, &c, 8);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    uint8_t mode = data[0];
    data++;
    size--;
    uint64_t bytes = kvs_dir_bytes(NSLOTS, 64);
    uint8_t *mem = calloc(1, bytes);
    if (!mem) return 0;
    if (mode & 1) {
        kvs_dir_format(mem, bytes, DATA, NONCE);
        size_t n = size < bytes - KVS_DIR_HDR_SIZE ? size : bytes - KVS_DIR_HDR_SIZE;
        memcpy(mem + KVS_DIR_HDR_SIZE, data, n);
        if (mode & 2) stamp(mem, NSLOTS);
    } else {
        memcpy(mem, data, size < bytes ? size : bytes);
    }
    acc a = {0};
    uint8_t bad[NSLOTS]; /* the header cannot claim more slots than fit */
    kvs_dir_stats st;
    int rc = kvs_dir_parse(mem, bytes, DATA, NONCE, check_entry, &a, bad, sizeof bad, &st);
    if (rc != KVS_OK && rc != KVS_ERR_CORRUPT && rc != KVS_ERR_NOMEM) abort();
    if (rc == KVS_OK && st.live != a.n) abort();

    kvs_dir *d = NULL;
    if (kvs_dir_attach(mem, bytes, DATA, NONCE, 0, &d) == KVS_OK) {
        if (kvs_dir_count(d) != st.live) abort();
        /* a few owner operations driven by the tail of the input */
        for (size_t i = 0; i + 3 < size && i < 64; i += 3) {
            uint64_t off = (uint64_t)data[i + 1] * KVS_DIR_GRAIN;
            if (data[i] & 1) kvs_dir_add(d, data + i, 1 + (data[i + 2] & 3), off, 1 + data[i + 2], i);
            else kvs_dir_del(d, off);
        }
        kvs_dir_entry *v = NULL;
        uint64_t n = 0;
        if (kvs_dir_snapshot(d, &v, &n) == KVS_OK && n != kvs_dir_count(d)) abort();
        free(v);
        kvs_dir_close(d);
        kvs_dir_stats st2;
        if (kvs_dir_parse(mem, bytes, DATA, NONCE, NULL, NULL, NULL, 0, &st2) != KVS_OK) abort();
        if (st2.corrupt) abort(); /* the owner cleared every rejected slot */
    }
    free(mem);
    return 0;
}
