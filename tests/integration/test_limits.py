"""Bounded resources (issue 12, items 6 and 7), with real processes on
loopback:

- a master and a node under `ulimit -n 64` flooded with connections neither
  spin (CPU time they consume, read from /proc/PID/stat, stays low) nor flood
  their log, and serve a legitimate client while the flood's connections are
  still held open;
- 1,024 idle connections to a node's transfer port do not create 1,024
  threads (/proc/PID/status) and do not lock other clients out;
- a client calling in a loop while the master is away fails at a bounded
  rate, and no call takes much longer than its timeout;
- a get against a stopped (SIGSTOP) node fails within its timeout, not two;
- a node killed with SIGKILL leaves the pool long before the TTL, its shared-
  memory file is removed, and later puts go elsewhere and stay readable.
"""
import json
import os
import resource
import signal
import socket
import time
from pathlib import Path

import pytest

import kvswire
from conftest import Master, row, segments_of

SECRET = "limits-secret-1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SHM = Path("/dev/shm")


# ------------------------------------------------------------------ helpers
def cpu_seconds(pid):
    """utime + stime of a process, in seconds (/proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def thread_count(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line for pid %d" % pid)


def log_size(proc):
    return proc.log_path.stat().st_size


@pytest.fixture
def many_fds():
    """Lets this test process hold a few thousand sockets (the flooder)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip("RLIMIT_NOFILE hard limit %d < %d" % (hard, want))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def limited(nofile, args):
    """argv running args with RLIMIT_NOFILE = nofile (soft and hard)."""
    return ["sh", "-c", 'ulimit -n %d && exec "$@"' % nofile, "sh"] + [str(a) for a in args]


def start_limited_master(kv, nofile, extra=(), ttl_ms=10000):
    """A master (secret SECRET) whose process may open only `nofile` files."""
    pf = kv.dir / "master.port"
    args = [kv.bin, "master", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
            "--port-file", pf, "--client-ttl-ms", ttl_ms, "--secret", SECRET] + list(extra)
    p = kv.spawn("master", limited(nofile, args))
    deadline = time.time() + 15
    while time.time() < deadline:
        assert p.alive(), "master exited (%s):\n%s" % (p.p.returncode, p.log_text())
        try:
            d = json.loads(pf.read_text())
            if d.get("rpc"):
                return Master(p, int(d["rpc"]), int(d["http"]), SECRET, args)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("master did not write its port file")


def flood(port, n):
    """Opens n TCP connections to port as fast as possible (non-blocking
    connects: a server that stopped accepting does not stall the flooder)
    and returns the sockets, held open, never written to."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def close_all(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def assert_clean(rep, what):
    assert rep["fatal"] == 0, (what, rep.get("fatal_message"), rep["totals"])
    assert rep["totals"]["mismatches"] == 0, (what, rep["totals"])
    assert rep["totals"]["errors"] == 0, (what, [(r["mode"], r["error_codes"])
                                                 for r in rep["results"]])
    assert rep["_rc"] == 0, (what, rep["_rc"])


def transfer_port(kv, m):
    st = kv.status(m)
    assert st is not None
    segs = segments_of(st)
    assert len(segs) == 1, segs
    addr = segs[0].get("transfer_addr") or segs[0].get("transfer")
    assert addr, segs[0]
    return int(addr.rsplit(":", 1)[1])


def stop_checked(p):
    """SIGTERM; the daemon must exit 0 (problems() skips wrapped commands)."""
    rc = p.stop()
    assert rc == 0 and not p.forced, "%s exited with %s:\n%s" % (p.name, rc, p.log_text())


# ------------------------------------------------------------------ master
def test_master_flood_at_fd_limit(kv, many_fds):
    """A master with 64 descriptors and 2,000 connections thrown at it (held
    open, never saying HELLO): it neither spins nor floods its log, and a
    real client is served while those connections are still open."""
    m = start_limited_master(kv, 64)
    kv.start_node(m, "64M")
    cpu0, log0 = cpu_seconds(m.proc.pid), log_size(m.proc)
    socks = flood(m.rpc, 2000)
    try:
        time.sleep(4.0)
        cpu = cpu_seconds(m.proc.pid) - cpu0
        grown = log_size(m.proc) - log0
        assert m.proc.alive()
        # a master spinning on EMFILE burns ~4 s of CPU here, and writes MBs
        assert cpu < 1.0, "master used %.2f s of CPU in 4 s of flood" % cpu
        assert grown < 100 * 1024, "master log grew by %d bytes" % grown
        args = ["--sizes", "4K-64K", "--count", 200, "--prefix", "mf", "--verify"]
        rep = kv.bench(m, "--mode", "put,get", *args, timeout=60)
        assert_clean(rep, "client during the flood")
        assert row(rep, "get")["ok"] == 200
    finally:
        close_all(socks)
    assert log_size(m.proc) - log0 < 100 * 1024
    stop_checked(m.proc)


@pytest.mark.parametrize("max_conns", [None, 1000])
def test_master_authenticated_flood_at_fd_limit(kv, many_fds, max_conns):
    """Authenticated connections (HELLO done) until the master has no room
    left: by default it refuses the surplus at once (its connection limit
    is derived from the descriptor limit); with a limit above what the
    descriptors allow (--max-conns 1000) accept meets EMFILE, and the master
    pauses accepting instead of spinning. Either way: little CPU, a small
    log, and once those connections close a client is served again."""
    extra = ["--max-conns", max_conns] if max_conns else []
    m = start_limited_master(kv, 64, extra)
    kv.start_node(m, "64M")
    cpu0, log0 = cpu_seconds(m.proc.pid), log_size(m.proc)
    held, refused = [], 0
    for _ in range(120):
        s = None
        try:
            s = kvswire.connect(m.rpc, timeout=1.0)
            _, nonce = kvswire.read_challenge(s)
            s.sendall(kvswire.frame(kvswire.HELLO, kvswire.hello_body(nonce, SECRET)))
            f = kvswire.read_frame(s)
            assert f is not None and f[0][4] == 0, f
        except (OSError, AssertionError):
            if s is not None:
                s.close()
            refused += 1  # closed at once, or left waiting (no CHALLENGE within 1 s)
            if refused >= 4:
                break
            continue
        held.append(s)
    try:
        assert refused >= 1, "the master accepted all of %d authenticated connections" % len(held)
        assert len(held) >= 10
        time.sleep(3.0)
        cpu = cpu_seconds(m.proc.pid) - cpu0
        assert cpu < 1.0, "master used %.2f s of CPU while full" % cpu
        assert log_size(m.proc) - log0 < 100 * 1024
        # the path taken: out of descriptors (paused), or at the limit (refused)
        want = "not accepting for" if max_conns else "refusing a new one"
        assert want in m.proc.log_text(), m.proc.log_text()
    finally:
        close_all(held)
    args = ["--sizes", "16K", "--count", 100, "--prefix", "ma", "--verify"]
    rep = kv.bench(m, "--mode", "put,get", *args, timeout=60)
    assert_clean(rep, "client after the flood")
    assert log_size(m.proc) - log0 < 100 * 1024
    stop_checked(m.proc)


# ------------------------------------------------------------------ node
def test_node_flood_at_fd_limit(kv, many_fds):
    """A node with 64 descriptors, 2,000 connections thrown at its transfer
    port and held: it does not spin, its log stays small, and a client on
    'another host' (bytes through that transfer server) reads its objects
    back byte-exact while the connections are still open."""
    m = kv.start_master(secret=SECRET, ttl_ms=10000)
    node = kv.spawn("node", limited(64, [kv.bin, "node", "--master", m.addr, "--segment-size",
                                         "64M", "--secret", SECRET]))
    kv.wait_for(lambda: kv.segment_count(m) == 1, 15, "the node's segment", proc=node)
    args = ["--sizes", "4K-256K", "--count", 150, "--prefix", "nf", "--verify", "--keep"]
    assert_clean(kv.bench(m, "--mode", "put", *args), "put")
    port = transfer_port(kv, m)
    cpu0, log0 = cpu_seconds(node.pid), log_size(node)
    socks = flood(port, 2000)
    try:
        time.sleep(4.0)
        cpu = cpu_seconds(node.pid) - cpu0
        assert node.alive()
        assert cpu < 1.0, "node used %.2f s of CPU in 4 s of flood" % cpu
        assert log_size(node) - log0 < 100 * 1024
        rep = kv.bench(m, "--mode", "get", *args, other_host=True, timeout=60)
        assert_clean(rep, "remote get during the flood")
        assert row(rep, "get")["ok"] == 150
    finally:
        close_all(socks)
    assert log_size(node) - log0 < 100 * 1024
    stop_checked(node)


def test_transfer_idle_connections_bounded(kv, many_fds):
    """1,024 idle connections (no HELLO) to a node's transfer port: the node's
    thread count stays under the connection cap (256 by default) and another
    client's verified remote gets all succeed meanwhile."""
    m = kv.start_master(secret=SECRET, ttl_ms=10000)
    node = kv.start_node(m, "64M")
    args = ["--sizes", "64K", "--count", 100, "--prefix", "idle", "--verify", "--keep"]
    assert_clean(kv.bench(m, "--mode", "put", *args), "put")
    port = transfer_port(kv, m)
    base = thread_count(node.pid)
    socks = flood(port, 1024)
    try:
        peak = 0
        for _ in range(20):
            time.sleep(0.1)
            peak = max(peak, thread_count(node.pid))
        assert peak <= base + 256 + 8, "node has %d threads (%d before)" % (peak, base)
        rep = kv.bench(m, "--mode", "get", *args, other_host=True, timeout=60)
        assert_clean(rep, "remote get with 1,024 idle connections open")
        assert row(rep, "get")["ok"] == 100
        peak = max(peak, thread_count(node.pid))
        assert peak <= base + 256 + 8, "node has %d threads (%d before)" % (peak, base)
        # connections that never say HELLO are closed after the deadline (3 s)
        kv.wait_for(lambda: thread_count(node.pid) <= base + 2, 10,
                    "the idle connections' threads to end")
    finally:
        close_all(socks)


# ------------------------------------------------------------------ client
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_client_backs_off_while_master_away(kv, how):
    """A client reading in a loop (timeout 400 ms) while its master is killed
    (and restarted 3 s later) or stopped with SIGSTOP for 5 s (its heartbeat
    then times out and it reconnects): it fails at a bounded rate (tens per
    second at most, not one per call as fast as it can call), no call takes
    much longer than its timeout, and once a master answers again the calls
    reach it. (`kvshelf bench` itself sleeps 1 ms after a failed call, so an
    unpaced client shows here as ~1,000 errors/s.)"""
    ttl = 10000 if how == "kill" else 6000  # heartbeats every ttl/3
    m = kv.start_master(secret=SECRET, ttl_ms=ttl)
    kv.start_node(m, "64M")
    args = ["--sizes", "4K", "--count", 50, "--prefix", "mo", "--keep"]
    assert_clean(kv.bench(m, "--mode", "put", *args), "put")
    p = kv.bench_bg(m, "--mode", "get", "--duration", 7 if how == "kill" else 9,
                    "--timeout-ms", 400, *args)
    time.sleep(1.5)
    if how == "kill":
        m.proc.kill()
        time.sleep(3.0)
        kv.start_master(name="master", listen=m.addr, http=m.http_addr, secret=SECRET,
                        ttl_ms=ttl)
    else:
        m.proc.signal(signal.SIGSTOP)
        time.sleep(5.0)
        m.proc.signal(signal.SIGCONT)
    rep = kv.bench_result(p, timeout=60)
    assert rep["fatal"] == 0, rep.get("fatal_message")
    r = row(rep, "get")
    tl = rep["timeline"]
    assert r["errors"] > 0, "no call failed while the master was away"
    assert max(tl["err"]) <= 100, "errors per second: %s" % tl["err"]
    assert r["lat_us"]["max"] <= 1.5 * 400 * 1000, "slowest call: %.0f us" % r["lat_us"]["max"]
    # calls reached a master again (a restarted one has no objects: misses)
    assert tl["ok"][-2] + tl["miss"][-2] > 0, "no call reached the master again: %s" % tl


def test_get_from_stopped_node_within_timeout(kv):
    """Remote gets (through the transfer engine, with early reads from
    remembered locations) against a node that is then stopped with SIGSTOP:
    the gets fail, each within its timeout (1 s) plus a margin, not twice
    the timeout."""
    m = kv.start_master(secret=SECRET, ttl_ms=30000)
    node = kv.start_node(m, "64M")
    args = ["--sizes", "64K", "--count", 40, "--prefix", "sn", "--verify", "--keep"]
    assert_clean(kv.bench(m, "--mode", "put", *args), "put")
    p = kv.bench_bg(m, "--mode", "get", "--duration", 6, "--timeout-ms", 1000, *args,
                    other_host=True)
    time.sleep(2.0)
    node.signal(signal.SIGSTOP)
    try:
        rep = kv.bench_result(p, timeout=60)
    finally:
        node.signal(signal.SIGCONT)
    assert rep["totals"]["mismatches"] == 0
    r = row(rep, "get")
    assert r["ok"] > 0 and r["errors"] > 0, (r["ok"], r["errors"], r["error_codes"])
    assert r["lat_us"]["max"] <= 1.5 * 1000 * 1000, "slowest get: %.0f us" % r["lat_us"]["max"]


# ------------------------------------------------------------------ crash
def test_killed_node_leaves_pool_promptly(kv):
    """kill -9 of a node: the master sees its connection close and drops its
    segment within a couple of seconds (TTL 20 s), its shared-memory file is
    removed, and puts made afterwards land on the surviving node and read
    back byte-exact."""
    m = kv.start_master(secret=SECRET, ttl_ms=20000)
    kv.start_node(m, "64M", name="keep")
    victim = kv.start_node(m, "64M", name="victim")
    uid = os.getuid()
    files = list(SHM.glob("kvshelf-%d-%d-*" % (uid, victim.pid)))
    assert files, "no shared-memory file of the victim node"
    t0 = time.time()
    victim.killed = True
    os.kill(victim.pid, signal.SIGKILL)
    victim.p.wait(timeout=10)
    kv.wait_for(lambda: kv.segment_count(m) == 1, 6, "the killed node's segment to leave")
    kv.wait_for(lambda: not any(f.exists() for f in files), 6,
                "the killed node's shared-memory file to be removed")
    assert time.time() - t0 < 10, "well below the TTL"
    args = ["--sizes", "4K-128K", "--count", 200, "--prefix", "kn", "--verify", "--keep"]
    assert_clean(kv.bench(m, "--mode", "put", *args), "put after the crash")
    rep = kv.bench(m, "--mode", "get", *args)
    assert_clean(rep, "get after the crash")
    assert row(rep, "get")["ok"] == 200
    st = kv.status(m)
    assert st["counters"]["disconnected_clients"] >= 1, st["counters"]
