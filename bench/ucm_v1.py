#!/usr/bin/env python3
"""UCM V1 stores side by side, driven the way UCM 0.8's vLLM connector drives
them: kvshelf's ``UcmKVShelfStoreV1`` against UCM's own host stores
(``UcmPipelineStore`` with ``Cache|Empty`` on its shared buffer, and
``Cache|Posix``), all created through UCM's V1 factory from the dict UCM's
``_create_store`` builds, with UCM's own arguments.

Modes (``use_layerwise`` in UCM's launch config):
  layerwise  UCMLayerWiseConnector: save_kv_layer -> one dump_data per layer
             (shard index = layer, addresses of that layer's K and V of every
             block, its own CUDA event recorded on the current stream as
             prerequisite_handle), the tasks waited in wait_for_save /
             get_finished; start_load_kv -> load_data of layer 0, then
             wait_for_layer_load(L) waits layer L and only then issues the
             load_data of layer L+1.
  direct     UCMDirectConnector: one dump_data per step (every layer's K and V
             of a block in one row, shard 0) + wait; one load_data + wait.
Before the load, lookup_on_prefix (get_num_new_matched_tokens) must find every
block. After it, the loaded blocks are compared with the dumped ones.

Geometry (default): Qwen2.5-14B, 48 layers, 8 KV heads, head dim 128, bf16,
16-token blocks, per layer a vLLM tensor [2, num_blocks, 16, 8, 128]; 8k and
32k tokens. Dump and load GB/s are printed beside the pinned-copy ceiling
measured in the same run (one cudaMemcpy of the same bytes between the GPU
and pinned host memory, D2H for dumps, H2D for loads).

On the GPU machine (no package index; carry UCM's wheel as a file):
    python3 bench/ucm_v1.py --ucm-wheel uc_manager_cuda_cu130-0.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
(kvshelf must be importable: `pip install ./` there, or PYTHONPATH to a build.)
CPU smoke test (tiny sizes, host tensors; UCM's native stores cannot move data
without a CUDA device -- with device_id -1 they answer "transfer is not
enable" -- so only kvshelf's rows have numbers there):
    python3 bench/ucm_v1.py --smoke --device cpu
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover
    sys.exit("bench/ucm_v1.py needs torch (UCM's ucmstore_v1 imports it too)")

ALIGN = 4096  # UCM's _get_store_io_sizes pads shard_size to 4 KiB


def load_ucm(wheel: str | None) -> str:
    """Makes `ucm` importable: already installed, or unpacked from its wheel."""
    if wheel:
        dest = Path(os.environ.get("KVSHELF_UCM_UNPACK") or
                    Path(tempfile.gettempdir()) / ("ucm-" + Path(wheel).stem))
        if not (dest / "ucm" / "__init__.py").exists():
            tmp = Path(str(dest) + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            with zipfile.ZipFile(wheel) as z:
                z.extractall(tmp)
            tmp.rename(dest)
        sys.path.insert(0, str(dest))
    import importlib.metadata as md

    import ucm  # noqa: F401

    for dist in ("uc-manager-cuda-cu130", "uc-manager-cuda-cu129"):
        try:
            return f"{dist} {md.version(dist)}"
        except md.PackageNotFoundError:
            continue
    return "ucm (version unknown)"


class Layout:
    """The arithmetic of UCM 0.8.1's KVCacheLayout (ucm_connector.py) for
    vLLM tensors [2, num_blocks, ...] (K/V first): one K and one V tensor per
    layer; bytes_per_block = prod(shape[1:]) * element size of kv[i]."""

    def __init__(self, kv_layers, layerwise: bool):
        self.layerwise = layerwise
        rows = []
        for kv in kv_layers:
            row = []
            for half in (kv[0], kv[1]):
                bpb = int(np.prod(half.shape[1:])) * half.element_size()
                row.append((int(half[0].data_ptr()), bpb, int(half.shape[0]) * bpb))
            rows.append(row)
        if layerwise:
            self.base = np.array([[r[0] for r in row] for row in rows], dtype=np.uint64)
            self.sizes = np.array([[r[1] for r in row] for row in rows], dtype=np.uint64)
        else:
            flat = [r for row in rows for r in row]
            self.base = np.array([r[0] for r in flat], dtype=np.uint64)
            self.sizes = np.array([r[1] for r in flat], dtype=np.uint64)
        self.buffers = sorted({(r[0], r[2]) for row in rows for r in row})

    @property
    def tensor_size_list(self) -> list:
        return self.sizes[0].tolist() if self.layerwise else self.sizes.reshape(-1).tolist()

    @property
    def shard_size(self) -> int:
        return int(self.sizes[0].sum() if self.layerwise else self.sizes.sum())

    @property
    def block_size(self) -> int:
        return int(self.sizes.sum())

    def addrs(self, blocks) -> np.ndarray:
        """extract_block_addrs: layerwise (layer_first=True) -> (layers, n, 2);
        direct -> (n, 2*layers)."""
        b = np.array(blocks, np.uint64)
        if self.layerwise:
            return self.sizes[:, None, :] * b[None, :, None] + self.base[:, None, :]
        return b[:, None] * self.sizes[None, :] + self.base[None, :]


def store_config(user: dict, layout: Layout, device_id: int, unique_id: str) -> dict:
    """The worker-side dict of UCMDirectConnector._create_store (UCM 0.8.1)."""
    cfg = copy.deepcopy(user)
    cfg.setdefault("share_buffer_enable", False)  # is_mla: False for Qwen
    if isinstance(cfg.get("storage_backends"), str):
        cfg["storage_backends"] = cfg["storage_backends"].split(":")
    cfg["unique_id"] = unique_id
    cfg["tensor_layout"] = "gqa"
    cfg["device_id"] = device_id
    shard = (layout.shard_size + ALIGN - 1) // ALIGN * ALIGN
    cfg["tensor_size_list"] = layout.tensor_size_list
    cfg["shard_size"] = shard
    cfg["block_size"] = shard * (layout.block_size // layout.shard_size)
    cfg["local_rank_size"] = 1
    cfg["gpu_kv_buffer_addrs"] = [a for a, _ in layout.buffers]
    cfg["gpu_kv_buffer_sizes"] = [s for _, s in layout.buffers]
    cfg["posix_gc_enable"] = False
    return cfg


def gbps(nbytes: int, sec: float) -> float:
    return nbytes / sec / 1e9 if sec > 0 else float("inf")


class Runner:
    def __init__(self, args):
        self.a = args
        self.cuda = args.device == "cuda"
        self.dev = torch.device("cuda:0" if self.cuda else "cpu")
        self.dtype = getattr(torch, args.dtype)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def event(self) -> tuple:
        """UCM's CudaDevice.get_event_handle: an event recorded on the current stream."""
        if not self.cuda:
            return None, 0
        ev = torch.cuda.Event(enable_timing=False)
        ev.record(torch.cuda.current_stream())
        return ev, int(ev.cuda_event)

    def ceiling(self, nbytes: int) -> tuple:
        """(D2H, H2D) GB/s of one copy of nbytes between device and pinned host memory."""
        reps = 3
        if not self.cuda:
            a = torch.empty(nbytes, dtype=torch.uint8)
            b = torch.empty_like(a)
            a.fill_(1)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                b.copy_(a)
                ts.append(time.perf_counter() - t0)
            g = gbps(nbytes, min(ts))
            return g, g
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        devb = torch.empty(nbytes, dtype=torch.uint8, device=self.dev)
        devb.fill_(1)
        host.fill_(2)
        out = []
        for src, dst in ((devb, host), (host, devb)):
            ts = []
            for _ in range(reps):
                self.sync()
                t0 = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                self.sync()
                ts.append(time.perf_counter() - t0)
            out.append(gbps(nbytes, min(ts)))
        del host, devb
        return tuple(out)

    # one measurement: dump n blocks, lookup, load them into other blocks, compare
    def once(self, store, kv, layout: Layout, n: int, first_dst: int):
        L = len(kv)
        src = list(range(1, n + 1))  # vLLM's block 0 is its null block
        dst = list(range(first_dst, first_dst + n))
        ids = [secrets.token_bytes(16) for _ in range(n)]
        a_src, a_dst = layout.addrs(src), layout.addrs(dst)
        nbytes = n * layout.block_size
        events = []
        self.sync()
        t0 = time.perf_counter()
        submit = 0.0
        if layout.layerwise:
            tasks = []
            dtr = self.dump_trace = []  # per layer: CLOCK_MONOTONIC ns at the call and its return
            for layer in range(L):
                ev, h = self.event()
                events.append(ev)
                rows = np.ascontiguousarray(a_src[layer])
                s0 = time.perf_counter()
                c0 = time.monotonic_ns()
                tasks.append(store.dump_data(ids, [layer] * n, rows, h))
                dtr.append((c0, time.monotonic_ns()))
                submit += time.perf_counter() - s0
            for t in tasks:
                store.wait(t)
            dtr.append((time.monotonic_ns(), 0))  # every wait returned
        else:
            ev, h = self.event()
            events.append(ev)
            store.wait(store.dump_data(ids, [0] * n, a_src.reshape(n, -1), h))
        t_dump = time.perf_counter() - t0
        hits = store.lookup_on_prefix(ids) + 1
        for t in kv:
            t[:, dst] = 0
        self.sync()
        t0 = time.perf_counter()
        lsubmit = 0.0
        if layout.layerwise:
            tr = self.trace = []  # per layer: CLOCK_MONOTONIC ns at the call, its return, the wait's return
            s0 = time.perf_counter()
            c0 = time.monotonic_ns()
            task = store.load_data(ids, [0] * n, a_dst[0])
            lsubmit += time.perf_counter() - s0
            for layer in range(L):
                c1 = time.monotonic_ns()
                store.wait(task)  # wait_for_layer_load(layer) ...
                tr.append((c0, c1, time.monotonic_ns()))
                if layer + 1 < L:  # ... then the next layer's load
                    s0 = time.perf_counter()
                    c0 = time.monotonic_ns()
                    task = store.load_data(ids, [layer + 1] * n, a_dst[layer + 1])
                    lsubmit += time.perf_counter() - s0
        else:
            store.wait(store.load_data(ids, [0] * n, a_dst.reshape(n, -1)))
        self.sync()
        t_load = time.perf_counter() - t0
        exact = all(torch.equal(t[:, dst], t[:, src]) for t in kv)
        calls = L if layout.layerwise else 1
        return (gbps(nbytes, t_dump), gbps(nbytes, t_load), hits, exact, nbytes,
                1e6 * submit / calls, 1e6 * lsubmit / calls, 1e6 * t_load / calls)


STORE_ENV = {"kvshelf-noahead": {"KVSHELF_READAHEAD_MB": "0"}}

STORES = {
    "kvshelf": ("UcmKVShelfStore", lambda a: dict({"master_server_address": "", "runtime_dir": a.runtime_dir,
                                                    "global_segment_size": a.pool_size}, **a.kvshelf_config)),
    # the same store with the CUDA read-ahead of layerwise loads off (its
    # connector reads KVSHELF_READAHEAD_MB when it opens: at the first call)
    "kvshelf-noahead": ("UcmKVShelfStore", lambda a: STORES["kvshelf"][1](a)),
    "cache-empty": ("UcmPipelineStore", lambda a: {"store_pipeline": "Cache|Empty", "share_buffer_enable": True,
                                                    "cache_buffer_capacity_gb": a.cache_gb}),
    "cache-posix": ("UcmPipelineStore", lambda a: {"store_pipeline": "Cache|Posix", "share_buffer_enable": True,
                                                    "cache_buffer_capacity_gb": a.cache_gb,
                                                    "storage_backends": a.posix_dir}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ucm-wheel", help="UCM's wheel (uc_manager_cuda_cu130-0.8.1-...whl), unpacked and used")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", default="8192,32768")
    p.add_argument("--modes", default="layerwise,direct")
    p.add_argument("--trace", help="append the host times of the last repetition's layer loads and dumps to "
                                   "this file (with KVSHELF_READAHEAD_TRACE=1 and KVSHELF_READAHEAD_TRACE_FILE: "
                                   "the read-ahead buffers' GPU times; with KVSHELF_PARTS_TRACE_FILE: every "
                                   "parts copy's host times; same clock)")
    p.add_argument("--stores", default="kvshelf,kvshelf-noahead,cache-empty,cache-posix",
                   help="contenders (kvshelf-noahead: kvshelf with KVSHELF_READAHEAD_MB=0)")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pool-size", default=None, help="kvshelf pool (default: 3x the largest run)")
    p.add_argument("--cache-gb", type=int, default=None, help="UCM Cache buffer GB (default: 2x the largest run)")
    p.add_argument("--runtime-dir", default=None, help="kvshelf runtime dir (default: a new temporary one)")
    p.add_argument("--posix-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: 2 layers, 2 heads, head dim 16, 64/128 tokens")
    p.add_argument("--kvshelf-config", default="{}", help="more keys for kvshelf's ucm_connector_config (JSON)")
    p.add_argument("--label", default="", help="a name for this run in the rows (e.g. the settings tried)")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if a.smoke:
        a.layers, a.kv_heads, a.head_dim, a.repeats = 2, 2, 16, 2
        if a.tokens == "8192,32768":
            a.tokens = "64,128"
    a.kvshelf_config = json.loads(a.kvshelf_config)
    tokens = [int(x) for x in a.tokens.split(",")]
    modes = a.modes.split(",")
    stores = a.stores.split(",")
    ucm_version = load_ucm(a.ucm_wheel)
    import kvshelf
    import kvshelf.ucm  # noqa: F401  registers UcmKVShelfStore with UCM's V1 factory
    from ucm.store.factory_v1 import UcmConnectorFactoryV1

    r = Runner(a)
    n_max = max(tokens) // a.block
    block_bytes = a.layers * 2 * a.block * a.kv_heads * a.head_dim * torch.tensor([], dtype=r.dtype).element_size()
    kv_max = n_max * block_bytes
    own_rt = a.runtime_dir is None
    a.runtime_dir = a.runtime_dir or tempfile.mkdtemp(prefix="kvshelf-ucmbench-")
    a.pool_size = a.pool_size or str(max(64 << 20, 3 * kv_max + (64 << 20)))
    a.cache_gb = a.cache_gb or max(1, -(-2 * kv_max // (1 << 30)))
    own_posix = a.posix_dir is None
    a.posix_dir = a.posix_dir or tempfile.mkdtemp(prefix="ucm-posix-")
    os.makedirs(a.posix_dir, exist_ok=True)
    num_blocks = 2 * n_max + 2
    kv = [torch.randn(2, num_blocks, a.block, a.kv_heads, a.head_dim, device=r.dev).to(r.dtype)
          for _ in range(a.layers)]
    print(f"# {ucm_version}; kvshelf {kvshelf.__version__}; torch {torch.__version__}; device "
          f"{torch.cuda.get_device_name(0) if r.cuda else 'cpu'}")
    if a.label or a.kvshelf_config:
        print(f"# run {a.label!r}: kvshelf config {a.kvshelf_config}; KVSHELF_CONNECTOR_JOB_MB="
              f"{os.environ.get('KVSHELF_CONNECTOR_JOB_MB', '(default)')}")
    print(f"# {a.layers} layers x [2, {num_blocks}, {a.block}, {a.kv_heads}, {a.head_dim}] {a.dtype}; "
          f"{block_bytes} bytes per 16-token block (all layers); median of {a.repeats}")
    ceil = {t: r.ceiling((t // a.block) * block_bytes) for t in tokens}
    for t in tokens:
        print(f"# ceiling {t} tokens ({(t // a.block) * block_bytes / 1e9:.3f} GB): "
              f"D2H {ceil[t][0]:.1f} GB/s, H2D {ceil[t][1]:.1f} GB/s"
              + (" (pinned cudaMemcpy)" if r.cuda else " (host memcpy)"))
    hdr = f"{'store':<15} {'mode':<10} {'tokens':>6} {'dump GB/s':>10} {'%ceil':>6} {'load GB/s':>10} {'%ceil':>6} {'hits':>6}  check"
    print(hdr)
    rows = []
    for name in stores:
        factory_name, user = STORES[name]
        saved_env = {k: os.environ.get(k) for k in STORE_ENV.get(name, {})}
        os.environ.update(STORE_ENV.get(name, {}))
        for mode in modes:
            layout = Layout(kv, mode == "layerwise")
            cfg = store_config(user(a), layout, 0 if r.cuda else -1, "bench-" + secrets.token_hex(4))
            try:
                store = UcmConnectorFactoryV1.create_connector(factory_name, cfg)
            except Exception as e:
                if not r.cuda and name != "kvshelf":
                    print(f"{name:<15} {mode:<10} unavailable without a CUDA device: creation failed: "
                          f"{type(e).__name__}: {e}")
                else:
                    print(f"{name:<15} {mode:<10} FAILED to create: {type(e).__name__}: {e}")
                rows.append({"store": name, "mode": mode, "error": str(e)})
                continue
            try:
                for t in tokens:
                    n = t // a.block
                    res = []
                    err = None
                    for _ in range(a.repeats):
                        try:
                            res.append(r.once(store, kv, layout, n, n_max + 1))
                        except Exception as e:
                            err = e
                            break
                    if err is not None:
                        msg = f"{type(err).__name__}: {err}"
                        if not r.cuda and name != "kvshelf":
                            print(f"{name:<15} {mode:<10} {t:>6} unavailable without a CUDA device: {msg}")
                        else:
                            print(f"{name:<15} {mode:<10} {t:>6} FAILED: {msg}")
                        rows.append({"store": name, "mode": mode, "tokens": t, "error": msg})
                        break
                    d = statistics.median(x[0] for x in res)
                    lo = statistics.median(x[1] for x in res)
                    hits = min(x[2] for x in res)
                    exact = all(x[3] for x in res)
                    check = "exact" if exact else "MISMATCH"
                    if hits != n:
                        check += f" (lookup found {hits} of {n})"
                    print(f"{name:<15} {mode:<10} {t:>6} {d:>10.2f} {100 * d / ceil[t][0]:>5.0f}% "
                          f"{lo:>10.2f} {100 * lo / ceil[t][1]:>5.0f}% {hits:>6}  {check}")
                    us = [statistics.median(x[k] for x in res) for k in (5, 6, 7)]
                    if layout.layerwise:
                        print(f"{'':<15} {'':<10} {'':>6} per layer call: dump_data {us[0]:.0f} us, "
                              f"load_data {us[1]:.0f} us, load (submit to wait) {us[2]:.0f} us; "
                              f"{n * layout.shard_size / 1e6:.1f} MB a layer")
                    if a.trace and layout.layerwise and getattr(r, "trace", None):
                        with open(a.trace, "a") as f:  # the last repetition's layer loads
                            f.write(f"# {name} {mode} {t} tokens: layer load_data_call load_data_return "
                                    f"wait_return (CLOCK_MONOTONIC ns)\n")
                            for i, x in enumerate(r.trace):
                                f.write(f"{i} {x[0]} {x[1]} {x[2]}\n")
                            f.write(f"# {name} {mode} {t} tokens: layer dump_data_call dump_data_return "
                                    f"(last row: all waits returned) (CLOCK_MONOTONIC ns)\n")
                            for i, x in enumerate(getattr(r, "dump_trace", [])):
                                f.write(f"{i} {x[0]} {x[1]}\n")
                    rows.append({"store": name, "label": a.label, "mode": mode, "tokens": t, "dump_gbps": d,
                                 "load_gbps": lo, "ceiling_d2h": ceil[t][0], "ceiling_h2d": ceil[t][1],
                                 "hits": hits, "blocks": n, "exact": exact, "dump_submit_us": us[0],
                                 "load_submit_us": us[1], "load_us_per_call": us[2]})
            finally:
                conns = getattr(store, "_conns", None)
                if conns:  # kvshelf: how many layer loads came from the CUDA read-ahead
                    k = [c.counters() for c in conns.values()]
                    print(f"{'':<15} {mode:<10} kvshelf counters: loaded {sum(x['loaded_blocks'] for x in k)} "
                          f"(block stripes), from read-ahead {sum(x.get('readahead_stripes', 0) for x in k)}")
                shutdown = getattr(store, "shutdown", None)
                if shutdown:
                    shutdown()
                del store
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if a.json:
        Path(a.json).write_text(json.dumps({"ucm": ucm_version, "rows": rows}, indent=1))
    if own_rt:
        kvshelf.stop_pool(a.runtime_dir)
        shutil.rmtree(a.runtime_dir, ignore_errors=True)
    if own_posix:
        shutil.rmtree(a.posix_dir, ignore_errors=True)
    bad = [x for x in rows if x.get("exact") is False or (x["store"].startswith("kvshelf") and "error" in x)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
