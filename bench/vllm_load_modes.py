#!/usr/bin/env python3
"""Synchronous against asynchronous kvshelf loads in vLLM's OpenAI-compatible server (issue 15).

Runs in a Python with vLLM 0.32.0 and kvshelf installed (the vLLM test venv:
~/.cache/kvshelf/vllm-0.32.0-venv, made by `KVSHELF_TEST_VLLM=1 pytest
tests/python/test_vllm.py`). On the CPU build of vLLM it starts, one after
the other, the server with kvshelf off, with synchronous loads and with
asynchronous loads, on a tiny random-weight Llama (made here, no download),
vLLM's prefix cache off (so a repeated prompt can only come from kvshelf).
Each server gets the same work:

 1. store: every "hit" prompt once (kvshelf stores its blocks);
 2. lone: `--lone` hit prompts one at a time (time to first token of a
    request that runs alone: what "auto" mode decides on);
 3. stream: a fixed stream of `--requests` requests, one every
    `--interval-ms`, a share `--hit-share` of them repeating a stored prompt
    (long prompt, few output tokens: it hits kvshelf) and the others new
    prompts (short prompt, `--miss-tokens` output tokens: they never hit).
    Streamed completions: time to first token (TTFT) and the gaps between
    tokens (inter-token latency, ITL) of every request.

Printed (and written to --out as JSON): p50/p99 of TTFT and ITL of the
requests that do NOT hit, per configuration, side by side, plus the hitting
requests' TTFT and kvshelf's counters from the server's /metrics.

On a CPU with this tiny model a load is a few hundred KiB (well under a
millisecond), far from the 6.4 GB / ~130 ms of 32k tokens of a 14B model on a
GPU; `--load-delay-ms D` (kv_connector_extra_config debug_load_delay_s) makes
every load take at least D ms -- an emulated slow pool or large load -- to
show what a forward waiting for a load costs the others. Rows say which.

    ~/.cache/kvshelf/vllm-0.32.0-venv/bin/python bench/vllm_load_modes.py \\
        --delays 0,200 --requests 60 --out /tmp/vllm_load_modes.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32


@dataclass
class Req:
    at: float  # seconds after the stream starts
    hit: bool
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    hit: bool
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


# ----------------------------------------------------------------- setup


def make_model(d: Path, layers: int, hidden: int, kv_heads: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(4, kv_heads), num_key_value_heads=kv_heads,
                      max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)


def prompt(seed: int, n: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(1, 500) for _ in range(n)]


def workload(a: argparse.Namespace) -> tuple[list[list[int]], list[Req]]:
    """(the stored "hit" prompts, the request stream): the same for every configuration."""
    hits = [prompt(1000 + i, a.hit_prompt_tokens) for i in range(a.hit_prompts)]
    r = random.Random(a.seed)
    stream = []
    for i in range(a.requests):
        if r.random() < a.hit_share:
            stream.append(Req(i * a.interval_ms / 1e3, True, hits[r.randrange(len(hits))], a.hit_tokens))
        else:
            stream.append(Req(i * a.interval_ms / 1e3, False, prompt(5000 + i, a.miss_prompt_tokens), a.miss_tokens))
    return hits, stream


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """`python -m vllm.entrypoints.openai.api_server` on the CPU build."""

    def __init__(self, model: Path, extra: dict[str, Any] | None, log: Path, max_num_seqs: int):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.model = str(model)
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--block-size", str(BLOCK), "--no-enable-prefix-caching", "--max-num-seqs", str(max_num_seqs),
               "--host", "127.0.0.1", "--port", str(self.port)]
        if extra is not None:
            cmd += ["--kv-transfer-config", json.dumps({
                "kv_connector": "KVShelfConnector", "kv_connector_module_path": "kvshelf.vllm",
                "kv_role": "kv_both", "kv_connector_extra_config": extra})]
        self.logf = open(log, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    async def wait_ready(self, session: Any, timeout: float = 900) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited, see %s" % self.logf.name)
            try:
                async with session.get(self.url + "/health") as r:
                    if r.status == 200:
                        return
            except Exception:
                pass
            await asyncio.sleep(1)
        raise RuntimeError("server not ready after %d s" % timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.logf.close()


# --------------------------------------------------------------- requests


async def complete(session: Any, srv: Server, req: Req) -> Result:
    """One streamed completion: TTFT and the gaps between tokens."""
    res = Result(req.hit)
    body = {"model": srv.model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    t0 = time.monotonic()
    last = None
    try:
        async with session.post(srv.url + "/v1/completions", json=body) as r:
            if r.status != 200:
                res.error = "HTTP %d: %s" % (r.status, (await r.text())[:200])
                return res
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                doc = json.loads(line[5:])
                n = sum(len(c.get("token_ids") or []) for c in doc.get("choices", []))
                if n == 0:
                    continue
                now = time.monotonic()
                if last is None:
                    res.ttft = now - t0
                    n -= 1
                    if n > 0:  # more than one token in the first chunk: count them as 0-gaps
                        res.itl.extend([0.0] * n)
                else:
                    gap = (now - last) / n
                    res.itl.extend([gap] * n)
                res.tokens += n + (1 if last is None else 0)
                last = now
    except Exception as e:  # noqa: BLE001 - reported in the table
        res.error = "%s: %s" % (type(e).__name__, e)
    return res


async def run_stream(session: Any, srv: Server, stream: list[Req]) -> list[Result]:
    t0 = time.monotonic()

    async def one(req: Req) -> Result:
        await asyncio.sleep(max(0.0, t0 + req.at - time.monotonic()))
        return await complete(session, srv, req)

    return list(await asyncio.gather(*(one(r) for r in stream)))


async def metrics(session: Any, srv: Server) -> dict[str, float]:
    async with session.get(srv.url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for ln in text.splitlines():
        if ln.startswith("vllm:kvshelf_") and "_created" not in ln:
            name = ln.split("{")[0].split(" ")[0]
            out[name] = out.get(name, 0.0) + float(ln.rsplit(" ", 1)[1])
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[Result], hit: bool) -> dict[str, Any]:
    rs = [r for r in results if r.hit == hit]
    ttft = [r.ttft for r in rs if r.ttft is not None]
    itl = [g for r in rs for g in r.itl]
    return {"requests": len(rs), "errors": sum(1 for r in rs if r.error),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99), "itl_max": max(itl) if itl else None}


async def one_config(a: argparse.Namespace, name: str, extra: dict[str, Any] | None, model: Path,
                     hits: list[list[int]], stream: list[Req], logdir: Path) -> dict[str, Any]:
    import aiohttp

    srv = Server(model, extra, logdir / ("server-%s.log" % name), a.max_num_seqs)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            await srv.wait_ready(session)
            warm = Req(0, False, prompt(7, 64), 4)
            await complete(session, srv, warm)
            for h in hits:  # store phase
                await complete(session, srv, Req(0, True, h, 1))
            await asyncio.sleep(1.0)  # the last saves land
            lone = []
            for h in hits[:a.lone]:  # a hitting request alone
                lone.append((await complete(session, srv, Req(0, True, h, 2))).ttft)
            before = await metrics(session, srv)
            results = await run_stream(session, srv, stream)
            await asyncio.sleep(1.0)
            after = await metrics(session, srv)
    finally:
        srv.stop()
    errors = [r.error for r in results if r.error]
    if errors:
        print("%s: %d errors, first: %s" % (name, len(errors), errors[0]), file=sys.stderr)
    delta = {k.replace("vllm:kvshelf_", "").replace("_total", ""): after[k] - before.get(k, 0.0)
             for k in after if not k.endswith("pool_unreachable")}
    return {"config": name, "miss": summarize(results, False), "hit": summarize(results, True),
            "lone_hit_ttft_p50": pct([x for x in lone if x is not None], 50), "kvshelf": delta}


def fmt(x: float | None) -> str:
    return "-" if x is None else "%.1f" % (x * 1e3)


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| config | load delay | miss reqs | miss TTFT p50 | miss TTFT p99 | miss ITL p50 | miss ITL p99 "
           "| miss ITL max | hit reqs | hit TTFT p50 | hit TTFT p99 | lone hit TTFT p50 | kvshelf loaded "
           "(blocks) | sync / async loads |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, h, k = r["miss"], r["hit"], r["kvshelf"]
        out.append("| %s | %s | %d | %s | %s | %s | %s | %s | %d | %s | %s | %s | %s | %s |" % (
            r["config"], r["delay"], m["requests"], fmt(m["ttft_p50"]), fmt(m["ttft_p99"]), fmt(m["itl_p50"]),
            fmt(m["itl_p99"]), fmt(m["itl_max"]), h["requests"], fmt(h["ttft_p50"]), fmt(h["ttft_p99"]),
            fmt(r["lone_hit_ttft_p50"]), "%d" % k["loaded"] if "loaded" in k else "-",
            "%d / %d" % (k.get("sync_loads", 0), k.get("async_loads", 0)) if k else "-"))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--interval-ms", type=float, default=100.0, help="one request every this many ms")
    ap.add_argument("--hit-share", type=float, default=0.33)
    ap.add_argument("--hit-prompts", type=int, default=8, help="distinct stored prompts")
    ap.add_argument("--hit-prompt-tokens", type=int, default=480)
    ap.add_argument("--hit-tokens", type=int, default=4, help="output tokens of a hitting request")
    ap.add_argument("--miss-prompt-tokens", type=int, default=64)
    ap.add_argument("--miss-tokens", type=int, default=48, help="output tokens of a non-hitting request")
    ap.add_argument("--lone", type=int, default=5, help="hitting requests run alone, one after the other")
    ap.add_argument("--delays", default="0,200", help="load delays (ms) to run sync and async with")
    ap.add_argument("--configs", default="off,sync,async", help="any of off,sync,async,auto")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (model, logs)")
    ap.add_argument("--out", help="JSON file for the results")
    a = ap.parse_args()

    import kvshelf

    work = Path(tempfile.mkdtemp(prefix="kvshelf-vllm-bench-"))
    rt = work / "rt"
    model = work / "model"
    make_model(model, a.layers, a.hidden, a.kv_heads)
    hits, stream = workload(a)
    # the pool first: a pool started by vLLM's CPU worker would inherit its pinning
    kvshelf.Client({"runtime_dir": str(rt), "global_segment_size": "1GiB"}).close()
    rows = []
    try:
        delays = [int(x) for x in a.delays.split(",") if x != ""]
        for name in a.configs.split(","):
            for delay in ([0] if name == "off" else delays):
                extra = None if name == "off" else {
                    "runtime_dir": str(rt), "global_segment_size": "1GiB", "load_mode": name,
                    "debug_load_delay_s": delay / 1e3, "namespace": "bench-%s-%d" % (name, delay)}
                t0 = time.monotonic()
                r = asyncio.run(one_config(a, "%s" % name, extra, model, hits, stream, work))
                r["delay"] = "-" if name == "off" else ("%d ms (emulated)" % delay if delay else "none (real)")
                r["wall_s"] = round(time.monotonic() - t0, 1)
                rows.append(r)
                print("%s, delay %s: done in %.0f s" % (name, r["delay"], r["wall_s"]), file=sys.stderr)
    finally:
        kvshelf.stop_pool(str(rt))
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
           "cpu": _cpu_model(), "args": vars(a), "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))
    print(table(rows))
    return 0


def _cpu_model() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
