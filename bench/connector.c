/* bench/connector: KV connector dump and load throughput and lookup latency,
 * beside the copy ceiling measured in the same run.
 *
 * Geometry (default Qwen2.5-14B): 48 layers, 8 KV heads, head dim 128, bf16,
 * 16-token blocks, vLLM per-layer layout [2, num_blocks, 16, 8, 128] => 96
 * tensors (K and V of each layer), one 32 KiB chunk per tensor per block,
 * 3 MiB of KV per block (192 KiB per token), 6.44 GB at 32k tokens.
 *
 * GPU (device >= 0): tensors in cudaMalloc'd memory; ceiling = one contiguous
 * cudaMemcpy of the same bytes between device memory and cudaHostAlloc'd
 * pinned memory, each direction (dump vs D2H, load vs H2D).
 * Host (device -2, or a build without CUDA): tensors in host memory;
 * ceiling = one memcpy of the same bytes.
 *
 * The pool comes from the environment (KVSHELF_* variables, e.g.
 * KVSHELF_RUNTIME_DIR of a running `kvshelf master --embedded`); it must hold
 * the largest run (6.5 GB at 32k tokens). Every block loaded is checked
 * byte-exact against its source on the first repetition.
 *
 *   connector [--tokens 2048,8192,32768] [--backends cuda-kernel,cuda-batch]
 *             [--workers 2,4] [--reps 5] [--device 0] [--layers 48]
 *             [--kv-heads 8] [--head-dim 128] [--block-size 16]
 *             [--lookup 2048] [--md FILE]
 *             [--variant backend:workers[:threads:ctas_per_sm:job_mb:streams:unroll]]...
 * (with --variant and no --backends/--workers, only the variants run; 0 in a
 * variant field = the default; the knobs are the environment variables
 * KVSHELF_CUDA_THREADS, KVSHELF_CUDA_CTAS_PER_SM, KVSHELF_CONNECTOR_JOB_MB,
 * KVSHELF_CUDA_STREAMS and KVSHELF_CUDA_UNROLL)
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvshelf/kvshelf.h"
#ifdef KVS_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#define MAXV 8
#define MAXVAR 32

/* One measured configuration: backend, workers and tuning knobs (0 = default). */
typedef struct variant {
    char backend[32];
    long workers, threads, ctas, job_mb, streams, unroll;
    char label[96];
} variant;

static void apply_env(const char *name, long v)
{
    if (v > 0) {
        char b[32];
        snprintf(b, sizeof b, "%ld", v);
        setenv(name, b, 1);
    } else {
        unsetenv(name);
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int parse_list(const char *s, long *out, int max)
{
    int n = 0;
    char *dup = strdup(s), *save = NULL;
    for (char *t = strtok_r(dup, ",", &save); t && n < max; t = strtok_r(NULL, ",", &save))
        out[n++] = atol(t);
    free(dup);
    return n;
}

static int parse_slist(const char *s, char out[][32], int max)
{
    int n = 0;
    char *dup = strdup(s), *save = NULL;
    for (char *t = strtok_r(dup, ",", &save); t && n < max; t = strtok_r(NULL, ",", &save))
        snprintf(out[n++], 32, "%s", t);
    free(dup);
    return n;
}

/* ---- memory of the KV cache: device or host ---- */
static int g_dev = 0;

static void *xalloc(size_t n)
{
#ifdef KVS_HAVE_CUDA
    if (g_dev >= 0) {
        void *p = NULL;
        return cudaMalloc(&p, n) == cudaSuccess ? p : NULL;
    }
#endif
    return malloc(n);
}

static void xfree(void *p)
{
#ifdef KVS_HAVE_CUDA
    if (g_dev >= 0) {
        cudaFree(p);
        return;
    }
#endif
    free(p);
}

static int xput(void *dst, const void *src, size_t n)
{
#ifdef KVS_HAVE_CUDA
    if (g_dev >= 0) return cudaMemcpy(dst, src, n, cudaMemcpyDefault) == cudaSuccess ? 0 : -1;
#endif
    memcpy(dst, src, n);
    return 0;
}

static void fill(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
    for (; i < n; i++) p[i] = (uint8_t)x;
}

/* Ceiling: one contiguous copy of `bytes` each way; GB/s (median of 5). */
static void ceiling(size_t bytes, void *dev, void *pinned, double *d2h, double *h2d)
{
    double a[5], b[5];
    for (int r = 0; r < 5; r++) {
#ifdef KVS_HAVE_CUDA
        if (g_dev >= 0) {
            cudaEvent_t e0, e1;
            float ms = 0;
            cudaEventCreate(&e0);
            cudaEventCreate(&e1);
            cudaEventRecord(e0, 0);
            cudaMemcpyAsync(pinned, dev, bytes, cudaMemcpyDeviceToHost, 0);
            cudaEventRecord(e1, 0);
            cudaEventSynchronize(e1);
            cudaEventElapsedTime(&ms, e0, e1);
            a[r] = (double)bytes / (ms / 1e3) / 1e9;
            cudaEventRecord(e0, 0);
            cudaMemcpyAsync(dev, pinned, bytes, cudaMemcpyHostToDevice, 0);
            cudaEventRecord(e1, 0);
            cudaEventSynchronize(e1);
            cudaEventElapsedTime(&ms, e0, e1);
            b[r] = (double)bytes / (ms / 1e3) / 1e9;
            cudaEventDestroy(e0);
            cudaEventDestroy(e1);
            continue;
        }
#endif
        double t0 = now_s();
        memcpy(pinned, dev, bytes);
        a[r] = (double)bytes / (now_s() - t0) / 1e9;
        t0 = now_s();
        memcpy(dev, pinned, bytes);
        b[r] = (double)bytes / (now_s() - t0) / 1e9;
    }
    *d2h = median(a, 5);
    *h2d = median(b, 5);
}

int main(int argc, char **argv)
{
    long tokens[MAXV] = {2048, 8192, 32768}, workers[MAXV] = {2};
    int ntok = 3, nwork = 1, reps = 5, layers = 48, heads = 8, hdim = 128, bs = 16;
    int nlookup = 2048, nback = 2;
    char backs[MAXV][32] = {"cuda-kernel", "cuda-batch"};
    const char *md = NULL;
    variant var[MAXVAR];
    int nvar = 0;
    char extra[MAXVAR][64];
    int nextra = 0, explicit_cross = 0;
    static const struct option lo[] = {{"variant", 1, 0, 'V'},{"tokens", 1, 0, 't'},   {"backends", 1, 0, 'b'},
                                       {"workers", 1, 0, 'w'},  {"reps", 1, 0, 'r'},
                                       {"device", 1, 0, 'd'},   {"layers", 1, 0, 'L'},
                                       {"kv-heads", 1, 0, 'H'}, {"head-dim", 1, 0, 'D'},
                                       {"block-size", 1, 0, 'B'}, {"lookup", 1, 0, 'k'},
                                       {"md", 1, 0, 'm'},       {"help", 0, 0, 'h'},
                                       {0, 0, 0, 0}};
    int ch;
#ifndef KVS_HAVE_CUDA
    g_dev = -2;
#endif
    while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (ch) {
        case 't': ntok = parse_list(optarg, tokens, MAXV); break;
        case 'b': nback = parse_slist(optarg, backs, MAXV); explicit_cross = 1; break;
        case 'w': nwork = parse_list(optarg, workers, MAXV); explicit_cross = 1; break;
        case 'r': reps = atoi(optarg); break;
        case 'd': g_dev = atoi(optarg); break;
        case 'L': layers = atoi(optarg); break;
        case 'H': heads = atoi(optarg); break;
        case 'D': hdim = atoi(optarg); break;
        case 'B': bs = atoi(optarg); break;
        case 'k': nlookup = atoi(optarg); break;
        case 'm': md = optarg; break;
        case 'V':
            if (nextra < MAXVAR) snprintf(extra[nextra++], 64, "%.63s", optarg);
            break;
        default:
            fprintf(stderr, "usage: see the comment at the top of bench/connector.c\n");
            return ch == 'h' ? 0 : 2;
        }
    }
#ifndef KVS_HAVE_CUDA
    g_dev = -2; /* a build without CUDA measures host memory only */
#endif
    if (g_dev < 0) {
        g_dev = -2;
        nback = 1;
        snprintf(backs[0], 32, "host");
    }
    /* variants: backends x workers, then each --variant
     * backend:workers[:threads:ctas_per_sm:job_mb] */
    if (nextra && !explicit_cross) nback = 0; /* only the --variant list */
    for (int bi = 0; bi < nback; bi++)
        for (int wi = 0; wi < nwork && nvar < MAXVAR; wi++) {
            variant *v = &var[nvar++];
            memset(v, 0, sizeof *v);
            snprintf(v->backend, sizeof v->backend, "%.31s", backs[bi]);
            v->workers = workers[wi];
        }
    for (int i = 0; i < nextra && nvar < MAXVAR; i++) {
        variant *v = &var[nvar];
        memset(v, 0, sizeof *v);
        char *save = NULL, *dup = strdup(extra[i]);
        char *f = strtok_r(dup, ":", &save);
        if (!f) {
            free(dup);
            continue;
        }
        snprintf(v->backend, sizeof v->backend, "%.31s", g_dev < 0 ? "host" : f);
        long *nums[6] = {&v->workers, &v->threads, &v->ctas, &v->job_mb, &v->streams, &v->unroll};
        for (int k = 0; k < 6 && (f = strtok_r(NULL, ":", &save)); k++) *nums[k] = atol(f);
        if (v->workers < 0) v->workers = 0; /* 0: the connector's default */
        free(dup);
        nvar++;
    }
    for (int i = 0; i < nvar; i++) {
        variant *v = &var[i];
        int k = v->workers ? snprintf(v->label, sizeof v->label, "%ld", v->workers)
                           : snprintf(v->label, sizeof v->label, "default");
        if (v->threads || v->ctas || v->job_mb || v->streams || v->unroll)
            snprintf(v->label + k, sizeof v->label - (size_t)k, " t%ld c%ld j%ld s%ld u%ld",
                     v->threads, v->ctas, v->job_mb, v->streams, v->unroll);
    }
    if (reps < 1 || reps > 100 || layers < 1 || heads < 1 || hdim < 1 || bs < 1 || ntok < 1) {
        fprintf(stderr, "connector: bad arguments\n");
        return 2;
    }
    long maxtok = 0;
    for (int i = 0; i < ntok; i++) maxtok = tokens[i] > maxtok ? tokens[i] : maxtok;
    const uint32_t maxblocks = (uint32_t)((maxtok + bs - 1) / bs);
    const uint32_t nb = 2 * maxblocks; /* first half dumped from, second half loaded into */
    const uint64_t chunk = (uint64_t)bs * heads * hdim * 2;
    const size_t nt = (size_t)layers * 2;
    const uint64_t block_kv = chunk * nt;
    const uint64_t layer_bytes = 2 * (uint64_t)nb * chunk;

    char err[512] = "";
    kvs_config cfg;
    kvs_config_init(&cfg);
    if (kvs_config_load_env(&cfg, err, sizeof err)) {
        fprintf(stderr, "connector: %s\n", err);
        return 2;
    }
    char devname[256] = "host";
#ifdef KVS_HAVE_CUDA
    if (g_dev >= 0) {
        struct cudaDeviceProp prop;
        if (cudaSetDevice(g_dev) != cudaSuccess ||
            cudaGetDeviceProperties(&prop, g_dev) != cudaSuccess) {
            fprintf(stderr, "connector: no CUDA device %d\n", g_dev);
            return 1;
        }
        snprintf(devname, sizeof devname, "%s", prop.name);
    }
#endif
    printf("# kvshelf connector bench: %d layers, %d KV heads x %d, bf16, %d-token blocks, "
           "%zu tensors, %llu-byte chunks, %.2f MiB per block; device %d (%s)\n",
           layers, heads, hdim, bs, nt, (unsigned long long)chunk, (double)block_kv / 1048576.0,
           g_dev, devname);

    /* KV cache: one allocation per layer [2, nb, bs, heads, hdim] */
    uint8_t **lay = calloc((size_t)layers, sizeof *lay);
    kvs_tensor_layout *tl = calloc(nt, sizeof *tl);
    size_t pat_bytes = 64u << 20;
    uint8_t *pat = malloc(pat_bytes);
    if (!lay || !tl || !pat) return 1;
    for (int l = 0; l < layers; l++) {
        lay[l] = xalloc(layer_bytes);
        if (!lay[l]) {
            fprintf(stderr, "connector: cannot allocate %.1f GiB for the KV cache\n",
                    (double)layer_bytes * layers / 1073741824.0);
            return 1;
        }
        for (uint64_t off = 0; off < layer_bytes; off += pat_bytes) {
            uint64_t n = layer_bytes - off < pat_bytes ? layer_bytes - off : pat_bytes;
            fill(pat, n, (uint64_t)l * 100003 + off); /* distinct bytes everywhere */
            if (xput(lay[l] + off, pat, n)) return 1;
        }
        tl[2 * l] = (kvs_tensor_layout){(uint64_t)(uintptr_t)lay[l], chunk, chunk, chunk, 1};
        tl[2 * l + 1] = (kvs_tensor_layout){(uint64_t)(uintptr_t)(lay[l] + (uint64_t)nb * chunk),
                                            chunk, chunk, chunk, 1};
    }

    /* ceiling buffers */
    size_t ceil_bytes = (size_t)maxblocks * block_kv;
    void *cdev = NULL, *cpin = NULL;
#ifdef KVS_HAVE_CUDA
    if (g_dev >= 0) {
        if (cudaMalloc(&cdev, ceil_bytes) != cudaSuccess ||
            cudaHostAlloc(&cpin, ceil_bytes, cudaHostAllocDefault) != cudaSuccess) {
            fprintf(stderr, "connector: cannot allocate the ceiling buffers\n");
            return 1;
        }
        cudaMemset(cdev, 0x5a, ceil_bytes);
        memset(cpin, 0xa5, ceil_bytes);
    } else
#endif
    {
        cdev = malloc(ceil_bytes);
        cpin = malloc(ceil_bytes);
        if (!cdev || !cpin) return 1;
        memset(cdev, 0x5a, ceil_bytes);
        memset(cpin, 0xa5, ceil_bytes);
    }
    double ceil_d2h[MAXV], ceil_h2d[MAXV];

    /* hashes and ids */
    uint8_t (*hash)[16] = calloc(maxblocks, 16);
    kvs_key *keys = calloc(maxblocks, sizeof *keys);
    uint32_t *src = calloc(maxblocks, sizeof *src), *dst = calloc(maxblocks, sizeof *dst);
    int *res = calloc(maxblocks, sizeof *res);
    uint8_t *hit = calloc(maxblocks > (uint32_t)nlookup ? maxblocks : (uint32_t)nlookup, 1);
    uint8_t *hv = malloc(chunk * 2);
    if (!hash || !keys || !src || !dst || !res || !hit || !hv) return 1;
    for (uint32_t i = 0; i < maxblocks; i++) {
        src[i] = i;
        dst[i] = maxblocks + (maxblocks - 1 - i); /* other ids, reversed */
    }

    FILE *mdf = md ? fopen(md, "a") : NULL;
    if (mdf) {
        fprintf(mdf,
                "\n| backend | workers | tokens | GB | dump GB/s | ceiling D2H | dump/ceil | "
                "load GB/s | ceiling H2D | load/ceil | lookup %d (ms) |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|\n",
                nlookup);
    }
    printf("\n%-12s %-24s %7s %7s %10s %10s %7s %10s %10s %7s %12s\n", "backend", "wrk", "tokens",
           "GB", "dump GB/s", "ceil D2H", "ratio", "load GB/s", "ceil H2D", "ratio",
           "lookup ms");
    int failures = 0;
    unsigned run = 0;
    for (int vi = 0; vi < nvar; vi++) {
        {
            variant *v = &var[vi];
            apply_env("KVSHELF_CUDA_THREADS", v->threads);
            apply_env("KVSHELF_CUDA_CTAS_PER_SM", v->ctas);
            apply_env("KVSHELF_CONNECTOR_JOB_MB", v->job_mb);
            apply_env("KVSHELF_CUDA_STREAMS", v->streams);
            apply_env("KVSHELF_CUDA_UNROLL", v->unroll);
            char ns[128];
            snprintf(ns, sizeof ns, "bench/%d/%d/%llu", (int)getpid(), vi,
                     (unsigned long long)time(NULL));
            kvs_connector_opts o = {.ns = ns, .backend = v->backend,
                                    .num_workers = (uint32_t)v->workers};
            kvs_connector *c = NULL;
            int rc = kvs_connector_open(&cfg, g_dev, &o, &c, err, sizeof err);
            if (rc) {
                fprintf(stderr, "connector: open (%s): %s (%s)\n", v->backend, kvs_strerror(rc),
                        err);
                failures++;
                continue;
            }
            if ((rc = kvs_connector_register_layout(c, tl, nt, nb))) {
                fprintf(stderr, "connector: register_layout: %s\n", kvs_strerror(rc));
                kvs_connector_close(c);
                failures++;
                continue;
            }
            kvs_client *cl = kvs_connector_client(c);
            /* lookup-only client (a scheduler) on the same pool */
            kvs_connector_opts lo_opts = {.ns = ns};
            kvs_connector *sched = NULL;
            kvs_connector_open(&cfg, -1, &lo_opts, &sched, err, sizeof err);

            for (int ti = 0; ti < ntok; ti++) {
                uint32_t n = (uint32_t)((tokens[ti] + bs - 1) / bs);
                double dump_r[100], load_r[100], look = 0;
                int nr = 0;
                /* the ceiling of this row, measured right before it */
                ceiling((size_t)n * block_kv, cdev, cpin, &ceil_d2h[ti], &ceil_h2d[ti]);
                /* warm-up (first use registers the segment mapping with CUDA) */
                for (int r = -1; r < reps; r++) {
                    uint32_t m = r < 0 ? (n < 8 ? n : 8) : n;
                    run++;
                    for (uint32_t i = 0; i < m; i++) {
                        uint64_t h[2] = {((uint64_t)getpid() << 32) ^ run, i};
                        memcpy(hash[i], h, 16);
                        keys[i] = (kvs_key){hash[i], 16};
                    }
                    kvs_task *t = NULL;
                    double t0 = now_s();
                    rc = kvs_connector_dump(c, keys, src, m, NULL, &t);
                    if (!rc) rc = kvs_task_wait(t, -1);
                    double t1 = now_s();
                    int ok = rc ? rc : kvs_task_results(t, res, m);
                    kvs_task_free(t);
                    if (ok != (int)m) {
                        fprintf(stderr, "connector: dump stored %d of %u (first error %s)\n", ok,
                                m, kvs_strerror(res[0]));
                        failures++;
                    }
                    if (r == 0 && (uint32_t)nlookup <= m) { /* lookup latency, all hits */
                        double lt[50];
                        kvs_connector *lc = sched ? sched : c;
                        for (int k = 0; k < 50; k++) {
                            double a = now_s();
                            kvs_connector_lookup(lc, keys, (size_t)nlookup, hit);
                            lt[k] = now_s() - a;
                        }
                        look = median(lt, 50) * 1e3;
                        for (int k = 0; k < nlookup; k++)
                            if (!hit[k]) {
                                fprintf(stderr, "connector: lookup missed a stored block\n");
                                failures++;
                                break;
                            }
                    }
                    double t2 = now_s();
                    rc = kvs_connector_load(c, keys, dst, m, &t);
                    if (!rc) rc = kvs_task_wait(t, -1);
                    double t3 = now_s();
                    ok = rc ? rc : kvs_task_results(t, res, m);
                    kvs_task_free(t);
                    if (ok != (int)m) {
                        fprintf(stderr, "connector: load got %d of %u\n", ok, m);
                        failures++;
                    }
                    if (r == 0) { /* byte-exact: every loaded block equals its source */
                        uint64_t bad = 0;
                        for (uint32_t i = 0; i < m && !bad; i++)
                            for (size_t tt = 0; tt < nt; tt++) {
                                uint8_t *b0 = (uint8_t *)(uintptr_t)tl[tt].base;
#ifdef KVS_HAVE_CUDA
                                if (g_dev >= 0) {
                                    cudaMemcpy(hv, b0 + (uint64_t)src[i] * chunk, chunk,
                                               cudaMemcpyDeviceToHost);
                                    cudaMemcpy(hv + chunk, b0 + (uint64_t)dst[i] * chunk, chunk,
                                               cudaMemcpyDeviceToHost);
                                } else
#endif
                                {
                                    memcpy(hv, b0 + (uint64_t)src[i] * chunk, chunk);
                                    memcpy(hv + chunk, b0 + (uint64_t)dst[i] * chunk, chunk);
                                }
                                if (memcmp(hv, hv + chunk, chunk)) bad++;
                            }
                        if (bad) {
                            fprintf(stderr, "connector: loaded bytes differ from the source!\n");
                            failures++;
                        }
                    }
                    if (r >= 0) {
                        dump_r[nr] = (double)m * block_kv / (t1 - t0) / 1e9;
                        load_r[nr] = (double)m * block_kv / (t3 - t2) / 1e9;
                        nr++;
                    }
                    /* free the pool for the next run (not timed) */
                    int *rr = calloc(m, sizeof *rr);
                    uint8_t (*sk)[48] = calloc(m, 48);
                    kvs_key *skeys = calloc(m, sizeof *skeys);
                    if (rr && sk && skeys) {
                        for (uint32_t i = 0; i < m; i++) {
                            int kl = kvs_connector_store_key(ns, 1, 0, &keys[i], sk[i], 48);
                            skeys[i] = (kvs_key){sk[i], (uint32_t)(kl > 0 ? kl : 0)};
                        }
                        kvs_remove_batch(cl, skeys, m, rr);
                    }
                    free(rr);
                    free(sk);
                    free(skeys);
                }
                double dmed = median(dump_r, nr), lmed = median(load_r, nr);
                double gb = (double)n * block_kv / 1e9;
                char lk[32] = "-";
                if (look > 0) snprintf(lk, sizeof lk, "%.3f", look);
                printf("%-12s %-24s %7ld %7.2f %10.1f %10.1f %6.0f%% %10.1f %10.1f %6.0f%% %12s\n",
                       kvs_connector_backend(c), v->label, tokens[ti], gb, dmed, ceil_d2h[ti],
                       100 * dmed / ceil_d2h[ti], lmed, ceil_h2d[ti], 100 * lmed / ceil_h2d[ti],
                       lk);
                fflush(stdout);
                if (mdf)
                    fprintf(mdf,
                            "| %s | %s | %ld | %.2f | %.1f | %.1f | %.0f%% | %.1f | %.1f | %.0f%% "
                            "| %s |\n",
                            kvs_connector_backend(c), v->label, tokens[ti], gb, dmed,
                            ceil_d2h[ti], 100 * dmed / ceil_d2h[ti], lmed, ceil_h2d[ti],
                            100 * lmed / ceil_h2d[ti], lk);
            }
            kvs_connector_counters ct;
            kvs_connector_get_counters(c, &ct);
            if (ct.failed_blocks || ct.missed_blocks) {
                fprintf(stderr, "connector: %llu failed, %llu missed blocks\n",
                        (unsigned long long)ct.failed_blocks,
                        (unsigned long long)ct.missed_blocks);
                failures++;
            }
            kvs_connector_close(sched);
            kvs_connector_close(c);
        }
    }
    if (mdf) fclose(mdf);
    printf("\n(ceilings: one contiguous copy of the same bytes, %s, measured before each row "
           "(median of 5); rates: medians of %d runs; lookup: "
           "median of 50 lookups of %d stored hashes by a lookup-only client)\n",
           g_dev >= 0 ? "device <-> cudaHostAlloc pinned memory" : "memcpy", reps, nlookup);
    for (int l = 0; l < layers; l++) xfree(lay[l]);
#ifdef KVS_HAVE_CUDA
    if (g_dev >= 0) {
        cudaFree(cdev);
        cudaFreeHost(cpin);
        cdev = cpin = NULL;
    }
#endif
    free(cdev);
    free(cpin);
    free(lay);
    free(tl);
    free(pat);
    free(hash);
    free(keys);
    free(src);
    free(dst);
    free(res);
    free(hit);
    free(hv);
    if (failures) fprintf(stderr, "connector: %d FAILURES\n", failures);
    return failures ? 1 : 0;
}
