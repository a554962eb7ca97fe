"""Just enough of kvshelf's wire protocol (src/proto/proto.h) and of HTTP to
send well-formed, malformed and hostile bytes to the servers' ports."""
import hashlib
import hmac
import os
import socket
import struct
import time

MAGIC = 0x3153564B
HDR = struct.Struct("<IHHIiQ")
F_RESPONSE = 1

CHALLENGE, HELLO, HEARTBEAT, MOUNT, UNMOUNT = 1, 2, 3, 4, 5
PUT_START, PUT_END, GET, RELEASE, EXISTS, REMOVE = 6, 7, 8, 9, 10, 11
SEGMENTS, STATS, SHUTDOWN = 12, 13, 14
T_READ, T_WRITE = 32, 33
ROLE_TOOL = 3
ERR_AUTH = -10


def frame(mtype, body=b"", req_id=1, flags=0, status=0, body_len=None, magic=MAGIC):
    n = len(body) if body_len is None else body_len
    return HDR.pack(magic, mtype, flags, n, status, req_id) + body


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


def wbytes(b):
    return u32(len(b)) + b


def connect(port, timeout=5.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_frame(s):
    """(magic, type, flags, body_len, status, req_id), body — or None at EOF."""
    h = recv_exact(s, HDR.size)
    if h is None:
        return None
    hdr = HDR.unpack(h)
    body = recv_exact(s, hdr[3]) if hdr[3] else b""
    if body is None:
        return None
    return hdr, body


def read_challenge(s):
    f = read_frame(s)
    assert f is not None, "server closed before sending CHALLENGE"
    hdr, body = f
    assert hdr[0] == MAGIC and hdr[1] == CHALLENGE, "first frame is not a CHALLENGE: %r" % (hdr,)
    # a server refusing the connection (no room) says why in the status
    assert hdr[4] == 0, "refused with status %d" % hdr[4]
    flags, nonce = struct.unpack("<I", body[:4])[0], body[4:20]
    return flags, nonce


def auth_for(secret, nonce):
    if not secret:
        return b"\0" * 32
    return hmac.new(secret.encode(), nonce, hashlib.sha256).digest()


def hello_body(nonce, secret=None, role=ROLE_TOOL, version=2, auth=None, hostname="it-test",
               uid=None):
    """HELLO body; `uid` is the uid it claims (default: ours; servers must
    not believe it)."""
    a = auth if auth is not None else auth_for(secret, nonce)
    claim = os.getuid() if uid is None else uid
    return (u32(version) + u32(role) + u64(os.getpid()) + u32(claim) +
            wbytes(hostname.encode()) + b"\0" * 16 + a)


def t_read(seg_id, offset, length, epoch=0, req_id=1):
    """A T_READ request frame."""
    return frame(T_READ, u32(seg_id) + u64(offset) + u64(length) + u64(epoch), req_id=req_id)


def t_write(seg_id, offset, data, epoch=0, req_id=1):
    """A T_WRITE request frame with its payload."""
    return frame(T_WRITE, u32(seg_id) + u64(offset) + u64(len(data)) + u64(epoch),
                 req_id=req_id) + data


def connect_unix(path, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def challenge_unix_path(body):
    """The unix socket path a master's CHALLENGE body offers, or None."""
    if len(body) <= 20 + 32 + 4:
        return None
    (n,) = struct.unpack("<I", body[52:56])
    return body[56:56 + n].decode(errors="replace")


def pool_secret(runtime_dir):
    """The pool secret a daemon with no configured secret keeps in its
    runtime directory (<dir>/secret, hex text)."""
    with open(os.path.join(runtime_dir, "secret")) as f:
        return f.read().strip()


def replies(s, timeout=3.0):
    """Every frame the peer sends until it closes or stays silent for
    `timeout`: ([(header, body)...], closed). A reset counts as a close."""
    out = []
    s.settimeout(timeout)
    while True:
        try:
            f = read_frame(s)
        except socket.timeout:
            return out, False
        except OSError:
            return out, True
        if f is None:
            return out, True
        out.append(f)


def handshake(port, secret=None, role=ROLE_TOOL):
    """Connects and authenticates; returns (socket, hello reply status)."""
    s = connect(port)
    _, nonce = read_challenge(s)
    s.sendall(frame(HELLO, hello_body(nonce, secret, role), req_id=1))
    f = read_frame(s)
    assert f is not None, "server closed the connection after a valid HELLO"
    return s, f[0][4]


def closed_within(s, timeout=5.0):
    """True if the peer closes the connection (EOF or reset) within timeout,
    reading and discarding whatever it sends first."""
    s.settimeout(0.5)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            d = s.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
        except OSError:
            return True
        if not d:
            return True
    return False


def send_quietly(s, data):
    try:
        s.sendall(data)
        return True
    except OSError:
        return False


def http_request(port, raw, timeout=5.0, half_close=False):
    """Sends raw bytes to an HTTP port (then shuts down the sending side if
    half_close); returns (status or None, body bytes)."""
    s = connect(port, timeout)
    try:
        send_quietly(s, raw)
        if half_close:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        data = b""
        while True:
            try:
                d = s.recv(65536)
            except (socket.timeout, OSError):
                break
            if not d:
                break
            data += d
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                cl = None
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        cl = int(v.strip())
                if cl is not None and len(rest) >= cl:
                    break
    finally:
        s.close()
    if not data.startswith(b"HTTP/"):
        return None, data
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def http(port, method, path, body=b"", timeout=5.0, secret=None, auth=None):
    """One request; with `secret`, the header "Authorization: Bearer <secret>"
    (or any Authorization value given as `auth`)."""
    if secret is not None:
        auth = "Bearer " + secret
    extra = "Authorization: %s\r\n" % auth if auth is not None else ""
    req = ("%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n"
           % (method, path, extra, len(body))).encode() + body
    return http_request(port, req, timeout)


# ---- a raw protocol client of a master, as the restart and failover tests
# use it (a tool that reserves puts and leaves them uncommitted)

def tool_hello(s, secret):
    """HELLO as a tool on a connected socket s; returns (s, client id)."""
    _, nonce = read_challenge(s)
    s.sendall(frame(HELLO, hello_body(nonce, secret, role=1), req_id=1))
    hdr, body = read_frame(s)
    assert hdr[4] == 0, hdr
    return s, struct.unpack("<Q", body[:8])[0]


def call(s, mtype, body, req_id):
    """One request; (status, body) of its reply (other replies skipped)."""
    s.sendall(frame(mtype, body, req_id=req_id))
    while True:
        f = read_frame(s)
        assert f is not None, "the master closed the connection"
        hdr, rbody = f
        if hdr[5] == req_id:
            return hdr[4], rbody


def put_start(s, cid, key, size, req_id):
    """PUT_START of one key: (status, segment id, offset, object id, epoch)."""
    status, body = call(s, PUT_START, u64(cid) + u32(1) + wbytes(key) + u64(size), req_id)
    assert status == 0, status
    n, st, seg, off, obj, epoch = struct.unpack("<IiIQQQ", body)
    return st, seg, off, obj, epoch


def get_status(s, cid, key, req_id):
    """GET of one key: its status (0 a hit, -3 KVS_ERR_NOT_FOUND)."""
    status, body = call(s, GET, u64(cid) + u32(1) + wbytes(key), req_id)
    assert status == 0, status
    return struct.unpack("<Ii", body[:8])[1]


def t_write_payload(seg_id, offset, data, epoch, req_id):
    """A T_WRITE frame as a client sends it: its body is the fields, then the
    payload (t_write above counts the fields only in the header)."""
    return frame(T_WRITE, u32(seg_id) + u64(offset) + u64(len(data)) + u64(epoch),
                 req_id=req_id, body_len=28 + len(data)) + data


def put_half_written(s, cid, xport, secret):
    """Two puts a crash leaves behind, through the master connection s (a
    tool, client id cid) and the transfer port xport: "half" reserved
    (256 KiB) with half its bytes written, "full" (64 KiB) with all of
    them, neither committed (no PUT_END). Returns the transfer socket and
    (segment id, offset, epoch) of "half"."""
    st, segid, off, _, epoch = put_start(s, cid, b"half", 256 << 10, 2)
    assert st == 0, st
    t, tst = handshake(xport, secret)
    assert tst == 0, tst
    t.sendall(t_write_payload(segid, off, b"\x5a" * (128 << 10), epoch, 2))
    hdr, _ = read_frame(t)
    assert hdr[4] == 0, hdr
    st, segid2, off2, _, epoch2 = put_start(s, cid, b"full", 64 << 10, 3)
    assert st == 0, st
    t.sendall(t_write_payload(segid2, off2, b"\xa5" * (64 << 10), epoch2, 3))
    hdr, _ = read_frame(t)
    assert hdr[4] == 0, hdr
    return t, (segid, off, epoch)


def assert_late_write_refused(t, seg_id, offset, epoch, req_id):
    """A late 4 KiB write of a dead master's reservation (its epoch) over
    the transfer socket t is refused, not applied."""
    t.sendall(t_write_payload(seg_id, offset, b"\x5a" * 4096, epoch, req_id))
    f = read_frame(t)
    assert f is not None and f[0][4] != 0, (
        "a write of the dead master's reservation was applied", seg_id, f)
