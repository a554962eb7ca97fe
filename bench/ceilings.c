/* kvs_ceilings — the hardware ceilings the store benchmarks are compared with,
 * measured on the machine itself (bench/store_bench.sh runs it):
 *
 *   kvs_ceilings tcp    [--block N] [--seconds S] [--sockbuf N]
 *       one TCP stream over loopback: a sender thread write()s blocks of N
 *       bytes (default 1 MiB), the receiver reads them into one N-byte buffer;
 *       bytes received per second. Default socket buffers (the kernel's
 *       autotuning), like the store; --sockbuf N sets SO_SNDBUF and SO_RCVBUF
 *       on both ends instead (as KVSHELF_SOCKBUF does in the store).
 *   kvs_ceilings memcpy [--block N] [--region N] [--seconds S]
 *       one thread memcpy()s N-byte blocks (default 1 MiB) from a large source
 *       region (default 512 MiB, walked in order, so reads come from DRAM like
 *       reads of a big segment) into one N-byte destination buffer (reused,
 *       like a get_into buffer); bytes copied per second.
 *
 * Prints one JSON object: {"test":..., "block":..., "bytes":..., "seconds":...,
 * "gb_per_s":..., "gib_per_s":...}. Exit 0 on success.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    switch (*end) {
    case 'k': case 'K': v *= 1024; break;
    case 'm': case 'M': v *= 1024 * 1024; break;
    case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
    default: break;
    }
    return (uint64_t)v;
}

static void report(const char *test, uint64_t block, uint64_t bytes, double secs)
{
    printf("{\"test\":\"%s\",\"block\":%llu,\"bytes\":%llu,\"seconds\":%.6f,\"gb_per_s\":%.4f,"
           "\"gib_per_s\":%.4f}\n",
           test, (unsigned long long)block, (unsigned long long)bytes, secs,
           (double)bytes / secs / 1e9, (double)bytes / secs / (1024.0 * 1024 * 1024));
}

static int g_sockbuf; /* --sockbuf: 0 = autotuning */

static void set_sockbuf(int fd)
{
    if (!g_sockbuf) return;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &g_sockbuf, sizeof g_sockbuf);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &g_sockbuf, sizeof g_sockbuf);
}

struct sender {
    int port;
    uint64_t block;
    volatile int stop;
};

static void *send_main(void *arg)
{
    struct sender *s = arg;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)s->port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("connect");
        exit(1);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    set_sockbuf(fd);
    char *buf = malloc(s->block);
    memset(buf, 0xab, s->block);
    while (!s->stop) {
        uint64_t off = 0;
        while (off < s->block) {
            ssize_t n = write(fd, buf + off, s->block - off);
            if (n <= 0) {
                if (n < 0 && errno == EINTR) continue;
                goto out;
            }
            off += (uint64_t)n;
        }
    }
out:
    close(fd);
    free(buf);
    return NULL;
}

static int run_tcp(uint64_t block, double seconds)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 1) < 0 ||
        getsockname(ls, (struct sockaddr *)&a, &al) < 0) {
        perror("listen");
        return 1;
    }
    struct sender s = {ntohs(a.sin_port), block, 0};
    pthread_t th;
    pthread_create(&th, NULL, send_main, &s);
    int fd = accept(ls, NULL, NULL);
    if (fd < 0) {
        perror("accept");
        return 1;
    }
    set_sockbuf(fd);
    char *buf = malloc(block);
    memset(buf, 0, block);
    /* warm up 0.2 s, then measure whole blocks */
    double t0 = now_s(), start = 0;
    uint64_t bytes = 0;
    int measuring = 0;
    for (;;) {
        uint64_t off = 0;
        while (off < block) {
            ssize_t n = read(fd, buf + off, block - off);
            if (n <= 0) {
                if (n < 0 && errno == EINTR) continue;
                fprintf(stderr, "read failed\n");
                return 1;
            }
            off += (uint64_t)n;
        }
        double t = now_s();
        if (!measuring) {
            if (t - t0 >= 0.2) {
                measuring = 1;
                start = t;
            }
            continue;
        }
        bytes += block;
        if (t - start >= seconds) {
            s.stop = 1;
            report("tcp", block, bytes, t - start);
            break;
        }
    }
    close(fd);
    pthread_join(th, NULL);
    close(ls);
    free(buf);
    return 0;
}

static int run_memcpy(uint64_t block, uint64_t region, double seconds)
{
    if (region < block) region = block;
    region -= region % block;
    char *src = mmap(NULL, region, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *dst = mmap(NULL, block, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (src == MAP_FAILED || dst == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    memset(src, 0x3c, region);
    memset(dst, 0, block);
    uint64_t nblk = region / block, i = 0, bytes = 0;
    double start = now_s(), t;
    /* one pass as warm-up of the TLB/page tables, then measure */
    for (uint64_t k = 0; k < nblk; k++) memcpy(dst, src + k * block, block);
    start = now_s();
    do {
        for (int k = 0; k < 16; k++) {
            memcpy(dst, src + (i % nblk) * block, block);
            i++;
            bytes += block;
        }
        t = now_s();
    } while (t - start < seconds);
    __asm__ volatile("" ::"r"(dst) : "memory");
    report("memcpy", block, bytes, t - start);
    munmap(src, region);
    munmap(dst, block);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help")) {
        fprintf(argc < 2 ? stderr : stdout,
                "usage: kvs_ceilings tcp|memcpy [--block N] [--region N] [--seconds S] [--sockbuf N]\n");
        return argc < 2 ? 2 : 0;
    }
    uint64_t block = 1 << 20, region = 512ull << 20;
    double seconds = 2.0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--block"))
            block = parse_size(argv[i + 1]);
        else if (!strcmp(argv[i], "--region"))
            region = parse_size(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds"))
            seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--sockbuf"))
            g_sockbuf = (int)parse_size(argv[i + 1]);
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!block || seconds <= 0) return 2;
    if (!strcmp(argv[1], "tcp")) return run_tcp(block, seconds);
    if (!strcmp(argv[1], "memcpy")) return run_memcpy(block, region, seconds);
    fprintf(stderr, "unknown test %s\n", argv[1]);
    return 2;
}
