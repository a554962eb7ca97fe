/* Shared-memory segments (see segment.h). */
#include "segment.h"
#include "segment/prefault.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"

#define SHM_DIR "/dev/shm/"

static atomic_uint seg_counter;

size_t kvs_page_size(void)
{
    static size_t ps;
    if (!ps) {
        long v = sysconf(_SC_PAGESIZE);
        ps = v > 0 ? (size_t)v : 4096;
    }
    return ps;
}

static uint64_t round_page(uint64_t n)
{
    uint64_t ps = kvs_page_size();
    return (n + ps - 1) / ps * ps;
}

static int shm_path(const char *name, char *out, size_t cap)
{
    int n = snprintf(out, cap, SHM_DIR "%s", name);
    return n > 0 && (size_t)n < cap ? KVS_OK : KVS_ERR_INVALID;
}

int kvs_segment_name_valid(const char *name)
{
    static const char prefix[] = "kvshelf-";
    if (!name || strncmp(name, prefix, sizeof prefix - 1)) return 0;
    const char *p = name + sizeof prefix - 1;
    for (int part = 0; part < 3; part++) {
        const char *start = p;
        while (*p >= '0' && *p <= '9') p++;
        if (p == start || p - start > 20) return 0;
        if (part < 2) {
            if (*p != '-') return 0;
            p++;
        }
    }
    return *p == '\0' && strlen(name) < KVS_SHM_NAME_MAX;
}

int kvs_segment_gc(void)
{
    DIR *d = opendir(SHM_DIR);
    if (!d) return 0;
    char prefix[32];
    int pl = snprintf(prefix, sizeof prefix, "kvshelf-%u-", (unsigned)getuid());
    int removed = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, prefix, (size_t)pl) || !kvs_segment_name_valid(e->d_name)) continue;
        long pid = strtol(e->d_name + pl, NULL, 10);
        if (pid <= 0 || pid == (long)getpid()) continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue; /* alive (or not ours to ask) */
        char path[128];
        if (shm_path(e->d_name, path, sizeof path)) continue;
        struct stat st;
        if (lstat(path, &st) || !S_ISREG(st.st_mode) || st.st_uid != getuid()) continue;
        if (unlink(path) == 0) {
            removed++;
            KVS_LOGI("segment: removed %s, left by a process that no longer runs", path);
        }
    }
    closedir(d);
    return removed;
}

int kvs_segment_create(uint64_t size, kvs_segment *out)
{
    static atomic_int gc_done;
    if (!atomic_exchange(&gc_done, 1)) kvs_segment_gc();
    memset(out, 0, sizeof *out);
    if (size == 0 || size > (1ull << 50)) return KVS_ERR_INVALID;
    size = round_page(size);
    char path[128];
    int fd = -1;
    for (int tries = 0; tries < 64; tries++) {
        unsigned n = atomic_fetch_add(&seg_counter, 1);
        snprintf(out->name, sizeof out->name, "kvshelf-%u-%ld-%u", (unsigned)getuid(),
                 (long)getpid(), n);
        if (shm_path(out->name, path, sizeof path)) return KVS_ERR_INVALID;
        fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd >= 0) break;
        if (errno != EEXIST) {
            KVS_LOGE("segment: create %s: %s", path, strerror(errno));
            return KVS_ERR_IO;
        }
        /* A leftover from a process that had our pid before: try the next n. */
    }
    if (fd < 0) return KVS_ERR_IO;
    if (ftruncate(fd, (off_t)size) < 0) {
        int e = errno;
        KVS_LOGE("segment: size %s to %llu: %s", path, (unsigned long long)size, strerror(e));
        close(fd);
        unlink(path);
        return e == EFBIG || e == ENOSPC ? KVS_ERR_NO_SPACE : KVS_ERR_IO;
    }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED) {
        KVS_LOGE("segment: mmap %s (%llu bytes): %s", path, (unsigned long long)size,
                 strerror(e));
        unlink(path);
        return e == ENOMEM ? KVS_ERR_NO_SPACE : KVS_ERR_IO;
    }
    out->base = p;
    out->size = size;
    out->owner = 1;
    out->prefault = kvs_prefault_start(p, size);
    return KVS_OK;
}

int kvs_segment_map(const char *name, uint64_t size, kvs_segment *out)
{
    memset(out, 0, sizeof *out);
    if (!kvs_segment_name_valid(name)) return KVS_ERR_INVALID;
    char path[128];
    if (shm_path(name, path, sizeof path)) return KVS_ERR_INVALID;
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) return KVS_ERR_NOT_FOUND;
        if (errno == EACCES || errno == EPERM) return KVS_ERR_AUTH;
        return KVS_ERR_IO;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return KVS_ERR_IO;
    }
    if (!S_ISREG(st.st_mode) || st.st_uid != getuid()) {
        close(fd);
        return KVS_ERR_AUTH;
    }
    uint64_t fsize = (uint64_t)st.st_size;
    if (fsize == 0 || fsize < size) {
        close(fd);
        return KVS_ERR_CORRUPT;
    }
    uint64_t msize = size ? round_page(size) : fsize;
    if (msize > fsize) msize = fsize;
    void *p = mmap(NULL, msize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return KVS_ERR_IO;
    out->base = p;
    out->size = msize;
    kvs_strlcpy(out->name, name, sizeof out->name);
    out->prefault = kvs_prefault_start(p, msize);
    return KVS_OK;
}

void kvs_segment_retire(kvs_segment *s)
{
    if (!s || !s->base || s->owner) return;
    kvs_prefault_stop(s->prefault);
    s->prefault = NULL;
    void *p = mmap(s->base, s->size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) KVS_LOGW("segment: retire %s: %s", s->name, strerror(errno));
}

void kvs_segment_destroy(kvs_segment *s)
{
    if (!s) return;
    kvs_prefault_stop(s->prefault);
    s->prefault = NULL;
    if (s->base) munmap(s->base, s->size);
    if (s->owner && s->name[0]) {
        char path[128];
        if (!shm_path(s->name, path, sizeof path)) unlink(path);
    }
    memset(s, 0, sizeof *s);
}
