#include "net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdatomic.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "kvshelf/errors.h"
#include "log.h"
#include "util.h"

int kvs_addr_parse(const char *text, uint16_t default_port, kvs_addr *out)
{
    memset(out, 0, sizeof *out);
    if (!text || !*text) return KVS_ERR_CONFIG;
    if (!strncmp(text, "unix:", 5)) {
        const char *p = text + 5;
        if (!*p || strlen(p) >= sizeof out->path) return KVS_ERR_CONFIG;
        out->is_unix = 1;
        strcpy(out->path, p);
        return KVS_OK;
    }
    const char *host = text, *port = NULL;
    size_t hlen;
    if (text[0] == '[') {
        const char *e = strchr(text, ']');
        if (!e) return KVS_ERR_CONFIG;
        host = text + 1;
        hlen = (size_t)(e - host);
        if (e[1] == ':') port = e + 2;
        else if (e[1]) return KVS_ERR_CONFIG;
    } else {
        const char *c = strrchr(text, ':');
        if (c && strchr(text, ':') != c) c = NULL; /* bare IPv6 without port */
        hlen = c ? (size_t)(c - text) : strlen(text);
        if (c) port = c + 1;
    }
    if (hlen == 0 || hlen >= sizeof out->host) return KVS_ERR_CONFIG;
    memcpy(out->host, host, hlen);
    out->host[hlen] = '\0';
    if (port) {
        char *end;
        errno = 0;
        long v = strtol(port, &end, 10);
        if (!*port || *end || errno || v < 0 || v > 65535) return KVS_ERR_CONFIG;
        out->port = (uint16_t)v;
    } else {
        out->port = default_port;
    }
    return KVS_OK;
}

void kvs_addr_format(const kvs_addr *a, char *out, size_t cap)
{
    if (a->is_unix) snprintf(out, cap, "unix:%s", a->path);
    else if (strchr(a->host, ':')) snprintf(out, cap, "[%s]:%u", a->host, a->port);
    else snprintf(out, cap, "%s:%u", a->host, a->port);
}

int kvs_host_is_loopback(const char *host)
{
    if (!host) return 0;
    if (!strcmp(host, "localhost") || !strcmp(host, "::1")) return 1;
    struct in_addr in;
    if (inet_pton(AF_INET, host, &in) == 1) return (ntohl(in.s_addr) >> 24) == 127;
    return 0;
}

int kvs_addr_is_loopback(const kvs_addr *a) { return a->is_unix || kvs_host_is_loopback(a->host); }

int kvs_set_nonblock(int fd, int on)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) return KVS_ERR_IO;
    fl = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
    return fcntl(fd, F_SETFL, fl) < 0 ? KVS_ERR_IO : KVS_OK;
}

static int resolve(const kvs_addr *a, int passive, struct addrinfo **res)
{
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = passive ? AI_PASSIVE : 0;
    char port[8];
    snprintf(port, sizeof port, "%u", a->port);
    int rc = getaddrinfo(a->host, port, &hints, res);
    if (rc) {
        KVS_LOGW("cannot resolve %s: %s", a->host, gai_strerror(rc));
        return KVS_ERR_CONN;
    }
    return KVS_OK;
}

int kvs_listen(kvs_addr *a)
{
    int fd;
    if (a->is_unix) {
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) return KVS_ERR_IO;
        struct sockaddr_un sun;
        memset(&sun, 0, sizeof sun);
        sun.sun_family = AF_UNIX;
        strcpy(sun.sun_path, a->path);
        unlink(a->path);
        if (bind(fd, (struct sockaddr *)&sun, sizeof sun) < 0 || listen(fd, 512) < 0) {
            KVS_LOGE("listen on unix:%s: %s", a->path, strerror(errno));
            close(fd);
            return KVS_ERR_IO;
        }
        return fd;
    }
    struct addrinfo *res;
    int rc = resolve(a, 1, &res);
    if (rc) return rc;
    fd = -1;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 512) == 0) {
            struct sockaddr_storage ss;
            socklen_t sl = sizeof ss;
            getsockname(fd, (struct sockaddr *)&ss, &sl);
            if (ss.ss_family == AF_INET) a->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
            else if (ss.ss_family == AF_INET6)
                a->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
            break;
        }
        KVS_LOGE("listen on %s:%u: %s", a->host, a->port, strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd >= 0 ? fd : KVS_ERR_IO;
}

static int connect_wait(int fd, const struct sockaddr *sa, socklen_t len, int timeout_ms)
{
    kvs_set_nonblock(fd, 1);
    int rc = connect(fd, sa, len);
    if (rc < 0 && errno != EINPROGRESS) return KVS_ERR_CONN;
    if (rc < 0) {
        struct pollfd p = {fd, POLLOUT, 0};
        int pr;
        do pr = poll(&p, 1, timeout_ms > 0 ? timeout_ms : -1);
        while (pr < 0 && errno == EINTR);
        if (pr == 0) return KVS_ERR_TIMEOUT;
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (pr < 0 || err) return KVS_ERR_CONN;
    }
    kvs_set_nonblock(fd, 0);
    return KVS_OK;
}

int kvs_connect(const kvs_addr *a, int timeout_ms)
{
    if (a->is_unix) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return KVS_ERR_IO;
        struct sockaddr_un sun;
        memset(&sun, 0, sizeof sun);
        sun.sun_family = AF_UNIX;
        strcpy(sun.sun_path, a->path);
        int rc = connect_wait(fd, (struct sockaddr *)&sun, sizeof sun, timeout_ms);
        if (rc) {
            close(fd);
            return rc;
        }
        return fd;
    }
    struct addrinfo *res;
    int rc = resolve(a, 0, &res);
    if (rc) return rc;
    int fd = -1;
    rc = KVS_ERR_CONN;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0);
        if (fd < 0) continue;
        rc = connect_wait(fd, ai->ai_addr, ai->ai_addrlen, timeout_ms);
        if (rc == KVS_OK) break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) return rc;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

int kvs_read_full(int fd, void *buf, size_t n)
{
    uint8_t *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
        } else if (r == 0) {
            return KVS_ERR_CONN;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return KVS_ERR_TIMEOUT;
        } else {
            return KVS_ERR_CONN;
        }
    }
    return KVS_OK;
}

int kvs_write_full(int fd, const void *buf, size_t n)
{
    struct iovec iov = {(void *)buf, n};
    return kvs_writev_full(fd, &iov, 1);
}

void kvs_iov_advance(struct iovec **iov, int *iovcnt, size_t n)
{
    struct iovec *v = *iov;
    int c = *iovcnt;
    while (c > 0 && n >= v->iov_len) {
        n -= v->iov_len;
        v++;
        c--;
    }
    if (c > 0) {
        v->iov_base = (uint8_t *)v->iov_base + n;
        v->iov_len -= n;
    }
    *iov = v;
    *iovcnt = c;
}

int kvs_writev_full(int fd, struct iovec *iov, int iovcnt)
{
    while (iovcnt > 0) {
        ssize_t w = writev(fd, iov, iovcnt > IOV_MAX ? IOV_MAX : iovcnt);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return KVS_ERR_TIMEOUT;
            return KVS_ERR_CONN;
        }
        kvs_iov_advance(&iov, &iovcnt, (size_t)w);
    }
    return KVS_OK;
}

void kvs_set_timeouts(int fd, int timeout_ms)
{
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

void kvs_set_bulk_buffers(int fd)
{
    static _Atomic int64_t sz = -1;
    int64_t v = atomic_load(&sz);
    if (v < 0) {
        v = (int64_t)kvs_env_u64("KVSHELF_SOCKBUF", 0, 0, 1u << 30, "bytes");
        atomic_store(&sz, v);
    }
    if (!v) return; /* the kernel's autotuning (an explicit size turns it off) */
    int n = (int)v;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &n, sizeof n);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &n, sizeof n);
}

ssize_t kvs_recv_spin(int fd, void *buf, size_t n)
{
    uint64_t spin = kvs_spin_ns(), until = 0;
    for (;;) {
        ssize_t r = recv(fd, buf, n, MSG_DONTWAIT);
        if (r >= 0) return r;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
        uint64_t now = kvs_now_ns();
        if (!until) until = now + spin;
        if (now >= until) {
            errno = EAGAIN;
            return -1;
        }
        kvs_cpu_relax();
    }
}
