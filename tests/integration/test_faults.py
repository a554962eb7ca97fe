"""Never wrong bytes (issue 12): faults may cost misses and errors, never a
read that returns another key's (or another version's) bytes with KVS_OK.

Every test runs `kvshelf verify` (values that encode their key and version,
rewritten with new versions, every read checked) against a real master and
node(s) while a fault is injected, and asserts wrong == 0 and that the
legitimate work goes on once the fault is over (more hits afterwards):

  a. the deterministic late write: a remote put to a stopped node times out,
     a same-host put of another key takes space in the same segment, the node
     resumes and applies the queued T_WRITE;
  b. under load: a node paused 5 x 3 s; a writer paused past the client TTL
     in the middle of its in-place writes; --put-timeout-ms 20; a node in
     its own network namespace partitioned 5 x 6 s;
  c. /dev/shm too small for the segment asked for: a clear error at start,
     never a SIGBUS later;
  d. two "containers" (PID + mount namespaces, private /dev/shm): both nodes
     are pid 1, their segments must not be confused.

Needs root (signals to other processes, namespaces, mounts); nftables for
the partition (scripts/deps.sh).
"""
import signal
import socket
import time

import pytest

from conftest import segments_of
import faults
from faults import (SECRET, Container, NetNs, ShmNamespace, Verifier, drained, master_counters,
                    need_netns, need_root, need_unshare, no_sigbus, port_of, queued_bytes,
                    remote_env, script, segment_of, summary)

TTL_MS = 1500


def assert_never_wrong(rep, what):
    assert rep.get("wrong", 1) == 0 and rep.get("wrong_bytes", 1) == 0, (
        "%s: %s wrong reads with KVS_OK, %s wrong bytes (foreign %s, stale %s, corrupt %s)" % (
            what, rep.get("wrong"), rep.get("wrong_bytes"), rep.get("foreign"),
            rep.get("stale"), rep.get("corrupt")), summary(rep))
    assert "fatal" not in rep, (what, rep.get("fatal"))


# ------------------------------------------------------------------- a
def test_late_write_to_paused_node_never_lands_on_reused_space(kv):
    """Item 1, deterministic: node stopped (SIGSTOP); a remote 256 KiB put
    (T_WRITE to the node, timeout_ms 1000) times out with its bytes queued in
    the node's socket; a same-host client puts another key into the same
    segment (memcpy, the node is not needed for that); SIGCONT; once the node
    has consumed the queued bytes, the second key reads back its own bytes
    (or misses), never the first key's."""
    need_root()
    m = kv.start_master(ttl_ms=TTL_MS)
    node = kv.start_node(m, "64M")
    seg = segment_of(kv, m)
    xport = port_of(seg["transfer_addr"])
    remote = script(kv, m, "remote", "--timeout-ms", 1000, "--sizes", "64-1M", env=remote_env(kv))
    local = script(kv, m, "local", "--sizes", "64-1M")

    # the remote client's connection to the node's transfer server is up
    assert remote.do("put warm 1 64K")["status"] == "KVS_OK"
    assert remote.do("get warm 1")["result"] == "hit"

    node.signal(signal.SIGSTOP)
    try:
        faults.wait_stopped(node.pid)
        late = remote.do("put A 1 256K")
        assert late["status"] != "KVS_OK", late  # the node cannot answer
        queued = queued_bytes(node.pid, xport)
        assert queued > 0, (
            "the remote put's T_WRITE is not queued at the node (%d bytes): "
            "the scenario did not happen" % queued)
        second = local.do("put B 1 256K")
    finally:
        node.signal(signal.SIGCONT)
    # the node reads the queued T_WRITE (and applies or drops it)
    kv.wait_for(lambda: drained(node.pid, xport), 20,
                "the node to consume the late T_WRITE", proc=node)

    got_local = local.do("get B 1")
    got_remote = remote.do("get B 1")
    for g in (got_local, got_remote):
        # a hit of B's own bytes, a miss or an error: never A's bytes
        assert g["result"] != "wrong", (
            "key B returned %s bytes (%s wrong, header version %s, key match %s): the late "
            "write of key A landed on B's space" % (g.get("kind"), g.get("wrong_bytes"),
                                                    g.get("found_version"), g.get("found_key")),
            second, g)
    # the store goes on: new puts and gets work, here and through the node
    assert local.do("put C 1 256K")["status"] == "KVS_OK"
    assert local.do("get C 1")["result"] == "hit"
    kv.wait_for(lambda: remote.do("get C 1")["result"] == "hit", 30,
                "a remote get through the resumed node", interval=0.2)
    for s in (remote, local):
        assert_never_wrong(s.finish(), s.name)


def test_half_sent_write_does_not_hold_the_fence(kv):
    """A T_WRITE whose payload stops half way (its writer paused or cut off
    mid-send) holds the segment's write fence while its bytes come in; if
    no byte comes for KVSHELF_XFER_STALL_MS the node closes that connection
    and the fence is free again, so the owner can fence (and mount again)
    instead of waiting forever. The store goes on meanwhile."""
    import kvswire as w
    m = kv.start_master(ttl_ms=TTL_MS, secret=SECRET)
    kv.env["KVSHELF_XFER_STALL_MS"] = "1000"
    try:
        node = kv.start_node(m, "64M")
    finally:
        del kv.env["KVSHELF_XFER_STALL_MS"]
    seg = segment_of(kv, m)
    seg_id = seg["id"] if "id" in seg else seg["segment_id"]
    s, st = w.handshake(port_of(seg["transfer_addr"]), SECRET)
    assert st == 0, st
    n = 1 << 20
    head = w.frame(w.T_WRITE, w.u32(seg_id) + w.u64(0) + w.u64(n) + w.u64(1),
                   body_len=28 + n)
    assert w.send_quietly(s, head + b"\x5a" * (n // 2))  # half the payload, then nothing
    t0 = time.time()
    assert w.closed_within(s, 10.0), "the node kept a stalled write (and its fence) open"
    waited = time.time() - t0
    s.close()
    assert waited < 8.0, waited
    assert "payload stalled" in node.log_text(), node.log_text()[-2000:]
    # a payload that trickles in (a byte every 0.4 s, never a stall of 1 s)
    # is cut off too: its whole time is bounded by the stall time plus its
    # length at 1 MB/s (here ~2 s)
    s, st = w.handshake(port_of(seg["transfer_addr"]), SECRET)
    assert st == 0, st
    assert w.send_quietly(s, head + b"\x5a" * 1024)
    t0 = time.time()
    closed = False
    while time.time() - t0 < 10 and not closed:
        time.sleep(0.4)
        closed = not w.send_quietly(s, b"\x5a")
        if not closed:
            s.settimeout(0.01)
            try:
                closed = s.recv(1) == b""
            except socket.timeout:
                pass
            except OSError:
                closed = True
    s.close()
    assert closed, "a trickling payload kept its connection (and its fence) for 10 s"
    assert time.time() - t0 < 6.0, time.time() - t0
    local = script(kv, m, "local", "--sizes", "64-1M")
    assert local.do("put after 1 256K")["status"] == "KVS_OK"
    assert local.do("get after 1")["result"] == "hit"
    assert_never_wrong(local.finish(), "local")


# ------------------------------------------------------------------- b
def run_load_with_faults(kv, verifiers, inject, rounds):
    """Runs `inject(i)` `rounds` times while the verifiers run; after each
    fault every verifier must hit again (5 more hits) before the next one,
    and 20 more after the last. Stops them; every report must show no wrong
    read. Returns the reports."""
    for v in verifiers:
        v.wait(lambda p: p.get("hits", 0) >= 20, 60, "20 hits before the faults")
    for i in range(rounds):
        inject(i)
        # every verifier reads again before the next fault
        base = [v.get("hits") for v in verifiers]
        for v, b in zip(verifiers, base):
            v.wait_more("hits", b, 5, timeout=60)
    after = [v.get("hits") for v in verifiers]
    for v, b in zip(verifiers, after):
        v.wait_more("hits", b, 20, timeout=60)
    reps = [v.stop() for v in verifiers]
    for v, rep in zip(verifiers, reps):
        assert_never_wrong(rep, v.name)
    return reps


def test_node_paused_under_load(kv):
    """A node stopped for 3 s, five times (client TTL 5 s: it is not
    expired), under a remote writer (T_WRITE, timeout 1 s: its puts are
    given up with their bytes queued at the node) and a same-host writer
    (memcpy into the node's segment, which goes on while the node is
    stopped). All values 1 MiB, so the same-host writer's puts fit exactly
    into the space of the given-up ones."""
    need_root()
    m = kv.start_master(ttl_ms=5000)
    node = kv.start_node(m, "64M")
    # mostly puts remotely (what is in flight at the pause is a T_WRITE),
    # mostly gets here (an object that took a given-up put's space is read)
    vr = Verifier(kv, m, "verify-remote", "--threads", 4, "--keys", 4, "--sizes", "1M",
                  "--rewrite", 90, "--timeout-ms", 1000, env=remote_env(kv))
    vl = Verifier(kv, m, "verify-local", "--threads", 2, "--keys", 8, "--sizes", "1M",
                  "--rewrite", 30, "--timeout-ms", 1000)

    def pause(i):
        node.signal(signal.SIGSTOP)
        time.sleep(3.0)  # the fault itself: a node stopped for 3 s
        node.signal(signal.SIGCONT)

    reps = run_load_with_faults(kv, [vr, vl], pause, 5)
    assert node.alive()
    assert reps[0]["errors"] + reps[0]["misses"] > 0, summary(reps[0])  # the faults did bite


def test_writer_paused_past_ttl(kv):
    """A same-host writer that writes its values in place (zero-copy slots:
    most of its time is spent inside the segment) is stopped for 3 s, past
    the client TTL (1.5 s), three times: the master expires it and revokes
    its reservation while its write is half done. Another writer keeps
    putting into the same segment (best fit: into the freed hole). When the
    first one resumes, its write must not land over the other's object."""
    need_root()
    m = kv.start_master(ttl_ms=TTL_MS)
    kv.start_node(m, "64M")
    # all values 4 MiB: every hole fits the next put exactly; the paused
    # writer spends nearly all its time inside a reserved slot (64 KiB
    # pieces, 0.5 ms apart)
    w = Verifier(kv, m, "verify-paused", "--write-delay-us", 500, "--threads", 1, "--keys", 3,
                 "--rewrite", 80, "--sizes", "4M")
    r = Verifier(kv, m, "verify-other", "--threads", 2, "--keys", 4, "--rewrite", 50,
                 "--sizes", "4M")

    def pause(i):
        w.proc.signal(signal.SIGSTOP)
        time.sleep(3.0)  # past the TTL: the writer is expired meanwhile
        w.proc.signal(signal.SIGCONT)

    reps = run_load_with_faults(kv, [w, r], pause, 3)
    assert master_counters(kv, m).get("expired_clients", 0) >= 3, master_counters(kv, m)
    assert reps[1]["put_ok"] > 0


def test_short_put_timeout_under_load(kv):
    """--put-timeout-ms 20: the master revokes puts whose bytes are still
    being written (large remote T_WRITEs, in-place same-host writes) and
    gives their space to the next put."""
    need_root()
    m = kv.start_master(ttl_ms=TTL_MS, put_timeout_ms=20)
    kv.start_node(m, "64M")
    # slow writers (2 MiB values in 64 KiB pieces 1 ms apart: every put
    # outlives the put timeout), in place and through the node's transfer
    # server, and a fast writer whose 2 MiB puts fit exactly the holes the
    # revoked puts leave
    vs = [Verifier(kv, m, "verify-slow-remote", "--threads", 2, "--keys", 4, "--sizes", "2M",
                   "--write-delay-us", 1000, env=remote_env(kv)),
          Verifier(kv, m, "verify-slow-local", "--threads", 2, "--keys", 4, "--sizes", "2M",
                   "--write-delay-us", 1000),
          Verifier(kv, m, "verify-fast", "--threads", 2, "--keys", 8, "--sizes", "2M",
                   "--rewrite", 50)]
    fast = vs[2]
    fast.wait(lambda p: p.get("hits", 0) >= 3000, 120, "3000 hits")
    reps = [v.stop() for v in vs]
    for v, rep in zip(vs, reps):
        assert_never_wrong(rep, v.name)
    assert reps[2]["hits"] > 0, summary(reps[2])
    revoked = master_counters(kv, m).get("revoked_puts", 0)
    assert revoked > 0, ("no put was revoked: the fault did not happen", master_counters(kv, m))


@pytest.mark.slow
def test_node_partitioned(kv):
    """The node lives in its own network namespace; five times, every packet
    on its link is dropped for 6 s (client TTL 10 s: the node stays
    registered; heartbeats, T_WRITE and T_READ stall, puts time out with
    their bytes in TCP retransmission and land when the link is back). A
    remote writer (mostly puts, 1 MiB) and a same-host one (memcpy through
    /dev/shm, no network; mostly gets, 1 MiB) check every read."""
    need_netns()
    ns = NetNs("p")
    try:
        # all interfaces (so with a secret): the node reaches it over its link,
        # the clients here on loopback
        m = kv.start_master(ttl_ms=10000, listen="0.0.0.0:0", secret=SECRET)
        env = dict(kv.env)
        env["KVSHELF_NO_LOCAL_SOCKET"] = "1"  # its master connection crosses the link
        # and outlives a partition (a heartbeat answered late, no reconnect):
        # the node keeps its registration and its objects
        env["KVSHELF_TIMEOUT_MS"] = "15000"
        node = kv.spawn("node", ns.exec_args([
            kv.bin, "node", "--master", "%s:%d" % (ns.host_ip, m.rpc), "--segment-size", "64M",
            "--secret", SECRET, "--local-hostname", ns.ns_ip]), env=env)
        kv.wait_for(lambda: kv.segment_count(m) == 1, 20, "the node's segment", proc=node)
        vr = Verifier(kv, m, "verify-remote", "--threads", 4, "--keys", 4, "--sizes", "1M",
                      "--rewrite", 90, "--timeout-ms", 1000, env=remote_env(kv))
        vl = Verifier(kv, m, "verify-local", "--threads", 2, "--keys", 8, "--sizes", "1M",
                      "--rewrite", 30, "--timeout-ms", 1000)

        def cut(i):
            ns.partition(True)
            try:
                time.sleep(6.0)  # the fault itself: 6 s without a packet
            finally:
                ns.partition(False)

        run_load_with_faults(kv, [vr, vl], cut, 5)
        kv.wait_for(lambda: kv.segment_count(m) == 1, 30, "the node's segment back")
        assert node.alive()
    finally:
        for p in kv.procs:
            p.stop()
        ns.close()


# ------------------------------------------------------------------- c
def test_dev_shm_too_small(kv):
    """Item 2: in a mount namespace whose /dev/shm is an 80 MiB tmpfs, a node
    asked for a 256 MiB segment fails at start with a message naming
    /dev/shm and the size (no SIGBUS, then or later); a same-host writer with
    a segment that fits works, every byte checked."""
    need_unshare()
    m = kv.start_master(ttl_ms=TTL_MS)
    shm = ShmNamespace(kv, "small-shm", "80M")
    try:
        node = kv.spawn("node-256M", shm.wrap() + [
            kv.bin, "node", "--master", m.addr, "--segment-size", "256M"])
        node.expect_failure = True
        try:
            rc = node.wait(30)
        except Exception:
            rc = None
        log = node.log_text()
        assert rc is not None, (
            "a node with a 256 MiB segment on an 80 MiB /dev/shm is still running "
            "(segments: %s)" % [s.get("shm_name") for s in segments_of(kv.status(m) or {})])
        assert rc > 0, ("node exit status %s (%s)" % (rc, faults.signal_name(rc)), log)
        assert "/dev/shm" in log, log
        assert any(s in log for s in ("256 MiB", "256M", "268435456")), log

        v = Verifier(kv, m, "verify-fits", "--segment-size", "48M", "--threads", 2,
                     "--keys", 16, "--sizes", "64K-1M", "--ops", 3000, wrap=shm.wrap())
        rep = v.finish(timeout=120)
        assert_never_wrong(rep, v.name)
        assert rep["_rc"] == 0, summary(rep)
        assert rep["put_ok"] > 0 and rep["hits"] > 0 and rep["errors"] == 0, summary(rep)
        assert not no_sigbus(kv), no_sigbus(kv)
    finally:
        for p in kv.procs:
            if p is not m.proc:
                p.stop()
        shm.close()
    assert not no_sigbus(kv), no_sigbus(kv)


# ------------------------------------------------------------------- d
def test_two_containers_pid1_nodes(kv):
    """Item 3: two containers (own PID and mount namespaces, own /dev/shm,
    same boot id) each run a node as pid 1 and a client that puts and gets
    verified values; both segments stay mounted and no read is wrong."""
    need_unshare(pid_ns=True)
    m = kv.start_master(ttl_ms=TTL_MS)
    c1 = Container(kv, m, "container-1")
    c2 = Container(kv, m, "container-2")
    try:
        kv.wait_for(lambda: c1.mounted() and c2.mounted(), 20, "both nodes to mount")
        assert c1.ns_pid() == 1 and c2.ns_pid() == 1, (c1.ns_pid(), c2.ns_pid())
        segs = segments_of(kv.status(m) or {})
        names = [s.get("shm_name") for s in segs]
        vs = [Verifier(kv, m, "verify-in-%s" % c.name, "--threads", 2, "--keys", 16,
                       "--sizes", "4K-256K", "--ops", 1500, wrap=c.wrap())
              for c in (c1, c2)]
        reps = [v.finish(timeout=120) for v in vs]
        for v, rep in zip(vs, reps):
            assert_never_wrong(rep, v.name)
            assert rep["hits"] > 0, summary(rep)
        # what one container writes, the other (and the host) reads: a client
        # must never take another container's file of the same name for the
        # segment the master named
        s1 = script(kv, m, "script-in-container-1", "--sizes", "64-1M", wrap=c1.wrap())
        s2 = script(kv, m, "script-in-container-2", "--sizes", "64-1M", wrap=c2.wrap())
        host = script(kv, m, "script-on-host", "--sizes", "64-1M")
        for writer, tag in ((s1, "one"), (s2, "two")):
            for i in range(24):
                assert writer.do("put %s-%d 1 64K" % (tag, i))["status"] == "KVS_OK"
        for reader in (s1, s2, host):
            for tag in ("one", "two"):
                for i in range(24):
                    reader.do("get %s-%d 1" % (tag, i))
        reps = [s.finish() for s in (s1, s2, host)]
        wrong = {s.name: (rep["wrong"], rep["wrong_bytes"]) for s, rep in zip((s1, s2, host), reps)}
        assert all(w == (0, 0) for w in wrong.values()), ("wrong reads, bytes", wrong)
        for s, rep in zip((s1, s2, host), reps):
            assert rep["hits"] == 48, summary(rep)
        assert len(segs) == 2, ("a segment was dropped when the second pid-1 node mounted", names)
        segs = segments_of(kv.status(m) or {})
        assert len(segs) == 2, ("both segments must stay mounted", segs)
        assert len(set(s.get("shm_name") for s in segs)) == 2, segs
    finally:
        c1.stop()
        c2.stop()
