/* Wire protocol of kvshelf: frames, the byte codec, and the layout of every
 * message of the master RPC and of the transfer engine. This comment is the
 * contract: the requester and the server encode/decode each body with the
 * kvs_wbuf/kvs_rbuf codec below, field by field in the order given here.
 *
 * Frame = 24-byte header + body (little-endian):
 *   u32 magic     KVS_MAGIC ("KVS1")
 *   u16 type      enum kvs_msg_type
 *   u16 flags     KVS_F_RESPONSE on responses; KVS_F_NOREPLY on a request
 *                 the sender will not wait for: the master answers nothing
 *                 (an error that closes the connection still closes it)
 *   u32 body_len  <= KVS_MAX_BODY, else the connection is closed
 *   i32 status    responses: KVS_OK or a negative kvs_error; requests: 0
 *   u64 req_id    chosen by the requester, echoed in the response
 *
 * Codec: integers little-endian; `bytes` = u32 length + that many bytes;
 * `str` = bytes holding UTF-8 without NUL. Any read past the body, any
 * length over its limit, or trailing bytes => KVS_ERR_PROTO and the
 * connection is closed.
 *
 * Connection start (master and transfer server alike): the server sends a
 * CHALLENGE frame at once; the client answers HELLO with
 * auth = HMAC-SHA256(secret, nonce) (32 zero bytes when it has no secret).
 * The secret is the configured one or, when none is configured, the user's
 * pool secret (<runtime_dir>/secret, read by daemons and clients alike).
 * A wrong auth gets status KVS_ERR_AUTH and a close, except on a master's
 * unix socket when the master has no configured secret and the peer's
 * kernel-reported uid (SO_PEERCRED) is the master's, root or an
 * --allow-uid one. Transfer servers always require the secret; a master's
 * TCP port too. No other message is accepted before a successful HELLO.
 *
 * Message bodies (request -> response):
 *
 * CHALLENGE (server->client, unsolicited, req_id 0)
 *     u32 flags (bit0: secret required), u8[16] nonce
 *     [master, on TCP connections, when it has a unix socket:
 *      u8[32] host_tag = HMAC-SHA256(host_id, nonce), str unix_path]
 *     A client whose own host_tag matches may close this connection before
 *     HELLO and talk to the master over unix_path instead (same master, no
 *     TCP stack); if that fails it goes on here.
 * HELLO
 *   req:  u32 version (KVS_PROTO_VERSION), u32 role (enum kvs_role), u64 pid,
 *         u32 uid (informational: never trusted), str hostname, u8[16] host_id,
 *         u8[32] auth
 *   resp: u64 client_id, u32 ttl_ms, u32 lease_ms
 * HEARTBEAT
 *   req:  u64 client_id
 *   resp: u32 n, n x { u32 segment_id, u64 epoch }: fences the master asks of
 *         this client's segments (fence to epoch, then send FENCE);
 *         status KVS_ERR_NOT_FOUND when the master does not know
 *         the client (expired or master restarted): the client says HELLO
 *         again and re-mounts its segment.
 * MOUNT
 *   req:  u64 client_id, u64 size, str shm_name, str transfer_addr, u8[16] host_id,
 *         u64 epoch (the owner fenced the segment to it just before: > 0)
 *         [u32 flags: KVS_MOUNT_F_DIR = the owner keeps a directory of the
 *          segment's complete objects (segment/directory.h): it hands it
 *          in with DIR_LOAD and follows changes with DIR_SYNC;
 *          KVS_MOUNT_F_DIR_EMPTY (with F_DIR) = it lists nothing, no
 *          DIR_LOAD follows. Absent = 0]
 *         [u64 dir_reign: the master reign the directory last followed
 *          (kvs_master_set_reign, master.h); absent = 0]
 *   resp: u32 segment_id, [u64 reign: this master's; the owner records it
 *         in its directory once the directory is handed in]
 * DIR_LOAD (the owner hands in its segment's directory after MOUNT with
 *           KVS_MOUNT_F_DIR, in as many messages as it takes; the segment
 *           takes no placements and none of its objects are found until
 *           the one with last = 1)
 *   req:  u64 client_id, u32 segment_id, u8 last, u32 n,
 *         n x { bytes key, u64 offset, u64 size }
 *   resp: u32 n, n x { i32 status }: KVS_OK = indexed as a complete object;
 *         anything else = refused (overlap, key stored, put or removed
 *         since the master started, bounds; KVS_ERR_UNAVAILABLE: the
 *         master's rebuild is over, so it takes no directory any more, or
 *         the directory missed a reign, MOUNT's dir_reign):
 *         the owner removes that entry from its directory before it sends
 *         last = 1. Frame status KVS_ERR_NOT_FOUND (no such segment) or
 *         KVS_ERR_INVALID (not the owner, no directory, already collected).
 * DIR_SYNC (the owner fetches its directory's changes; it applies each
 *           batch, then acknowledges it in its next DIR_SYNC)
 *   req:  u64 client_id, u32 segment_id, u64 ack_seq (the last batch it
 *         applied since this MOUNT; 0 = none), u32 wait_ms (with no change
 *         to send, the master answers when one comes or after this long,
 *         at most 1000 ms; 0 = answer at once)
 *   resp: u64 seq (0: nothing to do), u8 more (more changes wait: ask again
 *         at once), u32 n, n x { u8 op (1 = list, 2 = unlist), u64 offset,
 *         u64 size, u64 obj_id, bytes key (empty for op 2) }
 *         Op 1 lists a complete object (replacing an entry at that offset);
 *         op 2 removes the entry at that offset. The master frees the space
 *         of an unlisted object only once a later DIR_SYNC acknowledged the
 *         batch that carried its op 2; changes of a batch that was never
 *         acknowledged come again in the next one.
 * UNMOUNT
 *   req:  u64 client_id, u32 segment_id
 *   resp: (empty)
 * PUT_START
 *   req:  u64 client_id, u32 n, n x { bytes key, u64 size }
 *   resp: u32 n, n x { i32 status, u32 segment_id, u64 offset, u64 obj_id,
 *                      u64 epoch }
 * PUT_END
 *   req:  u64 client_id, u32 n, n x { bytes key, u64 obj_id, u8 ok }
 *         ok: 1 = every byte written, publish; 0 = given up, writes may
 *         still be in flight (the space is fenced before reuse); 2 = given
 *         up, no write in flight (the space is freed at once)
 *   resp: u32 n, n x { i32 status }
 * GET (locate + read lease)
 *   req:  u64 client_id, u32 n, n x { bytes key }
 *   resp: u32 n, n x { i32 status, u64 size, u32 segment_id, u64 offset,
 *                      u64 obj_id, u64 lease_id }
 * RELEASE (clients send it with KVS_F_NOREPLY, in the same TCP segment as
 *          their next request when one follows within ~200 ms)
 *   req:  u64 client_id, u32 n, n x { u64 lease_id }
 *   resp: (empty), none with KVS_F_NOREPLY
 * EXISTS
 *   req:  u32 n, n x { bytes key }
 *   resp: u32 n, ceil(n/8) bytes bitmap (bit i%8 of byte i/8 = key i stored)
 * REMOVE
 *   req:  u32 n, n x { bytes key }
 *   resp: u32 n, n x { i32 status }; sent only once the owners of the
 *         removed objects' segments confirmed unlisting them from their
 *         directories (DIR_SYNC: a round trip or two), so a master that
 *         restarts never brings a removed value back; KVS_ERR_UNAVAILABLE
 *         for a key whose segment went away first (the removal may not
 *         hold). Until then a PUT_START of the key is KVS_ERR_BUSY.
 * SEGMENTS
 *   req:  (empty)
 *   resp: u32 n, n x { u32 segment_id, u64 size, u64 used, str shm_name,
 *                      str transfer_addr, u8[16] host_id, u64 owner_client_id }
 * STATS
 *   req:  (empty)
 *   resp: str json
 * SHUTDOWN (stops the master; only from a connection that proved the secret
 *          or a unix-socket peer of the master's uid or root: KVS_ERR_AUTH
 *          otherwise, the connection stays open)
 *   req:  (empty)
 *   resp: (empty)
 * PROBE (a client that got no CHALLENGE within KVS_PROBE_AFTER_MS of
 *        connecting; no reply, ignored by masters before HELLO: a
 *        server of another protocol closes the connection or answers bytes
 *        that are not a frame, and the client says so at once instead of
 *        waiting out its timeout)
 *   req:  "\r\n\r\n" (an HTTP server takes it for a bad request and says so)
 * FENCE (the owner of a segment, after it fenced the segment's memory to
 *        `epoch`: no write with an older reservation can land any more)
 *   req:  u64 client_id, u32 segment_id, u64 epoch
 *   resp: (empty); KVS_ERR_NOT_FOUND (no such segment), KVS_ERR_INVALID
 *         (not the owner, or an epoch the master never asked for)
 * T_READ (transfer server)
 *   req:  u32 segment_id, u64 offset, u64 len, u64 epoch (0, unused)
 *         (len <= KVS_MAX_CHUNK)
 *   resp: len raw bytes
 * T_WRITE (transfer server)
 *   req:  u32 segment_id, u64 offset, u64 len, u64 epoch, then len raw bytes
 *   resp: (empty); KVS_ERR_UNAVAILABLE when the segment is unknown or the
 *         reservation's epoch is stale (the payload is then discarded)
 *
 * Write epochs (never a late write over another object): every segment has
 * a write epoch kept by its owner in the segment's memory (segment.h).
 * MOUNT tells the master the epoch the owner fenced the segment to; each
 * PUT_START reservation carries the segment's current epoch, and every write
 * (same-host memcpy or T_WRITE) is applied only while that epoch is still
 * current. A put given up with writes possibly in flight (PUT_END ok=0, a
 * put timeout, an expired writer) is not freed: the master raises the
 * segment's epoch, asks the owner to fence through HEARTBEAT replies, and
 * frees the space once the owner's FENCE confirms that no write of an older
 * epoch can land. A refused write is an error to its writer, which then
 * never sends PUT_END ok=1; PUT_END ok=1 of a reservation the owner already
 * fenced past is refused anyway (KVS_ERR_UNAVAILABLE).
 * The master raises the epoch it hands out only one step past the last
 * epoch its owner confirmed (a put given up under the raised epoch waits for
 * the fence after that), so every epoch a registration hands out is at most
 * the control page's epoch + 1, and writers refuse any higher one. The first
 * MOUNT of a fresh segment carries epoch 1 (nobody ever wrote there); a
 * segment mounted again is first fenced to its control page's epoch + 2,
 * past everything any earlier registration (an earlier master, or the same
 * one before its owner expired) handed out.
 * Reads are guarded by leases, not epochs: a reader keeps a copy only if it
 * ended within its lease. So memory mounted again (epoch > 1) takes no
 * placements until the read leases of its earlier registrations ran out:
 * until the last lease granted on the registration it replaces ends, or a
 * whole lease time when the master does not know the earlier registration.
 */
#ifndef KVS_PROTO_H
#define KVS_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define KVS_MAGIC 0x3153564Bu /* "KVS1" read as little-endian u32 */
#define KVS_PROTO_VERSION 2u
#define KVS_FRAME_HDR 24u
#define KVS_MAX_BODY (64u << 20)  /* 64 MiB: larger frames close the connection */
#define KVS_MAX_CHUNK (4u << 20)  /* transfer engine splits values into 4 MiB pieces */
#define KVS_MAX_BATCH 65536u      /* entries per batch message */
#define KVS_F_RESPONSE 0x1u
#define KVS_F_NOREPLY 0x2u /* request: send no response */
#define KVS_PUT_ABANDON 0u       /* PUT_END ok: given up, writes may be in flight */
#define KVS_PUT_PUBLISH 1u       /* PUT_END ok: complete */
#define KVS_PUT_ABANDON_CLEAN 2u /* PUT_END ok: given up, nothing in flight */
#define KVS_NONCE_LEN 16u
#define KVS_AUTH_LEN 32u
#define KVS_HOST_ID_LEN 16u
#define KVS_PROBE_AFTER_MS 250 /* see PROBE */
#define KVS_MOUNT_F_DIR 0x1u   /* MOUNT flags: the owner keeps a directory */
#define KVS_MOUNT_F_DIR_EMPTY 0x2u /* ... and it lists nothing: no DIR_LOAD follows */

enum kvs_msg_type {
    KVS_MSG_CHALLENGE = 1,
    KVS_MSG_HELLO = 2,
    KVS_MSG_HEARTBEAT = 3,
    KVS_MSG_MOUNT = 4,
    KVS_MSG_UNMOUNT = 5,
    KVS_MSG_PUT_START = 6,
    KVS_MSG_PUT_END = 7,
    KVS_MSG_GET = 8,
    KVS_MSG_RELEASE = 9,
    KVS_MSG_EXISTS = 10,
    KVS_MSG_REMOVE = 11,
    KVS_MSG_SEGMENTS = 12,
    KVS_MSG_STATS = 13,
    KVS_MSG_SHUTDOWN = 14,
    KVS_MSG_FENCE = 15,
    KVS_MSG_PROBE = 16,
    KVS_MSG_DIR_LOAD = 17,
    KVS_MSG_DIR_SYNC = 18,
    KVS_MSG_T_READ = 32,
    KVS_MSG_T_WRITE = 33,
};

enum kvs_role { KVS_ROLE_CLIENT = 1, KVS_ROLE_NODE = 2, KVS_ROLE_TOOL = 3 };

typedef struct kvs_frame_hdr {
    uint32_t magic;
    uint16_t type;
    uint16_t flags;
    uint32_t body_len;
    int32_t status;
    uint64_t req_id;
} kvs_frame_hdr;

/* Encodes `h` into 24 bytes at `out`. */
void kvs_frame_hdr_encode(const kvs_frame_hdr *h, uint8_t out[KVS_FRAME_HDR]);

/* Decodes 24 bytes into *h and validates magic, known type and body_len <=
 * max_body. Returns KVS_OK or KVS_ERR_PROTO. */
int kvs_frame_hdr_decode(const uint8_t in[KVS_FRAME_HDR], uint32_t max_body, kvs_frame_hdr *h);

/* Name of a message type for logs ("PUT_START"); "?" if unknown. */
const char *kvs_msg_name(uint16_t type);

/* ---- Growable write buffer. On allocation failure `err` becomes
 * KVS_ERR_NOMEM and further writes are ignored. */
typedef struct kvs_wbuf {
    uint8_t *data;
    size_t len, cap;
    int err;
} kvs_wbuf;

void kvs_wbuf_init(kvs_wbuf *w);
void kvs_wbuf_free(kvs_wbuf *w);
void kvs_wbuf_reset(kvs_wbuf *w);             /* len = 0, err = 0; keeps capacity */
int kvs_wbuf_reserve(kvs_wbuf *w, size_t extra);
void kvs_wbuf_put(kvs_wbuf *w, const void *p, size_t n);
void kvs_wbuf_u8(kvs_wbuf *w, uint8_t v);
void kvs_wbuf_u16(kvs_wbuf *w, uint16_t v);
void kvs_wbuf_u32(kvs_wbuf *w, uint32_t v);
void kvs_wbuf_i32(kvs_wbuf *w, int32_t v);
void kvs_wbuf_u64(kvs_wbuf *w, uint64_t v);
void kvs_wbuf_bytes(kvs_wbuf *w, const void *p, uint32_t n); /* u32 len + bytes */
void kvs_wbuf_str(kvs_wbuf *w, const char *s);                /* bytes of strlen(s) */

/* Starts a frame in `w` (reserves the header); kvs_wbuf_end_frame patches
 * body_len once the body has been appended. */
size_t kvs_wbuf_begin_frame(kvs_wbuf *w, uint16_t type, uint16_t flags, int32_t status,
                            uint64_t req_id);
void kvs_wbuf_end_frame(kvs_wbuf *w, size_t frame_start);

/* ---- Bounds-checked reader over a body. After the first failure `err` is
 * KVS_ERR_PROTO and every further read returns zero / NULL. */
typedef struct kvs_rbuf {
    const uint8_t *p;
    size_t len, pos;
    int err;
} kvs_rbuf;

void kvs_rbuf_init(kvs_rbuf *r, const void *p, size_t len);
uint8_t kvs_rbuf_u8(kvs_rbuf *r);
uint16_t kvs_rbuf_u16(kvs_rbuf *r);
uint32_t kvs_rbuf_u32(kvs_rbuf *r);
int32_t kvs_rbuf_i32(kvs_rbuf *r);
uint64_t kvs_rbuf_u64(kvs_rbuf *r);
/* Copies n raw bytes into out. */
void kvs_rbuf_raw(kvs_rbuf *r, void *out, size_t n);
/* Reads `bytes` without copying: *p points into the body. Fails if the
 * length exceeds max_len. */
const uint8_t *kvs_rbuf_bytes(kvs_rbuf *r, uint32_t max_len, uint32_t *len);
/* Reads a str into out (cap bytes incl. NUL); fails if it does not fit or
 * contains a NUL byte. */
void kvs_rbuf_str(kvs_rbuf *r, char *out, size_t cap);
/* KVS_OK if no error and every byte was consumed, else KVS_ERR_PROTO. */
int kvs_rbuf_finish(kvs_rbuf *r);

#endif
