"""kvshelf blocks in a real Mooncake Store (issue 16, first increment).

``MooncakeBlockStore`` keeps the connector's blocks in a Mooncake Store
(``mooncake_master`` with its HTTP metadata service, and Mooncake's client,
the Python package ``mooncake.store`` from ``mooncake-transfer-engine``),
with kvshelf's semantics on top:

- one Mooncake object per block, written as a 64-byte kvshelf header
  followed by the block's bytes; the header is checked on every load (magic,
  a hash of the key, the length, a checksum of the payload), and anything
  that does not match -- an object written by another program, another
  geometry, torn or corrupted bytes -- is a miss, never wrong bytes;
- staging memory registered with Mooncake once (``register_buffer``): dumps
  copy blocks into it and move them with ``batch_put_from``, loads move them
  with ``batch_get_into`` and copy them out only after the header checked;
- asynchronous tasks with per-block results (0 stored/loaded,
  ``ERR_NOT_FOUND`` miss, other kvshelf error codes), two worker threads in a
  pipeline (one batch's copies overlap the next batch's transfer), a bounded
  queue of tasks (backpressure) and bounded staging;
- errors are kvshelf exceptions that say what failed (``ConfigError`` for a
  bad key or value, ``ConnectionFailed`` when the master cannot be reached,
  ...); while the master is unreachable, calls fail at once instead of each
  waiting out Mooncake's RPC timeout.

Host memory (numpy arrays, bytearray/memoryview, CPU torch tensors,
``(address, size)`` pairs, or a *list* of those: the parts of one block,
gathered on dump and scattered on load) and CUDA memory (CUDA torch tensors,
or a list of them, one block each; kvshelf's own adapters pass device
``(address, size)`` parts with ``cuda=True``). UCM's stores use it through
``kvshelf.ucm_mooncake``, the vLLM connector through ``kvshelf.vllm_mooncake``.

CUDA blocks move through kvshelf's C/CUDA copy path
(``kvshelf._kvshelf.CudaCopier``: ``kvs_cuda_copy_parts``, no torch copies;
copy engines for parts of 32 KiB and more on average, else a gather/scatter
kernel, as src/cuda/parts.cu says) between the device and a second staging area in pinned,
device-mapped host memory (``staging_size`` bytes, allocated and registered
with Mooncake on the first CUDA task or by ``enable_cuda(device)``):

- dump: the copies wait, on the GPU, for the caller's CUDA event (``event=``,
  snapshotted when ``dump`` is called, so the caller may record it again
  at once); device -> staging; then the checksum on the host over the staged
  bytes and the header; then ``batch_put_from`` as for host blocks;
- load: ``batch_get_into`` into staging, the header checked there (a
  mismatch is a miss and nothing is copied to the device), then staging ->
  device;
- every CUDA copy carries kvshelf's view check (``kvs_cuda.h``) through the
  header's reserved word (offset 56: written by the GPU on dump before the
  CPU writes the header, by the CPU before a load for the GPU to read back);
  a block whose check fails fails with ``ERR_CUDA``, as does every block of a
  copy that raised ``kvshelf.CudaError``. Objects in the pool are the same
  for host and CUDA blocks: one written from the GPU loads into host memory
  and the other way round.

``register_memory(buf)``: host memory of the caller registered with Mooncake;
dumps of blocks that lie there are zero-copy (the headers staged, the payload
read in place with ``batch_put_from_multi_buffers``); loads are staged always.

A block may carry a 64-bit ``tag`` (``dump(..., tags=)``, ``load(...,
tags=)``): a hash of what the bytes mean to the caller (UCM's stores: the
tensor sizes of a shard, or a tensor's dtype and shape). A load whose tag
differs from the stored one is a miss, like any other header mismatch.

Bounded calls: ``finish(task)`` waits at most ``task_timeout_ms`` from the
task's submission, then fails what is left with ``ERR_TIMEOUT`` and
guarantees that the task never touches the caller's buffers again; while a
call into Mooncake has been running longer than ``task_timeout_ms``, new
tasks fail at once with ``ERR_TIMEOUT`` and lookups raise ``kvshelf.Timeout``
instead of queueing behind it. A lookup waits for Mooncake's answer at most
``task_timeout_ms`` too (then ``kvshelf.Timeout``).

Configuration: the same dict as the rest of kvshelf (Mooncake's keys) plus
``"store": "mooncake"``::

    {"store": "mooncake",
     "local_hostname": "10.0.0.5",              # default: the address that routes to the master
     "metadata_server": "http://10.0.0.1:8080/metadata",   # or "P2PHANDSHAKE", or etcd host:port
     "master_server_address": "10.0.0.1:50051",
     "protocol": "tcp",                         # or "rdma" (device_name: "mlx5_0,mlx5_1")
     "device_name": "",
     "global_segment_size": "3GiB",             # memory this client gives the pool (0: none)
     "local_buffer_size": "1GiB",               # Mooncake's own transfer buffer
     # this store's keys (defaults shown):
     "replica_num": 1, "staging_size": "256MiB", "batch_size": 64,
     "max_inflight": 64, "timeout_ms": 5000, "retry_interval_ms": 1000,
     "setup_timeout_ms": 30000, "task_timeout_ms": 30000}

``timeout_ms`` bounds the checks of the master and metadata addresses made
before Mooncake's client starts and the wait for room in the task queue;
``setup_timeout_ms`` bounds Mooncake's setup (left alone, it retries an
unreachable master for about 90 s); ``retry_interval_ms`` is how long calls
fail at once after the master was found unreachable.

Object layout (little endian)::

    0   8  magic b"KVSHMC01"
    8   2  version (1)
    10  2  checksum algorithm (1 = XXH3-64, 2 = BLAKE2b-64)
    12  4  header size (64)
    16  8  payload length
    24 16  BLAKE2b-128 of the Mooncake key (UTF-8)
    40  8  checksum of the payload
    48  8  tag (0: none; compared on load)
    56  8  zero
    64  .. payload
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import ctypes
import difflib
import hashlib
import json
import logging
import mmap
import os
import queue
import socket
import struct
import threading
import time
from typing import Any, Iterable, Sequence

from . import (
    Busy,
    Closed,
    ConfigError,
    ConnectionFailed,
    CudaError,
    Error,
    InternalError,
    InvalidArgument,
    IOFailure,
    NoMemory,
    NoSpace,
    NotFound,
    Timeout,
    TooLarge,
    Unavailable,
    Unsupported,
    parse_size,
)
from . import _kvshelf as _k

log = logging.getLogger("kvshelf.mooncake_store")

__all__ = [
    "MOONCAKE_KEYS",
    "STORE_KEYS",
    "BlockTask",
    "MooncakeBlockStore",
    "is_mooncake",
    "mooncake_key",
    "parse_config",
]

# ---------------------------------------------------------------- config

#: Mooncake's own keys (the seed's configuration), passed to Mooncake's setup.
MOONCAKE_KEYS = (
    "local_hostname",
    "metadata_server",
    "master_server_address",
    "protocol",
    "device_name",
    "global_segment_size",
    "local_buffer_size",
)
#: This store's keys, with their defaults.
STORE_DEFAULTS: dict[str, Any] = {
    "store": "mooncake",
    "replica_num": 1,
    "staging_size": 256 << 20,
    "batch_size": 64,
    "max_inflight": 64,
    "timeout_ms": 5000,
    "retry_interval_ms": 1000,
    "setup_timeout_ms": 30000,
    "task_timeout_ms": 30000,
}
STORE_KEYS = tuple(STORE_DEFAULTS)
VALID_KEYS = MOONCAKE_KEYS + STORE_KEYS
#: kvshelf keys that mean nothing to a Mooncake Store: named in the error.
_KVSHELF_ONLY = {
    "secret": "Mooncake has no shared secret; protect the master's port instead",
    "runtime_dir": "it is the directory of kvshelf's embedded pool",
}
_SIZE_KEYS = ("global_segment_size", "local_buffer_size", "staging_size")
_INT_KEYS = {"replica_num": (1, 64), "batch_size": (1, 4096), "max_inflight": (1, 1 << 20),
             "timeout_ms": (1, 86_400_000), "retry_interval_ms": (0, 3_600_000),
             "setup_timeout_ms": (1, 86_400_000), "task_timeout_ms": (1, 86_400_000)}


def is_mooncake(config: dict[str, Any] | None) -> bool:
    """True if ``config`` selects the Mooncake store (``"store": "mooncake"``)."""
    return bool(config) and str(config.get("store", "")).strip().lower() == "mooncake"


def _read_config(config: dict[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if config is None:
        path = os.environ.get("KVSHELF_CONFIG") or os.environ.get("MOONCAKE_CONFIG_PATH")
        if not path:
            return {}
        config = path
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError("kvshelf.mooncake_store: cannot read the configuration file %s: %s"
                              % (config, e)) from None
        if not isinstance(data, dict):
            raise ConfigError("kvshelf.mooncake_store: %s does not hold a JSON object" % config)
        return data
    if not isinstance(config, dict):
        raise ConfigError("kvshelf.mooncake_store: the configuration must be a dict or the path "
                          "of a JSON file, not %s" % type(config).__name__)
    return dict(config)


def _route_to(host: str) -> str | None:
    """The local address the kernel would use to reach ``host``."""
    try:
        infos = socket.getaddrinfo(host, 9, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(infos[0][4])
            return s.getsockname()[0]
    except OSError:
        return None


def _split_hostport(addr: str, what: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        p = int(port)
        if not host or not 0 < p < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError("kvshelf.mooncake_store: %s=%r must be host:port" % (what, addr)) from None
    return host, p


def _probe(addr: str, what: str, timeout: float, greet_s: float = 0.0) -> None:
    """Fails at once (kvshelf.ConnectionFailed) when nothing listens at addr,
    instead of letting Mooncake's client retry it for ~90 s. With greet_s:
    a server that sends bytes before any request (kvshelf's master greets
    every connection with a CHALLENGE) is not a mooncake_master."""
    host, port = _split_hostport(addr, what)
    try:
        conn = socket.create_connection((host, port), timeout)
    except socket.timeout:
        raise ConnectionFailed("kvshelf.mooncake_store: %s %s did not answer within %.1f s"
                               % (what, addr, timeout)) from None
    except OSError as e:
        raise ConnectionFailed("kvshelf.mooncake_store: cannot reach %s %s: %s (is it running, "
                               "and listening on that address?)"
                               % (what, addr, e.strerror or e)) from None
    with conn:
        if greet_s <= 0:
            return
        conn.settimeout(greet_s)
        try:
            data = conn.recv(64)
        except (socket.timeout, BlockingIOError):
            return
        except OSError:
            return
        if data:
            raise ConnectionFailed(
                "kvshelf.mooncake_store: %s %s sent %d bytes before any request: it is not a "
                "mooncake_master (kvshelf's own master greets first: to use it, drop "
                "\"store\": \"mooncake\")" % (what, addr, len(data)))


def parse_config(config: dict[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    """Checks a configuration for the Mooncake store and returns it with the
    defaults filled in (sizes in bytes). Raises ``kvshelf.ConfigError`` (a
    ``ValueError``) naming every unknown key (with the nearest valid one) and
    listing the valid keys, or naming a bad value."""
    raw = _read_config(config)
    raw = {k: v for k, v in raw.items() if v is not None}
    unknown = [k for k in raw if k not in VALID_KEYS]
    if unknown:
        parts = []
        for k in unknown:
            if k in _KVSHELF_ONLY:
                parts.append("'%s' (a key of kvshelf's own pool, not used with "
                             "store 'mooncake': %s)" % (k, _KVSHELF_ONLY[k]))
                continue
            near = difflib.get_close_matches(str(k), VALID_KEYS, n=1, cutoff=0.75)
            parts.append("'%s'%s" % (k, " (did you mean '%s'?)" % near[0] if near else ""))
        raise ConfigError(
            "kvshelf.mooncake_store: unknown key%s %s. Valid keys -- Mooncake's: %s; "
            "this store's: %s" % ("s" if len(unknown) > 1 else "", ", ".join(parts),
                                  ", ".join(MOONCAKE_KEYS), ", ".join(STORE_KEYS)))
    out: dict[str, Any] = dict(STORE_DEFAULTS)
    out.update({"local_hostname": "", "metadata_server": "", "master_server_address": "",
                "protocol": "tcp", "device_name": "",
                "global_segment_size": int(_k.DEFAULTS["global_segment_size"]),
                "local_buffer_size": int(_k.DEFAULTS["local_buffer_size"])})
    for k, v in raw.items():
        if k in _SIZE_KEYS:
            try:
                if isinstance(v, bool):
                    raise ValueError("a boolean")
                n = int(v) if isinstance(v, int) else int(parse_size(str(v)))
                if n < 0:
                    raise ValueError("negative")
            except (ValueError, TypeError, Error) as e:
                raise ConfigError("kvshelf.mooncake_store: %s=%r is not a size in bytes "
                                  "(an integer or a string such as '256MiB'): %s" % (k, v, e)) from None
            out[k] = n
        elif k in _INT_KEYS:
            lo, hi = _INT_KEYS[k]
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ConfigError("kvshelf.mooncake_store: %s=%r must be an integer" % (k, v))
            try:
                n = int(v)
            except ValueError:
                raise ConfigError("kvshelf.mooncake_store: %s=%r must be an integer" % (k, v)) from None
            if not lo <= n <= hi:
                raise ConfigError("kvshelf.mooncake_store: %s=%d is out of range [%d, %d]"
                                  % (k, n, lo, hi))
            out[k] = n
        else:
            if not isinstance(v, str):
                raise ConfigError("kvshelf.mooncake_store: %s=%r must be a string" % (k, v))
            out[k] = v.strip()
    if out["store"].lower() != "mooncake":
        raise ConfigError("kvshelf.mooncake_store: store=%r: this store is Mooncake's; set "
                          "\"store\": \"mooncake\" (or leave the key out), or use kvshelf's own "
                          "pool through kvshelf.Client / kvshelf.Connector" % out["store"])
    out["store"] = "mooncake"
    if out["protocol"] not in ("tcp", "rdma"):
        raise ConfigError("kvshelf.mooncake_store: protocol=%r: Mooncake's store takes 'tcp' or "
                          "'rdma'" % out["protocol"])
    if not out["master_server_address"]:
        raise ConfigError("kvshelf.mooncake_store: store 'mooncake' needs master_server_address: "
                          "the host:port of a mooncake_master (its --rpc_port, 50051 by default); "
                          "an empty address means kvshelf's embedded pool, which is not Mooncake")
    if not out["metadata_server"]:
        raise ConfigError("kvshelf.mooncake_store: store 'mooncake' needs metadata_server: "
                          "http://HOST:PORT/metadata of mooncake_master "
                          "--enable_http_metadata_server, an etcd host:port, or P2PHANDSHAKE")
    _split_hostport(out["master_server_address"], "master_server_address")
    if not out["local_hostname"]:
        host = out["master_server_address"].rsplit(":", 1)[0].strip("[]")
        out["local_hostname"] = _route_to(host) or socket.gethostname()
    if out["staging_size"] < 2 * _ALIGN:
        raise ConfigError("kvshelf.mooncake_store: staging_size=%d is too small (at least %d)"
                          % (out["staging_size"], 2 * _ALIGN))
    return out


# ---------------------------------------------------------------- header

MAGIC = b"KVSHMC01"
HEADER = 64
_ALIGN = 4096
_HDR = struct.Struct("<8sHHIQ16sQQ8x")
assert _HDR.size == HEADER
#: the header's reserved word: CUDA copies carry kvshelf's view-check stamp
#: there while a block is in staging (never part of a stored header)
_STAMP_OFF = 56
ALGO_XXH3 = 1
ALGO_BLAKE2B = 2


def _load_xxh3():
    """XXH3-64 from libxxhash (libkvshelf links it, so it is in the process
    once the extension is loaded); None if absent. ctypes releases the GIL
    during the call."""
    for name in ("libxxhash.so.0", "libxxhash.so"):
        try:
            lib = ctypes.CDLL(name)
            f = lib.XXH3_64bits
        except (OSError, AttributeError):
            continue
        f.restype = ctypes.c_uint64
        f.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return f
    return None


_xxh3 = _load_xxh3()
_memmove = ctypes.memmove


def _load_xxh3_stream():
    """XXH3-64's streaming functions (the same hash as XXH3_64bits over the
    concatenation of the parts), or None."""
    for name in ("libxxhash.so.0", "libxxhash.so"):
        try:
            lib = ctypes.CDLL(name)
            fns = (lib.XXH3_createState, lib.XXH3_freeState, lib.XXH3_64bits_reset,
                   lib.XXH3_64bits_update, lib.XXH3_64bits_digest)
        except (OSError, AttributeError):
            continue
        fns[0].restype = ctypes.c_void_p
        fns[0].argtypes = []
        fns[1].argtypes = [ctypes.c_void_p]
        fns[2].argtypes = [ctypes.c_void_p]
        fns[3].argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        fns[4].restype = ctypes.c_uint64
        fns[4].argtypes = [ctypes.c_void_p]
        return fns
    return None


_xxh3_stream = _load_xxh3_stream()


def _checksum(algo: int, addr: int, n: int) -> int | None:
    if algo == ALGO_XXH3:
        return int(_xxh3(addr, n)) if _xxh3 is not None else None
    if algo == ALGO_BLAKE2B:
        view = (ctypes.c_char * n).from_address(addr) if n else b""
        return int.from_bytes(hashlib.blake2b(memoryview(view), digest_size=8).digest(), "little")
    return None


def _checksum_parts(algo: int, parts: list[tuple[int, int]], n: int) -> int | None:
    """The checksum of the concatenation of ``parts`` (n bytes in all),
    read where they lie (the same value as ``_checksum`` of a copy)."""
    if len(parts) == 1:
        return _checksum(algo, parts[0][0], parts[0][1])
    if not parts:
        return _checksum(algo, 0, 0) if algo == ALGO_BLAKE2B else (
            int(_xxh3(None, 0)) if _xxh3 is not None else None)
    if algo == ALGO_XXH3:
        if _xxh3_stream is None:
            return None
        create, free, reset, update, digest = _xxh3_stream
        st = create()
        if not st:
            return None
        try:
            reset(st)
            for a, m in parts:
                update(st, a, m)
            return int(digest(st))
        finally:
            free(st)
    if algo == ALGO_BLAKE2B:
        h = hashlib.blake2b(digest_size=8)
        for a, m in parts:
            h.update(memoryview((ctypes.c_char * m).from_address(a)))
        return int.from_bytes(h.digest(), "little")
    return None


# Checksums of many staged blocks at once (a CUDA batch's dump, a CUDA
# batch's load check) run on a few threads: XXH3 over pinned staging reads
# ~8 GB/s on one core, which limited a 32k-token Mooncake load on the H200
# once the staging <-> GPU copy ran on SMs (bench/RESULTS.md, issue 16);
# ctypes drops the GIL for the call. KVSHELF_MC_CHECKSUM_THREADS sets how
# many (default: half the CPUs, at most 8; 1: on the calling thread).
_SUM_MIN_BYTES = 4 << 20  # below this, one thread
_sum_pool_lock = threading.Lock()
_sum_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _sum_threads(strict: bool = False) -> int:
    """The checksum threads; a bad KVSHELF_MC_CHECKSUM_THREADS raises
    ConfigError when strict (the store's start), else counts as 1."""
    v = os.environ.get("KVSHELF_MC_CHECKSUM_THREADS", "")
    if v.strip():
        try:
            return max(1, min(64, int(v)))
        except ValueError:
            if not strict:
                return 1
            raise ConfigError("KVSHELF_MC_CHECKSUM_THREADS=%r: expected a whole number of "
                              "threads (1: checksums on the calling thread)" % v) from None
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _checksums(algo: int, regions: list[tuple[int, int]]) -> list[int | None]:
    """``_checksum`` of every (address, length) of ``regions``, in order;
    spread over the checksum threads when the bytes are many."""
    nt = min(_sum_threads(), len(regions))
    if nt <= 1 or algo != ALGO_XXH3 or sum(n for _, n in regions) < _SUM_MIN_BYTES:
        return [_checksum(algo, a, n) for a, n in regions]
    global _sum_pool
    with _sum_pool_lock:
        if _sum_pool is None or _sum_pool._max_workers < nt:
            _sum_pool = concurrent.futures.ThreadPoolExecutor(nt, "kvshelf-mc-sum")
        pool = _sum_pool
    step = (len(regions) + nt - 1) // nt
    chunks = [regions[k:k + step] for k in range(0, len(regions), step)]
    out: list[int | None] = []
    for part in pool.map(lambda c: [_checksum(algo, a, n) for a, n in c], chunks):
        out.extend(part)
    return out


def _key_hash(mkey: str) -> bytes:
    return hashlib.blake2b(mkey.encode("utf-8"), digest_size=16).digest()


def mooncake_key(key: bytes | str) -> str:
    """The Mooncake key of a kvshelf key: a ``str`` as it is; ``bytes`` of
    printable ASCII as that text; other ``bytes`` (raw block hashes) as
    ``"#"`` + hex. Keys that map to the same string are the same object."""
    if isinstance(key, str):
        if not key:
            raise InvalidArgument("kvshelf.mooncake_store: empty key")
        return key
    if isinstance(key, (bytes, bytearray, memoryview)):
        b = bytes(key)
        if not b:
            raise InvalidArgument("kvshelf.mooncake_store: empty key")
        if all(0x21 <= c < 0x7F for c in b) and b[:1] != b"#":
            return b.decode("ascii")
        return "#" + b.hex()
    raise InvalidArgument("kvshelf.mooncake_store: a key must be bytes or str, not %s"
                          % type(key).__name__)


# ------------------------------------------------------- Mooncake errors

MC_ERRORS = {
    -1: "INTERNAL_ERROR", -10: "BUFFER_OVERFLOW", -100: "SHARD_INDEX_OUT_OF_RANGE",
    -101: "SEGMENT_NOT_FOUND", -102: "SEGMENT_ALREADY_EXISTS", -103: "CLIENT_NOT_FOUND",
    -200: "NO_AVAILABLE_HANDLE", -300: "INVALID_VERSION", -400: "INVALID_KEY",
    -500: "WRITE_FAIL", -600: "INVALID_PARAMS", -601: "ILLEGAL_CLIENT", -700: "INVALID_WRITE",
    -701: "INVALID_READ", -702: "INVALID_REPLICA", -703: "REPLICA_IS_NOT_READY",
    -704: "OBJECT_NOT_FOUND", -705: "OBJECT_ALREADY_EXISTS", -706: "OBJECT_HAS_LEASE",
    -707: "LEASE_EXPIRED", -800: "TRANSFER_FAIL", -900: "RPC_FAIL", -901: "RPC_TIMEOUT",
    -1010: "UNAVAILABLE_IN_CURRENT_STATUS", -1011: "UNAVAILABLE_IN_CURRENT_MODE",
    -1700: "TENANT_QUOTA_EXCEEDED",
}
_MC_RPC = (-900, -901)
# Codes Mooncake returns before any transfer touched the buffer, or after it
# completed: the staging memory of such a get is safe to reuse. After any
# other failure a transfer may still be writing into it, so it is retired.
_SAFE_GET = {-200, -600, -703, -704, -707, -900, -901}


def mc_name(code: int) -> str:
    return "%s (%d)" % (MC_ERRORS.get(code, "error"), code)


def _kv_code(mc: int, op: str) -> int:
    """A kvshelf status code for a negative Mooncake status."""
    if mc in (-704, -707) or (op == "get" and mc in (-600, -703)):
        return _k.ERR_NOT_FOUND
    if mc in (-200, -1700):
        return _k.ERR_NO_SPACE
    if mc == -900:
        return _k.ERR_CONN
    if mc == -901:
        return _k.ERR_TIMEOUT
    if mc in (-800, -500, -701, -700):
        return _k.ERR_IO
    if mc in (-703, -706):
        return _k.ERR_BUSY
    if mc in (-600, -400, -10):
        return _k.ERR_INVALID
    if mc in (-1010, -1011):
        return _k.ERR_UNAVAILABLE
    return _k.ERR_INTERNAL


_EXC = {
    _k.ERR_NOT_FOUND: NotFound, _k.ERR_NO_SPACE: NoSpace, _k.ERR_CONN: ConnectionFailed,
    _k.ERR_TIMEOUT: Timeout, _k.ERR_IO: IOFailure, _k.ERR_BUSY: Busy,
    _k.ERR_INVALID: InvalidArgument, _k.ERR_UNAVAILABLE: Unavailable, _k.ERR_CLOSED: Closed,
    _k.ERR_NOMEM: NoMemory, _k.ERR_TOO_LARGE: TooLarge, _k.ERR_INTERNAL: InternalError,
    _k.ERR_CUDA: CudaError,
}


def _exc(code: int, msg: str) -> Error:
    return _EXC.get(code, Error)(msg)


# ---------------------------------------------------------------- memory

def _buffer(obj: Any, writable: bool, what: str) -> tuple[int, int, Any]:
    """(address, size, keep-alive) of a host buffer."""
    if isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(x, int) for x in obj):
        addr, size = obj
        if addr <= 0 or size < 0:
            raise InvalidArgument("%s: bad (address, size) %r" % (what, obj))
        return addr, size, None
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_cuda"):  # torch
        if getattr(obj, "is_cuda", False) or str(getattr(obj, "device", "cpu")) != "cpu":
            raise Unsupported("%s: a tensor on %s: the Mooncake store moves host memory and CUDA "
                              "tensors (a task's blocks all on the host or all on one CUDA device)"
                              % (what, obj.device))
        if not obj.is_contiguous():
            raise InvalidArgument("%s: the tensor is not contiguous" % what)
        return int(obj.data_ptr()), int(obj.numel() * obj.element_size()), obj
    if hasattr(obj, "__cuda_array_interface__"):
        raise Unsupported("%s: device memory given as __cuda_array_interface__: pass CUDA torch "
                          "tensors, or device (address, size) parts with cuda=True" % what)
    try:
        mv = memoryview(obj)
    except TypeError:
        raise InvalidArgument("%s: %s is not a buffer (numpy array, bytearray, memoryview, CPU "
                              "tensor or (address, size))" % (what, type(obj).__name__)) from None
    if not mv.c_contiguous:
        raise InvalidArgument("%s: the buffer is not contiguous" % what)
    if writable and mv.readonly:
        raise InvalidArgument("%s: the buffer is read-only" % what)
    n = mv.nbytes
    if n == 0:
        return 0, 0, mv
    mv = mv.cast("B")
    if mv.readonly:
        import numpy as np  # read-only buffers (bytes): numpy gives their address
        a = np.frombuffer(mv, dtype=np.uint8)
        return int(a.ctypes.data), n, (mv, a)
    c = (ctypes.c_char * n).from_buffer(mv)
    return ctypes.addressof(c), n, (mv, c)


def _block(obj: Any, writable: bool, what: str) -> tuple[list[tuple[int, int]], int, Any]:
    """(parts [(address, size)], total size, keep-alive) of one block: a host
    buffer, or a list of them (the block is their concatenation)."""
    if isinstance(obj, list):
        parts, keep, n = [], [], 0
        for j, o in enumerate(obj):
            a, m, k = _buffer(o, writable, "%s part %d" % (what, j))
            if m:
                parts.append((a, m))
                n += m
            keep.append(k)
        return parts, n, keep
    a, m, k = _buffer(obj, writable, what)
    return ([(a, m)] if m else []), m, k


def _cuda_device(obj: Any) -> int | None:
    """The CUDA device index of a CUDA torch tensor (or of the first tensor
    of a list of them), else None."""
    if isinstance(obj, list):
        return _cuda_device(obj[0]) if obj else None
    if hasattr(obj, "data_ptr") and getattr(obj, "is_cuda", False):
        idx = getattr(obj.device, "index", None)
        return int(idx) if idx is not None else 0
    return None


def _cuda_block(obj: Any, device: int, what: str) -> tuple[list[tuple[int, int]], int, Any]:
    """(device parts [(address, size)], total size, keep-alive) of one block
    on CUDA device ``device``: a CUDA tensor or a list of them."""
    objs = obj if isinstance(obj, list) else [obj]
    parts, n = [], 0
    for j, o in enumerate(objs):
        w = what if len(objs) == 1 and not isinstance(obj, list) else "%s part %d" % (what, j)
        if not (hasattr(o, "data_ptr") and getattr(o, "is_cuda", False)):
            raise InvalidArgument("%s: %s is not a CUDA tensor: a task's blocks are all on the "
                                  "host or all on one CUDA device" % (w, type(o).__name__))
        d = _cuda_device(o)
        if d != device:
            raise InvalidArgument("%s: a tensor on cuda:%s, the task's blocks are on cuda:%d"
                                  % (w, d, device))
        if not o.is_contiguous():
            raise InvalidArgument("%s: the tensor is not contiguous" % w)
        m = int(o.numel() * o.element_size())
        if m:
            parts.append((int(o.data_ptr()), m))
            n += m
    return parts, n, objs


def _gather(dst: int, parts: list[tuple[int, int]]) -> None:
    for a, m in parts:
        _memmove(dst, a, m)
        dst += m


def _scatter(src: int, parts: list[tuple[int, int]]) -> None:
    for a, m in parts:
        _memmove(a, src, m)
        src += m


class _Staging:
    """Registered staging memory: first-fit extents, freed extents merged;
    extents whose transfer failed in a way that may still write them are
    retired for good."""

    def __init__(self, size: int, base: int | None = None, free: Any = None):
        """``base``: memory of the caller's (pinned staging), released with
        ``free(base)`` on close; else an anonymous mapping of ``size``."""
        self.size = size
        self._free_fn = free
        if base is None:
            self.map = mmap.mmap(-1, size)
            self._c = ctypes.c_char.from_buffer(self.map)
            self.base = ctypes.addressof(self._c)
        else:
            self.map = None
            self.base = base
        ctypes.memset(self.base, 0, size)  # fault the pages in now, not in the first transfer
        self.free = [(0, size)]
        self.retired = 0
        self.cv = threading.Condition()

    def usable(self) -> int:
        return self.size - self.retired

    def alloc(self, n: int, stop: threading.Event) -> int | None:
        """Offset of n bytes; waits until space is freed. None once ``stop``
        is set or when n can never fit."""
        with self.cv:
            while True:
                if n > self.usable():
                    return None
                for i, (off, sz) in enumerate(self.free):
                    if sz >= n:
                        if sz == n:
                            del self.free[i]
                        else:
                            self.free[i] = (off + n, sz - n)
                        return off
                if stop.is_set():
                    return None
                self.cv.wait(0.1)

    def release(self, off: int, n: int, retire: bool = False) -> None:
        with self.cv:
            if retire:
                self.retired += n
            else:
                self.free.append((off, n))
                self.free.sort()
                merged = []
                for o, s in self.free:
                    if merged and merged[-1][0] + merged[-1][1] == o:
                        merged[-1] = (merged[-1][0], merged[-1][1] + s)
                    else:
                        merged.append((o, s))
                self.free = merged
            self.cv.notify_all()

    def close(self) -> None:
        if self.map is None:
            if self._free_fn is not None:
                self._free_fn(self.base)
                self._free_fn = None
            return
        del self._c
        try:
            self.map.close()
        except BufferError:
            pass


def _slot(n: int) -> int:
    return (HEADER + n + _ALIGN - 1) // _ALIGN * _ALIGN


# ------------------------------------------------------------------ tasks

_PENDING = 1


class BlockTask:
    """A dump or load: ``wait(timeout)`` -> bool, ``check()``, ``results()``
    (per block: 0 done, ``kvshelf.ERR_NOT_FOUND`` a miss, other negative
    kvshelf codes errors), ``failed()``, ``misses()``, ``errors()``,
    ``exception()`` / ``raise_for_errors()`` for the first error that is not a
    miss. ``done``, ``ok`` and ``error`` (a message) are attributes."""

    def __init__(self, op: str, keys: list[str], bufs: list[tuple[list, int, Any]],
                 tags: list[int] | None = None, cuda: bool = False):
        self.op = op
        self.cuda = cuda  # bufs are device parts (CUDA), moved through kvshelf's copy path
        self._snap = 0  # CudaCopier.snapshot of the caller's event (dump), 0: none
        self.keys = keys
        self._bufs = bufs
        self._tags = tags
        self._res = [_PENDING] * len(keys)
        self._left = len(keys)
        self._lock = threading.Lock()
        # held while the store reads or writes the caller's buffers; cancel()
        # takes it, so no access is in progress or to come once it returned
        self._io = threading.Lock()
        self._cancelled = False
        self._mismatch: set[int] = set()
        self._ev = threading.Event()
        self.error: str | None = None
        self._error_code = 0
        self.submitted = time.monotonic()
        self.finished: float | None = None
        if not keys:
            self._finish()

    def __repr__(self) -> str:
        return "<kvshelf.mooncake_store.BlockTask %s of %d blocks, %s>" % (
            self.op, len(self.keys), "done: %d ok" % self.ok if self.done else "running")

    def _set(self, idx: Iterable[int], code: int, msg: str | None = None) -> None:
        changed = False
        with self._lock:
            for i in idx:
                if self._res[i] == _PENDING:
                    self._res[i] = code
                    self._left -= 1
                    changed = True
            if changed and msg and code not in (0, _k.ERR_NOT_FOUND) and self.error is None:
                self.error, self._error_code = msg, code
            fin = changed and self._left == 0
        if fin:
            self._finish()

    def _finish(self) -> None:
        self.finished = time.monotonic()
        self._bufs = []
        self._ev.set()

    @property
    def done(self) -> bool:
        return self._ev.is_set()

    def check(self) -> bool:
        return self._ev.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ev.wait(timeout)

    def results(self) -> list[int]:
        with self._lock:
            return list(self._res)

    @property
    def ok(self) -> int:
        return sum(1 for r in self.results() if r == 0)

    def failed(self) -> list[int]:
        return [i for i, r in enumerate(self.results()) if r not in (0, _PENDING)]

    def mismatches(self) -> list[int]:
        """Misses of a load whose key held an object that did not match
        (another length, tag, key or checksum; not written by kvshelf)."""
        with self._lock:
            return sorted(self._mismatch)

    def cancel(self, code: int = _k.ERR_TIMEOUT, msg: str | None = None) -> list[int]:
        """Fails the blocks not done yet with ``code`` and returns the
        results. Once it returned, the task reads and writes none of the
        caller's buffers any more (a copy in progress finishes first)."""
        with self._io:
            self._cancelled = True
        with self._lock:
            left = [i for i, r in enumerate(self._res) if r == _PENDING]
        if left:
            self._set(left, code, msg or "kvshelf.mooncake_store: the %s was cancelled with %d of %d "
                      "blocks not done" % (self.op, len(left), len(self.keys)))
        return self.results()

    def misses(self) -> list[int]:
        return [i for i, r in enumerate(self.results()) if r == _k.ERR_NOT_FOUND]

    def errors(self) -> list[int]:
        return [i for i, r in enumerate(self.results())
                if r not in (0, _PENDING, _k.ERR_NOT_FOUND)]

    def exception(self) -> Error | None:
        if self.error is None:
            return None
        return _exc(self._error_code, self.error)

    def raise_for_errors(self) -> None:
        e = self.exception()
        if e is not None:
            raise e


class _Batch:
    __slots__ = ("task", "idx", "off", "size", "slots", "mkeys", "sizes", "bufs", "tags", "zc",
                 "st", "ptrs")

    def __init__(self, task: BlockTask, idx: list[int], st: "_Staging"):
        self.task = task
        self.st = st  # the staging it uses (pinned for CUDA tasks)
        self.ptrs: list[int] | None = None  # set when blocks were dropped (failed CUDA copies)
        self.idx = idx
        self.off = -1
        self.bufs = [task._bufs[i] for i in idx]  # the batch's own references
        self.slots = [_slot(b[1]) for b in self.bufs]
        self.size = sum(self.slots)
        self.mkeys = [task.keys[i] for i in idx]
        self.sizes = [HEADER + b[1] for b in self.bufs]
        self.tags = [task._tags[i] for i in idx] if task._tags is not None else [0] * len(idx)
        self.zc = False  # a zero-copy dump: headers in staging, payloads from registered memory

    def zero_copy(self) -> None:
        self.zc = True
        self.slots = [HEADER] * len(self.idx)
        self.size = HEADER * len(self.idx)


# ------------------------------------------------------------------ store

class MooncakeBlockStore:
    """kvshelf blocks in a Mooncake Store; host memory (see the module's
    documentation for the configuration and the object layout).

    ``dump(keys, buffers)`` / ``load(keys, buffers)`` -> ``BlockTask``;
    ``wait(task, timeout=None)`` -> per-block results (raises
    ``kvshelf.Timeout`` if the task is not done in time); ``lookup(keys)`` ->
    list of bool; ``lookup_prefix(keys)`` -> number of leading keys stored;
    ``remove(keys)``; ``stats()``; ``close()``. A dump of a key that is
    already stored succeeds without writing it again (Mooncake's put keeps
    the first object). ``lookup`` says whether an object exists under the key;
    only ``load`` checks its header, so an object written by someone else
    shows in ``lookup`` and loads as a miss.

    ``client`` replaces Mooncake's client (an object with the methods of
    ``mooncake.store.MooncakeDistributedStore``, already set up)."""

    def __init__(self, config: dict[str, Any] | str | os.PathLike | None = None, *,
                 client: Any = None):
        self.config = parse_config(config)
        c = self.config
        _sum_threads(strict=True)  # a bad KVSHELF_MC_CHECKSUM_THREADS fails here, not in a stage
        self._closed = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down_msg = ""
        self._calls: dict[int, tuple[str, float]] = {}  # Mooncake calls running: thread -> (name, start)
        # lookups run here, so that the caller waits at most task_timeout_ms
        self._lookup_pool = concurrent.futures.ThreadPoolExecutor(2, "kvshelf-mc-lookup")
        self._st = collections.Counter()
        self._bad: collections.OrderedDict = collections.OrderedDict()
        self._algo = ALGO_XXH3 if _xxh3 is not None else ALGO_BLAKE2B
        self._replicate = None
        self._own_client = client is None
        self._client_closed = False
        if client is None:
            client = self._setup(c)
        self._mc = client
        try:
            self._staging = _Staging(c["staging_size"])
        except (OSError, ValueError) as e:
            self._close_client(10)
            raise NoMemory("kvshelf.mooncake_store: cannot map %d bytes of staging memory: %s"
                           % (c["staging_size"], e)) from None
        rc = self._mc.register_buffer(self._staging.base, self._staging.size)
        if rc != 0:
            self._close_client(10)
            self._staging.close()
            raise InternalError("kvshelf.mooncake_store: Mooncake's register_buffer of %d bytes of "
                                "staging memory failed: %s" % (self._staging.size, mc_name(rc)))
        # Half the staging per batch at most, so two batches (one per stage) fit.
        self._batch_bytes = max(_ALIGN, self._staging.size // 2)
        # CUDA blocks (enable_cuda): kvshelf's copier and pinned staging of the same size
        self._cuda: Any = None
        self._cstaging: _Staging | None = None
        self._cuda_lock = threading.Lock()
        # host memory of the caller registered with Mooncake (register_memory):
        # sorted (start, end); dumps whose parts all lie there are zero-copy
        self._regions: list[tuple[int, int]] = []
        self._multi_put = hasattr(self._mc, "batch_put_from_multi_buffers")
        self._tasks: queue.Queue = queue.Queue(maxsize=c["max_inflight"])
        self._mid: queue.Queue = queue.Queue(maxsize=2)
        self._t1 = threading.Thread(target=self._stage1_loop, name="kvshelf-mc-stage1", daemon=True)
        self._t2 = threading.Thread(target=self._stage2_loop, name="kvshelf-mc-stage2", daemon=True)
        self._t1.start()
        self._t2.start()

    # ------------------------------------------------------------ setup
    def _setup(self, c: dict[str, Any]) -> Any:
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as e:
            raise Unsupported(
                "kvshelf.mooncake_store: store 'mooncake' needs Mooncake's Python package "
                "(pip install mooncake-transfer-engine, or mooncake-transfer-engine-non-cuda; "
                "its store library also needs libibverbs1): %s" % e) from None
        if c["replica_num"] != 1:
            rc_cfg = ReplicateConfig()
            rc_cfg.replica_num = c["replica_num"]
            self._replicate = rc_cfg
        mc = MooncakeDistributedStore()
        args = {
            "local_hostname": c["local_hostname"],
            "metadata_server": c["metadata_server"],
            "global_segment_size": c["global_segment_size"],
            "local_buffer_size": c["local_buffer_size"],
            "protocol": c["protocol"],
            "rdma_devices": c["device_name"],
            "master_server_addr": c["master_server_address"],
        }
        tmo = c["timeout_ms"] / 1000.0
        _probe(c["master_server_address"], "master_server_address", tmo, greet_s=0.25)
        meta = c["metadata_server"]
        if meta.startswith("http://"):
            _probe(meta[len("http://"):].split("/", 1)[0], "metadata_server", tmo)
        t0 = time.monotonic()
        box: dict[str, Any] = {}

        def run_setup():
            try:
                try:
                    box["rc"] = mc.setup(args)
                except TypeError:  # releases without the dict form
                    box["rc"] = mc.setup(args["local_hostname"], args["metadata_server"],
                                         args["global_segment_size"], args["local_buffer_size"],
                                         args["protocol"], args["rdma_devices"],
                                         args["master_server_addr"])
            except Exception as e:  # noqa: BLE001
                box["exc"] = e

        th = threading.Thread(target=run_setup, name="kvshelf-mc-setup", daemon=True)
        th.start()
        th.join(c["setup_timeout_ms"] / 1000.0)
        if th.is_alive():
            raise ConnectionFailed(
                "kvshelf.mooncake_store: Mooncake's client did not start within setup_timeout_ms="
                "%d (master %s, metadata %s, local_hostname %s): it is still retrying; Mooncake's "
                "log on stderr names what it waits for" % (
                    c["setup_timeout_ms"], c["master_server_address"], c["metadata_server"],
                    c["local_hostname"]))
        if "exc" in box:
            raise ConnectionFailed("kvshelf.mooncake_store: Mooncake's setup raised %s: %s"
                                   % (type(box["exc"]).__name__, box["exc"])) from None
        rc = box["rc"]
        if rc != 0:
            try:
                mc.close()
            except Exception:  # noqa: BLE001 - the setup error is the one to report
                pass
            raise ConnectionFailed(
                "kvshelf.mooncake_store: Mooncake's client did not start (setup returned %s after "
                "%.1f s): master %s, metadata %s, local_hostname %s, protocol %s. Is "
                "mooncake_master running there with its metadata service "
                "(--enable_http_metadata_server), and is local_hostname an address of a "
                "non-loopback interface of this host? Mooncake's log on stderr names the cause."
                % (rc, time.monotonic() - t0, c["master_server_address"], c["metadata_server"],
                   c["local_hostname"], c["protocol"]))
        return mc

    # ----------------------------------------------------------- health
    def _unreachable(self) -> str | None:
        """A message while the master is known to be unreachable, else None."""
        now = time.monotonic()
        with self._lock:
            if now < self._down_until:
                return self._down_msg
        try:
            h = self._mc.health_check()
        except Exception:  # noqa: BLE001 - older clients: no health_check
            return None
        if h == 2:
            self._mark_down("health_check: master unreachable")
            with self._lock:
                return self._down_msg
        return None

    def _mark_down(self, why: str) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.config["retry_interval_ms"] / 1000.0
            self._down_msg = ("kvshelf.mooncake_store: Mooncake master %s unreachable (%s); calls "
                              "fail at once for %d ms, then try again"
                              % (self.config["master_server_address"], why,
                                 self.config["retry_interval_ms"]))
            self._st["unreachable_events"] += 1
            self._st["last_error"] = self._down_msg

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("kvshelf.mooncake_store: the store is closed")

    def _stalled(self) -> str | None:
        """A message while a call into Mooncake has been running longer than
        task_timeout_ms (tasks queued behind it could not finish in time)."""
        limit = self.config["task_timeout_ms"] / 1000.0
        now = time.monotonic()
        with self._lock:
            for name, t0 in self._calls.values():
                if now - t0 > limit:
                    return ("kvshelf.mooncake_store: Mooncake's %s has not returned for %.1f s "
                            "(task_timeout_ms=%d; master %s): new calls fail at once until it does"
                            % (name, now - t0, self.config["task_timeout_ms"],
                               self.config["master_server_address"]))
        return None

    def _call(self, name: str, fn: Any, *args: Any) -> Any:
        """fn(*args), a call into Mooncake, recorded while it runs."""
        me = threading.get_ident()
        with self._lock:
            self._calls[me] = (name, time.monotonic())
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._calls.pop(me, None)

    # ------------------------------------------------------------- CUDA
    def enable_cuda(self, device: int) -> None:
        """Makes the store ready for CUDA blocks on ``device``: kvshelf's copier
        (``kvshelf._kvshelf.CudaCopier``) and ``staging_size`` bytes of pinned,
        device-mapped staging registered with Mooncake. Done by the first
        task with CUDA tensors; call it at start to keep the allocation (and
        the registration) out of the first dump. One device per store:
        another raises ``kvshelf.InvalidArgument``; a build without CUDA
        raises ``kvshelf.Unsupported``, a missing device ``kvshelf.CudaError``."""
        self._check_open()
        device = int(device)
        with self._cuda_lock:
            if self._cuda is not None:
                if self._cuda.device != device:
                    raise InvalidArgument("kvshelf.mooncake_store: this store moves CUDA blocks of "
                                          "device %d; a store serves one device (open another "
                                          "for device %d)" % (self._cuda.device, device))
                return
            copier = getattr(_k, "CudaCopier", None)
            if copier is None or not copier.available():
                raise Unsupported("kvshelf.mooncake_store: CUDA blocks need kvshelf built with "
                                  "CUDA (the CUDA toolkit found when the package was built); "
                                  "this build moves host memory only")
            cp = copier(device)
            size = self._staging.size
            try:
                base = cp.pinned_alloc(size)
            except Error:
                cp.close()
                raise
            st = _Staging(size, base, cp.pinned_free)
            rc = self._mc.register_buffer(st.base, st.size)
            if rc != 0:
                st.close()
                cp.close()
                raise InternalError("kvshelf.mooncake_store: Mooncake's register_buffer of %d bytes "
                                    "of pinned staging memory failed: %s" % (size, mc_name(rc)))
            self._cstaging = st
            self._cuda = cp

    @property
    def cuda_device(self) -> int | None:
        """The CUDA device of ``enable_cuda``, or None."""
        return self._cuda.device if self._cuda is not None else None

    def _free_snap(self, task: BlockTask) -> None:
        snap, task._snap = task._snap, 0
        if snap and self._cuda is not None:
            self._cuda.free_snapshot(snap)

    def _cuda_bufs(self, op: str, buffers: list[Any]) -> list[tuple[list, int, Any]] | None:
        """The blocks of a task on a CUDA device (enabling it), or None for
        host blocks. Mixed host and CUDA blocks raise InvalidArgument."""
        devs = [_cuda_device(b) for b in buffers]
        dev = next((d for d in devs if d is not None), None)
        if dev is None:
            return None
        self.enable_cuda(dev)
        return [_cuda_block(b, dev, "kvshelf.mooncake_store: %s: buffer %d" % (op, i))
                for i, b in enumerate(buffers)]

    @staticmethod
    def _device_pairs(op: str, buffers: list[Any]) -> list[tuple[list, int, Any]]:
        """cuda=True blocks given as device (address, size) pairs or lists of them."""
        out = []
        for i, b in enumerate(buffers):
            items = b if isinstance(b, list) else [b]
            parts, n = [], 0
            for j, p in enumerate(items):
                if hasattr(p, "data_ptr") and getattr(p, "is_cuda", False):
                    m = int(p.numel() * p.element_size())
                    p = (int(p.data_ptr()), m)
                if not (isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, int) for x in p)
                        and p[0] > 0 and p[1] >= 0):
                    raise InvalidArgument("kvshelf.mooncake_store: %s: buffer %d part %d: with "
                                          "cuda=True a part is a device (address, size) or a CUDA "
                                          "tensor, not %r" % (op, i, j, type(p).__name__))
                if p[1]:
                    parts.append(p)
                    n += p[1]
            out.append((parts, n, b))
        return out

    # ----------------------------------------------------------- public
    @property
    def max_block(self) -> int:
        """The largest block (bytes) this store's staging memory moves."""
        return self._batch_bytes - HEADER

    def _submit(self, op: str, keys: Sequence[bytes | str], buffers: Sequence[Any],
                block: bool, timeout: float | None, tags: Any = None,
                raw_bytes: int | None = None, cuda: bool | None = None,
                event: Any = None) -> BlockTask:
        self._check_open()
        keys = list(keys)
        buffers = list(buffers)
        if len(keys) != len(buffers):
            raise InvalidArgument("kvshelf.mooncake_store: %s: %d keys but %d buffers"
                                  % (op, len(keys), len(buffers)))
        mkeys = [mooncake_key(k) for k in keys]
        is_cuda = bool(cuda)
        if is_cuda and self._cuda is None:
            raise InvalidArgument("kvshelf.mooncake_store: %s with cuda=True before enable_cuda("
                                  "device)" % op)
        if raw_bytes is not None:  # lists of (address, size) built by kvshelf's own adapters
            bufs = [(b, raw_bytes, None) for b in buffers]
        elif is_cuda:
            bufs = self._device_pairs(op, buffers)
        else:
            cb = self._cuda_bufs(op, buffers) if cuda is None else None
            is_cuda = cb is not None
            bufs = cb if cb is not None else [
                _block(b, op == "load", "kvshelf.mooncake_store: %s: buffer %d" % (op, i))
                for i, b in enumerate(buffers)]
        for i, (_, n, _) in enumerate(bufs):
            if _slot(n) > self._batch_bytes:
                raise TooLarge("kvshelf.mooncake_store: %s: block %d is %d bytes; staging_size=%d "
                               "holds blocks of at most %d bytes (staging_size/2 less the header)"
                               % (op, i, n, self._staging.size, self._batch_bytes - HEADER))
        if tags is not None:
            if isinstance(tags, int):
                tags = [tags] * len(mkeys)
            else:
                tags = [int(t) for t in tags]
                if len(tags) != len(mkeys):
                    raise InvalidArgument("kvshelf.mooncake_store: %s: %d keys but %d tags"
                                          % (op, len(mkeys), len(tags)))
            if any(not 0 <= t < 1 << 64 for t in tags):
                raise InvalidArgument("kvshelf.mooncake_store: %s: a tag is not a 64-bit "
                                      "unsigned integer" % op)
        task = BlockTask(op, mkeys, bufs, tags, is_cuda)
        if not mkeys:
            return task
        stall = self._stalled()
        if stall:
            self._count_fail(op, len(mkeys), _k.ERR_TIMEOUT, stall)
            task._set(range(len(mkeys)), _k.ERR_TIMEOUT, stall)
            return task
        if event is not None and op == "dump":
            if is_cuda:  # the copies wait for it on the GPU (a snapshot: re-recording is fine)
                task._snap = self._cuda.snapshot(event)
            elif hasattr(event, "synchronize"):  # host blocks: wait for it here
                event.synchronize()
        if timeout is None:
            timeout = self.config["timeout_ms"] / 1000.0
        try:
            self._tasks.put(task, block=block, timeout=timeout if block else None)
        except queue.Full:
            self._free_snap(task)
            with self._lock:
                self._st["busy"] += 1
            raise Busy("kvshelf.mooncake_store: %d tasks already queued (max_inflight); the %s "
                       "of %d blocks was not accepted%s" % (
                           self.config["max_inflight"], op, len(mkeys),
                           " within %.1f s" % timeout if block else "")) from None
        if self._closed:  # closed while we queued: make sure it finishes
            self._drain_queue()
        return task

    def dump(self, keys: Sequence[bytes | str], buffers: Sequence[Any], *, block: bool = True,
             timeout: float | None = None, tags: Any = None, event: Any = None,
             cuda: bool | None = None) -> BlockTask:
        """Stores ``buffers[i]`` under ``keys[i]`` (a buffer may be a list of
        buffers: the block is their concatenation). Returns a task at once;
        while ``max_inflight`` tasks are queued it waits for room (up to
        ``timeout``, default ``timeout_ms``; ``block=False``: not at all) and
        then raises ``kvshelf.Busy``. The buffers must stay unchanged until
        the task is done (or cancelled). ``tags``: one 64-bit int for every
        block or one per block, stored in the header and compared on load.
        CUDA blocks (CUDA tensors; with ``cuda=True`` device ``(address,
        size)`` parts too): ``event`` (a CUDA event, torch's or a
        ``cudaEvent_t`` int) is waited for on the GPU before they are copied;
        host blocks: it is synchronized here."""
        return self._submit("dump", keys, buffers, block, timeout, tags, cuda=cuda, event=event)

    def finish(self, task: BlockTask, timeout: float | None = None) -> list[int]:
        """Waits for ``task`` at most ``timeout`` seconds (default: until
        ``task_timeout_ms`` after its submission), then fails the blocks not
        done with ``ERR_TIMEOUT`` (``BlockTask.cancel``: the caller's buffers
        are not touched any more) and returns the per-block results. Never
        raises for the task's own failures."""
        if timeout is None:
            timeout = task.submitted + self.config["task_timeout_ms"] / 1000.0 - time.monotonic()
        if task.wait(max(0.0, timeout)):
            return task.results()
        msg = ("kvshelf.mooncake_store: the %s of %d blocks was not done within %.1f s "
               "(task_timeout_ms=%d, master %s): the blocks left fail with ERR_TIMEOUT"
               % (task.op, len(task.keys), time.monotonic() - task.submitted,
                  self.config["task_timeout_ms"], self.config["master_server_address"]))
        with self._lock:
            self._st["timeouts"] += 1
            self._st["last_error"] = msg
        return task.cancel(_k.ERR_TIMEOUT, msg)

    def load(self, keys: Sequence[bytes | str], buffers: Sequence[Any], *, block: bool = True,
             timeout: float | None = None, tags: Any = None,
             cuda: bool | None = None) -> BlockTask:
        """Reads the block under ``keys[i]`` into ``buffers[i]`` (its size is
        the block's). A block missing, or whose stored object does not match
        (header, length, key, checksum), is a miss: ``ERR_NOT_FOUND``, its
        buffer untouched (a list of buffers: the parts the block is scattered
        into). ``tags``: as for ``dump``; another stored tag is a miss.
        CUDA blocks as for ``dump``: the device memory is written only
        after the header checked in staging."""
        return self._submit("load", keys, buffers, block, timeout, tags, cuda=cuda)

    def wait(self, task: BlockTask, timeout: float | None = None) -> list[int]:
        """Waits for ``task`` and returns its per-block results. Raises
        ``kvshelf.Timeout`` if it is not done within ``timeout`` seconds
        (None: no limit)."""
        if not task.wait(timeout):
            raise Timeout("kvshelf.mooncake_store: the %s of %d blocks is not done after %.1f s "
                          "(%d blocks left)" % (task.op, len(task.keys), timeout,
                                                task.results().count(_PENDING)))
        return task.results()

    def _exist(self, mkeys: list[str]) -> list[int]:
        msg = self._unreachable()
        if msg:
            raise ConnectionFailed(msg)
        msg = self._stalled()
        if msg:
            raise Timeout(msg)
        fut = self._lookup_pool.submit(self._call, "batch_is_exist", self._mc.batch_is_exist, mkeys)
        try:
            r = list(fut.result(self.config["task_timeout_ms"] / 1000.0))
        except concurrent.futures.TimeoutError:
            msg = ("kvshelf.mooncake_store: lookup of %d keys: Mooncake's batch_is_exist did not "
                   "return within task_timeout_ms=%d (master %s)"
                   % (len(mkeys), self.config["task_timeout_ms"], self.config["master_server_address"]))
            with self._lock:
                self._st["lookup_errors"] += 1
                self._st["timeouts"] += 1
                self._st["last_error"] = msg
            raise Timeout(msg) from None
        except Exception as e:  # noqa: BLE001
            raise InternalError("kvshelf.mooncake_store: Mooncake's batch_is_exist raised %s: %s"
                                % (type(e).__name__, e)) from None
        bad = [x for x in r if x < 0]
        if bad:
            code = bad[0]
            if code in _MC_RPC or code == -1:
                self._mark_down("batch_is_exist: %s" % mc_name(code))
            with self._lock:
                self._st["lookup_errors"] += 1
            kc = _kv_code(code, "exist") if code != -1 else _k.ERR_CONN
            raise _exc(kc, "kvshelf.mooncake_store: lookup of %d keys: %d failed in Mooncake "
                       "(%s), master %s" % (len(mkeys), len(bad), mc_name(code),
                                            self.config["master_server_address"]))
        return r

    def lookup(self, keys: Sequence[bytes | str]) -> list[bool]:
        """Which keys have an object (one ``batch_is_exist``). Raises a
        kvshelf error (``ConnectionFailed`` when the master is unreachable)."""
        self._check_open()
        mkeys = [mooncake_key(k) for k in keys]
        if not mkeys:
            return []
        r = self._exist(mkeys)
        with self._lock:
            self._st["lookups"] += len(mkeys)
            self._st["lookup_hits"] += sum(1 for x in r if x == 1)
        return [x == 1 for x in r]

    def lookup_prefix(self, keys: Sequence[bytes | str], chunk: int = 256) -> int:
        """How many leading keys have an object (stops at the first miss;
        ``chunk`` keys per round trip)."""
        self._check_open()
        mkeys = [mooncake_key(k) for k in keys]
        n = 0
        for s in range(0, len(mkeys), chunk):
            part = mkeys[s:s + chunk]
            r = self._exist(part)
            lead = 0
            for x in r:
                if x != 1:
                    break
                lead += 1
            with self._lock:
                self._st["lookups"] += len(part)
                self._st["lookup_hits"] += lead
            n += lead
            if lead < len(part):
                return n
        return n

    def remove(self, keys: Sequence[bytes | str], force: bool = False) -> list[int]:
        """Removes the objects; per key 0 or a kvshelf code (``ERR_NOT_FOUND``,
        ``ERR_BUSY`` while a reader holds a lease on it, ...)."""
        self._check_open()
        mkeys = [mooncake_key(k) for k in keys]
        if not mkeys:
            return []
        msg = self._unreachable()
        if msg:
            raise ConnectionFailed(msg)
        r = list(self._mc.batch_remove(mkeys, force))
        return [0 if x == 0 else _kv_code(x, "remove") for x in r]

    #: keys remembered as holding an object that failed the header check
    BAD_KEYS = 65536

    #: counters stats() always reports
    COUNTERS = ("dumped", "dumped_bytes", "dump_errors", "dump_misses", "loaded", "loaded_bytes",
                "load_misses", "load_errors", "mismatch", "lookups", "lookup_hits",
                "lookup_errors", "rewritten", "put_calls", "put_seconds", "get_calls",
                "get_seconds", "busy", "unreachable_events", "staging_retire_events", "timeouts",
                "cuda_dumped", "cuda_loaded", "cuda_errors", "put_bytes", "get_bytes",
                "dump_copy_seconds", "dump_copy_bytes", "dump_checksum_seconds",
                "load_copy_seconds", "load_copy_bytes", "load_check_seconds")

    def stats(self) -> dict[str, Any]:
        """Counters (blocks, bytes, Mooncake calls and their seconds, misses,
        ``mismatch``: objects whose header did not match, errors, ...),
        ``last_error`` and the staging memory's state.

        Where the time goes, per stage of the pipeline (seconds the stage's
        thread was busy, and the bytes it moved): the Mooncake transfers,
        ``put_seconds``/``put_bytes`` (``batch_put_from``, a dump's stage 2)
        and ``get_seconds``/``get_bytes`` (``batch_get_into``, a load's stage
        1), bytes with the 64-byte headers; kvshelf's copies between the
        caller's blocks and the staging, ``dump_copy_*`` (stage 1: CUDA
        device -> pinned staging through ``CudaCopier``, or the host gather)
        and ``load_copy_*`` (stage 2: staging -> device or host), payload
        bytes; the checksums, ``dump_checksum_seconds`` (stage 1, after the
        copy) and ``load_check_seconds`` (stage 2, header and checksum before
        the copy). Host blocks are gathered and checksummed (scattered and
        checked) in one pass: their ``*_copy_seconds`` include the checksum
        and ``dump_checksum_seconds`` / ``load_check_seconds`` stay 0 (except
        the checksums of zero-copy dumps, which copy nothing)."""
        with self._lock:
            d = {k: 0 for k in self.COUNTERS}
            d.update(self._st)
        d.setdefault("last_error", None)
        d["staging_size"] = self._staging.size
        d["staging_retired"] = self._staging.retired
        d["queued_tasks"] = self._tasks.qsize()
        d["checksum"] = "xxh3" if self._algo == ALGO_XXH3 else "blake2b"
        d["cuda_device"] = self.cuda_device
        if self._cstaging is not None:
            d["cuda_staging_retired"] = self._cstaging.retired
        return d

    # ------------------------------------------------- registered memory
    def register_memory(self, buf: Any, size: int | None = None) -> None:
        """Registers host memory of the caller with Mooncake (``buf``: a
        buffer, CPU tensor or address with ``size``). Dumps of blocks whose
        parts all lie in registered memory are zero-copy: only the 64-byte
        headers are written to staging, and Mooncake reads the payload where
        it lies (``batch_put_from_multi_buffers``); the checksum is computed
        over the caller's bytes in place. Loads still land in staging and
        are copied out only after the header checked, so a miss never
        touches the caller's buffer. As with any dump, the buffers must stay
        unchanged until the task is done; after a ``cancel``/``finish``
        timeout a Mooncake call in flight may still read them (never write)
        until it returns -- ``close()`` waits for it. Keep the memory mapped
        until ``unregister_memory`` or ``close``."""
        self._check_open()
        if size is not None and isinstance(buf, int):
            addr, n = int(buf), int(size)
            if addr <= 0 or n <= 0:
                raise InvalidArgument("kvshelf.mooncake_store: register_memory: bad (%r, %r)" % (buf, size))
        else:
            addr, n, _ = _buffer(buf, False, "kvshelf.mooncake_store: register_memory")
            if n == 0:
                return
        with self._lock:
            for a, e in self._regions:
                if a < addr + n and addr < e:
                    raise InvalidArgument("kvshelf.mooncake_store: register_memory: [%#x, %#x) overlaps "
                                          "registered [%#x, %#x)" % (addr, addr + n, a, e))
        rc = self._mc.register_buffer(addr, n)
        if rc != 0:
            raise InternalError("kvshelf.mooncake_store: Mooncake's register_buffer of %d bytes at %#x "
                                "failed: %s" % (n, addr, mc_name(rc)))
        with self._lock:
            self._regions.append((addr, addr + n))
            self._regions.sort()

    def unregister_memory(self, buf: Any) -> None:
        """Drops a registration of ``register_memory`` (``buf``: the same
        buffer or its address). Wait for the dumps that read it first."""
        addr = int(buf) if isinstance(buf, int) else _buffer(buf, False, "unregister_memory")[0]
        with self._lock:
            found = [r for r in self._regions if r[0] == addr]
            if not found:
                raise InvalidArgument("kvshelf.mooncake_store: unregister_memory: %#x is not registered"
                                      % addr)
            self._regions.remove(found[0])
        try:
            self._mc.unregister_buffer(addr)
        except Exception:  # noqa: BLE001
            pass

    def _in_regions(self, parts: list[tuple[int, int]]) -> bool:
        regs = self._regions
        for a, m in parts:
            i = bisect.bisect_right(regs, (a, 1 << 64)) - 1
            if i < 0 or a + m > regs[i][1]:
                return False
        return True

    def _zero_copy_ok(self, b: "_Batch") -> bool:
        if not self._multi_put or not self._regions:
            return False
        with self._lock:
            if any(k in self._bad for k in b.mkeys):  # those need an upsert: the staged path
                return False
            return all(self._in_regions(parts) for parts, _, _ in b.bufs)

    @property
    def client(self) -> Any:
        """Mooncake's client (``MooncakeDistributedStore``)."""
        return self._mc

    # ------------------------------------------------------------ close
    def _drain_queue(self) -> None:
        while True:
            try:
                t = self._tasks.get_nowait()
            except queue.Empty:
                return
            self._free_snap(t)
            t._set(range(len(t.keys)), _k.ERR_CLOSED, "kvshelf.mooncake_store: closed")

    def _close_client(self, timeout: float) -> bool:
        if not self._own_client or self._client_closed:
            return True
        done = threading.Event()

        def run():
            try:
                self._mc.close()
            except Exception:  # noqa: BLE001
                pass
            done.set()

        threading.Thread(target=run, name="kvshelf-mc-close", daemon=True).start()
        ok = done.wait(timeout)
        self._client_closed = ok
        return ok

    def close(self, timeout: float = 30.0) -> None:
        """Finishes the queued tasks that can finish within ``timeout``
        seconds, fails the others with ``ERR_CLOSED``, then closes Mooncake's
        client (it unmounts this client's segment from the pool: the blocks
        stored there go with it) and frees the staging memory."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        try:
            self._tasks.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._t1.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        for st in (self._staging, self._cstaging):
            if st is not None:
                with st.cv:
                    st.cv.notify_all()
        self._drain_queue()
        try:
            self._tasks.put_nowait(None)  # in case the first one found the queue full
        except queue.Full:
            pass
        self._t1.join(max(0.1, deadline - time.monotonic()))
        self._t2.join(max(0.1, deadline - time.monotonic()))
        self._lookup_pool.shutdown(wait=False)
        quiet = not self._t1.is_alive() and not self._t2.is_alive()
        if quiet:
            try:
                self._mc.unregister_buffer(self._staging.base)
            except Exception:  # noqa: BLE001
                pass
            if self._cstaging is not None:
                try:
                    self._mc.unregister_buffer(self._cstaging.base)
                except Exception:  # noqa: BLE001
                    pass
            with self._lock:
                regions, self._regions = self._regions, []
            for a, _ in regions:
                try:
                    self._mc.unregister_buffer(a)
                except Exception:  # noqa: BLE001
                    pass
        closed = self._close_client(max(1.0, deadline - time.monotonic()))
        if quiet and closed:
            self._staging.close()
            if self._cstaging is not None:
                self._cstaging.close()  # frees the pinned memory
                self._cstaging = None
            if self._cuda is not None:
                self._cuda.close()
        else:
            log.warning("kvshelf.mooncake_store: closing took longer than %.0f s (Mooncake's "
                        "client is still busy); its staging memory is left mapped", timeout)

    def __enter__(self) -> "MooncakeBlockStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------- workers
    def _batches(self, task: BlockTask) -> list[_Batch]:
        with task._io:
            if task._cancelled or task.done:
                return []
            return self._cut(task)

    def _cut(self, task: BlockTask) -> list[_Batch]:
        st = self._cstaging if task.cuda else self._staging
        out, cur, cur_bytes = [], [], 0
        for i, (_, n, _) in enumerate(task._bufs):
            s = _slot(n)
            if cur and (len(cur) >= self.config["batch_size"] or cur_bytes + s > self._batch_bytes):
                out.append(_Batch(task, cur, st))
                cur, cur_bytes = [], 0
            cur.append(i)
            cur_bytes += s
        if cur:
            out.append(_Batch(task, cur, st))
        return out

    def _fail(self, b: _Batch, code: int, msg: str) -> None:
        self._count_fail(b.task.op, len(b.idx), code, msg)
        b.task._set(b.idx, code, msg)

    def _count_fail(self, op: str, n: int, code: int, msg: str | None) -> None:
        with self._lock:
            if code == _k.ERR_NOT_FOUND:
                self._st[op + "_misses"] += n
            else:
                self._st[op + "_errors"] += n
                if msg:
                    self._st["last_error"] = msg

    def _stage1_loop(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                self._mid.put(None)
                return
            for b in self._batches(task):
                if task._cancelled:  # finish() gave up on it: its results are set
                    continue
                if self._stop.is_set():
                    self._fail(b, _k.ERR_CLOSED, "kvshelf.mooncake_store: closed")
                    continue
                try:
                    self._stage1(b)
                except Exception as e:  # noqa: BLE001 - a bug must not stop the worker
                    log.exception("kvshelf.mooncake_store: stage 1")
                    self._release(b, retire=True)
                    self._fail(b, _k.ERR_INTERNAL, "kvshelf.mooncake_store: %s: %s: %s"
                               % (task.op, type(e).__name__, e))
            # the CUDA copies of a dump ran in _stage1 (they wait until done)
            self._free_snap(task)

    def _stage2_loop(self) -> None:
        while True:
            item = self._mid.get()
            if item is None:
                return
            b = item if isinstance(item, _Batch) else item[0]
            try:
                self._stage2(item)
            except Exception as e:  # noqa: BLE001
                log.exception("kvshelf.mooncake_store: stage 2")
                self._release(b, retire=True)
                self._fail(b, _k.ERR_INTERNAL, "kvshelf.mooncake_store: %s: %s: %s"
                           % (b.task.op, type(e).__name__, e))

    def _release(self, b: _Batch, retire: bool = False) -> None:
        if b.off >= 0:
            b.st.release(b.off, b.size, retire)
            b.off = -1

    def _ptrs(self, b: _Batch) -> list[int]:
        """The staging address of every block of b."""
        if b.ptrs is not None:
            return b.ptrs
        ptrs, pos = [], b.st.base + b.off
        for s in b.slots:
            ptrs.append(pos)
            pos += s
        return ptrs

    def _stage1(self, b: _Batch) -> None:
        """dump: staging <- blocks, headers, checksums (zero-copy: headers
        only, checksums over the caller's registered memory); load: the
        transfer."""
        msg = self._unreachable()
        if msg:
            self._fail(b, _k.ERR_CONN, msg)
            return
        if b.task.op == "dump" and not b.task.cuda and self._zero_copy_ok(b):
            b.zero_copy()
        off = b.st.alloc(b.size, self._stop)
        if off is None:
            if self._stop.is_set():
                self._fail(b, _k.ERR_CLOSED, "kvshelf.mooncake_store: closed")
            else:
                self._fail(b, _k.ERR_NOMEM, "kvshelf.mooncake_store: staging memory exhausted: "
                           "%d of %d bytes retired after failed transfers"
                           % (b.st.retired, b.st.size))
            return
        b.off = off
        base = b.st.base + off
        task = b.task
        if task.op == "dump" and task.cuda:
            self._stage1_cuda_dump(b)
            return
        if task.op == "dump" and b.zc:
            with task._io:  # checksums over the caller's buffers, in place
                if task._cancelled:
                    self._release(b)
                    return
                t0 = time.monotonic()
                sums = [_checksum_parts(self._algo, parts, n) for parts, n, _ in b.bufs]
                dt = time.monotonic() - t0
            with self._lock:
                self._st["dump_checksum_seconds"] += dt
            pos = base
            for j, (parts, n, _) in enumerate(b.bufs):
                hdr = _HDR.pack(MAGIC, 1, self._algo, HEADER, n, _key_hash(b.mkeys[j]), sums[j],
                                b.tags[j])
                ctypes.memmove(pos, hdr, HEADER)
                pos += HEADER
            self._mid.put(b)
            return
        if task.op == "dump":
            with task._io:  # the caller's buffers are read only here
                if task._cancelled:
                    self._release(b)
                    return
                pos = base
                sums = []
                t0 = time.monotonic()
                for j, (parts, n, _) in enumerate(b.bufs):
                    _gather(pos + HEADER, parts)
                    # the checksum of the block just copied: it is still in the cache (one
                    # pass over memory per block instead of two)
                    sums.append(_checksum(self._algo, pos + HEADER, n))
                    pos += b.slots[j]
                dt = time.monotonic() - t0
            with self._lock:  # host blocks: the copy's time includes the checksum
                self._st["dump_copy_seconds"] += dt
                self._st["dump_copy_bytes"] += sum(n for _, n, _ in b.bufs)
            pos = base
            for j, (parts, n, _) in enumerate(b.bufs):
                hdr = _HDR.pack(MAGIC, 1, self._algo, HEADER, n, _key_hash(b.mkeys[j]), sums[j],
                                b.tags[j])
                ctypes.memmove(pos, hdr, HEADER)
                pos += b.slots[j]
            self._mid.put(b)
            return
        # load: the transfer now, the checks and copies in stage 2
        ptrs, pos = [], base
        for s in b.slots:
            ptrs.append(pos)
            pos += s
        self._transfer_get(b, ptrs)

    def _cuda_failed(self, b: _Batch, idx: list[int], msg: str) -> None:
        with self._lock:
            self._st["cuda_errors"] += len(idx)
        self._count_fail(b.task.op, len(idx), _k.ERR_CUDA, msg)
        b.task._set(idx, _k.ERR_CUDA, msg)

    def _stage1_cuda_dump(self, b: _Batch) -> None:
        """CUDA dump: device -> pinned staging through kvshelf's copier (after
        the caller's event, on the GPU), then checksums and headers on the
        host; blocks whose view check failed are dropped from the batch."""
        task = b.task
        ptrs = self._ptrs(b)
        with task._io:  # the caller's device memory is read only here
            if task._cancelled:
                self._release(b)
                return
            t0 = time.monotonic()
            try:
                oks = self._cuda.dump(ptrs, [parts for parts, _, _ in b.bufs],
                                      payload_off=HEADER, stamp_off=_STAMP_OFF,
                                      event=task._snap or None)
            except Error as e:
                self._release(b)
                self._cuda_failed(b, b.idx, "kvshelf.mooncake_store: dump: %s" % e)
                return
            dt = time.monotonic() - t0
        with self._lock:  # includes the wait for the caller's event on the GPU
            self._st["dump_copy_seconds"] += dt
            self._st["dump_copy_bytes"] += sum(n for _, n, _ in b.bufs)
        keep = [j for j, ok in enumerate(oks) if ok]
        if len(keep) < len(oks):
            self._cuda_failed(b, [b.idx[j] for j, ok in enumerate(oks) if not ok],
                              "kvshelf.mooncake_store: dump: the GPU's view of the pinned staging "
                              "differs from the CPU's (view check); block not stored")
            if not keep:
                self._release(b)
                return
            for name in ("idx", "bufs", "slots", "mkeys", "sizes", "tags"):
                v = getattr(b, name)
                setattr(b, name, [v[j] for j in keep])
            ptrs = [ptrs[j] for j in keep]
            b.ptrs = ptrs
        t0 = time.monotonic()
        sums = _checksums(self._algo, [(ptrs[j] + HEADER, n) for j, (_, n, _) in enumerate(b.bufs)])
        for j, (parts, n, _) in enumerate(b.bufs):
            # the header last: its reserved word (the view-check stamp) becomes 0 again
            ctypes.memmove(ptrs[j], _HDR.pack(MAGIC, 1, self._algo, HEADER, n,
                                              _key_hash(b.mkeys[j]), sums[j], b.tags[j]), HEADER)
        dt = time.monotonic() - t0
        with self._lock:
            self._st["cuda_dumped"] += len(b.idx)
            self._st["dump_checksum_seconds"] += dt
        self._mid.put(b)

    def _transfer_get(self, b: _Batch, ptrs: list[int]) -> None:
        t0 = time.monotonic()
        try:
            r = list(self._call("batch_get_into", self._mc.batch_get_into, b.mkeys, ptrs, b.sizes))
        except Exception as e:  # noqa: BLE001
            self._release(b, retire=True)
            self._fail(b, _k.ERR_INTERNAL, "kvshelf.mooncake_store: Mooncake's batch_get_into "
                       "raised %s: %s" % (type(e).__name__, e))
            return
        with self._lock:
            self._st["get_calls"] += 1
            self._st["get_seconds"] += time.monotonic() - t0
            self._st["get_bytes"] += sum(b.sizes)
        self._mid.put((b, ptrs, r))

    def _stage2(self, item: Any) -> None:
        if isinstance(item, _Batch):
            self._finish_dump(item)
        else:
            self._finish_load(*item)

    def _finish_dump(self, b: _Batch) -> None:
        task = b.task
        msg = self._unreachable()
        if msg:
            self._release(b)
            self._fail(b, _k.ERR_CONN, msg)
            return
        ptrs = self._ptrs(b)
        # Keys whose object failed the header check on a load are written
        # with upsert (Mooncake's put keeps an existing object, so a foreign
        # or corrupted one would otherwise stay under the key for good).
        with self._lock:
            bad = [j for j, k in enumerate(b.mkeys) if k in self._bad]
        if bad and (b.zc or not hasattr(self._mc, "batch_upsert_from")):
            bad = []
        t0 = time.monotonic()
        try:
            if b.zc:  # header from staging, payload from the caller's registered memory
                if b.task._cancelled:
                    self._release(b)
                    return
                r = self._put_multi(b.mkeys, [[p] + [a for a, _ in parts] for p, (parts, _, _)
                                              in zip(ptrs, b.bufs)],
                                    [[HEADER] + [m for _, m in parts] for parts, _, _ in b.bufs])
            elif not bad:
                r = self._put("batch_put_from", b.mkeys, ptrs, b.sizes)
            else:
                badset = set(bad)
                good = [j for j in range(len(b.mkeys)) if j not in badset]
                r = [0] * len(b.mkeys)
                for sel, fn in ((good, "batch_put_from"), (bad, "batch_upsert_from")):
                    if sel:
                        rr = self._put(fn, [b.mkeys[j] for j in sel], [ptrs[j] for j in sel],
                                       [b.sizes[j] for j in sel])
                        for j, x in zip(sel, rr):
                            r[j] = x
                with self._lock:
                    self._st["rewritten"] += sum(1 for j in bad if r[j] == 0)
                    for j in bad:
                        if r[j] == 0:
                            self._bad.pop(b.mkeys[j], None)
        except Exception as e:  # noqa: BLE001
            self._release(b)
            self._fail(b, _k.ERR_INTERNAL, "kvshelf.mooncake_store: Mooncake's batch_put_from "
                       "raised %s: %s" % (type(e).__name__, e))
            return
        dt = time.monotonic() - t0
        # Mooncake has read the staging memory once the call returned.
        self._release(b)
        ok, rpc = [], 0
        for j, i in enumerate(b.idx):
            rc = r[j] if j < len(r) else -1
            if rc in (0, -705):  # stored, or already stored
                ok.append(i)
                continue
            rpc += rc in _MC_RPC
            code = _kv_code(rc, "put")
            m = ("kvshelf.mooncake_store: dump of %r: Mooncake's batch_put_from: %s, master %s"
                 % (b.mkeys[j], mc_name(rc), self.config["master_server_address"]))
            self._count_fail("dump", 1, code, m)
            task._set([i], code, m)
        if rpc:
            self._mark_down("batch_put_from: %s" % mc_name(-900))
        with self._lock:
            self._st["put_calls"] += 1
            self._st["put_seconds"] += dt
            self._st["put_bytes"] += sum(b.sizes)
            self._st["dumped"] += len(ok)
            okset = set(ok)
            self._st["dumped_bytes"] += sum(b.bufs[j][1] for j, i in enumerate(b.idx) if i in okset)
        task._set(ok, 0)

    def _put(self, fn: str, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
        call = getattr(self._mc, fn)
        if self._replicate is not None:
            r = self._call(fn, call, keys, ptrs, sizes, self._replicate)
        else:
            r = self._call(fn, call, keys, ptrs, sizes)
        r = list(r)
        return r + [-1] * (len(keys) - len(r))

    #: buffers per batch_put_from_multi_buffers call: Mooncake 0.3.13's TCP
    #: transport failed a call of 64 blocks x 97 buffers (TRANSFER_FAIL after
    #: 60 s) and moved 16 x 97 fine, so calls are cut at this many
    MULTI_MAX_SLICES = 1024

    def _put_multi(self, keys: list[str], ptrs: list[list[int]], sizes: list[list[int]]) -> list[int]:
        fn = "batch_put_from_multi_buffers"
        call = getattr(self._mc, fn)
        r: list[int] = []
        s = 0
        while s < len(keys):
            e, n = s, 0
            while e < len(keys) and (e == s or n + len(ptrs[e]) <= self.MULTI_MAX_SLICES):
                n += len(ptrs[e])
                e += 1
            args = (keys[s:e], ptrs[s:e], sizes[s:e])
            if self._replicate is not None:
                rr = self._call(fn, call, *args, self._replicate)
            else:
                rr = self._call(fn, call, *args)
            rr = list(rr)
            r.extend(rr + [-1] * (e - s - len(rr)))
            s = e
        with self._lock:
            self._st["zero_copy_puts"] += len(keys)
        return r + [-1] * (len(keys) - len(r))

    def _mark_bad(self, mkey: str) -> None:
        with self._lock:
            self._st["mismatch"] += 1
            self._bad[mkey] = None
            self._bad.move_to_end(mkey)
            while len(self._bad) > self.BAD_KEYS:
                self._bad.popitem(last=False)

    def _finish_load(self, b: _Batch, ptrs: list[int], r: list[int]) -> None:
        task = b.task
        ok, good, miss, bad, retire, rpc = [], [], [], [], False, 0
        for j, i in enumerate(b.idx):
            rc = r[j] if j < len(r) else -1
            n = b.bufs[j][1]
            if rc < 0:
                if rc not in _SAFE_GET:
                    retire = True
                rpc += rc in _MC_RPC
                code = _kv_code(rc, "get")
                if code == _k.ERR_NOT_FOUND:
                    if rc == -600:  # larger than the block: not ours
                        self._mark_bad(b.mkeys[j])
                        bad.append(i)
                    miss.append(i)
                else:
                    m = ("kvshelf.mooncake_store: load of %r: Mooncake's batch_get_into: %s, "
                         "master %s" % (b.mkeys[j], mc_name(rc),
                                        self.config["master_server_address"]))
                    self._count_fail("load", 1, code, m)
                    task._set([i], code, m)
                continue
            good.append(j)
        checked = []
        if task.cuda:
            good, _ = self._finish_load_cuda(b, ptrs, r, good, miss, bad, ok)
        t0 = time.monotonic()
        nbytes = 0
        with task._io:  # the caller's buffers are written only here
            for j in (good if not task.cuda else ()):
                i = b.idx[j]
                # the check, then the copy out while the block is still in the cache
                if not self._check(ptrs[j], r[j], b.mkeys[j], b.bufs[j][1], b.tags[j]):
                    miss.append(i)
                    bad.append(i)
                    self._mark_bad(b.mkeys[j])
                    continue
                checked.append(j)
                if not task._cancelled:
                    _scatter(ptrs[j] + HEADER, b.bufs[j][0])
                    nbytes += b.bufs[j][1]
                    ok.append(i)
        if not task.cuda:  # host blocks: the copy's time includes the check
            dt = time.monotonic() - t0
            with self._lock:
                self._st["load_copy_seconds"] += dt
                self._st["load_copy_bytes"] += nbytes
        good = checked if not task.cuda else good
        if bad:
            with task._lock:
                task._mismatch.update(bad)
        self._release(b, retire=retire)
        if retire:
            with self._lock:
                self._st["staging_retire_events"] += 1
        if rpc:
            self._mark_down("batch_get_into: %s" % mc_name(-900))
        with self._lock:
            self._st["loaded"] += len(ok)
            self._st["loaded_bytes"] += sum(b.bufs[j][1] for j in good) if ok else 0
        if miss:
            self._count_fail("load", len(miss), _k.ERR_NOT_FOUND, None)
            task._set(miss, _k.ERR_NOT_FOUND)
        task._set(ok, 0)

    def _finish_load_cuda(self, b: _Batch, ptrs: list[int], r: list[int], good: list[int],
                          miss: list[int], bad: list[int], ok: list[int]) -> tuple[list[int], list[int]]:
        """CUDA load: the header checks in staging, then one copy of the
        blocks that passed, staging -> device (kvshelf's copier). Fills miss,
        bad and ok; returns (blocks copied, blocks failed with ERR_CUDA)."""
        task = b.task
        checked = []
        t0 = time.monotonic()
        passed = self._check_many(ptrs, r, b, good)
        for j, fine in zip(good, passed):
            if not fine:
                miss.append(b.idx[j])
                bad.append(b.idx[j])
                self._mark_bad(b.mkeys[j])
                continue
            checked.append(j)
        dt = time.monotonic() - t0
        with self._lock:
            self._st["load_check_seconds"] += dt
        failed: list[int] = []
        if not checked:
            return [], failed
        with task._io:  # the caller's device memory is written only here
            if task._cancelled:
                return [], failed
            t0 = time.monotonic()
            try:
                oks = self._cuda.load([ptrs[j] for j in checked], [b.bufs[j][0] for j in checked],
                                      payload_off=HEADER, stamp_off=_STAMP_OFF)
                msg = ("kvshelf.mooncake_store: load: the GPU's view of the pinned staging differs "
                       "from the CPU's (view check); the block may be partly written")
            except Error as e:
                oks = [False] * len(checked)
                msg = "kvshelf.mooncake_store: load: %s" % e
            dt = time.monotonic() - t0
        with self._lock:
            self._st["load_copy_seconds"] += dt
            self._st["load_copy_bytes"] += sum(b.bufs[j][1] for j in checked)
        done = []
        for j, k in zip(checked, oks):
            if k:
                ok.append(b.idx[j])
                done.append(j)
            else:
                failed.append(b.idx[j])
        if failed:
            self._cuda_failed(b, failed, msg)
        with self._lock:
            self._st["cuda_loaded"] += len(done)
        return done, failed

    @staticmethod
    def _header_ok(p: int, got: int, mkey: str, n: int, tag: int) -> tuple[int, int] | None:
        """(algorithm, checksum) of the header at p if the object there (got
        bytes) says it is this key's block of n bytes, tag tag; else None."""
        if got != HEADER + n:
            return None
        magic, ver, algo, hsz, length, kh, cs, stag = _HDR.unpack(ctypes.string_at(p, HEADER))
        if (magic != MAGIC or ver != 1 or hsz != HEADER or length != n or kh != _key_hash(mkey)
                or stag != tag):
            return None
        return algo, cs

    def _check(self, p: int, got: int, mkey: str, n: int, tag: int = 0) -> bool:
        """Is the object at p (got bytes) this key's block of n bytes, tag tag?"""
        h = self._header_ok(p, got, mkey, n, tag)
        if h is None:
            return False
        want = _checksum(h[0], p + HEADER, n)
        return want is not None and want == h[1]

    def _check_many(self, ptrs: list[int], r: list[int], b: _Batch, js: list[int]) -> list[bool]:
        """``_check`` of the batch's blocks js, their checksums computed
        together (on the checksum threads when they are many bytes)."""
        heads = [self._header_ok(ptrs[j], r[j], b.mkeys[j], b.bufs[j][1], b.tags[j]) for j in js]
        out = [False] * len(js)
        for algo in {h[0] for h in heads if h is not None}:
            ks = [k for k, h in enumerate(heads) if h is not None and h[0] == algo]
            sums = _checksums(algo, [(ptrs[js[k]] + HEADER, b.bufs[js[k]][1]) for k in ks])
            for k, want in zip(ks, sums):
                out[k] = want is not None and want == heads[k][1]
        return out
