"""Connector.dump_parts / load_parts (objects made of explicit parts, no
layout) with host memory, and the UCM stores' device path: run on CI by
routing "device" tensors to a host-memory connector, and for real on a GPU
(tests marked gpu skip when torch.cuda.is_available() is false)."""
import numpy as np
import pytest

import kvshelf
from kvshelf import _kvshelf as _k
from kvshelf import ucm

torch = pytest.importorskip("torch")
# evaluated when a marked test runs, so CUDA is probed only by the GPU tests
gpu = pytest.mark.skipif("not torch.cuda.is_available()",
                         reason="needs a CUDA GPU (torch.cuda.is_available())")


@pytest.fixture
def conn(cfg, uniq):
    c = _k.Connector(cfg, namespace=uniq, device=-2)
    yield c
    c.close()


def rows(n, m=3, dev="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [100, 7, 4096][:m]
    return [[torch.randn(s, generator=g).to(dev) for s in sizes] for _ in range(n)]


def hashes(uniq, n):
    return [("%s%d" % (uniq, i)).encode()[-60:] for i in range(n)]


def same(a, b):
    return all(torch.equal(x.cpu(), y.cpu()) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_roundtrip_rows_flat_and_addresses(conn, uniq):
    n = 20
    src, dst = rows(n, seed=1), [[torch.zeros_like(t) for t in r] for r in rows(n)]
    h = hashes(uniq, n)
    t = conn.dump_parts(h, src)
    assert t.wait() and t.results() == [0] * n and t.ok == n
    t = conn.load_parts(h, [x for r in dst for x in r], parts_per_obj=3)
    assert t.wait() and t.results() == [0] * n
    assert same(src, dst)
    for r in dst:
        for x in r:
            x.zero_()
    addrs = np.array([[x.data_ptr() for x in r] for r in dst], dtype=np.uint64)
    t = conn.load_parts(h, addrs, sizes=[400, 28, 16384])
    assert t.wait() and t.results() == [0] * n
    assert same(src, dst)
    c = conn.counters()
    assert c["dumped_blocks"] == n and c["loaded_blocks"] == 2 * n
    # dumped again: skipped
    t = conn.dump_parts(h, src)
    t.wait()
    assert t.results() == [0] * n and conn.counters()["skipped_blocks"] == n
    assert conn.lookup(h) == [True] * n


def test_misses_and_mismatches_copy_nothing(conn, uniq):
    n = 4
    src = rows(n, seed=2)
    h = hashes(uniq, n)
    conn.dump_parts(h, src, tags=[5] * n).wait()
    dst = [[torch.full_like(t, 3.0) for t in r] for r in src]
    t = conn.load_parts(hashes(uniq + "x", n), dst, tags=[5] * n)
    t.wait()
    assert t.results() == [_k.ERR_NOT_FOUND] * n
    t = conn.load_parts(h, dst, tags=[6] * n)  # other tag
    t.wait()
    assert t.results() == [_k.ERR_CORRUPT] * n
    other = [[torch.full((s,), 3.0) for s in (100, 8, 4096)] for _ in range(n)]  # bigger
    t = conn.load_parts(h, other, tags=[5] * n)
    t.wait()
    assert t.results() == [_k.ERR_TOO_LARGE] * n
    assert all(bool((x == 3.0).all()) for r in dst + other for x in r)
    t = conn.load_parts(h, dst, tags=[5] * n)
    t.wait()
    assert t.results() == [0] * n and same(src, dst)


def test_argument_errors(conn, uniq):
    h = hashes(uniq, 2)
    with pytest.raises(TypeError):
        conn.dump_parts(h, [[1, 2], [3, 4]])  # addresses need sizes
    with pytest.raises(ValueError):
        conn.dump_parts(h, rows(3))  # 2 hashes, 3 rows
    with pytest.raises(ValueError):
        conn.dump_parts(h, [torch.zeros(4)] * 3, parts_per_obj=2)
    with pytest.raises(ValueError):
        conn.dump_parts(h, rows(2), sizes=[1, 2, 3])  # sizes disagree with the tensors
    with pytest.raises(ValueError):
        conn.load_parts(h, [[torch.zeros(4, 4).t()]] * 2)  # not contiguous
    with pytest.raises(kvshelf.Error):
        conn.dump_parts(h, [[1], [2]], sizes=0)  # zero-length parts
    t = conn.dump_parts([], [])
    assert t.wait() and t.results() == []


# ---- the UCM stores' device path, routed to a host-memory connector -------

class _Tagged(torch.Tensor):
    """A CPU tensor the test calls 'on device 0'."""


@pytest.fixture
def fake_device(monkeypatch, cfg):
    real = ucm._tensor_device
    monkeypatch.setattr(ucm, "_tensor_device", lambda t: 0 if isinstance(t, _Tagged) else real(t))

    def _connector(self, device):
        assert device == 0
        with self._conn_lock:
            c = self._conns.get(-99)
            if c is None:
                c = self._conns[-99] = _k.Connector(self._store_cfg, namespace="t", device=-2)
            return c

    monkeypatch.setattr(ucm._StoreCore, "_connector", _connector)


def tag(t):
    return t.as_subclass(_Tagged)


def test_legacy_device_path(cfg, uniq, fake_device):
    s = ucm.UcmKVShelfStore(dict(cfg))
    try:
        n = 6
        ids = [uniq + str(i) for i in range(n)]
        src = [torch.randn(4, 8) for _ in range(n)]
        # entries 0..3 "on the GPU", 4..5 on the host: one task, both paths
        srcs = [tag(t) if i < 4 else t for i, t in enumerate(src)]
        assert s.wait(s.dump(ids, [0] * n, srcs)) == 0
        assert s.lookup(ids) == [True] * n
        dst = [tag(torch.zeros(4, 8)) if i < 4 else torch.zeros(4, 8) for i in range(n)]
        assert s.wait(s.load(ids, [0] * n, dst)) == 0
        assert all(torch.equal(a, b) for a, b in zip(src, dst))
        # other dtype, same size: fails with a message, nothing copied
        bad = [tag(torch.zeros(4, 8, dtype=torch.int32)) for _ in range(4)]
        t = s.load(ids[:4], [0] * 4, bad)
        assert s.wait(t) == 1
        assert t.statuses == [_k.ERR_CORRUPT] * 4
        assert "dtype=int32" in t.messages[0] and not any(bool(x.any()) for x in bad)
        # a host-written object into "device" memory: a miss, never wrong bytes
        t = s.load(ids[4:], [0, 0], [tag(torch.zeros(4, 8)), tag(torch.zeros(4, 8))])
        assert s.wait(t) == 1 and t.statuses == [_k.ERR_NOT_FOUND] * 2
    finally:
        s.shutdown()


def test_v1_device_path(cfg, uniq, fake_device):
    s = ucm.UcmKVShelfStoreV1(dict(cfg))
    try:
        n = 5
        ids = [(uniq + str(i)).encode()[-16:].ljust(16, b"_") for i in range(n)]
        src = [[tag(torch.randn(64)), tag(torch.randn(32))] for _ in range(n)]
        s.wait(s.dump(ids, [0] * n, src))
        assert s.lookup(ids) == [True] * n
        dst = [[tag(torch.zeros(64)), tag(torch.zeros(32))] for _ in range(n)]
        s.wait(s.load(ids, [0] * n, dst))
        assert all(torch.equal(a, b) for ra, rb in zip(src, dst) for a, b in zip(ra, rb))
        bad = [[tag(torch.zeros(32)), tag(torch.zeros(64))] for _ in range(n)]
        with pytest.raises(ValueError):  # sizes checked at submission, as before
            s.load(ids, [0] * n, bad)
    finally:
        s.shutdown()


# ---- real GPUs ----------------------------------------------------------------

@gpu
def test_gpu_connector_parts(cfg, uniq):
    c = _k.Connector(cfg, namespace=uniq, device=0)
    try:
        n = 16
        src = rows(n, dev="cuda:0", seed=3)
        dst = [[torch.zeros_like(t) for t in r] for r in src]
        h = hashes(uniq, n)
        ev = torch.cuda.Event()
        ev.record()
        t = c.dump_parts(h, src, ev)
        assert t.wait() and t.results() == [0] * n
        t = c.load_parts(h, dst)
        assert t.wait() and t.results() == [0] * n
        torch.cuda.synchronize()
        assert same(src, dst)
        with pytest.raises(ValueError):
            c.dump_parts(h[:1], [[torch.zeros(4)]])  # host memory on a CUDA connector
    finally:
        c.close()


@gpu
def test_gpu_ucm_legacy_and_v1(cfg, uniq):
    s = ucm.UcmKVShelfStore(dict(cfg))
    try:
        n = 8
        ids = [uniq + "L" + str(i) for i in range(n)]
        src = [torch.randn(16, 128, device="cuda") for _ in range(n)]
        assert s.wait(s.dump(ids, [0] * n, src)) == 0
        dst = [torch.zeros(16, 128, device="cuda") for _ in range(n)]
        assert s.wait(s.load(ids, [0] * n, dst)) == 0
        assert all(torch.equal(a, b) for a, b in zip(src, dst))
        bad = [torch.zeros(16, 128, device="cuda", dtype=torch.int32) for _ in range(n)]
        t = s.load(ids, [0] * n, bad)
        assert s.wait(t) == 1 and "nothing copied" in t.messages[0]
    finally:
        s.shutdown()
    v = ucm.UcmKVShelfStoreV1(dict(cfg))
    try:
        n = 8
        ids = [(uniq + "V" + str(i)).encode()[-16:].ljust(16, b"_") for i in range(n)]
        src = [[torch.randn(1024, device="cuda"), torch.randn(512, device="cuda")] for _ in range(n)]
        v.wait(v.dump(ids, [0] * n, src))
        dst = [[torch.zeros(1024, device="cuda"), torch.zeros(512, device="cuda")] for _ in range(n)]
        v.wait(v.load(ids, [0] * n, dst))
        assert all(torch.equal(a, b) for ra, rb in zip(src, dst) for a, b in zip(ra, rb))
        # addresses of device memory (load_data / dump_data with an event)
        ids2 = [(uniq + "A" + str(i)).encode()[-16:].ljust(16, b"_") for i in range(n)]
        addrs = np.array([[a.data_ptr(), b.data_ptr()] for a, b in src], dtype=np.uint64)
        ev = torch.cuda.Event()
        ev.record()
        v.wait(v.dump_data(ids2, [0] * n, addrs, ev.cuda_event))
        for r in dst:
            for x in r:
                x.zero_()
        torch.cuda.synchronize()
        out = np.array([[a.data_ptr(), b.data_ptr()] for a, b in dst], dtype=np.uint64)
        v.wait(v.load_data(ids2, [0] * n, out))
        assert all(torch.equal(a, b) for ra, rb in zip(src, dst) for a, b in zip(ra, rb))
    finally:
        v.shutdown()
