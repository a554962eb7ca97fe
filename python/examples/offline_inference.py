"""Offline inference with kvshelf as vLLM's KV connector.

    python offline_inference.py MODEL [--tokens N]

Runs the same long prompt twice with vLLM's own prefix cache disabled: the
first request computes and stores its KV blocks in kvshelf, the second loads
them (num_cached_tokens > 0) and skips recomputing them. Uses the host's
embedded pool (no service to start); `kvshelf stop` ends it.
"""
import argparse
import time

from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--tp", type=int, default=1)
    a = ap.parse_args()
    ktc = KVTransferConfig(
        kv_connector="KVShelfConnector",
        kv_connector_module_path="kvshelf.vllm",
        kv_role="kv_both",
        kv_connector_extra_config={
            # Mooncake-style keys; empty master_server_address = embedded pool
            "master_server_address": "",
        },
    )
    llm = LLM(model=a.model, kv_transfer_config=ktc, enable_prefix_caching=False,
              tensor_parallel_size=a.tp, max_model_len=a.tokens + 64)
    prompt = {"prompt_token_ids": [(i * 7919) % 20000 + 100 for i in range(a.tokens)]}
    sp = SamplingParams(temperature=0.0, max_tokens=16)
    for label in ("first (computes, dumps)", "second (loads)"):
        t = time.perf_counter()
        out = llm.generate([prompt], sp, use_tqdm=False)[0]
        print(f"{label}: TTFT+16 tokens {time.perf_counter() - t:.3f} s, "
              f"cached tokens {out.num_cached_tokens}, output {list(out.outputs[0].token_ids)[:8]}")


if __name__ == "__main__":
    main()
