"""What a newcomer meets first (issue 13 items 1 and 2).

1. The embedded pool starts whatever way the kvshelf command was invoked
   (relative path, another directory, nothing on PATH, no KVSHELF_BIN).
2. The pool is nobody's child: a process that started it can be killed with
   its whole process tree (as vLLM does to its workers at shutdown) and the
   pool, with its objects, is still there for the next engine.
"""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import row


def newcomer_env(kv):
    """The harness env without KVSHELF_BIN and with a PATH that has no kvshelf."""
    env = dict(kv.env)
    env.pop("KVSHELF_BIN", None)
    env["PATH"] = "/usr/bin:/bin"
    env["KVSHELF_GLOBAL_SEGMENT_SIZE"] = "64M"
    return env


def test_pool_starts_from_a_relative_invocation(kv):
    env = newcomer_env(kv)
    bindir = Path(kv.bin).parent
    # invoked as "./kvshelf" from its own directory, then as "bin/kvshelf" from above
    r = subprocess.run(["./kvshelf", "put", "first-key", "first-value"], cwd=bindir, env=env,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    r = subprocess.run([os.path.join(bindir.name, "kvshelf"), "get", "first-key"],
                       cwd=bindir.parent, env=env, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stdout.strip() == b"first-value"
    assert kv.embedded_pids(), "no embedded pool process"


def children_of(pid):
    """Every descendant of pid (by the ppid of each process in /proc)."""
    kids = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def test_pool_outlives_the_process_tree_that_started_it(kv):
    env = newcomer_env(kv)
    env["KVSHELF_BIN"] = kv.bin  # (found either way; see the test above)
    # an "engine": a shell whose child starts the pool and keeps using it
    engine = subprocess.Popen(
        # (lookups only: writes would fill the small pool and evict the blocks below)
        ["sh", "-c", '"$0" bench --mode exists --sizes 64K --count 200 --duration 60 --quiet; '
                     'sleep 60', kv.bin],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline and not kv.embedded_pids():
        time.sleep(0.1)
    pool = kv.embedded_pids()
    assert pool, "the engine did not start the embedded pool"
    # blocks the next engine will want, written while the first one runs
    w = kv.bench(None, "--mode", "put", "--sizes", "64K", "--count", 50, "--prefix", "tree",
                 "--verify", "--keep", env=env)
    assert w["fatal"] == 0 and row(w, "put")["ok"] == 50, w["totals"]
    tree = children_of(engine.pid)
    assert not set(pool) & set(tree), "the pool is a descendant of the engine: %s in %s" % (
        pool, tree)
    # kill the engine's whole tree, as vLLM's shutdown does, and its session
    for p in tree + [engine.pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(engine.pid, signal.SIGKILL)
    except OSError:
        pass
    engine.wait(timeout=10)
    time.sleep(0.3)
    assert sorted(kv.embedded_pids()) == sorted(pool), "the pool died with its starter"
    # the next engine finds every block
    g = kv.bench(None, "--mode", "get", "--sizes", "64K", "--count", 50, "--prefix", "tree",
                 "--verify", "--keep", env=env)
    assert g["fatal"] == 0 and g["totals"]["mismatches"] == 0
    assert row(g, "get")["ok"] == 50, g["totals"]


def test_pool_leaves_the_starters_pinning_and_preloads(kv):
    """An engine worker pinned to one CPU, with libraries preloaded (vLLM's
    CPU workers are both), starts the pool: the pool runs on every CPU this
    test may use and without the worker's LD_PRELOAD."""
    import ctypes.util
    import pytest
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs 2 CPUs to see a pinning left behind")
    lib = ctypes.util.find_library("m")
    preload = None
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"):
        if lib and os.path.exists(os.path.join(d, lib)):
            preload = os.path.join(d, lib)
    env = newcomer_env(kv)
    env["KVSHELF_BIN"] = kv.bin
    # (an ASan build must have its runtime first in any preload list)
    ldd = subprocess.run(["ldd", kv.bin], capture_output=True, text=True).stdout
    asan = [l.split("=>")[1].split()[0] for l in ldd.splitlines() if "libasan" in l and "=>" in l]
    if preload:
        env["LD_PRELOAD"] = " ".join(asan + [preload])
    one = min(allowed)
    r = subprocess.run([kv.bin, "put", "pinned-key", "v"], env=env, capture_output=True,
                       timeout=60, preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    pool = kv.embedded_pids()
    assert pool, "no embedded pool process"
    pid = pool[0]
    assert os.sched_getaffinity(pid) == allowed, (
        "the pool kept its starter's pinning: %s (allowed %s)" % (os.sched_getaffinity(pid),
                                                                  allowed))
    penv = Path("/proc/%d/environ" % pid).read_bytes().split(b"\0")
    assert not any(e.startswith(b"LD_PRELOAD=") for e in penv), "the pool kept LD_PRELOAD"


def shm_free():
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


def test_pool_that_cannot_start_says_why_at_once(kv):
    """A pool whose segment does not fit /dev/shm fails its first client at
    once with the pool's own reason (not "did not answer" after 10 s), and
    the next start with a size that fits works."""
    env = newcomer_env(kv)
    env["KVSHELF_BIN"] = kv.bin
    env["KVSHELF_GLOBAL_SEGMENT_SIZE"] = str(shm_free() + (1 << 30))
    t0 = time.monotonic()
    r = kv.run("put", "too-big", "v", env=env, timeout=60)
    took = time.monotonic() - t0
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0, err
    assert "could not start" in err and "/dev/shm" in err and "master.log" in err, err
    assert took < 8, "the client waited %.1f s for a pool that had failed" % took
    assert not kv.embedded_pids(), "the failed pool is still running"
    env["KVSHELF_GLOBAL_SEGMENT_SIZE"] = "64M"
    kv.run("put", "fits", "v", env=env, check=True)
    assert kv.run("get", "fits", env=env, check=True).stdout.strip() == b"v"
    assert not (kv.rt / "pool.failed").exists()


def test_demo_fits_a_small_dev_shm(kv):
    """`kvshelf demo` where /dev/shm is a container's default 64 MiB (a
    tmpfs mounted over it in a mount namespace of the test's own): it offloads
    fewer tokens, says so, and every block round-trips."""
    if os.geteuid() != 0:
        pytest.skip("needs root (unshare -m, a tmpfs over /dev/shm)")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a mount namespace here: %s" % probe.stderr.decode().strip())
    env = newcomer_env(kv)
    env.pop("KVSHELF_GLOBAL_SEGMENT_SIZE", None)  # nothing set, as a newcomer has
    script = ('mount -t tmpfs -o size=64m tmpfs /dev/shm && "$0" demo; rc=$?; '
              '"$0" stop >/dev/null 2>&1; exit $rc')
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, kv.bin], env=env,
                       capture_output=True, timeout=120)
    out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert r.returncode == 0, out
    assert "too little for the default run: offloading 256 tokens instead" in out, out
    assert "dumped 16/16, loaded 16/16, byte-exact: yes" in out, out


def test_clients_arriving_while_a_pool_fails_to_start_all_say_why(kv):
    """Clients that arrive while a pool is starting (it answers, its segment
    not open yet) wait for its starter instead of joining it: when the start
    fails, each says why, none fails on a connection to the dying pool."""
    env = newcomer_env(kv)
    env["KVSHELF_BIN"] = kv.bin
    env["KVSHELF_GLOBAL_SEGMENT_SIZE"] = str(shm_free() + (1 << 30))
    procs = []
    for i in range(4):
        procs.append(subprocess.Popen([kv.bin, "put", "k%d" % i, "v"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        time.sleep(0.15)
    for p in procs:
        out, err = p.communicate(timeout=120)
        err = err.decode(errors="replace")
        assert p.returncode != 0, err
        assert "could not start" in err and "/dev/shm" in err, err
    assert not kv.embedded_pids()
