"""The vLLM connector's pool over a real Mooncake Store (issue 16).

``kvshelf.vllm.KVShelfConnector`` talks to its pool through one object, a
``kvshelf.Connector`` (the C connector over kvshelf's own pool). When its
``kv_connector_extra_config`` says ``"store": "mooncake"`` (at the top level
or in the nested ``"kvshelf"`` / ``"ucm_connector_config"`` dict),
``kvshelf.vllm`` opens a ``MooncakeConnector`` (this module) instead: the same
methods and the same semantics, with ``kvshelf.mooncake_store.MooncakeBlockStore``
underneath:

- ``register_layout(layouts, num_blocks)``: the KV tensors' layouts
  (``kvshelf.layout_from_tensor``); a block is the concatenation of its parts
  in every tensor (``count`` chunks of ``chunk_bytes`` per tensor), gathered
  into Mooncake's registered staging memory on dump and scattered back on load
  by the store's copy threads (host KV cache: ``memmove`` in C, the GIL
  released; CUDA KV cache: kvshelf's CUDA copy path, see below);
- ``lookup_prefix(hashes)`` -> leading blocks stored (one ``batch_is_exist``
  per 256 keys); errors raise kvshelf exceptions (the connector counts a
  miss);
- ``dump(hashes, block_ids, event=None)`` / ``load(hashes, block_ids)`` ->
  a task with ``wait(timeout=None) -> bool``, ``check()``, ``results()``,
  ``failed()`` and ``n`` (as ``kvshelf.Task``); per-block results: 0,
  ``ERR_NOT_FOUND`` (missing, evicted, or an object whose header does not
  match: another key, length, geometry tag or checksum -- never wrong KV),
  other kvshelf codes for errors. The connector reports failed loads to vLLM,
  which recomputes those blocks. ``wait()`` without a timeout is bounded by
  the store's ``task_timeout_ms``: what is not done then fails with
  ``ERR_TIMEOUT`` and the KV cache is not touched by the task any more;
- one Mooncake object per block and rank: the key is
  ``kvshelf/<digest of the namespace>/<rank>.<world size>/<block hash hex>``;
  the header's tag is a hash of the block's geometry (its parts' sizes), so a
  block written by an engine with another layout is a miss.

Host (CPU) KV caches (the CPU build of vLLM) and CUDA KV caches (``device``
>= 0): a CUDA block's parts (device addresses in vLLM's per-layer tensors
``[2, num_blocks, block_size, kv_heads, head_dim]``) move between the GPU and
the store's pinned staging, registered with Mooncake, through kvshelf's C/CUDA
copies (``kvshelf._kvshelf.CudaCopier``, ``MooncakeBlockStore.enable_cuda``);
a dump's copies wait for the engine's CUDA event on the GPU, a load writes
the KV cache only for blocks whose header checked. A kvshelf built without
CUDA, or a device that cannot be used, fails the worker's start with
``kvshelf.ConfigError`` saying why.

In one process, the scheduler's lookup-only connector and the worker's share
one Mooncake client (one ``MooncakeBlockStore`` per configuration, closed with
its last user). A lookup-only connector that opens first (its own process,
as with vLLM's multiprocess engine) gives the pool no memory
(``global_segment_size`` 0) and small staging: the worker's client is the one
that contributes ``global_segment_size`` to the pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any, Sequence

from . import CONFIG_KEYS, ConfigError, Error, InvalidArgument, LayoutError
from . import _kvshelf as _k
from . import mooncake_store as ms

log = logging.getLogger("kvshelf.vllm_mooncake")

__all__ = ["MooncakeConnector", "MooncakeTask", "selected", "STORE_ONLY_KEYS"]

#: Keys of ``kvshelf.mooncake_store`` that kvshelf's own pool does not have
#: (``max_inflight`` is also a connector key: the connector's value is used).
STORE_ONLY_KEYS = ("store",) + tuple(k for k in ms.STORE_KEYS if k not in ("store", "max_inflight"))


def selected(store_cfg: dict[str, Any] | None) -> bool:
    """True when a store configuration selects Mooncake."""
    return ms.is_mooncake(store_cfg)


def store_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The store configuration in ``cfg`` (the keys of kvshelf's pool, plus
    ``store`` and the Mooncake store's own keys), ``None`` values dropped;
    ``"store": "kvshelf"`` (or an empty store) is the same as no store key."""
    out = {k: v for k, v in cfg.items()
           if (k in CONFIG_KEYS or k in STORE_ONLY_KEYS) and v is not None}
    st = out.get("store")
    if isinstance(st, str) and st.strip().lower() in ("", "kvshelf"):
        del out["store"]
    return out


def check_config(store_cfg: dict[str, Any]) -> dict[str, Any]:
    """``kvshelf.ConfigError`` for a bad Mooncake store configuration
    (``mooncake_store.parse_config``); returns it parsed."""
    return ms.parse_config(dict(store_cfg))


def check_not_mooncake(store_cfg: dict[str, Any]) -> None:
    """``kvshelf.ConfigError`` for Mooncake-store keys in a configuration of
    kvshelf's own pool (they would be ignored), or a ``store`` that is
    neither ``"mooncake"`` nor ``"kvshelf"``."""
    if "store" in store_cfg:
        raise ConfigError("store=%r: \"mooncake\" keeps the blocks in a Mooncake Store "
                          "(mooncake_master at master_server_address); \"kvshelf\" (or no store key) "
                          "in kvshelf's own pool" % (store_cfg["store"],))
    extra = [k for k in store_cfg if k in STORE_ONLY_KEYS]
    if extra:
        raise ConfigError("%s: key%s of a Mooncake Store, used only with \"store\": \"mooncake\" (add "
                          "it, or drop %s)" % (", ".join(extra), "s" if len(extra) > 1 else "",
                                               "them" if len(extra) > 1 else "it"))


# ------------------------------------------------------- shared stores
_stores_lock = threading.Lock()
#: key of the base configuration -> [store, users, lookup-only]
_stores: dict[str, list[Any]] = {}


def _base_key(cfg: dict[str, Any]) -> str:
    c = {k: v for k, v in cfg.items() if k not in ("global_segment_size", "staging_size")}
    return json.dumps(c, sort_keys=True, default=str)


def _acquire(cfg: dict[str, Any], lookup_only: bool) -> tuple[str, Any]:
    key = _base_key(cfg)
    with _stores_lock:
        ent = _stores.get(key)
        if ent is not None and not (ent[2] and not lookup_only):
            ent[1] += 1
            return key, ent[0]
        c = dict(cfg)
        if lookup_only:  # lookups only: no memory for the pool, little staging
            c["global_segment_size"] = 0
            c["staging_size"] = "16MiB"
        store = ms.MooncakeBlockStore(c)
        if ent is None:
            _stores[key] = [store, 1, lookup_only]
        else:  # a lookup-only store exists: this worker's has the segment; both stay
            key = key + "#%d" % id(store)
            _stores[key] = [store, 1, False]
        return key, store


def _release(key: str, timeout: float) -> None:
    with _stores_lock:
        ent = _stores.get(key)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] > 0:
            return
        del _stores[key]
    ent[0].close(timeout=timeout)


# ------------------------------------------------------------- tasks
class MooncakeTask:
    """A dump or load of the connector (the methods of ``kvshelf.Task`` that
    ``kvshelf.vllm`` uses). Wait without a timeout is bounded by the store's
    ``task_timeout_ms``."""

    def __init__(self, kind: str, store: Any, task: Any, n: int, pre_failed: dict[int, int] | None = None,
                 index: list[int] | None = None):
        self.kind = kind
        self._store = store
        self._task = task  # None: nothing submitted
        self.n = n
        self._pre = pre_failed or {}
        self._index = index  # positions of the submitted blocks in this task

    def __repr__(self) -> str:
        return "<kvshelf.vllm_mooncake.MooncakeTask %s of %d blocks, %s>" % (
            self.kind, self.n, "done" if self.check() else "running")

    def wait(self, timeout: float | None = None) -> bool:
        t = self._task
        if t is None:
            return True
        if timeout is None:
            self._store.finish(t)  # at most task_timeout_ms from submission
            return True
        if t.wait(timeout):
            return True
        left = t.submitted + self._store.config["task_timeout_ms"] / 1000.0 - time.monotonic()
        if left <= 0:
            self._store.finish(t, 0)
            return True
        return False

    def check(self) -> bool:
        t = self._task
        if t is None or t.done:
            return True
        if time.monotonic() - t.submitted > self._store.config["task_timeout_ms"] / 1000.0:
            self._store.finish(t, 0)
            return True
        return False

    def results(self) -> list[int]:
        out = [0] * self.n
        for i, c in self._pre.items():
            out[i] = c
        if self._task is not None:
            r = self._task.results()
            for j, i in enumerate(self._index or range(len(r))):
                out[i] = r[j] if r[j] != 1 else _k.ERR_TIMEOUT  # 1: still pending
        return out

    def failed(self) -> list[int]:
        return [i for i, r in enumerate(self.results()) if r != 0]

    @property
    def ok(self) -> int | None:
        return sum(1 for r in self.results() if r == 0) if self.check() else None

    @property
    def done(self) -> bool:
        return self.check()

    def mismatches(self) -> list[int]:
        """Blocks of a load whose stored object's header did not match."""
        if self._task is None:
            return []
        idx = self._index or list(range(self.n))
        return [idx[j] for j in self._task.mismatches()]


# --------------------------------------------------------- connector
class MooncakeConnector:
    """``kvshelf.Connector``'s interface over a Mooncake Store (see the
    module's documentation). ``config``: the store configuration with
    ``"store": "mooncake"``; ``device``: -1 lookup-only, -2 host KV cache,
    >= 0 a KV cache on that CUDA device."""

    backend = "mooncake-host"
    #: Register the KV cache with Mooncake so that dumps are zero-copy
    #: (MooncakeBlockStore.register_memory). Off: with vLLM's per-layer
    #: layout a block is 2 x layers parts (96 x 32 KiB for Qwen2.5-14B), and
    #: Mooncake 0.3.13's TCP transport moved such many-buffer objects at a
    #: third of the rate of the staged path, which gathers a block into one
    #: contiguous slot first (bench/mooncake_bench.py, bench/RESULTS.md).
    REGISTER_KV = False

    def __init__(self, config: dict[str, Any], *, device: int = -2, namespace: str = "",
                 rank: int = 0, world_size: int = 1, max_inflight: int | None = None,
                 backend: str | None = None, num_workers: int | None = None,
                 drop_when_full: bool | None = None, **_ignored: Any):
        cfg = dict(config)
        if max_inflight is not None and "max_inflight" not in cfg:
            cfg["max_inflight"] = int(max_inflight)
        if device >= 0:
            # a ConfigError (not Unsupported, which the pool link would retry forever as an
            # unreachable pool): the engine's start fails and says why, before any connection
            copier = getattr(_k, "CudaCopier", None)
            if copier is None or not copier.available():
                raise ConfigError("kvshelf.vllm_mooncake: this engine's KV cache is on CUDA device "
                                  "%d and this kvshelf was built without CUDA: reinstall kvshelf "
                                  "where the CUDA toolkit (nvcc) is found, or use a host KV cache"
                                  % device)
            found = copier.device_count()
            if device >= found:
                raise ConfigError("kvshelf.vllm_mooncake: this engine's KV cache is on CUDA device "
                                  "%d, which kvshelf's CUDA copies cannot use (%d CUDA devices "
                                  "found)" % (device, found))
        if not 0 <= rank < max(1, world_size):
            raise InvalidArgument("kvshelf.vllm_mooncake: rank %d of world size %d" % (rank, world_size))
        self.device = device
        self.namespace = namespace
        self.rank, self.world_size = int(rank), int(world_size)
        ns = hashlib.blake2b(namespace.encode("utf-8"), digest_size=12).hexdigest()
        self._prefix = "kvshelf/%s/%d.%d/" % (ns, self.rank, self.world_size)
        self._key, self._store = _acquire(cfg, device == -1)
        if device >= 0:
            try:
                self._store.enable_cuda(device)
            except Error as e:  # CudaError, Unsupported, NoMemory (pinned staging), Mooncake's refusal
                _release(self._key, 10.0)
                raise ConfigError("kvshelf.vllm_mooncake: the KV cache on CUDA device %d cannot "
                                  "move through the Mooncake store: %s" % (device, e)) from None
            self.backend = "mooncake-cuda"
        self.config = self._store.config
        self._parts: list[tuple[int, int, int, int, int]] | None = None
        self._num_blocks = 0
        self.block_bytes = 0
        self._tag = 0
        self._flat: list[tuple[int, int, int]] = []
        self._regions: list[int] = []
        self.closed = False
        self._n = {"dump_tasks": 0, "load_tasks": 0}

    # -- layout ----------------------------------------------------------
    def register_layout(self, layouts: Sequence[tuple[int, int, int, int, int]], num_blocks: int) -> None:
        if self.device == -1:
            raise InvalidArgument("kvshelf.vllm_mooncake: a lookup-only connector has no layout")
        if self._parts is not None:
            raise InvalidArgument("kvshelf.vllm_mooncake: the layout is registered already")
        if num_blocks <= 0 or not layouts:
            raise LayoutError("kvshelf.vllm_mooncake: no KV tensors or no blocks")
        parts = []
        for lay in layouts:
            base, bstride, chunk, cstride, count = (int(x) for x in lay)
            if base <= 0 or chunk <= 0 or count <= 0:
                raise LayoutError("kvshelf.vllm_mooncake: bad layout %r" % (lay,))
            parts.append((base, bstride, chunk, cstride, count))
        size = sum(p[2] * p[4] for p in parts)
        if size > self._store.max_block:
            raise LayoutError("kvshelf.vllm_mooncake: a block is %d bytes; staging_size=%d moves blocks "
                              "of at most %d bytes: set staging_size to at least %d"
                              % (size, self._store.config["staging_size"], self._store.max_block,
                                 2 * ms._slot(size)))
        self._parts = parts
        self._num_blocks = int(num_blocks)
        self.block_bytes = size
        if self.REGISTER_KV and self.device < 0:  # host memory only
            self._register_regions(parts, int(num_blocks))
        # per part of a block: (address in block 0, block stride, size)
        self._flat = [(base + c * cstride, bstride, chunk)
                      for base, bstride, chunk, cstride, count in parts for c in range(count)]
        geo = [(p[2], p[4]) for p in parts]
        self._tag = int.from_bytes(hashlib.blake2b(repr(("vllm", geo)).encode(), digest_size=8).digest(),
                                   "little") or 1

    def _register_regions(self, parts: list[tuple[int, int, int, int, int]], num_blocks: int) -> None:
        """Registers the KV cache with Mooncake (merged extents of the
        tensors): dumps are then zero-copy (MooncakeBlockStore.register_memory).
        A registration Mooncake refuses leaves dumps on the staged path."""
        spans = []
        for base, bstride, chunk, cstride, count in parts:
            ends = [base, base + (num_blocks - 1) * bstride, base + (count - 1) * cstride,
                    base + (num_blocks - 1) * bstride + (count - 1) * cstride]
            spans.append((min(ends), max(ends) + chunk))
        spans.sort()
        merged: list[list[int]] = []
        for a, e in spans:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([a, e])
        self._regions = []
        for a, e in merged:
            try:
                self._store.register_memory(a, e - a)
                self._regions.append(a)
            except Exception as ex:  # noqa: BLE001 - staged copies still work
                log.info("kvshelf.vllm_mooncake: KV memory [%#x, %#x) not registered with Mooncake "
                         "(dumps staged): %s", a, e, ex)

    def _block_parts(self, bid: int) -> list[tuple[int, int]]:
        return [(a + bid * bs, m) for a, bs, m in self._flat]

    # -- keys --------------------------------------------------------------
    def _mkey(self, h: bytes | str) -> str:
        if isinstance(h, str):
            h = h.encode("utf-8")
        if not h:
            raise InvalidArgument("kvshelf.vllm_mooncake: an empty block hash")
        return self._prefix + bytes(h).hex()

    # -- operations --------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes]) -> list[bool]:
        return self._store.lookup([self._mkey(h) for h in hashes])

    def lookup_prefix(self, hashes: Sequence[bytes]) -> int:
        if not hashes:
            return 0
        return self._store.lookup_prefix([self._mkey(h) for h in hashes])

    def _plan(self, kind: str, hashes: Sequence[bytes], block_ids: Sequence[int]):
        if self.closed:
            raise ms.Closed("kvshelf.vllm_mooncake: the connector is closed")
        if self._parts is None:
            raise InvalidArgument("kvshelf.vllm_mooncake: %s before register_layout" % kind)
        hashes, block_ids = list(hashes), [int(b) for b in block_ids]
        if len(hashes) != len(block_ids):
            raise InvalidArgument("kvshelf.vllm_mooncake: %s: %d hashes but %d block ids"
                                  % (kind, len(hashes), len(block_ids)))
        keys, bufs, index, pre = [], [], [], {}
        for i, (h, b) in enumerate(zip(hashes, block_ids)):
            if not 0 <= b < self._num_blocks:
                pre[i] = _k.ERR_INVALID
                continue
            keys.append(self._mkey(h))
            bufs.append(self._block_parts(b))
            index.append(i)
        return keys, bufs, index, pre, len(hashes)

    def dump(self, hashes: Sequence[bytes], block_ids: Sequence[int], event: Any = None) -> MooncakeTask:
        keys, bufs, index, pre, n = self._plan("dump", hashes, block_ids)
        cuda = self.device >= 0
        if event is not None and not cuda:  # host caches have no CUDA work; wait for it anyway
            event.synchronize()
        # CUDA: the store's copies wait for the event on the GPU (snapshotted now)
        t = (self._store._submit("dump", keys, bufs, True, None, self._tag, self.block_bytes,
                                 cuda=cuda, event=event if cuda else None)
             if keys else None)
        self._n["dump_tasks"] += 1
        return MooncakeTask("dump", self._store, t, n, pre, index)

    def load(self, hashes: Sequence[bytes], block_ids: Sequence[int]) -> MooncakeTask:
        keys, bufs, index, pre, n = self._plan("load", hashes, block_ids)
        t = (self._store._submit("load", keys, bufs, True, None, self._tag, self.block_bytes,
                                 cuda=self.device >= 0)
             if keys else None)
        self._n["load_tasks"] += 1
        return MooncakeTask("load", self._store, t, n, pre, index)

    def counters(self) -> dict[str, Any]:
        st = self._store.stats()
        out = {"mooncake_" + k: v for k, v in st.items() if isinstance(v, (int, float))}
        out.update(self._n)
        return out

    @property
    def store(self) -> Any:
        """The ``MooncakeBlockStore`` underneath (shared within the process)."""
        return self._store

    def mooncake_key(self, h: bytes) -> str:
        """The Mooncake key of a block hash (this rank's)."""
        return self._mkey(h)

    def close(self, timeout: float = 10.0) -> None:
        if self.closed:
            return
        self.closed = True
        for a in getattr(self, "_regions", []):
            try:
                self._store.unregister_memory(a)
            except Exception:  # noqa: BLE001
                pass
        self._regions = []
        _release(self._key, timeout)

    def __enter__(self) -> "MooncakeConnector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
