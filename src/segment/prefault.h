/* Background pre-faulting of segment memory.
 *
 * Segment memory is reserved at creation (posix_fallocate), but a process
 * still takes a minor page fault on its first touch of every 4 KiB page of
 * a mapping: measured on the 2-core VM, first writes into a reserved 1 GiB
 * ran at 2.1-2.7 GB/s against ~14 GB/s once mapped (and ~1 GB/s without the
 * reservation). Populating the page tables in a background thread (madvise
 * MADV_POPULATE_WRITE, which never changes the bytes) removes that cost but
 * makes the whole segment resident in that process at once.
 *
 * So only processes whose job is to hold the pool do it: `kvshelf node` and
 * the embedded pool (`kvshelf master --embedded`) call
 * kvs_prefault_set_default(1). Everywhere else (an engine process that
 * contributes a segment, a client mapping a peer's segment) memory is
 * touched as it is used and the process's RSS grows with what it touches.
 * KVSHELF_PREFAULT=1 / =0 forces it on / off in any process.
 */
#ifndef KVS_PREFAULT_H
#define KVS_PREFAULT_H

#include <stdint.h>

typedef struct kvs_prefault kvs_prefault;

/* Sets whether segments of this process are prefaulted when KVSHELF_PREFAULT
 * is not set (default: no). For the pool daemons. */
void kvs_prefault_set_default(int on);

/* Starts populating [base, base+size) in a background thread. Returns NULL
 * when disabled (see above), unsupported by the kernel, or when the
 * thread cannot start; the mapping works the same either way. */
kvs_prefault *kvs_prefault_start(void *base, uint64_t size);

/* Stops the thread (at its next 32 MiB step), waits for it and frees `p`.
 * Must be called before the range is unmapped or remapped. Safe with NULL. */
void kvs_prefault_stop(kvs_prefault *p);

#endif
