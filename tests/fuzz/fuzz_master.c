/* libFuzzer target for the master's protocol handler: the input is a
 * stream of bytes fed, in chunks, into one in-memory connection exactly as
 * the epoll server feeds socket reads (no sockets). The first bytes choose
 * the setup:
 *   byte 0 bit0: complete a valid HELLO first (reach the post-auth paths)
 *          bit1: also mount a 64 MiB segment for that client
 *          bit2: the connection is local (unix socket, same uid)
 *          bit3: the master has a secret
 *   byte 1: chunk size (1 + 37*b bytes) and clock step between chunks
 * After every chunk the master ticks, and the allocator/index invariants
 * are checked (used bytes == sum of object sizes per segment). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "master/alloc.h"
#include "master/master_int.h"
#include "proto/proto.h"

static void check_invariants(kvs_master *m)
{
    uint64_t linked_complete = 0;
    for (size_t i = 0; i < m->segs.n; i++) {
        kvs_seg *s = m->segs.v[i];
        uint64_t sum = 0, n = 0;
        for (kvs_list *e = s->objs.next; e != &s->objs; e = e->next) {
            kvs_obj *o = KVS_CONTAINER_OF(e, kvs_obj, seg_link);
            sum += kvs_alloc_round(o->size);
            n++;
            if (o->linked && o->state == KVS_OBJ_COMPLETE) linked_complete++;
        }
        if (sum != kvs_seg_used(s) || n != s->nobjs) __builtin_trap();
    }
    if (linked_complete != m->n_complete) __builtin_trap();
    if (m->n_complete > m->ix.count || m->ix.count > m->n_objs) __builtin_trap();
}

static void hello(kvs_master *m, kvs_mconn *c, const char *secret, kvs_wbuf *out)
{
    kvs_wbuf b;
    kvs_wbuf_init(&b);
    uint8_t hid[16] = {1}, auth[32];
    kvs_auth_compute(secret, c->nonce, auth);
    size_t f = kvs_wbuf_begin_frame(&b, KVS_MSG_HELLO, 0, 0, 1);
    kvs_wbuf_u32(&b, KVS_PROTO_VERSION);
    kvs_wbuf_u32(&b, 1);
    kvs_wbuf_u64(&b, 1234);
    kvs_wbuf_u32(&b, (uint32_t)getuid());
    kvs_wbuf_str(&b, "fuzz");
    kvs_wbuf_put(&b, hid, 16);
    kvs_wbuf_put(&b, auth, 32);
    kvs_wbuf_end_frame(&b, f);
    size_t used;
    kvs_master_feed(m, c, b.data, b.len, out, &used);
    kvs_wbuf_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2) return 0;
    static int quiet;
    if (!quiet) {
        kvs_log_set_level(KVS_LOG_ERROR);
        quiet = 1;
    }
    uint8_t mode = data[0], pace = data[1];
    data += 2;
    size -= 2;
    const char *secret = (mode & 8) ? "fuzz-secret" : NULL;
    kvs_master_opts o;
    kvs_master_opts_init(&o);
    o.secret = secret;
    o.client_ttl_ms = 2000;
    o.lease_ms = 500;
    o.put_timeout_ms = 1000;
    o.id_base = 1; /* predictable ids: the corpus can name client 1, lease 1... */
    kvs_master *m = NULL;
    if (kvs_master_new(&o, &m) != KVS_OK) return 0;
    uint64_t now = 1000000;
    kvs_master_set_time(m, now);
    kvs_wbuf out;
    kvs_wbuf_init(&out);
    kvs_mconn c;
    int local = (mode & 4) != 0;
    kvs_mconn_init(m, &c, local, local ? (int)getuid() : -1, &out);
    if (mode & 1) {
        hello(m, &c, secret, &out);
        if ((mode & 2) && c.client_id) {
            uint8_t hid[16] = {1};
            uint32_t seg;
            kvs_m_mount(m, c.client_id, 64u << 20, "fuzz-shm", "127.0.0.1:1", hid, 1, &seg);
        }
    }
    /* the connection's input buffer, as in server.c */
    uint8_t *in = malloc(size + 1);
    size_t in_len = 0, pos = 0, chunk = 1 + (size_t)pace * 37;
    int rc = KVS_OK;
    while (pos < size && rc == KVS_OK) {
        size_t n = size - pos < chunk ? size - pos : chunk;
        memcpy(in + in_len, data + pos, n);
        in_len += n;
        pos += n;
        size_t used = 0;
        rc = kvs_master_feed(m, &c, in, in_len, &out, &used);
        if (used > in_len) __builtin_trap();
        memmove(in, in + used, in_len - used);
        in_len -= used;
        kvs_wbuf_reset(&out);
        now += (pace & 0x0f) * 50u;
        kvs_master_set_time(m, now);
        kvs_master_tick(m);
        check_invariants(m);
    }
    free(in);
    kvs_wbuf_free(&out);
    kvs_master_free(m);
    return 0;
}

#ifdef KVS_FUZZ_STANDALONE
/* Without libFuzzer: run each file named on the command line once. */
#include <stdio.h>
int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) continue;
        static uint8_t buf[1 << 20];
        size_t n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, n);
    }
    return 0;
}
#endif
