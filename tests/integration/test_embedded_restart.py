"""The embedded pool and the nodes across a kill -9 of their master (issue 17,
"The embedded pool too" and "a node restarted during the rebuild").

Shown here with real processes (the embedded pool's master, started by a
client; a TCP master and two nodes; `kvshelf bench --verify` checking every
byte; raw protocol frames for a put left half-written):
  - the embedded pool's master killed with kill -9: the next client starts a
    new one, which adopts the old segment (its memory still in /dev/shm,
    the same shm name) with its directory; every object complete before the
    kill is a hit again within RECOVERY_S, byte-exact; an object reserved
    and not committed at the kill is never served, and the dead master's
    reservations cannot write any more (the segment was fenced before it
    was mounted again); puts in flight at the kill are hits with their own
    bytes or misses, never wrong bytes;
  - a node killed and restarted while a restarted master is still collecting
    directories: the rebuild completes, no read is wrong, the surviving
    node's objects are hits, the restarted node's objects are misses (a node
    creates a new segment when it starts: its directory lived in the old
    segment, which nobody adopts; only the embedded pool adopts).
"""
import os
import signal
import struct
import time
from pathlib import Path

import kvswire as w
from conftest import directories_settled, recovery, row, segments_of

# the new pool starts in well under a second; its own segment is mounted
# with its directory a few ms later: generous for a loaded 2-core machine
RECOVERY_S = 15


def embedded_env(kv, size="256M"):
    env = dict(kv.env)
    env["KVSHELF_GLOBAL_SEGMENT_SIZE"] = size
    return env


def pool_dir(kv):
    return Path(kv.env["KVSHELF_RUNTIME_DIR"])


def master_pid(kv):
    """The embedded master's pid, from its runtime directory."""
    try:
        return int((pool_dir(kv) / "master.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def quiet(kv, env, t0):
    """Waits out the quiet time of a restarted pool: the adopted memory
    takes no placements for one read lease (the dead master's leases may
    still run), counted from its adoption, which comes after t0 (before the
    new pool started) by however long the pool took to start: after one
    lease from t0, small probe puts (new keys each) until one lands."""
    lease_s = kv.status(env=env)["lease_ms"] / 1000.0
    time.sleep(max(0.0, t0 + lease_s + 0.5 - time.time()))
    for k in range(200):
        p = kv.bench(None, "--mode", "put", "--sizes", "4K", "--count", 1, "--prefix",
                     "quiet%d-%d" % (os.getpid(), k), env=env)
        clean(p, "probe put")
        if row(p, "put")["ok"] == 1:
            return
        assert time.time() - t0 < lease_s + 20, ("no put landed after the quiet time", row(p, "put"))
        time.sleep(0.2)


def no_sanitizer_reports(kv):
    """The pool's masters log to DIR/master.log (not a harness process)."""
    text = (pool_dir(kv) / "master.log").read_text(errors="replace")
    for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
        assert marker not in text, text[-4000:]


def clean(rep, what):
    assert rep["fatal"] == 0, (what, rep.get("fatal_message"), rep["totals"])
    assert rep["totals"]["mismatches"] == 0, (what, rep["totals"])  # 0 wrong bytes


def locate(s, cid, keys, req_id):
    """GET of each key: [(status, segment id)]."""
    body = w.u64(cid) + w.u32(len(keys)) + b"".join(w.wbytes(k) for k in keys)
    status, rbody = w.call(s, w.GET, body, req_id)
    assert status == 0, status
    (n,) = struct.unpack("<I", rbody[:4])
    assert n == len(keys)
    out, pos = [], 4
    for _ in range(n):
        st, _size, seg, _off, _obj, _lease = struct.unpack("<iQIQQQ", rbody[pos:pos + 40])
        out.append((st, seg))
        pos += 40
    return out


def xfer_port(seg):
    return int(seg["transfer_addr"].rsplit(":", 1)[1])


def test_embedded_pool_adopts_its_segment_after_kill9(kv):
    env = embedded_env(kv)
    done = ["--sizes", "4K-256K", "--count", 300, "--prefix", "emb", "--verify", "--keep"]
    p = kv.bench(None, "--mode", "put", "--batch", 8, *done, env=env)
    clean(p, "put")
    assert row(p, "put")["ok"] == 300
    old_pid = master_pid(kv)
    assert old_pid and old_pid in kv.embedded_pids(), (old_pid, kv.embedded_pids())
    kv.wait_for(lambda: directories_settled(kv, None, 1, env=env), 10,
                "the pool segment's directory to list every object")
    before = kv.status(env=env)
    seg = segments_of(before)[0]
    shm = seg["shm_name"]
    assert (pool_dir(kv) / "pool.segment").read_text().strip() == shm

    # a put left half-written at the kill: reserved, half its bytes written
    # through the transfer engine, never committed; and one fully written
    # but never committed
    secret = w.pool_secret(str(pool_dir(kv)))
    s, cid = w.tool_hello(w.connect_unix(str(pool_dir(kv) / "master.sock")), secret)
    t, (_, off, epoch) = w.put_half_written(s, cid, xfer_port(seg), secret)
    s.close()
    t.close()

    # puts in flight at the kill: a writer that keeps putting (and verifies
    # what it reads back later), killed under it
    # (small objects, so that the pool never fills and evicts: every miss
    # below is then a put that was not complete at the kill)
    fly = ["--sizes", "4K-8K", "--count", 15000, "--prefix", "fly", "--verify", "--keep"]
    wr = kv.bench_bg(None, "--mode", "put", "--timeout-ms", 3000, *fly, env=env)
    kv.wait_for(lambda: (kv.status(env=env) or {}).get("objects", 0) >= 400, 30,
                "the writer to have put 100 objects", proc=wr)

    os.kill(old_pid, signal.SIGKILL)
    t0 = time.time()
    kv.wait_for(lambda: old_pid not in kv.embedded_pids(), 5, "the killed master to be gone")
    # its memory is still there, named as before
    assert (Path("/dev/shm") / shm).exists(), "the killed pool's segment left /dev/shm"

    # the next client (this reader, or the writer) starts a new pool, which
    # adopts the old segment: every object complete before the kill is a hit
    # again within RECOVERY_S
    took = None
    while time.time() - t0 < RECOVERY_S:
        g = kv.bench(None, "--mode", "get", *done, env=env)
        clean(g, "get after the kill")
        if row(g, "get")["ok"] == 300:
            took = time.time() - t0
            break
        time.sleep(0.1)
    assert took is not None, "objects were not hits again within %ss: %s" % (
        RECOVERY_S, row(g, "get"))
    wrep = kv.bench_result(wr)  # errors allowed around the kill; wrong bytes never
    assert wrep["fatal"] == 0, wrep.get("fatal_message")
    new_pid = master_pid(kv)
    assert new_pid and new_pid != old_pid
    st = kv.status(env=env)
    segs = segments_of(st)
    assert len(segs) == 1 and segs[0]["shm_name"] == shm, (shm, segs)  # adopted, not new
    rec = recovery(st)
    assert rec["objects_recovered"] >= 300, rec
    assert rec["entries_refused"] == 0, rec
    log = (pool_dir(kv) / "master.log").read_text(errors="replace")
    adopted = [l for l in log.splitlines() if "adopted the segment" in l or "handed to the" in l]
    assert adopted, log[-3000:]
    print("embedded pool: 300 objects hits again %.2f s after kill -9 (%d objects taken "
          "back; writer: %d puts ok, %d errors)\n  %s" % (
              took, rec["objects_recovered"], row(wrep, "put")["ok"], wrep["totals"]["errors"],
              "\n  ".join(adopted)))

    # the puts in flight at the kill: each one a hit with its own bytes or a miss
    gf = kv.bench(None, "--mode", "get", *fly, env=env)
    clean(gf, "get of the puts in flight")
    # (a put acknowledged in the last few ms before the kill, its listing not
    # yet in the directory, is a miss: ARCHITECTURE.md "Windows left by design")
    assert row(gf, "get")["ok"] >= row(wrep, "put")["ok"] - 500, (row(gf, "get"), row(wrep, "put"))
    print("puts in flight: %d acknowledged, %d hits after the restart, %d misses, 0 wrong" % (
        row(wrep, "put")["ok"], row(gf, "get")["ok"], row(gf, "get")["miss"]))

    # the half-written ones are never served
    s2, cid2 = w.tool_hello(w.connect_unix(str(pool_dir(kv) / "master.sock")), secret)
    for st, _ in locate(s2, cid2, [b"half", b"full"], 4):
        assert st == -3, st  # KVS_ERR_NOT_FOUND: a miss
    # and the dead master's reservations cannot write any more: the segment
    # was fenced past their epoch before it was mounted again
    seg2 = segments_of(kv.status(env=env))[0]
    t2, tst = w.handshake(xfer_port(seg2), secret)
    assert tst == 0, tst
    w.assert_late_write_refused(t2, seg2["id"], off + (128 << 10), epoch, 5)
    t2.close()
    s2.close()

    # the pool goes on: new objects land and read back (after the quiet time
    # of a restart: one read lease of the dead master, from the adoption on)
    quiet(kv, env, t0)
    fr = kv.bench(None, "--mode", "put,get", "--sizes", "4K-256K", "--count", 100, "--prefix",
                  "fresh", "--verify", "--keep", env=env)
    clean(fr, "fresh")
    assert row(fr, "put")["ok"] == 100 and row(fr, "get")["ok"] == 100

    # `kvshelf stop` still ends it, and the adopted segment leaves /dev/shm
    r = kv.run("stop", env=env)
    assert r.returncode == 0, r.stderr
    kv.wait_for(lambda: not kv.embedded_pids(), 10, "the embedded master to exit")
    assert not (Path("/dev/shm") / shm).exists(), "the adopted segment stayed in /dev/shm"
    no_sanitizer_reports(kv)


def test_embedded_pool_second_kill9(kv):
    """Two kills in a row: the pool adopts the same segment twice (a gc of
    another process in between keeps it), and the objects put between the
    kills come back too."""
    env = embedded_env(kv, "64M")
    a = ["--sizes", "4K-128K", "--count", 100, "--prefix", "k1", "--verify", "--keep"]
    b = ["--sizes", "4K-128K", "--count", 100, "--prefix", "k2", "--verify", "--keep"]
    clean(kv.bench(None, "--mode", "put", *a, env=env), "put a")
    shm = segments_of(kv.status(env=env))[0]["shm_name"]
    for i, sets in enumerate(((a,), (a, b))):
        kv.wait_for(lambda: directories_settled(kv, None, 1, env=env), 10,
                    "the directory to settle")
        pid = master_pid(kv)
        os.kill(pid, signal.SIGKILL)
        kv.wait_for(lambda: pid not in kv.embedded_pids(), 5, "the killed master to be gone")
        if i == 0:
            # another process's gc runs meanwhile (a node creating its segment
            # removes the files of dead owners): it keeps the pool's segment
            # (old enough for the gc: it leaves files younger than 2 s alone)
            age = time.time() - (Path("/dev/shm") / shm).stat().st_ctime
            time.sleep(max(0.0, 2.5 - age))
            m = kv.start_master(secret="gc-test")
            kv.start_node(m, "16M", name="gc-node")
            assert (Path("/dev/shm") / shm).exists(), "a gc removed the killed pool's segment"
        t0 = time.time()  # the next client starts the new pool now
        for args in sets:
            while True:
                g = kv.bench(None, "--mode", "get", *args, env=env)
                clean(g, "get after kill %d" % (i + 1))
                if row(g, "get")["ok"] == 100:
                    break
                assert time.time() - t0 < RECOVERY_S, row(g, "get")
                time.sleep(0.1)
        assert segments_of(kv.status(env=env))[0]["shm_name"] == shm
        if i == 0:
            quiet(kv, env, t0)  # then b lands in the adopted segment
            pb = kv.bench(None, "--mode", "put", *b, env=env)
            clean(pb, "put b")
            assert row(pb, "put")["ok"] == 100, row(pb, "put")
    r = kv.run("stop", env=env)
    assert r.returncode == 0, r.stderr
    kv.wait_for(lambda: not kv.embedded_pids(), 10, "the embedded master to exit")
    assert not (Path("/dev/shm") / shm).exists(), "the adopted segment stayed in /dev/shm"
    no_sanitizer_reports(kv)


SECRET = "restart-node-secret"
HEALTHY_TTL_MS = 10000
LEASE_MS = 1000


def test_node_restarted_during_the_rebuild(kv):
    m = kv.start_master(ttl_ms=HEALTHY_TTL_MS, secret=SECRET, lease_ms=LEASE_MS)
    kv.start_node(m, "64M", name="node-a")
    # set A while node-a is the only segment: every object on node-a
    sa = ["--sizes", "4K-128K", "--count", 150, "--prefix", "na", "--verify", "--keep"]
    clean(kv.bench(m, "--mode", "put", *sa), "put A")
    nb = kv.start_node(m, "64M", name="node-b")
    sb = ["--sizes", "4K-128K", "--count", 150, "--prefix", "nb", "--verify", "--keep"]
    clean(kv.bench(m, "--mode", "put", *sb), "put B")
    kv.wait_for(lambda: directories_settled(kv, m, 2), 10, "the directories to settle")
    # which node holds each key (GET names the segment): set A is all on node-a
    s, cid = w.tool_hello(w.connect(m.rpc), SECRET)
    la = locate(s, cid, [("na/4K-128K/%d" % i).encode() for i in range(150)], 2)
    lb = locate(s, cid, [("nb/4K-128K/%d" % i).encode() for i in range(150)], 3)
    s.close()
    assert all(st == 0 for st, _ in la + lb), (la, lb)
    a_seg = {sid for _, sid in la}
    assert len(a_seg) == 1, a_seg
    on_a = sum(1 for _, sid in lb if sid in a_seg)
    on_b = 150 - on_a
    assert on_b > 0, "no object of set B landed on node-b"

    # kill -9 of the master; the new one waits 8 s for directories
    m.proc.kill()
    kv.env["KVSHELF_RECOVERY_WAIT_MS"] = "8000"
    t0 = time.time()
    m2 = kv.start_master(name="master", listen=m.addr, http=m.http_addr, secret=SECRET,
                         ttl_ms=HEALTHY_TTL_MS, lease_ms=LEASE_MS)
    del kv.env["KVSHELF_RECOVERY_WAIT_MS"]
    # node-b killed and started again while the new master is collecting
    nb.kill()
    st = kv.status(m2)
    assert st and not recovery(st).get("complete"), recovery(st)
    nb2 = kv.start_node(m2, "64M", name="node-b", wait=False)
    # reads during the rebuild: misses allowed, wrong bytes never
    for args in (sa, sb):
        clean(kv.bench(m2, "--mode", "get", *args), "get during the rebuild")
    st = kv.status(m2)
    assert not recovery(st).get("complete"), ("the rebuild ended before node-b came back",
                                               recovery(st))

    def done():
        st = kv.status(m2)
        return bool(st) and len(segments_of(st)) == 2 and recovery(st).get("complete")
    kv.wait_for(done, 30, "the rebuild to complete with node-a and the new node-b", proc=nb2)
    took = time.time() - t0
    st = kv.status(m2)
    rec = recovery(st)
    assert rec["state"] == "complete" and rec["segments_pending"] == 0, rec
    # node-a's objects are hits, byte-exact; node-b's are misses: the new
    # node-b process has a new, empty segment (its directory lived in the
    # old one, which died with the process)
    ga = kv.bench(m2, "--mode", "get", *sa)
    clean(ga, "get A")
    assert row(ga, "get")["ok"] == 150, row(ga, "get")
    gb = kv.bench(m2, "--mode", "get", *sb)
    clean(gb, "get B")
    assert row(gb, "get")["ok"] == on_a and row(gb, "get")["miss"] == on_b, (
        row(gb, "get"), on_a, on_b)
    assert st["objects"] == 150 + on_a, (st["objects"], on_a)
    print("node restarted during the rebuild: complete %.1f s after the restart (wait 8 s); "
          "node-a: %d hits, node-b: %d misses" % (took, 150 + on_a, on_b))
    # the pool goes on with both nodes
    time.sleep(LEASE_MS / 1000.0)
    fr = kv.bench(m2, "--mode", "put,get", "--sizes", "4K-256K", "--count", 100, "--prefix",
                  "fr", "--verify", "--keep")
    clean(fr, "fresh")
    assert row(fr, "put")["ok"] == 100 and row(fr, "get")["ok"] == 100
