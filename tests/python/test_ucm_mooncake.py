"""kvshelf's UCM stores over a real Mooncake Store (issue 16): ``"store":
"mooncake"`` in the store configuration puts the blocks of
``UcmKVShelfStoreV1`` and the legacy ``UcmKVShelfStore`` in Mooncake
(kvshelf.ucm_mooncake over kvshelf.mooncake_store.MooncakeBlockStore).

Real processes: ``mooncake_master`` 0.3.13.post1 from PyPI started here on free
ports in a network namespace this test makes (tests/python/mooncake_net.py),
and each scenario in a process inside it with Mooncake's own client. Every
scenario runs under two interpreters:

- ``local``: this Python with Mooncake's venv (tests/integration/
  mooncake_env.py); kvshelf.ucm's own base classes (UCM is not installed);
- ``ucm-0.8.1``: the Python 3.12 venv of tests/python/ucm_env.py, holding UCM
  0.8.1 from PyPI (its wheel is cp312 only), plus Mooncake's cp312 wheel of
  the same pinned version installed beside it (``pip install --target``,
  cached under ~/.cache/kvshelf): the stores are created by UCM's own V1 and
  legacy factories from the dict UCM's connector builds, and the errors are
  checked against UCM's own classes. The two packages load in one
  interpreter. Runs when that venv is provisioned, or with KVSHELF_TEST_UCM=1
  (which provisions it); skipped otherwise, or with KVSHELF_TEST_UCM=0.

The scenarios use the repository's Python sources of kvshelf (ucm.py,
ucm_mooncake.py, mooncake_store.py) over the installed package's C extension
when the installed copies differ, so the tests test this tree without a
rebuild.

    sudo python3 -m pytest tests/python/test_ucm_mooncake.py -v
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mooncake_net as mn
from test_mooncake_store import SRC, use_tree_sources

MOD = "test_ucm_mooncake"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: mooncake_master's lease on objects read (default 10 s): short, so that a
#: test can overwrite an object it read a moment ago
MASTER_ARGS = ("--default_kv_lease_ttl=300",)


# ============================================================ interpreters
def mooncake_py312_dir() -> Path:
    return Path(os.environ.get("KVSHELF_MOONCAKE_PY312")
                or Path.home() / ".cache" / "kvshelf" / "mooncake-0.3.13.post1-py312")


def provision_mooncake_py312(python: str) -> Path:
    """Mooncake's cp312 wheel (the pin of mooncake_env.py), installed with
    ``pip install --target`` for UCM's Python 3.12 (UCM's venv is left as
    ucm_env.py made it)."""
    req = mn.mooncake_env().MOONCAKE_REQ
    d = mooncake_py312_dir()
    stamp = d / ".kvshelf-mooncake-ok"
    if stamp.exists() and stamp.read_text() == req + "\n" and (d / "mooncake" / "store.so").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--no-deps", "--upgrade", "--target", str(d), req],
                       capture_output=True, text=True, timeout=1200, env=env)
    if r.returncode != 0 or not (d / "mooncake" / "store.so").exists():
        raise RuntimeError("pip install --target %s %s failed:\n%s%s" % (d, req, r.stdout, r.stderr))
    stamp.write_text(req + "\n")
    return d


class Interp:
    def __init__(self, label: str, python: str, site: str):
        self.label, self.python, self.site = label, python, site

    def __repr__(self):
        return self.label


def _ucm_env():
    import ucm_env

    return ucm_env


def ucm_interp() -> Interp:
    """UCM 0.8.1's venv (skips when it is not provisioned and not asked for)."""
    ue = _ucm_env()
    want = os.environ.get("KVSHELF_TEST_UCM")
    stamp = ue.venv_dir() / ".kvshelf-ucm-ok"
    ready = stamp.exists() and stamp.read_text() == ue.STAMP_TEXT
    if want == "0":
        pytest.skip("KVSHELF_TEST_UCM=0: the runs under UCM %s are off" % ue.UCM_VERSION)
    if not ready and want != "1":
        pytest.skip("UCM's venv is not provisioned: KVSHELF_TEST_UCM=1 installs %s there "
                    "(tests/python/ucm_env.py)" % ue.UCM_REQ)
    if not ready:
        if ue.find_python312() is None:
            pytest.skip("no CPython 3.12 here: UCM %s ships cp312 wheels only" % ue.UCM_VERSION)
        py = str(ue.provision())
    else:
        py = str(ue.venv_dir() / "bin" / "python")
    try:
        site = provision_mooncake_py312(py)
    except RuntimeError as e:
        pytest.fail("cannot install Mooncake's cp312 wheel for UCM's Python: %s" % e)
    return Interp("ucm-0.8.1", py, str(site))


@pytest.fixture(scope="module", params=["local", "ucm-0.8.1"])
def interp(request):
    if request.param == "local":
        return Interp("local", sys.executable, str(mn.site_packages()))
    return ucm_interp()


# ================================================================ processes
@pytest.fixture(scope="module")
def net(tmp_path_factory):
    yield from mn.net_fixture(tmp_path_factory, "ucm-mooncake", "u")


def kill_pidfile(path: Path) -> None:
    """Kills a process a scenario started and named in path (a restarted master)."""
    try:
        pid = int(Path(path).read_text())
    except (OSError, ValueError):
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


@pytest.fixture
def master(net):
    net.start_master(*MASTER_ARGS)
    yield net
    net.stop_master()
    kill_pidfile(net.dir / "restart.pid")


def run(net: mn.MooncakeNet, interp: Interp, scenario: str, *, module: str = MOD, config=None,
        timeout: float = 180.0, **params) -> dict:
    """scenario_<scenario>(ctx) of tests/python/<module>.py in a process of
    interpreter ``interp`` inside the namespace (as MooncakeNet.run, with
    another Python); returns its dict. A hang past timeout fails."""
    net._n += 1
    errf = net.dir / ("%s.%s.%d.stderr" % (scenario, interp.label, net._n))
    ctx = {"config": config if config is not None else net.config(),
           "master_pid": net.master.pid if net.master else None, "dir": str(net.dir),
           "params": params}
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("KVSHELF_BIN", None)
    env.update({"KVSHELF_MC_CTX": json.dumps(ctx), "GLOG_minloglevel": "1",
                "KVSHELF_MC_SITE": interp.site, "VLLM_TARGET_DEVICE": "cpu"})
    args = ["ip", "netns", "exec", net.name, interp.python, str(HERE / "mooncake_net.py"),
            "child", module, scenario]
    t0 = time.monotonic()
    with open(errf, "wb") as err:
        # cwd: the test's directory (UCM's logger writes ./log/ucm-PID.log there)
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True,
                             cwd=str(net.dir))
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            raise AssertionError("scenario %s (%s) ran past %.0f s (hung):\n%s\n%s" % (
                scenario, interp.label, timeout, out.decode()[-2000:], net.log_tail(errf)))
    text = out.decode()
    if p.returncode != 0:
        raise AssertionError("scenario %s (%s) failed (rc %s, %.1f s):\n%s\n--- stderr:\n%s" % (
            scenario, interp.label, p.returncode, time.monotonic() - t0, text[-3000:],
            net.log_tail(errf, 80)))
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            d = json.loads(line)
            d["_seconds"] = time.monotonic() - t0
            return d
    raise AssertionError("scenario %s printed no result:\n%s" % (scenario, text[-3000:]))


# ============================================================== child side
def import_ucm():
    """kvshelf.ucm in a scenario process: Mooncake's package on the path
    ($KVSHELF_MC_SITE), UCM's modules first when installed, and this tree's
    Python sources of kvshelf where the installed copies differ."""
    site = os.environ.get("KVSHELF_MC_SITE")
    if site and site not in sys.path:
        sys.path.append(site)
    try:
        import ucm.store.factory_v1  # noqa: F401 - UCM's own classes, when installed
    except ImportError:
        pass
    import kvshelf

    inst = Path(kvshelf.__file__).resolve().parent
    tree = use_tree_sources()
    import kvshelf.ucm as ku

    assert Path(ku.__file__).resolve().parent == (SRC if tree else inst), ku.__file__
    return ku


#: what UCM 0.8.1's _create_store adds to a worker's store configuration
#: (host KV caches: device_id -1, no GPU buffers)
WORKER = {"share_buffer_enable": False, "unique_id": "1234", "tensor_layout": "gqa", "device_id": -1,
          "local_rank_size": 1, "gpu_kv_buffer_addrs": [], "gpu_kv_buffer_sizes": [],
          "cache_buffer_capacity_gb": 8}


def make_v1(ku, cfg: dict, **extra):
    """A V1 store as UCM's connector makes it: UCM's V1 factory with the
    ucm_connectors entry (module path form) when UCM is installed."""
    full = dict(cfg, **extra)
    if ku.HAVE_UCM_V1:
        from ucm.store.factory_v1 import UcmConnectorFactoryV1

        s = UcmConnectorFactoryV1.create_connector("UcmKVShelfStoreV1", full, "kvshelf.ucm")
    else:
        s = ku.UcmKVShelfStoreV1(full)
    assert isinstance(s, ku.UcmKVShelfStoreV1)
    return s


def make_legacy(ku, cfg: dict):
    if ku.HAVE_UCM:
        from ucm.store.factory import UcmConnectorFactory

        s = UcmConnectorFactory.create_connector("UcmKVShelfStore", dict(cfg))
    else:
        s = ku.UcmKVShelfStore(dict(cfg))
    assert isinstance(s, ku.UcmKVShelfStore)
    return s


def ids16(tag: str, n: int) -> list:
    return [hashlib.md5(("%s-%d" % (tag, i)).encode()).digest() for i in range(n)]


def rows(a, sel=None):
    """UCM's address rows: one row per block of the [blocks, tensors, bytes] array a."""
    import numpy as np

    sel = range(a.shape[0]) if sel is None else sel
    return np.array([[a[i, j].ctypes.data for j in range(a.shape[1])] for i in sel], dtype=np.uint64)


def expect_raise(cls, fn, *args):
    try:
        fn(*args)
    except cls as e:
        return e
    raise AssertionError("%s not raised" % cls.__name__)


def ucm_errors(ku):
    """UCM's own error classes when installed (else kvshelf's stand-ins)."""
    if ku.HAVE_UCM_V1:
        from ucm.store.pipeline.errors import StoreNotFoundError, StoreUnhealthyError

        return StoreNotFoundError, StoreUnhealthyError
    return ku._UcmStoreNotFoundError, ku._UcmStoreUnhealthyError


class FakeCudaTensor:
    """What kvshelf.ucm looks at to route a tensor to a CUDA device (no GPU here)."""
    is_cuda = True
    dtype = "torch.float16"

    class device:
        index = 0

    def __init__(self, nbytes: int = 16):
        self.nbytes = nbytes
        self.shape = (nbytes // 2,)

    def is_contiguous(self):
        return True


# ================================================================ scenarios
def scenario_v1_contract(ctx):
    """UCM's V1 call sequence (layerwise and direct), misses, per-block
    results, header mismatches as misses, the CUDA refusal."""
    import numpy as np

    import kvshelf

    ku = import_ucm()
    from kvshelf import mooncake_store as ms
    from kvshelf.ucm_mooncake import MooncakeClient

    not_found, _ = ucm_errors(ku)
    out = {"have_ucm": bool(ku.HAVE_UCM_V1)}
    L, T, n = 3, 2048, 6
    cfg = dict(ctx.config)
    lw = make_v1(ku, cfg, tensor_size_list=[T, T], shard_size=2 * T, block_size=2 * T * L, **WORKER)
    direct = make_v1(ku, cfg, tensor_size_list=[T] * 2 * L, shard_size=2 * T * L, block_size=2 * T * L,
                     **WORKER)
    sched = make_v1(ku, cfg, unique_id="1234")  # the scheduler's store: no sizes, lookups only
    stores = [lw, direct, sched]
    try:
        assert all(isinstance(s._client, MooncakeClient) for s in stores)
        rng = np.random.default_rng(1)
        # ---- layerwise: one dump_data per layer (shard), then lookup, one load_data per layer
        ids = ids16("lw", n)
        src = rng.integers(0, 256, (L, n, 2, T), dtype=np.uint8)
        dst = np.full_like(src, 0xEE)
        assert sched.lookup_on_prefix(ids) == -1
        for layer in range(L):
            t = lw.dump_data(ids, [layer] * n, rows(src[layer]), 0)
            assert lw.wait(t) is None and lw.check(t) is True
            assert sched.lookup_on_prefix(ids) == (n - 1 if layer == L - 1 else -1)
        assert list(sched.lookup(ids + ids16("none", 1))) == [True] * n + [False]
        assert sched.lookup_on_reverse(ids16("none", 1) + ids[:2]) == 2
        for layer in range(L):
            t = lw.load_data(ids, [layer] * n, rows(dst[layer]))
            assert lw.wait(t) is None
        assert np.array_equal(src, dst)
        again = lw.dump_data(ids, [0] * n, rows(src[0]), 0)  # already stored: success
        assert lw.wait(again) is None
        # ---- direct: one shard holds every layer's K and V
        dids = ids16("direct", n)
        dsrc = rng.integers(0, 256, (n, 2 * L, T), dtype=np.uint8)
        ddst = np.full_like(dsrc, 0xEE)
        direct.wait(direct.dump_data(dids, [0] * n, rows(dsrc), 0))
        assert sched.lookup_on_prefix(dids + ids) == 2 * n - 1
        direct.wait(direct.load_data(dids, [0] * n, rows(ddst)))
        assert np.array_equal(dsrc, ddst)
        # ---- misses: UCM's StoreNotFoundError, destination untouched
        absent = ids16("absent", 2)
        buf = np.full((2, 2, T), 0xEE, np.uint8)
        e = expect_raise(ku.BlocksNotFound, lw.wait, lw.load_data(absent, [0, 0], rows(buf)))
        assert isinstance(e, not_found) and isinstance(e, RuntimeError) and e.failed == [0, 1], e
        assert (buf == 0xEE).all()
        # per-block results: present, absent, present
        mix = np.full((3, 2, T), 0xEE, np.uint8)
        e = expect_raise(ku.BlocksNotFound, lw.wait,
                         lw.load_data([ids[0], absent[0], ids[1]], [1, 1, 1], rows(mix)))
        assert e.failed == [1] and e.statuses[0] == 0 and e.statuses[2] == 0, (e.failed, e.statuses)
        assert np.array_equal(mix[0], src[1, 0]) and np.array_equal(mix[2], src[1, 1])
        assert (mix[1] == 0xEE).all()
        # ---- header mismatches are misses, nothing copied
        # another geometry (same bytes per shard: 1024 + 1024 + 2048)
        other = make_v1(ku, cfg, tensor_size_list=[1024, 1024, 2048], shard_size=2 * T,
                        block_size=2 * T * L, **WORKER)
        stores.append(other)
        ob = [np.full(s, 0xEE, np.uint8) for s in (1024, 1024, 2048)]
        e = expect_raise(ku.BlocksNotFound, other.wait,
                         other.load_data(ids[:1], [0], [[int(b.ctypes.data) for b in ob]]))
        assert e.failed == [0] and all((b == 0xEE).all() for b in ob)
        # objects changed behind kvshelf's back with Mooncake's own client
        mc = lw._client.block_store.client
        cids = ids16("changed", 3)
        csrc = rng.integers(0, 256, (3, 2, T), dtype=np.uint8)
        lw.wait(lw.dump_data(cids, [0] * 3, rows(csrc), 0))
        keys = [ms.mooncake_key(i + struct.pack("<I", 0)) for i in cids]
        stored = mc.get(keys[0])
        assert len(stored) == ms.HEADER + 2 * T, len(stored)
        flipped = bytearray(stored)
        flipped[ms.HEADER + 100] ^= 1  # one payload bit
        stale_tag = bytearray(stored)
        stale_tag[48] ^= 1  # the tag (geometry) field
        replace = {keys[0]: bytes(flipped), keys[1]: bytes(stale_tag),
                   keys[2]: bytes(rng.integers(0, 256, len(stored), dtype=np.uint8))}
        for k, v in replace.items():
            deadline = time.monotonic() + 10
            while mc.upsert(k, v) != 0:
                assert time.monotonic() < deadline, "Mooncake's upsert of %s kept failing" % k
                time.sleep(0.2)
        cdst = np.full_like(csrc, 0xEE)
        e = expect_raise(ku.BlocksNotFound, lw.wait, lw.load_data(cids, [0] * 3, rows(cdst)))
        assert e.failed == [0, 1, 2] and (cdst == 0xEE).all()
        st = lw._client.stats()
        out["mismatch"] = st["mismatch"]
        assert st["mismatch"] >= 3, st
        # the next dump of a key found bad replaces its object
        deadline = time.monotonic() + 15
        while True:
            try:
                lw.wait(lw.dump_data(cids, [0] * 3, rows(csrc), 0))
                lw.wait(lw.load_data(cids, [0] * 3, rows(cdst)))
                break
            except ku.TransferError:
                assert time.monotonic() < deadline
                time.sleep(0.3)  # a reader's lease may hold an object a moment
        assert np.array_equal(cdst, csrc)
        # ---- argument errors at the call, as over kvshelf's pool
        try:
            lw.load_data(ids, [L] * n, rows(dst[0]))
            raise AssertionError("shard out of range accepted")
        except ValueError as ex:
            assert "out of range" in str(ex)
        # ---- no native store to hand out
        expect_raise(NotImplementedError, lw.cc_store)
        expect_raise(NotImplementedError, lw.native_client)
        # ---- CUDA memory over Mooncake: refused at the call, with what to do
        kvb = np.zeros((4, 2, T), np.uint8)  # stands for a KV buffer UCM names on device 0
        gpu = make_v1(ku, cfg, tensor_size_list=[T, T], shard_size=2 * T, block_size=2 * T * L,
                      **dict(WORKER, device_id=0, gpu_kv_buffer_addrs=[int(kvb.ctypes.data)],
                             gpu_kv_buffer_sizes=[kvb.nbytes]))
        stores.append(gpu)
        e = expect_raise(kvshelf.Unsupported, gpu.dump_data, ids[:4], [0] * 4, rows(kvb), 0)
        assert isinstance(e, NotImplementedError)
        msg = str(e)
        assert "CUDA device 0" in msg and "drop \"store\": \"mooncake\"" in msg, msg
        expect_raise(kvshelf.Unsupported, gpu.load_data, ids[:4], [0] * 4, rows(kvb))
        expect_raise(kvshelf.Unsupported, lw.dump, ids[:1], [0], [[FakeCudaTensor(T), FakeCudaTensor(T)]])
        out["cuda_refusal"] = msg
    finally:
        for s in stores:
            s.shutdown()
    return out


def scenario_legacy(ctx):
    """The legacy interface (UcmMooncakeStore's) over Mooncake."""
    import numpy as np

    import kvshelf

    ku = import_ucm()
    NF = kvshelf._kvshelf.ERR_NOT_FOUND
    s = make_legacy(ku, dict(ctx.config, kv_block_size=1 << 20, io_size=65536, device=0, role="worker"))
    try:
        from kvshelf.ucm_mooncake import MooncakeClient

        assert isinstance(s._client, MooncakeClient)
        ids = [hashlib.md5(b"legacy-%d" % i).hexdigest() for i in range(4)]
        rng = np.random.default_rng(3)
        k = [rng.standard_normal((16, 2, 8)).astype("float16") for _ in ids]
        v = [rng.standard_normal((16, 2, 8)).astype("float16") for _ in ids]
        ksz = k[0].nbytes
        assert s.create(ids) == [0] * 4 and s.lookup(ids) == [False] * 4
        assert s.wait(s.dump(ids + ids, [0] * 4 + [ksz] * 4, k + v)) == 0
        assert s.lookup(ids) == [True] * 4
        dk = [np.zeros_like(x) for x in k]
        dv = [np.zeros_like(x) for x in v]
        t = s.load(ids + ids, [0] * 4 + [ksz] * 4, dk + dv)
        assert s.wait(t) == 0 and s.check(t) == (0, True)
        assert all(np.array_equal(a, b) for a, b in zip(k + v, dk + dv))
        # same bytes, another dtype: the header does not match -> a miss, nothing copied
        wrong = np.zeros(k[0].size // 2, np.float32)
        t = s.load(ids[:1], [0], [wrong])
        assert s.wait(t) == 1 and t.statuses == [NF] and not wrong.any()
        # raw bytes
        raw = rng.integers(0, 255, (4, 1000), dtype=np.uint8)
        assert s.wait(s.dump_data(ids, [99] * 4, [r.ctypes.data for r in raw], [1000] * 4)) == 0
        back = np.zeros_like(raw)
        assert s.wait(s.fetch_data(ids, [99] * 4, [r.ctypes.data for r in back], [1000] * 4)) == 0
        assert np.array_equal(raw, back)
        small = np.zeros(10, np.uint8)
        t = s.fetch_data(ids[:1], [99], [small.ctypes.data], [10])
        assert s.wait(t) == 1 and t.statuses == [NF] and not small.any()
        # misses
        t = s.load([hashlib.md5(b"nope").hexdigest()] * 2, [0, ksz], [np.zeros(8), np.zeros(8)])
        assert s.wait(t) == 1 and t.statuses == [NF, NF]
        # a failed commit hides the blocks
        s.commit(ids[:2], is_success=False)
        assert s.lookup(ids) == [False, False, True, True]
        try:
            s.cc_store()
            raise AssertionError("cc_store gave a handle")
        except NotImplementedError as e:
            assert "Mooncake" in str(e)
        try:
            s.load(ids[:1], [0], [FakeCudaTensor()])
            raise AssertionError("a CUDA tensor was accepted")
        except kvshelf.Unsupported as e:
            assert "CUDA device 0" in str(e)
    finally:
        s.shutdown()
    return {"ok": True}


def scenario_config_errors(ctx):
    """Wrong or missing configuration: a clear error at creation."""
    import socket

    import kvshelf

    ku = import_ucm()
    c = ctx.config
    out = {}
    geo = dict(tensor_size_list=[4096, 4096], shard_size=8192, block_size=8192, **WORKER)
    CE = kvshelf.ConfigError
    cases = [  # (configuration, message, class, V1 only)
        (dict(c, store="mooncak"), "store='mooncak'", CE, False),
        (dict(c, master_server_adress=c["master_server_address"]), "did you mean 'master_server_address'",
         CE, False),
        (dict(c, staging_sise="1GiB"), "did you mean 'staging_size'", CE, False),
        (dict(c, master_server_address=""), "needs master_server_address", CE, False),
        (dict(c, metadata_server=""), "needs metadata_server", CE, False),
        (dict(c, secret="s3cret"), "'secret' (a key of kvshelf's own pool", CE, False),
        (dict(c, host_connector=True), "host_connector", CE, False),
        (dict(c, protocol="udp"), "'tcp' or 'rdma'", CE, False),
        (dict(c, replica_num=0), "replica_num=0 is out of range", CE, False),
        (dict(c, staging_size="16KiB"), "set staging_size to at least", CE, True),
        (dict(c, tensor_size_list=[4096, 0]), "tensor_size_list[1] must be >= 1", CE, True),
    ]
    sock = socket.socket()
    sock.bind((mn.NS_IP, 0))
    free = sock.getsockname()[1]
    sock.close()
    cases.append((dict(c, master_server_address="%s:%d" % (mn.NS_IP, free)),
                  "cannot reach master_server_address", kvshelf.ConnectionFailed, False))
    t0 = time.monotonic()
    for cfg, want, cls, v1_only in cases:
        extra = {k: v for k, v in geo.items() if k not in cfg}
        for make in (lambda: make_v1(ku, cfg, **extra), lambda: make_legacy(ku, cfg)):
            try:
                make().shutdown()
                raise AssertionError("no error for %r" % {k: v for k, v in cfg.items() if k not in c})
            except cls as e:
                assert want in str(e), (want, str(e))
                if cls is kvshelf.ConfigError:
                    assert isinstance(e, ValueError)
            if v1_only:
                break  # a V1 geometry: the legacy store has none
    out["errors_s"] = time.monotonic() - t0
    assert out["errors_s"] < 20, out
    # "store": "kvshelf" (or none) is kvshelf's own pool, as before
    s = make_v1(ku, {"store": "kvshelf", "master_server_address": "",
                     "runtime_dir": os.path.join(ctx.dir, "pool"), "global_segment_size": "64MiB"})
    try:
        assert type(s._client).__name__ == "Client"
    finally:
        s.shutdown()
        kvshelf.stop_pool(os.path.join(ctx.dir, "pool"))
    return out


def scenario_evicted(ctx):
    """Blocks the master evicted (a small pool filled several times over)
    load as misses; the others byte-exact."""
    import numpy as np

    ku = import_ucm()
    _, unhealthy = ucm_errors(ku)
    T, n, rounds = 128 << 10, 16, 14
    s = make_v1(ku, dict(ctx.config, global_segment_size="16MiB"), tensor_size_list=[T, T],
                shard_size=2 * T, block_size=2 * T, **WORKER)
    try:
        rng = np.random.default_rng(5)
        data, stored, full = {}, [], 0
        for r in range(rounds):  # 14 x 16 x 256 KiB = 56 MiB into a 16 MiB pool
            ids = ids16("ev%d" % r, n)
            src = rng.integers(0, 256, (n, 2, T), dtype=np.uint8)
            try:
                s.wait(s.dump_data(ids, [0] * n, rows(src), 0))
                ok = list(range(n))
            except ku.StoreUnhealthy as e:  # the pool full before the master evicted
                assert isinstance(e, unhealthy)
                full += 1
                ok = [i for i in range(n) if i not in e.failed]
            for i in ok:
                data[ids[i]] = src[i].copy()
                stored.append(ids[i])
            time.sleep(0.05)
        present = list(s.lookup(stored))
        evicted = [b for b, p in zip(stored, present) if not p]
        kept = [b for b, p in zip(stored, present) if p]
        assert evicted and kept, (len(evicted), len(kept))
        sel = evicted[:8] + kept[-8:]
        dst = np.full((len(sel), 2, T), 0xEE, np.uint8)
        try:
            s.wait(s.load_data(sel, [0] * len(sel), rows(dst)))
            failed = []
        except ku.BlocksNotFound as e:
            failed = e.failed
        n_ev = min(8, len(evicted))
        assert failed[:n_ev] == list(range(n_ev)), failed
        later = [sel[i] for i in failed[n_ev:]]  # evicted between the lookup and the load
        assert not any(s.lookup(later)), "blocks present but loaded as misses"
        for i, b in enumerate(sel):
            if i in failed:
                assert (dst[i] == 0xEE).all(), i
            else:
                assert np.array_equal(dst[i], data[b]), i
    finally:
        s.shutdown()
    return {"stored": len(stored), "evicted": len(evicted), "full_rounds": full}


def scenario_ucm_connector(ctx):
    """UCM 0.8.1's own vLLM connector (UCMLayerWiseConnector and
    UCMDirectConnector, with vLLM 0.32's Scheduler; tests/python/ucm_drive.py)
    over a Mooncake Store: UCM's _create_store makes the store through its V1
    factory from the ucm_connectors entry; UCM's lookup, dump and load calls
    move the blocks; a block removed behind UCM's back is a miss (direct: the
    prefix stops there; layerwise: the load reports its blocks to vLLM)."""
    import torch

    import ucm_drive as D

    ku = import_ucm()
    from kvshelf import mooncake_store as ms
    from kvshelf.ucm_mooncake import MooncakeClient

    L, H, HD, BS, NB = 3, 2, 16, 16, 64
    model = D.tiny_llama(Path(ctx.dir) / "tiny-llama", L, H, HD)
    cfg = dict(ctx.config, global_segment_size="64MiB", staging_size="16MiB")
    out = {}
    for layerwise in (True, False):
        mode = "layerwise" if layerwise else "direct"
        entry = {"ucm_connector_name": "UcmKVShelfStoreV1", "ucm_connector_module_path": "kvshelf.ucm",
                 "ucm_connector_config": dict(cfg)}
        extra = {"ucm_connectors": [entry], "use_layerwise": layerwise, "enable_event_sync": False}
        vc = D.vllm_config(model, extra, BS, NB)
        kcc = D.kv_cache_config(vc, NB, L)
        gen = torch.Generator().manual_seed(7)
        kv = {D.LAYER % i: torch.randn(2, NB, BS, H, HD, generator=gen) for i in range(L)}
        worker = D.worker_connector(vc, kcc, kv)
        sched = D.scheduler(vc, kcc)
        try:
            inner = worker.connector
            assert type(inner).__name__ == ("UCMLayerWiseConnector" if layerwise else "UCMDirectConnector")
            store = inner.store
            assert isinstance(store, ku.UcmKVShelfStoreV1) and isinstance(store._client, MooncakeClient)
            per_tensor = BS * H * HD * 4
            assert store._geo.sizes == ([per_tensor] * 2 if layerwise else [per_tensor] * 2 * L)
            prompt = [t + (1000 if layerwise else 2000) for t in range(1, 70)]  # 4 full blocks
            sched.add_request(D.request("a", prompt))
            o = sched.schedule()
            assert o.num_scheduled_tokens["a"] == len(prompt)  # nothing stored yet
            meta = o.kv_connector_metadata
            dump_ids, src = meta.request_meta["a"].dump_block_ids
            assert len(dump_ids) == 4
            D.run_worker_step(worker, meta, kv, layerwise)
            assert worker.get_finished({"a"})[0] == {"a"}
            # the same prompt: UCM's scheduler finds the 4 blocks (lookup_on_prefix) and loads them
            sched.add_request(D.request("b", prompt))
            o = sched.schedule()
            assert o.num_scheduled_tokens["b"] == len(prompt) - 64
            load_ids, dst = o.kv_connector_metadata.request_meta["b"].load_block_ids
            assert load_ids == dump_ids and not set(dst) & set(src)
            for t in kv.values():
                t[:, dst] = 0
            D.run_worker_step(worker, o.kv_connector_metadata, kv, layerwise)
            assert worker.get_block_ids_with_load_errors() == set()
            for name, t in kv.items():  # byte-exact, every layer, K and V
                assert torch.equal(t[:, dst], t[:, src]), name
            # another prompt: a miss
            other = [t + 50000 for t in prompt]
            sched.add_request(D.request("c", other))
            o = sched.schedule()
            assert o.num_scheduled_tokens["c"] == len(other)
            # block 2 removed from Mooncake behind UCM's back (layerwise: layer 1's shard only)
            shard = 1 if layerwise else ku._LAST_SHARD
            bs = store._client.block_store
            assert bs.remove([dump_ids[2] + struct.pack("<I", shard)], force=True) == [0]
            sched.add_request(D.request("d", prompt))
            o = sched.schedule()
            load_ids, dst = o.kv_connector_metadata.request_meta["d"].load_block_ids
            if layerwise:  # complete-looking block, a shard gone: UCM reports the load error to vLLM
                assert load_ids == dump_ids
                D.run_worker_step(worker, o.kv_connector_metadata, kv, layerwise)
                assert set(dst) <= worker.get_block_ids_with_load_errors()
                wm = worker.build_connector_worker_meta()
                assert "d" in wm.missing_reqs and set(dump_ids) <= wm.missing_blocks
            else:  # the lookup stops at the missing block
                assert load_ids == dump_ids[:2]
                D.run_worker_step(worker, o.kv_connector_metadata, kv, layerwise)
                assert worker.get_block_ids_with_load_errors() == set()
            st = store._client.stats()
            out[mode] = {"dumped": st["dumped"], "loaded": st["loaded"], "load_misses": st["load_misses"],
                         "put_calls": st["put_calls"], "get_calls": st["get_calls"]}
            assert st["dumped"] >= 4 and st["loaded"] >= 4, st
            assert ms.mooncake_key(dump_ids[0] + struct.pack("<I", ku._LAST_SHARD)).startswith("#")
        finally:
            for c in (worker.connector, sched.connector.connector):
                try:
                    c.store.shutdown()
                except Exception:  # noqa: BLE001
                    pass
            D.cleanup_shm()
    return out


# ==================================================================== tests
def test_v1_over_mooncake(master, interp):
    r = run(master, interp, "v1_contract")
    print(r)
    assert r["have_ucm"] == (interp.label != "local"), r
    assert r["mismatch"] >= 3, r


def test_legacy_over_mooncake(master, interp):
    run(master, interp, "legacy")


def test_config_errors_at_creation(master, interp):
    r = run(master, interp, "config_errors")
    assert r["errors_s"] < 20, r


def test_evicted_blocks_are_misses(master, interp):
    r = run(master, interp, "evicted", timeout=240)
    print(r)
    assert r["evicted"] >= 1, r


@pytest.fixture(scope="module")
def ucm_only():
    return ucm_interp()


def test_ucm_connector_over_mooncake(master, ucm_only):
    """Only under UCM 0.8.1: its connector needs UCM and vLLM."""
    r = run(master, ucm_only, "ucm_connector", timeout=420)
    print(r)
    assert r["layerwise"]["loaded"] >= 4 and r["direct"]["loaded"] >= 4, r
