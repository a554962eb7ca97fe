/* Background pre-faulting of segment memory.
 *
 * A fresh shared-memory segment costs a page fault (and a page allocation)
 * on the first touch of every 4 KiB page: measured here, the first put into
 * untouched memory ran at ~0.5 GB/s against ~4-7 GB/s once pages exist. A
 * pool exists to hold memory, so its owner populates the pages in a
 * background thread right after creation (madvise MADV_POPULATE_WRITE, which
 * never changes the bytes), and a process that maps a peer's segment
 * populates its page tables the same way. Set KVSHELF_PREFAULT=0 to keep
 * pages lazy (tests with many large nominal segments do).
 */
#ifndef KVS_PREFAULT_H
#define KVS_PREFAULT_H

#include <stdint.h>

typedef struct kvs_prefault kvs_prefault;

/* Starts populating [base, base+size) in a background thread. Returns NULL
 * when disabled (KVSHELF_PREFAULT=0), unsupported by the kernel, or when the
 * thread cannot start; the mapping works the same either way. */
kvs_prefault *kvs_prefault_start(void *base, uint64_t size);

/* Stops the thread (at its next 32 MiB step), waits for it and frees `p`.
 * Must be called before the range is unmapped or remapped. Safe with NULL. */
void kvs_prefault_stop(kvs_prefault *p);

#endif
