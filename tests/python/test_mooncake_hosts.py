"""kvshelf.mooncake_store.MooncakeBlockStore over Mooncake across hosts
(issue 16, "Beyond one machine").

Three network namespaces of the test's own (tests/python/mooncake_net.py,
``MooncakeHosts``): host A (10.88.21.2) and host B (10.88.22.2), each
linked by a veth pair to the master's namespace, which routes between them
and runs ``mooncake_master`` 0.3.13.post1 (PyPI, tests/integration/
mooncake_env.py) with its HTTP metadata service on free ports. Each host
runs its scenario in its own process, with its own Mooncake client and
global segment; they meet through files in the test's folder.

test_blocks_cross_hosts: A dumps blocks of varied sizes and stays up; only
then does B start (so the objects can only be in A's segment), and loads
them byte-exact. Proof that the bytes crossed the network: every replica
Mooncake reports is at A's transport endpoint, and B's link received at
least the payload during the load. Keys never dumped are misses; objects
B altered (upserts with another key's header, or a flipped payload byte)
are misses on B and on A, buffers untouched; blocks B dumps load on A.

test_peer_killed: A dumps, B loads them (ok), then A is killed (SIGKILL).
B's loads of A's blocks fail per block within task_timeout_ms (no hang, no
wrong bytes, buffers untouched); once the master drops A's segment
(``--client_ttl``) they are plain misses, and B's dumps and loads work.

    sudo python3 -m pytest tests/python/test_mooncake_hosts.py -v
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

import mooncake_net as mn
from test_mooncake_store import import_store, make_object

MOD = "test_mooncake_hosts"
CLIENT_TTL_S = 2  # mooncake_master --client_ttl: a dead client's segment is dropped after this
TASK_TIMEOUT_MS = 5000  # B's store: bound of a task (finish) and of a lookup
SLACK_S = 2.0


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from mn.hosts_fixture(tmp_path_factory, "mooncake-hosts", "h", ("a", "b"))


@pytest.fixture
def master(hosts):
    hosts.start_master("--client_ttl=%d" % CLIENT_TTL_S)
    yield hosts
    for sp in hosts.spawned:
        sp.kill()
    hosts.stop_master()


# --------------------------------------------------- helpers (both sides)
def blocks(seed: int, n: int, prefix: str):
    """n blocks of varied sizes (from empty to 2 MiB; the same for the same
    seed on any host) and their keys: text, str and raw binary ones."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = [0, 1, 4095, 4096, 4097, 65536, 1 << 20, (1 << 20) + 3, 2 << 20]
    sizes += [int(x) for x in rng.integers(1, 1 << 20, max(0, n - len(sizes)))]
    sizes = sizes[:n]
    keys, data = [], []
    for i, sz in enumerate(sizes):
        keys.append(("%s-%d" % (prefix, i)).encode() if i % 3 == 0 else
                    ("%s-s-%d" % (prefix, i) if i % 3 == 1 else
                     bytes([0xF0, seed & 0xFF]) + ("%s%d" % (prefix, i)).encode()))
        data.append(np.frombuffer(rng.bytes(sz), np.uint8).copy())
    return keys, data


def alt_blocks(seed: int, run: str):
    """Two blocks of A's that B alters."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    return (["alt%s-0" % run, b"alt%s-1" % run.encode()],
            [np.frombuffer(rng.bytes(n), np.uint8).copy() for n in (4096 + 7, 70000)])


def link_rx() -> int:
    """Bytes received so far on this host's link (its namespace's /proc/net/dev)."""
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "eth0":
            return int(rest.split()[0])
    raise RuntimeError("no eth0 here")


def endpoints(mc, mkeys):
    """Where Mooncake says each object's replicas are: their transport endpoints."""
    out = []
    for k in mkeys:
        eps = []
        for r in mc.get_replica_desc(k):
            if r.is_memory_replica():
                eps.append(r.get_memory_descriptor().buffer_descriptor.transport_endpoint)
            else:
                eps.append("disk")
        out.append(eps)
    return out


def put_file(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def wait_file(path: Path, timeout: float, procs=()) -> dict:
    """The JSON in path once it appears; AssertionError (with a scenario's
    output) if a process in procs exits first or timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        for net, sp in procs:
            if sp.proc.poll() is not None:
                net.collect(sp, 5)  # raises with its output when it failed
                raise AssertionError("%s on %s exited before writing %s" % (sp.scenario, sp.host, path))
        time.sleep(0.05)
    raise AssertionError("%s did not appear within %.0f s" % (path, timeout))


def alter_objects(ms, mc, A):
    """Objects of A's 'alt' keys replaced by this host (Mooncake's upsert):
    one with another key's header, one with a payload byte flipped."""
    alt_keys, alt_data = A["alt"]
    m0, m1 = ms.mooncake_key(alt_keys[0]), ms.mooncake_key(alt_keys[1])
    p0, p1 = bytes(alt_data[0]), bytearray(alt_data[1])
    other = make_object(m1, p0, key_for_hash=ms.mooncake_key(A["keys"][0]))  # a header not of m0
    good1 = make_object(m1, bytes(p1))
    p1[len(p1) // 2] ^= 0x01
    objs = {m0: other, m1: good1[:64] + bytes(p1)}
    rcs = {}
    deadline = time.monotonic() + 15
    for k, obj in objs.items():
        while True:
            rc = mc.upsert(k, obj)
            if rc == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        rcs[k] = rc
    assert all(rc == 0 for rc in rcs.values()), rcs
    return alt_keys, alt_data


# ============================================================ host A
def scenario_host_a(ctx):
    """Dumps the blocks of params (seed, n) and the 'alt' blocks, writes
    a_ready.json (keys' replica endpoints, its segment's endpoint), then
    waits: for a_cmd.json (loads what it names, returns) or to be killed."""
    import kvshelf
    import numpy as np

    p = ctx.params
    d = ctx.dir / p["run"]
    ms, s = open_store(ctx)
    keys, data = blocks(p["seed"], p["n"], "A%s" % p["run"])
    akeys, adata = alt_blocks(p["seed"], p["run"])
    t0 = time.monotonic()
    res = s.wait(s.dump(keys + akeys, data + adata), 60)
    assert res == [0] * (len(keys) + 2), res
    dump_s = time.monotonic() - t0
    eps = endpoints(s.client, [ms.mooncake_key(k) for k in keys + akeys])
    put_file(d / "a_ready.json", {"pid": os.getpid(), "endpoints": eps, "dump_s": dump_s,
                                  "hostname": s.config["local_hostname"],
                                  "bytes": sum(x.nbytes for x in data)})
    cmd = wait_file(d / "a_cmd.json", 300)
    out = {"dump_s": dump_s}
    NF = kvshelf._kvshelf.ERR_NOT_FOUND
    # B's blocks: byte-exact here
    bkeys, bdata = blocks(cmd["b_seed"], cmd["b_n"], "B%s" % p["run"])
    bufs = [np.full(x.size, 0x5A, np.uint8) for x in bdata]
    t = s.load(bkeys, bufs)
    res = s.wait(t, 60)
    assert res == [0] * len(bkeys), (res, t.error, endpoints(s.client, [ms.mooncake_key(k) for k in bkeys]))
    assert all(np.array_equal(x, y) for x, y in zip(bufs, bdata)), "B's blocks differ on A"
    # the objects B altered: misses here too, buffers untouched
    bufs = [np.full(x.size, 0xEE, np.uint8) for x in adata]
    t = s.load(akeys, bufs)
    assert s.wait(t, 60) == [NF, NF] and sorted(t.mismatches()) == [0, 1], (t.results(), t.error)
    assert all((b == 0xEE).all() for b in bufs)
    out["b_blocks_loaded"] = len(bkeys)
    out["b_endpoints"] = endpoints(s.client, [ms.mooncake_key(k) for k in bkeys])
    s.close(timeout=20)
    return out


def open_store(ctx, **over):
    ms = import_store()
    return ms, ms.MooncakeBlockStore(dict(ctx.config, **over))


# ============================================================ host B
def scenario_host_b_cross(ctx):
    """Started after A's dump (so A's objects can only be in A's segment):
    alters A's two 'alt' objects, checks where Mooncake says A's blocks
    are, lookups, loads them (byte-exact, counting the bytes its link
    received), misses; dumps B's blocks, writes b_dumped.json and stays up
    (its segment mounted) until b_stop.json."""
    import kvshelf
    import numpy as np

    NF = kvshelf._kvshelf.ERR_NOT_FOUND
    p = ctx.params
    d = ctx.dir / p["run"]
    A = wait_file(d / "a_ready.json", 60)
    cfg = dict(ctx.config)
    cfg.pop("local_hostname")  # the default: the address that routes to the master
    ms = import_store()
    s = ms.MooncakeBlockStore(cfg)
    out = {}
    with s:
        assert s.config["local_hostname"] == p["my_ip"], s.config["local_hostname"]
        keys, data = blocks(p["seed"], p["n"], "A%s" % p["run"])
        akeys, adata = alt_blocks(p["seed"], p["run"])
        mc = s.client
        A["keys"], A["alt"] = keys, (akeys, adata)
        # altered before any lookup or load here: those take a lease that upsert must wait out
        alter_objects(ms, mc, A)
        out["alt_endpoints"] = endpoints(mc, [ms.mooncake_key(k) for k in akeys])
        # where Mooncake says A's blocks are: A's segment, and nowhere else
        eps = endpoints(mc, [ms.mooncake_key(k) for k in keys])
        a_ep = {e for x in A["endpoints"] for e in x}
        assert len(a_ep) == 1 and next(iter(a_ep)).startswith(p["a_ip"] + ":"), A["endpoints"]
        assert all(x == [next(iter(a_ep))] for x in eps), eps
        out["a_endpoint"] = next(iter(a_ep))
        # lookups
        gone = [b"never-%s-%d" % (p["run"].encode(), i) for i in range(3)]
        assert s.lookup(keys + gone) == [True] * len(keys) + [False] * 3
        k = len(keys) // 2
        assert s.lookup_prefix(keys[:k] + gone[:1] + keys[k:]) == k
        assert s.lookup_prefix(keys, chunk=7) == len(keys)
        assert s.lookup_prefix(gone + keys) == 0
        # loads: byte-exact, and the bytes came in on this host's link
        bufs = [np.full(x.size, 0x5A, np.uint8) for x in data]
        payload = sum(x.nbytes for x in data)
        rx0 = link_rx()
        t0 = time.monotonic()
        res = s.wait(s.load(keys, bufs), 60)
        out["load_s"] = time.monotonic() - t0
        out["rx_bytes"] = link_rx() - rx0
        assert res == [0] * len(keys), res
        bad = [i for i, (x, y) in enumerate(zip(bufs, data)) if not np.array_equal(x, y)]
        assert not bad, "blocks %s differ" % bad
        out["payload"] = payload
        assert out["rx_bytes"] >= payload, out
        # never dumped: misses, buffers untouched
        mb = [np.full(100, 0xAB, np.uint8) for _ in gone]
        t = s.load(gone, mb)
        assert s.wait(t, 30) == [NF] * 3 and t.misses() == [0, 1, 2] and t.mismatches() == []
        assert all((b == 0xAB).all() for b in mb)
        # the altered objects: misses (header checked), never the wrong bytes
        ab = [np.full(x.size, 0xEE, np.uint8) for x in adata]
        t = s.load(akeys, ab)
        assert s.wait(t, 30) == [NF, NF], (t.results(), t.error)
        assert sorted(t.mismatches()) == [0, 1]
        assert all((b == 0xEE).all() for b in ab)
        # B's own blocks, for A to load
        bkeys, bdata = blocks(p["b_seed"], p["b_n"], "B%s" % p["run"])
        assert s.wait(s.dump(bkeys, bdata), 60) == [0] * len(bkeys)
        out["b_endpoints"] = endpoints(mc, [ms.mooncake_key(k) for k in bkeys])
        st = s.stats()
        assert st["mismatch"] == 2 and st["load_errors"] == 0, st
        out["hostname"] = s.config["local_hostname"]
        # B's segment holds some of them: stay up (and mounted) while A loads them
        put_file(d / "b_dumped.json", out)
        wait_file(d / "b_stop.json", 120)
    return out


def scenario_host_b_peer_killed(ctx):
    """B loads A's blocks (ok), says so (b_ready.json), waits for A's kill
    (a_killed.json), then: A's blocks fail per block within
    task_timeout_ms; B's dumps work; once the master dropped A's segment,
    A's blocks are misses and everything B dumps loads byte-exact."""
    import kvshelf
    import numpy as np

    NF = kvshelf._kvshelf.ERR_NOT_FOUND
    p = ctx.params
    d = ctx.dir / p["run"]
    A = wait_file(d / "a_ready.json", 60)
    ms, s = open_store(ctx, task_timeout_ms=TASK_TIMEOUT_MS, timeout_ms=3000, retry_interval_ms=500)
    bound = TASK_TIMEOUT_MS / 1000.0 + SLACK_S
    keys, data = blocks(p["seed"], p["n"], "A%s" % p["run"])
    out: dict = {"a_endpoint": A["endpoints"][0]}
    bufs = [np.full(x.size, 0x5A, np.uint8) for x in data]
    assert s.wait(s.load(keys, bufs), 60) == [0] * len(keys)
    assert all(np.array_equal(x, y) for x, y in zip(bufs, data))
    put_file(d / "b_ready.json", {"loaded": len(keys)})
    wait_file(d / "a_killed.json", 60)
    t_kill = time.monotonic()

    def timed(fn):
        t0 = time.monotonic()
        try:
            v = fn()
        except kvshelf.Error as e:  # a clear kvshelf error is fine; a hang or a crash is not
            v = "%s: %s" % (type(e).__name__, str(e)[:160])
        dt = time.monotonic() - t0
        assert dt < bound, (dt, v)
        return v, round(dt, 3)

    # right after the kill: the master still lists A's segment
    out["lookup_after_kill"], out["lookup_after_kill_s"] = timed(lambda: s.lookup(keys))
    bufs = [np.full(x.size, 0xCD, np.uint8) for x in data]
    t0 = time.monotonic()
    t = s.load(keys, bufs)
    res = s.finish(t)  # at most task_timeout_ms after the submission
    out["load_after_kill_s"] = round(time.monotonic() - t0, 3)
    assert out["load_after_kill_s"] < bound, out
    out["load_after_kill"] = sorted(set(res))
    out["load_after_kill_error"] = (t.error or "")[:300]
    # A's memory is gone: nothing can have loaded; each block a miss or a transfer/connection error
    K = kvshelf._kvshelf
    assert set(res) <= {NF, K.ERR_IO, K.ERR_CONN, K.ERR_TIMEOUT}, (res, t.error)
    assert all((b == 0xCD).all() for b in bufs), "a failed block's buffer was written"
    out["staging_retired_after_kill"] = s.stats()["staging_retired"]
    # B's dumps right after the kill (Mooncake may still place some in A's dead segment)
    k1, d1 = blocks(p["seed"] + 10, 12, "B1%s" % p["run"])
    t0 = time.monotonic()
    t = s.dump(k1, d1)
    r1 = s.finish(t)
    out["dump_after_kill_s"] = round(time.monotonic() - t0, 3)
    assert out["dump_after_kill_s"] < bound, out
    assert set(r1) <= {0, K.ERR_IO, K.ERR_CONN, K.ERR_TIMEOUT, K.ERR_NO_SPACE}, (r1, t.error)
    out["dump_after_kill"] = {str(c): r1.count(c) for c in sorted(set(r1))}
    out["dump_after_kill_error"] = (t.error or "")[:300]
    # until the master drops A's segment (client_ttl): bounded
    deadline = t_kill + p["client_ttl"] + 20
    seen = []
    while True:
        v, dt = timed(lambda: s.lookup(keys))
        if isinstance(v, list) and not any(v):
            break
        seen.append(v if isinstance(v, str) else "%d of %d listed" % (sum(v), len(v)))
        assert time.monotonic() < deadline, ("A's objects still listed", seen[-3:])
        time.sleep(0.25)
    out["a_dropped_after_s"] = round(time.monotonic() - t_kill, 2)
    out["lookups_until_dropped"] = seen[:3] + (["..."] if len(seen) > 3 else [])
    # now A's blocks are plain misses
    bufs = [np.full(x.size, 0xCD, np.uint8) for x in data]
    t = s.load(keys, bufs)
    assert s.finish(t) == [NF] * len(keys), (t.results(), t.error)
    assert all((b == 0xCD).all() for b in bufs)
    assert s.lookup_prefix(keys) == 0
    # and B's dumps and loads work, byte-exact, from B's own segment
    k2, d2 = blocks(p["seed"] + 20, 24, "B2%s" % p["run"])
    t0 = time.monotonic()
    r2 = s.finish(s.dump(k2, d2))
    assert r2 == [0] * len(k2), r2
    out["dump_after_drop_s"] = round(time.monotonic() - t0, 3)
    eps = endpoints(s.client, [ms.mooncake_key(k) for k in k2])
    assert all(len(x) == 1 and x[0].startswith(p["my_ip"] + ":") for x in eps), eps
    ok1 = [i for i, r in enumerate(r1) if r == 0]  # the blocks dumped right after the kill
    kk, dd = k2 + [k1[i] for i in ok1], d2 + [d1[i] for i in ok1]
    bufs = [np.full(x.size, 0x77, np.uint8) for x in dd]
    res = s.finish(s.load(kk, bufs))
    # a block of those dumped right after the kill may have gone to A's dead
    # segment (dropped since): a miss then, never wrong bytes
    assert res[:len(k2)] == [0] * len(k2), res
    for i, r in enumerate(res):
        if r == 0:
            assert np.array_equal(bufs[i], dd[i]), i
        else:
            assert r == NF and (bufs[i] == 0x77).all(), (i, r)
    out["after_kill_dumps_lost"] = sum(1 for r in res[len(k2):] if r != 0)
    st = s.stats()
    out["stats"] = {k: st[k] for k in ("load_errors", "load_misses", "dump_errors", "mismatch",
                                       "staging_retired", "unreachable_events", "timeouts")}
    assert st["mismatch"] == 0, st
    t0 = time.monotonic()
    s.close(timeout=20)
    out["close_s"] = round(time.monotonic() - t0, 3)
    assert out["close_s"] < 25, out
    return out


# ============================================================== the tests
def test_blocks_cross_hosts(master):
    """A dumps; B (started after) loads them byte-exact over the network."""
    net = master
    run = "x%d" % (time.monotonic_ns() % 10**6)
    d = net.dir / run
    d.mkdir()
    prm = dict(run=run, seed=101, n=40, b_seed=202, b_n=8)
    a = net.spawn("a", MOD, "host_a", net.config("a"), **prm)
    A = wait_file(d / "a_ready.json", 60, [(net, a)])
    assert A["hostname"] == net.ip["a"]
    b = net.spawn("b", MOD, "host_b_cross", net.config("b", global_segment_size="64MiB"),
                  my_ip=net.ip["b"], a_ip=net.ip["a"], **prm)
    B = wait_file(d / "b_dumped.json", 90, [(net, a), (net, b)])
    assert B["hostname"] == net.ip["b"]
    assert B["a_endpoint"].startswith(net.ip["a"] + ":")
    assert B["rx_bytes"] >= B["payload"] > 8 << 20, B
    put_file(d / "a_cmd.json", {"b_seed": prm["b_seed"], "b_n": prm["b_n"]})
    RA = net.collect(a, 60)
    assert RA["b_blocks_loaded"] == prm["b_n"]
    put_file(d / "b_stop.json", {})
    net.collect(b, 30)
    print("\ncross hosts: A=%s B=%s payload=%d B rx=%d load %.2f s; alt objects at %s; "
          "B's blocks at %s" % (net.ip["a"], net.ip["b"], B["payload"], B["rx_bytes"], B["load_s"],
                               B["alt_endpoints"], sorted({e for x in B["b_endpoints"] for e in x})))


def test_peer_killed(master):
    """A killed (SIGKILL) after its dump: B's loads of its blocks fail per
    block, bounded; B keeps working."""
    net = master
    run = "k%d" % (time.monotonic_ns() % 10**6)
    d = net.dir / run
    d.mkdir()
    prm = dict(run=run, seed=303, n=24)
    a = net.spawn("a", MOD, "host_a", net.config("a"), **prm)
    wait_file(d / "a_ready.json", 60, [(net, a)])
    b = net.spawn("b", MOD, "host_b_peer_killed", net.config("b", global_segment_size="64MiB"),
                  my_ip=net.ip["b"], client_ttl=CLIENT_TTL_S, **prm)
    wait_file(d / "b_ready.json", 60, [(net, a), (net, b)])
    a.kill(signal.SIGKILL)
    a.proc.wait(10)
    assert a.proc.returncode == -signal.SIGKILL, a.proc.returncode
    put_file(d / "a_killed.json", {"at": time.monotonic()})
    R = net.collect(b, 90)
    assert R["load_after_kill_s"] < TASK_TIMEOUT_MS / 1000.0 + SLACK_S, R
    assert R["a_dropped_after_s"] < CLIENT_TTL_S + 20, R
    print("\npeer killed: %s" % json.dumps({k: v for k, v in R.items() if k != "_seconds"}))
