"""CUDA blocks over a Mooncake Store (issue 16, "CUDA tensors over Mooncake"):
kvshelf.mooncake_store.MooncakeBlockStore and kvshelf.vllm_mooncake's
connector with CUDA tensors, moved between the GPU and the store's pinned
staging by kvshelf's C/CUDA copies (kvshelf._kvshelf.CudaCopier), never by
torch copies.

Three groups:
- no GPU needed: what a machine without a GPU (or a kvshelf without CUDA)
  answers -- clear kvshelf errors, nothing started;
- GPU, no Mooncake: the store over an in-memory stand-in for Mooncake's
  client (test_mooncake_store.DictClient): byte-exact round trips of CUDA
  tensors (and CUDA <-> host), a header mismatch is a miss that copies
  nothing to the device, the caller's CUDA event is waited for on the GPU,
  bad arguments;
- GPU and a real mooncake_master (root, network namespace; as
  test_mooncake_store.py): the same round trips, mismatches and event over
  Mooncake, and the vLLM adapter with a CUDA KV cache in vLLM's per-layer
  layout [2, num_blocks, block_size, kv_heads, head_dim].

GPU tests skip with the reason where torch has no CUDA device; where a GPU is
present but kvshelf was built without CUDA they fail (install the CUDA build).

    sudo python3 -m pytest tests/python/test_mooncake_cuda.py -v
"""
import hashlib
import json
import os
import signal
import time

import pytest

import mooncake_net as mn
import test_mooncake_store as tms

MOD = "test_mooncake_cuda"


def _copier():
    import kvshelf

    return getattr(kvshelf._kvshelf, "CudaCopier", None)


def _gpu_skip_reason():
    """Why the GPU tests cannot run here (skip), or None. A GPU with a
    kvshelf built without CUDA is a failure, not a skip."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False): a GPU test"
    cp = _copier()
    if cp is None or not cp.available():
        pytest.fail("a CUDA device is present but the installed kvshelf has no CUDA copy path "
                    "(CudaCopier.available() is False): install kvshelf built with the CUDA "
                    "toolkit (bench/prepare_carry.sh builds one for a GPU machine)")
    return None


@pytest.fixture
def gpu():
    why = _gpu_skip_reason()
    if why:
        pytest.skip(why)
    import torch

    return torch


@pytest.fixture(scope="module")
def ms():
    return tms.import_store(with_mooncake=False)


def _fake_store(ms, **over):
    return ms.MooncakeBlockStore(dict(tms.FAKE_CFG, **over), client=tms.DictClient())


# ===================================================== no GPU needed
def test_without_a_usable_gpu_errors_are_clear(ms):
    """CudaCopier on a device that is not there, enable_cuda, cuda=True
    before enable_cuda: kvshelf exceptions that say what is wrong."""
    import kvshelf

    cp = _copier()
    if cp is None:
        pytest.skip("the installed kvshelf extension predates CudaCopier: reinstall kvshelf")
    if not cp.available():
        with pytest.raises(kvshelf.Unsupported, match="without CUDA"):
            cp(0)
        assert cp.device_count() == 0
        ndev = 0
    else:
        ndev = cp.device_count()
        with pytest.raises(kvshelf.CudaError, match="CUDA device %d" % ndev):
            cp(ndev)
        with pytest.raises(kvshelf.InvalidArgument, match=">= 0"):
            cp(-1)
    s = _fake_store(ms)
    try:
        with pytest.raises(kvshelf.InvalidArgument, match="before enable_cuda"):
            s.dump([b"a"], [(1 << 40, 16)], cuda=True)
        with pytest.raises((kvshelf.CudaError, kvshelf.Unsupported)):
            s.enable_cuda(ndev)
        assert s.cuda_device is None and s.stats()["cuda_device"] is None
    finally:
        s.close()


# ======================================================= GPU, fake Mooncake
def test_copier_bad_arguments(gpu):
    import kvshelf

    torch = gpu
    cp = _copier()(0)
    try:
        host = cp.pinned_alloc(1 << 16)
        dev = torch.zeros(256, dtype=torch.uint8, device="cuda:0")
        part = (int(dev.data_ptr()), 256)
        with pytest.raises(kvshelf.InvalidArgument, match="1 objects but 2"):
            cp.dump([host], [[part], [part]])
        with pytest.raises(kvshelf.InvalidArgument, match="8-byte aligned"):
            cp.dump([host + 4], [[part]])
        with pytest.raises(kvshelf.InvalidArgument, match="pair"):
            cp.dump([host], [[part[0]]])
        with pytest.raises(kvshelf.InvalidArgument, match="stamp_off lies inside"):
            cp.dump([host], [[part]], payload_off=64, stamp_off=128)
        with pytest.raises(kvshelf.InvalidArgument, match="multiple of 8"):
            cp.load([host], [[part]], stamp_off=12)
        with pytest.raises(kvshelf.InvalidArgument, match="below 2"):
            cp.load([host], [[part]], stamp_off=-8)
        with pytest.raises(kvshelf.InvalidArgument, match="2..48"):
            cp.dump([host], [[part, (part[0], 1 << 62), (part[0], 1 << 62)]])
        assert cp.dump([], []) == []
        # a round trip through the copier alone
        dev.copy_(torch.arange(256, dtype=torch.int32).to(torch.uint8))
        assert cp.dump([host], [[part]]) == [True]
        out = torch.zeros_like(dev)
        assert cp.load([host], [[(int(out.data_ptr()), 256)]]) == [True]
        assert torch.equal(out, dev)
        cp.pinned_free(host)
    finally:
        cp.close()
    with pytest.raises(kvshelf.Closed):
        cp.dump([host], [[part]])


def _cuda_blocks(torch, sizes, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to("cuda:0") for n in sizes]


def test_fake_cuda_roundtrip_byte_exact(ms, gpu):
    """CUDA tensors (single and lists of parts) dumped and loaded back into
    other CUDA tensors, byte for byte; a CUDA-dumped block loads into host
    memory and the other way round (one object format)."""
    import numpy as np

    torch = gpu
    s = _fake_store(ms, staging_size="4MiB", batch_size=8)
    try:
        sizes = [1, 7, 4096, 4097, 65536, 300000, 1 << 20]
        src = _cuda_blocks(torch, sizes, 1)
        keys = ["c-%d" % i for i in range(len(sizes))]
        t = s.dump(keys, src)
        assert s.wait(t, 60) == [0] * len(sizes), t.error
        dst = [torch.full((n,), 0x5A, dtype=torch.uint8, device="cuda:0") for n in sizes]
        torch.cuda.synchronize()  # the fill is done before the copier's streams write
        t = s.load(keys, dst)
        assert s.wait(t, 60) == [0] * len(sizes), t.error
        assert all(torch.equal(a, b) for a, b in zip(src, dst))
        # a block as a list of parts (vLLM's K and V of each layer)
        parts = _cuda_blocks(torch, [512, 4096, 12, 2048], 2)
        assert s.wait(s.dump(["c-parts"], [parts]), 60) == [0]
        outp = [torch.zeros_like(p) for p in parts]
        assert s.wait(s.load(["c-parts"], [outp]), 60) == [0]
        assert all(torch.equal(a, b) for a, b in zip(parts, outp))
        # CUDA -> host and host -> CUDA
        h = np.zeros(4097, np.uint8)
        assert s.wait(s.load(["c-3"], [h]), 60) == [0]
        assert bytes(h) == bytes(src[3].cpu().numpy())
        hs = np.arange(5000, dtype=np.uint8)
        assert s.wait(s.dump(["h-1"], [hs]), 60) == [0]
        d = torch.zeros(5000, dtype=torch.uint8, device="cuda:0")
        assert s.wait(s.load(["h-1"], [d]), 60) == [0]
        assert bytes(d.cpu().numpy()) == bytes(hs)
        st = s.stats()
        assert st["cuda_device"] == 0 and st["cuda_dumped"] == len(sizes) + 1, st
        assert st["cuda_loaded"] == len(sizes) + 2 and st["cuda_errors"] == 0, st
    finally:
        s.close()


def test_fake_header_mismatch_is_a_miss_and_copies_nothing(ms, gpu):
    """A stored object whose header does not match (another tag, length,
    key, checksum) is a miss: the device tensor keeps its bytes."""
    import kvshelf

    torch = gpu
    NF = kvshelf._kvshelf.ERR_NOT_FOUND
    client = tms.DictClient()
    s = ms.MooncakeBlockStore(dict(tms.FAKE_CFG), client=client)
    try:
        src = _cuda_blocks(torch, [8192, 8192, 8192], 3)
        assert s.wait(s.dump(["m-0", "m-1", "m-2"], src, tags=5), 60) == [0] * 3
        obj = bytearray(client.objs["m-1"])
        obj[64 + 100] ^= 0x01  # the payload altered: the checksum differs
        client.objs["m-1"] = bytes(obj)
        client.objs["m-2"] = tms.make_object("m-2", b"x" * 8192, key_for_hash="m-0")
        dst = [torch.full((8192,), 0xEE, dtype=torch.uint8, device="cuda:0") for _ in range(3)]
        torch.cuda.synchronize()  # the fill is done before the copier's streams write
        t = s.load(["m-0", "m-1", "m-2"], dst, tags=5)
        assert s.wait(t, 60) == [0, NF, NF], t.error
        assert torch.equal(dst[0], src[0])
        assert bool((dst[1] == 0xEE).all()) and bool((dst[2] == 0xEE).all())
        assert t.mismatches() == [1, 2]
        # another tag: a miss too, nothing copied
        d = torch.full((8192,), 0xEE, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()  # the fill is done before the copier's streams write
        assert s.wait(s.load(["m-0"], [d], tags=6), 60) == [NF]
        assert bool((d == 0xEE).all())
        assert s.stats()["cuda_loaded"] == 1
    finally:
        s.close()


def _event_after_slow_write(torch, t, value, ms_sleep=800):
    """On a side stream: sleep on the GPU, then fill t with value; returns the
    event recorded after the fill (not complete when this returns)."""
    side = torch.cuda.Stream(device="cuda:0")
    ev = torch.cuda.Event()
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(ms_sleep * 1e6))  # cycles: about ms_sleep ms at ~1 GHz or more
        t.fill_(value)
        ev.record(side)
    return ev, side


def test_fake_dump_waits_for_the_event(ms, gpu):
    """dump(event=): the device -> staging copy starts after the event on the
    GPU; the event re-recorded right after the call does not matter (the
    store snapshotted it)."""
    torch = gpu
    s = _fake_store(ms, staging_size="4MiB")
    try:
        x = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")
        # warm: the first CUDA dump allocates pinned memory (cudaHostAlloc synchronizes
        # the device, which would finish the sleep below and hide a missing wait)
        s.enable_cuda(0)
        assert s.wait(s.dump(["ev-warm"], [x[:4096]]), 60) == [0]
        assert s.wait(s.load(["ev-warm"], [x[4096:8192]]), 60) == [0]
        torch.cuda.synchronize()
        ev, side = _event_after_slow_write(torch, x, 7)
        assert not ev.query(), "the GPU finished the sleep before the dump was called"
        t = s.dump(["ev-0"], [x], event=ev)
        assert not ev.query(), "the dump call waited for the event on the host"
        ev.record(torch.cuda.Stream(device="cuda:0"))  # re-recorded at once on an idle stream
        assert s.wait(t, 60) == [0], t.error
        out = torch.zeros_like(x)
        assert s.wait(s.load(["ev-0"], [out]), 60) == [0]
        assert bool((out == 7).all()), "the dump copied the tensor before the event"
        side.synchronize()
    finally:
        s.close()


def test_fake_mixed_and_wrong_device_blocks(ms, gpu):
    import kvshelf
    import numpy as np

    torch = gpu
    s = _fake_store(ms)
    try:
        with pytest.raises(kvshelf.InvalidArgument, match="all on the host or all on one CUDA"):
            s.dump(["a", "b"], [torch.zeros(8, dtype=torch.uint8, device="cuda:0"),
                                np.zeros(8, np.uint8)])
        with pytest.raises(kvshelf.InvalidArgument, match="not contiguous"):
            s.dump(["a"], [torch.zeros((8, 8), dtype=torch.uint8, device="cuda:0")[:, 1]])
        if torch.cuda.device_count() > 1:
            s.enable_cuda(0)
            with pytest.raises(kvshelf.InvalidArgument, match="serves one device"):
                s.dump(["a"], [torch.zeros(8, dtype=torch.uint8, device="cuda:1")])
    finally:
        s.close()


# ===================================================== GPU and real Mooncake
@pytest.fixture(scope="module")
def net(tmp_path_factory):
    why = _gpu_skip_reason()
    if why:
        pytest.skip(why)
    yield from mn.net_fixture(tmp_path_factory, "mooncake-cuda", "c")


@pytest.fixture
def master(net):
    net.start_master()
    yield net
    net.stop_master()


def scenario_cuda_roundtrip(ctx):
    import kvshelf
    import torch

    NF = kvshelf._kvshelf.ERR_NOT_FOUND
    ms, s = tms.open_store(ctx, batch_size=16, staging_size="16MiB")
    out = {}
    with s:
        s.enable_cuda(0)
        g = torch.Generator(device="cpu").manual_seed(5)
        sizes = [1, 4095, 4096, 4097, 65536, 1 << 20, (1 << 20) + 3]
        sizes += [int(x) for x in torch.randint(1, 1 << 20, (73,), generator=g)]
        src = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to("cuda:0")
               for n in sizes]
        keys = ["cu-%d" % i if i % 2 else hashlib.sha256(b"cu%d" % i).digest()
                for i in range(len(sizes))]
        t0 = time.monotonic()
        tasks = [s.dump(keys[i::3], src[i::3]) for i in range(3)]
        for t in tasks:
            assert s.wait(t, 120) == [0] * len(t.keys), t.error
        out["dump_s"] = time.monotonic() - t0
        dst = [torch.full((n,), 0x5A, dtype=torch.uint8, device="cuda:0") for n in sizes]
        torch.cuda.synchronize()  # the fill is done before the copier's streams write
        t0 = time.monotonic()
        tasks = [s.load(keys[i::2], dst[i::2]) for i in range(2)]
        for t in tasks:
            assert s.wait(t, 120) == [0] * len(t.keys), t.error
        out["load_s"] = time.monotonic() - t0
        out["bad"] = [i for i in range(len(sizes)) if not torch.equal(src[i], dst[i])]
        out["blocks"] = len(sizes)
        # the objects are the store's usual ones: a host buffer loads one
        import numpy as np

        h = np.zeros(sizes[4], np.uint8)
        out["host_equal"] = (s.wait(s.load([keys[4]], [h]), 60) == [0]
                             and bytes(h) == bytes(src[4].cpu().numpy()))
        # an object altered in the pool: a miss, the device tensor untouched
        mc = s.client
        data = bytearray(mc.get("cu-5"))
        data[64 + 9] ^= 0x40
        deadline = time.monotonic() + 5
        while mc.upsert("cu-5", bytes(data)) != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        d = torch.full((sizes[5],), 0xEE, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()  # the fill is done before the copier's streams write
        d1 = torch.zeros(sizes[1], dtype=torch.uint8, device="cuda:0")
        t = s.load(["cu-5", "cu-1"], [d, d1])
        out["mismatch_results"] = s.wait(t, 60)
        out["mismatch_untouched"] = bool((d == 0xEE).all())
        out["other_equal"] = torch.equal(d1, src[1])
        out["NF"] = NF
        # the event: the copy starts after it on the GPU
        x = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()
        ev, side = _event_after_slow_write(torch, x, 9)
        out["event_pending_at_dump"] = not ev.query()
        t = s.dump(["cu-ev"], [x], event=ev)
        out["event_dump"] = s.wait(t, 60)
        y = torch.zeros_like(x)
        out["event_load"] = s.wait(s.load(["cu-ev"], [y]), 60)
        out["event_waited"] = bool((y == 9).all())
        side.synchronize()
        st = s.stats()
        out["cuda_errors"] = st["cuda_errors"]
        out["dump_errors"] = st["dump_errors"]
    return out


def test_cuda_roundtrip_over_mooncake(master):
    r = master.run(MOD, "cuda_roundtrip", timeout=300)
    print(json.dumps(r))
    assert r["blocks"] == 80 and r["bad"] == [] and r["host_equal"], r
    assert r["mismatch_results"] == [r["NF"], 0] and r["mismatch_untouched"], r
    assert r["other_equal"], r
    assert r["event_pending_at_dump"] and r["event_dump"] == [0] and r["event_load"] == [0], r
    assert r["event_waited"], r
    assert r["cuda_errors"] == 0 and r["dump_errors"] == 0, r


def scenario_vllm_cuda(ctx):
    """The vLLM adapter with a CUDA KV cache in vLLM's per-layer layout."""
    import importlib

    import torch

    tms.import_store()  # Mooncake's package importable, this tree's store modules
    import kvshelf

    if str(tms.SRC) not in kvshelf.__path__:
        kvshelf.__path__.insert(0, str(tms.SRC))
    vmc = importlib.import_module("kvshelf.vllm_mooncake")

    NB, L, BS, H, D = 24, 4, 16, 2, 64
    g = torch.Generator(device="cpu").manual_seed(9)

    def cache(fill=None):
        if fill is not None:
            return [torch.full((2, NB, BS, H, D), fill, dtype=torch.float16, device="cuda:0")
                    for _ in range(L)]
        return [torch.randn((2, NB, BS, H, D), generator=g).to(torch.float16).to("cuda:0")
                for _ in range(L)]

    def conn(kv):
        c = vmc.MooncakeConnector(ctx.config, device=0, namespace="cu", rank=0, world_size=1)
        c.register_layout([kvshelf.layout_from_tensor(t, 1) for t in kv], NB)
        return c

    out = {}
    kv_a = cache()
    a = conn(kv_a)
    out["backend"] = a.backend
    hashes = [os.urandom(32) for _ in range(8)]
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream())
    t = a.dump(hashes, list(range(8)), ev)
    assert t.wait(60)
    out["dump_failed"] = t.failed()
    kv_b = cache(fill=0.0)
    b = conn(kv_b)
    t = b.load(hashes, list(range(10, 18)))
    assert t.wait(60)
    out["load_failed"] = t.failed()
    out["equal"] = all(torch.equal(x[:, 0:8], y[:, 10:18]) for x, y in zip(kv_a, kv_b))
    out["others_zero"] = all(bool((y[:, :10] == 0).all()) and bool((y[:, 18:] == 0).all())
                             for y in kv_b)
    # an altered object: a miss, those blocks untouched
    mc = a.store.client
    key = a.mooncake_key(hashes[2])
    data = bytearray(mc.get(key))
    data[64 + 3] ^= 0x11
    deadline = time.monotonic() + 5
    while mc.upsert(key, bytes(data)) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    for y in kv_b:
        y[:, 20:22] = 3.0
    t = b.load(hashes[1:3], [20, 21])
    assert t.wait(60)
    out["mismatch_results"] = t.results()
    out["mismatch_untouched"] = all(bool((y[:, 21] == 3.0).all()) for y in kv_b)
    out["first_equal"] = all(torch.equal(x[:, 1], y[:, 20]) for x, y in zip(kv_a, kv_b))
    out["NF"] = kvshelf._kvshelf.ERR_NOT_FOUND
    a.close()
    b.close()
    return out


@pytest.fixture(scope="module")
def vnet(tmp_path_factory):
    why = _gpu_skip_reason()
    if why:
        pytest.skip(why)
    yield from mn.net_fixture(tmp_path_factory, "mooncake-cuda-vllm", "v")


def test_vllm_adapter_cuda_kv_cache(vnet):
    vnet.start_master()
    try:
        r = vnet.run(MOD, "vllm_cuda", timeout=240)
    finally:
        vnet.stop_master(signal.SIGKILL)
    print(json.dumps(r))
    assert r["backend"] == "mooncake-cuda", r
    assert r["dump_failed"] == [] and r["load_failed"] == [] and r["equal"], r
    assert r["others_zero"], r
    assert r["mismatch_results"] == [0, r["NF"]] and r["mismatch_untouched"], r
    assert r["first_equal"], r


# ============================================ no GPU: the store's CUDA plumbing
class HostCopier:
    """A stand-in for kvshelf._kvshelf.CudaCopier over host memory ("device"
    parts are host addresses): runs the store's CUDA path -- batches,
    staging, event snapshots, header checks, view-check failures -- where
    there is no GPU. The real copies are the GPU tests' business."""

    instances = []

    @staticmethod
    def available():
        return True

    @staticmethod
    def device_count():
        return 1

    def __init__(self, device):
        import mmap

        self._mmap = mmap
        self.device = device
        self.maps = {}
        self.snaps, self.freed, self.bad = [], [], set()
        self.dumped, self.loaded, self.events = [], [], []
        self.closed = False
        HostCopier.instances.append(self)

    def pinned_alloc(self, n):
        import ctypes

        m = self._mmap.mmap(-1, n)
        c = ctypes.c_char.from_buffer(m)
        a = ctypes.addressof(c)
        self.maps[a] = (m, c)
        return a

    def pinned_free(self, a):
        self.maps.pop(a, None)

    def snapshot(self, ev):
        h = 1000 + len(self.snaps)
        self.snaps.append((ev, h))
        return h

    def free_snapshot(self, h):
        self.freed.append(h)

    def _copy(self, dump, objs, parts, payload_off, stamp_off):
        import ctypes

        oks = []
        for o, ps in zip(objs, parts):
            assert o % 8 == 0 and stamp_off + 8 <= payload_off
            pos = o + payload_off
            for a, m in ps:
                ctypes.memmove(pos, a, m) if dump else ctypes.memmove(a, pos, m)
                pos += m
            ok = not any(a in self.bad for a, _ in ps)
            oks.append(ok)
            (self.dumped if dump else self.loaded).append([a for a, _ in ps])
        return oks

    def dump(self, objs, parts, *, payload_off=64, stamp_off=56, event=None):
        self.events.append(event)
        return self._copy(True, objs, parts, payload_off, stamp_off)

    def load(self, objs, parts, *, payload_off=64, stamp_off=56):
        return self._copy(False, objs, parts, payload_off, stamp_off)

    def close(self):
        self.closed = True


def test_cuda_path_with_a_host_stand_in(ms, monkeypatch):
    """The store's CUDA path (cuda=True parts, pinned staging, event
    snapshot, header checks before the copy to the device, view-check
    failures as ERR_CUDA) with HostCopier in place of the C copier."""
    import ctypes

    import kvshelf
    import numpy as np

    NF, ECUDA = kvshelf._kvshelf.ERR_NOT_FOUND, kvshelf._kvshelf.ERR_CUDA
    monkeypatch.setattr(ms._k, "CudaCopier", HostCopier, raising=False)
    HostCopier.instances.clear()
    client = tms.DictClient()
    s = ms.MooncakeBlockStore(dict(tms.FAKE_CFG, batch_size=3), client=client)
    try:
        s.enable_cuda(0)
        cp = HostCopier.instances[0]
        assert s.cuda_device == 0 and s._cstaging is not None
        with pytest.raises(kvshelf.InvalidArgument, match="serves one device"):
            s.enable_cuda(1)
        rng = np.random.default_rng(4)
        srcs = [[rng.integers(0, 256, n, dtype=np.uint8) for n in (100, 4000, 7)] for _ in range(7)]

        def pairs(arrs):
            return [(int(a.ctypes.data), a.nbytes) for a in arrs]

        keys = ["hc-%d" % i for i in range(7)]
        t = s.dump(keys, [pairs(b) for b in srcs], cuda=True, event=777, tags=3)
        assert s.wait(t, 30) == [0] * 7, t.error
        assert cp.snaps == [(777, 1000)] and cp.freed == [1000]
        assert set(cp.events) == {1000} and len(cp.events) == 3  # 3 batches, each after the event
        # the stored objects are the usual ones (stamp word zero again), host loads read them
        obj = client.objs["hc-2"]
        assert obj[56:64] == b"\0" * 8 and obj[64:] == b"".join(bytes(a) for a in srcs[2])
        h = np.zeros(4107, np.uint8)
        assert s.wait(s.load(["hc-2"], [h], tags=3), 30) == [0]
        assert bytes(h) == obj[64:]
        # loads: header checked in staging first; a mismatch copies nothing
        bad = bytearray(client.objs["hc-4"])
        bad[64 + 50] ^= 1
        client.objs["hc-4"] = bytes(bad)
        dsts = [[np.full(a.size, 0xEE, np.uint8) for a in b] for b in srcs]
        cp.loaded.clear()
        t = s.load(keys, [pairs(b) for b in dsts], cuda=True, tags=3)
        res = s.wait(t, 30)
        assert res == [0, 0, 0, 0, NF, 0, 0], (res, t.error)
        assert t.mismatches() == [4]
        for i in range(7):
            for a, d in zip(srcs[i], dsts[i]):
                assert (bytes(d) == bytes(a)) if i != 4 else bool((d == 0xEE).all()), i
        assert all(p[0] != int(dsts[4][0].ctypes.data) for p in cp.loaded)
        # the view check failed: ERR_CUDA for that block, the others go on
        cp.bad = {int(srcs[5][0].ctypes.data)}
        t = s.dump(["hv-0", "hv-1", "hv-2"], [pairs(srcs[4]), pairs(srcs[5]), pairs(srcs[6])],
                   cuda=True)
        res = s.wait(t, 30)
        assert res == [0, ECUDA, 0], (res, t.error)
        assert "view check" in t.error and "hv-1" not in client.objs and "hv-2" in client.objs
        cp.bad = {int(dsts[6][0].ctypes.data)}
        t = s.load(["hc-5", "hc-6"], [pairs(dsts[5]), pairs(dsts[6])], cuda=True, tags=3)
        assert s.wait(t, 30) == [0, ECUDA]
        st = s.stats()
        assert st["cuda_errors"] == 2 and st["cuda_dumped"] == 9 and st["cuda_loaded"] == 7, st
        # host blocks still take the host staging
        assert s.wait(s.dump(["host-0"], [np.arange(10, dtype=np.uint8)]), 30) == [0]
    finally:
        s.close()
    assert cp.closed and not cp.maps


def test_checksums_of_a_cuda_batch_on_threads(ms, monkeypatch):
    """A CUDA batch's checksums (dump) and header checks (load) run on the
    checksum threads when the batch is many bytes: the same values as one
    thread, a block altered in the store still a miss among good ones, and
    a bad KVSHELF_MC_CHECKSUM_THREADS refused when the store starts."""
    import threading

    import kvshelf
    import numpy as np

    NF = kvshelf._kvshelf.ERR_NOT_FOUND
    rng = np.random.default_rng(9)
    arrs = [rng.integers(0, 256, (1 << 20) + 8 * i, dtype=np.uint8) for i in range(10)]
    regions = [(int(a.ctypes.data), a.nbytes) for a in arrs]
    monkeypatch.setenv("KVSHELF_MC_CHECKSUM_THREADS", "1")
    one = ms._checksums(ms.ALGO_XXH3, regions)
    monkeypatch.setenv("KVSHELF_MC_CHECKSUM_THREADS", "3")
    assert ms._checksums(ms.ALGO_XXH3, regions) == one
    assert one == [ms._checksum(ms.ALGO_XXH3, a, n) for a, n in regions] and None not in one
    assert any(t.name.startswith("kvshelf-mc-sum") for t in threading.enumerate())

    monkeypatch.setattr(ms._k, "CudaCopier", HostCopier, raising=False)
    HostCopier.instances.clear()
    client = tms.DictClient()
    cfg = dict(tms.FAKE_CFG, batch_size=8, staging_size="32MiB")
    s = ms.MooncakeBlockStore(cfg, client=client)
    try:
        s.enable_cuda(0)
        keys = ["sum-%d" % i for i in range(8)]
        t = s.dump(keys, [[r] for r in regions[:8]], cuda=True)
        assert s.wait(t, 30) == [0] * 8, t.error
        for i in range(8):  # the stored checksums are XXH3 of each payload
            assert int.from_bytes(client.objs[keys[i]][40:48], "little") == one[i]
        bad = bytearray(client.objs["sum-5"])
        bad[-1] ^= 0x40
        client.objs["sum-5"] = bytes(bad)
        outs = [np.full(a.size, 0xEE, np.uint8) for a in arrs[:8]]
        t = s.load(keys, [[(int(o.ctypes.data), o.nbytes)] for o in outs], cuda=True)
        assert s.wait(t, 30) == [0, 0, 0, 0, 0, NF, 0, 0], t.error
        assert t.mismatches() == [5] and (outs[5] == 0xEE).all()
        for i in (0, 1, 2, 3, 4, 6, 7):
            assert np.array_equal(outs[i], arrs[i]), i
    finally:
        s.close()
    monkeypatch.setenv("KVSHELF_MC_CHECKSUM_THREADS", "many")
    with pytest.raises(kvshelf.ConfigError, match="KVSHELF_MC_CHECKSUM_THREADS"):
        ms.MooncakeBlockStore(cfg, client=tms.DictClient())
