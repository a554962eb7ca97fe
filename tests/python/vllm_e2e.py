"""End-to-end run of vLLM with kvshelf.vllm.KVShelfConnector on CPU.

    python vllm_e2e.py make-model DIR
    python vllm_e2e.py run DIR OUT.json [--connector RUNTIME_DIR] [--repeat N] [--fail-every N]

`make-model` writes a tiny random-weight Llama (no download, no tokenizer).
`run` generates greedily for fixed token prompts (each --repeat times) and
writes the output tokens and vLLM's num_cached_tokens per request. With
--connector the engine runs with prefix caching OFF and kvshelf as its KV
connector (embedded pool in RUNTIME_DIR), so any cached token of a request
comes from kvshelf (an external prefix-cache hit).
"""
import json
import os
import sys

BLOCK = 32
PROMPTS = [
    [(7 * i + 3) % 500 + 1 for i in range(200)],
    [(11 * i + 5) % 500 + 1 for i in range(150)],
]


def make_model(d):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)


def run(model, out, runtime_dir=None, repeat=1, fail_every=0):
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = {}
    if runtime_dir:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVShelfConnector",
            kv_connector_module_path="kvshelf.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"runtime_dir": runtime_dir, "global_segment_size": "256MiB",
                                       "debug_fail_load_every": fail_every},
        )
        kw["enable_prefix_caching"] = False
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=512,
              enforce_eager=True, max_num_seqs=4, block_size=BLOCK, seed=0, **kw)
    sp = SamplingParams(max_tokens=12, temperature=0.0, detokenize=False)
    res = []
    for r in range(repeat):
        for i, p in enumerate(PROMPTS):
            o = llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0]
            res.append({"round": r, "prompt": i, "tokens": list(o.outputs[0].token_ids),
                        "num_cached_tokens": int(o.num_cached_tokens or 0)})
    with open(out, "w") as f:
        json.dump(res, f)
    # close the connector (the engine shuts down the workers' connectors)
    del llm


if __name__ == "__main__":
    if sys.argv[1] == "make-model":
        make_model(sys.argv[2])
    else:
        args = sys.argv[2:]
        rt = None
        rep = 1
        if "--connector" in args:
            rt = args[args.index("--connector") + 1]
        if "--repeat" in args:
            rep = int(args[args.index("--repeat") + 1])
        fe = int(args[args.index("--fail-every") + 1]) if "--fail-every" in args else 0
        run(args[0], args[1], rt, rep, fe)
