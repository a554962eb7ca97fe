"""kvshelf.Client: round trips, batches, zero-copy parts, errors."""
import os

import numpy as np
import pytest

import kvshelf


def test_put_get_roundtrip_bytes(client, uniq):
    v = os.urandom(100_000)
    client.put(uniq + "a", v)
    assert client.exists(uniq + "a")
    assert client.get(uniq + "a") == v


def test_get_into_numpy_and_bytearray(client, uniq):
    src = np.random.default_rng(1).integers(0, 255, 4096, dtype=np.uint8)
    client.put(uniq.encode() + b"\x00\xffbin", src)
    dst = np.zeros_like(src)
    assert client.get(uniq.encode() + b"\x00\xffbin", dst) == 4096
    assert np.array_equal(src, dst)
    ba = bytearray(4096)
    client.get(uniq.encode() + b"\x00\xffbin", ba)
    assert bytes(ba) == src.tobytes()


def test_integer_address(client, uniq):
    src = np.arange(1000, dtype=np.int64)
    client.put(uniq + "addr", src.ctypes.data, src.nbytes)
    dst = np.zeros_like(src)
    assert client.get(uniq + "addr", dst.ctypes.data, dst.nbytes) == src.nbytes
    assert np.array_equal(src, dst)


def test_miss_is_notfound(client, uniq):
    with pytest.raises(kvshelf.NotFound) as ei:
        client.get(uniq + "missing")
    e = ei.value
    assert isinstance(e, kvshelf.Error) and isinstance(e, LookupError)
    assert e.code == kvshelf._kvshelf.ERR_NOT_FOUND and e.name == "KVS_ERR_NOT_FOUND"
    assert "KVS_ERR_NOT_FOUND" in str(e)
    assert not client.exists(uniq + "missing")


def test_exists_twice_and_remove(client, uniq):
    client.put(uniq + "x", b"1")
    with pytest.raises(kvshelf.Exists):
        client.put(uniq + "x", b"2")
    client.remove(uniq + "x")
    with pytest.raises(kvshelf.NotFound):
        client.remove(uniq + "x")


def test_buffer_too_small(client, uniq):
    client.put(uniq + "big", b"x" * 1000)
    with pytest.raises(kvshelf.TooLarge, match="1000"):
        client.get(uniq + "big", bytearray(10))


def test_readonly_destination_rejected(client, uniq):
    client.put(uniq + "ro", b"abc")
    with pytest.raises(TypeError, match="writable"):
        client.get(uniq + "ro", b"xyz")


def test_batches(client, uniq):
    keys = [uniq + "b%d" % i for i in range(50)]
    vals = [np.full(1000 + i, i, dtype=np.uint8) for i in range(50)]
    assert client.put_batch(keys, vals) == [0] * 50
    assert client.exists_batch(keys + [uniq + "nope"]) == [True] * 50 + [False]
    outs = [np.zeros(1100, dtype=np.uint8) for _ in range(50)]
    sizes = client.get_batch(keys + [uniq + "nope"], outs + [np.zeros(4, np.uint8)])
    assert sizes[:50] == [1000 + i for i in range(50)]
    assert sizes[50] == kvshelf._kvshelf.ERR_NOT_FOUND
    for i in range(50):
        assert np.array_equal(outs[i][: 1000 + i], vals[i])
    res = client.remove_batch(keys[:10] + [uniq + "nope"])
    assert res[:10] == [0] * 10 and res[10] == kvshelf._kvshelf.ERR_NOT_FOUND


def test_parts_zero_copy_and_header(client, uniq):
    n, m, sz = 8, 3, 512
    src = np.random.default_rng(2).integers(0, 255, (n, m, sz), dtype=np.uint8)
    keys = [uniq + "p%d" % i for i in range(n)]
    addrs = np.array([[src[i, j].ctypes.data for j in range(m)] for i in range(n)], dtype=np.uint64)
    assert client.put_parts(keys, addrs, [sz] * m, b"HDR1") == [0] * n
    dst = np.zeros_like(src)
    daddrs = np.array([[dst[i, j].ctypes.data for j in range(m)] for i in range(n)], dtype=np.uint64)
    assert client.get_parts(keys, daddrs, sz, b"HDR1") == [0] * n
    assert np.array_equal(src, dst)
    # another header: Corrupt, nothing copied; another size: TooLarge
    dst2 = np.zeros_like(src)
    d2 = np.array([[dst2[i, j].ctypes.data for j in range(m)] for i in range(n)], dtype=np.uint64)
    assert client.get_parts(keys, d2, sz, b"HDR2") == [kvshelf._kvshelf.ERR_CORRUPT] * n
    assert not dst2.any()
    assert client.get_parts(keys, d2[:, :2], sz, b"HDR1") == [kvshelf._kvshelf.ERR_TOO_LARGE] * n
    assert client.read_header(keys[0], 4) == b"HDR1"


def test_parts_rows_of_buffers(client, uniq):
    rows = [[np.full(64, i * 3 + j, np.uint8) for j in range(3)] for i in range(4)]
    keys = [uniq + "r%d" % i for i in range(4)]
    assert client.put_parts(keys, rows) == [0] * 4
    out = [[np.zeros(64, np.uint8) for _ in range(3)] for _ in range(4)]
    assert client.get_parts(keys, out) == [0] * 4
    assert all(np.array_equal(a, b) for ra, rb in zip(rows, out) for a, b in zip(ra, rb))
    with pytest.raises(ValueError, match="one size"):
        client.put_parts([uniq + "bad0", uniq + "bad1"],
                         [[np.zeros(8, np.uint8)], [np.zeros(16, np.uint8)]])


def test_bad_keys(client):
    with pytest.raises(ValueError, match="1..256"):
        client.put(b"", b"x")
    with pytest.raises(ValueError):
        client.put(b"k" * 257, b"x")
    with pytest.raises(TypeError):
        client.put(12.5, b"x")


def test_register_memory_put_from(client, uniq):
    buf = np.zeros(1 << 16, np.uint8)
    buf[:] = 7
    client.register_memory(buf)
    try:
        client.put_from(uniq + "reg", buf[:4096])
        out = np.zeros(4096, np.uint8)
        with pytest.raises(kvshelf.NotRegistered):
            client.get_into(uniq + "reg", out)
        n = client.get_into(uniq + "reg", buf[8192:])
        assert n == 4096 and (buf[8192:8192 + 4096] == 7).all()
    finally:
        client.unregister_memory(buf)


def test_config_errors(cfg):
    with pytest.raises(kvshelf.ConfigError, match="no_such_key") as ei:
        kvshelf.Client(dict(cfg, no_such_key=1))
    assert isinstance(ei.value, ValueError)
    with pytest.raises(kvshelf.ConfigError):
        kvshelf.Client(cfg, protocol="carrier-pigeon")
    with pytest.raises(kvshelf.Error):
        kvshelf.Client("/nonexistent/kvshelf.json")


def test_config_sources(cfg, tmp_path):
    p = tmp_path / "c.json"
    import json
    p.write_text(json.dumps(cfg))
    with kvshelf.Client(str(p)) as c:
        assert c.config["runtime_dir"] == cfg["runtime_dir"]
    with kvshelf.Client(**cfg) as c:
        assert c.config["global_segment_size"] == 256 << 20
        assert not c.closed
    assert c.closed
    with pytest.raises(kvshelf.Closed):
        c.put("k", b"v")
    d = kvshelf.load_config(cfg, local_buffer_size="64MiB")
    assert d["local_buffer_size"] == 64 << 20 and d["protocol"] == "tcp"
    assert kvshelf.parse_size("3.125GiB") == 3355443200


def test_stats_and_counters(client, uniq):
    client.put(uniq + "s", b"abc")
    st = client.stats()
    assert isinstance(st, dict)
    c = client.counters()
    assert c["puts"] >= 1


def test_torch_tensors(client, uniq):
    torch = pytest.importorskip("torch")
    t = torch.randn(64, 33)
    client.put(uniq + "t", t)
    out = torch.empty_like(t)
    client.get(uniq + "t", out)
    assert torch.equal(t, out)
    with pytest.raises(ValueError, match="not contiguous"):
        client.put(uniq + "t2", t.t())
    with pytest.raises(ValueError, match="not contiguous"):
        client.get(uniq + "t", out.t())
