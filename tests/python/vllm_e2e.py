"""End-to-end run of vLLM with kvshelf.vllm.KVShelfConnector on CPU.

    python vllm_e2e.py make-model DIR [--seed N]
    python vllm_e2e.py run DIR OUT.json [--connector RUNTIME_DIR] [--repeat N] [--fail-every N]
        [--load-mode M] [--namespace NS] [--prefix-caching] [--prompts basic|shared|seeds]
        [--together] [--max-num-seqs N]
    python vllm_e2e.py parked DIR OUT.json RUNTIME_DIR --load-mode M --delay S
    python vllm_e2e.py bad-key DIR OUT.json
    python vllm_e2e.py unreachable DIR OUT.json RUNTIME_DIR KVSHELF_BIN

`make-model` writes a tiny random-weight Llama (no download, no tokenizer);
run again on the same folder with another seed it rewrites the weights in
place (same files, sizes and config).
`run --prompts shared --together` submits 16 prompts at once: 3 groups of 4
sharing a 128-token prefix and 4 unrelated ones (`seeds` = the first prompt
of the first two groups); with --prefix-caching vLLM's own prefix cache is
on. With a connector, OUT.json also holds the scheduler's and the worker's
kvshelf stats (``stats``).
`parked` runs a long decode (A) and then adds a request (B) whose blocks
are in kvshelf, loads slowed down to take --delay seconds, stepping the
engine by hand: it records per step the time and the tokens of A and B.
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


def make_model(d, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)


def shared_prompts():
    """16 prompts: groups g=0..2 of 4 prompts sharing a 128-token prefix
    (4 blocks) with 40-token suffixes of their own, then 4 unrelated ones."""
    out = []
    for g in range(3):
        prefix = [(13 * i + 7 * g + 1) % 509 + 1 for i in range(128)]
        for j in range(4):
            out.append(prefix + [(17 * i + 31 * j + 5 * g + 3) % 503 + 1 for i in range(40)])
    for j in range(4):
        out.append([(19 * i + 37 * j + 11) % 499 + 1 for i in range(150)])
    return out


def prompt_set(name):
    if name == "basic":
        return PROMPTS
    if name == "shared":
        return shared_prompts()
    if name == "seeds":  # the first prompt of groups 0 and 1
        sp = shared_prompts()
        return [sp[0], sp[4]]
    raise SystemExit("unknown prompt set %r" % name)


def connector_config(runtime_dir, **extra):
    from vllm.config import KVTransferConfig

    cfg = {"runtime_dir": runtime_dir, "global_segment_size": "256MiB"}
    cfg.update({k: v for k, v in extra.items() if v is not None})
    return KVTransferConfig(kv_connector="KVShelfConnector", kv_connector_module_path="kvshelf.vllm",
                            kv_role="kv_both", kv_connector_extra_config=cfg)


def connector_stats(llm):
    """The kvshelf connectors' stats() of an in-process engine (scheduler, worker)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    sched = llm.llm_engine.engine_core.engine_core.scheduler.connector
    return {"scheduler": sched.stats(), "worker": get_kv_transfer_group().stats()}


def run(model, out, runtime_dir=None, repeat=1, fail_every=0, load_mode=None, namespace=None,
        prefix_caching=False, prompts="basic", together=False, max_num_seqs=4):
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = {"enable_prefix_caching": prefix_caching}
    if runtime_dir:
        kw["kv_transfer_config"] = connector_config(runtime_dir, debug_fail_load_every=fail_every,
                                                    load_mode=load_mode, namespace=namespace)
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=512,
              enforce_eager=True, max_num_seqs=max_num_seqs, block_size=BLOCK, seed=0, **kw)
    sp = SamplingParams(max_tokens=12, temperature=0.0, detokenize=False)
    plist = prompt_set(prompts)
    res = []
    for r in range(repeat):
        if together:  # every prompt at once: the engine batches them
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in plist], sp, use_tqdm=False)
        else:
            outs = [llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0] for p in plist]
        for i, o in enumerate(outs):
            res.append({"round": r, "prompt": i, "tokens": list(o.outputs[0].token_ids),
                        "num_cached_tokens": int(o.num_cached_tokens or 0)})
    doc = {"results": res}
    if runtime_dir:
        time.sleep(0.5)  # saves of the last step are counted
        doc["stats"] = connector_stats(llm)
    with open(out, "w") as f:
        json.dump(doc if runtime_dir else res, f)
    # close the connector (the engine shuts down the workers' connectors)
    del llm


def parked(model, out, runtime_dir, load_mode, delay):
    """Request A decodes; B, whose blocks are in kvshelf (stored by a first
    run of B), is added and its load takes `delay` seconds. Steps the
    engine by hand and records, per step, the time and A's and B's tokens."""
    _cpu_env()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=512, enforce_eager=True,
              max_num_seqs=4, block_size=BLOCK, seed=0, enable_prefix_caching=False,
              kv_transfer_config=connector_config(runtime_dir, load_mode=load_mode,
                                                  debug_load_delay_s=float(delay)))
    prompt_a = [(23 * i + 9) % 497 + 1 for i in range(40)]
    prompt_b = PROMPTS[0]
    sp_b = SamplingParams(max_tokens=8, temperature=0.0, detokenize=False)
    ref_b = list(llm.generate([TokensPrompt(prompt_token_ids=prompt_b)], sp_b, use_tqdm=False)[0]
                 .outputs[0].token_ids)  # also stores B's blocks
    time.sleep(0.5)
    eng = llm.llm_engine
    eng.add_request("A", TokensPrompt(prompt_token_ids=prompt_a),
                    SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True, detokenize=False))
    toks = {"A": 0, "B": 0}
    final = {}
    steps = []
    t0 = time.monotonic()
    added_b = None
    while eng.has_unfinished_requests():
        if added_b is None and toks["A"] >= 3:
            # a SamplingParams of its own: LLM.generate made sp_b's outputs final-only
            eng.add_request("B", TokensPrompt(prompt_token_ids=prompt_b),
                            SamplingParams(max_tokens=8, temperature=0.0, detokenize=False))
            added_b = time.monotonic() - t0
        for o in eng.step():
            toks[o.request_id] = len(o.outputs[0].token_ids)
            if o.finished:
                final[o.request_id] = {"tokens": list(o.outputs[0].token_ids),
                                       "num_cached_tokens": int(o.num_cached_tokens or 0)}
        steps.append({"t": time.monotonic() - t0, "A": toks["A"], "B": toks["B"]})
        if "B" in final and "A" not in final:
            eng.abort_request(["A"])
            break
    doc = {"added_b": added_b, "steps": steps, "final": final, "ref_b": ref_b,
           "stats": connector_stats(llm)}
    with open(out, "w") as f:
        json.dump(doc, f)
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
        make_model(sys.argv[2], int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0)
    elif sys.argv[1] == "parked":
        a = sys.argv[2:]
        parked(a[0], a[1], a[2], a[a.index("--load-mode") + 1], float(a[a.index("--delay") + 1]))
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

        def opt(name, default=None):
            return args[args.index(name) + 1] if name in args else default

        run(args[0], args[1], rt, rep, fe, load_mode=opt("--load-mode"), namespace=opt("--namespace"),
            prefix_caching="--prefix-caching" in args, prompts=opt("--prompts", "basic"),
            together="--together" in args, max_num_seqs=int(opt("--max-num-seqs", "4")))
