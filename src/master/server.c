/* epoll event loop of the master (see server.h), in the style of Redis's
 * ae + networking: level-triggered, non-blocking, one input and one output
 * buffer per connection, replies written at once and the rest on EPOLLOUT. */
#include "master/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"
#include "kvshelf/errors.h"

#define MAX_LISTENERS 16
#define READ_CHUNK (64u * 1024)
#define OUT_PAUSE (16u << 20) /* stop reading a client with this much unsent */
#define TICK_MS 100
#define KVS_SERVER_GC_RUNS 4 /* gc passes, 1 s apart, after clients expired */

enum { TAG_LISTEN = 1, TAG_CONN = 2, TAG_CLOSED = 3 };

typedef struct listener {
    int tag;
    int fd;
    int is_unix;
    char path[108];
} listener;

typedef struct conn {
    int tag;
    int fd;
    kvs_mconn st;
    uint8_t *in;
    size_t in_len, in_cap;
    kvs_wbuf out;
    size_t out_off;
    uint32_t events; /* registered epoll interest */
    struct conn *prev, *next;
    /* connections that have not completed HELLO, oldest first */
    struct conn *pprev, *pnext; /* both NULL once authenticated */
    uint64_t hello_deadline_ms;
} conn;

struct kvs_server {
    kvs_master *m;
    int ep;
    listener *lis[MAX_LISTENERS];
    size_t nlis;
    conn head; /* sentinel of the connection list */
    conn pre;  /* sentinel of the pre-HELLO list (pnext/pprev), oldest first */
    conn *closed; /* closed, freed after the batch of events (linked by next) */
    size_t nconns;
    uint32_t max_conns;
    uint32_t hello_ms;
    uint64_t busy_poll_ns;
    /* accepting paused after EMFILE/ENFILE (listeners out of epoll) */
    int accept_paused;
    uint64_t accept_resume_ms;
    uint32_t accept_backoff_ms;
    kvs_server_counters cnt;
    int (*gc)(void); /* called after clients expired (see kvs_server_set_gc) */
    uint64_t expired_seen;
    int gc_runs_left; /* gc once a second while > 0 */
    uint64_t gc_next_ms;
    const _Atomic uint64_t *serve_until; /* leadership lease (kvs_server_set_serve_until) */
};

static kvs_log_limit g_refuse_log, g_hello_log, g_evict_log;

uint32_t kvs_server_default_max_conns(void)
{
    struct rlimit rl;
    uint64_t nofile = 1024;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) nofile = rl.rlim_cur;
    else if (getrlimit(RLIMIT_NOFILE, &rl) == 0) nofile = 1u << 20;
    /* keep descriptors for listeners, epoll, the HTTP server, logs, files */
    uint64_t reserve = KVS_MAX((uint64_t)32, nofile / 8);
    uint64_t cap = nofile > reserve + 8 ? nofile - reserve : 8;
    return (uint32_t)KVS_MIN(cap, (uint64_t)KVS_SERVER_MAX_CONNS);
}

int kvs_server_new(kvs_master *m, kvs_server **out)
{
    kvs_server *s = calloc(1, sizeof *s);
    if (!s) return KVS_ERR_NOMEM;
    s->m = m;
    s->busy_poll_ns = KVS_SERVER_BUSY_POLL_US * 1000ull;
    s->max_conns = kvs_server_default_max_conns();
    s->hello_ms = KVS_SERVER_HELLO_MS;
    s->gc_runs_left = 1; /* at start: files left by owners that died before */
    s->ep = epoll_create1(EPOLL_CLOEXEC);
    if (s->ep < 0) {
        free(s);
        return KVS_ERR_IO;
    }
    s->head.prev = s->head.next = &s->head;
    s->pre.pprev = s->pre.pnext = &s->pre;
    *out = s;
    return KVS_OK;
}

int kvs_server_listen(kvs_server *s, const char *addr, uint16_t *port, char *err, size_t errlen)
{
    kvs_addr a;
    if (s->nlis >= MAX_LISTENERS) {
        snprintf(err, errlen, "too many listen addresses (max %d)", MAX_LISTENERS);
        return KVS_ERR_CONFIG;
    }
    if (kvs_addr_parse(addr, 50001, &a) != KVS_OK) {
        snprintf(err, errlen, "invalid listen address '%s'", addr);
        return KVS_ERR_CONFIG;
    }
    int fd = kvs_listen(&a);
    if (fd < 0) {
        snprintf(err, errlen, "cannot listen on '%s': %s", addr, strerror(errno));
        return KVS_ERR_IO;
    }
    listener *l = calloc(1, sizeof *l);
    if (!l) {
        close(fd);
        return KVS_ERR_NOMEM;
    }
    l->tag = TAG_LISTEN;
    l->fd = fd;
    l->is_unix = a.is_unix;
    if (a.is_unix) kvs_strlcpy(l->path, a.path, sizeof l->path);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        snprintf(err, errlen, "epoll_ctl: %s", strerror(errno));
        close(fd);
        free(l);
        return KVS_ERR_IO;
    }
    s->lis[s->nlis++] = l;
    if (port) *port = a.is_unix ? 0 : a.port;
    return KVS_OK;
}

/* Takes c off the pre-HELLO list (it authenticated, or is closing). */
static void pre_unlink(conn *c)
{
    if (!c->pnext) return;
    c->pprev->pnext = c->pnext;
    c->pnext->pprev = c->pprev;
    c->pprev = c->pnext = NULL;
}

static void conn_close(kvs_server *s, conn *c)
{
    epoll_ctl(s->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->prev->next = c->next;
    c->next->prev = c->prev;
    pre_unlink(c);
    s->nconns--;
    c->tag = TAG_CLOSED; /* events of this batch may still name it: freed later */
    if (c->st.authed && c->st.client_id) {
        /* the client's connection is gone (a crash closes it too): the
         * master expires it after a short grace instead of its TTL */
        kvs_master_lock(s->m);
        kvs_master_client_disconnected(s->m, c->st.client_id);
        kvs_master_unlock(s->m);
    }
    if (c->st.parked_seg || c->st.deferred) { /* c->out is freed below: never written again */
        kvs_master_lock(s->m);
        kvs_master_conn_closed(s->m, &c->st);
        kvs_master_unlock(s->m);
    }
    free(c->in);
    c->in = NULL;
    kvs_wbuf_free(&c->out);
    c->next = s->closed;
    s->closed = c;
}

static void free_closed(kvs_server *s)
{
    while (s->closed) {
        conn *c = s->closed;
        s->closed = c->next;
        free(c);
    }
}

static size_t pending_out(const conn *c) { return c->out.len - c->out_off; }

static void update_events(kvs_server *s, conn *c)
{
    uint32_t want = 0;
    if (pending_out(c) < OUT_PAUSE) want |= EPOLLIN;
    if (pending_out(c)) want |= EPOLLOUT;
    if (want == c->events) return;
    struct epoll_event ev = {.events = want, .data.ptr = c};
    epoll_ctl(s->ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = want;
}

/* Sends what it can. Returns 0, or -1 if the connection failed. */
static int conn_flush(conn *c)
{
    while (pending_out(c)) {
        ssize_t n = send(c->fd, c->out.data + c->out_off, pending_out(c), MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            return -1;
        }
    }
    c->out_off = 0;
    if (c->out.cap > (4u << 20)) kvs_wbuf_free(&c->out);
    else kvs_wbuf_reset(&c->out);
    return 0;
}

/* Sends the answers of parked DIR_SYNC requests that are due (master.h):
 * the master appended them to their connections' output buffers. */
static void flush_parked(kvs_server *s)
{
    kvs_master_lock(s->m);
    int n = kvs_master_flush_parked(s->m);
    kvs_master_unlock(s->m);
    if (!n) return;
    for (conn *c = s->head.next; c != &s->head;) {
        conn *next = c->next;
        if (pending_out(c) && !(c->events & EPOLLOUT)) {
            if (conn_flush(c) < 0) conn_close(s, c);
            else update_events(s, c);
        }
        c = next;
    }
}

/* Handles every complete frame buffered. Returns 0 or -1 (close). */
static int conn_process(kvs_server *s, conn *c)
{
    if (!c->in_len) return 0;
    size_t used = 0;
    kvs_master_lock(s->m);
    int rc = kvs_master_feed(s->m, &c->st, c->in, c->in_len, &c->out, &used);
    kvs_master_unlock(s->m);
    if (used) {
        memmove(c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
    }
    if (c->in_len == 0 && c->in_cap > (1u << 20)) {
        free(c->in);
        c->in = NULL;
        c->in_cap = 0;
    }
    if (c->st.authed) pre_unlink(c);
    if (rc != KVS_OK) {
        conn_flush(c); /* best effort: e.g. the AUTH refusal */
        return -1;
    }
    return 0;
}

static int conn_read(kvs_server *s, conn *c)
{
    /* grow geometrically toward the next frame's size, never beyond it +
     * one read: memory follows the bytes actually received */
    size_t need = kvs_master_frame_need(c->in, c->in_len);
    size_t want = c->in_len + READ_CHUNK;
    if (need > want) want = KVS_MIN(need, KVS_MAX(want, c->in_cap * 2));
    if (want > c->in_cap) {
        uint8_t *p = realloc(c->in, want);
        if (!p) return -1;
        c->in = p;
        c->in_cap = want;
    }
    ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
    if (n == 0) return -1;
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
    c->in_len += (size_t)n;
    if (conn_process(s, c) < 0) return -1;
    if (conn_flush(c) < 0) return -1;
    update_events(s, c);
    return 0;
}

static void peer_info(int fd, int is_unix, int *local, int *uid)
{
    *local = 0;
    *uid = -1;
    if (is_unix) {
        *local = 1;
        struct ucred cr;
        socklen_t l = sizeof cr;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &l) == 0) *uid = (int)cr.uid;
        return;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) != 0) return;
    if (ss.ss_family == AF_INET) {
        uint32_t ip = ntohl(((struct sockaddr_in *)&ss)->sin_addr.s_addr);
        *local = (ip >> 24) == 127;
    } else if (ss.ss_family == AF_INET6) {
        const struct in6_addr *a6 = &((struct sockaddr_in6 *)&ss)->sin6_addr;
        *local = IN6_IS_ADDR_LOOPBACK(a6) || (IN6_IS_ADDR_V4MAPPED(a6) && a6->s6_addr[12] == 127);
    }
}

/* Stops accepting (listeners out of epoll) for the current back-off, which
 * doubles up to KVS_SERVER_ACCEPT_BACKOFF_MAX_MS: with no descriptor left,
 * a level-triggered listener would otherwise wake the loop at once, again
 * and again. */
static void pause_accepting(kvs_server *s, int err)
{
    s->accept_backoff_ms = s->accept_backoff_ms
                               ? KVS_MIN(s->accept_backoff_ms * 2, KVS_SERVER_ACCEPT_BACKOFF_MAX_MS)
                               : KVS_SERVER_ACCEPT_BACKOFF_MIN_MS;
    s->accept_resume_ms = kvs_now_ms() + s->accept_backoff_ms;
    s->cnt.accept_pauses++;
    if (!s->accept_paused)
        for (size_t i = 0; i < s->nlis; i++) epoll_ctl(s->ep, EPOLL_CTL_DEL, s->lis[i]->fd, NULL);
    s->accept_paused = 1;
    /* one line per pause at most, and the pauses grow */
    KVS_LOGW("accept: %s (%zu connections open); not accepting for %u ms", strerror(err),
             s->nconns, s->accept_backoff_ms);
}

static void resume_accepting(kvs_server *s)
{
    for (size_t i = 0; i < s->nlis; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s->lis[i]};
        epoll_ctl(s->ep, EPOLL_CTL_ADD, s->lis[i]->fd, &ev);
    }
    s->accept_paused = 0;
}

/* Closes the oldest connection that has not said HELLO yet, to make room.
 * 1 if there was one. */
static int evict_oldest_pre(kvs_server *s)
{
    if (s->pre.pnext == &s->pre) return 0;
    s->cnt.evicted++;
    kvs_log_limited(&g_evict_log, 1000, KVS_LOG_WARN,
                    "out of room (%zu connections open): closing the oldest connection that "
                    "has not said HELLO",
                    s->nconns);
    conn_close(s, s->pre.pnext);
    return 1;
}

/* Closes a connection refused for lack of room, telling a kvshelf client
 * why (a CHALLENGE frame with status KVS_ERR_BUSY, best effort: the socket
 * is new, its buffer empty), so it does not mistake the close for a server
 * of another protocol (proto.h PROBE). */
static void refuse_fd(int fd)
{
    kvs_frame_hdr h = {KVS_MAGIC, KVS_MSG_CHALLENGE, 0, 0, KVS_ERR_BUSY, 0};
    uint8_t b[KVS_FRAME_HDR];
    kvs_frame_hdr_encode(&h, b);
    ssize_t w = send(fd, b, sizeof b, MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)w;
    close(fd);
}

static void on_accept(kvs_server *s, listener *l)
{
    for (int i = 0; i < 64; i++) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* out of descriptors (accept4 says so before it looks for a
                 * connection): if one waits, the oldest connection without
                 * HELLO makes room; with none, stop accepting for a while */
                int e = errno;
                struct pollfd p = {l->fd, POLLIN, 0};
                if (poll(&p, 1, 0) <= 0) return; /* nobody waiting */
                if (evict_oldest_pre(s)) continue;
                pause_accepting(s, e);
            } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                       errno != ECONNABORTED) {
                kvs_log_limited(&g_refuse_log, 1000, KVS_LOG_WARN, "accept: %s", strerror(errno));
            }
            return;
        }
        s->accept_backoff_ms = 0;
        if (s->nconns >= s->max_conns && !evict_oldest_pre(s)) {
            s->cnt.refused++;
            kvs_log_limited(&g_refuse_log, 1000, KVS_LOG_WARN,
                            "%u connections open (--max-conns): refusing a new one",
                            s->max_conns);
            refuse_fd(fd);
            continue;
        }
        conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->tag = TAG_CONN;
        c->fd = fd;
        kvs_wbuf_init(&c->out);
        if (!l->is_unix) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
        int local, uid;
        peer_info(fd, l->is_unix, &local, &uid);
        kvs_mconn_init(s->m, &c->st, local, uid, &c->out);
        c->events = EPOLLIN;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            kvs_wbuf_free(&c->out);
            free(c);
            close(fd);
            continue;
        }
        c->next = s->head.next;
        c->prev = &s->head;
        s->head.next->prev = c;
        s->head.next = c;
        c->hello_deadline_ms = kvs_now_ms() + s->hello_ms;
        c->pnext = &s->pre; /* newest last */
        c->pprev = s->pre.pprev;
        s->pre.pprev->pnext = c;
        s->pre.pprev = c;
        s->nconns++;
        s->cnt.accepted++;
        if (conn_flush(c) < 0) conn_close(s, c);
        else update_events(s, c);
    }
}

/* Closes the connections that did not complete HELLO in time. */
static void expire_pre(kvs_server *s, uint64_t now)
{
    while (s->pre.pnext != &s->pre && s->pre.pnext->hello_deadline_ms <= now) {
        s->cnt.hello_timeouts++;
        kvs_log_limited(&g_hello_log, 1000, KVS_LOG_WARN,
                        "closing a connection that sent no HELLO within %u ms", s->hello_ms);
        conn_close(s, s->pre.pnext);
    }
}

static void on_conn_event(kvs_server *s, conn *c, uint32_t ev)
{
    if (ev & EPOLLOUT) {
        if (conn_flush(c) < 0) {
            conn_close(s, c);
            return;
        }
        /* input held back while the output was over the limit */
        if (pending_out(c) < OUT_PAUSE && c->in_len &&
            (conn_process(s, c) < 0 || conn_flush(c) < 0)) {
            conn_close(s, c);
            return;
        }
        update_events(s, c);
    }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        if (!(c->events & EPOLLIN) && !(ev & (EPOLLHUP | EPOLLERR))) return;
        if (conn_read(s, c) < 0) conn_close(s, c);
    }
}

void kvs_server_set_busy_poll(kvs_server *s, uint32_t us) { s->busy_poll_ns = us * 1000ull; }

void kvs_server_set_serve_until(kvs_server *s, const _Atomic uint64_t *until_ms)
{
    s->serve_until = until_ms;
}

/* 1 while the leadership lease (if any) allows serving at `now`. */
static int may_serve(const kvs_server *s, uint64_t now)
{
    return !s->serve_until || now < atomic_load(s->serve_until);
}

void kvs_server_set_max_conns(kvs_server *s, uint32_t n)
{
    s->max_conns = n ? KVS_MIN(n, (uint32_t)KVS_SERVER_MAX_CONNS) : kvs_server_default_max_conns();
}

uint32_t kvs_server_max_conns(const kvs_server *s) { return s->max_conns; }

void kvs_server_set_hello_ms(kvs_server *s, uint32_t ms) { s->hello_ms = ms ? ms : KVS_SERVER_HELLO_MS; }

void kvs_server_set_gc(kvs_server *s, int (*gc)(void)) { s->gc = gc; }

void kvs_server_get_counters(const kvs_server *s, kvs_server_counters *out)
{
    *out = s->cnt;
    out->open = s->nconns;
}

int kvs_server_run(kvs_server *s, volatile sig_atomic_t *stop, int stop_on_shutdown)
{
    struct epoll_event evs[256];
    uint64_t next_tick = kvs_now_ms() + TICK_MS;
    int rc = KVS_OK;
    uint64_t poll_until = 0; /* busy-poll (timeout 0) until then: see busy_poll_ns */
    for (;;) {
        if (stop && *stop) break;
        if (stop_on_shutdown) {
            kvs_master_lock(s->m);
            int sd = kvs_master_shutdown_requested(s->m);
            kvs_master_unlock(s->m);
            if (sd) break;
        }
        uint64_t now = kvs_now_ms();
        if (!may_serve(s, now)) {
            KVS_LOGW("leadership lease ended: stepping down (closing every connection)");
            rc = KVS_ERR_UNAVAILABLE;
            break;
        }
        if (s->accept_paused && now >= s->accept_resume_ms) resume_accepting(s);
        uint64_t wake = s->accept_paused ? KVS_MIN(next_tick, s->accept_resume_ms) : next_tick;
        if (s->serve_until) {
            uint64_t until = atomic_load(s->serve_until);
            if (until < wake) wake = until;
        }
        kvs_master_lock(s->m);
        uint64_t park = kvs_master_park_wait_ms(s->m); /* a parked DIR_SYNC due */
        kvs_master_unlock(s->m);
        if (wake > now && park < wake - now) wake = now + park;
        int timeout = wake > now ? (int)(wake - now) : 0;
        if (poll_until && kvs_now_ns() < poll_until) timeout = 0;
        else poll_until = 0;
        int n = epoll_wait(s->ep, evs, (int)KVS_ARRAY_LEN(evs), timeout);
        if (n > 0 && s->busy_poll_ns) poll_until = kvs_now_ns() + s->busy_poll_ns;
        if (n < 0) {
            if (errno == EINTR) continue;
            KVS_LOGE("epoll_wait: %s", strerror(errno));
            rc = KVS_ERR_IO;
            break;
        }
        if (n > 0 && !may_serve(s, kvs_now_ms())) continue; /* stops at the top */
        for (int i = 0; i < n; i++) {
            int tag = *(int *)evs[i].data.ptr;
            if (tag == TAG_LISTEN) on_accept(s, evs[i].data.ptr);
            else if (tag == TAG_CONN) on_conn_event(s, evs[i].data.ptr, evs[i].events);
        }
        flush_parked(s);
        free_closed(s);
        now = kvs_now_ms();
        if (now >= next_tick) {
            expire_pre(s, now);
            kvs_master_counters k;
            kvs_master_lock(s->m);
            kvs_master_tick(s->m);
            kvs_master_get_counters(s->m, &k);
            kvs_master_unlock(s->m);
            /* a client expired: if it died on this host its segment file is
             * an orphan now. The gc leaves files younger than ~2 s alone (an
             * owner may still be taking its lock), so it runs once a second
             * for a few seconds. */
            if (k.expired_clients != s->expired_seen) {
                s->expired_seen = k.expired_clients;
                s->gc_runs_left = KVS_SERVER_GC_RUNS;
            }
            if (s->gc && s->gc_runs_left > 0 && now >= s->gc_next_ms) {
                s->gc_runs_left--;
                s->gc_next_ms = now + 1000;
                int removed = s->gc();
                if (removed > 0) KVS_LOGI("removed %d orphaned segment file(s)", removed);
            }
            flush_parked(s);
            free_closed(s);
            next_tick = now + TICK_MS;
        }
    }
    if (rc != KVS_ERR_UNAVAILABLE) /* a master that stepped down sends nothing more */
        for (conn *c = s->head.next; c != &s->head; c = c->next) conn_flush(c);
    return rc;
}

void kvs_server_free(kvs_server *s)
{
    if (!s) return;
    while (s->head.next != &s->head) conn_close(s, s->head.next);
    free_closed(s);
    for (size_t i = 0; i < s->nlis; i++) {
        close(s->lis[i]->fd);
        if (s->lis[i]->is_unix) unlink(s->lis[i]->path);
        free(s->lis[i]);
    }
    close(s->ep);
    free(s);
}
