"""Failover through etcd (issue 17): several masters, one leader.

Every test starts a real etcd (Debian's etcd-server; the test is skipped
only when the `etcd` binary is missing) on ports chosen free at run time,
with a temporary data directory, and stops it at the end. Two `kvshelf
master --etcd ...` processes campaign for `<prefix>/leader`; the nodes, the
benches and the verifiers are given `etcd://127.0.0.1:PORT/<prefix>` as
their master address and find the leader there on every (re)connect.

Shown here:
  - `kill -9` of the leader: the standby serves within FAILOVER_S (the etcd
    lease TTL, then the rebuild from the nodes' directories), every object
    complete before the kill is a hit again, byte for byte, and `kvshelf
    status` says who leads and who stands by;
  - under load (`kvshelf verify` writing, rewriting and reading through the
    etcd address), the leader killed twice (ping-pong between the two
    masters): the clients follow the change of leader on their own and no
    read is ever wrong;
  - an object half-written at the crash is never served by the new leader,
    and the dead leader's late writes cannot land;
  - a leader cut off from etcd (here: frozen with SIGSTOP past its lease)
    stops serving when it runs again: never two leaders;
  - a node frozen through a whole master's reign hands in a directory that
    missed what that reign removed or rewrote: the next master serves none
    of it (no older version comes back).
"""
import json
import os
import shutil
import signal
import socket
import time
import urllib.request

import pytest

from conftest import (assert_all_hits, assert_clean, directories_settled, free_port, put_fresh,
                      put_sets, recovery, row, segments_of, small_and_large)
from test_restart import SECRET, connect_tool
import kvswire as w

ETCD_TTL_S = 2
LEASE_MS = 1000
HEALTHY_TTL_MS = 10000
RECOVERY_WAIT_MS = 3000
# etcd expires the dead leader's lease after ETCD_TTL_S; a standby retries
# its campaign every 250 ms, the nodes reconnect with a back-off of at most
# 1 s and hand in their directories (milliseconds for these few hundred
# objects): well inside this on the 2-core test machine
FAILOVER_S = ETCD_TTL_S + 6


def etcd_binary():
    return shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)


class Etcd:
    def __init__(self, proc, port):
        self.proc = proc
        self.port = port
        self.endpoint = "127.0.0.1:%d" % port

    def call(self, path, body):
        req = urllib.request.Request("http://%s%s" % (self.endpoint, path),
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=3) as r:
            return json.loads(r.read())


@pytest.fixture
def etcd(kv, tmp_path):
    exe = etcd_binary()
    if not exe:
        pytest.skip("the etcd binary is missing (scripts/deps.sh installs Debian's etcd-server)")
    cport, pport = free_port(), free_port()
    data = tmp_path / "etcd-data"
    args = [exe, "--name", "kvs-test", "--data-dir", data,
            "--listen-client-urls", "http://127.0.0.1:%d" % cport,
            "--advertise-client-urls", "http://127.0.0.1:%d" % cport,
            "--listen-peer-urls", "http://127.0.0.1:%d" % pport,
            "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % pport,
            "--initial-cluster", "kvs-test=http://127.0.0.1:%d" % pport,
            "--initial-cluster-state", "new"]
    p = kv.spawn("etcd", args)
    e = Etcd(p, cport)

    def ready():
        try:
            e.call("/v3/kv/range", {"key": "eA=="})
            return True
        except Exception:
            return False
    kv.wait_for(ready, 30, "etcd to answer", proc=p)
    yield e
    # the harness stops every process at the end (etcd last: it started first)


class HA:
    """The pool as its clients see it: an etcd:// master address."""

    def __init__(self, etcd, prefix):
        self.etcd = etcd
        self.prefix = prefix
        self.secret = SECRET

    @property
    def addr(self):
        return "etcd://%s/%s" % (self.etcd.endpoint, self.prefix)


class HAMaster:
    def __init__(self, proc, rpc):
        self.proc = proc
        self.rpc = rpc

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.rpc


def start_ha_master(kv, etcd, prefix, name, rpc=None):
    rpc = rpc or free_port()
    env = dict(kv.env)
    env["KVSHELF_RECOVERY_WAIT_MS"] = str(RECOVERY_WAIT_MS)
    p = kv.spawn(name, [kv.bin, "master", "--listen", "127.0.0.1:%d" % rpc, "--http", "off",
                        "--secret", SECRET, "--client-ttl-ms", HEALTHY_TTL_MS,
                        "--lease-ms", LEASE_MS, "--etcd", etcd.endpoint,
                        "--etcd-prefix", prefix, "--etcd-ttl", ETCD_TTL_S], env=env)
    return HAMaster(p, rpc)


def election(kv, ha):
    st = kv.status(ha)
    if st and "election" in st:
        return st["election"]
    r = kv.run("status", "--json", "--master", ha.addr, "--secret", ha.secret)
    try:
        return json.loads(r.stdout.splitlines()[-1])["election"]
    except Exception:
        return None


def leader_of(kv, ha):
    el = election(kv, ha)
    return el.get("leader") if el else None


def wait_leader(kv, ha, m, timeout=15):
    kv.wait_for(lambda: leader_of(kv, ha) == m.addr, timeout, "%s to lead" % m.addr,
                interval=0.05, proc=m.proc)


def hits(kv, ha, args, modes="get"):
    """Gets of a bench key set through the etcd address: how many hit (-1
    when the bench could not run, e.g. no leader elected yet)."""
    try:
        g = kv.bench(ha, "--mode", modes, "--batch", 8, *args)
    except AssertionError:
        return -1
    assert g["totals"]["mismatches"] == 0, ("wrong bytes", g["totals"])
    return row(g, "get")["ok"] if g["_rc"] == 0 else -1


def setup_pool(kv, etcd, prefix, nodes=2):
    ha = HA(etcd, prefix)
    a = start_ha_master(kv, etcd, prefix, "master-a")
    wait_leader(kv, ha, a)
    b = start_ha_master(kv, etcd, prefix, "master-b")
    kv.wait_for(lambda: len((election(kv, ha) or {}).get("masters", [])) == 2, 10,
                "both masters to register in etcd", proc=b.proc)
    for i in range(nodes):
        kv.start_node(ha, "128M" if nodes > 1 else "64M", name="node-%d" % i)
    return ha, a, b


def test_kill9_leader_standby_serves_every_object(kv, etcd):
    ha, a, b = setup_pool(kv, etcd, "ft1")
    el = election(kv, ha)
    roles = {m["address"]: m["role"] for m in el["masters"]}
    assert roles == {a.addr: "leader", b.addr: "standby"}, el
    out = kv.run("status", "--master", ha.addr, "--secret", SECRET, check=True).stdout.decode()
    assert "leader   %s" % a.addr in out and "standby  %s" % b.addr in out, out

    sets = small_and_large("f")
    put_sets(kv, ha, sets)
    kv.wait_for(lambda: directories_settled(kv, ha, 2), 10,
                "the nodes' directories to list every object")
    assert kv.status(ha)["objects"] == 460

    a.proc.kill()  # SIGKILL: the standby must notice through etcd alone
    t0 = time.time()

    def all_hits():
        return all(hits(kv, ha, args) == n for args, n in sets)
    kv.wait_for(all_hits, FAILOVER_S + 10, "every object to be a hit at the new leader",
                interval=0.05, proc=b.proc)
    took = time.time() - t0
    print("failover: every object a hit again %.2f s after kill -9 of the leader "
          "(etcd TTL %d s)" % (took, ETCD_TTL_S))
    assert took < FAILOVER_S, took
    assert leader_of(kv, ha) == b.addr
    st = kv.status(ha)
    assert st["objects"] == 460, st["objects"]
    assert st["recovery"]["objects_recovered"] == 460, st["recovery"]
    assert len(segments_of(st)) == 2
    # byte for byte (the benches above already verified; once more with exists)
    assert_all_hits(kv, ha, sets, "get after failover")

    # the killed master comes back as a standby; new puts land (after the
    # quiet time of one lease) and survive the next failover too
    a2 = start_ha_master(kv, etcd, "ft1", "master-a", rpc=a.rpc)
    kv.wait_for(lambda: {m["address"]: m["role"] for m in election(kv, ha)["masters"]}
                == {a2.addr: "standby", b.addr: "leader"}, 10, "a standby again")
    fresh = put_fresh(kv, ha, "fn", 2, LEASE_MS)
    b.proc.kill()
    t0 = time.time()
    wait_leader(kv, ha, a2, timeout=FAILOVER_S)
    for args, n in sets + (fresh,):
        kv.wait_for(lambda: hits(kv, ha, args) == n, FAILOVER_S + 10,
                    "hits after the second failover")
    print("second failover: every object a hit again %.2f s after kill -9" % (time.time() - t0))


def test_kill9_leader_under_load_never_wrong(kv, etcd):
    """The verifiers are given the etcd address and follow each change of
    leader on their own; no read is ever another key's bytes, an older
    version than the last acknowledged one, or corrupt."""
    from faults import start_rewriters, stop_never_wrong, wait_more_hits
    ha, a, b = setup_pool(kv, etcd, "ft2")
    vs = start_rewriters(kv, ha)
    leader, standby = a, b
    for round_ in range(2):
        leader.proc.kill()
        t0 = time.time()
        wait_leader(kv, ha, standby, timeout=FAILOVER_S + 5)
        wait_more_hits(vs)
        print("round %d: verifiers hitting again %.2f s after the kill" % (round_, time.time() - t0))
        # the killed one comes back as the standby for the next round
        leader, standby = standby, start_ha_master(kv, etcd, "ft2", "master-r%d" % round_,
                                                   rpc=leader.rpc)
        kv.wait_for(lambda: len(election(kv, ha)["masters"]) == 2, 10, "the standby to register")
    stop_never_wrong(vs)


def test_half_written_object_never_served_after_failover(kv, etcd):
    ha, a, b = setup_pool(kv, etcd, "ft3", nodes=1)
    done = ["--sizes", "4K-128K", "--count", 50, "--prefix", "ok", "--verify", "--keep"]
    assert_clean(kv.bench(ha, "--mode", "put", *done), "put")

    s, cid = connect_tool(a.rpc)  # the leader, directly
    seg = segments_of(kv.status(ha))[0]
    xport = int(seg["transfer_addr"].rsplit(":", 1)[1])
    t, (segid, off, epoch) = w.put_half_written(s, cid, xport, SECRET)
    kv.wait_for(lambda: directories_settled(kv, ha, 1), 10, "the directory to settle")

    a.proc.kill()
    wait_leader(kv, ha, b, timeout=FAILOVER_S)
    kv.wait_for(lambda: hits(kv, ha, done) == 50, FAILOVER_S + 10,
                "the committed objects to be hits at the new leader")
    rec = kv.status(ha)["recovery"]
    assert rec["objects_recovered"] == 50, rec  # the committed ones, nothing else
    s2, cid2 = connect_tool(b.rpc)
    for key in (b"half", b"full"):
        assert w.get_status(s2, cid2, key, 5) == -3, key  # a miss, never the half-written bytes
    new_id = segments_of(kv.status(ha))[0]["id"]
    for sid, rid in ((segid, 6), (new_id, 8)):
        w.assert_late_write_refused(t, sid, off + (128 << 10), epoch, rid)
    for x in (s, s2, t):
        x.close()


def refused(port):
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    c.close()
    return False


def test_leader_without_etcd_steps_down_never_two_leaders(kv, etcd):
    """A leader frozen past its etcd lease (as if cut off from etcd) finds,
    when it runs again, that its lease ended: it stops serving before it
    handles any request (closing every connection; its port refuses
    connections as a standby's does) while the other master leads."""
    ha, a, b = setup_pool(kv, etcd, "ft4", nodes=1)
    assert_clean(kv.bench(ha, "--mode", "put,get", "--sizes", "4K-64K", "--count", 40,
                          "--prefix", "sd", "--verify", "--keep"), "put")
    assert refused(b.rpc), "a standby must not accept connections"
    s, cid = connect_tool(a.rpc)
    a.proc.signal(signal.SIGSTOP)
    try:
        wait_leader(kv, ha, b, timeout=FAILOVER_S + 5)
    finally:
        a.proc.signal(signal.SIGCONT)
    # the old leader answers nothing more on its old connection and closes it
    s.settimeout(5)
    s.sendall(w.frame(w.GET, w.u64(cid) + w.u32(1) + w.wbytes(b"sd-x"), req_id=9))
    try:
        f = w.read_frame(s)
    except (ConnectionResetError, socket.timeout):
        f = None
    assert f is None, ("the stepped-down leader answered a request", f)
    kv.wait_for(lambda: "stepping down" in a.proc.log_text(), 5, "the old leader to step down")
    kv.wait_for(lambda: refused(a.rpc), 5, "the old leader's port to refuse connections")
    assert leader_of(kv, ha) == b.addr
    sd = ["--sizes", "4K-64K", "--count", 40, "--prefix", "sd", "--verify", "--keep"]
    kv.wait_for(lambda: hits(kv, ha, sd) == 40, FAILOVER_S + 10, "hits at the new leader")
    s.close()
    # the old leader is a standby now and registered as one
    kv.wait_for(lambda: {m["address"]: m["role"] for m in election(kv, ha)["masters"]}
                == {a.addr: "standby", b.addr: "leader"}, 10, "the old leader to stand by")



def segment_objects_by_pid(st):
    """{pid of the node that mounted it: objects} of each segment in a status."""
    pids = {c["id"]: c.get("pid") for c in (st or {}).get("clients", [])}
    return {pids.get(s["owner_client"]): s["objects"] for s in segments_of(st or {})}


def script_until(sc, line, ok, deadline, what):
    """sc.do(line) again (every 100 ms) until ok(result), at most until deadline."""
    while True:
        r = sc.do(line)
        if ok(r):
            return r
        assert time.time() < deadline, ("%s: no answer but %s" % (what, r))
        time.sleep(0.1)


def test_directory_that_missed_a_reign_is_not_served(kv, etcd):
    """The stale reads CI found in test_kill9_leader_under_load_never_wrong,
    made deterministic. M1 leads: version 1 of 64 keys, half in each node's
    segment. node-0 is frozen (SIGSTOP) and M1 killed: M2 leads with node-1
    only (node-0 never mounts there); through M2 every key is removed and
    every other one rewritten as version 2 (in node-1). M1's address comes
    back as the standby M3, M2 is killed, node-0 runs again and mounts on M3
    within its rebuild, handing in its directory from M1's reign: version 1
    of keys M2 removed or rewrote. That directory missed a whole reign and
    must not be served: any hit of version 1 is a stale read (misses are
    fine). Without the fix M3 serves at least the removed keys of node-0
    (16 stale reads; 32 when node-0 hands in before node-1)."""
    from faults import script, wait_stopped
    prefix = "ft5"
    ha, a, b = setup_pool(kv, etcd, prefix)
    node0 = next(p for p in kv.procs if p.name == "node-0")
    node1 = next(p for p in kv.procs if p.name == "node-1")
    keys = ["mr/%03d" % i for i in range(64)]
    sc = script(kv, ha, "script", "--sizes", "4K-64K", "--timeout-ms", 2000)
    t_start = time.time()

    # M1's reign: version 1 of every key, spread over both segments
    for k in keys:
        r = sc.do("put %s 1 32K" % k)
        assert r["status"] == "KVS_OK", r
    kv.wait_for(lambda: directories_settled(kv, ha, 2), 10,
                "both directories to list every object")
    at_m1 = segment_objects_by_pid(kv.status(ha))
    print("M1: objects in node-0's segment %s, in node-1's %s" % (
        at_m1.get(node0.pid), at_m1.get(node1.pid)))
    assert at_m1.get(node0.pid, 0) > 0 and at_m1.get(node1.pid, 0) > 0, at_m1

    node0.signal(signal.SIGSTOP)  # node-0 sleeps through M2's whole reign
    try:
        wait_stopped(node0.pid)
        a.proc.kill()
        wait_leader(kv, ha, b, timeout=FAILOVER_S + 5)

        def m2_ready():
            st = kv.status(ha)
            return bool(st) and list(segment_objects_by_pid(st)) == [node1.pid] and \
                recovery(st).get("complete")
        kv.wait_for(m2_ready, FAILOVER_S + 10, "node-1 mounted and the rebuild complete at M2")

        # M2's reign: the keys it does not know are node-0's ...
        deadline = time.time() + 20
        in_node0 = [k for k in keys if script_until(
            sc, "get %s 1" % k, lambda r: r.get("result") in ("hit", "miss"), deadline,
            "get at M2")["result"] == "miss"]
        print("M2: %d of %d keys miss (version 1 only in node-0's frozen segment)"
              % (len(in_node0), len(keys)))
        assert len(in_node0) == at_m1[node0.pid], (in_node0, at_m1)
        # ... every key removed, every other one of each segment rewritten
        in_node1 = [k for k in keys if k not in in_node0]
        rewritten = set(in_node0[1::2] + in_node1[1::2])
        expect = {}
        for k in keys:
            script_until(sc, "rm %s" % k,
                         lambda r: r["status"] in ("KVS_OK", "KVS_ERR_NOT_FOUND"), deadline,
                         "rm at M2")
            expect[k] = "-"
            if k in rewritten:
                expect[k] = "2"  # a failed put may have landed as well: 2 or nothing
                script_until(sc, "put %s 2 16K" % k, lambda r: r["status"] == "KVS_OK",
                             deadline, "put at M2")
        kv.wait_for(lambda: directories_settled(kv, ha, 1), 10, "node-1's directory to settle")
        assert segment_objects_by_pid(kv.status(ha)) == {node1.pid: len(rewritten)}

        # M1's address back as the standby (M3); M2 killed; node-0 runs again
        a2 = start_ha_master(kv, etcd, prefix, "master-a", rpc=a.rpc)
        kv.wait_for(lambda: {m["address"]: m["role"] for m in election(kv, ha)["masters"]}
                    == {a2.addr: "standby", b.addr: "leader"}, 10, "M3 to stand by")
        b.proc.kill()
    finally:
        node0.signal(signal.SIGCONT)
    wait_leader(kv, ha, a2, timeout=FAILOVER_S + 5)

    def m3_ready():
        st = kv.status(ha)
        return bool(st) and sorted(segment_objects_by_pid(st)) == sorted([node0.pid, node1.pid]) \
            and recovery(st).get("complete")
    kv.wait_for(m3_ready, FAILOVER_S + 10, "both nodes mounted and the rebuild complete at M3")
    st3 = kv.status(ha)
    pids = {c["id"]: c.get("pid") for c in st3.get("clients", [])}
    dirs = {("node-0" if pids.get(s["owner_client"]) == node0.pid else "node-1"):
            s.get("directory") for s in segments_of(st3)}
    print("M3: recovery %s; directories %s" % (recovery(st3), dirs))

    # M3: only what M2 acknowledged may be read
    stale, seen = [], {"hit": 0, "miss": 0}
    deadline = time.time() + 20
    for k in keys:
        r = script_until(sc, "get %s %s" % (k, expect[k]),
                         lambda r: r.get("result") in ("hit", "miss", "wrong"), deadline,
                         "get at M3")
        if r["result"] == "wrong":
            stale.append("%s: %s version %s (accepted: %s; %s, %s at M2)" % (
                k, r.get("kind"), r.get("found_version"), expect[k],
                "node-0" if k in in_node0 else "node-1",
                "rewritten" if k in rewritten else "removed"))
        else:
            seen[r["result"]] += 1
    rep = sc.finish()
    print("M3: %s, %d stale; %.1f s from the first put" % (seen, len(stale), time.time() - t_start))
    assert not stale and rep.get("wrong") == 0, (
        "%d stale reads at M3 (a directory that missed M2's reign was served):\n  %s" % (
            len(stale), "\n  ".join(stale)), dirs)
