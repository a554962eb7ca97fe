/* `kvshelf demo`: the main job. Builds a host-memory KV cache with the
 * geometry of Qwen2.5-14B (vLLM per-layer K and V tensors), then through the
 * embedded pool: dump its blocks, look them up, load them into other block
 * ids, check every byte, and print the figures beside a memcpy reference. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "common/util.h"
#include "kvshelf/kvshelf.h"
#include "tools/commands.h"

static void demo_usage(FILE *f)
{
    fprintf(f,
            "usage: kvshelf demo [options]\n\n"
            "Dumps, looks up and loads KV blocks through kvshelf and prints the figures.\n"
            "With no master address it uses the embedded host-local pool (started on\n"
            "demand; `kvshelf stop` ends it).\n\n"
            "options:\n"
            "  --tokens N        prompt tokens to offload (default 4096)\n"
            "  --layers N        model layers (default 48, as Qwen2.5-14B)\n"
            "  --kv-heads N      KV heads (default 8)\n"
            "  --head-dim N      head dimension (default 128)\n"
            "  --block-size N    tokens per KV block (default 16)\n"
            "  --master ADDR     use this master instead of the embedded pool\n"
            "  --config FILE     JSON configuration (Mooncake keys)\n"
            "  --stop            stop the embedded pool at the end\n"
            "  -h, --help        this help\n");
}

static double secs(uint64_t ns) { return (double)ns / 1e9; }

/* Bytes free in /dev/shm, where the embedded pool's segment lives; 0 if unknown. */
static uint64_t shm_free(void)
{
    struct statvfs vs;
    return statvfs("/dev/shm", &vs) == 0 ? (uint64_t)vs.f_bavail * vs.f_frsize : 0;
}

/* The embedded segment the demo asks for: its KV, an eighth more for
 * slot rounding and headers, and a margin. */
static uint64_t segment_need(uint64_t kv_bytes, uint64_t margin)
{
    return kv_bytes + kv_bytes / 8 + margin;
}

/* Deterministic bytes for block b so a load can be checked without a copy. */
static void fill_block(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
    for (; i < n; i++) p[i] = (uint8_t)(x >> (i & 7));
}

int kvs_cmd_demo(int argc, char **argv)
{
    int tokens = 4096, layers = 48, kv_heads = 8, head_dim = 128, block_size = 16, stop = 0;
    int tokens_given = 0;
    const char *master = NULL, *config = NULL;
    static const struct option opts[] = {
        {"tokens", required_argument, 0, 't'},   {"layers", required_argument, 0, 'l'},
        {"kv-heads", required_argument, 0, 'k'}, {"head-dim", required_argument, 0, 'd'},
        {"block-size", required_argument, 0, 'b'}, {"master", required_argument, 0, 'm'},
        {"config", required_argument, 0, 'c'},   {"stop", no_argument, 0, 's'},
        {"help", no_argument, 0, 'h'},           {0, 0, 0, 0}};
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 't': tokens = atoi(optarg), tokens_given = 1; break;
        case 'l': layers = atoi(optarg); break;
        case 'k': kv_heads = atoi(optarg); break;
        case 'd': head_dim = atoi(optarg); break;
        case 'b': block_size = atoi(optarg); break;
        case 'm': master = optarg; break;
        case 'c': config = optarg; break;
        case 's': stop = 1; break;
        case 'h': demo_usage(stdout); return 0;
        default: demo_usage(stderr); return 2;
        }
    }
    if (tokens <= 0 || layers <= 0 || kv_heads <= 0 || head_dim <= 0 || block_size <= 0 ||
        tokens % block_size) {
        fprintf(stderr, "kvshelf demo: sizes must be positive and --tokens a multiple of "
                        "--block-size\n");
        return 2;
    }

    char err[512] = "";
    kvs_config cfg;
    kvs_config_init(&cfg);
    if ((config && kvs_config_load_file(&cfg, config, err, sizeof err)) ||
        kvs_config_load_env(&cfg, err, sizeof err)) {
        fprintf(stderr, "kvshelf demo: %s\n", err);
        return 2;
    }
    if (master) kvs_strlcpy(cfg.master_server_address, master, sizeof cfg.master_server_address);
    /* a segment size the user set, when big enough for the run, is theirs:
     * if /dev/shm cannot hold it, that error stands (the demo only shrinks a
     * segment it sized itself) */
    kvs_config defaults;
    kvs_config_init(&defaults);
    const uint64_t user_size =
        cfg.global_segment_size != defaults.global_segment_size ? cfg.global_segment_size : 0;

    const uint64_t chunk = (uint64_t)block_size * (uint64_t)kv_heads * (uint64_t)head_dim * 2;
    const size_t ntensors = (size_t)layers * 2;
    const int embedded = !cfg.master_server_address[0];

    /* The pool must hold the dump: grow the embedded segment if needed. If
     * the embedded pool cannot get that much of /dev/shm (a container's
     * default is 64 MiB) and --tokens was not given, offload fewer tokens,
     * as many as fit, and say so. */
    kvs_connector *conn = NULL;
    char ns[128];
    snprintf(ns, sizeof ns, "kvshelf-demo/qwen2.5-14b-shape/%d-%llu", (int)getpid(),
             (unsigned long long)kvs_now_ns());
    kvs_connector_opts co = {.ns = ns, .world_size = 1, .backend = "auto"};
    uint64_t margin = 64u << 20, t0 = 0;
    int rc;
    int own_size = 0; /* the segment size in use is the demo's choice */
    for (int attempt = 0;; attempt++) {
        uint64_t kv = chunk * ntensors * (uint64_t)(tokens / block_size);
        if (embedded && cfg.global_segment_size < segment_need(kv, margin)) {
            cfg.global_segment_size = segment_need(kv, margin);
            own_size = 1;
        }
        if (attempt == 0 && !user_size) own_size = 1;
        t0 = kvs_now_ns();
        rc = kvs_connector_open(&cfg, -2, &co, &conn, err, sizeof err);
        if (rc != KVS_ERR_NO_SPACE || !embedded || tokens_given || !own_size || attempt) break;
        uint64_t avail = shm_free();
        margin = avail / 8 < margin ? avail / 8 : margin;
        uint64_t room = avail > margin ? (avail - margin) / 9 * 8 : 0;
        uint64_t fit_blocks = room / (chunk * ntensors);
        if (fit_blocks > (uint64_t)(tokens / block_size)) fit_blocks = (uint64_t)(tokens / block_size);
        if (fit_blocks < 1 || fit_blocks == (uint64_t)(tokens / block_size))
            break; /* nothing fits, or the run was no bigger: the error stands */
        tokens = (int)fit_blocks * block_size;
        cfg.global_segment_size = 0; /* sized again above */
        printf("kvshelf demo: /dev/shm has %.1f MiB free, too little for the default run: "
               "offloading %d tokens instead (--tokens sets it; docker run --shm-size=4g gives "
               "a container more)\n",
               (double)avail / 1048576.0, tokens);
    }
    if (rc) {
        fprintf(stderr, "kvshelf demo: cannot open the connector: %s (%s)\n", err,
                kvs_strerror(rc));
        return 1;
    }
    const uint64_t t_open = kvs_now_ns() - t0;
    const uint32_t nblocks = (uint32_t)(tokens / block_size);
    const uint64_t tensor_bytes = chunk * nblocks * 2; /* first half dumped, second loaded */
    const uint64_t kv_bytes = chunk * ntensors * nblocks;

    printf("kvshelf demo: %d tokens, %d layers, %d KV heads x %d dims, bf16, %d-token blocks\n",
           tokens, layers, kv_heads, head_dim, block_size);
    printf("  %zu KV tensors (vLLM per-layer K and V), %u blocks of %.2f MiB, %.2f GiB of KV\n",
           ntensors, nblocks, (double)(chunk * ntensors) / 1048576.0,
           (double)kv_bytes / 1073741824.0);

    uint8_t **tensors = calloc(ntensors, sizeof *tensors);
    kvs_tensor_layout *lay = calloc(ntensors, sizeof *lay);
    if (!tensors || !lay) return 1;
    for (size_t t = 0; t < ntensors; t++) {
        tensors[t] = mmap(NULL, tensor_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                          -1, 0);
        if (tensors[t] == MAP_FAILED) {
            fprintf(stderr, "kvshelf demo: cannot allocate %.1f GiB of host memory\n",
                    (double)tensor_bytes * (double)ntensors / 1073741824.0);
            kvs_connector_close(conn);
            return 1;
        }
        for (uint32_t b = 0; b < nblocks; b++)
            fill_block(tensors[t] + (uint64_t)b * chunk, chunk, t * 1000003ull + b);
        memset(tensors[t] + (uint64_t)nblocks * chunk, 0xEE, (uint64_t)nblocks * chunk);
        lay[t] = (kvs_tensor_layout){(uint64_t)(uintptr_t)tensors[t], chunk, chunk, chunk, 1};
    }

    rc = kvs_connector_register_layout(conn, lay, ntensors, nblocks * 2);
    if (rc) {
        fprintf(stderr, "kvshelf demo: register_layout: %s\n", kvs_strerror(rc));
        kvs_connector_close(conn);
        return 1;
    }

    /* Block hashes: 16 bytes each, as an engine's prefix hashes would be. */
    kvs_key *keys = calloc(nblocks, sizeof *keys);
    uint8_t (*hash)[16] = calloc(nblocks, 16);
    uint32_t *src_ids = calloc(nblocks, sizeof *src_ids), *dst_ids = calloc(nblocks, sizeof *dst_ids);
    uint8_t *hit = calloc(nblocks, 1);
    int *res = calloc(nblocks, sizeof *res);
    if (!keys || !hash || !src_ids || !dst_ids || !hit || !res) return 1;
    for (uint32_t b = 0; b < nblocks; b++) {
        uint64_t h[2] = {kvs_hash64(&b, sizeof b), b};
        memcpy(hash[b], h, 16);
        keys[b] = (kvs_key){hash[b], 16};
        src_ids[b] = b;
        dst_ids[b] = nblocks + b;
    }

    int failed = 0;
    t0 = kvs_now_ns();
    rc = kvs_connector_lookup(conn, keys, nblocks, hit);
    uint64_t t_miss_lookup = kvs_now_ns() - t0;
    int hits_before = 0;
    for (uint32_t b = 0; b < nblocks; b++) hits_before += hit[b];

    kvs_task *task = NULL;
    t0 = kvs_now_ns();
    rc = kvs_connector_dump(conn, keys, src_ids, nblocks, NULL, &task);
    if (!rc) rc = kvs_task_wait(task, -1);
    uint64_t t_dump = kvs_now_ns() - t0;
    int dumped = rc ? rc : kvs_task_results(task, res, nblocks);
    kvs_task_free(task);
    int dump_fail = 0; /* the first block's failure, to say why */
    for (uint32_t b = 0; dumped >= 0 && b < nblocks && !dump_fail; b++) dump_fail = res[b];

    t0 = kvs_now_ns();
    rc = kvs_connector_lookup(conn, keys, nblocks, hit);
    uint64_t t_lookup = kvs_now_ns() - t0;
    int hits_after = 0;
    for (uint32_t b = 0; b < nblocks; b++) hits_after += hit[b];
    int prefix = kvs_connector_lookup_prefix(conn, keys, nblocks);

    t0 = kvs_now_ns();
    rc = kvs_connector_load(conn, keys, dst_ids, nblocks, &task);
    if (!rc) rc = kvs_task_wait(task, -1);
    uint64_t t_load = kvs_now_ns() - t0;
    int loaded = rc ? rc : kvs_task_results(task, res, nblocks);
    kvs_task_free(task);

    /* Every block that loaded must equal what was dumped. (One that did not
     * -- evicted, never stored -- is a miss the engine recomputes; its
     * destination may have been partly written: connector.h.) */
    uint64_t bad = 0;
    for (uint32_t b = 0; b < nblocks; b++) {
        if (loaded < 0 || res[b] != KVS_OK) continue;
        int differs = 0;
        for (size_t t = 0; t < ntensors && !differs; t++)
            differs = memcmp(tensors[t] + (uint64_t)b * chunk,
                             tensors[t] + (uint64_t)(nblocks + b) * chunk, chunk) != 0;
        bad += differs;
    }

    /* Reference: one thread copying the same bytes with memcpy. */
    uint8_t *ref = mmap(NULL, chunk * nblocks, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t t_memcpy = 0;
    if (ref != MAP_FAILED) {
        memset(ref, 1, chunk * nblocks);
        t0 = kvs_now_ns();
        for (size_t t = 0; t < ntensors; t++) memcpy(ref, tensors[t], chunk * nblocks);
        t_memcpy = kvs_now_ns() - t0;
        munmap(ref, chunk * nblocks);
    }

    double gb = (double)kv_bytes / 1e9;
    printf("\n  %-34s %12s %12s\n", "step", "time", "rate");
    printf("  %-34s %9.1f ms %12s\n", "open (joins or starts the pool)", secs(t_open) * 1e3, "");
    printf("  %-34s %9.3f ms %9d hits\n", "lookup before dump", secs(t_miss_lookup) * 1e3,
           hits_before);
    printf("  %-34s %9.1f ms %7.2f GB/s\n", "dump (host -> pool)", secs(t_dump) * 1e3,
           gb / secs(t_dump));
    printf("  %-34s %9.3f ms %9d hits\n", "lookup after dump (one batch)", secs(t_lookup) * 1e3,
           hits_after);
    printf("  %-34s %12s %9d blocks\n", "leading-hit prefix", "", prefix);
    printf("  %-34s %9.1f ms %7.2f GB/s\n", "load (pool -> other block ids)", secs(t_load) * 1e3,
           gb / secs(t_load));
    if (t_memcpy)
        printf("  %-34s %9.1f ms %7.2f GB/s\n", "reference: 1-thread memcpy", secs(t_memcpy) * 1e3,
               gb / secs(t_memcpy));
    printf("\n  dumped %d/%u, loaded %d/%u, byte-exact: %s (%llu loaded blocks differ)\n", dumped,
           nblocks, loaded, nblocks, bad ? "NO" : "yes", (unsigned long long)bad);
    if (dumped >= 0 && dumped < (int)nblocks && dump_fail)
        printf("  %u blocks not stored (%s): the pool is smaller than the dump; `kvshelf "
               "status` shows its size, --tokens asks for less\n",
               nblocks - (uint32_t)dumped, kvs_strerror(dump_fail));
    else if (loaded >= 0 && loaded < (int)nblocks)
        printf("  %u blocks did not load (misses: evicted for newer ones, as a cache does)\n",
               nblocks - (uint32_t)loaded);
    printf("  backend: %s; pool: %s\n", kvs_connector_backend(conn),
           cfg.master_server_address[0] ? cfg.master_server_address
                                        : "embedded (see `kvshelf status`)");
    if (hits_before != 0 || hits_after != (int)nblocks || prefix != (int)nblocks ||
        dumped != (int)nblocks || loaded != (int)nblocks || bad)
        failed = 1;

    kvs_connector_close(conn);
    for (size_t t = 0; t < ntensors; t++) munmap(tensors[t], tensor_bytes);
    free(tensors);
    free(lay);
    free(keys);
    free(hash);
    free(src_ids);
    free(dst_ids);
    free(hit);
    free(res);
    if (stop && !cfg.master_server_address[0]) {
        char *args[] = {"stop", NULL};
        kvs_cmd_stop(1, args);
    }
    if (failed) fprintf(stderr, "kvshelf demo: FAILED (see the figures above)\n");
    return failed;
}
