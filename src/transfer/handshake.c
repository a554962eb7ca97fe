/* Client half of the CHALLENGE / HELLO handshake and a MSG_NOSIGNAL writev. */
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/net.h"
#include "common/util.h"
#include "kvshelf/errors.h"
#include "proto/proto.h"
#include "transfer.h"

int kvs_sendv_full(int fd, struct iovec *iov, int iovcnt)
{
    return kvs_sendv_flags(fd, iov, iovcnt, 0);
}

int kvs_sendv_flags(int fd, struct iovec *iov, int iovcnt, int flags)
{
    while (iovcnt > 0 && iov->iov_len == 0) {
        iov++;
        iovcnt--;
    }
    while (iovcnt > 0) {
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = iov;
        m.msg_iovlen = (size_t)(iovcnt > IOV_MAX ? IOV_MAX : iovcnt);
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL | flags);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return KVS_ERR_TIMEOUT;
            return KVS_ERR_CONN;
        }
        kvs_iov_advance(&iov, &iovcnt, (size_t)w);
    }
    return KVS_OK;
}

/* Reads one whole frame whose body must fit in cap bytes. */
static int read_frame(int fd, kvs_frame_hdr *h, uint8_t *body, size_t cap)
{
    uint8_t hb[KVS_FRAME_HDR];
    int rc = kvs_read_full(fd, hb, sizeof hb);
    if (rc) return rc;
    if (kvs_frame_hdr_decode(hb, (uint32_t)cap, h)) return KVS_ERR_PROTO;
    if (h->body_len) return kvs_read_full(fd, body, h->body_len);
    return KVS_OK;
}

int kvs_hs_read_challenge(int fd, int timeout_ms, kvs_challenge *ch)
{
    memset(ch, 0, sizeof *ch);
    kvs_set_timeouts(fd, timeout_ms);
    kvs_frame_hdr h;
    uint8_t body[512];
    int rc = read_frame(fd, &h, body, sizeof body);
    if (rc) return rc;
    if (h.type != KVS_MSG_CHALLENGE || (h.flags & KVS_F_RESPONSE)) return KVS_ERR_PROTO;
    /* a server refusing us for lack of room says so (KVS_ERR_BUSY) */
    if (h.status) return h.status < 0 && h.status >= -64 ? h.status : KVS_ERR_PROTO;
    kvs_rbuf r;
    kvs_rbuf_init(&r, body, h.body_len);
    (void)kvs_rbuf_u32(&r);
    kvs_rbuf_raw(&r, ch->nonce, sizeof ch->nonce);
    if (!r.err && r.pos < r.len) { /* the master offers its unix socket */
        uint8_t tag[KVS_AUTH_LEN], mine[KVS_AUTH_LEN];
        char path[sizeof ch->local_path];
        kvs_rbuf_raw(&r, tag, sizeof tag);
        kvs_rbuf_str(&r, path, sizeof path);
        if (r.err) return KVS_ERR_PROTO;
        kvs_host_tag(ch->nonce, mine);
        if (!memcmp(tag, mine, sizeof mine) && path[0] == '/')
            memcpy(ch->local_path, path, sizeof path);
    }
    if (kvs_rbuf_finish(&r)) return KVS_ERR_PROTO;
    return KVS_OK;
}

int kvs_hs_client(int fd, const char *secret, uint32_t role, int timeout_ms, uint8_t *resp,
                  size_t cap, uint32_t *resp_len)
{
    kvs_challenge ch;
    int rc = kvs_hs_read_challenge(fd, timeout_ms, &ch);
    if (rc) return rc;
    return kvs_hs_hello(fd, &ch, secret, role, timeout_ms, resp, cap, resp_len);
}

int kvs_hs_hello(int fd, const kvs_challenge *ch, const char *secret, uint32_t role,
                 int timeout_ms, uint8_t *resp, size_t cap, uint32_t *resp_len)
{
    kvs_set_timeouts(fd, timeout_ms);
    kvs_frame_hdr h;
    uint8_t body[512];
    int rc;
    const uint8_t *nonce = ch->nonce;
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    uint8_t hid[KVS_HOST_ID_LEN], auth[KVS_AUTH_LEN];
    kvs_host_id(hid);
    kvs_auth_compute(secret, nonce, auth);
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    size_t f = kvs_wbuf_begin_frame(&w, KVS_MSG_HELLO, 0, 0, 1);
    kvs_wbuf_u32(&w, KVS_PROTO_VERSION);
    kvs_wbuf_u32(&w, role);
    kvs_wbuf_u64(&w, (uint64_t)getpid());
    kvs_wbuf_u32(&w, (uint32_t)getuid());
    kvs_wbuf_str(&w, host);
    kvs_wbuf_put(&w, hid, sizeof hid);
    kvs_wbuf_put(&w, auth, sizeof auth);
    kvs_wbuf_end_frame(&w, f);
    if (w.err) {
        kvs_wbuf_free(&w);
        return KVS_ERR_NOMEM;
    }
    struct iovec iov = {w.data, w.len};
    rc = kvs_sendv_full(fd, &iov, 1);
    kvs_wbuf_free(&w);
    if (rc) return rc;
    rc = read_frame(fd, &h, body, sizeof body);
    if (rc) return rc;
    if (h.type != KVS_MSG_HELLO || !(h.flags & KVS_F_RESPONSE)) return KVS_ERR_PROTO;
    if (h.status == KVS_ERR_AUTH) return KVS_ERR_AUTH;
    if (h.status) return h.status < 0 && h.status >= -64 ? h.status : KVS_ERR_PROTO;
    if (resp_len) *resp_len = h.body_len;
    if (resp && cap) memcpy(resp, body, KVS_MIN((size_t)h.body_len, cap));
    return KVS_OK;
}
