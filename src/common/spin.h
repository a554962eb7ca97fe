/* How long a thread waiting for a reply busy-polls before it sleeps.
 *
 * Waking a sleeping thread costs tens of microseconds (far more in a VM),
 * and replies on a fast link usually come sooner, so waiting threads spin
 * for up to KVSHELF_SPIN_US (0..10000 microseconds, default 50; 0 = never).
 * But a spinner only helps while a core is free for the thread that
 * produces the reply: on a busy host it takes that core away and makes the
 * wait longer (measured on the 2-core VM with another process busy: exists
 * p50 ~6 us or ~159 us depending on where the spinner landed, against a
 * steady 12-19 us with no spinning). So the budget adapts: every
 * SPIN_SAMPLE_MS the number of runnable tasks of the host is read
 * (/proc/loadavg, fourth field); when it reaches the number of online CPUs
 * (no core free besides the caller's own) the budget is 0 until a later
 * sample finds a free core. KVSHELF_SPIN_ADAPT=0 keeps the budget fixed.
 * Thread-safe. */
#ifndef KVS_COMMON_SPIN_H
#define KVS_COMMON_SPIN_H

#include <stdint.h>

#define KVS_SPIN_SAMPLE_MS 50

/* The busy-poll budget for a wait starting now, in ns (0 = sleep at once). */
uint64_t kvs_spin_ns(void);

/* Tests: read the host load from `path` instead of /proc/loadavg (NULL
 * restores it) and take a new sample at the next kvs_spin_ns() call. */
void kvs_spin_set_source(const char *path);

/* The last sample: runnable tasks and online CPUs (0, 0 if none yet). */
void kvs_spin_last_sample(int *runnable, int *cpus);

#endif
