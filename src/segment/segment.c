/* Shared-memory segments (see segment.h). */
#include "segment.h"
#include "segment/directory.h"
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
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "kvshelf/errors.h"

#define SHM_DIR "/dev/shm/"

static atomic_uint seg_counter;

/* ---- fork: a child never holds this process's write locks ----
 * Write fences are OFD locks, owned by the open file description, which a
 * fork() shares with the child: a child (forked without exec, e.g. by a
 * Python worker pool) would keep every lock held at fork time for as long
 * as it lives, and a fence would wait for it forever if the parent died
 * mid-write. The child closes its copies of every segment's descriptors
 * (the parent's locks stay the parent's); segments are not usable in a
 * forked child. posix_spawn and vfork run no fork handlers (and need none:
 * the descriptors are close-on-exec). */
static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static kvs_segment **reg_v;
static size_t reg_n, reg_cap;
static pthread_once_t reg_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void) { pthread_mutex_lock(&reg_mu); }
static void fork_parent(void) { pthread_mutex_unlock(&reg_mu); }
static void fork_child(void)
{
    for (size_t i = 0; i < reg_n; i++) {
        kvs_segment *sg = reg_v[i];
        /* the writers' locks live on wlock_fd, which is never mapped: with
         * the child's copy closed, only this process holds them (the
         * mapping inherited by the child keeps fd's description alive) */
        if (sg->wlock_fd >= 0) close(sg->wlock_fd);
        if (sg->fence_fd >= 0) close(sg->fence_fd);
        sg->wlock_fd = sg->fence_fd = -1;
        sg->owner = 0; /* the parent's: a child's destroy must not unlink it */
        memset(sg->held, 0, sizeof sg->held);
        pthread_mutex_init(&sg->wmu, NULL); /* a thread of the parent may have held it */
    }
    reg_n = 0;
    pthread_mutex_unlock(&reg_mu);
}

static void reg_init(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

/* Locks the registry: descriptors a fork() must not leak are opened and
 * registered under it (the fork handler waits for it). */
static void reg_lock(void)
{
    pthread_once(&reg_once, reg_init);
    pthread_mutex_lock(&reg_mu);
}

/* Registers sg; the caller holds reg_mu. KVS_OK or KVS_ERR_NOMEM. */
static int reg_add_locked(kvs_segment *sg)
{
    if (reg_n == reg_cap) {
        size_t cap = reg_cap ? reg_cap * 2 : 16;
        kvs_segment **v = realloc(reg_v, cap * sizeof *v);
        if (!v) return KVS_ERR_NOMEM;
        reg_v = v;
        reg_cap = cap;
    }
    reg_v[reg_n++] = sg;
    return KVS_OK;
}

static void reg_remove(kvs_segment *sg)
{
    pthread_mutex_lock(&reg_mu);
    for (size_t i = 0; i < reg_n; i++) {
        if (reg_v[i] == sg) {
            reg_v[i] = reg_v[--reg_n];
            break;
        }
    }
    pthread_mutex_unlock(&reg_mu);
}

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

/* The control page, after the data. Written once by the creator (all but
 * epoch), epoch raised only by the owner's kvs_segment_fence. */
struct kvs_seg_ctl {
    char magic[8];           /* SEG_MAGIC */
    uint64_t nonce;          /* the 16 hex digits of the name */
    uint64_t size;           /* data bytes */
    _Atomic uint64_t epoch;  /* write epoch: reservations below it are stale */
    uint64_t dir_size;       /* bytes of the directory between the data and this
                                page (directory.h); 0 = none (older segments) */
    char pool[KVS_SEG_POOL_PATH_MAX]; /* the record of the embedded pool that may
                                         adopt it ("" = none; kvs_segment_set_pool) */
};
_Static_assert(sizeof(struct kvs_seg_ctl) <= 4096, "the control page fits the smallest page");

#define SEG_MAGIC "KVSSEG1"
/* Lock bytes (far beyond any data: POSIX locks may lie past the end of file). */
#define LOCK_ALIVE ((off_t)1 << 60)
#define LOCK_BASE ((off_t)1 << 61)
#define EPOCH_MAX ((uint64_t)1 << 60)
#define GC_MIN_AGE_S 2 /* files younger than this may still be taking their owner lock */

static int lock_range(int fd, int cmd, short type, off_t start, off_t len)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    int rc;
    do rc = fcntl(fd, cmd, &fl);
    while (rc < 0 && errno == EINTR);
    return rc;
}

/* Parses the trailing nonce of a valid name. */
static uint64_t name_nonce(const char *name)
{
    const char *dash = strrchr(name, '-');
    return dash ? strtoull(dash + 1, NULL, 16) : 0;
}

int kvs_segment_name_valid(const char *name)
{
    static const char prefix[] = "kvshelf-";
    if (!name || strncmp(name, prefix, sizeof prefix - 1)) return 0;
    const char *p = name + sizeof prefix - 1;
    for (int part = 0; part < 3; part++) {
        const char *start = p;
        while (*p >= '0' && *p <= '9') p++;
        if (p == start || p - start > 10) return 0;
        if (*p != '-') return 0;
        p++;
    }
    for (int i = 0; i < 16; i++, p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) return 0;
    return *p == '\0' && strlen(name) < KVS_SHM_NAME_MAX;
}

/* ---- the embedded pool's record (segment.h) ---- */

int kvs_segment_pool_record_parse(const void *buf, size_t len, char *name, size_t cap)
{
    if (!buf || !name || cap < KVS_SHM_NAME_MAX) return KVS_ERR_INVALID;
    const char *b = buf;
    if (len > 0 && b[len - 1] == '\n') len--;
    if (len == 0 || len >= KVS_SHM_NAME_MAX) return KVS_ERR_CORRUPT;
    char tmp[KVS_SHM_NAME_MAX];
    memcpy(tmp, b, len);
    tmp[len] = '\0';
    /* an embedded NUL shortens tmp: the length check below refuses it */
    if (strlen(tmp) != len || !kvs_segment_name_valid(tmp)) return KVS_ERR_CORRUPT;
    memcpy(name, tmp, len + 1);
    return KVS_OK;
}

int kvs_segment_pool_record_read(const char *path, char *name, size_t cap)
{
    if (!path || !name || cap < KVS_SHM_NAME_MAX) return KVS_ERR_INVALID;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR) return KVS_ERR_NOT_FOUND;
        return errno == ELOOP || errno == EACCES || errno == EPERM ? KVS_ERR_AUTH : KVS_ERR_IO;
    }
    struct stat st;
    char buf[KVS_SHM_NAME_MAX + 2];
    ssize_t n = -1;
    int rc = KVS_OK;
    if (fstat(fd, &st) < 0) rc = KVS_ERR_IO;
    else if (!S_ISREG(st.st_mode) || st.st_uid != getuid()) rc = KVS_ERR_AUTH;
    else {
        do n = read(fd, buf, sizeof buf); while (n < 0 && errno == EINTR);
        if (n < 0) rc = KVS_ERR_IO;
    }
    close(fd);
    if (rc != KVS_OK) return rc;
    return kvs_segment_pool_record_parse(buf, (size_t)n, name, cap);
}

int kvs_segment_pool_record_write(const char *path, const char *name)
{
    if (!path || !kvs_segment_name_valid(name)) return KVS_ERR_INVALID;
    char tmp[KVS_SEG_POOL_PATH_MAX + 32];
    int n = snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid());
    if (n < 0 || (size_t)n >= sizeof tmp) return KVS_ERR_INVALID;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return KVS_ERR_IO;
    char text[KVS_SHM_NAME_MAX + 1];
    int len = snprintf(text, sizeof text, "%s\n", name);
    ssize_t w;
    do w = write(fd, text, (size_t)len); while (w < 0 && errno == EINTR);
    int ok = len > 0 && w == (ssize_t)len; /* a 70-byte write to a new file: whole */
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return KVS_ERR_IO;
    }
    return KVS_OK;
}

int kvs_segment_set_pool(kvs_segment *s, const char *record_path)
{
    if (!s || !s->owner || !s->ctl || !record_path || record_path[0] != '/') return KVS_ERR_INVALID;
    size_t n = strlen(record_path);
    if (n >= KVS_SEG_POOL_PATH_MAX) return KVS_ERR_INVALID;
    memset(s->ctl->pool, 0, sizeof s->ctl->pool);
    memcpy(s->ctl->pool, record_path, n);
    return KVS_OK;
}

/* 1 if the orphan `name` (open as fd) is an embedded pool's segment whose
 * record still names it: kept for the pool's next master to adopt. */
static int pool_keeps(int fd, const struct stat *st, const char *name)
{
    uint64_t ps = kvs_page_size(), fsize = (uint64_t)st->st_size;
    if (fsize <= ps || fsize % ps) return 0;
    struct {
        char magic[8];
        uint64_t nonce, size, epoch, dir_size;
        char pool[KVS_SEG_POOL_PATH_MAX];
    } c; /* struct kvs_seg_ctl's layout, without the atomic */
    _Static_assert(sizeof c == sizeof(struct kvs_seg_ctl), "the control page's layout");
    if (pread(fd, &c, sizeof c, (off_t)(fsize - ps)) != (ssize_t)sizeof c) return 0;
    c.pool[sizeof c.pool - 1] = '\0';
    if (memcmp(c.magic, SEG_MAGIC, sizeof c.magic) || c.nonce != name_nonce(name) ||
        c.pool[0] != '/')
        return 0;
    char rec[KVS_SHM_NAME_MAX];
    return kvs_segment_pool_record_read(c.pool, rec, sizeof rec) == KVS_OK && !strcmp(rec, name);
}

int kvs_segment_gc(void)
{
    DIR *d = opendir(SHM_DIR);
    if (!d) return 0;
    char prefix[32];
    int pl = snprintf(prefix, sizeof prefix, "kvshelf-%u-", (unsigned)getuid());
    int removed = 0;
    struct dirent *e;
    time_t now = time(NULL);
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, prefix, (size_t)pl) || !kvs_segment_name_valid(e->d_name)) continue;
        char path[128];
        if (shm_path(e->d_name, path, sizeof path)) continue;
        int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0) continue;
        struct stat st, ln;
        /* the owner lock, held while unlinking: an adopter (kvs_segment_adopt)
         * takes it too, so either it adopts a file still linked or the gc
         * removes one nobody adopted */
        int orphan = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == getuid() &&
                     now - st.st_ctime >= GC_MIN_AGE_S &&
                     lock_range(fd, F_OFD_SETLK, F_WRLCK, LOCK_ALIVE, 1) == 0;
        if (orphan && pool_keeps(fd, &st, e->d_name)) {
            orphan = 0;
            KVS_LOGD("segment: kept %s, the segment of an embedded pool whose next master "
                     "adopts it",
                     path);
        }
        if (orphan && stat(path, &ln) == 0 && ln.st_dev == st.st_dev && ln.st_ino == st.st_ino &&
            unlink(path) == 0) {
            removed++;
            KVS_LOGI("segment: removed %s, left by a process that no longer runs", path);
        }
        close(fd);
    }
    closedir(d);
    return removed;
}

/* Maps the `total` bytes before fd's control page (data and directory) and
 * the control page; checks the control page against `nonce` and its sizes
 * against `total`. On success fills base/size/dir/dir_size/ctl of out. */
static int map_file(int fd, uint64_t total, uint64_t nonce, kvs_segment *out)
{
    uint64_t ps = kvs_page_size();
    void *p = mmap(NULL, total + ps, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED) return errno == ENOMEM ? KVS_ERR_NO_SPACE : KVS_ERR_IO;
    struct kvs_seg_ctl *ctl = (struct kvs_seg_ctl *)((uint8_t *)p + total);
    uint64_t data = ctl->size, dir = ctl->dir_size;
    if (memcmp(ctl->magic, SEG_MAGIC, sizeof ctl->magic) || ctl->nonce != nonce ||
        data == 0 || data > total || dir != total - data || data % ps || dir % ps) {
        munmap(p, total + ps);
        return KVS_ERR_CORRUPT;
    }
    out->base = p;
    out->size = data;
    out->dir_size = dir;
    out->dir = dir ? (uint8_t *)p + data : NULL;
    out->ctl = ctl;
    return KVS_OK;
}

/* Bytes mapped for s: data, directory and control page. */
static uint64_t map_len(const kvs_segment *s) { return s->size + s->dir_size + kvs_page_size(); }

uint64_t kvs_segment_nonce(const kvs_segment *s) { return s && s->ctl ? s->ctl->nonce : 0; }

static void seg_init(kvs_segment *out)
{
    memset(out, 0, sizeof *out);
    out->fd = out->fence_fd = out->wlock_fd = -1;
    pthread_mutex_init(&out->wmu, NULL);
}

/* Undoes a create or adopt that failed before its registration: the
 * mapping unmapped, the lock files and fd closed, out as seg_init left it. */
static void owner_undo(kvs_segment *out, int fd)
{
    if (out->base) munmap(out->base, map_len(out));
    if (out->fence_fd >= 0) close(out->fence_fd);
    if (out->wlock_fd >= 0) close(out->wlock_fd);
    close(fd);
    pthread_mutex_destroy(&out->wmu);
    seg_init(out);
}

/* fstat of an opened segment file into *st: KVS_OK if it is a regular file
 * of this user's, KVS_ERR_AUTH if not, KVS_ERR_IO if fstat failed. */
static int own_file(int fd, struct stat *st)
{
    if (fstat(fd, st) < 0) return KVS_ERR_IO;
    return S_ISREG(st->st_mode) && st->st_uid == getuid() ? KVS_OK : KVS_ERR_AUTH;
}

int kvs_segment_create(uint64_t size, kvs_segment *out)
{
    static atomic_int gc_done;
    if (!atomic_exchange(&gc_done, 1)) kvs_segment_gc();
    seg_init(out);
    if (size == 0 || size > (1ull << 50)) return KVS_ERR_INVALID;
    size = round_page(size);
    uint64_t ps = kvs_page_size();
    uint64_t dir = kvs_dir_bytes(kvs_dir_default_slots(size), ps);
    char path[128];
    int fd = -1;
    uint64_t nonce = 0;
    for (int tries = 0; tries < 64; tries++) {
        unsigned n = atomic_fetch_add(&seg_counter, 1);
        if (kvs_random_bytes(&nonce, sizeof nonce) != KVS_OK) nonce = kvs_now_ns() ^ (uint64_t)n;
        snprintf(out->name, sizeof out->name, "kvshelf-%u-%ld-%u-%016llx", (unsigned)getuid(),
                 (long)getpid(), n, (unsigned long long)nonce);
        if (shm_path(out->name, path, sizeof path)) return KVS_ERR_INVALID;
        fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd >= 0) break;
        if (errno != EEXIST) {
            KVS_LOGE("segment: create %s: %s", path, strerror(errno));
            return KVS_ERR_IO;
        }
    }
    if (fd < 0) return KVS_ERR_IO;
    /* owner lock first: kvs_segment_gc of other processes leaves the file alone */
    int rc = lock_range(fd, F_OFD_SETLK, F_WRLCK, LOCK_ALIVE, 1) == 0 ? KVS_OK : KVS_ERR_IO;
    int e = 0;
    if (rc == KVS_OK && (e = posix_fallocate(fd, 0, (off_t)(size + dir + ps))) != 0) {
        struct statvfs vs;
        unsigned long long avail =
            statvfs(SHM_DIR, &vs) == 0 ? (unsigned long long)vs.f_bavail * vs.f_frsize : 0;
        KVS_LOGE("segment: cannot reserve %llu bytes in " SHM_DIR " (%s; %llu bytes free there): "
                 "ask for a smaller segment or make " SHM_DIR " larger",
                 (unsigned long long)(size + dir + ps), strerror(e), avail);
        rc = e == ENOSPC || e == EFBIG || e == ENOMEM ? KVS_ERR_NO_SPACE : KVS_ERR_IO;
    }
    if (rc == KVS_OK) {
        /* the control page (fresh tmpfs pages read as zeros) */
        struct kvs_seg_ctl ctl;
        memset(&ctl, 0, sizeof ctl);
        memcpy(ctl.magic, SEG_MAGIC, sizeof ctl.magic);
        ctl.nonce = nonce;
        ctl.size = size;
        ctl.dir_size = dir;
        atomic_init(&ctl.epoch, 1);
        if (pwrite(fd, &ctl, sizeof ctl, (off_t)(size + dir)) != (ssize_t)sizeof ctl)
            rc = KVS_ERR_IO;
    }
    if (rc == KVS_OK) rc = map_file(fd, size + dir, nonce, out);
    if (rc == KVS_OK) {
        reg_lock(); /* no fork() between these opens and the registration */
        out->fence_fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
        out->wlock_fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
        if (out->fence_fd < 0 || out->wlock_fd < 0) rc = KVS_ERR_IO;
        else
            rc = reg_add_locked(out); /* the last step: nothing to undo after it */
        pthread_mutex_unlock(&reg_mu);
    }
    if (rc != KVS_OK) {
        if (rc == KVS_ERR_IO) KVS_LOGE("segment: set up %s: %s", path, strerror(errno));
        owner_undo(out, fd);
        unlink(path);
        return rc;
    }
    out->fd = fd;
    out->owner = 1;
    out->prefault = kvs_prefault_start(out->base, size);
    return KVS_OK;
}

int kvs_segment_map(const char *name, uint64_t size, kvs_segment *out)
{
    seg_init(out);
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
    int rc = own_file(fd, &st);
    if (rc != KVS_OK) {
        close(fd);
        return rc;
    }
    uint64_t fsize = (uint64_t)st.st_size, ps = kvs_page_size();
    if (fsize <= ps || fsize % ps || fsize - ps < size) {
        close(fd);
        return KVS_ERR_CORRUPT;
    }
    rc = map_file(fd, fsize - ps, name_nonce(name), out);
    if (rc == KVS_OK && out->size < size) { /* its data is smaller than asked */
        munmap(out->base, map_len(out));
        seg_init(out);
        rc = KVS_ERR_CORRUPT;
    }
    if (rc != KVS_OK) {
        close(fd);
        return rc;
    }
    /* a second open file for the writers' locks (see fork_child), of the
     * very same file */
    reg_lock(); /* no fork() between this open and the registration */
    int wfd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    struct stat wst;
    int mrc = KVS_OK;
    if (wfd < 0 || fstat(wfd, &wst) < 0 || wst.st_dev != st.st_dev || wst.st_ino != st.st_ino)
        mrc = wfd < 0 ? KVS_ERR_IO : KVS_ERR_CORRUPT;
    else
        mrc = reg_add_locked(out);
    if (mrc != KVS_OK) {
        pthread_mutex_unlock(&reg_mu);
        if (wfd >= 0) close(wfd);
        munmap(out->base, map_len(out));
        close(fd);
        seg_init(out);
        return mrc;
    }
    out->wlock_fd = wfd;
    pthread_mutex_unlock(&reg_mu);
    out->fd = fd;
    kvs_strlcpy(out->name, name, sizeof out->name);
    out->prefault = kvs_prefault_start(out->base, out->size);
    return KVS_OK;
}

int kvs_segment_adopt(const char *name, const char *record_path, uint64_t size,
                      kvs_segment *out)
{
    seg_init(out);
    if (!kvs_segment_name_valid(name) || !record_path || size > (1ull << 50))
        return KVS_ERR_INVALID;
    size = round_page(size); /* 0: any */
    char path[128];
    if (shm_path(name, path, sizeof path)) return KVS_ERR_INVALID;
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ENOENT) return KVS_ERR_NOT_FOUND;
        return errno == EACCES || errno == EPERM || errno == ELOOP ? KVS_ERR_AUTH : KVS_ERR_IO;
    }
    struct stat st, ln;
    int rc = own_file(fd, &st);
    if (rc != KVS_OK) {
        close(fd);
        return rc;
    }
    /* the owner lock: free only once every process of the old owner's open
     * file description is gone (it dies with the owner's descriptors) */
    if (lock_range(fd, F_OFD_SETLK, F_WRLCK, LOCK_ALIVE, 1) < 0) {
        int e = errno;
        close(fd);
        return e == EAGAIN || e == EACCES ? KVS_ERR_BUSY : KVS_ERR_IO;
    }
    /* still linked under its name (a gc that held the lock first unlinked it?) */
    if (stat(path, &ln) < 0 || ln.st_dev != st.st_dev || ln.st_ino != st.st_ino) {
        close(fd);
        return KVS_ERR_NOT_FOUND;
    }
    uint64_t fsize = (uint64_t)st.st_size, ps = kvs_page_size();
    rc = fsize <= ps || fsize % ps ? KVS_ERR_CORRUPT
                                   : map_file(fd, fsize - ps, name_nonce(name), out);
    if (rc == KVS_OK) {
        char pool[KVS_SEG_POOL_PATH_MAX];
        memcpy(pool, out->ctl->pool, sizeof pool);
        pool[sizeof pool - 1] = '\0';
        if ((size && out->size != size) || strcmp(pool, record_path)) {
            KVS_LOGW("segment: %s is not this pool's segment of %llu bytes (it has %llu, "
                     "pool record '%s')",
                     path, (unsigned long long)size, (unsigned long long)out->size, pool);
            munmap(out->base, map_len(out));
            seg_init(out);
            rc = KVS_ERR_CORRUPT;
        }
    }
    if (rc == KVS_ERR_CORRUPT && unlink(path) == 0)
        KVS_LOGI("segment: removed %s, a dead pool's segment that does not fit", path);
    if (rc != KVS_OK) {
        close(fd);
        return rc;
    }
    reg_lock(); /* no fork() between these opens and the registration */
    out->fence_fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    out->wlock_fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    struct stat fs, ws;
    if (out->fence_fd < 0 || out->wlock_fd < 0 || fstat(out->fence_fd, &fs) < 0 ||
        fstat(out->wlock_fd, &ws) < 0 || fs.st_ino != st.st_ino || ws.st_ino != st.st_ino ||
        fs.st_dev != st.st_dev || ws.st_dev != st.st_dev)
        rc = KVS_ERR_IO;
    else
        rc = reg_add_locked(out); /* the last step: nothing to undo after it */
    pthread_mutex_unlock(&reg_mu);
    if (rc != KVS_OK) {
        owner_undo(out, fd);
        return rc;
    }
    out->fd = fd;
    out->owner = 1;
    kvs_strlcpy(out->name, name, sizeof out->name);
    out->prefault = kvs_prefault_start(out->base, out->size);
    return KVS_OK;
}

uint64_t kvs_segment_epoch(const kvs_segment *s)
{
    return s && s->ctl ? atomic_load(&s->ctl->epoch) : 0;
}

int kvs_segment_write_begin(kvs_segment *s, uint64_t epoch)
{
    if (!s || !s->ctl || epoch == 0 || epoch >= EPOCH_MAX) return KVS_ERR_INVALID;
    pthread_mutex_lock(&s->wmu);
    if (s->wlock_fd < 0) { /* retired (its owner left), or not open */
        pthread_mutex_unlock(&s->wmu);
        return KVS_ERR_UNAVAILABLE;
    }
    int slot = -1, free_slot = -1;
    for (int i = 0; i < KVS_SEG_HELD_MAX; i++) {
        if (s->held[i].count && s->held[i].epoch == epoch) slot = i;
        else if (!s->held[i].count && free_slot < 0) free_slot = i;
    }
    if (slot < 0) {
        if (free_slot < 0) {
            pthread_mutex_unlock(&s->wmu);
            return KVS_ERR_BUSY;
        }
        /* blocks only while an owner's fence holds its exclusive lock (a
         * non-blocking try, released at once) */
        if (lock_range(s->wlock_fd, F_OFD_SETLKW, F_RDLCK, LOCK_BASE + (off_t)epoch, 1) < 0) {
            KVS_LOGW("segment %s: write lock: %s", s->name, strerror(errno));
            pthread_mutex_unlock(&s->wmu);
            return KVS_ERR_IO;
        }
        slot = free_slot;
        s->held[slot].epoch = epoch;
        s->held[slot].count = 0;
    }
    s->held[slot].count++;
    int rc = KVS_OK;
    /* checked under the lock: a fence that raised the epoch before we took it
     * is seen here; one that raises it later waits for our write_end */
    uint64_t cur = atomic_load(&s->ctl->epoch);
    if (cur > epoch || epoch > cur + 1) { /* fenced past, or never handed out by a
                                             registration the owner made (proto.h) */
        rc = KVS_ERR_UNAVAILABLE;
        if (--s->held[slot].count == 0)
            lock_range(s->wlock_fd, F_OFD_SETLK, F_UNLCK, LOCK_BASE + (off_t)epoch, 1);
    }
    pthread_mutex_unlock(&s->wmu);
    return rc;
}

void kvs_segment_write_end(kvs_segment *s, uint64_t epoch)
{
    if (!s || !s->ctl) return;
    pthread_mutex_lock(&s->wmu);
    for (int i = 0; s->wlock_fd >= 0 && i < KVS_SEG_HELD_MAX; i++) {
        if (!s->held[i].count || s->held[i].epoch != epoch) continue;
        if (--s->held[i].count == 0)
            lock_range(s->wlock_fd, F_OFD_SETLK, F_UNLCK, LOCK_BASE + (off_t)epoch, 1);
        break;
    }
    pthread_mutex_unlock(&s->wmu);
}

int kvs_segment_fence(kvs_segment *s, uint64_t epoch)
{
    if (!s || !s->owner || !s->ctl || s->fence_fd < 0 || epoch == 0 || epoch >= EPOCH_MAX)
        return KVS_ERR_INVALID;
    uint64_t cur = atomic_load(&s->ctl->epoch);
    while (cur < epoch && !atomic_compare_exchange_weak(&s->ctl->epoch, &cur, epoch)) {
    }
    if (lock_range(s->fence_fd, F_OFD_SETLK, F_WRLCK, LOCK_BASE, (off_t)epoch) < 0)
        return errno == EAGAIN || errno == EACCES ? KVS_ERR_BUSY : KVS_ERR_IO;
    lock_range(s->fence_fd, F_OFD_SETLK, F_UNLCK, LOCK_BASE, (off_t)epoch);
    return KVS_OK;
}

void kvs_segment_retire(kvs_segment *s)
{
    if (!s || !s->base || s->owner) return;
    kvs_prefault_stop(s->prefault);
    s->prefault = NULL;
    /* data and control page: after this no write of ours reaches the file */
    void *p = mmap(s->base, map_len(s), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) {
        KVS_LOGW("segment: retire %s: %s", s->name, strerror(errno));
        return;
    }
    /* so the descriptors can go (the file's memory is not pinned by a dead
     * owner's peers any more); a writer still inside writes zero pages, and
     * its write_end finds nothing to unlock */
    pthread_mutex_lock(&s->wmu);
    if (s->wlock_fd >= 0) close(s->wlock_fd);
    if (s->fd >= 0) close(s->fd);
    s->wlock_fd = s->fd = -1;
    memset(s->held, 0, sizeof s->held);
    pthread_mutex_unlock(&s->wmu);
}

void kvs_segment_destroy(kvs_segment *s)
{
    if (!s) return;
    if (s->base) reg_remove(s);
    kvs_prefault_stop(s->prefault);
    s->prefault = NULL;
    if (s->base) munmap(s->base, s->ctl ? map_len(s) : s->size);
    if (s->owner && s->name[0]) {
        char path[128];
        if (!shm_path(s->name, path, sizeof path)) unlink(path);
    }
    if (s->fd >= 0 && s->base) close(s->fd);
    if (s->fence_fd >= 0 && s->base) close(s->fence_fd);
    if (s->wlock_fd >= 0 && s->base) close(s->wlock_fd);
    if (s->base) pthread_mutex_destroy(&s->wmu);
    memset(s, 0, sizeof *s);
    s->fd = s->fence_fd = s->wlock_fd = -1;
}
