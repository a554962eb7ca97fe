"""mooncake_master killed (SIGKILL) and restarted on the same ports while a
stream of dumps, loads and lookups runs through kvshelf's UCM V1 store over
Mooncake (issue 16).

Real processes, as in test_ucm_mooncake.py (whose fixtures and interpreters
this reuses: this Python with kvshelf.ucm's base classes, and UCM 0.8.1's
venv with UCM's factory and error classes when it is provisioned). The
scenario process, inside the test's network namespace, runs three threads --
dump_data+wait of fresh blocks, load_data+wait of stored ones, and
lookup_on_prefix -- kills the master, waits, starts a new mooncake_master on
the same ports and waits until new dumps and loads succeed again.

What it checks: every wait and lookup returns within the stated bound
(task_timeout_ms, 4 s here, plus 1.5 s) with a result or one of UCM's error
classes (misses as BlocksNotFound/StoreNotFoundError, the master's absence as
StoreUnhealthy/StoreUnhealthyError, lookups as kvshelf errors UCM counts); no
thread hangs or dies, the process does not crash; every block a load
reports loaded holds the bytes dumped under its id and every block it
reports failed is untouched; while the master is dead calls fail; after the
restart new dumps and loads succeed, and blocks stored before the kill are
misses (the new master starts empty).

    sudo python3 -m pytest tests/python/test_mooncake_restart.py -v
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import mooncake_net as mn
import test_ucm_mooncake as U
from test_ucm_mooncake import interp, master, net  # noqa: F401 - fixtures

MOD = "test_mooncake_restart"
TASK_TIMEOUT_MS = 4000
SLACK_S = 1.5


def _listening(port: int) -> bool:
    try:
        socket.create_connection((mn.NS_IP, port), 0.3).close()
        return True
    except OSError:
        return False


def scenario_restart(ctx):
    import numpy as np

    import kvshelf

    ku = U.import_ucm()
    not_found, unhealthy = U.ucm_errors(ku)
    p = ctx.params
    bound = p["task_timeout_ms"] / 1000.0 + SLACK_S
    T, n = 64 << 10, 8
    cfg = dict(ctx.config, task_timeout_ms=p["task_timeout_ms"], retry_interval_ms=300, timeout_ms=2000)
    s = U.make_v1(ku, cfg, tensor_size_list=[T, T], shard_size=2 * T, block_size=2 * T, **U.WORKER)
    sched = U.make_v1(ku, cfg)
    lock = threading.Lock()
    stop = threading.Event()
    state = {"epoch": 0}  # 0: before the kill, 1: master dead, 2: restarted
    stored: dict = {}  # id -> (bytes, epoch)
    events: list = []  # (kind, outcome, seconds, epoch)
    wrong: list = []
    T0 = time.monotonic()

    def record(kind, outcome, dt):
        with lock:
            events.append((kind, outcome, round(dt, 3), state["epoch"], round(time.monotonic() - T0, 2)))

    def classify(e):
        if isinstance(e, ku.BlocksNotFound):
            assert isinstance(e, not_found)
            return "BlocksNotFound"
        if isinstance(e, ku.StoreUnhealthy):
            assert isinstance(e, unhealthy)
            return "StoreUnhealthy"
        return "UNEXPECTED %s: %s" % (type(e).__name__, str(e)[:300])

    def dumper():
        rng = np.random.default_rng(11)
        r = 0
        while not stop.is_set():
            ids = U.ids16("rs-%d" % r, n)
            r += 1
            src = rng.integers(0, 256, (n, 2, T), dtype=np.uint8)
            t0 = time.monotonic()
            try:
                s.wait(s.dump_data(ids, [0] * n, U.rows(src), 0))
                outcome, ok = "ok", range(n)
            except Exception as e:  # noqa: BLE001 - what the stream saw is the result
                outcome = classify(e)
                ok = [i for i in range(n) if i not in getattr(e, "failed", range(n))]
            record("dump", outcome, time.monotonic() - t0)
            with lock:
                for i in ok:
                    stored[ids[i]] = (src[i].copy(), state["epoch"])
            time.sleep(0.01)

    def loader():
        k = 0
        while not stop.is_set():
            with lock:
                keys = list(stored)
            if not keys:
                time.sleep(0.01)
                continue
            k += 1
            sel = keys[-n:] if k % 2 else keys[:: max(1, len(keys) // n)][:n]  # recent, or spread
            dst = np.full((len(sel), 2, T), 0xEE, np.uint8)
            t0 = time.monotonic()
            failed = []
            try:
                s.wait(s.load_data(sel, [0] * len(sel), U.rows(dst)))
                outcome = "ok"
            except Exception as e:  # noqa: BLE001
                outcome = classify(e)
                failed = list(getattr(e, "failed", range(len(sel))))
            record("load", outcome, time.monotonic() - t0)
            for i, b in enumerate(sel):
                if i in failed:
                    if not (dst[i] == 0xEE).all():
                        wrong.append("failed block %d of a load was written" % i)
                elif not np.array_equal(dst[i], stored[b][0]):
                    wrong.append("block %s loaded with other bytes" % b.hex())

    def looker():
        while not stop.is_set():
            with lock:
                keys = list(stored)[-3 * n:]
            t0 = time.monotonic()
            try:
                sched.lookup_on_prefix(keys + U.ids16("never", 1))
                outcome = "ok"
            except kvshelf.Error as e:  # UCM's connector counts a lookup error, the request recomputes
                outcome = "lookup " + type(e).__name__
            except Exception as e:  # noqa: BLE001
                outcome = "UNEXPECTED %s: %s" % (type(e).__name__, e)
            record("lookup", outcome, time.monotonic() - t0)
            time.sleep(0.05)

    threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (dumper, loader, looker)]
    for t in threads:
        t.start()
    out = {}
    time.sleep(2.0)
    with lock:
        before = [b for b, (_, ep) in stored.items() if ep == 0]
    assert before, "nothing stored before the kill"
    # ---- SIGKILL the master under load
    ctx.kill_master()
    with lock:
        state["epoch"] = 1
    t_kill = time.monotonic()
    time.sleep(p["down_s"])
    # ---- a new mooncake_master on the same ports
    rpc = int(cfg["master_server_address"].rsplit(":", 1)[1])
    http = int(cfg["metadata_server"].split(":")[2].split("/")[0])
    args = [p["binary"], "--rpc_port", str(rpc), "--rpc_address", mn.NS_IP,
            "--enable_http_metadata_server=true", "--http_metadata_server_host", mn.NS_IP,
            "--http_metadata_server_port", str(http), "--metrics_port", str(p["metrics"]),
            *U.MASTER_ARGS]
    logf = open(os.path.join(ctx.dir, "restarted_master.log"), "wb")
    deadline = time.monotonic() + 30
    while True:  # the old one's ports may take a moment to be free
        pr = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        with open(os.path.join(ctx.dir, "restart.pid"), "w") as f:
            f.write(str(pr.pid))
        t1 = time.monotonic() + 10
        while time.monotonic() < t1 and pr.poll() is None and not (_listening(rpc) and _listening(http)):
            time.sleep(0.1)
        if pr.poll() is None and _listening(rpc):
            break
        assert time.monotonic() < deadline, "the master did not restart on port %d" % rpc
        pr.kill()
        time.sleep(0.5)
    with lock:
        state["epoch"] = 2
    t_restart = time.monotonic()
    out["down_s"] = round(t_restart - t_kill, 2)
    # ---- until new dumps and loads succeed (bounded)
    recovered = None
    while time.monotonic() - t_restart < 60:
        with lock:
            ok2 = {k for k, o, _, ep, _ in events if ep == 2 and o == "ok"}
        if {"dump", "load", "lookup"} <= ok2:
            recovered = time.monotonic() - t_restart
            break
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(2 * bound + 5)
    out["threads_alive"] = [t.name for t in threads if t.is_alive()]
    out["recovered_s"] = recovered
    # ---- blocks stored before the kill: misses now (the new master is empty)
    # (Mooncake's own client may drop its master connection again for a few
    # seconds after the restart, while it remounts: the store then answers
    # "unhealthy" (an error, never bytes); ask again until it answers)
    out["old_blocks_unhealthy"] = 0
    t_old = time.monotonic()
    while True:
        dst = np.full((min(n, len(before)), 2, T), 0xEE, np.uint8)
        try:
            s.wait(s.load_data(before[:len(dst)], [0] * len(dst), U.rows(dst)))
            out["old_blocks"] = "loaded"
        except ku.BlocksNotFound as e:
            out["old_blocks"] = "misses %d/%d" % (len(e.failed), len(dst))
            assert (dst[e.failed] == 0xEE).all()
        except unhealthy as e:
            assert (dst[list(getattr(e, "failed", range(len(dst))))] == 0xEE).all()
            out["old_blocks_unhealthy"] += 1
            if time.monotonic() - t_old < 30:
                time.sleep(0.5)
                continue
            out["old_blocks"] = "unhealthy for 30 s: %s" % e
        break
    t0 = time.monotonic()
    s.shutdown()
    sched.shutdown()
    out["shutdown_s"] = round(time.monotonic() - t0, 2)
    pr.kill()
    pr.wait(10)
    # ---- the summary
    by = {}
    for kind, outcome, dt, ep, _ in events:
        d = by.setdefault("%s/%d" % (kind, ep), {})
        d[outcome] = d.get(outcome, 0) + 1
    out["outcomes"] = by
    out["max_s"] = {k: max([dt for kk, _, dt, _, _ in events if kk == k] or [0])
                    for k in ("dump", "load", "lookup")}
    out["slowest"] = sorted(events, key=lambda e: -e[2])[:5]
    out["unexpected"] = sorted({o for _, o, _, _, _ in events if o.startswith("UNEXPECTED")})[:5]
    out["wrong"] = wrong[:5]
    out["bound_s"] = bound
    return out


def test_master_killed_and_restarted_under_load(master, interp):  # noqa: F811
    r = U.run(master, interp, "restart", module=MOD, timeout=240, binary=str(mn.mooncake_env().master_bin()),
              metrics=master.metrics, task_timeout_ms=TASK_TIMEOUT_MS, down_s=3.0)
    print(r)
    assert not r["threads_alive"], r  # nothing hung
    assert not r["unexpected"], r  # only UCM's error classes (and kvshelf errors from lookups)
    assert not r["wrong"], r  # no wrong bytes
    for kind, secs in r["max_s"].items():  # every call within the stated bound
        assert secs <= r["bound_s"], (kind, secs, r)
    out = r["outcomes"]
    assert out["dump/0"].get("ok") and out["load/0"].get("ok"), out  # worked before
    down = {o for k, v in out.items() if k.endswith("/1") for o in v}
    assert down and down != {"ok"}, out  # calls failed while the master was dead
    assert r["recovered_s"] is not None, r  # and work again after the restart
    assert out["dump/2"].get("ok") and out["load/2"].get("ok"), out
    assert r["old_blocks"].startswith("misses"), r
    assert r["shutdown_s"] < 30, r
