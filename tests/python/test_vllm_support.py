"""The parts of kvshelf.vllm that need no vLLM (issue 13 items 3 and 4), run
by the default test suite: the check of ``kv_connector_extra_config``, the
link to a pool that is down and comes up (real `kvshelf master`, real
``kvshelf.Connector``), the engines' status files and their listing by
`kvshelf status`, and the single vLLM version statement. The same code
inside a real vLLM engine is tested by test_vllm.py (KVSHELF_TEST_VLLM=1)."""
import json
import logging
import os
import re
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import kvshelf
import kvshelf.vllm as kv
from conftest import kvshelf_bin

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the pin


def test_one_vllm_version_everywhere():
    """pyproject's extra, both READMEs, vllm.py and test_vllm.py name the same vLLM."""
    pin = kv.PINNED_VLLM
    assert re.fullmatch(r"\d+\.\d+\.\d+", pin)
    py = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^vllm = \["vllm==%s"\]$' % re.escape(pin), py, re.M), "pyproject's vllm extra"
    tv = (REPO / "tests" / "python" / "test_vllm.py").read_text()
    assert re.search(r'^PINNED = "%s"$' % re.escape(pin), tv, re.M)
    readme = (REPO / "README.md").read_text()
    assert "vLLM (pinned: %s," % pin in readme
    pyreadme = (REPO / "python" / "README.md").read_text()
    assert "Pinned to **vLLM %s**" % pin in pyreadme
    # every install pin says the same, except where the documentation names
    # the other tested release (vllm==0.34.0: the CUDA package, tested on its
    # scheduler side by test_vllm034.py) -- never in pyproject or test_vllm.py
    assert pin in kv.TESTED_VLLM
    for name, text in (("pyproject.toml", py), ("test_vllm.py", tv), ("README.md", readme),
                       ("python/README.md", pyreadme), ("vllm.py", Path(kv.__file__).read_text())):
        for v in re.findall(r"vllm(?:-cpu)?==(\d+\.\d+\.\d+)", text):
            strict = name in ("pyproject.toml", "test_vllm.py")
            assert v == pin if strict else v in kv.TESTED_VLLM, (name, v)


# ---------------------------------------------------- kv_connector_extra_config


def _all_listed(msg):
    for k in tuple(kvshelf.CONFIG_KEYS) + tuple(kv.CONNECTOR_KEYS) + kv.NESTED_KEYS:
        assert k in msg, (k, msg)


def test_unknown_key_named_with_the_valid_keys():
    with pytest.raises(kvshelf.ConfigError) as ei:
        kv.validate_extra_config({"master_server_adress": "10.0.0.1:50001"})
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert "unknown key 'master_server_adress' (did you mean 'master_server_address'?)" in msg, msg
    _all_listed(msg)
    # the connector's own keys too, and every bad key at once
    with pytest.raises(kvshelf.ConfigError) as ei:
        kv.validate_extra_config({"retry_interval": 1, "save_decodes": True, "zzz": 0})
    msg = str(ei.value)
    assert "'retry_interval' (did you mean 'retry_interval_s'?)" in msg
    assert "'save_decodes' (did you mean 'save_decode'?)" in msg and "'zzz'" in msg
    _all_listed(msg)


def test_nested_dicts_are_checked():
    with pytest.raises(kvshelf.ConfigError, match=r"'master_server_adress' \(did you mean "
                       r"'master_server_address'\?\) in kv_connector_extra_config\['kvshelf'\]"):
        kv.validate_extra_config({"kvshelf": {"master_server_adress": "x"}})
    with pytest.raises(kvshelf.ConfigError, match=r"ucm_connector_config"):
        kv.validate_extra_config({"ucm_connector_config": {"metadata_servr": "x"}})
    with pytest.raises(kvshelf.ConfigError, match="must be a dict"):
        kv.validate_extra_config({"kvshelf": "127.0.0.1:50001"})
    # UCM's own keys are accepted (and ignored) where UCM puts them, nowhere else
    s = kv.validate_extra_config({"ucm_connector_name": "UcmKVShelfStore",
                                  "ucm_connector_config": {"master_server_address": "", "kv_block_size": 16,
                                                           "role": "worker", "protocol": "tcp"}})
    assert s["store"] == {"master_server_address": "", "protocol": "tcp"}
    with pytest.raises(kvshelf.ConfigError, match="kv_block_size"):
        kv.validate_extra_config({"kvshelf": {"kv_block_size": 16}})


def test_values_are_checked():
    for bad, pat in (({"retry_interval_s": "soon"}, r"'retry_interval_s'\] must be int or float"),
                     ({"retry_interval_s": 0}, r"'retry_interval_s'\] must be > 0"),
                     ({"warn_interval_s": -1}, r"must be >= 0"),
                     ({"save_decode": 1}, r"'save_decode'\] must be bool"),
                     ({"num_workers": True}, r"'num_workers'\] must be int"),
                     ({"load_failure_policy": "retry"}, r'"recompute" or "fail"'),
                     ({"global_segment_size": "lots"}, r"global_segment_size: value 'lots' is not a size"),
                     ({"protocol": "rdma"}, r"protocol")):
        with pytest.raises(kvshelf.ConfigError, match=pat):
            kv.validate_extra_config(bad)
    s = kv.validate_extra_config({"master_server_address": "127.0.0.1:50001", "save_decode": True,
                                  "kvshelf": {"secret": "s3"}, "retry_interval_s": 2})
    assert s["store"] == {"master_server_address": "127.0.0.1:50001", "secret": "s3"}
    assert s["save_decode"] is True and s["retry_interval_s"] == 2
    assert s["warn_interval_s"] == 60.0 and s["status_interval_s"] == 5.0 and s["status_file"] is True
    assert s["load_failure_policy"] == "recompute"
    assert kv.validate_extra_config(None)["store"] == {}


def test_issue15_keys_are_checked():
    """load_mode, weights_fingerprint, a pinned namespace and the load delay
    are checked like the other keys."""
    for bad, pat in (({"load_mode": "lazy"}, r"'load_mode'\] must be \"async\" or \"sync\" or \"auto\""),
                     ({"weights_fingerprint": "md5"}, r"'weights_fingerprint'\] must be \"stat\" or \"content\""),
                     ({"namespace": ""}, r"'namespace'\] must be 1 to 256 printable"),
                     ({"namespace": "a|b"}, r"without '\|'"),
                     ({"namespace": "x" * 257}, r"1 to 256"),
                     ({"namespace": "tab\there"}, r"printable"),
                     ({"namespace": 5}, r"'namespace'\] must be str"),
                     ({"debug_load_delay_s": -1}, r"must be >= 0"),
                     ({"load_modes": "sync"}, r"'load_modes' \(did you mean 'load_mode'\?\)")):
        with pytest.raises(kvshelf.ConfigError, match=pat):
            kv.validate_extra_config(bad)
    s = kv.validate_extra_config({})
    assert s["load_mode"] == "async" and s["weights_fingerprint"] == "stat" and s["namespace"] is None
    s = kv.validate_extra_config({"load_mode": "auto", "weights_fingerprint": "content",
                                  "namespace": "qwen2.5-14b@2026-12", "debug_load_delay_s": 0.5})
    assert (s["load_mode"], s["weights_fingerprint"], s["namespace"]) == ("auto", "content", "qwen2.5-14b@2026-12")


def _write_safetensors(path, payload, meta="m"):
    import struct

    hdr = json.dumps({"__metadata__": {"k": meta},
                      "w": {"dtype": "F32", "shape": [len(payload) // 4], "data_offsets": [0, len(payload)]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr + payload)


def test_checkpoint_identity_sees_weights_rewritten_in_place(tmp_path):
    """"stat": a weight file rewritten in place (same name, size, header)
    changes the identity, a copy elsewhere with other mtimes too; "content":
    copies match, a rewrite of the bytes does not; files that are not
    weights (tokenizer, README) never count."""
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_safetensors(d / "model.safetensors", rng.standard_normal(1 << 16).astype(np.float32).tobytes())
    (d / "sub" / "extra.bin").write_bytes(b"\1" * 1000)
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    assert kv.checkpoint_files(str(d)) == ["model.safetensors", os.path.join("sub", "extra.bin")]
    assert kv.safetensors_header(str(d / "model.safetensors")).startswith(b'{"__metadata__"')
    assert kv.safetensors_header(str(d / "sub" / "extra.bin")) is None
    ids = {m: kv.checkpoint_identity(str(d), mode=m) for m in ("stat", "content", "off")}
    assert ids["stat"]["source"] == "dir" and len(ids["stat"]["files"]) == 2
    assert ids["off"] == {"mode": "off", "source": "off", "model": str(d), "revision": None}
    # a copy (other mtimes): "content" the same, "stat" not
    import shutil
    c = tmp_path / "copy"
    shutil.copytree(d, c)
    os.utime(c / "model.safetensors", ns=(1, 10**18))
    assert kv.checkpoint_identity(str(c), mode="content") == ids["content"]
    assert kv.checkpoint_identity(str(c), mode="stat") != ids["stat"]
    # the tokenizer changes: nothing changes
    (d / "tokenizer.json").write_text('{"x": 1}')
    assert kv.checkpoint_identity(str(d), mode="content") == ids["content"]
    # new weights of the same shapes written over the file: both modes change
    st = os.stat(d / "model.safetensors")
    _write_safetensors(d / "model.safetensors", rng.standard_normal(1 << 16).astype(np.float32).tobytes())
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert os.stat(d / "model.safetensors").st_size == st.st_size
    assert kv.checkpoint_identity(str(d), mode="stat") != ids["stat"]
    assert kv.checkpoint_identity(str(d), mode="content") != ids["content"]
    # a single-file checkpoint (GGUF) and a name with no local files
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    assert kv.checkpoint_identity(str(f))["source"] == "file"
    u = kv.checkpoint_identity("no-such-org/no-such-model-kvshelf", "abc")
    assert u["source"] == "unresolved" and u["revision"] == "abc"


def test_model_config_digest_reads_config_json(tmp_path):
    """The config part comes from config.json on disk (so a process whose
    in-memory config was changed by loading the model agrees with the
    others) plus hf_overrides; paths and versions do not count."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 8, "_name_or_path": "/a", "transformers_version": "1"}))
    a = kv.model_config_digest(str(d), None, {"in_memory": "ignored when the file exists"})
    (d / "config.json").write_text(json.dumps({"hidden_size": 8, "_name_or_path": "/b", "transformers_version": "2"}))
    assert kv.model_config_digest(str(d), None, {"other": 1}) == a
    (d / "config.json").write_text(json.dumps({"hidden_size": 16}))
    assert kv.model_config_digest(str(d), None, None) != a
    b = kv.model_config_digest(str(d), None, None)
    assert kv.model_config_digest(str(d), None, None, {"rope_theta": 1e6}) != b

    def override(cfg):
        return cfg

    assert kv.model_config_digest(str(d), None, None, override) == kv.model_config_digest(str(d), None, None, override)
    # no file (a name that is not local): the in-memory config
    assert kv.model_config_digest("no-org/none-kvshelf", None, {"h": 1}) != \
        kv.model_config_digest("no-org/none-kvshelf", None, {"h": 2})


def test_namespace_digest_and_pin():
    """The namespace changes with any part; the model config ignores paths
    and versions; a pin replaces the model part but never the layout."""
    model = {"checkpoint": {"files": [["a", 1, 2]]}, "config": kv.config_digest({"hidden_size": 8,
                                                                                  "_name_or_path": "/x"})}
    layout = {"dtype": "torch.bfloat16", "kv_cache_dtype": "auto", "block_size": 16, "kv_cache_layout": "NHD"}
    ns = kv.build_namespace(model, layout, label="m")
    assert ns.startswith("kvshelf-vllm/%d|m|" % kv.NAMESPACE_VERSION) and ns.count("|") == 3
    assert kv.config_digest({"hidden_size": 8, "_name_or_path": "/y", "transformers_version": "9"}) == model["config"]
    assert kv.config_digest({"hidden_size": 9}) != model["config"]
    for k, v in (("dtype", "torch.float16"), ("kv_cache_dtype", "fp8"), ("block_size", 32),
                 ("kv_cache_layout", "HND")):
        assert kv.build_namespace(model, {**layout, k: v}, label="m") != ns, k
    assert kv.build_namespace({**model, "config": "other"}, layout, label="m") != ns
    pinned = kv.build_namespace(model, layout, pinned="qwen@1", label="m")
    assert pinned.startswith("kvshelf-vllm/%d|pin:qwen@1|pinned|" % kv.NAMESPACE_VERSION)
    assert kv.build_namespace({**model, "config": "other"}, layout, pinned="qwen@1") == pinned
    assert kv.build_namespace(model, {**layout, "block_size": 32}, pinned="qwen@1") != pinned


# ------------------------------------------------------------ pool link


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def rt():
    d = tempfile.mkdtemp(prefix="kvs-eng-")
    yield d
    kvshelf.stop_pool(d)
    import shutil
    shutil.rmtree(d, ignore_errors=True)


class _Source:
    """What a connector gives the status board (KVShelfConnector.status())."""

    def __init__(self, role, link=None, counters=None, reachable=True):
        self.role, self.link, self.counters, self.reachable = role, link, counters or {}, reachable

    def status(self):
        st = self.link.state() if self.link else {"pool": "p", "reachable": self.reachable, "last_error": ""}
        return {"role": self.role, **st, "counters": dict(self.counters)}


def _status(rt, *args):
    env = dict(os.environ, KVSHELF_RUNTIME_DIR=rt)
    env.pop("KVSHELF_MASTER_SERVER_ADDRESS", None)
    return subprocess.run([kvshelf_bin(), "status", *args], env=env, capture_output=True, text=True, timeout=60)


def _engine_rows(text):
    """{pid: row} of the engines table of `kvshelf status`."""
    rows, on = {}, False
    for ln in text.splitlines():
        if ln.startswith("engines ("):
            on = True
            continue
        if on and ln.startswith("  ") and ln.split() and ln.split()[0].isdigit():
            rows[int(ln.split()[0])] = ln
    return rows


def test_pool_link_down_then_up(rt, caplog):
    """A pool that is down: open() says so at once and the engine goes on;
    the warning comes back every warn_interval_s (not every retry); the
    state, the status file and `kvshelf status` show it; a master started at
    the address is opened by the background retries, the worker's on_open
    (layout registration) runs, one line says it is back, and blocks are
    stored and loaded through it."""
    exe = kvshelf_bin()
    if not exe:
        pytest.skip("the kvshelf binary is not available")
    addr = "127.0.0.1:%d" % _free_port()
    cfg = {"master_server_address": addr, "runtime_dir": rt, "global_segment_size": "32MiB"}
    kv_cache = np.random.default_rng(1).standard_normal((2, 8, 16, 2, 8)).astype(np.float32)
    opened = []

    def on_open(conn):
        conn.register_layout([kvshelf.layout_from_tensor(kv_cache, block_dim=1)], num_blocks=8)
        opened.append(conn)

    board = kv.EngineStatusBoard.get(rt, 0.2)
    link = kv.PoolLink(cfg, {"device": -2, "namespace": "t-link"}, what="worker 0/1", retry_interval_s=0.1,
                       warn_interval_s=0.6, on_open=on_open, on_change=board.write)
    src = _Source("worker 0/1", link, {"saved": 0})
    caplog.set_level(logging.WARNING, logger="vllm.kvshelf")
    master = None
    try:
        t0 = time.monotonic()
        assert link.open() is False and link.conn is None
        assert time.monotonic() - t0 < 10
        board.add(src, engine_id="e-test", model="m")
        time.sleep(1.5)
        warns = [r.getMessage() for r in caplog.records if "cannot reach the pool at %s" % addr in r.getMessage()]
        assert 2 <= len(warns) <= 4, warns  # at once, then every 0.6 s; retries every 0.1 s
        assert "running WITHOUT KV offload" in warns[0] and "retrying every 0.1 s" in warns[0]
        st = link.state()
        assert st["reachable"] is False and st["pool"] == addr and st["retrying"] is True
        assert st["open_failures"] >= 5 and st["unreachable_s"] >= 1.0
        assert "cannot reach the master at %s" % addr in st["last_error"]
        doc = kv.read_status_files(rt)[os.getpid()]
        assert doc["reachable"] is False and doc["pool"] == addr and doc["role"] == "worker 0/1"
        p = _status(rt, "--master", addr)
        assert p.returncode == 1 and "cannot reach the master" in p.stderr, p
        row = _engine_rows(p.stdout)[os.getpid()]
        assert "UNREACHABLE" in row and addr in row and "cannot reach the master" in row, p.stdout

        env = dict(os.environ, KVSHELF_RUNTIME_DIR=rt)
        master = subprocess.Popen([exe, "master", "--listen", addr, "--http", "off"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while link.conn is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.conn is not None and opened == [link.conn] and link.reachable
        back = [r.getMessage() for r in caplog.records if "reaches the pool at %s again" % addr in r.getMessage()]
        assert len(back) == 1, back
        n_warn = len([r for r in caplog.records if "cannot reach" in r.getMessage()])
        time.sleep(0.8)
        assert len([r for r in caplog.records if "cannot reach" in r.getMessage()]) == n_warn  # quiet now
        # offload works through the link
        t = link.conn.dump([b"blk-a", b"blk-b"], [1, 2])
        t.wait()
        assert t.failed() == []
        assert link.conn.lookup_prefix([b"blk-a", b"blk-b", b"blk-c"]) == 2
        doc = kv.read_status_files(rt)[os.getpid()]
        assert doc["reachable"] is True, doc
        p = _status(rt, "--master", addr)
        assert p.returncode == 0, p.stderr
        assert " ok " in _engine_rows(p.stdout)[os.getpid()], p.stdout
        # a pool lost later shows too
        link.op_failed(kvshelf.ConnectionFailed("lost"))
        assert link.reachable is False and kv.read_status_files(rt)[os.getpid()]["reachable"] is False
        link.op_ok()
        assert link.reachable is True
    finally:
        link.close(timeout=2)
        board.remove(src)
        if master is not None:
            master.terminate()
            master.wait(10)
    assert os.getpid() not in kv.read_status_files(rt)  # the last source left: file removed


# ------------------------------------------------------- status files


def test_status_file_format_and_kvshelf_status(rt):
    """The status file sums its sources, is private (0600 in a 0700 folder)
    and replaced whole; `kvshelf status` lists every engine of the runtime
    dir with its state (ok, UNREACHABLE, stale), removes the files of dead
    pids and leaves other files alone."""
    if not kvshelf_bin():
        pytest.skip("the kvshelf binary is not available")
    board = kv.EngineStatusBoard.get(rt, 0.2)
    a = _Source("scheduler", counters={"lookups": 2, "hit_blocks": 5, "miss_blocks": 7})
    b = _Source("worker 0/2", counters={"loaded": 5, "saved": 9}, reachable=False)
    board.add(a, engine_id="e1", model="tiny")
    board.add(b)
    engines = Path(rt) / "engines"
    f = engines / ("%d.json" % os.getpid())
    doc = json.loads(f.read_text())
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and stat.S_IMODE(engines.stat().st_mode) == 0o700
    for k in ("version", "pid", "ppid", "host", "role", "pool", "reachable", "last_error", "unreachable_s",
              "started", "updated", "interval_s", "counters", "connectors", "engine_id", "model"):
        assert k in doc, k
    assert doc["version"] == kv.STATUS_VERSION and doc["pid"] == os.getpid()
    assert doc["role"] == "scheduler+worker 0/2" and doc["reachable"] is False
    assert doc["counters"] == {"lookups": 2, "hit_blocks": 5, "miss_blocks": 7, "loaded": 5, "saved": 9}
    assert doc["engine_id"] == "e1" and len(doc["connectors"]) == 2
    # rewritten by the thread
    a.counters["hit_blocks"] = 6
    time.sleep(0.6)
    doc2 = json.loads(f.read_text())
    assert doc2["counters"]["hit_blocks"] == 6 and doc2["updated"] > doc["updated"]
    assert not [n for n in os.listdir(engines) if n.endswith(".tmp")]

    # a dead engine, a live but silent one, and a file that is not ours
    dead = subprocess.Popen(["true"])
    dead.wait()
    (engines / ("%d.json" % dead.pid)).write_text(json.dumps({"pid": dead.pid, "updated": time.time()}))
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (engines / ("%d.json" % sleeper.pid)).write_text(json.dumps(
            {"pid": sleeper.pid, "role": "scheduler", "pool": "10.1.2.3:50001", "reachable": True,
             "updated": time.time() - 600, "interval_s": 5, "counters": {"hit_blocks": 1}}))
        (engines / "notes.json").write_text("{}")
        p = _status(rt)  # no pool runs in this runtime dir: exit 3, the engines are still listed
        assert p.returncode == 3, p
        rows = _engine_rows(p.stdout)
        assert set(rows) == {os.getpid(), sleeper.pid}, p.stdout
        assert "engines (2)" in p.stdout and "removed 1 file" in p.stdout
        mine = rows[os.getpid()].split()
        assert mine[1:3] == ["scheduler+worker", "0/2"] and mine[4] == "UNREACHABLE", rows
        assert mine[7:11] == ["6", "7", "5", "9"], rows  # hits misses loads saves
        assert "stale" in rows[sleeper.pid] and "10.1.2.3:50001" in rows[sleeper.pid]
        assert not (engines / ("%d.json" % dead.pid)).exists()
        assert (engines / "notes.json").exists() and (engines / ("%d.json" % sleeper.pid)).exists()
        assert kv.prune_status_files(str(engines)) == []  # nothing left to prune
        # --json keeps its document as is (no engines table mixed in)
        pj = _status(rt, "--json")
        assert json.loads(pj.stdout) == {"running": False, "runtime_dir": rt}
    finally:
        sleeper.kill()
        sleeper.wait()
    # every column lines up under its header (text left, counts right-aligned)
    hdr = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("PID") and "STATE" in ln)
    for row in rows.values():
        for name in ("ROLE", "POOL", "STATE", "UPDATED"):
            i = hdr.index(name)
            assert row[i] != " " and row[i - 1] == " ", (name, hdr, row)
        for name in ("PID", "HITS", "MISSES", "LOADS", "SAVES"):
            end = hdr.index(name) + len(name)
            assert row[end - 1] != " " and row[end] == " ", (name, hdr, row)
    board.remove(a)
    assert f.exists()
    board.remove(b)
    assert not f.exists()


def test_no_status_folder_no_engines_section(rt):
    if not kvshelf_bin():
        pytest.skip("the kvshelf binary is not available")
    p = _status(rt)
    assert p.returncode == 3 and "engines" not in p.stdout


def test_vllm_classes_need_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match=r"needs vLLM %s" % re.escape(kv.PINNED_VLLM)):
        from kvshelf.vllm import KVShelfConnector  # noqa: F401
    assert "KVShelfConnector" not in kv.__all__ and "validate_extra_config" in kv.__all__
