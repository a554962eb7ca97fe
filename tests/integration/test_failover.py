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
    stops serving when it runs again: never two leaders.
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
                      put_sets, row, segments_of, small_and_large)
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
