"""The embedded host-local pool: with no master address, the first client
starts it; every process of the user shares it; it outlives them; `kvshelf
status` shows it and `kvshelf stop` ends it."""
import time
from pathlib import Path

from conftest import row, segments_of


def embedded_env(kv, size="128M"):
    env = dict(kv.env)
    env["KVSHELF_GLOBAL_SEGMENT_SIZE"] = size
    return env


def test_embedded_pool_shared_outlives_clients_and_stops(kv):
    env = embedded_env(kv)
    # nothing runs yet
    assert kv.status(env=env) is None or not segments_of(kv.status(env=env))

    # process 1 writes and exits; the pool it started stays
    w = kv.bench(None, "--mode", "put", "--sizes", "4K-512K", "--count", 300, "--prefix", "emb",
                 "--verify", "--keep", env=env)
    assert w["fatal"] == 0 and w["totals"]["errors"] == 0, w["totals"]
    assert row(w, "put")["ok"] == 300
    pids = kv.embedded_pids()
    assert pids, "no embedded master process found after the first client exited"
    st = kv.status(env=env)
    assert st is not None, "kvshelf status does not show the embedded pool"
    assert len(segments_of(st)) == 1

    # two processes at once share the same pool, and read what process 1 wrote
    p1 = kv.bench_bg(None, "--mode", "get", "--sizes", "4K-512K", "--count", 300,
                     "--prefix", "emb", "--verify", "--keep", "--threads", 2, env=env)
    p2 = kv.bench_bg(None, "--mode", "rw", "--sizes", "64K", "--duration", 2, "--verify",
                     env=env)
    r1, r2 = kv.bench_result(p1), kv.bench_result(p2)
    assert r1["fatal"] == 0 and r1["totals"]["errors"] == 0 and r1["totals"]["mismatches"] == 0
    assert row(r1, "get")["ok"] == 300
    assert r2["fatal"] == 0 and r2["totals"]["errors"] == 0 and row(r2, "rw_get")["ok"] > 0
    assert sorted(kv.embedded_pids()) == sorted(pids), "a second pool was started"

    # `kvshelf stop` ends it: process gone, socket gone, shared memory gone
    r = kv.run("stop", env=env)
    assert r.returncode == 0, r.stderr
    kv.wait_for(lambda: not kv.embedded_pids(), 10, "the embedded master to exit")
    for pid in pids:
        assert not list(Path("/dev/shm").glob("kvshelf-%d-%d-*" % (kv.uid, pid))), \
            "embedded pool left its segment in /dev/shm"
    st = kv.status(env=env)
    assert st is None or not segments_of(st)
    # and a new client starts a fresh, empty pool
    g = kv.bench(None, "--mode", "get", "--sizes", "4K-512K", "--count", 20, "--prefix", "emb",
                 "--verify", "--keep", env=env)
    assert g["fatal"] == 0 and row(g, "get")["miss"] == 20
    time.sleep(0.1)
