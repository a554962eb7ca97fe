"""Striped objects (issue 14): one store object per KV block that UCM's
layerwise calls fill and read one shard (layer) at a time.

Connector.dump_parts / load_parts with stripe=/stripes= on the host backend,
UcmKVShelfStoreV1 with host_connector=True (host memory through the same
striped path the CUDA workers take), and, on a GPU, the V1 store with CUDA
memory as UCM's layerwise and direct connectors drive it."""
import os
import time

import numpy as np
import pytest

import kvshelf
from kvshelf import _kvshelf as _k
from kvshelf import ucm

try:
    import torch
except ImportError:  # the host tests need numpy only
    torch = None

gpu = pytest.mark.skipif("torch is None or not torch.cuda.is_available()",
                         reason="needs a CUDA GPU (torch.cuda.is_available())")

L, N, SZ = 4, 6, 4096  # stripes (layers), blocks, bytes per part (K and V)


@pytest.fixture
def conn(cfg, uniq):
    c = _k.Connector(cfg, namespace=uniq, device=-2)
    yield c
    c.close()


@pytest.fixture
def cl(cfg):
    c = kvshelf.Client(cfg)
    yield c
    c.close()


def stored(cfg_or_client, k):
    if isinstance(cfg_or_client, dict):
        c = kvshelf.Client(cfg_or_client)
        try:
            return list(c.exists_batch(k))
        finally:
            c.close()
    return list(cfg_or_client.exists_batch(k))


def keys(uniq, n, tag=""):
    return [(uniq + tag + str(i)).encode()[-16:].rjust(16, b"_") + b"\xff\xff\xff\xff" for i in range(n)]


def data(seed=0, layers=L, n=N):
    return np.random.default_rng(seed).integers(0, 255, (layers, n, 2, SZ), dtype=np.uint8)


def rows(a, layer):
    """Addresses of layer `layer`: one row per block, K then V (UCM's layerwise rows)."""
    return np.array([[a[layer, i, j].ctypes.data for j in range(2)] for i in range(a.shape[1])], dtype=np.uint64)


def whole_rows(a):
    """Addresses of every layer of a block in one row (UCM's direct rows)."""
    return np.array([[a[lay, i, j].ctypes.data for lay in range(a.shape[0]) for j in range(2)]
                     for i in range(a.shape[1])], dtype=np.uint64)


def dump_layer(c, k, a, layer, stripes=L):
    t = c.dump_parts(k, rows(a, layer), None, sizes=[SZ, SZ], raw_keys=True, stripe=layer, stripes=stripes)
    t.wait()
    return t.results()


def load_layer(c, k, a, layer, stripes=L):
    t = c.load_parts(k, rows(a, layer), sizes=[SZ, SZ], raw_keys=True, stripe=layer, stripes=stripes)
    t.wait()
    return t.results()


def test_striped_round_trip_and_whole_object_interop(conn, cl, uniq):
    k = keys(uniq, N)
    src, dst = data(1), np.zeros((L, N, 2, SZ), np.uint8)
    for layer in range(L):
        assert dump_layer(conn, k, src, layer) == [0] * N
        # published only once the last stripe is in
        assert stored(cl, k) == [layer == L - 1] * N
    assert conn.counters()["dumped_blocks"] == N
    for layer in range(L):
        assert load_layer(conn, k, dst, layer) == [0] * N
    assert np.array_equal(src, dst)
    # byte for byte the object a whole-object call stores: loads either way
    whole = np.zeros_like(src)
    t = conn.load_parts(k, whole_rows(whole), sizes=SZ, raw_keys=True)
    t.wait()
    assert t.results() == [0] * N and np.array_equal(src, whole)
    k2 = keys(uniq, N, "w")
    src2 = data(2)
    t = conn.dump_parts(k2, whole_rows(src2), None, sizes=SZ, raw_keys=True)
    t.wait()
    assert t.results() == [0] * N
    out = np.zeros_like(src2)
    for layer in (2, 0, 3, 1):  # any order
        assert load_layer(conn, k2, out, layer) == [0] * N
    assert np.array_equal(src2, out)


def test_striped_dump_out_of_order_duplicates_and_skips(conn, cl, uniq):
    k = keys(uniq, N)
    src = data(3)
    for layer in (3, 1, 1, 0):  # a stripe given twice is copied once
        assert dump_layer(conn, k, src, layer) == [0] * N
    assert stored(cl, k) == [False] * N
    assert dump_layer(conn, k, src, 2) == [0] * N
    assert stored(cl, k) == [True] * N
    # stored already: every stripe of a new round is skipped, nothing replaced
    other = data(4)
    for layer in range(L):
        assert dump_layer(conn, k, other, layer) == [0] * N
    assert conn.counters()["skipped_blocks"] >= N
    out = np.zeros_like(src)
    for layer in range(L):
        assert load_layer(conn, k, out, layer) == [0] * N
    assert np.array_equal(src, out)


def test_striped_misses_and_mismatches_copy_nothing(cfg, conn, uniq):
    k = keys(uniq, N)
    src = data(5)
    for layer in range(L):
        dump_layer(conn, k, src, layer)
    # block 2 removed behind the connector's back: a miss in every stripe
    c = kvshelf.Client(cfg)
    assert c.remove_batch([k[2]]) == [0]
    c.close()
    out = np.full((L, N, 2, SZ), 7, np.uint8)
    for layer in range(L):
        r = load_layer(conn, k, out, layer)
        assert r[2] == _k.ERR_NOT_FOUND and r[:2] + r[3:] == [0] * (N - 1)
    assert (out[:, 2] == 7).all()
    assert np.array_equal(np.delete(src, 2, 1), np.delete(out, 2, 1))
    # another shard count or other part sizes: nothing copied
    out[:] = 7
    assert load_layer(conn, k[:2], out[:, :2], 0, stripes=L + 1) == [_k.ERR_TOO_LARGE] * 2
    t = conn.load_parts(k[:2], rows(out[:, :2], 0), sizes=[SZ // 2, SZ + SZ // 2], raw_keys=True,
                        stripe=0, stripes=L)
    t.wait()
    assert t.results() == [_k.ERR_CORRUPT] * 2
    assert (out == 7).all()
    with pytest.raises(ValueError):
        conn.load_parts(k, rows(out, 0), sizes=SZ, raw_keys=True, stripe=L, stripes=L)


def test_incomplete_striped_dump_is_never_published(cfg, uniq, monkeypatch):
    monkeypatch.setenv("KVSHELF_STRIPE_IDLE_MS", "200")
    c = _k.Connector(cfg, namespace=uniq, device=-2)
    try:
        k = keys(uniq, N)
        src = data(6)
        for layer in range(L - 1):  # the last layer never comes
            assert dump_layer(c, k, src, layer) == [0] * N
        time.sleep(0.3)
        k2 = keys(uniq, 2, "x")  # the next job gives the idle objects up
        dump_layer(c, k2, src[:, :2], 0)
        assert stored(cfg, k) == [False] * N
        # a new round stores them whole
        for layer in range(L):
            assert dump_layer(c, k, src, layer) == [0] * N
        assert stored(cfg, k) == [True] * N
        out = np.zeros_like(src)
        for layer in range(L):
            assert load_layer(c, k, out, layer) == [0] * N
        assert np.array_equal(src, out)
    finally:
        c.close()


def test_idle_striped_dump_is_given_up_without_another_call(cfg, uniq, monkeypatch):
    """Stripes that never come, and no other call either: a worker gives the
    objects up after the idle time on its own (their reservations hold
    segment write fences), so another writer can store them whole."""
    monkeypatch.setenv("KVSHELF_STRIPE_IDLE_MS", "200")
    c = _k.Connector(cfg, namespace=uniq, device=-2)
    c2 = _k.Connector(cfg, namespace=uniq, device=-2)
    try:
        k = keys(uniq, N, "idle")
        src = data(8)
        for layer in range(L - 1):
            assert dump_layer(c, k, src, layer) == [0] * N
        time.sleep(2.5)  # no call on c meanwhile
        for layer in range(L):
            assert dump_layer(c2, k, src, layer) == [0] * N
        assert stored(cfg, k) == [True] * N
        out = np.zeros_like(src)
        for layer in range(L):
            assert load_layer(c2, k, out, layer) == [0] * N
        assert np.array_equal(src, out)
    finally:
        c.close()
        c2.close()


def test_close_gives_open_objects_up(cfg, uniq):
    c = _k.Connector(cfg, namespace=uniq, device=-2)
    k = keys(uniq, N)
    src = data(7)
    dump_layer(c, k, src, 0)
    load_k = keys(uniq, N, "l")
    for layer in range(L):
        dump_layer(c, load_k, src, layer)
    load_layer(c, load_k, np.zeros_like(src), 0)  # a lease held for the other stripes
    c.close()
    c2 = _k.Connector(cfg, namespace=uniq, device=-2)
    try:
        assert stored(cfg, k) == [False] * N  # abandoned, not published
        for layer in range(L):  # its space is free again: a new round stores it
            assert dump_layer(c2, k, src, layer) == [0] * N
        assert stored(cfg, k) == [True] * N
    finally:
        c2.close()


# ---- UcmKVShelfStoreV1 through the striped path (host memory) ---------------

def v1(cfg, layerwise, **extra):
    m = 2 * SZ
    conf = dict(cfg, device_id=-1, host_connector=True, tensor_size_list=[SZ, SZ] if layerwise else [SZ] * 2 * L,
                shard_size=m if layerwise else m * L, block_size=m * L, **extra)
    return ucm.UcmKVShelfStoreV1(conf)


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "direct"])
def test_v1_striped_as_ucm_drives_it(cfg, uniq, layerwise):
    s = v1(cfg, layerwise)
    try:
        assert s._stripes == (L if layerwise else 1)
        ids = [k[:16] for k in keys(uniq, N)]
        src, dst = data(8), np.zeros((L, N, 2, SZ), np.uint8)
        assert s.lookup_on_prefix(ids) == -1
        if layerwise:
            tasks = [s.dump_data(ids, [layer] * N, rows(src, layer), 0) for layer in range(L)]
            for t in tasks:
                assert s.wait(t) is None
        else:
            s.wait(s.dump_data(ids, [0] * N, whole_rows(src), 0))
        assert s.lookup_on_prefix(ids) == N - 1
        if layerwise:
            t = s.load_data(ids, [0] * N, rows(dst, 0))
            for layer in range(L):
                s.wait(t)
                if layer + 1 < L:
                    t = s.load_data(ids, [layer + 1] * N, rows(dst, layer + 1))
        else:
            s.wait(s.load_data(ids, [0] * N, whole_rows(dst)))
        assert np.array_equal(src, dst)
        # misses are UCM's StoreNotFoundError, nothing copied
        absent = [k[:16] for k in keys(uniq, 2, "absent")]
        out = np.full((L, 2, 2, SZ), 9, np.uint8)
        with pytest.raises(ucm.BlocksNotFound) as ei:
            s.wait(s.load_data(absent, [0, 0], rows(out, 0) if layerwise else whole_rows(out)))
        assert ei.value.failed == [0, 1] and (out == 9).all()
        with pytest.raises(ValueError, match="out of range"):
            s.load_data(ids, [L] * N, rows(dst, 0) if layerwise else whole_rows(dst))
    finally:
        s.shutdown()


def test_v1_striped_mixed_shards_in_one_call(cfg, uniq):
    s = v1(cfg, True)
    try:
        ids = [k[:16] for k in keys(uniq, N)]
        src, dst = data(9), np.zeros((L, N, 2, SZ), np.uint8)
        # call c dumps layer (c + i) % L of block i: every call mixes shards
        for c in range(L):
            shards = [(c + i) % L for i in range(N)]
            addrs = np.array([rows(src, sh)[i] for i, sh in enumerate(shards)], dtype=np.uint64)
            s.wait(s.dump_data(ids, shards, addrs, 0))
        assert s.lookup(ids) == [True] * N
        for c in range(L):
            shards = [(c + 2 * i) % L for i in range(N)]
            addrs = np.array([rows(dst, sh)[i] for i, sh in enumerate(shards)], dtype=np.uint64)
            s.wait(s.load_data(ids, shards, addrs))
        # every (block, layer) pair was loaded by some call
        assert np.array_equal(src, dst)
    finally:
        s.shutdown()


def test_v1_host_written_blocks_are_misses_to_the_striped_path(cfg, uniq):
    # the client path stores one object per shard, the last one under the
    # whole block's key: a striped load of it is a miss, nothing copied
    host = ucm.UcmKVShelfStoreV1(dict(cfg, device_id=-1, tensor_size_list=[SZ, SZ], shard_size=2 * SZ,
                                      block_size=2 * SZ * L))
    s = v1(cfg, True)
    try:
        ids = [k[:16] for k in keys(uniq, N)]
        src, dst = data(10), np.full((L, N, 2, SZ), 7, np.uint8)
        for layer in range(L):
            host.wait(host.dump_data(ids, [layer] * N, rows(src, layer), 0))
        assert s.lookup_on_prefix(ids) == N - 1  # the same key says "present"
        with pytest.raises(ucm.BlocksNotFound):
            s.wait(s.load_data(ids, [0] * N, rows(dst, 0)))
        assert (dst == 7).all()
    finally:
        host.shutdown()
        s.shutdown()


# ---- real GPUs ----------------------------------------------------------------

def _kv(layers, blocks, dev="cuda"):
    return [torch.randn(2, blocks, 16, 2, 64, device=dev).to(torch.bfloat16) for _ in range(layers)]


@gpu
@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "direct"])
def test_gpu_v1_striped(cfg, uniq, layerwise):
    layers, n = 6, 40
    kv = _kv(layers, 2 * n + 2)
    per = 16 * 2 * 64 * 2
    bufs = sorted({(t[h].data_ptr(), t[h].nbytes) for t in kv for h in (0, 1)})
    conf = dict(cfg, device_id=0, tensor_size_list=[per, per] if layerwise else [per] * 2 * layers,
                shard_size=2 * per if layerwise else 2 * per * layers, block_size=2 * per * layers,
                gpu_kv_buffer_addrs=[a for a, _ in bufs], gpu_kv_buffer_sizes=[z for _, z in bufs])
    s = ucm.UcmKVShelfStoreV1(conf)
    try:
        assert s._stripes == (layers if layerwise else 1)
        src, dst = list(range(1, n + 1)), list(range(n + 1, 2 * n + 1))
        ids = [os.urandom(16) for _ in range(n)]

        def addrs(blocks, layer=None):
            b = np.array(blocks, dtype=np.uint64)
            per_layer = [np.stack([t[0][0].data_ptr() + b * per, t[1][0].data_ptr() + b * per], 1)
                         .astype(np.uint64) for t in kv]
            if layer is not None:
                return np.ascontiguousarray(per_layer[layer])
            return np.ascontiguousarray(np.concatenate(per_layer, 1))

        if layerwise:
            _dump_layerwise(s, ids, lambda layer: addrs(src, layer), layers)
        else:
            ev = torch.cuda.Event()
            ev.record()
            s.wait(s.dump_data(ids, [0] * n, addrs(src), ev.cuda_event))
        assert s.lookup_on_prefix(ids) == n - 1
        for t in kv:
            t[:, dst] = 0
        torch.cuda.synchronize()
        if layerwise:
            t = s.load_data(ids, [0] * n, addrs(dst, 0))
            for layer in range(layers):
                s.wait(t)
                if layer + 1 < layers:
                    t = s.load_data(ids, [layer + 1] * n, addrs(dst, layer + 1))
        else:
            s.wait(s.load_data(ids, [0] * n, addrs(dst)))
        torch.cuda.synchronize()
        assert all(torch.equal(t[:, dst], t[:, src]) for t in kv)
        with pytest.raises(ucm.BlocksNotFound):
            s.wait(s.load_data([os.urandom(16)], [0], addrs(dst[:1], 0) if layerwise else addrs(dst[:1])))
    finally:
        s.shutdown()


def _dump_layerwise(s, ids, layer_addrs, layers):
    """UCM's layerwise dumps: one dump_data per layer with its own event
    recorded on the current stream, every task waited at the end."""
    tasks = []
    for layer in range(layers):
        ev = torch.cuda.Event()
        ev.record()
        tasks.append(s.dump_data(ids, [layer] * len(ids), layer_addrs(layer), ev.cuda_event))
    for t in tasks:
        s.wait(t)


def _gpu_layerwise_store(cfg, layers, n):
    """A V1 store over `layers` KV tensors in vLLM's per-layer layout (as
    test_gpu_v1_striped), layerwise; returns (store, tensors, addrs)."""
    kv = _kv(layers, 2 * n + 2)
    per = 16 * 2 * 64 * 2
    bufs = sorted({(t[h].data_ptr(), t[h].nbytes) for t in kv for h in (0, 1)})
    conf = dict(cfg, device_id=0, tensor_size_list=[per, per], shard_size=2 * per,
                block_size=2 * per * layers, gpu_kv_buffer_addrs=[a for a, _ in bufs],
                gpu_kv_buffer_sizes=[z for _, z in bufs])
    s = ucm.UcmKVShelfStoreV1(conf)

    def addrs(blocks, layer):
        b = np.array(blocks, dtype=np.uint64)
        t = kv[layer]
        return np.ascontiguousarray(np.stack([t[0][0].data_ptr() + b * per, t[1][0].data_ptr() + b * per], 1)
                                    .astype(np.uint64))
    return s, kv, addrs


@gpu
@pytest.mark.parametrize("order", ["forward", "forward-long", "reverse", "shuffled", "concurrent", "partial"])
@pytest.mark.parametrize("readahead", ["default", "off"])
def test_gpu_layerwise_readahead(cfg, uniq, monkeypatch, order, readahead):
    """Layerwise loads read the next layer ahead into device memory (CUDA
    backend, KVSHELF_READAHEAD_MB): whatever order UCM's calls come in, every
    byte lands where it belongs; in UCM's order (layer L+1 after layer L's
    wait) every later layer comes from the read-ahead (windows of
    KVSHELF_READAHEAD_DEPTH layers, the next asked for while one is
    consumed: "forward-long" goes through several); with it off, none."""
    if readahead == "off":
        monkeypatch.setenv("KVSHELF_READAHEAD_MB", "0")
    layers, n = (13 if order == "forward-long" else 6), 40
    s, kv, addrs = _gpu_layerwise_store(cfg, layers, n)
    try:
        src, dst = list(range(1, n + 1)), list(range(n + 1, 2 * n + 1))
        ids = [os.urandom(16) for _ in range(n)]
        _dump_layerwise(s, ids, lambda layer: addrs(src, layer), layers)
        for t in kv:
            t[:, dst] = 0
        torch.cuda.synchronize()
        seq = {"forward": list(range(layers)), "forward-long": list(range(layers)),
               "reverse": list(range(layers))[::-1],
               "shuffled": [0, 2, 1, 3, 5, 4], "concurrent": list(range(layers)),
               "partial": [0, 1, 2]}[order]
        if order == "concurrent":
            for t in [s.load_data(ids, [layer] * n, addrs(dst, layer)) for layer in seq]:
                s.wait(t)
        else:
            for layer in seq:
                s.wait(s.load_data(ids, [layer] * n, addrs(dst, layer)))
        torch.cuda.synchronize()
        for layer, t in enumerate(kv):
            assert torch.equal(t[:, dst], t[:, src]) == (layer in seq), layer
        ra = s._conns[0].counters()["readahead_stripes"]
        if readahead == "off" or order == "reverse":
            assert ra == 0
        elif order in ("forward", "forward-long"):
            assert ra == n * (layers - 1)
        elif order == "partial":
            assert ra == n * 2
        if order == "partial":
            # the read-ahead of layer 3 is left in the open entries: a new
            # sequence on the same blocks gets every layer right
            for t in kv:
                t[:, dst] = 0
            torch.cuda.synchronize()
            for layer in range(layers):
                s.wait(s.load_data(ids, [layer] * n, addrs(dst, layer)))
            torch.cuda.synchronize()
            assert all(torch.equal(t[:, dst], t[:, src]) for t in kv)
    finally:
        s.shutdown()


@gpu
def test_gpu_layerwise_readahead_after_the_blocks_went(cfg, uniq):
    """A block removed from the pool after its first layer was loaded (its
    later layers already read ahead) still loads: the lease taken at layer 0
    holds it; once that load sequence ends, a new one misses."""
    layers, n = 4, 8
    s, kv, addrs = _gpu_layerwise_store(cfg, layers, n)
    cl = kvshelf.Client(cfg)
    try:
        src, dst = list(range(1, n + 1)), list(range(n + 1, 2 * n + 1))
        ids = [os.urandom(16) for _ in range(n)]
        for layer in range(layers):
            s.wait(s.dump_data(ids, [layer] * n, addrs(src, layer)))
        for t in kv:
            t[:, dst] = 0
        torch.cuda.synchronize()
        s.wait(s.load_data(ids, [0] * n, addrs(dst, 0)))
        for k in s._block_keys(ids):
            cl.remove(bytes(k))
        for layer in range(1, layers):
            s.wait(s.load_data(ids, [layer] * n, addrs(dst, layer)))
        torch.cuda.synchronize()
        assert all(torch.equal(t[:, dst], t[:, src]) for t in kv)
        with pytest.raises(ucm.BlocksNotFound):
            s.wait(s.load_data(ids, [0] * n, addrs(dst, 0)))
    finally:
        cl.close()
        s.shutdown()
