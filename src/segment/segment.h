/* Shared-memory segments: the host memory a process contributes to the pool.
 *
 * A segment is a file under /dev/shm named "kvshelf-<uid>-<pid>-<n>" (created
 * O_EXCL, mode 0600), sized with ftruncate and mapped MAP_SHARED |
 * MAP_NORESERVE; a background thread then populates its pages (prefault.h,
 * KVSHELF_PREFAULT=0 keeps them lazy). Its owner
 * unlinks the file when it destroys the segment; another process of the same
 * user on the same host can map it read-write by name (kvs_segment_map) and
 * copy bytes with memcpy, with no socket.
 *
 * All functions are thread-safe (they share no state except an atomic counter
 * for names). Sizes are rounded up to the page size.
 */
#ifndef KVS_SEGMENT_H
#define KVS_SEGMENT_H

#include <stddef.h>
#include <stdint.h>

#define KVS_SHM_NAME_MAX 64

typedef struct kvs_segment {
    void *base;                  /* page-aligned mapping, NULL when not mapped */
    uint64_t size;               /* mapped bytes (page multiple) */
    char name[KVS_SHM_NAME_MAX]; /* shm name without the leading '/' */
    int owner;                   /* 1: created here, unlinked by kvs_segment_destroy */
    struct kvs_prefault *prefault; /* background page population (prefault.h), or NULL */
} kvs_segment;

/* Creates and maps a new segment of at least `size` bytes (> 0). Returns
 * KVS_OK, KVS_ERR_INVALID, KVS_ERR_NO_SPACE (the shm file system refused the
 * size) or KVS_ERR_IO. */
int kvs_segment_create(uint64_t size, kvs_segment *out);

/* Unlinks segment files of this uid whose creating process no longer runs
 * (left by a crash or SIGKILL; the memory stays in use while any process
 * still maps them). Called once per process by kvs_segment_create. Assumes
 * processes sharing /dev/shm share a pid namespace. Returns the count. */
int kvs_segment_gc(void);

/* 1 if `name` has the form of a kvshelf segment name ("kvshelf-<digits>-
 * <digits>-<digits>"), else 0. Names from the network are checked with this
 * before anything is opened. */
int kvs_segment_name_valid(const char *name);

/* Maps the existing segment `name` read-write. Fails with KVS_ERR_INVALID if
 * the name is not a segment name, KVS_ERR_NOT_FOUND if no such file,
 * KVS_ERR_AUTH if it is not owned by this uid, KVS_ERR_CORRUPT if it is
 * smaller than `size` (size 0 = map the whole file), KVS_ERR_IO otherwise. */
int kvs_segment_map(const char *name, uint64_t size, kvs_segment *out);

/* Unmaps `s` (created or mapped); the owner also unlinks the file. Safe on a
 * zeroed struct. */
void kvs_segment_destroy(kvs_segment *s);

/* Releases the memory of a mapped (not owned) segment while keeping its
 * address range reserved: the range is replaced by private anonymous
 * zero pages (allocated only if written), so stale pointers into it read
 * zeros instead of faulting. Used when a peer's segment disappears while slots may still
 * point into it. The range stays reserved until kvs_segment_destroy. */
void kvs_segment_retire(kvs_segment *s);

/* Page size of the host (cached). */
size_t kvs_page_size(void);

#endif
