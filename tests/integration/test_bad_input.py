"""Hostile bytes to every port — master RPC, master HTTP (metrics, health,
embedded metadata), a node's transfer server, the standalone metadata
service — garbage, oversize lengths, truncated frames, unknown types, wrong
secrets: each bad connection is closed (or refused with an error), the
servers keep running, and a follow-up put/get works."""
import json
import os
import socket
import struct

from conftest import row, segments_of
import kvswire as w

SECRET = "it-secret-1"
MAX_BODY = 64 << 20


def abuse_frames(port, secret, transfer=False):
    """Sends a series of malformed frames, each on its own connection, and
    checks that each connection is closed (or answered with an error).
    Returns sockets left open half-way (they must not stall the server)."""
    hang = []

    def fresh(read_challenge=True):
        s = w.connect(port)
        if read_challenge:
            w.read_challenge(s)
        return s

    # 1. random garbage right away
    s = fresh()
    w.send_quietly(s, os.urandom(8192))
    assert w.closed_within(s), "garbage did not close the connection (port %d)" % port
    s.close()
    # 2. garbage before even reading the challenge, then abrupt close (RST)
    s = fresh(read_challenge=False)
    w.send_quietly(s, b"GET / HTTP/1.1\r\n\r\n" + b"\xff" * 100)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    # 3. bad magic
    s = fresh()
    w.send_quietly(s, w.frame(w.HELLO, b"x" * 10, magic=0xDEADBEEF))
    assert w.closed_within(s)
    s.close()
    # 4. oversize lengths: u32 max, and one byte over the limit
    for n in (0xFFFFFFFF, MAX_BODY + 1, 0x80000000):
        s = fresh()
        w.send_quietly(s, w.frame(w.HELLO, b"", body_len=n) + b"\0" * 64)
        assert w.closed_within(s), "oversize body_len %d not refused" % n
        s.close()
    # 5. unknown message types, and a response flag from a client
    for t in (0, 999, 0xFFFF, w.CHALLENGE):
        s = fresh()
        w.send_quietly(s, w.frame(t, b"\0" * 8))
        assert w.closed_within(s), "type %d accepted before HELLO" % t
        s.close()
    # 6. a real request before HELLO
    s = fresh()
    req = w.frame(w.T_READ, w.u32(1) + w.u64(0) + w.u64(16) + w.u64(0)) if transfer else \
        w.frame(w.EXISTS, w.u32(1) + w.wbytes(b"k"))
    w.send_quietly(s, req)
    assert w.closed_within(s), "request before HELLO accepted"
    s.close()
    # 7. truncated HELLO body then EOF, and one left hanging mid-frame
    s = fresh()
    w.send_quietly(s, w.frame(w.HELLO, b"\1\0\0\0", body_len=100))
    s.shutdown(socket.SHUT_WR)
    assert w.closed_within(s)
    s.close()
    s = fresh()
    w.send_quietly(s, w.frame(w.HELLO, b"\1\0", body_len=100))
    hang.append(s)
    s = w.connect(port)  # and one that never says anything
    hang.append(s)
    # 8. HELLO with a malformed body (string length past the end)
    s = fresh()
    w.send_quietly(s, w.frame(w.HELLO, w.u32(1) + w.u32(3) + w.u64(1) + w.u32(0) + w.u32(1 << 30)))
    assert w.closed_within(s)
    s.close()
    # 9. wrong secret, and no secret
    for sec in ("wrong-" + secret, None):
        s = w.connect(port)
        _, nonce = w.read_challenge(s)
        w.send_quietly(s, w.frame(w.HELLO, w.hello_body(nonce, sec)))
        f = None
        try:
            f = w.read_frame(s)
        except OSError:
            pass
        if f is not None:
            assert f[0][4] == w.ERR_AUTH, "wrong secret answered with status %d" % f[0][4]
        assert w.closed_within(s), "wrong secret left the connection open"
        s.close()
    # 10. authenticated, then absurd requests
    bad_after_hello = []
    if transfer:
        bad_after_hello = [
            w.frame(w.T_READ, w.u32(1) + w.u64(1 << 60) + w.u64(4096) + w.u64(0)),  # out of bounds
            w.frame(w.T_READ, w.u32(1) + w.u64(0) + w.u64(1 << 40) + w.u64(0)),     # len > chunk
            w.frame(w.T_WRITE, w.u32(1) + w.u64(1 << 62) + w.u64(8) + w.u64(1) + b"\0" * 8),
            w.frame(w.T_WRITE, w.u32(1) + w.u64(0) + w.u64(4096) + w.u64(1) + b"\0" * 10),  # short payload
            w.frame(w.T_READ, w.u32(1) + w.u64(0)),                          # short body
        ]
    else:
        bad_after_hello = [
            w.frame(w.GET, w.u64(1) + w.u32(0xFFFFFFFF)),                    # absurd count
            w.frame(w.PUT_START, w.u64(1) + w.u32(1) + w.u32(1 << 20) + b"k"),  # key past end
            w.frame(w.EXISTS, w.u32(2) + w.wbytes(b"k")),                    # count > entries
            w.frame(w.EXISTS, w.u32(1) + w.wbytes(b"k") + b"trailing"),      # trailing bytes
            w.frame(w.PUT_START, w.u64(1) + w.u32(1) + w.wbytes(b"k") + w.u64(1 << 62)),
            w.frame(w.T_READ, w.u32(1) + w.u64(0) + w.u64(16) + w.u64(0)),   # wrong server
        ]
    for req in bad_after_hello:
        s, st = w.handshake(port, secret)
        assert st == 0, "valid HELLO refused: %d" % st
        w.send_quietly(s, req)
        # either an error reply or a closed connection; never a crash
        try:
            s.settimeout(5)
            f = w.read_frame(s)
        except OSError:
            f = None
        if f is not None and f[0][4] == 0 and f[0][1] not in (w.PUT_START,):
            raise AssertionError("malformed request answered OK: %r" % (f[0],))
        s.close()
    # 11. a burst of connections dropped at once
    socks = [w.connect(port) for _ in range(100)]
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    return hang


def abuse_http(port, secret=None):
    """Hostile HTTP; `secret` (the master's) is sent where the bytes must get
    past the credential check to reach the parser behind it."""
    hang = []
    st, _ = w.http_request(port, os.urandom(4096), half_close=True)
    assert st in (None, 400, 405, 505), st
    st, _ = w.http_request(port, b"GET /" + b"A" * 200000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert st in (None, 400, 404, 414, 431), st
    st, _ = w.http_request(port, b"GET / HTTP/1.1\r\n" + b"X-Junk: " + b"B" * 100000 + b"\r\n\r\n")
    assert st in (None, 400, 404, 413, 431), st
    st, _ = w.http_request(port, b"PUT /metadata?key=big HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 99999999999\r\n\r\n" + b"x" * 1000)
    assert st in (None, 400, 413), st
    st, _ = w.http_request(port, b"PUT /metadata?key=t HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 100\r\n\r\nabc", half_close=True)  # truncated
    st, _ = w.http_request(port, b"PUT /metadata?key=c HTTP/1.1\r\nHost: x\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nxx",
                           half_close=True, timeout=1.0)
    st, _ = w.http(port, "BREW", "/metadata?key=k", secret=secret)
    assert st in (None, 400, 405, 501), st
    st, _ = w.http(port, "GET", "/metadata?key=%ff%00%zz", secret=secret)
    assert st in (None, 200, 400, 404), st
    st, _ = w.http(port, "PUT", "/metadata?key=" + "k" * 10000, b"{}", secret=secret)
    assert st in (None, 400, 413, 414, 431), st
    s = w.connect(port)
    w.send_quietly(s, b"PUT /metadata?key=slow HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
    hang.append(s)
    return hang


def check_http_serving(port, health=True, secret=None):
    if health:
        st, body = w.http(port, "GET", "/health")
        assert st == 200, (st, body)
    st, body = w.http(port, "PUT", "/metadata?key=after-abuse", b'{"ok": 1}', secret=secret)
    assert st == 200, (st, body)
    st, body = w.http(port, "GET", "/metadata?key=after-abuse", secret=secret)
    assert st == 200 and json.loads(body) == {"ok": 1}, (st, body)


def start_metadata(kv):
    pf = kv.dir / "metadata.port"
    p = kv.spawn("metadata", [kv.bin, "metadata", "--addr", "127.0.0.1:0", "--port-file", pf])
    kv.wait_for(lambda: pf.exists() and pf.read_text().strip(), 10, "metadata port file", proc=p)
    return p, json.loads(pf.read_text())["http"]


def test_hostile_bytes_to_every_port(kv):
    m = kv.start_master(secret=SECRET)
    node = kv.start_node(m, "64M")
    md, md_port = start_metadata(kv)
    segs = segments_of(kv.status(m))
    assert len(segs) == 1
    xfer_port = int(segs[0]["transfer_addr"].rsplit(":", 1)[1])

    hang = []
    hang += abuse_frames(m.rpc, SECRET)
    hang += abuse_frames(xfer_port, SECRET, transfer=True)
    hang += abuse_http(m.http, SECRET)
    hang += abuse_http(md_port)

    # everyone is alive and serving, with the half-open connections still open
    for p in (m.proc, node, md):
        assert p.alive(), "%s died:\n%s" % (p.name, p.log_text())
    r = kv.bench(m, "--mode", "put,get,exists", "--sizes", "64K", "--count", 200, "--verify")
    assert r["fatal"] == 0 and r["totals"]["errors"] == 0 and r["totals"]["mismatches"] == 0
    assert row(r, "get")["ok"] == 200
    check_http_serving(m.http, secret=SECRET)
    check_http_serving(md_port)
    # the node's transfer server still reads its segment for an honest peer
    s, st = w.handshake(xfer_port, SECRET)
    assert st == 0
    s.sendall(w.frame(w.T_READ, w.u32(segs[0]["id"] if "id" in segs[0] else segs[0]["segment_id"])
                      + w.u64(0) + w.u64(4096) + w.u64(0), req_id=7))
    f = w.read_frame(s)
    assert f is not None and f[0][4] == 0 and f[0][5] == 7 and len(f[1]) == 4096, f and f[0]
    s.close()
    for s in hang:
        s.close()


def test_wrong_secret_is_refused(kv):
    m = kv.start_master(secret=SECRET)
    kv.start_node(m, "32M")
    r = kv.bench(m, "--mode", "put", "--count", 10, secret="not-the-secret")
    assert r["_rc"] != 0 and r["fatal"] > 0
    assert "AUTH" in (r.get("fatal_message") or ""), r.get("fatal_message")
    r = kv.bench(m, "--mode", "put", "--count", 10, secret="")
    assert r["_rc"] != 0
    # a node with the wrong secret never mounts its segment
    bad = kv.start_node(m, "32M", name="bad-node", secret="nope", wait=False)
    bad.expect_failure = True
    try:
        rc = bad.p.wait(timeout=10)
    except Exception:
        rc = None
    assert rc not in (None, 0), "a node with the wrong secret kept running (rc %s)" % rc
    assert "AUTH" in bad.log_text().upper() or "secret" in bad.log_text().lower(), bad.log_text()
    assert len(segments_of(kv.status(m))) == 1
    ok = kv.bench(m, "--mode", "put,get", "--count", 50, "--verify")
    assert ok["_rc"] == 0 and row(ok, "get")["ok"] == 50
