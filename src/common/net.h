/* Socket helpers: addresses ("host:port", "[v6]:port", "unix:/path"),
 * listening, connecting with a timeout, full reads/writes. */
#ifndef KVS_NET_H
#define KVS_NET_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef struct kvs_addr {
    int is_unix;
    char host[256];   /* host name or IP (TCP) */
    uint16_t port;    /* TCP port (0 = any, for listening) */
    char path[108];   /* unix socket path */
} kvs_addr;

/* Parses "host:port", "[::1]:port", "unix:/path" (and "host" alone with
 * default_port). Returns KVS_OK or KVS_ERR_CONFIG. */
int kvs_addr_parse(const char *text, uint16_t default_port, kvs_addr *out);

/* Formats an address as parse() accepts it. */
void kvs_addr_format(const kvs_addr *a, char *out, size_t cap);

/* 1 if the address is a unix socket or a loopback host (127.0.0.0/8, ::1,
 * "localhost"), else 0. */
int kvs_addr_is_loopback(const kvs_addr *a);

/* 1 if `host` (a name or literal) is loopback. */
int kvs_host_is_loopback(const char *host);

/* Listens on `a` (SO_REUSEADDR, CLOEXEC, non-blocking, backlog 512). For
 * TCP port 0 the chosen port is written back into a->port. A unix socket
 * path is unlinked first. Returns the fd or a negative kvs_error. */
int kvs_listen(kvs_addr *a);

/* Connects to `a` within timeout_ms; returns a blocking CLOEXEC fd with
 * TCP_NODELAY, or KVS_ERR_CONN / KVS_ERR_TIMEOUT. */
int kvs_connect(const kvs_addr *a, int timeout_ms);

/* Sets O_NONBLOCK. */
int kvs_set_nonblock(int fd, int on);

/* Reads/writes exactly n bytes on a blocking fd (retries EINTR).
 * Returns KVS_OK, KVS_ERR_CONN on EOF/reset or KVS_ERR_TIMEOUT (SO_RCVTIMEO). */
int kvs_read_full(int fd, void *buf, size_t n);
int kvs_write_full(int fd, const void *buf, size_t n);
int kvs_writev_full(int fd, struct iovec *iov, int iovcnt);

/* Drops the first n bytes of an iovec array after a short write: moves *iov
 * and *iovcnt past the entries fully written and trims the next one (the
 * array is modified). n must not exceed the bytes the array holds. */
void kvs_iov_advance(struct iovec **iov, int *iovcnt, size_t n);

/* Sets SO_RCVTIMEO and SO_SNDTIMEO (0 = none). */
void kvs_set_timeouts(int fd, int timeout_ms);

/* Non-blocking recv retried for up to kvs_spin_ns() (busy-poll before the
 * caller sleeps). Returns bytes read (> 0), 0 at EOF, or -1 with errno
 * (EAGAIN: nothing came within the spin). */
ssize_t kvs_recv_spin(int fd, void *buf, size_t n);

/* Socket buffers of a bulk-transfer connection: KVSHELF_SOCKBUF bytes for
 * both directions when set, else left to the kernel's autotuning (which a
 * fixed size would turn off; fixed 4 MiB measured 8-12% slower on loopback:
 * bench/ceilings.c --sockbuf). */
void kvs_set_bulk_buffers(int fd);

#endif
