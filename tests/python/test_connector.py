"""kvshelf.Connector on host memory (device -2): layouts, dump, lookup, load."""
import os

import numpy as np
import pytest

import kvshelf

NUM_BLOCKS = 32
BLOCK_TOKENS, HEADS, DIM = 16, 2, 32


def kv_tensors(n_layers=3, seed=0, dtype=np.float16):
    """vLLM-like per-layer caches [2, num_blocks, block, heads, dim]."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, NUM_BLOCKS, BLOCK_TOKENS, HEADS, DIM)).astype(dtype)
            for _ in range(n_layers)]


def np_layout(a, block_dim=1):
    """(base, block_stride, chunk_bytes, chunk_stride, count) of a numpy array."""
    inner = int(np.prod(a.shape[block_dim + 1:])) * a.itemsize
    count = a.shape[0] if block_dim == 1 else 1
    chunk_stride = a.strides[0] if block_dim == 1 else inner
    return (a.ctypes.data, a.strides[block_dim], inner, chunk_stride, count)


def hashes(prefix, n):
    return [(prefix + "-%d" % i).encode()[:64] for i in range(n)]


@pytest.fixture
def conn(cfg, uniq):
    c = kvshelf.Connector(cfg, device=-2, namespace="test-" + uniq)
    yield c
    c.close()


def test_dump_lookup_load_exact(cfg, uniq, conn):
    src = kv_tensors()
    conn.register_layout([np_layout(a) for a in src], NUM_BLOCKS)
    assert conn.block_bytes >= sum(a.nbytes for a in src) // NUM_BLOCKS
    hs = hashes(uniq, 8)
    blocks = [3, 5, 7, 9, 11, 13, 15, 17]
    t = conn.dump(hs, blocks)
    assert t.wait(30)
    assert t.done and t.ok == 8 and t.results() == [0] * 8 and t.failed() == []
    assert conn.lookup(hs + hashes(uniq + "x", 2)) == [True] * 8 + [False] * 2
    assert conn.lookup_prefix(hs[:4] + hashes(uniq + "x", 1) + hs[4:]) == 4

    # load into other block slots of a zeroed cache (another "process")
    dst = [np.zeros_like(a) for a in src]
    c2 = kvshelf.Connector(cfg, device=-2, namespace="test-" + uniq)
    try:
        c2.register_layout([np_layout(a) for a in dst], NUM_BLOCKS)
        targets = np.array([0, 1, 2, 20, 21, 22, 23, 31], dtype=np.int64)
        t2 = c2.load(hs, targets)
        assert t2.wait(30) and t2.results() == [0] * 8
        for a, b in zip(src, dst):
            for s, d in zip(blocks, targets):
                assert a[:, s].tobytes() == b[:, d].tobytes()
        untouched = [i for i in range(NUM_BLOCKS) if i not in set(targets.tolist())]
        assert all(not b[:, untouched].any() for b in dst)
        # misses are per block
        t3 = c2.load([hs[0], b"absent-" + uniq.encode()[:40]], [4, 5])
        t3.wait()
        assert t3.results() == [0, kvshelf._kvshelf.ERR_NOT_FOUND]
        assert t3.failed() == [1]
        cnt = c2.counters()
        assert cnt["loaded_blocks"] >= 9 and cnt["missed_blocks"] >= 1
    finally:
        c2.close()


def test_other_layout_is_a_miss(cfg, uniq, conn):
    src = kv_tensors()
    conn.register_layout([np_layout(a) for a in src], NUM_BLOCKS)
    hs = hashes(uniq, 2)
    assert conn.dump(hs, [0, 1]).wait(30)
    other = kv_tensors(n_layers=2)  # another layout fingerprint: never wrong bytes
    c2 = kvshelf.Connector(cfg, device=-2, namespace="test-" + uniq)
    try:
        c2.register_layout([np_layout(a) for a in other], NUM_BLOCKS)
        # (lookups carry no layout: a scheduler has none) the header check refuses the bytes
        t = c2.load(hs, [0, 1])
        t.wait()
        assert t.ok == 0
    finally:
        c2.close()


def test_lookup_only_connector(cfg, uniq, conn):
    src = kv_tensors()
    conn.register_layout([np_layout(a) for a in src], NUM_BLOCKS)
    hs = hashes(uniq, 3)
    assert conn.dump(hs, [0, 1, 2]).wait(30)
    # the scheduler has no layout: it must still see the blocks of world_size=1
    sched = kvshelf.Connector(cfg, device=-1, namespace="test-" + uniq, world_size=1)
    try:
        assert sched.lookup_prefix(hs + hashes(uniq + "n", 1)) == 3
        with pytest.raises(kvshelf.Error):
            sched.dump(hs, [0, 1, 2])
    finally:
        sched.close()


def test_dump_twice_skips(conn, uniq):
    src = kv_tensors(1)
    conn.register_layout([np_layout(a) for a in src], NUM_BLOCKS)
    hs = hashes(uniq, 4)
    assert conn.dump(hs, [0, 1, 2, 3]).wait(30)
    t = conn.dump(hs, [0, 1, 2, 3])
    t.wait(30)
    assert t.failed() == []  # already stored counts as done


def test_argument_errors(conn, uniq):
    try:  # no layout yet: refused at once, or every block fails
        t = conn.dump(hashes(uniq, 1), [0])
        t.wait(10)
        assert t.failed() == [0]
    except kvshelf.LayoutError:
        pass
    conn.register_layout([np_layout(a) for a in kv_tensors(1)], NUM_BLOCKS)
    with pytest.raises(ValueError, match="2 hashes but 1 block ids"):
        conn.dump(hashes(uniq, 2), [0])
    with pytest.raises(ValueError, match="1..64"):
        conn.load([b"x" * 65], [0])
    with pytest.raises(ValueError):
        conn.register_layout([(1, 2, 3)], NUM_BLOCKS)
    with pytest.raises(TypeError):
        kvshelf.Connector(device=-2)  # namespace is required


def test_close_with_tasks_in_flight(cfg, uniq):
    c = kvshelf.Connector(cfg, device=-2, namespace="test-" + uniq)
    src = kv_tensors(4)
    c.register_layout([np_layout(a) for a in src], NUM_BLOCKS)
    tasks = [c.dump(hashes(uniq + str(k), NUM_BLOCKS), list(range(NUM_BLOCKS))) for k in range(4)]
    c.close(timeout=0)
    for t in tasks:
        assert t.wait(5)  # finished or cancelled, never hanging
        assert all(s in (0, kvshelf._kvshelf.ERR_CLOSED, kvshelf._kvshelf.ERR_EXISTS) for s in t.results())
    with pytest.raises(kvshelf.Closed):
        c.lookup([b"x"])
    c.close()  # idempotent


def test_layout_from_torch_tensor(cfg, uniq):
    torch = pytest.importorskip("torch")
    kv = torch.randn(2, NUM_BLOCKS, BLOCK_TOKENS, HEADS, DIM, dtype=torch.bfloat16)
    lay = kvshelf.layout_from_tensor(kv, block_dim=1)
    assert lay == (kv.data_ptr(), kv.stride(1) * 2, BLOCK_TOKENS * HEADS * DIM * 2, kv.stride(0) * 2, 2)
    flat = torch.randn(NUM_BLOCKS, 2, BLOCK_TOKENS, HEADS, DIM)
    assert kvshelf.layout_from_tensor(flat)[2:] == (2 * BLOCK_TOKENS * HEADS * DIM * 4, 2 * BLOCK_TOKENS * HEADS * DIM * 4, 1)
    with kvshelf.Connector(cfg, device=-2, namespace="torch-" + uniq) as c:
        c.register_layout([lay], NUM_BLOCKS)
        assert c.dump(hashes(uniq, 2), [4, 6]).wait(30)
        dst = torch.zeros_like(kv)
        with kvshelf.Connector(cfg, device=-2, namespace="torch-" + uniq) as c2:
            c2.register_layout([kvshelf.layout_from_tensor(dst, 1)], NUM_BLOCKS)
            t = c2.load(hashes(uniq, 2), [0, 1])
            t.wait()
            assert t.failed() == []
        assert torch.equal(dst[:, 0], kv[:, 4]) and torch.equal(dst[:, 1], kv[:, 6])


def test_tensor_parallel_ranks(cfg, uniq):
    """Per-rank keys: a block counts for the scheduler only once every rank stored it."""
    ns = "tp-" + uniq
    srcs = [kv_tensors(2, seed=r) for r in range(2)]
    ranks = [kvshelf.Connector(cfg, device=-2, namespace=ns, rank=r, world_size=2) for r in range(2)]
    sched = kvshelf.Connector(cfg, device=-1, namespace=ns, world_size=2)
    try:
        for c, src in zip(ranks, srcs):
            c.register_layout([np_layout(a) for a in src], NUM_BLOCKS)
        hs = hashes(uniq, 3)
        assert ranks[0].dump(hs, [0, 1, 2]).wait(30)
        assert sched.lookup(hs) == [False] * 3  # rank 1 has not stored them
        assert ranks[1].dump(hs[:2], [0, 1]).wait(30)
        assert sched.lookup(hs) == [True, True, False]
        assert sched.lookup_prefix(hs) == 2
        # each rank gets its own bytes back
        for r, (c, src) in enumerate(zip(ranks, srcs)):
            dst = [np.zeros_like(a) for a in src]
            with kvshelf.Connector(cfg, device=-2, namespace=ns, rank=r, world_size=2) as c2:
                c2.register_layout([np_layout(a) for a in dst], NUM_BLOCKS)
                t = c2.load(hs[:2], [5, 6])
                t.wait()
                assert t.failed() == []
            assert all(a[:, 0].tobytes() == b[:, 5].tobytes() for a, b in zip(src, dst))
    finally:
        for c in ranks + [sched]:
            c.close()


def test_layout_from_numpy():
    a = kv_tensors(1)[0]
    assert kvshelf.layout_from_tensor(a, block_dim=1) == np_layout(a)
    b = np.zeros((NUM_BLOCKS, 16, 4), np.float32)
    assert kvshelf.layout_from_tensor(b) == (b.ctypes.data, 256, 256, 256, 1)
    with pytest.raises(ValueError, match="not contiguous"):
        kvshelf.layout_from_tensor(np.zeros((NUM_BLOCKS, 4, 8))[:, :, ::2])


def test_layout_of_permuted_block():
    torch = pytest.importorskip("torch")
    # HND inside each block: logical [2, blocks, tokens, heads, dim], memory [2, blocks, heads, tokens, dim]
    base = torch.zeros(2, NUM_BLOCKS, HEADS, BLOCK_TOKENS, DIM)
    view = base.permute(0, 1, 3, 2, 4)
    assert kvshelf.layout_from_tensor(view, 1) == kvshelf.layout_from_tensor(base, 1)
