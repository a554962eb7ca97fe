"""kvshelf.mooncake_store.MooncakeBlockStore against a real Mooncake Store
(issue 16): mooncake_master 0.3.13.post1 from PyPI (tests/integration/
mooncake_env.py) and Mooncake's own client, in a network namespace this test
makes (tests/python/mooncake_net.py), started and stopped here on free ports.

Each ``scenario_*`` runs in a process inside the namespace (``net.run``),
bounded by a timeout, so a hang fails the test instead of stopping the run.
The checks without Mooncake (configuration, arguments) run in this process.
Skipped only where a network namespace cannot be made (not root).

    sudo python3 -m pytest tests/python/test_mooncake_store.py -v
"""
import ctypes
import hashlib
import importlib
import importlib.util
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

import mooncake_net as mn

MOD = "test_mooncake_store"
SRC = mn.REPO / "python" / "kvshelf"
#: kvshelf's modules the Mooncake tests take from this tree when the installed
#: copies differ (the C extension stays the installed one): the tests test
#: the tree without a rebuild
OVERLAY = ("mooncake_store.py", "ucm_mooncake.py", "ucm.py")


def use_tree_sources() -> bool:
    """Puts this tree's python/kvshelf first on kvshelf's package path when
    an installed copy of the modules in OVERLAY differs. Call before
    importing them. True when the tree's sources are used."""
    import kvshelf

    inst = Path(kvshelf.__file__).resolve().parent
    stale = [f for f in OVERLAY
             if not (inst / f).exists() or (inst / f).read_bytes() != (SRC / f).read_bytes()]
    if stale and str(SRC) not in kvshelf.__path__:
        kvshelf.__path__.insert(0, str(SRC))
    return bool(stale)


def import_store(with_mooncake: bool = True):
    """kvshelf.mooncake_store as this tree has it (see use_tree_sources);
    with_mooncake: Mooncake's package ($KVSHELF_MC_SITE, else the venv of
    mooncake_env.py) importable too."""
    if with_mooncake:
        site = os.environ.get("KVSHELF_MC_SITE") or str(mn.site_packages())
        if site not in sys.path:
            sys.path.append(site)
    tree = use_tree_sources()
    mod = importlib.import_module("kvshelf.mooncake_store")
    if tree and Path(mod.__file__).resolve().parent != SRC:
        # imported from the installed package earlier in this process: load the tree's copy beside it
        spec = importlib.util.spec_from_file_location("kvshelf._tree_mooncake_store",
                                                      SRC / "mooncake_store.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def net(tmp_path_factory):
    yield from mn.net_fixture(tmp_path_factory, "mooncake", "t")


@pytest.fixture
def master(net):
    net.start_master()
    yield net
    net.stop_master()


@pytest.fixture(scope="module")
def ms():
    return import_store(with_mooncake=False)


# --------------------------------------------------- helpers (both sides)
def _xxh3():
    f = ctypes.CDLL("libxxhash.so.0").XXH3_64bits
    f.restype = ctypes.c_uint64
    f.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return lambda b: int(f(b, len(b)))


def make_object(mkey, payload, *, magic=b"KVSHMC01", algo=1, length=None, key_for_hash=None,
                checksum=None, version=1):
    """An object in the documented layout, built here independently of the
    store's code (64-byte header, then the payload)."""
    if checksum is None:
        if algo == 1:
            checksum = _xxh3()(payload)
        else:
            checksum = int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")
    kh = hashlib.blake2b((key_for_hash or mkey).encode(), digest_size=16).digest()
    hdr = struct.pack("<8sHHIQ16sQ16x", magic, version, algo, 64,
                      len(payload) if length is None else length, kh, checksum)
    return hdr + payload


def open_store(ctx, **over):
    ms = import_store()
    return ms, ms.MooncakeBlockStore(dict(ctx.config, **over))


# ============================================================ in-process
def test_config_errors(ms):
    import kvshelf

    base = {"store": "mooncake", "master_server_address": "10.1.2.3:50051",
            "metadata_server": "http://10.1.2.3:8080/metadata", "local_hostname": "10.1.2.4"}
    c = ms.parse_config(dict(base, global_segment_size="64MiB", staging_size=32 << 20))
    assert c["global_segment_size"] == 64 << 20 and c["staging_size"] == 32 << 20
    assert c["protocol"] == "tcp" and c["replica_num"] == 1 and c["batch_size"] == 64
    assert ms.is_mooncake(base) and not ms.is_mooncake({"master_server_address": "x:1"})
    cases = [
        (dict(base, master_server_adress="x:1"), "did you mean 'master_server_address'"),
        (dict(base, secret="s"), "'secret' (a key of kvshelf's own pool"),
        (dict(base, store="kvshelf"), "store='kvshelf'"),
        (dict(base, master_server_address=""), "needs master_server_address"),
        (dict(base, master_server_address="nohost"), "must be host:port"),
        (dict(base, metadata_server=""), "needs metadata_server"),
        (dict(base, protocol="udp"), "'tcp' or 'rdma'"),
        (dict(base, batch_size=0), "batch_size=0 is out of range"),
        (dict(base, replica_num="two"), "replica_num='two' must be an integer"),
        (dict(base, global_segment_size="lots"), "global_segment_size='lots' is not a size"),
        (dict(base, staging_size=100), "staging_size=100 is too small"),
        (dict(base, local_hostname=5), "local_hostname=5 must be a string"),
    ]
    for cfg, want in cases:
        with pytest.raises(kvshelf.ConfigError) as ei:
            ms.parse_config(cfg)
        assert want in str(ei.value), (cfg, str(ei.value))
        assert isinstance(ei.value, ValueError)
    # the valid keys are listed with an unknown one
    with pytest.raises(kvshelf.ConfigError, match="Valid keys -- Mooncake's: local_hostname"):
        ms.parse_config(dict(base, nonsense=1))
    # a JSON file works like the dict
    import json
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(dict(base, batch_size=8), f)
    try:
        assert ms.parse_config(f.name)["batch_size"] == 8
    finally:
        os.unlink(f.name)


class FakeClient:
    """Enough of MooncakeDistributedStore for argument checks (no I/O)."""

    def register_buffer(self, ptr, size):
        return 0

    def unregister_buffer(self, ptr):
        return 0

    def health_check(self):
        return 0

    def close(self):
        return 0


def test_bad_arguments_are_clear_errors(ms):
    import kvshelf
    import numpy as np

    cfg = {"master_server_address": "10.1.2.3:50051", "metadata_server": "P2PHANDSHAKE",
           "local_hostname": "10.1.2.4", "staging_size": "1MiB"}
    s = ms.MooncakeBlockStore(cfg, client=FakeClient())
    try:
        with pytest.raises(kvshelf.InvalidArgument, match="2 keys but 1 buffers"):
            s.dump([b"a", b"b"], [np.zeros(8, np.uint8)])
        with pytest.raises(kvshelf.InvalidArgument, match="read-only"):
            s.load([b"a"], [b"12345678"])
        with pytest.raises(kvshelf.InvalidArgument, match="not contiguous"):
            s.dump([b"a"], [np.zeros((8, 8), np.uint8)[:, 1]])
        with pytest.raises(kvshelf.InvalidArgument, match="empty key"):
            s.dump([b""], [np.zeros(8, np.uint8)])
        with pytest.raises(kvshelf.TooLarge, match="staging_size"):
            s.dump([b"big"], [np.zeros(1 << 20, np.uint8)])
        torch = pytest.importorskip("torch")
        with pytest.raises(kvshelf.Unsupported, match="moves host memory and CUDA tensors"):
            s.dump([b"t"], [torch.empty(16, device="meta")])
        assert s.dump([], []).done and s.load([], []).results() == []
    finally:
        s.close()
    with pytest.raises(kvshelf.Closed):
        s.dump([b"a"], [np.zeros(8, np.uint8)])
    with pytest.raises(kvshelf.Closed):
        s.lookup([b"a"])


class DictClient(FakeClient):
    """An in-memory stand-in for Mooncake's client (objects in a dict); its
    transfers and lookups wait while ``gate`` is clear."""

    def __init__(self):
        self.objs = {}
        self.gate = threading.Event()
        self.gate.set()

    def batch_put_from(self, keys, ptrs, sizes, upsert=False):
        self.gate.wait()
        r = []
        for k, p, n in zip(keys, ptrs, sizes):
            if k in self.objs and not upsert:
                r.append(-705)
            else:
                self.objs[k] = ctypes.string_at(p, n)
                r.append(0)
        return r

    def batch_upsert_from(self, keys, ptrs, sizes):
        return self.batch_put_from(keys, ptrs, sizes, upsert=True)

    def batch_get_into(self, keys, ptrs, sizes):
        self.gate.wait()
        r = []
        for k, p, n in zip(keys, ptrs, sizes):
            o = self.objs.get(k)
            if o is None:
                r.append(-704)
            elif len(o) > n:
                r.append(-600)
            else:
                ctypes.memmove(p, o, len(o))
                r.append(len(o))
        return r

    def batch_is_exist(self, keys):
        self.gate.wait()
        return [1 if k in self.objs else 0 for k in keys]


FAKE_CFG = {"master_server_address": "10.1.2.3:50051", "metadata_server": "P2PHANDSHAKE",
            "local_hostname": "10.1.2.4", "staging_size": "1MiB"}


def test_parts_and_tags(ms):
    """A block given as a list of buffers is their concatenation; a tag
    stored with a block must match on load, else a miss (nothing copied)."""
    import kvshelf
    import numpy as np

    NF = kvshelf._kvshelf.ERR_NOT_FOUND
    s = ms.MooncakeBlockStore(FAKE_CFG, client=DictClient())
    try:
        rng = np.random.default_rng(2)
        a = rng.integers(0, 256, 1000, dtype=np.uint8)
        b = rng.integers(0, 256, 3000, dtype=np.uint8)
        c = rng.integers(0, 256, 96, dtype=np.uint8)
        whole = np.concatenate([a, b, c])
        t = s.dump(["p1", "p2"], [[a, b, (int(c.ctypes.data), c.nbytes)], whole], tags=[7, 1 << 63])
        assert s.wait(t, 10) == [0, 0], t.error
        one = np.zeros(whole.size, np.uint8)
        split = [np.zeros(2500, np.uint8), np.zeros(whole.size - 2500, np.uint8)]
        assert s.wait(s.load(["p1", "p2"], [one, split], tags=[7, 1 << 63]), 10) == [0, 0]
        assert np.array_equal(one, whole) and np.array_equal(np.concatenate(split), whole)
        # another tag, or none: a miss, the buffer untouched
        for tags in (8, None):
            out = np.full(whole.size, 0xEE, np.uint8)
            t = s.load(["p1"], [out], tags=tags)
            assert s.wait(t, 10) == [NF] and t.mismatches() == [0] and (out == 0xEE).all()
        t = s.load(["absent"], [np.zeros(8, np.uint8)], tags=7)
        assert s.wait(t, 10) == [NF] and t.mismatches() == []
        with pytest.raises(kvshelf.InvalidArgument, match="2 keys but 1 tags"):
            s.dump(["x", "y"], [a, b], tags=[1])
        with pytest.raises(kvshelf.InvalidArgument, match="64-bit"):
            s.dump(["x"], [a], tags=-1)
        assert s.stats()["mismatch"] == 2
    finally:
        s.close()


def test_finish_cancels_and_stalls_fail_fast(ms):
    """finish() bounds a task by task_timeout_ms: what is left fails with
    ERR_TIMEOUT and the caller's buffer is never written afterwards; while a
    call into Mooncake hangs past task_timeout_ms, new calls fail at once."""
    import kvshelf
    import numpy as np

    c = DictClient()
    s = ms.MooncakeBlockStore(dict(FAKE_CFG, task_timeout_ms=300), client=c)
    try:
        src = np.arange(4096, dtype=np.uint32).view(np.uint8)
        assert s.wait(s.dump(["k"], [src]), 10) == [0]
        c.gate.clear()  # Mooncake's calls now hang
        dst = np.full(src.size, 0xEE, np.uint8)
        t0 = time.monotonic()
        t = s.load(["k"], [dst])
        assert s.finish(t) == [kvshelf._kvshelf.ERR_TIMEOUT]
        took = time.monotonic() - t0
        assert 0.25 < took < 2.0, took
        assert isinstance(t.exception(), kvshelf.Timeout) and "task_timeout_ms=300" in t.error
        time.sleep(0.3)  # the call has hung longer than task_timeout_ms now
        t0 = time.monotonic()
        t2 = s.dump(["k2"], [src])
        assert t2.done and t2.results() == [kvshelf._kvshelf.ERR_TIMEOUT] and "has not returned" in t2.error
        with pytest.raises(kvshelf.Timeout, match="has not returned"):
            s.lookup(["k"])
        assert time.monotonic() - t0 < 0.5
        c.gate.set()  # the hung call returns: its bytes are not copied into the cancelled task's buffer
        deadline = time.monotonic() + 5
        while s._calls and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        assert (dst == 0xEE).all()
        out = np.zeros(src.size, np.uint8)
        assert s.wait(s.load(["k"], [out]), 10) == [0] and np.array_equal(out, src)
        assert s.lookup(["k", "k2"]) == [True, False]
        assert s.stats()["timeouts"] >= 1
    finally:
        c.gate.set()
        s.close()


# ==================================================== against Mooncake
def scenario_roundtrip(ctx):
    import numpy as np
    import torch

    # small batches and staging: many batches, both pipeline stages busy
    ms, s = open_store(ctx, batch_size=16, staging_size="16MiB")
    rng = np.random.default_rng(7)
    sizes = [0, 1, 4095, 4096, 4097, 65536, 1 << 20, (1 << 20) + 3]
    sizes += [int(x) for x in rng.integers(1, 1 << 20, 192)]
    src = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    # keys: text, text as str, raw binary hashes
    keys = []
    for i in range(len(sizes)):
        keys.append(b"rt-%d" % i if i % 3 == 0 else ("rt-s-%d" % i if i % 3 == 1 else
                                                      hashlib.sha256(b"rt%d" % i).digest()))
    with s:
        t0 = time.monotonic()
        tasks = [s.dump(keys[i::4], src[i::4]) for i in range(4)]  # 4 tasks in flight
        for t in tasks:
            assert s.wait(t, 120) == [0] * len(t.keys), t.error
        dump_s = time.monotonic() - t0
        again = s.dump(keys[:10], src[:10])  # already stored: success, not rewritten
        assert s.wait(again, 60) == [0] * 10, again.error
        dst = [np.full(n, 0x5A, np.uint8) for n in sizes]
        t0 = time.monotonic()
        tasks = [s.load(keys[i::3], dst[i::3]) for i in range(3)]
        for t in tasks:
            assert s.wait(t, 120) == [0] * len(t.keys), t.error
        load_s = time.monotonic() - t0
        bad = [i for i in range(len(sizes)) if not np.array_equal(src[i], dst[i])]
        assert not bad, "blocks %s differ" % bad[:10]

        # other kinds of host memory
        blob = bytes(rng.integers(0, 256, 3000, dtype=np.uint8))
        tens = torch.arange(1000, dtype=torch.float32)
        raw = np.arange(777, dtype=np.uint8)
        t = s.dump(["kind-bytes", "kind-bytearray", "kind-torch", "kind-addr"],
                   [blob, bytearray(blob[:100]), tens, (int(raw.ctypes.data), raw.nbytes)])
        assert s.wait(t, 60) == [0] * 4, t.error
        ba = bytearray(3000)
        mv_target = bytearray(100)
        tens2 = torch.zeros(1000, dtype=torch.float32)
        raw2 = np.zeros(777, np.uint8)
        t = s.load(["kind-bytes", "kind-bytearray", "kind-torch", "kind-addr"],
                   [ba, memoryview(mv_target), tens2, (int(raw2.ctypes.data), raw2.nbytes)])
        assert s.wait(t, 60) == [0] * 4, t.error
        assert bytes(ba) == blob and bytes(mv_target) == blob[:100]
        assert torch.equal(tens, tens2) and np.array_equal(raw, raw2)
        st = s.stats()
    n = len(sizes)
    assert st["put_calls"] >= n // 16 and st["get_calls"] >= n // 16, st
    assert st["mismatch"] == 0 and st["load_errors"] == 0 and st["dump_errors"] == 0, st
    return {"blocks": n, "bytes": sum(sizes), "dump_s": dump_s, "load_s": load_s,
            "put_calls": st["put_calls"], "get_calls": st["get_calls"]}


def test_roundtrip_many_blocks_in_batches(master):
    r = master.run(MOD, "roundtrip", timeout=240)
    assert r["blocks"] == 200 and r["put_calls"] >= 13, r


def scenario_backpressure(ctx):
    import kvshelf
    import numpy as np

    ms, s = open_store(ctx, max_inflight=1, batch_size=4, timeout_ms=200)
    blocks = [np.full(256 << 10, i, np.uint8) for i in range(32)]
    accepted, busy, msg = [], 0, ""
    with s:
        for r in range(200):
            try:
                accepted.append(s.dump([b"bp-%d-%d" % (r, i) for i in range(32)], blocks,
                                       block=False))
            except kvshelf.Busy as e:
                busy += 1
                msg = str(e)
                if busy >= 3:
                    break
        assert busy >= 1, "max_inflight=1 never refused a task"
        assert "max_inflight" in msg, msg
        # blocking submission waits for room (timeout_ms=200 would raise Busy; give it more)
        more = [s.dump([b"bpw-%d-%d" % (r, i) for i in range(32)], blocks, timeout=60)
                for r in range(4)]
        for t in accepted + more:
            assert s.wait(t, 120) == [0] * 32, t.error
        dst = [np.zeros(256 << 10, np.uint8) for _ in range(32)]
        t = s.load([b"bpw-3-%d" % i for i in range(32)], dst)
        assert s.wait(t, 60) == [0] * 32
        assert all(int(d[0]) == i and int(d[-1]) == i for i, d in enumerate(dst))
        busy_stat = s.stats()["busy"]
    return {"accepted": len(accepted), "busy": busy, "busy_stat": busy_stat}


def test_backpressure_bounded_queue(master):
    r = master.run(MOD, "backpressure", timeout=180)
    assert r["busy"] >= 1 and r["accepted"] >= 1, r


def scenario_lookups_and_misses(ctx):
    import kvshelf
    import numpy as np

    ERR_NOT_FOUND = kvshelf._kvshelf.ERR_NOT_FOUND
    ms, s = open_store(ctx)
    n = 8192 + 17
    keys = [b"lk-%d" % i for i in range(20)]
    data = [np.full(n, i + 1, np.uint8) for i in range(20)]
    with s:
        assert s.wait(s.dump(keys, data), 60) == [0] * 20
        gone = [b"lk-missing-%d" % i for i in range(3)]
        assert s.lookup(keys + gone) == [True] * 20 + [False] * 3
        assert s.lookup([]) == []
        assert s.lookup_prefix(keys[:10] + gone[:1] + keys[10:]) == 10
        assert s.lookup_prefix(keys, chunk=3) == 20  # across round trips
        assert s.lookup_prefix(gone + keys) == 0
        assert s.lookup_prefix([]) == 0
        # a missing block is a miss and its buffer is left alone
        bufs = [np.full(n, 0xAB, np.uint8) for _ in range(3)]
        t = s.load([keys[0], gone[0], keys[1]], bufs)
        assert s.wait(t, 60) == [0, ERR_NOT_FOUND, 0]
        assert t.failed() == [1] and t.misses() == [1] and t.errors() == []
        assert t.exception() is None and t.ok == 2
        t.raise_for_errors()  # misses are not errors
        assert (bufs[1] == 0xAB).all() and (bufs[0] == 1).all() and (bufs[2] == 2).all()
        # a buffer of another size: the stored block does not match it -> miss
        small, large = np.full(n - 1, 0xCD, np.uint8), np.full(n + 1, 0xCD, np.uint8)
        t = s.load([keys[2], keys[2]], [small, large])
        assert s.wait(t, 60) == [ERR_NOT_FOUND, ERR_NOT_FOUND]
        assert (small == 0xCD).all() and (large == 0xCD).all()
        # removed (force: lookups hold a lease on it) -> gone, misses
        assert s.remove([keys[3]], force=True) == [0]
        assert s.lookup([keys[3]]) == [False]
        assert s.remove([b"never-there"]) == [ERR_NOT_FOUND]
        t = s.load([keys[3]], [np.zeros(n, np.uint8)])
        assert s.wait(t, 60) == [ERR_NOT_FOUND]
        st = s.stats()
    return {"mismatch": st["mismatch"], "load_misses": st["load_misses"]}


def test_lookups_prefix_and_misses(master):
    r = master.run(MOD, "lookups_and_misses", timeout=120)
    assert r["mismatch"] == 2 and r["load_misses"] == 4, r


def scenario_foreign_objects(ctx):
    import kvshelf
    import numpy as np

    ERR_NOT_FOUND = kvshelf._kvshelf.ERR_NOT_FOUND
    ms, s = open_store(ctx)
    n = 3 * 4096 + 5
    rng = np.random.default_rng(11)
    payload = bytes(rng.integers(0, 256, n, dtype=np.uint8))
    flipped = bytearray(payload)
    flipped[n // 2] ^= 0x01

    def key(name):
        return "fo-" + name

    objects = {  # written under the key with Mooncake's own put
        "valid-xxh3": make_object(key("valid-xxh3"), payload),
        "valid-blake2b": make_object(key("valid-blake2b"), payload, algo=2),
        "foreign-bytes": bytes(rng.integers(0, 256, 64 + n, dtype=np.uint8)),
        "payload-flipped": make_object(key("payload-flipped"), payload)[:64] + bytes(flipped),
        "other-key": make_object(key("other-key"), payload, key_for_hash=key("valid-xxh3")),
        "length-field": make_object(key("length-field"), payload, length=n - 1),
        "short-object": make_object(key("short-object"), payload)[:-1],
        "long-object": make_object(key("long-object"), payload) + b"\0",
        "bad-magic": make_object(key("bad-magic"), payload, magic=b"KVSHMC02"),
        "unknown-algo": make_object(key("unknown-algo"), payload, algo=7),
        "bad-checksum": make_object(key("bad-checksum"), payload, checksum=12345),
        "bad-version": make_object(key("bad-version"), payload, version=2),
    }
    with s:
        mc = s.client
        for name, obj in objects.items():
            assert mc.put(key(name), obj) == 0, name
        names = list(objects)
        assert s.lookup([key(x) for x in names]) == [True] * len(names)  # lookups do not read
        bufs = [np.full(n, 0xEE, np.uint8) for _ in names]
        t = s.load([key(x) for x in names], bufs)
        res = s.wait(t, 60)
        want = [0 if x.startswith("valid") else ERR_NOT_FOUND for x in names]
        assert res == want, list(zip(names, res))
        for x, b in zip(names, bufs):
            if x.startswith("valid"):
                assert bytes(b) == payload, x
            else:
                assert (b == 0xEE).all(), "%s: the buffer of a miss was written" % x
        # a block kvshelf dumped, then overwritten in place by Mooncake's upsert
        good = np.frombuffer(payload, np.uint8).copy()
        assert s.wait(s.dump(["fo-dumped"], [good]), 60) == [0]
        assert mc.upsert("fo-dumped", make_object("fo-dumped", payload)[:64] + bytes(flipped)) == 0
        out = np.full(n, 0xEE, np.uint8)
        assert s.wait(s.load(["fo-dumped"], [out]), 60) == [ERR_NOT_FOUND]
        assert (out == 0xEE).all()
        # the next dump of a key found bad replaces its object (put would keep it)
        heal = ["fo-dumped", key("foreign-bytes"), key("payload-flipped")]
        t0 = time.monotonic()
        while True:
            t = s.dump(heal, [good] * 3)
            res = s.wait(t, 60)
            if res == [0] * 3 or time.monotonic() - t0 > 30:
                break
            time.sleep(0.5)  # a reader's lease (ours, from the load) may hold it a while
        assert res == [0] * 3, (res, t.error)
        outs = [np.full(n, 0xEE, np.uint8) for _ in heal]
        assert s.wait(s.load(heal, outs), 60) == [0] * 3
        assert all(bytes(o) == payload for o in outs)
        st = s.stats()
    return {"mismatch": st["mismatch"], "objects": len(objects), "rewritten": st["rewritten"],
            "heal_s": time.monotonic() - t0}


def test_foreign_or_corrupted_objects_are_misses(master):
    r = master.run(MOD, "foreign_objects", timeout=120)
    assert r["mismatch"] == r["objects"] - 2 + 1 and r["rewritten"] == 3, r


def scenario_master_killed(ctx):
    import kvshelf
    import numpy as np

    ms, s = open_store(ctx, retry_interval_ms=3000, timeout_ms=3000)
    n = 256 << 10
    keys = [b"mk-%d" % i for i in range(16)]
    data = [np.full(n, i + 1, np.uint8) for i in range(16)]
    out = {}
    assert s.wait(s.dump(keys, data), 60) == [0] * 16
    ctx.kill_master()
    time.sleep(0.2)
    t0 = time.monotonic()
    td = s.dump([b"mk-new-%d" % i for i in range(16)], data)
    bufs = [np.full(n, 0xCD, np.uint8) for _ in range(16)]
    tl = s.load(keys, bufs)
    assert td.wait(60) and tl.wait(60), "tasks still running 60 s after the master died"
    out["tasks_s"] = time.monotonic() - t0
    rd, rl = td.results(), tl.results()
    assert all(r != 0 for r in rd), rd  # nothing can be stored without a master
    e = td.exception()
    assert isinstance(e, kvshelf.ConnectionFailed), (rd, td.error)
    assert ctx.config["master_server_address"] in str(e), str(e)
    with pytest.raises(kvshelf.ConnectionFailed):
        td.raise_for_errors()
    for i, r in enumerate(rl):  # loaded -> the right bytes; anything else -> untouched
        if r == 0:
            assert (bufs[i] == i + 1).all(), i
        else:
            assert (bufs[i] == 0xCD).all(), i
    out["load_results"] = sorted(set(rl))
    # while it is down, calls fail at once with a clear error
    t0 = time.monotonic()
    with pytest.raises(kvshelf.ConnectionFailed, match="unreachable"):
        s.lookup(keys)
    with pytest.raises(kvshelf.ConnectionFailed, match="unreachable"):
        s.lookup_prefix(keys)
    t = s.dump([b"mk-fast"], [data[0]])
    assert t.wait(10) and t.errors() == [0]
    out["fast_fail_s"] = time.monotonic() - t0
    assert out["fast_fail_s"] < 2.0, out
    # after the retry interval the next call asks Mooncake again: still an error, bounded
    time.sleep(3.2)
    t0 = time.monotonic()
    try:
        s.lookup(keys)
        raise AssertionError("lookup succeeded with the master dead")
    except kvshelf.Error as e:
        out["retry_error"] = type(e).__name__
    out["retry_s"] = time.monotonic() - t0
    assert out["retry_s"] < 20, out
    t0 = time.monotonic()
    s.close(timeout=20)
    out["close_s"] = time.monotonic() - t0
    assert out["close_s"] < 25, out
    with pytest.raises(kvshelf.Closed):
        s.lookup(keys)
    return out


def test_master_killed_clear_errors_no_hang(master):
    r = master.run(MOD, "master_killed", timeout=150)
    assert r["tasks_s"] < 60 and r["fast_fail_s"] < 2.0 and r["close_s"] < 25, r
    assert r["retry_error"] in ("ConnectionFailed", "Timeout", "Unavailable"), r


def scenario_setup_errors(ctx):
    import kvshelf

    ms = import_store()
    out = {}
    # nothing listens at the master's address: at once, not after Mooncake's ~90 s
    sock = socket.socket()
    sock.bind((mn.NS_IP, 0))
    free = sock.getsockname()[1]
    sock.close()
    bad = dict(ctx.config, master_server_address="%s:%d" % (mn.NS_IP, free))
    t0 = time.monotonic()
    with pytest.raises(kvshelf.ConnectionFailed, match="cannot reach master_server_address"):
        ms.MooncakeBlockStore(bad)
    out["no_master_s"] = time.monotonic() - t0
    # the metadata service is not there
    bad = dict(ctx.config, metadata_server="http://%s:%d/metadata" % (mn.NS_IP, free))
    with pytest.raises(kvshelf.ConnectionFailed, match="cannot reach metadata_server"):
        ms.MooncakeBlockStore(bad)
    # a server that speaks first (as kvshelf's own master does) is not Mooncake's
    srv = socket.socket()
    srv.bind((mn.NS_IP, 0))
    srv.listen(4)

    def greet():
        try:
            c, _ = srv.accept()
            c.sendall(b"KVSH\x01CHALLENGE")
            time.sleep(1)
            c.close()
        except OSError:
            pass

    th = threading.Thread(target=greet, daemon=True)
    th.start()
    bad = dict(ctx.config, master_server_address="%s:%d" % srv.getsockname())
    with pytest.raises(kvshelf.ConnectionFailed, match="not a mooncake_master"):
        ms.MooncakeBlockStore(bad)
    srv.close()
    out["total_s"] = time.monotonic() - t0
    assert out["total_s"] < 10, out
    return out


def test_setup_errors_are_immediate(master):
    r = master.run(MOD, "setup_errors", timeout=120)
    assert r["no_master_s"] < 5 and r["total_s"] < 10, r
