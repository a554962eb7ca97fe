#include "util.h"

#include "common/log.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "kvshelf/errors.h"

uint64_t kvs_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t kvs_now_ms(void) { return kvs_now_ns() / 1000000ull; }

uint64_t kvs_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

int kvs_cond_wait_ms(pthread_cond_t *cv, pthread_mutex_t *mu, uint64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t ns = (uint64_t)ts.tv_nsec + ms * 1000000ull;
    ts.tv_sec += (time_t)(ns / 1000000000ull);
    ts.tv_nsec = (long)(ns % 1000000000ull);
    return pthread_cond_timedwait(cv, mu, &ts);
}

void kvs_host_id(uint8_t out[16])
{
    char buf[128] = {0};
    ssize_t n = -1;
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        n = read(fd, buf, sizeof buf - 1);
        close(fd);
    }
    if (n <= 0) {
        gethostname(buf, sizeof buf - 1);
        n = (ssize_t)strlen(buf);
    }
    XXH128_hash_t h = XXH3_128bits(buf, (size_t)n);
    memcpy(out, &h.low64, 8);
    memcpy(out + 8, &h.high64, 8);
}

int kvs_random_bytes(void *out, size_t n)
{
    uint8_t *p = out;
    while (n) {
        ssize_t r = getrandom(p, n, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            return KVS_ERR_IO;
        }
        p += r;
        n -= (size_t)r;
    }
    return KVS_OK;
}

void kvs_auth_compute(const char *secret, const uint8_t nonce[16], uint8_t out[32])
{
    memset(out, 0, 32);
    if (!secret || !*secret) return;
    unsigned int len = 32;
    HMAC(EVP_sha256(), secret, (int)strlen(secret), nonce, 16, out, &len);
}

int kvs_auth_check(const char *secret, const uint8_t nonce[16], const uint8_t auth[32])
{
    uint8_t want[32];
    kvs_auth_compute(secret, nonce, want);
    return CRYPTO_memcmp(want, auth, 32) == 0;
}

void kvs_host_tag(const uint8_t nonce[16], uint8_t out[32])
{
    uint8_t hid[16];
    kvs_host_id(hid);
    unsigned int len = 32;
    HMAC(EVP_sha256(), hid, (int)sizeof hid, nonce, 16, out, &len);
}

uint64_t kvs_hash64(const void *p, size_t n) { return XXH3_64bits(p, n); }

int kvs_strlcpy(char *dst, const char *src, size_t cap)
{
    if (!cap) return KVS_ERR_TOO_LARGE;
    size_t n = src ? strlen(src) : 0;
    if (n >= cap) {
        memcpy(dst, src, cap - 1);
        dst[cap - 1] = '\0';
        return KVS_ERR_TOO_LARGE;
    }
    if (n) memcpy(dst, src, n);
    dst[n] = '\0';
    return KVS_OK;
}

uint64_t kvs_env_u64(const char *name, uint64_t def, uint64_t lo, uint64_t hi, const char *unit)
{
    const char *e = getenv(name);
    if (!e || !*e) return def;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(e, &end, 10);
    if (errno || *end || e[0] == '-' || v < lo || v > hi) {
        KVS_LOGW("%s=%s is not %llu..%llu (%s): using %llu", name, e, (unsigned long long)lo,
                 (unsigned long long)hi, unit, (unsigned long long)def);
        return def;
    }
    return (uint64_t)v;
}


