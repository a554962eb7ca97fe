/* Cost of write fencing on the same-host write path (issue 12): one
 * kvs_segment_write_begin + kvs_segment_write_end pair (two OFD lock calls
 * when no other writer of the process is inside) beside one memcpy of each
 * value size into segment memory, in this process; prints a table.
 *   bench/fence_cost [ROUNDS]
 * Medians of ROUNDS (default 5) rounds; the memcpy rows are the reference
 * measured in the same run. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "segment/segment.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp);
    return v[n / 2];
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 5;
    if (rounds < 1 || rounds > 100) rounds = 5;
    setenv("KVSHELF_PREFAULT", "1", 1);
    kvs_segment s, m;
    const uint64_t size = 64ull << 20;
    if (kvs_segment_create(size, &s) || kvs_segment_map(s.name, 0, &m)) {
        fprintf(stderr, "fence_cost: cannot create or map a segment\n");
        return 1;
    }
    memset(m.base, 1, size); /* every page present in this mapping */
    static const uint64_t sizes[] = {4096, 65536, 1u << 20, 4u << 20};
    uint8_t *src = malloc(4u << 20);
    if (!src) return 1;
    memset(src, 7, 4u << 20);
    double fence[100], copy[100][4];
    for (int r = 0; r < rounds; r++) {
        const int n = 100000;
        double t0 = now();
        for (int i = 0; i < n; i++) {
            if (kvs_segment_write_begin(&m, 1) != 0) return 2;
            kvs_segment_write_end(&m, 1);
        }
        fence[r] = (now() - t0) / n * 1e6;
        for (int k = 0; k < 4; k++) {
            int reps = (int)((256u << 20) / sizes[k]);
            t0 = now();
            for (int i = 0; i < reps; i++)
                memcpy((uint8_t *)m.base + (uint64_t)i * sizes[k] % (size - sizes[k]), src,
                       sizes[k]);
            copy[r][k] = (now() - t0) / reps * 1e6;
        }
    }
    double f = median(fence, rounds);
    printf("%-10s %14s %14s %12s\n", "value", "memcpy us", "fence us", "fence/copy");
    for (int k = 0; k < 4; k++) {
        double c[100];
        for (int r = 0; r < rounds; r++) c[r] = copy[r][k];
        double cm = median(c, rounds);
        printf("%-10llu %14.2f %14.2f %11.1f%%\n", (unsigned long long)sizes[k], cm, f,
               100.0 * f / cm);
    }
    printf("(medians of %d rounds; fence = write_begin + write_end of one writer, lock taken "
           "and released each time)\n",
           rounds);
    kvs_segment_destroy(&m);
    kvs_segment_destroy(&s);
    free(src);
    return 0;
}
