"""kvshelf as a store of unified-cache-management (UCM).

Two interfaces, both thin over the C extension (batched zero-copy calls; no
serialization, no byte copies and no per-block round trips in Python):

``UcmKVShelfStore`` (alias ``UcmMooncakeStore``) -- UCM's legacy
``UcmKVStoreBase`` as ``ucm/store/mooncakestore/mooncake_connector.py`` has it
(UCM repository ModelEngine-Group/unified-cache-management, files
``ucm/store/ucmstore.py`` / ``ucm/store/base.py``)::

    __init__(self, config: Dict)            # the seed dict, unchanged
    cc_store(self) -> int                    # native handle (kvs_client*)
    create(self, block_ids: List[str]) -> List[int]            # 0 = ok
    lookup(self, block_ids: List[str]) -> List[bool]           # hit mask
    prefetch(self, block_ids: List[str]) -> None
    load(self, block_ids: List[str], offset: List[int],
         dst_tensor: List[torch.Tensor]) -> Task
    dump(self, block_ids: List[str], offset: List[int],
         src_tensor: List[torch.Tensor]) -> Task
    fetch_data(self, block_ids: List[str], offset: List[int],
               dst_addr: List[int], size: List[int]) -> Task
    dump_data(self, block_ids: List[str], offset: List[int],
              src_addr: List[int], size: List[int]) -> Task
    wait(self, task: Task) -> int            # 0 success, others failed
    commit(self, block_ids: List[str], is_success: bool = True) -> None
    check(self, task: Task) -> Tuple[int, bool]   # (ret, finished)
    shutdown(self) -> None

  The three lists of load/dump/fetch_data/dump_data run in parallel: entry
  ``i`` moves tensor ``i`` (one layer's K or V of one block, for this rank)
  at byte ``offset[i]`` of block ``block_ids[i]`` (UCM computes offset =
  layer_size*layer + layer_size/tp*rank (+ K size for V)). As in
  ``UcmMooncakeStore``, each (block id, offset) pair is one object named
  ``f"{block_id}_{offset}"``, and ``lookup`` tests ``f"{block_id}_0"`` (layer
  0, rank 0, K). Each object written from a tensor starts with a 64-byte
  header (dtype, shape, size): a load into a tensor of another dtype or
  shape fails that entry with a message naming both, instead of handing back
  reinterpreted bytes. ``fetch_data``/``dump_data`` move raw bytes (no
  header). Configuration: the Mooncake keys (``local_hostname``,
  ``metadata_server``, ``protocol``, ``device_name``,
  ``master_server_address``, ``global_segment_size``, ``local_buffer_size``)
  plus kvshelf's ``secret``, ``timeout_ms``, ``runtime_dir``; keys UCM adds
  for other stores (``kv_block_size``, ``io_size``, ``device``, ``role``, ...)
  are ignored. An empty ``master_server_address`` uses the host's embedded
  pool.

``UcmKVShelfStoreV1`` -- UCM's ``UcmKVStoreBaseV1`` (``ucm/store/ucmstore_v1.py``),
as UCM 0.8's vLLM connector (``ucm/integration/vllm/ucm_connector.py``)
creates and drives it (tested against UCM 0.8.1: tests/python/ucm_suite.py)::

    __init__(self, config: Dict[str, object]) -> None
        # UCM's V1 factory passes the ucm_connector_config of the
        # ucm_connectors entry plus, for workers, device_id,
        # tensor_size_list, shard_size (4 KiB-aligned), block_size; checked
        # here (kvshelf.ConfigError), the worker's CUDA device opened here
    cc_store(self) -> int                    # raises NotImplementedError (no UC::StoreV1)
    lookup(self, block_ids: List[bytes]) -> List[bool]
    lookup_on_prefix(self, block_ids: List[bytes]) -> int
        # index of the last block of the leading run present, -1 if none
    lookup_on_reverse(self, block_ids: List[bytes]) -> int
        # index of the rightmost block present, -1 if none
    prefetch(self, block_ids: List[bytes]) -> None
    load(self, block_ids: List[bytes], shard_index: List[int],
         dst_tensor: List[List[torch.Tensor]]) -> Task
    dump(self, block_ids: List[bytes], shard_index: List[int],
         src_tensor: List[List[torch.Tensor]]) -> Task
    load_data(self, block_ids: List[bytes], shard_index: List[int],
              dst_addr: List[List[int]] | np.ndarray) -> Task
    dump_data(self, block_ids: List[bytes], shard_index: List[int],
              src_addr: List[List[int]] | np.ndarray,
              prerequisite_handle: int = 0) -> Task
        # prerequisite_handle: a cudaEvent_t; copies start after it completes
    fetch_data = load_data                   # the older V1 name
    wait(self, task: Task) -> None           # raises on failure: BlocksNotFound (UCM's
        # StoreNotFoundError) for missing blocks, StoreUnhealthy (UCM's
        # StoreUnhealthyError) for a full/unreachable pool, else TransferError
    check(self, task: Task) -> bool          # finished?
    register_memory(self, base_addr: int, total_size: int) -> None

  Block ids are raw bytes (UCM uses 16-byte MD5 digests). Layerwise (UCM's
  default): a shard is a layer, ``tensor_size_list`` its K and V; direct:
  one shard, every layer's K and V. Device memory (below) is stored as one
  object per block: a striped object (``Connector.dump_parts`` with
  ``stripes=block_size // shard_size``) whose shard ``s`` holds tensors
  ``[0..m-1]`` of that shard back to back; the first call that reaches a
  block reserves it (dump) or takes its lease (load), later calls copy
  their shard with no master round trip, and the block is published once
  all its shards are in (byte for byte what a direct-mode dump stores, so
  either mode loads the other's blocks). Host memory (the client path) is
  stored as one object per (block id, shard index). Keys: the id + the
  shard index (4 bytes), a whole block and a block's last shard
  (``block_size // shard_size - 1``) under the index 0xFFFFFFFF. A block is
  "present" for lookup once that key is stored (its last shard, or the
  whole striped block; UCM's Posix store commits a block with its last
  shard too), which a scheduler-side store, made without sizes, can test.
  Addresses given without tensors need the sizes: ``tensor_size_list`` (or
  the older ``tensor_size``: bytes of every tensor, or a list), else the
  sizes learnt from an earlier ``load``/``dump`` with tensors. kvshelf's
  own keys: ``striped`` (default true; false: one object per shard for
  device memory too), ``host_connector`` (default false; true: host memory
  through a host-memory connector as striped objects, as device memory).

Memory: host memory (CPU tensors, numpy arrays, or addresses of host
memory) moves through the store's client as before. CUDA tensors (legacy
``load``/``dump``; V1 ``load``/``dump``) and, for V1 ``load_data``/
``dump_data``, addresses of device memory (inside the KV buffers UCM names
in ``gpu_kv_buffer_addrs``, else recognised with
``cudaPointerGetAttributes``) move through a ``kvshelf.Connector`` opened
lazily on their device (one per device; ``Connector.dump_parts`` /
``load_parts`` with the store's keys as raw keys: GPU copies straight
to/from the pool with ``cudaMemcpyBatchAsync``, or a gather/scatter kernel
when the parts average under 32 KiB; no host bounce). Objects
written from device memory carry the connector's header instead of the
text header (the key, sizes and, for the legacy store, a hash of dtype and
shape are checked on load: a mismatch fails the entry, nothing copied);
an object written from host memory loads into device memory as a miss and
vice versa (never wrong bytes). ``lookup``/``commit`` see both kinds. V1
``dump_data``'s ``prerequisite_handle`` is handed to the connector (the
copies wait on the event on the GPU; the caller's thread never blocks).

Mooncake: with ``"store": "mooncake"`` in the configuration (and Mooncake's
keys: ``master_server_address`` of a ``mooncake_master``, its
``metadata_server``, ...) both stores keep their blocks in a Mooncake Store
instead of kvshelf's pool, with the same calls and results; host memory only
in this version (CUDA memory is refused at the call). See
``kvshelf.ucm_mooncake``.

If the ``ucm`` package is importable the classes subclass its base classes
and are registered with its factories: the legacy factory's
``UcmKVShelfStore`` is the legacy store, the V1 factory's ``UcmKVShelfStore``
and ``UcmKVShelfStoreV1`` the V1 store (UCM >= 0.2 creates V1 stores only);
without importing kvshelf, UCM's ``ucm_connector_module_path: kvshelf.ucm``
with ``ucm_connector_name: UcmKVShelfStoreV1`` finds it. Otherwise compatible
local base classes are used.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import struct
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, Dict, List, Sequence, Tuple

from . import (
    Client,
    Error,
    errname,
    store_config,
    strerror,
)
from . import _kvshelf as _k

logger = logging.getLogger("kvshelf.ucm")

# --------------------------------------------------------------------------
# UCM base classes: UCM's own when importable, else compatible local ones.
# --------------------------------------------------------------------------
try:  # legacy interface
    from ucm.store.ucmstore import Task as _UcmTask  # type: ignore
    from ucm.store.ucmstore import UcmKVStoreBase  # type: ignore

    HAVE_UCM = True
except Exception:  # pragma: no cover - depends on the environment
    try:
        from ucm.store.base import Task as _UcmTask  # type: ignore
        from ucm.store.base import UcmKVStoreBase  # type: ignore

        HAVE_UCM = True
    except Exception:
        HAVE_UCM = False

        class _UcmTask:  # type: ignore[no-redef]
            """Abstract Task for kv transfer (UCM-compatible)."""

        class UcmKVStoreBase:  # type: ignore[no-redef]
            """Local stand-in for ucm.store.ucmstore.UcmKVStoreBase."""

            def __init__(self, config: Dict):
                self.config = config

try:  # V1 interface
    from ucm.store.ucmstore_v1 import Task as _UcmTaskV1  # type: ignore
    from ucm.store.ucmstore_v1 import UcmKVStoreBaseV1  # type: ignore

    HAVE_UCM_V1 = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_UCM_V1 = False

    class _UcmTaskV1:  # type: ignore[no-redef]
        """Asynchronous task handle (UCM-compatible)."""

    class UcmKVStoreBaseV1:  # type: ignore[no-redef]
        """Local stand-in for ucm.store.ucmstore_v1.UcmKVStoreBaseV1."""

        def __init__(self, config: Dict[str, object]) -> None:
            self.config = config


try:  # the error classes UCM's connector tests for (rank_consistency.py)
    from ucm.store.pipeline.errors import StoreNotFoundError as _UcmStoreNotFoundError  # type: ignore
    from ucm.store.pipeline.errors import StoreUnhealthyError as _UcmStoreUnhealthyError  # type: ignore
except Exception:  # pragma: no cover - depends on the environment

    class _UcmStoreNotFoundError(RuntimeError):  # type: ignore[no-redef]
        """Local stand-in for ucm.store.pipeline.errors.StoreNotFoundError."""

    class _UcmStoreUnhealthyError(RuntimeError):  # type: ignore[no-redef]
        """Local stand-in for ucm.store.pipeline.errors.StoreUnhealthyError."""


class TransferError(Error, RuntimeError):
    """A load/dump task had failed entries (UCM V1 ``wait`` raises this; UCM's
    connectors catch RuntimeError). ``.statuses`` has every entry's code,
    ``.failed`` the indices that failed, ``.messages`` one line per failure.
    ``wait`` raises the subclasses below where UCM looks for its own classes."""

    def __init__(self, message: str, statuses: List[int], failed: List[int], messages: List[str]):
        super().__init__(message)
        self.statuses = statuses
        self.failed = failed
        self.messages = messages


class BlocksNotFound(TransferError, _UcmStoreNotFoundError):
    """A load found blocks missing: also UCM's ``StoreNotFoundError``, which
    UCM's RankConsistencyManager turns into "recompute and dump again"."""


class StoreUnhealthy(TransferError, _UcmStoreUnhealthyError):
    """The pool could not take or serve the blocks (full, unreachable, timed
    out, closed): also UCM's ``StoreUnhealthyError``, which UCM's connector
    counts as a failed dump without raising it further."""


OK = 0
ERR_EXISTS = _k.ERR_EXISTS
ERR_NOT_FOUND = _k.ERR_NOT_FOUND
ERR_TOO_LARGE = _k.ERR_TOO_LARGE
ERR_CORRUPT = _k.ERR_CORRUPT
ERR_CLOSED = _k.ERR_CLOSED

_HDR_LEN = 64
_HDR_MAGIC = b"KVSUCM1|"


def _dtype_name(t: Any) -> str:
    d = getattr(t, "dtype", None)
    if d is None:
        return "bytes"
    s = str(d)
    return s[6:] if s.startswith("torch.") else s


def _tensor_header(t: Any) -> bytes:
    """64-byte header describing a tensor: dtype, shape and byte size."""
    shape = tuple(getattr(t, "shape", ()))
    nbytes = getattr(t, "nbytes", None)
    if nbytes is None:
        nbytes = memoryview(t).nbytes
    txt = b"%s%s|%s|%d" % (
        _HDR_MAGIC,
        _dtype_name(t).encode(),
        ",".join(str(int(x)) for x in shape).encode(),
        int(nbytes),
    )
    if len(txt) > _HDR_LEN:  # very high rank: keep dtype and size exact, hash the shape
        import hashlib

        txt = b"%s%s|#%s|%d" % (
            _HDR_MAGIC,
            _dtype_name(t).encode(),
            hashlib.sha1(repr(shape).encode()).hexdigest()[:16].encode(),
            int(nbytes),
        )
    return txt.ljust(_HDR_LEN, b" ")


def _describe_header(h: bytes) -> str:
    if not h.startswith(_HDR_MAGIC):
        return "raw bytes (written by dump_data, or not by this store)"
    try:
        dtype, shape, nbytes = h[len(_HDR_MAGIC):].rstrip(b" ").decode().split("|")
        return f"dtype={dtype} shape=({shape}) bytes={nbytes}"
    except ValueError:
        return repr(h)


def _cuda_event_sync(handle: int) -> None:
    """Blocks the calling (worker) thread until the cudaEvent_t completes."""
    if not handle:
        return
    lib = _cudart()
    if lib is None:
        raise _k.Unsupported("prerequisite_handle given but libcudart could not be loaded")
    rc = lib.cudaEventSynchronize(ctypes.c_void_p(handle))
    if rc != 0:
        raise _k.CudaError(f"cudaEventSynchronize failed with CUDA error {rc}")


_CUDART: Any = None
_CUDART_LOCK = threading.Lock()


def _cudart() -> Any:
    global _CUDART
    with _CUDART_LOCK:
        if _CUDART is None:
            names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.12", "libcudart.so.13"]
            for n in names:
                if not n:
                    continue
                try:
                    _CUDART = ctypes.CDLL(n)
                    _CUDART.cudaEventSynchronize.argtypes = [ctypes.c_void_p]
                    _CUDART.cudaEventSynchronize.restype = ctypes.c_int
                    break
                except OSError:
                    continue
            else:
                _CUDART = False
        return _CUDART or None


def _tensor_device(t: Any) -> int:
    """CUDA ordinal of a tensor's memory, -2 for host memory."""
    if getattr(t, "is_cuda", False):
        idx = getattr(getattr(t, "device", None), "index", None)
        return int(idx) if idx is not None else 0
    return -2


class _PtrAttr(ctypes.Structure):
    # cudaPointerAttributes; CUDA 12.x/13 end it with `long reserved[8]`, which
    # the runtime writes too: the padding must be there (a 24-byte struct was
    # overrun on an H100 with CUDA 13 and crashed the interpreter).
    _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int),
                ("devicePointer", ctypes.c_void_p), ("hostPointer", ctypes.c_void_p),
                ("reserved", ctypes.c_long * 16)]


def _addr_device(addr: int) -> int:
    """CUDA ordinal of the memory at ``addr`` (device or managed memory), -2
    for host memory or when CUDA is not available."""
    lib = _cudart()
    if lib is None or not addr:
        return -2
    try:
        fn = lib.cudaPointerGetAttributes
        fn.argtypes = [ctypes.POINTER(_PtrAttr), ctypes.c_void_p]
        fn.restype = ctypes.c_int
        a = _PtrAttr()
        if fn(ctypes.byref(a), ctypes.c_void_p(int(addr))) != 0:
            lib.cudaGetLastError()
            return -2
    except (AttributeError, OSError):
        return -2
    return int(a.device) if a.type in (2, 3) else -2


def _tag(header: bytes) -> int:
    """64-bit tag of a tensor header (dtype, shape, size) for the connector."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(header, digest_size=8).digest(), "little")


def _check_host_contiguous(what: str, tensors: Sequence[Any]) -> None:
    """Argument errors are raised at submission, not at wait(). (Name kept:
    CUDA tensors are accepted since the stores move device memory too.)"""
    for i, t in enumerate(tensors):
        ic = getattr(t, "is_contiguous", None)
        if ic is not None:
            if not ic():
                raise ValueError(f"{what}: tensor {i} is not contiguous")
        elif not getattr(getattr(t, "flags", None), "c_contiguous", True):
            raise ValueError(f"{what}: array {i} is not C-contiguous")


class KVShelfTask(_UcmTask, _UcmTaskV1 if _UcmTaskV1 is not _UcmTask else object):  # type: ignore[misc]
    """A transfer submitted to the store's I/O threads.

    ``task_id`` (int), ``kind`` ("load"/"dump"), ``n`` (entries); after it
    finished: ``statuses`` (a kvshelf code per entry) and ``messages``."""

    __slots__ = ("task_id", "kind", "n", "future", "statuses", "messages")

    def __init__(self, task_id: int, kind: str, n: int, future: Future):
        self.task_id = task_id
        self.kind = kind
        self.n = n
        self.future = future
        self.statuses: List[int] | None = None
        self.messages: List[str] = []

    def __repr__(self) -> str:
        state = "done" if self.future.done() else "running"
        return f"<KVShelfTask {self.kind} id={self.task_id} n={self.n} {state}>"


class _ConnFuture:
    """The Future interface over connector tasks (CUDA copies already running)."""

    __slots__ = ("_n", "_tasks", "_describe", "_res")

    def __init__(self, n: int, tasks: List[Tuple[List[int], Any]], describe) -> None:
        self._n = n
        self._tasks = tasks
        self._describe = describe
        self._res: Any = None

    def done(self) -> bool:
        return self._res is not None or all(t.check() for _, t in self._tasks)

    def cancel(self) -> bool:  # copies in flight cannot be cancelled
        return False

    def result(self, timeout: float | None = None):
        if self._res is None:
            self._res = _StoreCore._merge_job(self._n, [], None, self._tasks, self._describe)
        return self._res


def _open_client(config: Dict[str, Any], name: str) -> Any:
    """The store's client: kvshelf's pool (``kvshelf.Client``), or with
    ``"store": "mooncake"`` a Mooncake Store (``kvshelf.ucm_mooncake.
    MooncakeClient``: the same methods over ``MooncakeBlockStore``, host
    memory only). The one place where the two differ."""
    from . import ucm_mooncake

    if ucm_mooncake.selected_store(config) == "mooncake":
        return ucm_mooncake.MooncakeClient(config, name)
    return Client(store_config(config))


class _StoreCore:
    """Shared machinery: a client, I/O threads, task bookkeeping."""

    def _core_init(self, config: Dict[str, Any] | None, name: str) -> None:
        config = dict(config or {})
        self._name = name
        self._client = _open_client(config, name)
        threads = int(config.get("io_threads", 2))
        self._io = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=f"kvshelf-{name}")
        self._lock = threading.Lock()
        self._next_id = 0
        self._tasks: Dict[int, KVShelfTask] = {}
        self._shutting_down = False
        self._shutdown_timeout = float(config.get("shutdown_timeout", 30.0))
        self._store_cfg = store_config(config)
        self._conns: Dict[int, Any] = {}
        self._conn_lock = threading.Lock()
        # copy workers of the CUDA connectors (0: the connector's default, 4); each
        # runs one job (<= 128 objects) at a time: a layerwise load, one layer in
        # flight, spreads over them
        self._conn_workers = int(config.get("connector_workers", 0) or 0)

    # ---- device memory: one connector per CUDA device, opened on first use ----
    def _connector(self, device: int):
        refuse = getattr(self._client, "refuse_device", None)
        if refuse is not None:  # a client that moves host memory only (Mooncake): a clear error
            refuse(device)
        with self._conn_lock:
            if self._shutting_down:
                raise _k.Closed(f"{self._name} is shutting down")
            c = self._conns.get(device)
            if c is None:
                c = _k.Connector(self._store_cfg, namespace=f"ucm/{self._name}", device=device,
                                 num_workers=self._conn_workers)
                self._conns[device] = c
            return c

    def _start_device(self, kind: str, device: int, keys: List[Any], parts: Any,
                      sizes: Any = None, tags: Any = None, event: Any = None,
                      stripe: int = 0, stripes: int = 1):
        """Starts a connector parts task (the copies begin now); stripes > 1:
        stripe ``stripe`` of striped objects (one object per block)."""
        conn = self._connector(device)
        if stripes > 1:
            if kind == "dump":
                return conn.dump_parts(keys, parts, event or None, sizes=sizes, tags=tags, raw_keys=True,
                                       stripe=stripe, stripes=stripes)
            return conn.load_parts(keys, parts, sizes=sizes, tags=tags, raw_keys=True,
                                   stripe=stripe, stripes=stripes)
        if kind == "dump":
            return conn.dump_parts(keys, parts, event or None, sizes=sizes, tags=tags, raw_keys=True)
        return conn.load_parts(keys, parts, sizes=sizes, tags=tags, raw_keys=True)

    @staticmethod
    def _merge_job(n: int, host_idx: List[int], host_fn, dev_tasks: List[Tuple[List[int], Any]],
                   describe) -> Tuple[List[int], List[str]]:
        """Runs the host part (host_fn(indices) -> (statuses, messages)) and
        collects the device tasks; statuses in entry order."""
        if not host_idx and len(dev_tasks) == 1 and len(dev_tasks[0][0]) == n:
            t = dev_tasks[0][1]  # one connector task for every entry (UCM's calls): no per-entry loop
            t.wait()
            st = list(t.results())
            if st.count(OK) == n:
                return st, []
            return st, [describe(i) for i, x in enumerate(st) if x in (ERR_CORRUPT, ERR_TOO_LARGE)][:8]
        st = [OK] * n
        msgs: List[str] = []
        if host_idx:
            hst, hm = host_fn(host_idx)
            for j, i in enumerate(host_idx):
                st[i] = hst[j]
            msgs.extend(hm)
        for idx, t in dev_tasks:
            t.wait()
            r = t.results()
            for j, i in enumerate(idx):
                st[i] = r[j]
                if r[j] in (ERR_CORRUPT, ERR_TOO_LARGE) and len(msgs) < 8:
                    msgs.append(describe(i))
        return st, msgs

    def _submit_mixed(self, kind: str, n: int, devs: List[int], start_dev, host_fn, describe) -> "KVShelfTask":
        """Entries on CUDA devices start now through the connectors
        (start_dev(device, indices) -> Task); the rest runs on the I/O threads."""
        groups: Dict[int, List[int]] = {}
        for i, d in enumerate(devs):
            groups.setdefault(d, []).append(i)
        host_idx = groups.pop(-2, [])
        dev_tasks = [(idx, start_dev(d, idx)) for d, idx in groups.items()]
        return self._submit(kind, n, self._merge_job, n, host_idx, host_fn, dev_tasks, describe)

    # ---- tasks ----
    def _submit(self, kind: str, n: int, fn, *args) -> KVShelfTask:
        with self._lock:
            if self._shutting_down:
                raise _k.Closed(f"{self._name} is shutting down")
            self._next_id += 1
            tid = self._next_id
            fut = self._io.submit(fn, *args)
            task = KVShelfTask(tid, kind, n, fut)
            self._tasks[tid] = task
        return task

    def _submit_direct(self, kind: str, n: int, dev_tasks: List[Tuple[List[int], Any]], describe) -> KVShelfTask:
        """A task made only of connector tasks (device memory): no I/O thread
        in between; wait() collects them in the caller's thread."""
        with self._lock:
            if self._shutting_down:
                raise _k.Closed(f"{self._name} is shutting down")
            self._next_id += 1
            tid = self._next_id
            task = KVShelfTask(tid, kind, n, _ConnFuture(n, dev_tasks, describe))
            self._tasks[tid] = task
        return task

    def _collect(self, task: KVShelfTask, timeout: float | None = None) -> List[int]:
        """Waits for the task; returns per-entry statuses (KVS_ERR_CLOSED
        everywhere if it was cancelled by shutdown)."""
        if task.statuses is not None:
            return task.statuses
        try:
            res = task.future.result(timeout)
            statuses, messages = res if isinstance(res, tuple) else (res, [])
        except CancelledError:
            statuses, messages = [ERR_CLOSED] * task.n, [f"task {task.task_id} cancelled by shutdown"]
        except Error as e:
            statuses = [getattr(e, "code", None) or -19] * task.n
            messages = [str(e)]
        except Exception as e:  # a bug or an unexpected argument
            statuses, messages = [-19] * task.n, [f"{type(e).__name__}: {e}"]
        task.statuses = list(statuses)
        task.messages = messages
        with self._lock:
            self._tasks.pop(task.task_id, None)
        return task.statuses

    @staticmethod
    def _ok(status: int, kind: str) -> bool:
        return status == OK or (kind == "dump" and status == ERR_EXISTS)

    def _failure_lines(self, task: KVShelfTask) -> List[str]:
        out = list(task.messages)
        for i, s in enumerate(task.statuses or []):
            if not self._ok(s, task.kind) and len(out) < 8:
                out.append(f"entry {i}: {errname(s)}: {strerror(s)}")
        return out

    def _shutdown_core(self) -> None:
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
            tasks = list(self._tasks.values())
        for t in tasks:  # queued ones are cancelled, running ones finish
            t.future.cancel()
        self._io.shutdown(wait=True, cancel_futures=True)
        with self._conn_lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for c in conns:
            try:
                c.close(self._shutdown_timeout)
            except Error:
                pass
        self._client.close()

    def cc_store(self) -> int:
        """Address of the native kvs_client (0 after shutdown)."""
        return int(self._client.handle or 0)

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


# --------------------------------------------------------------------------
# Legacy interface (UcmMooncakeStore)
# --------------------------------------------------------------------------


class UcmKVShelfStore(_StoreCore, UcmKVStoreBase):
    """Drop-in for UCM's ``UcmMooncakeStore`` (legacy ``UcmKVStoreBase``)."""

    def __init__(self, config: Dict = {}):  # noqa: B006 - UCM's signature
        UcmKVStoreBase.__init__(self, config)
        self._core_init(config, "UcmKVShelfStore")

    @staticmethod
    def _keys(block_ids: Sequence[str], offset: Sequence[int]) -> List[str]:
        if len(block_ids) != len(offset):
            raise ValueError(f"{len(block_ids)} block ids but {len(offset)} offsets")
        return [f"{b}_{o}" for b, o in zip(block_ids, offset)]

    def create(self, block_ids: List[str]) -> List[int]:
        """Objects are created by dump; always 0 per block (as Mooncake)."""
        return [0] * len(block_ids)

    def lookup(self, block_ids: List[str]) -> List[bool]:
        """Hit mask: ``f"{id}_0"`` stored. One round trip for all ids."""
        if self._shutting_down:
            raise RuntimeError("UcmKVShelfStore is shutting down.")
        if not block_ids:
            return []
        return self._client.exists_batch([f"{b}_0" for b in block_ids])

    def prefetch(self, block_ids: List[str]) -> None:
        """No-op: the pool is already host memory."""
        return None

    # tensors -------------------------------------------------------------
    def _tensor_job(self, kind: str, keys: List[str], tensors: List[Any]) -> Tuple[List[int], List[str]]:
        headers = [_tensor_header(t) for t in tensors]
        if kind == "dump":
            st = self._client.put_parts(keys, tensors, None, headers)
            return st, []
        st = self._client.get_parts(keys, tensors, None, headers)
        messages = []
        for i, s in enumerate(st):
            if s in (ERR_CORRUPT, ERR_TOO_LARGE) and len(messages) < 8:
                try:
                    stored = _describe_header(self._client.read_header(keys[i], _HDR_LEN))
                except Error:
                    stored = "unreadable"
                messages.append(
                    f"load {keys[i]}: stored {stored}; destination {_describe_header(headers[i])}"
                    " (wrong dtype or size: nothing copied)"
                )
        return st, messages

    def _check_tensors(self, what: str, block_ids, offset, tensors) -> List[str]:
        if len(block_ids) != len(tensors):
            raise ValueError(f"{what}: {len(block_ids)} block ids but {len(tensors)} tensors")
        _check_host_contiguous(what, tensors)
        return self._keys(block_ids, offset)

    def _tensor_task(self, kind: str, keys: List[str], tensors: List[Any]) -> KVShelfTask:
        devs = [_tensor_device(t) for t in tensors]
        if all(d == -2 for d in devs):  # host memory: as before
            return self._submit(kind, len(keys), self._tensor_job, kind, keys, tensors)
        headers = [_tensor_header(t) for t in tensors]

        def start_dev(d: int, idx: List[int]):
            return self._start_device(kind, d, [keys[i] for i in idx], [[tensors[i]] for i in idx],
                                      tags=[_tag(headers[i]) for i in idx])

        def host_fn(idx: List[int]):
            return self._tensor_job(kind, [keys[i] for i in idx], [tensors[i] for i in idx])

        def describe(i: int) -> str:
            return (f"load {keys[i]}: stored object's dtype, shape or size differ from the "
                    f"destination {_describe_header(headers[i])} (wrong dtype or size: nothing copied)")

        return self._submit_mixed(kind, len(keys), devs, start_dev, host_fn, describe)

    def load(self, block_ids: List[str], offset: List[int], dst_tensor: List[Any]) -> KVShelfTask:
        """Loads ``dst_tensor[i]`` from block ``block_ids[i]`` at ``offset[i]``
        (host or CUDA tensors)."""
        keys = self._check_tensors("load", block_ids, offset, dst_tensor)
        return self._tensor_task("load", keys, list(dst_tensor))

    def dump(self, block_ids: List[str], offset: List[int], src_tensor: List[Any]) -> KVShelfTask:
        """Stores ``src_tensor[i]`` as block ``block_ids[i]`` at ``offset[i]``
        (host or CUDA tensors)."""
        keys = self._check_tensors("dump", block_ids, offset, src_tensor)
        return self._tensor_task("dump", keys, list(src_tensor))

    # raw addresses -------------------------------------------------------
    def _raw_job(self, kind: str, keys: List[str], addrs: List[int], sizes: List[int]):
        pairs = list(zip(addrs, sizes))
        if kind == "dump":
            return self._client.put_batch(keys, pairs), []
        got = self._client.get_batch(keys, pairs)
        st, msgs = [], []
        for i, g in enumerate(got):
            if g >= 0 and g != sizes[i]:
                st.append(ERR_TOO_LARGE)
                if len(msgs) < 8:
                    msgs.append(f"fetch {keys[i]}: stored {g} bytes, destination {sizes[i]}")
            else:
                st.append(g if g < 0 else OK)
        return st, msgs

    def _check_raw(self, what, block_ids, offset, addr, size) -> List[str]:
        if not (len(block_ids) == len(addr) == len(size)):
            raise ValueError(
                f"{what}: {len(block_ids)} block ids, {len(addr)} addresses, {len(size)} sizes"
            )
        return self._keys(block_ids, offset)

    def fetch_data(self, block_ids: List[str], offset: List[int], dst_addr: List[int], size: List[int]) -> KVShelfTask:
        """Loads raw bytes into host addresses ``dst_addr[i]`` (``size[i]`` bytes)."""
        keys = self._check_raw("fetch_data", block_ids, offset, dst_addr, size)
        return self._submit("load", len(keys), self._raw_job, "load", keys, list(dst_addr), list(size))

    def dump_data(self, block_ids: List[str], offset: List[int], src_addr: List[int], size: List[int]) -> KVShelfTask:
        """Stores raw bytes from host addresses ``src_addr[i]`` (``size[i]`` bytes)."""
        keys = self._check_raw("dump_data", block_ids, offset, src_addr, size)
        return self._submit("dump", len(keys), self._raw_job, "dump", keys, list(src_addr), list(size))

    # completion ----------------------------------------------------------
    def wait(self, task: KVShelfTask) -> int:
        """0 when every entry succeeded (a dump of an already stored object
        counts), else 1 (the reasons are logged and kept in task.messages)."""
        if not isinstance(task, KVShelfTask):
            logger.error("wait: not a task of this store: %r", task)
            return 1
        st = self._collect(task)
        if all(self._ok(s, task.kind) for s in st):
            return 0
        for line in self._failure_lines(task):
            logger.error("kvshelf %s task %d: %s", task.kind, task.task_id, line)
        return 1

    def check(self, task: KVShelfTask) -> Tuple[int, bool]:
        """(ret, finished): ret 0 = success so far / succeeded, 1 = failed."""
        if task.statuses is None and not task.future.done():
            return 0, False
        return self.wait(task), True

    def commit(self, block_ids: List[str], is_success: bool = True) -> None:
        """On failure, hides the blocks from lookup (removes ``{id}_0``)."""
        if is_success or not block_ids:
            return None
        try:
            self._client.remove_batch([f"{b}_0" for b in block_ids])
        except Error as e:
            logger.warning("commit(is_success=False): %s", e)
        return None

    def shutdown(self) -> None:
        """Cancels queued tasks, lets running ones finish, closes the client."""
        self._shutdown_core()


#: The name UCM configurations use for the store kvshelf replaces.
UcmMooncakeStore = UcmKVShelfStore


# --------------------------------------------------------------------------
# V1 interface
# --------------------------------------------------------------------------


#: Shard field of the key of a block's last shard. lookup tests this key: a
#: block is present once its last shard is stored, as UCM's Posix store
#: commits a block file when its last shard is written, and a scheduler-side
#: store (which UCM creates without sizes) needs no shard count to look it up.
_LAST_SHARD = 0xFFFFFFFF

#: Dump failures that mean "the pool cannot take it now" (UCM's StoreUnhealthyError).
_UNHEALTHY = frozenset(
    getattr(_k, n) for n in ("ERR_NO_SPACE", "ERR_NOMEM", "ERR_UNAVAILABLE", "ERR_CONN",
                             "ERR_TIMEOUT", "ERR_CLOSED", "ERR_BUSY") if hasattr(_k, n))

#: Keys UCM 0.8's connector adds to ``ucm_connector_config`` that kvshelf reads
#: (the rest -- share_buffer_enable, cache_buffer_capacity_gb, storage_backends,
#: unique_id, tensor_layout, local_rank_size, gpu_kv_buffer_addrs/sizes,
#: cpu_affinity_cores, posix_gc_enable, store_pipeline, ... -- is ignored).
V1_KEYS = ("tensor_size_list", "tensor_size", "shard_size", "block_size", "device_id")


def _cfg_int(name: str, v: Any, minimum: int = 1) -> int:
    import operator

    if isinstance(v, bool):
        raise _k.ConfigError(f"UcmKVShelfStoreV1: {name} must be an integer, not {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            i = int(v)
        else:
            raise _k.ConfigError(f"UcmKVShelfStoreV1: {name} must be an integer, not {v!r}") from None
    if i < minimum:
        raise _k.ConfigError(f"UcmKVShelfStoreV1: {name} must be >= {minimum}, got {i}")
    return i


def _cfg_sizes(name: str, v: Any, scalar_ok: bool) -> List[int]:
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        if not v:
            raise _k.ConfigError(f"UcmKVShelfStoreV1: {name} is empty")
        return [_cfg_int(f"{name}[{i}]", x) for i, x in enumerate(v)]
    if not scalar_ok:
        raise _k.ConfigError(f"UcmKVShelfStoreV1: {name} must be a list of byte sizes, not {v!r}")
    return [_cfg_int(name, v)]


def _cfg_bool(cfg: Dict[str, Any] | None, name: str, default: bool = False) -> bool:
    v = (cfg or {}).get(name, default)
    if isinstance(v, str):
        if v.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if v.strip().lower() in ("", "0", "false", "no", "off"):
            return False
        raise _k.ConfigError(f"UcmKVShelfStoreV1: {name} must be a boolean, not {v!r}")
    return bool(v)


#: Most shards per block stored as one striped object (the connector's limit;
#: more shards: one object per shard, as before).
_MAX_STRIPES = 65536


def _kv_ranges(cfg: Dict[str, Any] | None, device_id: int) -> Any:
    """(sorted starts, ends, device) of the KV buffers UCM's connector names
    in gpu_kv_buffer_addrs / gpu_kv_buffer_sizes (device memory of the
    worker's device), or None."""
    cfg = cfg or {}
    a, z = cfg.get("gpu_kv_buffer_addrs"), cfg.get("gpu_kv_buffer_sizes")
    if device_id < 0 or not a or not z:
        return None
    try:
        pairs = sorted((int(x), int(x) + int(y)) for x, y in zip(list(a), list(z)) if int(x) and int(y) > 0)
    except (TypeError, ValueError):
        return None
    if not pairs or len(list(a)) != len(list(z)):
        return None
    return ([p[0] for p in pairs], [p[1] for p in pairs], device_id)


try:
    import numpy as _np
except ImportError:  # pragma: no cover - UCM itself needs numpy
    _np = None


def _key_rows(block_ids: Sequence[bytes], suffix: bytes) -> Any:
    """[n, len(id) + len(suffix)] uint8 array of id + suffix, or None when the
    ids are not bytes of one length (or numpy is missing)."""
    if _np is None:
        return None
    try:
        if len(set(map(len, block_ids))) != 1:
            return None
        joined = b"".join(block_ids)
    except TypeError:
        return None
    n = len(block_ids)
    w = len(joined) // n
    if not w:
        return None
    k = _np.empty((n, w + len(suffix)), _np.uint8)
    k[:, :w] = _np.frombuffer(joined, _np.uint8).reshape(n, w)
    k[:, w:] = _np.frombuffer(suffix, _np.uint8)
    return k


class _Geometry:
    """What a V1 store learns from UCM's configuration (checked at creation).

    ``sizes``: bytes of each tensor of one shard (UCM's ``tensor_size_list``;
    the older ``tensor_size``: one size for every tensor, or a list);
    ``n_shards``: shards per block (``block_size // shard_size``, UCM pads
    ``shard_size`` up to 4 KiB, so it may exceed the sum of the sizes);
    ``device_id``: the worker's CUDA device (UCM's workers), -1 if not given."""

    __slots__ = ("sizes", "scalar", "shard_size", "block_size", "n_shards", "device_id")

    def __init__(self, config: Dict[str, Any] | None) -> None:
        cfg = config or {}
        tsl, ts = cfg.get("tensor_size_list"), cfg.get("tensor_size")
        self.sizes: List[int] | None = None
        self.scalar = False  # one size for every tensor, count unknown
        if tsl is not None:
            self.sizes = _cfg_sizes("tensor_size_list", tsl, scalar_ok=False)
        if ts is not None:
            legacy = _cfg_sizes("tensor_size", ts, scalar_ok=True)
            if self.sizes is None:
                self.sizes = legacy
                self.scalar = not isinstance(ts, (list, tuple)) and not hasattr(ts, "tolist")
            elif legacy != self.sizes and not (len(legacy) == 1 and set(self.sizes) == set(legacy)):
                raise _k.ConfigError(
                    f"UcmKVShelfStoreV1: tensor_size {legacy} contradicts tensor_size_list {self.sizes}")
        self.shard_size = _cfg_int("shard_size", cfg["shard_size"]) if cfg.get("shard_size") is not None else None
        self.block_size = _cfg_int("block_size", cfg["block_size"]) if cfg.get("block_size") is not None else None
        self.n_shards: int | None = None
        if self.shard_size is not None and self.block_size is not None:
            if self.block_size % self.shard_size:
                raise _k.ConfigError(
                    f"UcmKVShelfStoreV1: block_size {self.block_size} is not a multiple of shard_size "
                    f"{self.shard_size}")
            self.n_shards = self.block_size // self.shard_size
        elif cfg.get("lookup_shards") is not None:  # kvshelf <= 0.1's name for the shard count
            self.n_shards = _cfg_int("lookup_shards", cfg["lookup_shards"])
        if self.sizes is not None and self.shard_size is not None:
            if self.scalar:  # UCM's older convention: shard_size = m * tensor_size
                if self.shard_size % self.sizes[0]:
                    raise _k.ConfigError(
                        f"UcmKVShelfStoreV1: shard_size {self.shard_size} is not a multiple of "
                        f"tensor_size {self.sizes[0]}")
                self.sizes = self.sizes * (self.shard_size // self.sizes[0])
                self.scalar = False
            elif sum(self.sizes) > self.shard_size:
                raise _k.ConfigError(
                    f"UcmKVShelfStoreV1: tensor_size_list {self.sizes} holds {sum(self.sizes)} bytes, "
                    f"more than shard_size {self.shard_size}")
        dev = cfg.get("device_id")
        self.device_id = _cfg_int("device_id", dev, minimum=-1) if dev is not None else -1
        if self.device_id >= 0 and self.sizes is None:
            raise _k.ConfigError(
                "UcmKVShelfStoreV1: device_id is set (a UCM worker) but tensor_size_list is missing: "
                "UCM's connector passes both to its workers; without the sizes no block can move")


class UcmKVShelfStoreV1(_StoreCore, UcmKVStoreBaseV1):
    """``UcmKVStoreBaseV1`` over kvshelf, as UCM 0.8's connector drives it.

    Created by UCM's V1 factory from the dict ``_create_store`` builds: the
    ``ucm_connector_config`` of the ``ucm_connectors`` entry (Mooncake/kvshelf
    keys) plus what UCM adds. Workers get ``device_id``, ``tensor_size_list``,
    ``shard_size`` and ``block_size``; the scheduler gets none of them (it only
    looks up). Wrong or contradictory values raise ``kvshelf.ConfigError``
    (a ValueError) here, and a worker's CUDA device is opened here."""

    def __init__(self, config: Dict[str, object]) -> None:
        UcmKVStoreBaseV1.__init__(self, config)
        geo = _Geometry(config)  # before anything is opened: config errors first
        self._core_init(config, "UcmKVShelfStoreV1")
        self._geo = geo
        self._sizes: List[int] | None = None if geo.scalar else geo.sizes
        self._scalar_size: int | None = geo.sizes[0] if geo.scalar else None
        self._n_shards = geo.n_shards
        self._last = (geo.n_shards or 1) - 1
        self._dtype: str | None = str(config.get("dtype")) if config and config.get("dtype") else None
        self._hdr_cache: Dict[Tuple[int, ...], bytes] = {}
        # Device memory (and host memory with host_connector) moves as striped
        # objects: one object per block holding all its shards, each call
        # moving one shard of every block (see the module docstring).
        n = geo.n_shards or 0
        self._stripes = n if 1 < n <= _MAX_STRIPES and _cfg_bool(config, "striped", True) else 1
        self._host_conn = _cfg_bool(config, "host_connector")
        self._bkeys: Any = None  # (ids of the last call, their block keys)
        self._dev_ranges = _kv_ranges(config, geo.device_id)
        if geo.device_id >= 0 and not getattr(self._client, "host_only", False):
            try:
                self._connector(geo.device_id)
            except BaseException:
                self._shutdown_core()
                raise

    # ---- native handle ----------------------------------------------------
    def cc_store(self) -> int:
        """Refused: UCM's native consumers of ``cc_store()`` cast it to one of
        UCM's C++ store classes (``UC::StoreV1``/``UC::CCStore``; in UCM 0.8
        only the GSA sparse prefetch engine does, and it aborts the process on
        0), and kvshelf has none. Raises NotImplementedError so that such a
        mode stops with this message instead of crashing in native code; the
        prefix-cache connectors never call it. ``native_client()`` gives the
        ``kvs_client*`` for kvshelf's own C API."""
        raise NotImplementedError(
            "UcmKVShelfStoreV1.cc_store(): kvshelf is not a UCM C++ store (UC::StoreV1/CCStore), so "
            "UCM's native sparse modes (GSA prefetch) cannot drive it; use UCM's prefix-cache "
            "connectors (UCMDirectConnector/UCMLayerWiseConnector) with kvshelf")

    def native_client(self) -> int:
        """Address of the store's ``kvs_client`` (kvshelf's C API; 0 after shutdown)."""
        return int(self._client.handle or 0)

    # ---- keys ----------------------------------------------------------------
    def _keys(self, block_ids: Sequence[bytes], shard_index: Sequence[int]) -> Any:
        """One key per (block id, shard): id + 4-byte shard (the last shard:
        _LAST_SHARD). UCM's calls (one shard for all blocks, ids of one
        length) get a 2-D uint8 array, one key a row, which the extension
        copies at once; others a list of bytes."""
        n = len(block_ids)
        if n != len(shard_index):
            raise ValueError(f"{n} block ids but {len(shard_index)} shard indexes")
        if not n:
            return []
        idx = shard_index.tolist() if hasattr(shard_index, "tolist") else shard_index
        s0 = idx[0]
        p = struct.Struct("<I").pack
        if (idx.count(s0) == n) if isinstance(idx, list) else all(s == s0 for s in idx):
            suffix = p(self._shard_field(s0))
            rows = _key_rows(block_ids, suffix)
            if rows is not None:
                return rows
            try:
                return [b + suffix for b in block_ids]
            except TypeError:
                return [bytes(b) + suffix for b in block_ids]
        return [bytes(b) + p(self._shard_field(s)) for b, s in zip(block_ids, idx)]

    def _shard_field(self, s: int) -> int:
        s = int(s)
        if s < 0 or s >= _LAST_SHARD or (self._n_shards is not None and s >= self._n_shards):
            raise ValueError(
                f"shard index {s} out of range: this store's blocks have "
                f"{self._n_shards if self._n_shards is not None else 'up to 2**32-1'} shards "
                "(block_size // shard_size)")
        return _LAST_SHARD if s == self._last else s

    def _lookup_keys(self, block_ids: Sequence[bytes]) -> Any:
        suffix = struct.pack("<I", _LAST_SHARD)
        rows = _key_rows(block_ids, suffix)
        if rows is not None:
            return rows
        try:
            return [b + suffix for b in block_ids]
        except TypeError:
            return [bytes(b) + suffix for b in block_ids]

    def _geometry_header(self, sizes: Sequence[int]) -> bytes:
        """64-byte header: tensor count and sizes (hashed when they do not fit)."""
        key = tuple(int(s) for s in sizes)
        h = self._hdr_cache.get(key)
        if h is None:
            txt = ",".join(str(s) for s in key).encode()
            h = b"KVSV1|%d|%s|" % (len(key), txt)
            if len(h) > 64:
                import hashlib

                h = b"KVSV1|%d|total=%d;%s|" % (len(key), sum(key), hashlib.sha1(txt).hexdigest()[:16].encode())
            h = h.ljust(64, b" ")
            self._hdr_cache[key] = h
        return h

    # ---- lookups -----------------------------------------------------------
    def lookup(self, block_ids: List[bytes]) -> List[bool]:
        """Hit mask: the block's last shard is stored."""
        if not block_ids:
            return []
        return self._client.exists_batch(self._lookup_keys(block_ids))

    def lookup_on_prefix(self, block_ids: List[bytes]) -> int:
        """Index of the last block of the leading run present, -1 if none."""
        hits = self.lookup(block_ids)
        for i, h in enumerate(hits):
            if not h:
                return i - 1
        return len(hits) - 1

    def lookup_on_reverse(self, block_ids: List[bytes]) -> int:
        """Index of the rightmost block present, -1 if none."""
        hits = self.lookup(block_ids)
        for i in range(len(hits) - 1, -1, -1):
            if hits[i]:
                return i
        return -1

    def prefetch(self, block_ids: List[bytes]) -> None:
        """No-op: the pool is host memory already (UCM calls it as a GC hint)."""
        return None

    def register_memory(self, base_addr: int, total_size: int) -> None:
        """Registers host memory the transfers will use (optional)."""
        self._client.register_memory(int(base_addr), int(total_size))

    # ---- sizes -------------------------------------------------------------
    def _sizes_for(self, what: str, m: int) -> List[int]:
        """The m tensor sizes of one shard (m addresses per block)."""
        if self._sizes is not None:
            sizes = self._sizes
            if len(sizes) == 1 and m > 1:
                sizes = sizes * m
        elif self._scalar_size is not None:
            sizes = [self._scalar_size] * m
        else:
            raise ValueError(
                f"{what}: tensor sizes unknown: UCM's workers pass 'tensor_size_list' (this store got "
                "none: a scheduler-side store only looks up); by hand set 'tensor_size_list' or call "
                "load/dump with tensors first")
        if len(sizes) != m:
            raise ValueError(
                f"{what}: {m} addresses per block but tensor_size_list has {len(sizes)} sizes {sizes}")
        return sizes

    # ---- tensors -----------------------------------------------------------
    def _check_rows(self, what: str, block_ids, rows) -> None:
        if len(block_ids) != len(rows):
            raise ValueError(f"{what}: {len(block_ids)} block ids but {len(rows)} tensor rows")
        if not rows:
            return
        for r in rows:
            _check_host_contiguous(what, r)
        dtypes = {_dtype_name(t) for t in rows[0]}
        if self._dtype is None and len(dtypes) == 1:
            self._dtype = dtypes.pop()
        elif self._dtype is not None and dtypes != {self._dtype}:
            raise TypeError(
                f"{what}: tensors of dtype {sorted(dtypes)} given, this store holds {self._dtype}"
            )

    def _job(self, kind: str, keys: List[bytes], addrs: Any, sizes: List[int], event: int = 0):
        hdr = self._geometry_header(sizes)
        if kind == "dump":
            _cuda_event_sync(event)
            return self._client.put_parts(keys, addrs, sizes, hdr), []
        st = self._client.get_parts(keys, addrs, sizes, hdr)
        msgs: List[str] = []
        if st.count(OK) == len(st):
            return st, msgs
        for i, s in enumerate(st):
            if s in (ERR_CORRUPT, ERR_TOO_LARGE) and len(msgs) < 8:
                try:
                    stored = self._client.read_header(keys[i], 64).split(b"|")
                    stored_s = stored[2].decode(errors="replace") if stored[0] == b"KVSV1" else "?"
                except Error:
                    stored_s = "unreadable"
                msgs.append(
                    f"load block {bytes(keys[i][:-4]).hex()} shard {self._shard_name(keys[i])}:"
                    f" stored tensor sizes [{stored_s}], destination {sizes} (nothing copied)"
                )
        return st, msgs

    @staticmethod
    def _shard_name(key: Any) -> str:
        s = struct.unpack("<I", bytes(key[-4:]))[0]
        return "last" if s == _LAST_SHARD else str(s)

    def _learn_sizes(self, what: str, rows) -> None:
        sizes = [int(t.nbytes) if hasattr(t, "nbytes") else memoryview(t).nbytes for t in rows[0]]
        if self._sizes is None and self._scalar_size is not None:
            if set(sizes) != {self._scalar_size}:
                raise ValueError(f"{what}: tensors of {sizes} bytes given, tensor_size is {self._scalar_size}")
            self._sizes = sizes
        elif self._sizes is None or (len(self._sizes) == 1 and set(sizes) == set(self._sizes)):
            self._sizes = sizes
        elif sizes != self._sizes:
            raise ValueError(
                f"{what}: tensors of {sizes} bytes given, this store's blocks hold tensors of "
                f"{self._sizes} bytes"
            )

    def _describe_v1(self, keys: List[bytes], sizes: Any):
        def describe(i: int) -> str:
            return (f"load block {bytes(keys[i][:-4]).hex()} shard {self._shard_name(keys[i])}:"
                    f" stored tensor sizes differ from destination {sizes} (nothing copied)")
        return describe

    def _rows_task(self, kind: str, keys: List[bytes], rows: List[List[Any]], event: int = 0,
                   block_ids: Any = None, shard_index: Any = None) -> KVShelfTask:
        devs = []
        for i, r in enumerate(rows):
            ds = {_tensor_device(t) for t in r}
            if len(ds) > 1:
                raise ValueError(f"{kind}: the tensors of row {i} are on different devices {sorted(ds)}")
            devs.append(ds.pop() if ds else -2)
        sizes = self._sizes or []
        if all(d == -2 for d in devs) and self._host_conn and self._stripes > 1 and block_ids is not None:
            return self._striped_task(kind, -2, block_ids, shard_index, rows, None, event)
        if all(d == -2 for d in devs):  # host memory
            return self._submit(kind, len(keys), self._job, kind, keys, rows, sizes, event)
        describe = self._describe_v1(keys, sizes)

        def start_dev(d: int, idx: List[int]):
            return self._start_device(kind, d, [keys[i] for i in idx], [rows[i] for i in idx],
                                      event=event if kind == "dump" else None)

        if len(set(devs)) == 1 and self._stripes > 1 and block_ids is not None:  # striped objects
            return self._striped_task(kind, devs[0], block_ids, shard_index, rows, None, event)
        if len(set(devs)) == 1:  # one device: the connector task alone
            t = self._start_device(kind, devs[0], keys, rows, event=event if kind == "dump" else None)
            return self._submit_direct(kind, len(keys), [(list(range(len(keys))), t)], describe)

        def host_fn(idx: List[int]):
            return self._job(kind, [keys[i] for i in idx], [rows[i] for i in idx], sizes, event)

        return self._submit_mixed(kind, len(keys), devs, start_dev, host_fn, describe)

    def _addr_task(self, what: str, kind: str, block_ids: Sequence[bytes], shard_index: Sequence[int],
                   addrs: Any, event: int = 0) -> KVShelfTask:
        """Addresses: device memory (inside the KV buffers UCM named in
        gpu_kv_buffer_addrs, else cudaPointerGetAttributes on the first
        address) goes through the connector of that device, host memory
        through the client (or the host connector with host_connector)."""
        n = len(block_ids)
        if len(addrs) != n:
            if len(shard_index) != n:
                raise ValueError(f"{n} block ids but {len(shard_index)} shard indexes")
            raise ValueError(f"{what}: {n} block ids but {len(addrs)} address rows")
        if not n:
            self._keys(block_ids, shard_index)
            return self._submit(kind, 0, lambda: ([], []))
        shape = getattr(addrs, "shape", None)
        if shape is not None:
            if len(shape) != 2:
                raise ValueError(f"{what}: addresses must be 2-D (blocks x tensors), got shape {tuple(shape)}")
            m = int(shape[1])
            first = int(addrs[0, 0]) if m else 0
        else:
            m = len(addrs[0])
            first = int(addrs[0][0]) if m else 0
        sizes = self._sizes_for(what, m)
        dev = self._memory_device(first)
        if dev == -2 and not self._host_conn:
            keys = self._keys(block_ids, shard_index)
            return self._submit(kind, n, self._job, kind, keys, addrs, sizes, event)
        if self._stripes > 1:
            return self._striped_task(kind, dev, block_ids, shard_index, addrs, sizes, event)
        keys = self._keys(block_ids, shard_index)
        t = self._start_device(kind, dev, keys, addrs, sizes=sizes, event=event if kind == "dump" else None)
        return self._submit_direct(kind, n, [(range(n), t)], self._describe_v1(keys, sizes))

    def _memory_device(self, addr: int) -> int:
        """CUDA ordinal of the memory at addr (-2: host memory): the worker's
        device for addresses inside UCM's KV buffers, else asked of CUDA."""
        r = self._dev_ranges
        if r is not None:
            i = bisect.bisect_right(r[0], addr) - 1
            if i >= 0 and addr < r[1][i]:
                return r[2]
        return _addr_device(addr)

    def _block_keys(self, block_ids: Sequence[bytes]) -> Any:
        """Keys of whole (striped) blocks: id + _LAST_SHARD, the key lookup
        tests. Cached for the ids of the last call (UCM's layerwise calls give
        the same ids for every layer)."""
        c = self._bkeys
        if c is not None and type(block_ids) is list:
            try:
                if c[0] == block_ids:
                    return c[1]
            except Exception:  # ids that do not compare as bytes: no cache
                pass
        keys = self._lookup_keys(block_ids)
        if type(block_ids) is list:
            self._bkeys = (list(block_ids), keys)
        return keys

    def _stripe_of(self, s: Any) -> int:
        s = int(s)
        if s < 0 or s >= self._stripes:
            raise ValueError(
                f"shard index {s} out of range: this store's blocks have {self._stripes} shards "
                "(block_size // shard_size)")
        return s

    def _striped_task(self, kind: str, dev: int, block_ids: Sequence[bytes], shard_index: Sequence[int],
                      parts: Any, sizes: Any, event: int = 0) -> KVShelfTask:
        """One connector task per shard index in the call (UCM's calls: one)
        moving that stripe of each block's object."""
        n = len(block_ids)
        idx = shard_index.tolist() if hasattr(shard_index, "tolist") else shard_index
        if len(idx) != n:
            raise ValueError(f"{n} block ids but {len(idx)} shard indexes")
        keys = self._block_keys(block_ids)
        ev = event if kind == "dump" else None
        s0 = idx[0]
        if (idx.count(s0) == n) if isinstance(idx, list) else all(s == s0 for s in idx):
            groups = [(range(n), self._stripe_of(s0))]
        else:
            by: Dict[int, List[int]] = {}
            for i, s in enumerate(idx):
                by.setdefault(self._stripe_of(s), []).append(i)
            groups = [(ii, s) for s, ii in by.items()]
        tasks = []
        for ii, s in groups:
            if len(groups) == 1:
                k, p = keys, parts
            else:
                k = keys[ii] if hasattr(keys, "shape") else [keys[i] for i in ii]
                p = parts[ii] if hasattr(parts, "shape") else [parts[i] for i in ii]
            tasks.append((ii, self._start_device(kind, dev, k, p, sizes=sizes, event=ev, stripe=s,
                                                 stripes=self._stripes)))
        return self._submit_direct(kind, n, tasks, self._describe_striped(keys, idx, sizes))

    def _describe_striped(self, keys: Any, idx: Sequence[int], sizes: Any):
        def describe(i: int) -> str:
            return (f"load block {bytes(keys[i][:-4]).hex()} shard {idx[i]}: stored block holds other tensor "
                    f"sizes or shard count than destination {sizes} x {self._stripes} shards (nothing copied)")
        return describe

    def load(self, block_ids: List[bytes], shard_index: List[int], dst_tensor: List[List[Any]]) -> KVShelfTask:
        keys = self._keys(block_ids, shard_index)
        self._check_rows("load", block_ids, dst_tensor)
        if dst_tensor:
            self._learn_sizes("load", dst_tensor)
        return self._rows_task("load", keys, [list(r) for r in dst_tensor], 0, block_ids, shard_index)

    def dump(self, block_ids: List[bytes], shard_index: List[int], src_tensor: List[List[Any]]) -> KVShelfTask:
        keys = self._keys(block_ids, shard_index)
        self._check_rows("dump", block_ids, src_tensor)
        if src_tensor:
            self._learn_sizes("dump", src_tensor)
        return self._rows_task("dump", keys, [list(r) for r in src_tensor], 0, block_ids, shard_index)

    # ---- addresses ---------------------------------------------------------
    def load_data(self, block_ids: List[bytes], shard_index: List[int], dst_addr: Any) -> KVShelfTask:
        """Loads shard ``shard_index[i]`` of block ``block_ids[i]`` into the
        addresses ``dst_addr[i]`` (a 2-D list or numpy uint64 array: one row
        per block, one address per tensor of ``tensor_size_list``)."""
        return self._addr_task("load_data", "load", block_ids, shard_index, dst_addr)

    def dump_data(self, block_ids: List[bytes], shard_index: List[int], src_addr: Any,
                  prerequisite_handle: int = 0) -> KVShelfTask:
        """Stores shard ``shard_index[i]`` of block ``block_ids[i]`` from the
        addresses ``src_addr[i]``; ``prerequisite_handle``: a cudaEvent_t (UCM
        passes ``int(torch.cuda.Event.cuda_event)`` recorded on the compute
        stream) that the copies wait for on the GPU; 0: none."""
        return self._addr_task("dump_data", "dump", block_ids, shard_index, src_addr,
                               int(prerequisite_handle or 0))

    fetch_data = load_data

    # ---- completion ----------------------------------------------------------
    def wait(self, task: KVShelfTask) -> None:
        """Returns when every entry succeeded (a dump of a block already stored
        counts). Otherwise raises, as UCM's pipeline stores do:
        ``BlocksNotFound`` (UCM's ``StoreNotFoundError``) when a load missed
        blocks, ``StoreUnhealthy`` (UCM's ``StoreUnhealthyError``) when the
        pool could not take or serve them (full, unreachable, timed out,
        closed), else ``TransferError``; all are RuntimeErrors naming the
        failed entries."""
        if not isinstance(task, KVShelfTask):
            raise TypeError(f"wait: not a task of this store: {task!r}")
        st = self._collect(task)
        if st.count(OK) == len(st):  # the common case, without a Python loop over the blocks
            return None
        failed = [i for i, s in enumerate(st) if not self._ok(s, task.kind)]
        if not failed:
            return None
        codes = {st[i] for i in failed}
        lines = self._failure_lines(task)
        msg = (f"kvshelf {task.kind} task {task.task_id}: {len(failed)} of {len(st)} blocks failed: "
               + "; ".join(lines[:4]))
        if task.kind == "load" and ERR_NOT_FOUND in codes:
            cls: type = BlocksNotFound
        elif codes <= _UNHEALTHY:
            cls = StoreUnhealthy
        else:
            cls = TransferError
        raise cls(msg, st, failed, lines)

    def check(self, task: KVShelfTask) -> bool:
        """True once the task finished (successfully or not); never blocks."""
        return task.statuses is not None or task.future.done()

    def shutdown(self) -> None:
        self._shutdown_core()


# --------------------------------------------------------------------------
# Registration with UCM's factories (when UCM is installed)
# --------------------------------------------------------------------------


#: (factory module, factory class, name, class of this module). UCM >= 0.2
#: creates stores only through the V1 factory, so there the name
#: ``UcmKVShelfStore`` (what a UCM user writes in place of ``UcmMooncakeStore``)
#: creates the V1 store; the legacy factory (still shipped by UCM 0.8, used by
#: UCM <= 0.1) creates the legacy store under the same name.
_REGISTRATIONS = (
    ("ucm.store.factory", "UcmConnectorFactory", "UcmKVShelfStore", "UcmKVShelfStore"),
    ("ucm.store.factory_v1", "UcmConnectorFactoryV1", "UcmKVShelfStore", "UcmKVShelfStoreV1"),
    ("ucm.store.factory_v1", "UcmConnectorFactoryV1", "UcmKVShelfStoreV1", "UcmKVShelfStoreV1"),
)


def register_with_ucm() -> bool:
    """Registers kvshelf's stores with UCM's factories (see _REGISTRATIONS) so
    that a ``ucm_connectors`` entry can name them in ``ucm_connector_name``.
    Idempotent; False if UCM is not installed. Without importing kvshelf.ucm
    first, UCM's own ``ucm_connector_module_path: kvshelf.ucm`` with
    ``ucm_connector_name: UcmKVShelfStoreV1`` works as well."""
    done = False
    for mod, cls_name, name, target in _REGISTRATIONS:
        try:
            m = __import__(mod, fromlist=[cls_name])
            fac = getattr(m, cls_name)
        except Exception:
            continue
        if name not in getattr(fac, "_registry", {}):
            fac.register_connector(name, __name__, target)
        done = True
    return done


if HAVE_UCM or HAVE_UCM_V1:  # pragma: no cover - depends on the environment
    try:
        register_with_ucm()
    except Exception as _e:  # never make `import kvshelf.ucm` fail for this
        logger.warning("kvshelf.ucm: could not register with UCM's factories: %s", _e)

__all__ = [
    "HAVE_UCM",
    "HAVE_UCM_V1",
    "BlocksNotFound",
    "KVShelfTask",
    "StoreUnhealthy",
    "TransferError",
    "UcmKVShelfStore",
    "UcmKVShelfStoreV1",
    "UcmKVStoreBase",
    "UcmKVStoreBaseV1",
    "UcmMooncakeStore",
    "register_with_ucm",
]
