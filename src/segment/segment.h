/* Shared-memory segments: the host memory a process contributes to the pool.
 *
 * A segment is a file under /dev/shm named "kvshelf-<uid>-<pid>-<n>-<nonce>"
 * (nonce: 16 hex digits of a random 64-bit id; created O_EXCL, mode 0600).
 * Its length is the data size, then the segment's directory of complete
 * objects (directory.h; KVSHELF_DIR_SLOTS=0: none), then one control page
 * at the end holding a magic, the nonce, the data and directory sizes and
 * the write epoch (below). The whole
 * file is reserved with posix_fallocate at creation, so a full /dev/shm is an
 * error at creation (KVS_ERR_NO_SPACE) and never a SIGBUS later. It is mapped
 * MAP_SHARED; a background thread then populates its page tables
 * (prefault.h, KVSHELF_PREFAULT=0 keeps them lazy). Its owner unlinks the
 * file when it destroys the segment; another process of the same user on the
 * same host can map it read-write by name (kvs_segment_map), which checks
 * that the memory carries the nonce of the name (a file of the same name in
 * another mount namespace, e.g. another container's /dev/shm, is refused).
 *
 * Write fencing. Space inside a segment is handed out by the master with a
 * write *epoch*: a writer may put bytes into its reservation only while the
 * segment's epoch (in the control page, raised only by the owner) is not
 * above the reservation's. Every writer in every process brackets its writes
 * with kvs_segment_write_begin/end, which hold a shared OFD lock on the byte
 * `KVS_SEG_LOCK_BASE + epoch` of the file; the owner fences with
 * kvs_segment_fence(E): it raises the epoch to E, then succeeds only once it
 * can take an exclusive lock over the bytes of every epoch below E, i.e.
 * when no writer holding an older reservation is still inside (a writer that
 * died releases its locks with its file descriptors). After a successful
 * fence no write with an epoch below E can ever land, so the master may
 * reuse the space of abandoned reservations.
 *
 * The owner also holds an exclusive lock on KVS_SEG_LOCK_ALIVE for as long as
 * it lives; kvs_segment_gc removes only files whose owner lock is free, which
 * works across PID namespaces.
 *
 * All functions are thread-safe except create/map/destroy on the same
 * struct. Sizes are rounded up to the page size.
 */
#ifndef KVS_SEGMENT_H
#define KVS_SEGMENT_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define KVS_SHM_NAME_MAX 64
#define KVS_SEG_HELD_MAX 8 /* distinct epochs one process writes under at once */

struct kvs_seg_ctl; /* the control page (segment.c) */

typedef struct kvs_segment {
    void *base;                  /* page-aligned mapping, NULL when not mapped */
    uint64_t size;               /* data bytes (page multiple), control page excluded */
    void *dir;                   /* the directory region after the data, or NULL */
    uint64_t dir_size;           /* its bytes (page multiple; 0 = none) */
    char name[KVS_SHM_NAME_MAX]; /* shm name without the leading '/' */
    int owner;                   /* 1: created here, unlinked by kvs_segment_destroy */
    int fd;                      /* open file (locks); -1 when not open */
    int fence_fd;                /* owner: a second open file for fencing; else -1 */
    int wlock_fd;                /* a third (never mapped) for the writers' locks */
    struct kvs_seg_ctl *ctl;     /* control page, NULL when not mapped */
    struct kvs_prefault *prefault; /* background page population (prefault.h), or NULL */
    pthread_mutex_t wmu;         /* guards held[] */
    struct {
        uint64_t epoch;
        uint32_t count;
    } held[KVS_SEG_HELD_MAX];    /* shared locks this process holds, with writers inside */
} kvs_segment;

/* (A process forked without exec closes its copies of every segment's
 * descriptors at once, so it never holds its parent's write locks;
 * segments are not usable in such a child.) */

/* Creates and maps a new segment of at least `size` bytes (> 0), reserving
 * its memory. Returns KVS_OK, KVS_ERR_INVALID, KVS_ERR_NO_SPACE (the shm file
 * system cannot hold it: the log says how much was asked and where) or
 * KVS_ERR_IO. The new segment's epoch is 1. */
int kvs_segment_create(uint64_t size, kvs_segment *out);

/* Unlinks segment files of this uid whose owner no longer runs (left by a
 * crash or SIGKILL; the memory stays in use while any process still maps
 * them): files whose owner lock is free, which it holds while it unlinks
 * (so an adoption, kvs_segment_adopt, and the gc never both win). Files an
 * embedded pool may still adopt (kvs_segment_set_pool, and the record
 * still names them) are kept. Called once per process by
 * kvs_segment_create. Returns the count. */
int kvs_segment_gc(void);

/* 1 if `name` has the form of a kvshelf segment name ("kvshelf-<digits>-
 * <digits>-<digits>-<16 hex>"), else 0. Names from the network are checked
 * with this before anything is opened. */
int kvs_segment_name_valid(const char *name);

/* Maps the existing segment `name` read-write. Fails with KVS_ERR_INVALID if
 * the name is not a segment name, KVS_ERR_NOT_FOUND if no such file,
 * KVS_ERR_AUTH if it is not owned by this uid, KVS_ERR_CORRUPT if it is
 * smaller than `size` (size 0 = map all its data) or its control page does
 * not carry the name's nonce (another file of the same name), KVS_ERR_IO
 * otherwise. */
int kvs_segment_map(const char *name, uint64_t size, kvs_segment *out);

/* Unmaps `s` (created or mapped); the owner also unlinks the file. Safe on a
 * zeroed struct. No writer of this process may be inside. */
void kvs_segment_destroy(kvs_segment *s);

/* Releases the memory of a mapped (not owned) segment while keeping its
 * address range reserved: the range is replaced by private anonymous
 * zero pages (allocated only if written), so stale pointers into it read
 * zeros instead of faulting. Used when a peer's segment disappears while slots may still
 * point into it. The range stays reserved until kvs_segment_destroy. Its
 * descriptors are closed (the file's memory is no longer pinned here): a
 * write entered before writes zero pages, later ones are refused
 * (KVS_ERR_UNAVAILABLE). */
void kvs_segment_retire(kvs_segment *s);

/* The segment's nonce (the 16 hex digits of its name; 0 if not mapped):
 * the directory (directory.h) is tied to it. */
uint64_t kvs_segment_nonce(const kvs_segment *s);

/* The segment's current write epoch (0 if not mapped). */
uint64_t kvs_segment_epoch(const kvs_segment *s);

/* Enters a write under a reservation of epoch `epoch` (> 0): KVS_OK (the
 * caller may write its reservation's bytes until kvs_segment_write_end with
 * the same epoch), or KVS_ERR_UNAVAILABLE when the reservation is stale (the
 * owner fenced the segment past it: write nothing) or from the future (above
 * the current epoch + 1, which no registration of the segment hands out),
 * KVS_ERR_BUSY (too many
 * distinct epochs held at once by this process), KVS_ERR_IO / KVS_ERR_INVALID. */
int kvs_segment_write_begin(kvs_segment *s, uint64_t epoch);

/* Leaves a write entered with kvs_segment_write_begin(s, epoch). */
void kvs_segment_write_end(kvs_segment *s, uint64_t epoch);

/* Owner only: raises the epoch to `epoch` (never lowers it) and checks that
 * no writer with an older reservation is inside, without waiting. KVS_OK:
 * fenced (no write below `epoch` can land any more); KVS_ERR_BUSY: a writer
 * is still inside (call again later); KVS_ERR_INVALID: not the owner. */
int kvs_segment_fence(kvs_segment *s, uint64_t epoch);

/* ---- the embedded pool's segment across a kill of its master ----
 * The embedded pool (client/embedded.c) names its segment in a record file
 * of its runtime directory (KVS_SEG_POOL_RECORD) and writes that file's path
 * into the segment's control page (kvs_segment_set_pool). When the pool's
 * master dies (kill -9), the file stays in /dev/shm and the next master of
 * that runtime directory adopts it (kvs_segment_adopt) instead of creating
 * a new one; kvs_segment_gc leaves such an orphan alone for as long as the
 * record it names still names it (the adoption wins over the gc). */

#define KVS_SEG_POOL_RECORD "pool.segment" /* file name in the runtime directory */
#define KVS_SEG_POOL_PATH_MAX 512          /* bytes of a record path, NUL included */

/* Parses the bytes of a pool record: a segment name (kvs_segment_name_valid)
 * and an optional final newline, nothing else. `buf` may hold any bytes
 * (len of them; no NUL needed). KVS_OK (name, cap >= KVS_SHM_NAME_MAX,
 * filled) or KVS_ERR_CORRUPT (anything else: too long, bad name, other
 * bytes), KVS_ERR_INVALID (NULL arguments, cap too small). */
int kvs_segment_pool_record_parse(const void *buf, size_t len, char *name, size_t cap);

/* Reads the pool record at `path` into name (cap >= KVS_SHM_NAME_MAX):
 * KVS_OK, KVS_ERR_NOT_FOUND (no such file), KVS_ERR_AUTH (not a regular
 * file of this uid), KVS_ERR_CORRUPT (kvs_segment_pool_record_parse),
 * KVS_ERR_IO. */
int kvs_segment_pool_record_read(const char *path, char *name, size_t cap);

/* Writes `name` as the pool record at `path`, whole or not at all (a new
 * file of mode 0600 renamed over the old one). KVS_OK, KVS_ERR_INVALID or
 * KVS_ERR_IO. */
int kvs_segment_pool_record_write(const char *path, const char *name);

/* Owner only: writes `record_path` (absolute, shorter than
 * KVS_SEG_POOL_PATH_MAX) into the control page, so that the segment,
 * orphaned, waits for a pool of that record to adopt it instead of being
 * removed by kvs_segment_gc. KVS_OK or KVS_ERR_INVALID. */
int kvs_segment_set_pool(kvs_segment *s, const char *record_path);

/* Adopts the orphaned segment `name` of the pool whose record is
 * `record_path`: opens it, takes its owner lock (KVS_ERR_BUSY if held: its
 * owner still runs), checks that the name still links to this file, that
 * the control page carries the name's nonce and this record path, that its
 * sizes match the file's, and, unless `size` is 0, that its data size is
 * `size` rounded up to pages (KVS_ERR_CORRUPT otherwise; such an orphan is
 * unlinked here, as kvs_segment_gc would). On KVS_OK,
 * *out is the owner of the segment as kvs_segment_create makes it (destroy
 * unlinks it), with its data, directory and epoch as the dead owner left
 * them: the caller must fence it past that epoch before anyone writes
 * (kvs_segment_fence) and re-read its directory (directory.h). Also
 * KVS_ERR_INVALID (bad name), KVS_ERR_NOT_FOUND (no such file), KVS_ERR_AUTH
 * (not a regular file of this uid), KVS_ERR_IO. */
int kvs_segment_adopt(const char *name, const char *record_path, uint64_t size,
                      kvs_segment *out);

/* Page size of the host (cached). */
size_t kvs_page_size(void);

#endif
