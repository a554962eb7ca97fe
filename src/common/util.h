/* Small helpers shared by every component: clocks, host identity, random
 * bytes, shared-secret authentication. */
#ifndef KVS_UTIL_H
#define KVS_UTIL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define KVS_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KVS_MAX(a, b) ((a) > (b) ? (a) : (b))

/* Monotonic clock. */
uint64_t kvs_now_ns(void);
uint64_t kvs_now_ms(void);
/* Wall clock (CLOCK_REALTIME) in ms since the epoch. */
uint64_t kvs_wall_ms(void);

/* pthread_cond_timedwait on cv (mu held) for at most ms milliseconds from
 * now; cv must use CLOCK_MONOTONIC (pthread_condattr_setclock). Returns
 * what pthread_cond_timedwait returns (0, or ETIMEDOUT). */
int kvs_cond_wait_ms(pthread_cond_t *cv, pthread_mutex_t *mu, uint64_t ms);

/* kvs_spin_ns(), how long a waiting thread busy-polls: see common/spin.h. */
#include "common/spin.h"

/* One pause of a busy-poll loop. */
static inline void kvs_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    for (int i = 0; i < 32; i++) __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* 16 bytes identifying this host (its boot id, else a hash of the hostname):
 * equal ids mean "same host, same boot", so shared memory can be mapped. */
void kvs_host_id(uint8_t out[16]);

/* Fills `out` with n random bytes from getrandom(2). Returns KVS_OK or KVS_ERR_IO. */
int kvs_random_bytes(void *out, size_t n);

/* out = HMAC-SHA256(secret, nonce). An empty/NULL secret gives 32 zero bytes. */
void kvs_auth_compute(const char *secret, const uint8_t nonce[16], uint8_t out[32]);

/* Constant-time check of a HELLO's auth against the expected value. 1 = ok. */
int kvs_auth_check(const char *secret, const uint8_t nonce[16], const uint8_t auth[32]);

/* out = HMAC-SHA256(this host's id, nonce): proves "same host" to a peer
 * holding the same nonce without revealing the id. */
void kvs_host_tag(const uint8_t nonce[16], uint8_t out[32]);

/* xxh3-64 of a byte string (stable across processes and restarts). */
uint64_t kvs_hash64(const void *p, size_t n);

/* Copies src into dst (cap bytes incl. NUL). Returns KVS_OK or
 * KVS_ERR_TOO_LARGE if it did not fit (dst then holds a truncated copy). */
int kvs_strlcpy(char *dst, const char *src, size_t cap);

/* The unsigned decimal value of environment variable `name` if it lies in
 * lo..hi; `def` when it is unset or empty, and (with a warning naming
 * `unit`) when it is not a number in range. */
uint64_t kvs_env_u64(const char *name, uint64_t def, uint64_t lo, uint64_t hi, const char *unit);

#ifdef __cplusplus
}
#endif
#endif
