#!/usr/bin/env python3
"""kvshelf over Mooncake against Mooncake's own batch calls and UCM's own
UcmMooncakeStore, same bytes, same mooncake_master, one run (issue 16).

    sudo python3 bench/mooncake_bench.py [--reps 5] [--tokens 8192] [--json OUT]

Geometry: Qwen2.5-14B (48 layers, 8 KV heads, head dim 128, bf16), 16-token
blocks: 8k tokens = 512 blocks of 3 MiB of KV (all layers of a block), one
Mooncake object per block (as kvshelf's vLLM connector stores them; UCM's
store is given the same 512 block tensors).

Contenders, each moving the 512 blocks into the pool (dump) and back into
other host memory (load), the bytes checked after every load:

- ``mooncake``: Mooncake's own ``batch_put_from`` / ``batch_get_into`` from and
  into registered memory (``register_buffer`` of the source and destination
  tensors), batches of 64 blocks (kvshelf's batch size); ``mooncake-1call``:
  the same, all blocks in one call each way. The ceiling of a direction is
  the better of the two (the ratios' reference);
- ``kvshelf``: ``kvshelf.mooncake_store.MooncakeBlockStore`` ``dump``/``load``
  of the 512 block tensors (host tensors, one part per block), one task each
  way: every block copied into registered staging memory behind its 64-byte
  header (XXH3 checksum) and put with ``batch_put_from``; loads land in
  staging, are checked (header, checksum) and only then copied out;
- ``kvshelf-zc``: the same with the source tensor registered
  (``MooncakeBlockStore.register_memory``): dumps write only the headers to
  staging and Mooncake reads the payload in place
  (``batch_put_from_multi_buffers``); loads as above;
- ``kvshelf-vllm``: the same through the vLLM connector's adapter
  (``kvshelf.vllm_mooncake.MooncakeConnector``) over vLLM's per-layer KV layout
  (48 tensors ``[2, 512, 16, 8, 128]`` carved from the same memory: 96 parts
  of 32 KiB gathered per block, staged);
- ``mooncake-slots`` (only with ``--only``): Mooncake's own calls on the objects
  kvshelf writes (64-byte header + block in 4 KiB-aligned slots), from
  registered memory: Mooncake's rate for those objects without kvshelf's copies;
- ``ucm``: UCM 0.8.1's own ``ucm.store.mooncakestore.mooncake_connector.
  UcmMooncakeStore`` (the seed's connector), ``dump``/``load`` + ``wait`` of the
  512 block tensors.

Placement: the pool's memory is a segment of a separate ``mooncake_client``
process (``--global_segment_size``), so every contender moves its bytes to
and from another process over Mooncake's TCP transport (loopback veth in a
network namespace the bench makes); the clients of the bench give the pool no
memory (``global_segment_size`` 0). Contenders alternate (the order rotates
every repetition); every rate is the median of ``--reps`` (GB/s = 1e9 bytes/s
of KV payload; wall time from the call to the last block done), after one
warm-up round of every contender (not counted). Pool emptied
(``remove_all``) between contenders.

Needs root (ip netns), Mooncake from PyPI (tests/integration/mooncake_env.py)
and UCM's venv with Mooncake's cp312 wheel (tests/python/ucm_env.py,
tests/python/test_ucm_mooncake.py provision them); ``--no-ucm`` runs without.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "python"))

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_TOKENS, ELEM = 48, 8, 128, 16, 2
CHUNK = BLOCK_TOKENS * KV_HEADS * HEAD_DIM * ELEM  # 32 KiB: K or V of one layer, one block
BLOCK_BYTES = LAYERS * 2 * CHUNK  # 3 MiB
BATCH = 64


# ================================================================= child
def _child(ctx: dict) -> dict:
    import numpy as np
    import torch

    sys.path.append(ctx["mc_site"])
    import kvshelf

    src_dir = str(REPO / "python" / "kvshelf")
    if src_dir not in kvshelf.__path__:  # this tree's Python sources over the installed extension
        kvshelf.__path__.insert(0, src_dir)
    from kvshelf import mooncake_store as ms
    from kvshelf import vllm_mooncake as vmc
    from mooncake.store import MooncakeDistributedStore

    nb = ctx["blocks"]
    reps = ctx["reps"]
    cfg = dict(ctx["config"])
    total = nb * BLOCK_BYTES
    gen = torch.Generator().manual_seed(1)
    # the KV of nb blocks: row i = block i (all layers), bf16 values
    src = torch.randint(-30000, 30000, (nb, BLOCK_BYTES // 2), dtype=torch.int16, generator=gen)
    dst = torch.zeros_like(src)
    src_blocks = [src[i] for i in range(nb)]
    dst_blocks = [dst[i] for i in range(nb)]
    # vLLM's per-layer layout [2, nb, 16, 8, 128] bf16 (K and V of a layer), carved from the same
    # memory (the same bytes, another mapping of bytes to blocks: 96 parts of 32 KiB per block)
    per_layer = 2 * nb * CHUNK // 2  # int16 elements

    def layers(t):
        flat = t.view(-1)
        return [flat[i * per_layer:(i + 1) * per_layer].view(torch.bfloat16)
                .view(2, nb, BLOCK_TOKENS, KV_HEADS, HEAD_DIM) for i in range(LAYERS)]
    kv_src, kv_dst = layers(src), layers(dst)

    def mc_setup():
        mc = MooncakeDistributedStore()
        rc = mc.setup(cfg["local_hostname"], cfg["metadata_server"], 0,
                      kvshelf.parse_size(cfg["local_buffer_size"]), "tcp", "", cfg["master_server_address"])
        assert rc == 0, rc
        return mc

    admin = mc_setup()

    def empty_pool():
        """Removes every object (force: read leases are not waited out)."""
        admin.remove_all(True)

    def check(a, b, what):
        if not torch.equal(a.view(torch.int16), b.view(torch.int16)):  # bits: bf16 NaNs are != 
            raise AssertionError("%s: the loaded bytes differ from the stored ones" % what)

    # ---------------------------------------------------------------- (a)
    mc = mc_setup()
    for t in (src, dst):
        assert mc.register_buffer(t.data_ptr(), t.numel() * 2) == 0

    def mooncake_runner(batch, tag):
        def run_mooncake(r):
            keys = ["%s-%d-%d" % (tag, r, i) for i in range(nb)]
            dst.zero_()
            t0 = time.perf_counter()
            for s in range(0, nb, batch):
                k = keys[s:s + batch]
                st = mc.batch_put_from(k, [src_blocks[i].data_ptr() for i in range(s, s + len(k))],
                                       [BLOCK_BYTES] * len(k))
                assert all(x == 0 for x in st), st
            t1 = time.perf_counter()
            for s in range(0, nb, batch):
                k = keys[s:s + batch]
                st = mc.batch_get_into(k, [dst_blocks[i].data_ptr() for i in range(s, s + len(k))],
                                       [BLOCK_BYTES] * len(k))
                assert all(x == BLOCK_BYTES for x in st), st
            t2 = time.perf_counter()
            check(src, dst, "mooncake")
            return t1 - t0, t2 - t1
        return run_mooncake

    # (a') the objects kvshelf writes (64-byte header + block, in 4 KiB-aligned slots), put
    # straight from registered memory: Mooncake's rate for those sizes, without kvshelf's copies
    slots = None
    if ctx.get("only") and "mooncake-slots" in ctx["only"]:
        slot = ms._slot(BLOCK_BYTES)
        slots = torch.zeros(nb * slot // 2, dtype=torch.int16)
        for i in range(nb):
            slots.view(torch.uint8)[i * slot + ms.HEADER:i * slot + ms.HEADER + BLOCK_BYTES].copy_(
                src_blocks[i].view(torch.uint8))
        assert mc.register_buffer(slots.data_ptr(), slots.numel() * 2) == 0

    def run_slots(r):
        keys = ["ms-%d-%d" % (r, i) for i in range(nb)]
        slot = ms._slot(BLOCK_BYTES)
        base = slots.data_ptr()
        t0 = time.perf_counter()
        for s0 in range(0, nb, BATCH):
            k = keys[s0:s0 + BATCH]
            st = mc.batch_put_from(k, [base + i * slot for i in range(s0, s0 + len(k))],
                                   [BLOCK_BYTES + ms.HEADER] * len(k))
            assert all(x == 0 for x in st), st
        t1 = time.perf_counter()
        for s0 in range(0, nb, BATCH):
            k = keys[s0:s0 + BATCH]
            st = mc.batch_get_into(k, [base + i * slot for i in range(s0, s0 + len(k))],
                                   [BLOCK_BYTES + ms.HEADER] * len(k))
            assert all(x == BLOCK_BYTES + ms.HEADER for x in st), st
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    # ---------------------------------------------------------------- (b)
    store = ms.MooncakeBlockStore(dict(cfg, global_segment_size=0, batch_size=BATCH,
                                       staging_size=ctx["staging"]))
    zstore = None
    if not ctx.get("only") or "kvshelf-zc" in ctx["only"]:
        zstore = ms.MooncakeBlockStore(dict(cfg, global_segment_size=0, batch_size=BATCH,
                                            staging_size=ctx["staging"]))
        zstore.register_memory(src)  # zero-copy dumps: headers staged, payload read in place

    def kvshelf_runner(st, tag):
        def run_kvshelf(r):
            keys = [b"%s-%d-%d" % (tag, r, i) for i in range(nb)]
            dst.zero_()
            t0 = time.perf_counter()
            t = st.dump(keys, src_blocks)
            res = st.wait(t, 600)
            t1 = time.perf_counter()
            assert res == [0] * nb, (t.error, res[:8])
            t = st.load(keys, dst_blocks)
            res = st.wait(t, 600)
            t2 = time.perf_counter()
            assert res == [0] * nb, (t.error, res[:8])
            check(src, dst, tag.decode())
            return t1 - t0, t2 - t1
        return run_kvshelf

    # ---------------------------------------------------------------- (b2)
    # the connectors of two engines' KV caches (one Mooncake client: the same configuration)
    vcfg = dict(cfg, global_segment_size=0, batch_size=BATCH, staging_size=ctx["staging"])
    conn = vmc.MooncakeConnector(vcfg, device=-2, namespace="bench", rank=0, world_size=1)
    conn.register_layout([kvshelf.layout_from_tensor(t, 1) for t in kv_src], nb)
    conn2 = vmc.MooncakeConnector(vcfg, device=-2, namespace="bench", rank=0, world_size=1)
    conn2.register_layout([kvshelf.layout_from_tensor(t, 1) for t in kv_dst], nb)

    def run_vllm(r):
        hashes = [b"vl-%d-%d" % (r, i) for i in range(nb)]
        dst.zero_()
        t0 = time.perf_counter()
        t = conn.dump(hashes, list(range(nb)))
        assert t.wait(600)
        t1 = time.perf_counter()
        assert t.failed() == [], t.results()[:8]
        t = conn2.load(hashes, list(range(nb)))
        assert t.wait(600)
        t2 = time.perf_counter()
        assert t.failed() == [], t.results()[:8]
        check(src, dst, "kvshelf-vllm")
        return t1 - t0, t2 - t1

    # ---------------------------------------------------------------- (c)
    ucm = None
    if ctx["ucm"]:
        from ucm.store.mooncakestore.mooncake_connector import UcmMooncakeStore

        class SeedStore(UcmMooncakeStore):
            """UCM 0.8.1 ships UcmMooncakeStore without cc_store, which its base
            class declares abstract: it cannot be instantiated as shipped. This
            adds only that method (unused here); every other line is UCM's."""

            def cc_store(self) -> int:
                return 0

        ucm = SeedStore({"local_hostname": cfg["local_hostname"],
                                "metadata_server": cfg["metadata_server"],
                                "master_server_address": cfg["master_server_address"],
                                "global_segment_size": 0,
                                "local_buffer_size": kvshelf.parse_size(cfg["local_buffer_size"]),
                                "protocol": "tcp", "device_name": ""})
        src_bf = [b.view(torch.bfloat16) for b in src_blocks]
        dst_bf = [b.view(torch.bfloat16) for b in dst_blocks]

    def run_ucm(r):
        ids = ["uc-%d-%d" % (r, i) for i in range(nb)]
        dst.zero_()
        t0 = time.perf_counter()
        rc = ucm.wait(ucm.dump(ids, [0] * nb, src_bf))
        t1 = time.perf_counter()
        assert rc == 0, rc
        rc = ucm.wait(ucm.load(ids, [0] * nb, dst_bf))
        t2 = time.perf_counter()
        assert rc == 0, rc
        check(src, dst, "ucm")
        return t1 - t0, t2 - t1

    runs = {"mooncake": mooncake_runner(BATCH, "mc"), "mooncake-1call": mooncake_runner(nb, "m1"),
            "kvshelf": kvshelf_runner(store, b"kvshelf"), "kvshelf-vllm": run_vllm}
    if slots is not None:
        runs["mooncake-slots"] = run_slots
    if zstore is not None:
        runs["kvshelf-zc"] = kvshelf_runner(zstore, b"kvshelf-zc")
    if ucm is not None:
        runs["ucm"] = run_ucm
    names = [n for n in runs if not ctx.get("only") or n in ctx["only"]]
    times: dict[str, dict[str, list[float]]] = {n: {"dump": [], "load": []} for n in names}
    for n in names:  # warm-up: the pool's pages, the clients' connections (not counted)
        empty_pool()
        runs[n](-1)
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            empty_pool()
            d, l = runs[n](r)
            times[n]["dump"].append(d)
            times[n]["load"].append(l)
            print("rep %d %-13s dump %6.3f GB/s  load %6.3f GB/s" % (r, n, total / d / 1e9, total / l / 1e9),
                  file=sys.stderr, flush=True)
    out = {"blocks": nb, "block_bytes": BLOCK_BYTES, "bytes": total, "reps": reps, "times": times,
           "store_stats": {k: v for k, v in store.stats().items() if isinstance(v, (int, float))}}
    out["vllm_store_stats"] = {k: v for k, v in conn.store.stats().items() if isinstance(v, (int, float))}
    conn.close()
    conn2.close()
    store.close()
    if zstore is not None:
        out["zc_store_stats"] = {k: v for k, v in zstore.stats().items() if isinstance(v, (int, float))}
        zstore.close()
    if ucm is not None:
        ucm.shutdown()
    for t in (src, dst):
        mc.unregister_buffer(t.data_ptr())
    mc.close()
    admin.close()
    return out


# ================================================================ parent
def _median_gbps(total: int, ts: list[float]) -> float:
    return total / statistics.median(ts) / 1e9


def table(res: dict) -> str:
    """Median rates; their ratios to the ceiling (the better Mooncake median
    of each direction) and to UCM's; and the median of the same-repetition
    ratios to ``mooncake`` (batches of 64, as kvshelf's), measured seconds
    apart: robust to the shared machine's load drifting between repetitions."""
    total = res["bytes"]
    t = res["times"]
    names = list(t)
    reps = len(next(iter(t.values()))["dump"])
    rate = {n: {k: _median_gbps(total, v[k]) for k in ("dump", "load")} for n, v in t.items()}
    mcs = [n for n in names if n.startswith("mooncake")]
    ceil = {k: max(rate[n][k] for n in mcs) for k in ("dump", "load")} if mcs else None
    ucm = rate.get("ucm")

    def same_rep(n, k):
        if "mooncake" not in t:
            return None
        return statistics.median(t["mooncake"][k][r] / t[n][k][r] for r in range(reps))

    def pct(x):
        return "%.0f%%" % (100 * x) if x is not None else "-"

    lines = ["| contender | dump GB/s | load GB/s | dump / ceiling | load / ceiling | dump / mooncake "
             "(same rep) | load / mooncake (same rep) | dump / ucm | load / ucm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = rate[n]
        lines.append("| %s | %.3f | %.3f | %s | %s | %s | %s | %s | %s |" % (
            n, r["dump"], r["load"],
            pct(r["dump"] / ceil["dump"] if ceil else None), pct(r["load"] / ceil["load"] if ceil else None),
            pct(same_rep(n, "dump")), pct(same_rep(n, "load")),
            "%.1fx" % (r["dump"] / ucm["dump"]) if ucm else "-",
            "%.1fx" % (r["load"] / ucm["load"]) if ucm else "-"))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--staging", default="512MiB", help="staging_size of kvshelf's store")
    ap.add_argument("--no-ucm", action="store_true", help="without UCM's UcmMooncakeStore")
    ap.add_argument("--only", default="", help="comma-separated contenders to run (default: all)")
    ap.add_argument("--json", help="also write the raw times here")
    ap.add_argument("--keep", action="store_true", help="keep the logs' folder")
    a = ap.parse_args(argv)

    import mooncake_net as mn

    why = mn.netns_unavailable()
    if why:
        print("cannot run: %s" % why, file=sys.stderr)
        return 2
    mn.mooncake_env().provision()
    nb = a.tokens // BLOCK_TOKENS
    if a.no_ucm:
        py, site = sys.executable, str(mn.site_packages())
    else:
        import ucm_env
        from test_ucm_mooncake import provision_mooncake_py312

        venv = ucm_env.venv_dir()
        if not (venv / ".kvshelf-ucm-ok").exists():
            print("UCM's venv is not provisioned (python3 tests/python/ucm_env.py), or run with --no-ucm",
                  file=sys.stderr)
            return 2
        py = str(venv / "bin" / "python")
        site = str(provision_mooncake_py312(py))
    d = Path(tempfile.mkdtemp(prefix="kvshelf-mcbench-"))
    net = mn.MooncakeNet(d, "B")
    holder = None
    try:
        net.start_master()
        cfg = net.config(local_buffer_size="64MiB")
        seg = int(nb * (BLOCK_BYTES + 8192) * 1.25) + (256 << 20)
        port = net.free_ports(1)[0]
        holder_log = d / "mooncake_client.log"
        args = ["ip", "netns", "exec", net.name, str(mn.mooncake_env().venv_dir() / "bin" / "mooncake_client"),
                "--host", mn.NS_IP, "--port", str(port), "--global_segment_size", str(seg),
                "--master_server_address", cfg["master_server_address"],
                "--metadata_server", cfg["metadata_server"], "--protocol", "tcp"]
        with open(holder_log, "wb") as lf:
            holder = subprocess.Popen(args, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(3)
        if holder.poll() is not None:
            raise RuntimeError("mooncake_client exited:\n%s" % mn.MooncakeNet.log_tail(holder_log))
        only = [x for x in a.only.split(",") if x]
        ctx = {"config": cfg, "blocks": nb, "reps": a.reps, "staging": a.staging, "mc_site": site,
               "ucm": not a.no_ucm and (not only or "ucm" in only), "only": only}
        env = dict(os.environ, KVSHELF_BENCH_CTX=json.dumps(ctx), GLOG_minloglevel="1")
        env.pop("PYTHONPATH", None)
        env.pop("KVSHELF_BIN", None)
        p = subprocess.run(["ip", "netns", "exec", net.name, py, str(Path(__file__).resolve()), "child"],
                           stdout=subprocess.PIPE, env=env, cwd=str(d), timeout=3600)
        if p.returncode != 0:
            raise RuntimeError("the bench process failed (rc %d); logs in %s" % (p.returncode, d))
        res = json.loads(p.stdout.decode().strip().splitlines()[-1])
    finally:
        if holder is not None and holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)
        net.close()
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    res["segment"] = seg
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print("%d tokens: %d blocks of %d bytes (%.2f GB), median of %d, pool in a separate mooncake_client"
          % (a.tokens, nb, BLOCK_BYTES, res["bytes"] / 1e9, a.reps))
    print(table(res))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "child":
        out = _child(json.loads(os.environ["KVSHELF_BENCH_CTX"]))
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        os._exit(0)
    sys.exit(main(sys.argv[1:]))
