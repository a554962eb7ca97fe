"""UCM's stores (``kvshelf.ucm``) over a real Mooncake Store (issue 16).

When a store's configuration says ``"store": "mooncake"``, ``UcmKVShelfStoreV1``
and the legacy ``UcmKVShelfStore`` keep their blocks in a Mooncake Store
(``mooncake_master`` with its metadata service, Mooncake's client) through
``kvshelf.mooncake_store.MooncakeBlockStore`` instead of kvshelf's own pool.
``kvshelf.ucm`` picks the client in one place (``_open_client``); everything
else in it is the same code over either client, so the semantics are the same:
one object per (block id, shard) for V1 and per (block id, offset) for the
legacy store, per-entry results, misses as UCM's ``StoreNotFoundError``
(``kvshelf.ucm.BlocksNotFound``), pool failures as ``StoreUnhealthyError``
(``kvshelf.ucm.StoreUnhealthy``), wrong configuration a ``kvshelf.ConfigError``
(a ``ValueError``) at creation.

``MooncakeClient`` has the methods of ``kvshelf.Client`` that ``kvshelf.ucm``
calls (``exists_batch``, ``put_parts``, ``get_parts``, ``put_batch``,
``get_batch``, ``remove_batch``, ``register_memory``, ``close``), with the same
argument conventions, over ``MooncakeBlockStore``:

- an object is a block of ``MooncakeBlockStore`` (its 64-byte header: key hash,
  length, checksum) whose **tag** is a hash of the header ``kvshelf.ucm`` puts
  in front of its objects in kvshelf's pool (V1: the tensor sizes of a shard;
  legacy: a tensor's dtype, shape and size). A stored object whose length,
  tag, key or checksum differs from what a load expects is a **miss**
  (``ERR_NOT_FOUND``; nothing is copied), also when another geometry wrote it
  (over kvshelf's pool that case is a ``TransferError``: issue 16 asks that
  any header mismatch be a miss);
- statuses: 0, ``ERR_NOT_FOUND`` (missing, evicted, mismatched), or the
  unhealthy codes ``kvshelf.ucm`` maps to ``StoreUnhealthy``
  (``ERR_CONN``: master unreachable, ``ERR_TIMEOUT``, ``ERR_NO_SPACE``: pool
  full, ``ERR_BUSY``, ``ERR_CLOSED``); any other failure inside Mooncake
  (a transfer, an internal error) is reported as ``ERR_UNAVAILABLE`` (also
  unhealthy), its message logged;
- **bounded**: a transfer (the job a UCM task runs on the store's
  ``io_threads``) ends within ``task_timeout_ms`` (default 30000) of its
  start -- what is not done by then fails with ``ERR_TIMEOUT`` and its
  buffers are left alone from then on; while a call into Mooncake hangs past
  that, or after the master was found unreachable (for
  ``retry_interval_ms``), new transfers fail at once, so tasks queued behind
  a stuck one do not wait out the timeout each. A lookup waits at most
  ``task_timeout_ms`` (``kvshelf.Timeout``), and raises
  ``kvshelf.ConnectionFailed`` at once while the master is known
  unreachable (UCM's connector counts either as a lookup error and
  recomputes).

Host memory only in this version: CUDA tensors or device addresses given to a
store over Mooncake are refused at the call (``kvshelf.Unsupported``, a
``NotImplementedError``) with what to do instead; ``cc_store()`` is refused
too (there is no native client to hand out).

Configuration (the ``ucm_connector_config`` of the ``ucm_connectors``
entry)::

    {"store": "mooncake",
     "master_server_address": "10.0.0.1:50051",           # mooncake_master --rpc_port
     "metadata_server": "http://10.0.0.1:8080/metadata",   # its --enable_http_metadata_server
     "local_hostname": "10.0.0.5", "protocol": "tcp", "device_name": "",
     "global_segment_size": "3GiB", "local_buffer_size": "1GiB",
     # optional: replica_num, staging_size, batch_size, max_inflight, timeout_ms,
     # retry_interval_ms, setup_timeout_ms, task_timeout_ms (kvshelf.mooncake_store)
    }

plus what UCM's connector adds (``tensor_size_list``, ``shard_size``, ...),
read by ``kvshelf.ucm`` as with kvshelf's pool. A key that is close to one of
the keys above but not one of them is an error, as are kvshelf-pool keys
(``secret``, ``runtime_dir``), ``host_connector``, a ``store`` other than
``mooncake``/``kvshelf``, and a ``staging_size`` too small for one shard.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import threading
import time
from typing import Any, Dict, List, Sequence

from . import Busy, Closed, ConfigError, Error, Unsupported
from . import _kvshelf as _k
from . import mooncake_store as ms

log = logging.getLogger("kvshelf.ucm_mooncake")

__all__ = ["MooncakeClient", "selected_store"]

#: Values of the ``store`` key.
STORES = ("kvshelf", "mooncake")

#: Keys kvshelf.ucm reads itself (not Mooncake's).
UCM_STORE_KEYS = ("tensor_size_list", "tensor_size", "shard_size", "block_size", "device_id",
                  "io_threads", "shutdown_timeout", "connector_workers", "striped",
                  "host_connector", "dtype", "lookup_shards")
#: Keys UCM 0.8's connector adds for its own stores (ignored, as over kvshelf's pool).
UCM_ADDED_KEYS = ("share_buffer_enable", "cache_buffer_capacity_gb", "storage_backends",
                  "unique_id", "tensor_layout", "local_rank_size", "gpu_kv_buffer_addrs",
                  "gpu_kv_buffer_sizes", "cpu_affinity_cores", "posix_gc_enable",
                  "store_pipeline", "kv_block_size", "io_size", "device", "role")
#: Keys of kvshelf's own pool: passed on so that parse_config names them.
_POOL_KEYS = ("secret", "runtime_dir")

#: Statuses kvshelf.ucm turns into StoreUnhealthy; other failures become ERR_UNAVAILABLE.
_KEEP = frozenset((0, _k.ERR_NOT_FOUND, _k.ERR_NO_SPACE, _k.ERR_NOMEM, _k.ERR_UNAVAILABLE,
                   _k.ERR_CONN, _k.ERR_TIMEOUT, _k.ERR_CLOSED, _k.ERR_BUSY))


def selected_store(config: Dict[str, Any] | None) -> str:
    """``"mooncake"`` or ``"kvshelf"`` (the default) from the ``store`` key;
    kvshelf.ConfigError for any other value."""
    v = (config or {}).get("store")
    if v is None or (isinstance(v, str) and not v.strip()):
        return "kvshelf"
    if isinstance(v, str) and v.strip().lower() in STORES:
        return v.strip().lower()
    raise ConfigError(
        "kvshelf.ucm: store=%r: 'mooncake' keeps the blocks in a Mooncake Store (mooncake_master at "
        "master_server_address, its metadata service at metadata_server); 'kvshelf' (or no store "
        "key) in kvshelf's own pool" % (v,))


def _mooncake_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The MooncakeBlockStore configuration in a UCM store's dict."""
    out, near = {}, []
    for k, v in config.items():
        if k in ms.VALID_KEYS or k in _POOL_KEYS:
            out[k] = v
        elif k not in UCM_STORE_KEYS and k not in UCM_ADDED_KEYS:
            m = difflib.get_close_matches(str(k), ms.VALID_KEYS, n=1, cutoff=0.85)
            if m:
                near.append("'%s' (did you mean '%s'?)" % (k, m[0]))
    if near:
        raise ConfigError("kvshelf.ucm: store 'mooncake': unknown key%s %s. Mooncake's keys: %s; "
                          "kvshelf.mooncake_store's: %s" % (
                              "s" if len(near) > 1 else "", ", ".join(near),
                              ", ".join(ms.MOONCAKE_KEYS), ", ".join(ms.STORE_KEYS)))
    return out


def _object_bytes(config: Dict[str, Any]) -> int | None:
    """Payload of a V1 object (one shard) if the configuration says it."""
    tsl = config.get("tensor_size_list")
    try:
        if tsl is not None and not isinstance(tsl, (str, bytes)):
            return int(sum(int(x) for x in (tsl.tolist() if hasattr(tsl, "tolist") else tsl)))
        if config.get("shard_size") is not None:
            return int(config["shard_size"])
    except (TypeError, ValueError):
        return None  # kvshelf.ucm's own checks name the bad value
    return None


def _tag(header: bytes | None) -> int:
    if not header:
        return 0
    return int.from_bytes(hashlib.blake2b(bytes(header), digest_size=8).digest(), "little") or 1


def _nbytes(o: Any) -> int:
    n = getattr(o, "nbytes", None)
    return int(n) if n is not None else memoryview(o).nbytes


def _is_mem(o: Any) -> bool:
    """A memory object (tensor, array, buffer), not an address."""
    if isinstance(o, int) or type(o).__name__.startswith(("int", "uint")):
        return False
    if hasattr(o, "data_ptr") or hasattr(o, "__cuda_array_interface__"):
        return True
    try:
        memoryview(o)
        return True
    except TypeError:
        return False


class MooncakeClient:
    """The client of a ``kvshelf.ucm`` store whose configuration says
    ``"store": "mooncake"`` (see the module's documentation)."""

    #: kvshelf.ucm moves no device memory through this client
    host_only = True

    def __init__(self, config: Dict[str, Any], name: str = "kvshelf.ucm") -> None:
        self._name = name
        if config.get("host_connector") not in (None, False, 0, "", "0", "false", "False"):
            raise ConfigError("%s: host_connector is an option of kvshelf's own pool; with "
                              "\"store\": \"mooncake\" host memory always moves through Mooncake's "
                              "client (drop the key)" % name)
        mcfg = _mooncake_config(config)
        parsed = ms.parse_config(mcfg)  # ConfigError naming the key and what is valid
        need = _object_bytes(config)
        if need is not None:
            room = parsed["staging_size"] // 2 - ms.HEADER
            if ms._slot(need) - ms.HEADER > room:
                raise ConfigError(
                    "%s: store 'mooncake': one shard is %d bytes (tensor_size_list / shard_size) but "
                    "staging_size=%d moves blocks of at most %d bytes: set staging_size to at least "
                    "%d" % (name, need, parsed["staging_size"], room, 2 * ms._slot(need)))
        self._store = ms.MooncakeBlockStore(mcfg)
        self.config = self._store.config
        dev = config.get("device_id")
        if isinstance(dev, int) and not isinstance(dev, bool) and dev >= 0:
            log.warning("%s: device_id=%d (a UCM worker on a GPU) with \"store\": \"mooncake\": this "
                        "version moves host memory only through Mooncake, so every transfer of CUDA "
                        "memory will be refused (kvshelf.Unsupported); use kvshelf's own pool for CUDA "
                        "KV caches", name, dev)
        self._task_timeout = self.config["task_timeout_ms"] / 1000.0
        self._submit_timeout = min(self.config["timeout_ms"], self.config["task_timeout_ms"]) / 1000.0
        self._log_lock = threading.Lock()
        self._last_log = 0.0
        self._quiet = 0

    def __repr__(self) -> str:
        return "<kvshelf.ucm_mooncake.MooncakeClient master %s>" % self.config["master_server_address"]

    # ------------------------------------------------------------ refusals
    def refuse_device(self, device: int) -> None:
        """Raises: CUDA memory does not move through Mooncake in this version."""
        raise Unsupported(
            "%s with \"store\": \"mooncake\" moves host memory only in this version: %s cannot go "
            "through Mooncake yet. Use kvshelf's own pool for CUDA KV caches (drop \"store\": "
            "\"mooncake\"; kvshelf copies between the GPU and its pool directly), or give host "
            "tensors/addresses (Mooncake for CUDA memory is a later step of kvshelf's issue 16)"
            % (self._name, "host memory through a connector" if device < 0
               else "memory of CUDA device %d" % device))

    @property
    def handle(self) -> int:
        raise NotImplementedError(
            "%s with \"store\": \"mooncake\": there is no native kvshelf client (kvs_client*) to hand "
            "out: the blocks are in a Mooncake Store, reached through Mooncake's Python client"
            % self._name)

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _keys(keys: Any) -> List[Any]:
        if hasattr(keys, "ndim") and getattr(keys, "ndim", 0) == 2:  # rows of key bytes
            return [r.tobytes() for r in keys]
        return [bytes(k) if isinstance(k, (bytearray, memoryview)) else k for k in keys]

    def _warn(self, msg: str) -> None:
        now = time.monotonic()
        with self._log_lock:
            if now - self._last_log < 5.0:
                self._quiet += 1
                return
            quiet, self._quiet, self._last_log = self._quiet, 0, now
        log.warning("%s%s", msg, " (%d similar messages not shown)" % quiet if quiet else "")

    def _run(self, op: str, keys: List[Any], blocks: List[Any], tags: Any) -> List[int]:
        n = len(keys)
        if not n:
            return []
        fn = self._store.dump if op == "dump" else self._store.load
        try:
            task = fn(keys, blocks, tags=tags, timeout=self._submit_timeout)
        except Busy as e:
            self._warn("%s: %s" % (self._name, e))
            return [_k.ERR_BUSY] * n
        except Closed:
            return [_k.ERR_CLOSED] * n
        res = self._store.finish(task)
        if res.count(0) == n:
            return res
        out = [r if r in _KEEP else _k.ERR_UNAVAILABLE for r in res]
        if task.error:
            self._warn("%s: %s" % (self._name, task.error))
        bad = task.mismatches()
        if bad:
            self._warn("%s: %d of %d blocks of a load held an object that does not match (other "
                       "sizes, dtype or shape, or not written by kvshelf): misses, nothing copied"
                       % (self._name, len(bad), n))
        return out

    @staticmethod
    def _blocks(keys: List[Any], addrs: Any, sizes: Any, what: str) -> List[Any]:
        """One block (a list of parts) per key, from kvshelf.Client.put_parts'
        conventions: an n x m array/list of addresses with m sizes, n memory
        objects, or n rows of memory objects."""
        n = len(keys)
        if sizes is not None and not isinstance(sizes, int):
            sizes = [int(s) for s in (sizes.tolist() if hasattr(sizes, "tolist") else sizes)]
        if hasattr(addrs, "ndim") and hasattr(addrs, "tolist"):  # a numpy array of addresses
            a = addrs.tolist()
        else:
            a = list(addrs)
        if len(a) != n:
            raise ValueError("%s: %d keys but %d address rows" % (what, n, len(a)))
        if not n:
            return []
        first = a[0]
        if _is_mem(first):  # n memory objects
            if sizes:
                want = sizes if isinstance(sizes, int) else sizes[0]
                for i, o in enumerate(a):
                    if _nbytes(o) != want:
                        raise ValueError("%s: buffer %d has %d bytes, sizes say %d"
                                         % (what, i, _nbytes(o), want))
            return a
        if isinstance(first, (list, tuple)) and first and _is_mem(first[0]):  # rows of objects
            out = []
            for i, row in enumerate(a):
                row = list(row)
                if sizes and not isinstance(sizes, int):
                    if len(row) != len(sizes) or any(_nbytes(o) != s for o, s in zip(row, sizes)):
                        raise ValueError("%s: row %d holds buffers of %s bytes, sizes say %s"
                                         % (what, i, [_nbytes(o) for o in row], sizes))
                out.append(row)
            return out
        # addresses
        if sizes is None or (not isinstance(sizes, int) and not sizes):
            raise ValueError("%s: sizes are needed with addresses" % what)
        rows = a if isinstance(first, (list, tuple)) else [[x] for x in a]
        cols = [sizes] if isinstance(sizes, int) else sizes
        out = []
        for i, row in enumerate(rows):
            if len(row) != len(cols):
                raise ValueError("%s: row %d has %d addresses, %d sizes given"
                                 % (what, i, len(row), len(cols)))
            parts = []
            for x, s in zip(row, cols):
                x = int(x)
                if x == 0:
                    raise ValueError("%s: address 0 at row %d" % (what, i))
                parts.append((x, int(s)))
            out.append(parts)
        return out

    @staticmethod
    def _tags(header: Any, n: int) -> Any:
        if header is None:
            return None
        if isinstance(header, (bytes, bytearray, memoryview)):
            return _tag(bytes(header))
        hs = list(header)
        if len(hs) != n:
            raise ValueError("%d keys but %d headers" % (n, len(hs)))
        return [_tag(h) for h in hs]

    # ------------------------------------------------------- kvshelf.Client
    def exists_batch(self, keys: Any) -> List[bool]:
        return self._store.lookup(self._keys(keys))

    def put_parts(self, keys: Any, addrs: Any, sizes: Any = None, header: Any = None) -> List[int]:
        keys = self._keys(keys)
        return self._run("dump", keys, self._blocks(keys, addrs, sizes, "put_parts"),
                         self._tags(header, len(keys)))

    def get_parts(self, keys: Any, addrs: Any, sizes: Any = None, header: Any = None) -> List[int]:
        keys = self._keys(keys)
        return self._run("load", keys, self._blocks(keys, addrs, sizes, "get_parts"),
                         self._tags(header, len(keys)))

    def put_batch(self, keys: Any, values: Sequence[Any]) -> List[int]:
        keys = self._keys(keys)
        return self._run("dump", keys, [_pair(v) for v in values], None)

    def get_batch(self, keys: Any, bufs: Sequence[Any]) -> List[int]:
        """Like kvshelf.Client.get_batch: the size loaded, or a negative code
        (a stored object of another size is a miss here)."""
        keys = self._keys(keys)
        bufs = [_pair(b) for b in bufs]
        st = self._run("load", keys, bufs, None)
        return [(b[1] if isinstance(b, tuple) else _nbytes(b)) if s == 0 else s
                for s, b in zip(st, bufs)]

    def remove_batch(self, keys: Any) -> List[int]:
        return self._store.remove(self._keys(keys), force=True)

    def read_header(self, key: Any, n: int) -> bytes:
        raise Unsupported("%s: objects in Mooncake carry kvshelf.mooncake_store's header, not "
                          "kvshelf.ucm's" % self._name)

    def register_memory(self, buf: Any, size: int | None = None) -> int:
        """Nothing to register: bytes move through the store's own registered
        staging memory. Returns the address, as kvshelf.Client does."""
        if isinstance(buf, int):
            return buf
        return ms._buffer(buf, False, "register_memory")[0]

    def stats(self) -> Dict[str, Any]:
        return self._store.stats()

    @property
    def block_store(self) -> ms.MooncakeBlockStore:
        return self._store

    def close(self, timeout: float = 30.0) -> None:
        try:
            self._store.close(timeout)
        except Error as e:  # closing must not raise into UCM's shutdown
            log.warning("%s: closing the Mooncake store: %s", self._name, e)


def _pair(v: Any) -> Any:
    """(address, size) pairs stay pairs; anything else is a memory object."""
    if isinstance(v, tuple) and len(v) == 2:
        return (int(v[0]), int(v[1]))
    return v
