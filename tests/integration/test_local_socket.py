"""A master with only TCP listeners offers clients on its own host a unix
socket in the CHALLENGE (host tag + path); they switch to it before HELLO.
Checks: the offer is made on TCP and not on the unix socket itself, the
socket is a real listener of the same master, a client's connection really
lands there (counted in /proc/net/unix) and reads and writes work, a client
as from another host stays on TCP, --no-local-socket makes no offer, and the
file goes away with the master."""
import os
import socket
import stat
import struct
import time
from pathlib import Path

import pytest

from conftest import can_fake_other_host, row
import kvswire as w


def challenge_offer(port):
    """(body length, offered unix path or None) of the CHALLENGE on `port`."""
    s = w.connect(port)
    try:
        f = w.read_frame(s)
        assert f is not None
        hdr, body = f
        assert hdr[1] == w.CHALLENGE
        if len(body) == 20:
            return len(body), None
        # u32 flags, u8[16] nonce, u8[32] host tag, u32 length + path
        assert len(body) > 20 + 32 + 4, body
        (n,) = struct.unpack("<I", body[52:56])
        assert len(body) == 56 + n
        return len(body), body[56:].decode()
    finally:
        s.close()


def unix_conns(path):
    """Sockets bound to `path` in /proc/net/unix (the listener and every
    connection the master accepted on it)."""
    n = 0
    with open("/proc/net/unix") as f:
        for line in f:
            if line.rstrip().endswith(" " + path):
                n += 1
    return n


def settled_conns(kv, path, want):
    """unix_conns(path) once it is `want`: connections of the `kvshelf status`
    commands the harness ran may still be open on the master's side for a
    moment after those commands exited."""
    kv.wait_for(lambda: unix_conns(path) == want, 5, "%d sockets on %s" % (want, path),
                interval=0.01)
    return want


def test_same_host_client_switches_to_unix_socket(kv):
    m = kv.start_master()
    _, path = challenge_offer(m.rpc)
    assert path, "the master offered no unix socket on TCP"
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert Path(path).name == "master-%d-%d.sock" % (m.rpc, m.proc.p.pid)
    # the unix socket is the same master; it makes no offer of itself
    us = socket.socket(socket.AF_UNIX)
    us.settimeout(5)
    us.connect(path)
    f = w.read_frame(us)
    us.close()
    assert f is not None and f[0][1] == w.CHALLENGE and len(f[1]) == 20

    kv.start_node(m, segment_size="64M")
    base = settled_conns(kv, path, 2)  # the listener and the node
    # a long-running client: its master connection must be a unix one
    p = kv.bench_bg(m, "--mode", "rw", "--sizes", "64K", "--count", 64, "--duration", 3,
                         "--verify", "--segment-size", 0)
    kv.wait_for(lambda: unix_conns(path) > base, 10, "a client connection on %s" % path,
                     proc=p, interval=0.01)
    d = kv.bench_result(p)
    assert d["_rc"] == 0, d
    assert row(d, "rw_get")["ok"] > 0
    assert d["totals"]["mismatches"] == 0 and d["totals"]["errors"] == 0, d["totals"]

    m.proc.stop()
    assert not os.path.exists(path), "the master left its unix socket behind"


def test_no_local_socket_option(kv):
    m = kv.start_master(extra=["--no-local-socket"])
    n, path = challenge_offer(m.rpc)
    assert path is None and n == 20
    d = kv.bench(m, "--mode", "put,get", "--sizes", "4K", "--count", 16,
                      "--segment-size", "16M", "--verify")
    assert d["_rc"] == 0, d


def test_switch_can_be_refused_by_the_client(kv):
    m = kv.start_master()
    _, path = challenge_offer(m.rpc)
    base = settled_conns(kv, path, 1)  # the listener
    env = dict(kv.env, KVSHELF_NO_LOCAL_SOCKET="1")
    p = kv.bench_bg(m, "--mode", "rw", "--sizes", "4K", "--count", 16, "--duration", 2,
                         "--segment-size", "16M", env=env)
    time.sleep(1.0)
    assert unix_conns(path) == base, "KVSHELF_NO_LOCAL_SOCKET=1 still used the unix socket"
    assert kv.bench_result(p)["_rc"] == 0


@pytest.mark.other_host
def test_other_host_client_stays_on_tcp(kv):
    if not can_fake_other_host():
        pytest.skip("needs unshare -m (root) to fake another host id")
    m = kv.start_master()
    _, path = challenge_offer(m.rpc)
    kv.start_node(m, segment_size="64M")
    base = settled_conns(kv, path, 2)  # the listener and the node
    p = kv.bench_bg(m, "--mode", "rw", "--sizes", "64K", "--count", 32, "--duration", 2,
                         "--verify", other_host=True)
    time.sleep(1.0)
    assert unix_conns(path) == base, "a client of another host id used the unix socket"
    d = kv.bench_result(p)
    assert d["_rc"] == 0, d
