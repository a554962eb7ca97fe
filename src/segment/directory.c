/* The directory of a segment's complete objects (see directory.h). */
#include "segment/directory.h"

#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "common/log.h"
#include "kvshelf/errors.h"

/* Header and slot as laid out in memory (no padding: checked below). */
typedef struct dir_hdr {
    char magic[8];
    uint32_t version;
    uint32_t slot_size;
    uint64_t nslots;
    uint64_t data_size;
    uint64_t nonce;
    uint64_t check;
    uint64_t reign;       /* the master reign the owner follows (kvs_dir_set_reign) */
    uint64_t reign_check; /* xxh3-64 of reign seeded with nonce ^ REIGN_SEED */
} dir_hdr;

typedef struct dir_slot {
    uint32_t state;
    uint32_t key_len;
    uint64_t offset;
    uint64_t size;
    uint64_t obj_id;
    uint64_t check;
    uint8_t key[KVS_DIR_KEY_MAX];
} dir_slot;

_Static_assert(sizeof(dir_hdr) == 64 && sizeof(dir_hdr) <= KVS_DIR_HDR_SIZE, "dir header");
_Static_assert(sizeof(dir_slot) == 296 && sizeof(dir_slot) <= KVS_DIR_SLOT_SIZE, "dir slot");
#define HDR_CHECKED 40 /* bytes of the header covered by its check */

uint64_t kvs_dir_default_slots(uint64_t data_size)
{
    const char *env = getenv("KVSHELF_DIR_SLOTS");
    uint64_t n;
    if (env && *env) {
        char *end;
        unsigned long long v = strtoull(env, &end, 10);
        n = *end == '\0' ? (uint64_t)v : data_size / 65536;
    } else {
        n = data_size / 65536;
        if (n < 64) n = 64;
    }
    return n > KVS_DIR_MAX_SLOTS ? KVS_DIR_MAX_SLOTS : n;
}

uint64_t kvs_dir_bytes(uint64_t nslots, uint64_t page)
{
    if (nslots == 0) return 0;
    if (nslots > KVS_DIR_MAX_SLOTS) nslots = KVS_DIR_MAX_SLOTS;
    uint64_t b = KVS_DIR_HDR_SIZE + nslots * (uint64_t)KVS_DIR_SLOT_SIZE;
    return (b + page - 1) & ~(page - 1);
}

static uint64_t hdr_check(const dir_hdr *h) { return XXH3_64bits(h, HDR_CHECKED); }

#define REIGN_SEED 0x7265696e6e676572ull
static uint64_t reign_check(uint64_t reign, uint64_t nonce)
{
    return XXH3_64bits_withSeed(&reign, sizeof reign, nonce ^ REIGN_SEED);
}

/* The check of a slot's fields (key_len must be <= KVS_DIR_KEY_MAX). */
static uint64_t slot_check(const dir_slot *s, uint64_t nonce)
{
    uint8_t buf[28 + KVS_DIR_KEY_MAX];
    memcpy(buf, &s->offset, 8);
    memcpy(buf + 8, &s->size, 8);
    memcpy(buf + 16, &s->obj_id, 8);
    memcpy(buf + 24, &s->key_len, 4);
    memcpy(buf + 28, s->key, s->key_len);
    return XXH3_64bits_withSeed(buf, 28 + (size_t)s->key_len, nonce);
}

static uint64_t grain_up(uint64_t n)
{
    return n > UINT64_MAX - (KVS_DIR_GRAIN - 1) ? UINT64_MAX
                                                : (n + KVS_DIR_GRAIN - 1) & ~(uint64_t)(KVS_DIR_GRAIN - 1);
}

uint64_t kvs_dir_format(void *mem, uint64_t bytes, uint64_t data_size, uint64_t nonce)
{
    if (!mem || bytes < KVS_DIR_HDR_SIZE + KVS_DIR_SLOT_SIZE) return 0;
    uint64_t n = (bytes - KVS_DIR_HDR_SIZE) / KVS_DIR_SLOT_SIZE;
    if (n > KVS_DIR_MAX_SLOTS) n = KVS_DIR_MAX_SLOTS;
    uint8_t *p = mem;
    dir_hdr *h = mem;
    memset(h, 0, KVS_DIR_HDR_SIZE);
    for (uint64_t i = 0; i < n; i++) { /* free every slot */
        uint32_t zero = 0;
        memcpy(p + KVS_DIR_HDR_SIZE + i * KVS_DIR_SLOT_SIZE, &zero, sizeof zero);
    }
    memcpy(h->magic, KVS_DIR_MAGIC, sizeof h->magic);
    h->version = KVS_DIR_VERSION;
    h->slot_size = KVS_DIR_SLOT_SIZE;
    h->nslots = n;
    h->data_size = data_size;
    h->nonce = nonce;
    h->check = hdr_check(h);
    return n;
}

/* ---- parsing ---- */

typedef struct cand {
    dir_slot s;   /* private copy: the shared memory may change meanwhile */
    uint32_t slot;
    uint8_t reject;
} cand;

static int by_offset(const void *a, const void *b)
{
    const cand *x = *(cand *const *)a, *y = *(cand *const *)b;
    return x->s.offset < y->s.offset ? -1 : x->s.offset > y->s.offset;
}

static int by_key(const void *a, const void *b)
{
    const cand *x = *(cand *const *)a, *y = *(cand *const *)b;
    if (x->s.key_len != y->s.key_len) return x->s.key_len < y->s.key_len ? -1 : 1;
    return memcmp(x->s.key, y->s.key, x->s.key_len);
}

/* Reads and checks the header; its slot count in *nslots. */
static int read_hdr(const void *mem, uint64_t bytes, uint64_t data_size, uint64_t nonce,
                    uint64_t *nslots)
{
    dir_hdr h;
    if (!mem || bytes < KVS_DIR_HDR_SIZE) return KVS_ERR_CORRUPT;
    memcpy(&h, mem, sizeof h);
    if (memcmp(h.magic, KVS_DIR_MAGIC, sizeof h.magic) || h.version != KVS_DIR_VERSION ||
        h.slot_size != KVS_DIR_SLOT_SIZE || h.nslots == 0 || h.nslots > KVS_DIR_MAX_SLOTS ||
        h.nslots > (bytes - KVS_DIR_HDR_SIZE) / KVS_DIR_SLOT_SIZE || h.data_size != data_size ||
        h.nonce != nonce || h.check != hdr_check(&h))
        return KVS_ERR_CORRUPT;
    *nslots = h.nslots;
    return KVS_OK;
}

int kvs_dir_parse(const void *mem, uint64_t bytes, uint64_t data_size, uint64_t nonce,
                  kvs_dir_fn fn, void *ud, uint8_t *bad, uint64_t bad_cap, kvs_dir_stats *st)
{
    kvs_dir_stats local;
    if (!st) st = &local;
    memset(st, 0, sizeof *st);
    uint64_t n = 0;
    if (read_hdr(mem, bytes, data_size, nonce, &n) != KVS_OK) return KVS_ERR_CORRUPT;
    if (!bad) bad_cap = 0;
    if (bad_cap) memset(bad, 0, bad_cap);
    const uint8_t *p = (const uint8_t *)mem + KVS_DIR_HDR_SIZE;
    /* pass 1: live slots that check out on their own */
    uint64_t nlive = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint32_t state;
        memcpy(&state, p + i * KVS_DIR_SLOT_SIZE, sizeof state);
        if (state == KVS_DIR_LIVE) nlive++;
    }
    cand *c = nlive ? malloc(nlive * sizeof *c) : NULL;
    cand **ord = nlive ? malloc(nlive * sizeof *ord) : NULL;
    if (nlive && (!c || !ord)) {
        free(c);
        free(ord);
        return KVS_ERR_NOMEM;
    }
    uint64_t k = 0;
    for (uint64_t i = 0; i < n && k < nlive; i++) {
        cand *x = &c[k];
        memcpy(&x->s, p + i * KVS_DIR_SLOT_SIZE, sizeof x->s);
        if (x->s.state != KVS_DIR_LIVE) continue;
        x->slot = (uint32_t)i;
        x->reject = 0;
        const dir_slot *s = &x->s;
        int ok = s->key_len >= 1 && s->key_len <= KVS_DIR_KEY_MAX && s->size > 0 &&
                 s->offset % KVS_DIR_GRAIN == 0 && s->offset < data_size &&
                 grain_up(s->size) <= data_size - s->offset && s->check == slot_check(s, nonce);
        if (!ok) {
            st->corrupt++;
            if (i < bad_cap) bad[i] = 1;
            continue;
        }
        ord[k] = x;
        k++;
    }
    /* pass 2: overlapping ranges (sorted by offset, a running furthest end) */
    if (k > 1) {
        qsort(ord, (size_t)k, sizeof *ord, by_offset);
        cand *far = ord[0];
        uint64_t far_end = ord[0]->s.offset + grain_up(ord[0]->s.size);
        for (uint64_t i = 1; i < k; i++) {
            cand *x = ord[i];
            uint64_t end = x->s.offset + grain_up(x->s.size);
            if (x->s.offset < far_end) {
                x->reject = far->reject = 1;
            }
            if (end > far_end) {
                far_end = end;
                far = x;
            }
        }
        /* pass 3: a key listed twice */
        cand **kord = malloc((size_t)k * sizeof *kord);
        if (!kord) {
            free(c);
            free(ord);
            return KVS_ERR_NOMEM;
        }
        memcpy(kord, ord, (size_t)k * sizeof *kord);
        qsort(kord, (size_t)k, sizeof *kord, by_key);
        for (uint64_t i = 1; i < k; i++) {
            if (by_key(&kord[i - 1], &kord[i]) == 0) {
                if (!kord[i - 1]->reject && !kord[i]->reject) st->dup_keys++;
                if (kord[i - 1]->reject != 2) kord[i - 1]->reject = 2;
                kord[i]->reject = 2;
            }
        }
        free(kord);
    }
    int stop = 0;
    for (uint64_t i = 0; i < k; i++) {
        cand *x = ord[i];
        if (x->reject) {
            if (x->reject == 1) st->overlap++;
            if (x->slot < bad_cap) bad[x->slot] = 1;
            continue;
        }
        st->live++;
        if (stop || !fn) continue;
        kvs_dir_entry e = {x->s.key, x->s.key_len, x->s.offset, x->s.size, x->s.obj_id, x->slot};
        stop = fn(&e, ud);
    }
    free(c);
    free(ord);
    return KVS_OK;
}

/* ---- the owner's handle ---- */

#define EMPTY UINT32_MAX

struct kvs_dir {
    pthread_mutex_t mu;
    uint8_t *mem;
    uint64_t bytes, data_size, nonce, nslots;
    uint64_t reg;   /* current registration */
    uint64_t count; /* live entries */
    uint32_t *free_v; /* free slot indices (a stack) */
    uint64_t nfree;
    /* offset -> slot, open addressing with linear probing */
    uint64_t *map_off;
    uint32_t *map_slot;
    uint64_t map_mask;
};

static dir_slot *slot_at(kvs_dir *d, uint64_t i)
{
    return (dir_slot *)(void *)(d->mem + KVS_DIR_HDR_SIZE + i * KVS_DIR_SLOT_SIZE);
}

static uint64_t map_hash(const kvs_dir *d, uint64_t off)
{
    return ((off / KVS_DIR_GRAIN) * 0x9e3779b97f4a7c15ull >> 17) & d->map_mask;
}

/* Index in the map of `off`, or of the empty place where it would go. */
static uint64_t map_find(const kvs_dir *d, uint64_t off)
{
    uint64_t i = map_hash(d, off);
    while (d->map_slot[i] != EMPTY && d->map_off[i] != off) i = (i + 1) & d->map_mask;
    return i;
}

static void map_del_at(kvs_dir *d, uint64_t i)
{
    /* backward-shift deletion keeps every probe sequence unbroken */
    uint64_t j = i;
    for (;;) {
        d->map_slot[i] = EMPTY;
        for (;;) {
            j = (j + 1) & d->map_mask;
            if (d->map_slot[j] == EMPTY) return;
            uint64_t h = map_hash(d, d->map_off[j]);
            /* can j's entry move to i? only if i lies cyclically in [h, j) */
            if (i <= j ? (h <= i || h > j) : (h <= i && h > j)) break;
        }
        d->map_off[i] = d->map_off[j];
        d->map_slot[i] = d->map_slot[j];
        i = j;
    }
}

static void slot_clear(dir_slot *s) { __atomic_store_n(&s->state, 0u, __ATOMIC_RELEASE); }

/* Rebuilds the map and free list from the memory; clears rejected slots. */
typedef struct rebuild_ctx {
    kvs_dir *d;
    uint8_t *live;
} rebuild_ctx;

static int rebuild_cb(const kvs_dir_entry *e, void *ud)
{
    rebuild_ctx *x = ud;
    x->live[e->slot] = 1;
    uint64_t i = map_find(x->d, e->offset);
    x->d->map_off[i] = e->offset;
    x->d->map_slot[i] = e->slot;
    x->d->count++;
    return 0;
}

static int rebuild_locked(kvs_dir *d)
{
    uint8_t *bad = malloc(d->nslots), *live = calloc(d->nslots, 1);
    if (!bad || !live) {
        free(bad);
        free(live);
        return KVS_ERR_NOMEM;
    }
    for (uint64_t i = 0; i <= d->map_mask; i++) d->map_slot[i] = EMPTY;
    d->count = 0;
    rebuild_ctx x = {d, live};
    kvs_dir_stats st;
    int rc = kvs_dir_parse(d->mem, d->bytes, d->data_size, d->nonce, rebuild_cb, &x, bad,
                           d->nslots, &st);
    if (rc == KVS_OK) {
        if (st.corrupt || st.overlap || st.dup_keys)
            KVS_LOGW("segment directory: %llu entries kept; dropped %llu corrupt, %llu "
                     "overlapping and %llu with a key listed twice",
                     (unsigned long long)st.live, (unsigned long long)st.corrupt,
                     (unsigned long long)st.overlap, (unsigned long long)st.dup_keys);
        d->nfree = 0;
        for (uint64_t i = d->nslots; i-- > 0;) {
            if (live[i]) continue;
            dir_slot *s = slot_at(d, i);
            if (bad[i] || __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != 0) slot_clear(s);
            d->free_v[d->nfree++] = (uint32_t)i;
        }
    }
    free(bad);
    free(live);
    return rc;
}

int kvs_dir_attach(void *mem, uint64_t bytes, uint64_t data_size, uint64_t nonce, int fresh,
                   kvs_dir **out)
{
    *out = NULL;
    if (!mem || bytes < KVS_DIR_HDR_SIZE + KVS_DIR_SLOT_SIZE) return KVS_ERR_INVALID;
    uint64_t n = 0;
    if (fresh) n = kvs_dir_format(mem, bytes, data_size, nonce);
    else if (read_hdr(mem, bytes, data_size, nonce, &n) != KVS_OK) {
        KVS_LOGW("segment directory: bad header (not this segment's, or overwritten)");
        return KVS_ERR_CORRUPT;
    }
    if (n == 0) return KVS_ERR_INVALID;
    kvs_dir *d = calloc(1, sizeof *d);
    if (!d) return KVS_ERR_NOMEM;
    uint64_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    d->mem = mem;
    d->bytes = bytes;
    d->data_size = data_size;
    d->nonce = nonce;
    d->nslots = n;
    d->map_mask = cap - 1;
    d->free_v = malloc(n * sizeof *d->free_v);
    d->map_off = malloc(cap * sizeof *d->map_off);
    d->map_slot = malloc(cap * sizeof *d->map_slot);
    pthread_mutex_init(&d->mu, NULL);
    int rc = d->free_v && d->map_off && d->map_slot ? rebuild_locked(d) : KVS_ERR_NOMEM;
    if (rc != KVS_OK) {
        kvs_dir_close(d);
        return rc;
    }
    *out = d;
    return KVS_OK;
}

void kvs_dir_close(kvs_dir *d)
{
    if (!d) return;
    pthread_mutex_destroy(&d->mu);
    free(d->free_v);
    free(d->map_off);
    free(d->map_slot);
    free(d);
}

static int add_locked(kvs_dir *d, const void *key, uint32_t key_len, uint64_t offset,
                      uint64_t size, uint64_t obj_id)
{
    if (!key || key_len < 1 || key_len > KVS_DIR_KEY_MAX || size == 0 ||
        offset % KVS_DIR_GRAIN || offset >= d->data_size ||
        grain_up(size) > d->data_size - offset)
        return KVS_ERR_INVALID;
    uint64_t mi = map_find(d, offset);
    uint32_t si;
    if (d->map_slot[mi] != EMPTY) {
        si = d->map_slot[mi]; /* replaces the entry at this offset */
        d->count--;
    } else {
        if (d->nfree == 0) return KVS_ERR_NO_SPACE;
        si = d->free_v[--d->nfree];
    }
    dir_slot *s = slot_at(d, si);
    slot_clear(s);
    dir_slot v;
    memset(&v, 0, sizeof v);
    v.key_len = key_len;
    v.offset = offset;
    v.size = size;
    v.obj_id = obj_id;
    memcpy(v.key, key, key_len);
    v.check = slot_check(&v, d->nonce);
    /* every field but state, then state last */
    memcpy((uint8_t *)s + 4, (const uint8_t *)&v + 4, sizeof v - 4);
    __atomic_store_n(&s->state, KVS_DIR_LIVE, __ATOMIC_RELEASE);
    d->map_off[mi] = offset;
    d->map_slot[mi] = si;
    d->count++;
    return KVS_OK;
}

int kvs_dir_add(kvs_dir *d, const void *key, uint32_t key_len, uint64_t offset, uint64_t size,
                uint64_t obj_id)
{
    if (!d) return KVS_ERR_INVALID;
    pthread_mutex_lock(&d->mu);
    int rc = add_locked(d, key, key_len, offset, size, obj_id);
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int kvs_dir_add_if(kvs_dir *d, uint64_t reg, const void *key, uint32_t key_len,
                   uint64_t offset, uint64_t size, uint64_t obj_id)
{
    if (!d) return KVS_ERR_INVALID;
    pthread_mutex_lock(&d->mu);
    int rc = reg == d->reg ? add_locked(d, key, key_len, offset, size, obj_id)
                           : KVS_ERR_UNAVAILABLE;
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int kvs_dir_del(kvs_dir *d, uint64_t offset)
{
    if (!d) return KVS_ERR_INVALID;
    pthread_mutex_lock(&d->mu);
    uint64_t mi = map_find(d, offset);
    if (d->map_slot[mi] != EMPTY) {
        uint32_t si = d->map_slot[mi];
        slot_clear(slot_at(d, si));
        map_del_at(d, mi);
        d->free_v[d->nfree++] = si;
        d->count--;
    }
    pthread_mutex_unlock(&d->mu);
    return KVS_OK;
}

uint64_t kvs_dir_count(kvs_dir *d)
{
    pthread_mutex_lock(&d->mu);
    uint64_t n = d->count;
    pthread_mutex_unlock(&d->mu);
    return n;
}

uint64_t kvs_dir_capacity(const kvs_dir *d) { return d ? d->nslots : 0; }

uint64_t kvs_dir_reign(kvs_dir *d)
{
    if (!d) return 0;
    pthread_mutex_lock(&d->mu);
    const dir_hdr *h = (const dir_hdr *)d->mem;
    uint64_t r = __atomic_load_n(&h->reign, __ATOMIC_ACQUIRE);
    uint64_t c = __atomic_load_n(&h->reign_check, __ATOMIC_ACQUIRE);
    pthread_mutex_unlock(&d->mu);
    return c == reign_check(r, d->nonce) ? r : 0;
}

void kvs_dir_set_reign(kvs_dir *d, uint64_t reign)
{
    if (!d) return;
    pthread_mutex_lock(&d->mu);
    dir_hdr *h = (dir_hdr *)d->mem;
    /* a crash between the two stores leaves a check that fails: reign 0,
     * which a later master takes as older than any (refused: safe) */
    __atomic_store_n(&h->reign, reign, __ATOMIC_RELEASE);
    __atomic_store_n(&h->reign_check, reign_check(reign, d->nonce), __ATOMIC_RELEASE);
    pthread_mutex_unlock(&d->mu);
}

uint64_t kvs_dir_new_registration(kvs_dir *d)
{
    pthread_mutex_lock(&d->mu);
    uint64_t r = ++d->reg;
    pthread_mutex_unlock(&d->mu);
    return r;
}

typedef struct snap_ctx {
    kvs_dir_entry *v;
    uint8_t *keys;
    uint64_t n, cap;
} snap_ctx;

static int snap_cb(const kvs_dir_entry *e, void *ud)
{
    snap_ctx *x = ud;
    if (x->n >= x->cap) return 1;
    uint8_t *k = x->keys + x->n * KVS_DIR_KEY_MAX;
    memcpy(k, e->key, e->key_len);
    x->v[x->n] = *e;
    x->v[x->n].key = k;
    x->n++;
    return 0;
}

int kvs_dir_snapshot(kvs_dir *d, kvs_dir_entry **out, uint64_t *n)
{
    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&d->mu);
    int rc = rebuild_locked(d); /* validate again: the memory is shared */
    uint64_t cnt = d->count;
    kvs_dir_entry *blk = NULL;
    if (rc == KVS_OK && cnt) {
        blk = malloc(cnt * (sizeof *blk + KVS_DIR_KEY_MAX));
        if (!blk) rc = KVS_ERR_NOMEM;
    }
    if (rc == KVS_OK && cnt) {
        snap_ctx x = {blk, (uint8_t *)(blk + cnt), 0, cnt};
        rc = kvs_dir_parse(d->mem, d->bytes, d->data_size, d->nonce, snap_cb, &x, NULL, 0,
                           NULL);
        *n = x.n;
    }
    pthread_mutex_unlock(&d->mu);
    if (rc != KVS_OK) {
        free(blk);
        *n = 0;
        return rc;
    }
    *out = blk;
    return KVS_OK;
}
