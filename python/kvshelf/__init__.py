"""kvshelf: KV-cache offload store for LLM inference (Python package).

The work is done by libkvshelf through the C extension ``kvshelf._kvshelf``;
this package adds thin adapters:

- :class:`Client` – the store client (put/get/batch/exists/remove, zero copy);
- :class:`Connector` – the KV connector (register_layout, lookup, dump, load,
  Task.wait/check/results);
- :mod:`kvshelf.ucm` – drop-in stores for unified-cache-management
  (``UcmMooncakeStore`` legacy interface and ``UcmKVStoreBaseV1``);
- :mod:`kvshelf.vllm` – a vLLM ``KVConnectorBase_V1`` (``KVShelfConnector``).

Configuration uses Mooncake's keys (``local_hostname``, ``metadata_server``,
``master_server_address``, ``protocol``, ``device_name``,
``global_segment_size``, ``local_buffer_size``) plus ``secret``,
``timeout_ms`` and ``runtime_dir``. With no ``master_server_address`` every
process of the host shares one embedded pool, started on first use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Iterable, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))


def _find_bin() -> str | None:
    """The kvshelf command shipped in the package, else one on PATH."""
    cand = os.path.join(_HERE, "bin", "kvshelf")
    if os.path.isfile(cand) and os.access(cand, os.X_OK):
        return cand
    return shutil.which("kvshelf")


# The embedded pool spawns `kvshelf master --embedded`: point the library at
# the binary installed inside this package unless the user chose another.
if not os.environ.get("KVSHELF_BIN"):
    _b = os.path.join(_HERE, "bin", "kvshelf")
    if os.path.isfile(_b):
        os.environ["KVSHELF_BIN"] = _b

from ._kvshelf import (  # noqa: E402
    DEFAULTS,
    HASH_MAX,
    KEY_MAX,
    AuthError,
    Busy,
    Client,
    Closed,
    ConfigError,
    ConnectionFailed,
    Connector,
    Corrupt,
    CudaError,
    Error,
    Exists,
    InternalError,
    InvalidArgument,
    IOFailure,
    LayoutError,
    NoMemory,
    NoSpace,
    NotFound,
    NotRegistered,
    ProtocolError,
    Task,
    Timeout,
    TooLarge,
    Unavailable,
    Unsupported,
    __version__,
    errname,
    load_config,
    parse_size,
    strerror,
)

#: Mooncake / kvshelf configuration keys the C library accepts.
CONFIG_KEYS = (
    "local_hostname",
    "metadata_server",
    "master_server_address",
    "protocol",
    "device_name",
    "global_segment_size",
    "local_buffer_size",
    "secret",
    "timeout_ms",
    "runtime_dir",
)


def store_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The kvshelf keys of ``config``: drops keys that only an adapter uses
    (UCM adds ``kv_block_size``, ``io_size``, ``device``, ``role`` ... to the
    dict it hands a store) and ``None`` values (Mooncake's loader treats a
    missing key as its default)."""
    if not config:
        return {}
    return {k: v for k, v in config.items() if k in CONFIG_KEYS and v is not None}


def layout_from_tensor(t: Any, block_dim: int = 0) -> tuple[int, int, int, int, int]:
    """(base, block_stride, chunk_bytes, chunk_stride, count) of a KV tensor
    whose dimension ``block_dim`` indexes blocks and where everything after
    that dimension is one contiguous block ("NHD" per block), e.g. a vLLM
    K or V cache ``[num_blocks, block_size, heads, head_dim]`` or an MLA cache
    ``[num_blocks, block_size, dim]``. Dimensions before ``block_dim`` (such as
    vLLM's leading K/V dimension of 2) become chunks: a tensor
    ``[2, num_blocks, ...]`` with ``block_dim=1`` gives count=2 chunks (K and
    V) per block. Works from strides, so non-contiguous views are fine as
    long as each block's inner part is contiguous. Accepts torch tensors and
    numpy arrays."""
    shape = tuple(t.shape)
    if callable(getattr(t, "stride", None)):  # torch
        stride = tuple(t.stride())
        es = t.element_size()
        base = int(t.data_ptr())
    else:  # numpy (strides in bytes)
        es = int(t.itemsize)
        stride = tuple(int(x) // es for x in t.strides)
        base = int(t.ctypes.data)
    if not 0 <= block_dim < len(shape):
        raise ValueError(f"block_dim {block_dim} out of range for shape {shape}")
    # The dimensions after block_dim must tile one dense region, in any order
    # (a permuted view such as vLLM's HND layout is fine: bytes are moved as
    # they lie in memory, and loaded back into the same layout).
    inner = 1
    expect = 1
    for size, st in sorted(((shape[d], stride[d]) for d in range(block_dim + 1, len(shape))),
                           key=lambda x: x[1]):
        if size == 1:
            continue
        if st != expect:
            raise ValueError(
                f"tensor of shape {shape} strides {stride}: the part of a block after "
                f"dimension {block_dim} is not contiguous"
            )
        expect *= size
        inner *= size
    chunk_bytes = inner * es
    count = 1
    chunk_stride = chunk_bytes
    outer = shape[:block_dim]
    if outer:
        if len([s for s in outer if s != 1]) > 1:
            raise ValueError(f"at most one dimension may come before the block dimension: {shape}")
        for d in range(block_dim):
            if shape[d] != 1:
                count = shape[d]
                chunk_stride = stride[d] * es
    return (base, int(stride[block_dim] * es), int(chunk_bytes), int(chunk_stride), int(count))


def runtime_dir(config: dict[str, Any] | None = None) -> str:
    """The runtime directory of the embedded pool for ``config``."""
    return load_config(store_config(config) or None)["runtime_dir"]


def stop_pool(runtime_dir: str | None = None, timeout: float = 10.0) -> bool:
    """Stops the embedded pool of ``runtime_dir`` (default: the configured
    one) with ``kvshelf stop``. Returns True if the command succeeded."""
    exe = os.environ.get("KVSHELF_BIN") or _find_bin()
    if not exe:
        return False
    cmd = [exe, "stop"]
    env = dict(os.environ)
    if runtime_dir:
        env["KVSHELF_RUNTIME_DIR"] = runtime_dir
    try:
        r = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def raise_for_status(code: int, what: str) -> None:
    """Raises the kvshelf exception of a negative status code."""
    if code >= 0:
        return
    import kvshelf._kvshelf as _m

    for name in dir(_m):
        cls = getattr(_m, name)
        if isinstance(cls, type) and issubclass(cls, Error) and getattr(cls, "code", None) == code:
            raise cls(f"{what}: {errname(code)}: {strerror(code)}")
    raise Error(f"{what}: {errname(code)}: {strerror(code)}")


__all__ = [
    "AuthError",
    "Busy",
    "CONFIG_KEYS",
    "Client",
    "Closed",
    "ConfigError",
    "ConnectionFailed",
    "Connector",
    "Corrupt",
    "CudaError",
    "DEFAULTS",
    "Error",
    "Exists",
    "HASH_MAX",
    "IOFailure",
    "InternalError",
    "InvalidArgument",
    "KEY_MAX",
    "LayoutError",
    "NoMemory",
    "NoSpace",
    "NotFound",
    "NotRegistered",
    "ProtocolError",
    "Task",
    "Timeout",
    "TooLarge",
    "Unavailable",
    "Unsupported",
    "__version__",
    "errname",
    "layout_from_tensor",
    "load_config",
    "parse_size",
    "raise_for_status",
    "runtime_dir",
    "stop_pool",
    "store_config",
    "strerror",
]

# Typing helpers for adapters.
Keys = Sequence[bytes | str]
Ints = Iterable[int]
