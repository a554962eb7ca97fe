"""End-to-end run of vLLM with kvshelf.vllm.KVShelfConnector on CPU.

    python vllm_e2e.py make-model DIR
    python vllm_e2e.py run DIR OUT.json [--connector RUNTIME_DIR] [--repeat N] [--fail-every N]
    python vllm_e2e.py bad-key DIR OUT.json
    python vllm_e2e.py unreachable DIR OUT.json RUNTIME_DIR KVSHELF_BIN

`make-model` writes a tiny random-weight Llama (no download, no tokenizer).
`run` generates greedily for fixed token prompts (each --repeat times) and
writes the output tokens and vLLM's num_cached_tokens per request. With
--connector the engine runs with prefix caching OFF and kvshelf as its KV
connector (embedded pool in RUNTIME_DIR), so any cached token of a request
comes from kvshelf (an external prefix-cache hit).
`bad-key` starts an engine whose kv_connector_extra_config has a misspelled
key and records the exception vLLM's engine start raised.
`unreachable` starts an engine whose master does not run yet, records what
the engine, the connectors' stats, vLLM's metrics, the status file and
`kvshelf status` show, starts `kvshelf master` at that address, waits until
the connectors have opened the pool and records the same again after the
same prompt ran twice.
"""
import json
import os
import socket
import subprocess
import sys
import time

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


def _cpu_env(inproc=True):
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if inproc:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def bad_key(model, out):
    """Engine start with a misspelled key: what does vLLM raise?"""
    _cpu_env()
    from vllm import LLM
    from vllm.config import KVTransferConfig

    res = {"raised": None}
    try:
        LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=512, enforce_eager=True,
            block_size=BLOCK, kv_transfer_config=KVTransferConfig(
                kv_connector="KVShelfConnector", kv_connector_module_path="kvshelf.vllm", kv_role="kv_both",
                kv_connector_extra_config={"master_server_adress": "127.0.0.1:50001"}))
    except Exception as e:  # what the user sees
        res["raised"] = {"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                         "message": str(e)}
    with open(out, "w") as f:
        json.dump(res, f)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _metrics(llm):
    """vLLM's own metrics of the kvshelf connector (LLM.get_metrics)."""
    out = {}
    for m in llm.get_metrics():
        if "kvshelf" in m.name:
            out[m.name] = getattr(m, "value", None)
    return out


def unreachable(model, out, runtime_dir, exe):
    _cpu_env()
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.inputs import TokensPrompt

    from kvshelf.vllm import read_status_files

    addr = "127.0.0.1:%d" % _free_port()
    env = dict(os.environ, KVSHELF_RUNTIME_DIR=runtime_dir)
    extra = {"master_server_address": addr, "runtime_dir": runtime_dir, "global_segment_size": "256MiB",
             "retry_interval_s": 1.0, "warn_interval_s": 2.0, "status_interval_s": 0.5}
    t0 = time.monotonic()
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=512, enforce_eager=True,
              max_num_seqs=4, block_size=BLOCK, seed=0, enable_prefix_caching=False, disable_log_stats=False,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="KVShelfConnector", kv_connector_module_path="kvshelf.vllm",
                  kv_role="kv_both", kv_connector_extra_config=extra))
    sched = llm.llm_engine.engine_core.engine_core.scheduler.connector
    worker = get_kv_transfer_group()
    sp = SamplingParams(max_tokens=12, temperature=0.0, detokenize=False)

    def gen():
        o = llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])], sp, use_tqdm=False)[0]
        return {"tokens": list(o.outputs[0].token_ids), "num_cached_tokens": int(o.num_cached_tokens or 0)}

    def view():
        r = subprocess.run([exe, "status", "--master", addr], env=env, capture_output=True, text=True,
                           timeout=60)
        return {"scheduler": sched.stats(), "worker": worker.stats(), "files": read_status_files(runtime_dir),
                "status": {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr},
                "metrics": _metrics(llm)}

    res = {"pid": os.getpid(), "addr": addr, "start_s": time.monotonic() - t0}
    master = None
    try:
        res["down_runs"] = [gen(), gen()]
        time.sleep(3.0)  # the warning comes again after warn_interval_s
        gen()  # one more step, so vLLM's metrics see the state
        res["down"] = view()
        master = subprocess.Popen([exe, "master", "--listen", addr, "--http", "off"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t1 = time.monotonic()
        while time.monotonic() - t1 < 60:
            if sched.stats()["reachable"] and worker.stats()["reachable"]:
                break
            time.sleep(0.1)
        res["up_after_s"] = time.monotonic() - t1
        time.sleep(1.0)  # a status-file rewrite
        res["up_runs"] = [gen(), gen()]
        res["up"] = view()
    finally:
        with open(out, "w") as f:
            json.dump(res, f)
        del llm
        if master is not None:
            master.terminate()
            master.wait(10)


if __name__ == "__main__":
    if sys.argv[1] == "make-model":
        make_model(sys.argv[2])
    elif sys.argv[1] == "bad-key":
        bad_key(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "unreachable":
        unreachable(*sys.argv[2:6])
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
