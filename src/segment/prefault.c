#include "segment/prefault.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "common/log.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

#define STEP (32ull << 20)

struct kvs_prefault {
    pthread_t thread;
    uint8_t *base;
    uint64_t size;
    atomic_int stop;
};

static void *run(void *arg)
{
    kvs_prefault *p = arg;
    for (uint64_t off = 0; off < p->size && !atomic_load(&p->stop); off += STEP) {
        uint64_t n = p->size - off < STEP ? p->size - off : STEP;
        if (madvise(p->base + off, n, MADV_POPULATE_WRITE) != 0) {
            /* EINVAL: kernel too old; ENOMEM/EFAULT: out of memory or gone. */
            KVS_LOGD("prefault: stopped at %llu of %llu bytes: %s", (unsigned long long)off,
                     (unsigned long long)p->size, strerror(errno));
            break;
        }
    }
    return NULL;
}

static atomic_int default_on; /* kvs_prefault_set_default */

void kvs_prefault_set_default(int on) { atomic_store(&default_on, on ? 1 : 0); }

kvs_prefault *kvs_prefault_start(void *base, uint64_t size)
{
    const char *e = getenv("KVSHELF_PREFAULT");
    int on = e && *e ? strcmp(e, "0") != 0 : atomic_load(&default_on);
    if (!on || !base || !size) return NULL;
    kvs_prefault *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->base = base;
    p->size = size;
    atomic_init(&p->stop, 0);
    if (pthread_create(&p->thread, NULL, run, p) != 0) {
        free(p);
        return NULL;
    }
    return p;
}

void kvs_prefault_stop(kvs_prefault *p)
{
    if (!p) return;
    atomic_store(&p->stop, 1);
    pthread_join(p->thread, NULL);
    free(p);
}
