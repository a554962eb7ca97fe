#!/usr/bin/env python3
"""Store benchmark of kvshelf, side by side with the ceilings measured in the
same run on the same machine (issue 2, "What it must show", item 4).

Figures (each the median of --reps repetitions, interleaved with the
ceilings so that drift affects both alike; each measured mode runs twice in
its client and the second pass counts):
  ceiling  loopback TCP, one stream, 1 MiB writes          (bench/ceilings.c)
  ceiling  memcpy of 1 MiB blocks, one thread, from DRAM   (bench/ceilings.c)
  remote get of 1 MiB values: a bench client with no segment on a simulated
           second host (own boot id and /dev/shm in a private mount namespace,
           so nothing can be mapped: every byte crosses the node's transfer
           server over TCP)                     target >= 80% of TCP
           (the client reads back what it wrote: its gets start the
           transfer from where the values lie before the master answers;
           also shown: without early reads, 2 threads on one
           connection, and batch 1)
  remote get of 64 KiB values, batched, ops/s   target >= 30,000/s
  same-host get_into of 1 MiB (segment mapped)  target >= 70% of memcpy
  batch exists of 2,048 keys, latency p50       target <= 0.5 ms
  mixed 4 KiB-16 MiB pool fill, usable %        target >= 95%

Processes: one `kvshelf master` and one `kvshelf node` on loopback (ports
chosen at run time), all stopped at the end. Prints a table, and with
--markdown FILE writes the results as a Markdown section.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(*a):
    print("store_bench:", *a, file=sys.stderr, flush=True)


class Procs:
    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.procs = []

    def start(self, name, args, env=None):
        f = open(self.tmp / (name + ".log"), "wb")
        p = subprocess.Popen([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs.append((name, p, f))
        return p

    def stop(self, p):
        for i, (name, q, f) in enumerate(self.procs):
            if q is p:
                if q.poll() is None:
                    q.send_signal(signal.SIGTERM)
                    try:
                        q.wait(timeout=8)
                    except subprocess.TimeoutExpired:
                        q.kill()
                        q.wait()
                f.close()
                del self.procs[i]
                return

    def stop_all(self):
        for _, p, _ in list(reversed(self.procs)):
            self.stop(p)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def run_json(args, env=None, timeout=600):
    r = subprocess.run([str(a) for a in args], capture_output=True, timeout=timeout, env=env)
    out = r.stdout.decode(errors="replace").strip()
    try:
        return json.loads(out.splitlines()[-1]), r
    except (ValueError, IndexError):
        raise RuntimeError("%s failed (rc %d):\n%s\n%s" % (
            " ".join(map(str, args)), r.returncode, out[-2000:],
            r.stderr.decode(errors="replace")[-4000:]))


def can_fake_other_host():
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        "mount --bind /proc/self/stat /proc/sys/kernel/random/boot_id"],
                       capture_output=True)
    return r.returncode == 0


def other_host(args, tmp):
    fake = Path(tmp) / "fake_boot_id"
    fake.write_text("0badc0de-0000-4000-8000-00000000beef\n")
    script = ('mount --bind "$0" /proc/sys/kernel/random/boot_id && '
              'mount -t tmpfs -o size=1g tmpfs /dev/shm && exec "$@"')
    return ["unshare", "-m", "sh", "-c", script, str(fake)] + [str(a) for a in args]


def find_ceilings(build):
    for c in (Path(build) / "bench" / "kvs_ceilings", Path(build) / "bin" / "kvs_ceilings"):
        if c.exists():
            return str(c)
    out = Path(tempfile.gettempdir()) / ("kvs_ceilings-%d" % os.getuid())
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-std=c11", "-D_GNU_SOURCE", "-pthread", "-o", str(out),
                    str(ROOT / "bench" / "ceilings.c")], check=True)
    return str(out)


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def start_master(procs, kvs, name, tmp, env, extra=()):
    pf = Path(tmp) / (name + ".port")
    if pf.exists():
        pf.unlink()
    p = procs.start(name, [kvs, "master", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
                           "--port-file", pf, *extra], env=env)
    deadline = time.time() + 15
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError("master exited: see %s/%s.log" % (tmp, name))
        try:
            d = json.loads(pf.read_text())
            return p, "127.0.0.1:%d" % d["rpc"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    raise RuntimeError("master did not start")


def wait_segments(kvs, addr, n, env):
    deadline = time.time() + 15
    while time.time() < deadline:
        r = subprocess.run([kvs, "status", "--master", addr, "--json"], capture_output=True,
                           env=env)
        if r.returncode == 0:
            try:
                if len(json.loads(r.stdout).get("segments", [])) >= n:
                    return
            except ValueError:
                pass
        time.sleep(0.1)
    raise RuntimeError("node did not mount its segment")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=int(os.environ.get("REPS", 3)))
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per measured phase")
    ap.add_argument("--segment-size", default="2G", help="the node's segment")
    ap.add_argument("--fill-segment-size", default="1G", help="segment of the pool-fill runs")
    ap.add_argument("--build", default=os.environ.get("KVS_BUILD_DIR", str(ROOT / "build")))
    ap.add_argument("--nice", type=int, default=0,
                    help="run every process of the benchmark at this niceness (e.g. -10, needs "
                         "root) so that other work on a shared machine disturbs it less")
    ap.add_argument("--rt", type=int, default=0, metavar="PRIO",
                    help="run every process of the benchmark under SCHED_FIFO at this priority "
                         "(needs root): on a shared machine, other work then waits instead of "
                         "preempting the measurement")
    ap.add_argument("--json", help="write all raw results to this file")
    ap.add_argument("--markdown", help="write the results table (Markdown) to this file")
    a = ap.parse_args()

    if a.nice:
        os.nice(a.nice)  # inherited by every process started below
    if a.rt:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(a.rt))  # inherited too
    kvs = os.environ.get("KVSHELF_BIN") or str(Path(a.build) / "bin" / "kvshelf")
    if not os.access(kvs, os.X_OK):
        sys.exit("store_bench: %s not found: build first (scripts/build.sh)" % kvs)
    ceil = find_ceilings(a.build)
    remote_ok = can_fake_other_host()
    if not remote_ok:
        log("cannot simulate a second host (unshare -m needs root): remote figures use "
            "KVSHELF_NO_SHM=1 (same data path: the client maps no segment)")

    tmp = tempfile.mkdtemp(prefix="kvs-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSHELF_")}
    env["KVSHELF_LOG"] = "warn"
    env["KVSHELF_RUNTIME_DIR"] = os.path.join(tmp, "rt")
    env["KVSHELF_BIN"] = kvs  # the embedded pool starts this binary
    procs = Procs(tmp)
    raw = {"ceil_tcp": [], "ceil_memcpy": [], "remote_1m": [], "remote_1m_b1": [], "remote_1m_t2": [], "remote_1m_noloc": [],
           "remote_64k": [], "local_1m": [], "local_1m_b8": [], "embedded_1m": [],
           "exists_2048": [], "fill": []}
    secs = a.seconds
    try:
        _, addr = start_master(procs, kvs, "master", tmp, env)
        procs.start("node", [kvs, "node", "--master", addr, "--segment-size", a.segment_size],
                    env=env)
        wait_segments(kvs, addr, 1, env)
        bench = [kvs, "bench", "--master", addr, "--json", "--quiet"]

        env_noshm = dict(env, KVSHELF_NO_SHM="1")

        def remote(args, extra_env=None):
            cmd = bench + [str(x) for x in args]
            if remote_ok:
                return run_json(other_host(cmd, tmp), dict(env, **(extra_env or {})))[0]
            return run_json(cmd, dict(env_noshm, **(extra_env or {})))[0]

        def ceiling(kind):
            d, _ = run_json([ceil, kind, "--block", "1M", "--seconds", secs])
            return d

        for rep in range(a.reps):
            log("repetition %d/%d" % (rep + 1, a.reps))
            # each group of figures sits between two measurements of its
            # ceiling; its ratio uses their mean (memory and loopback speed
            # drift on a shared VM)
            t0 = ceiling("tcp")
            d = remote(["--mode", "put,get,get", "--sizes", "1M", "--count", 1024, "--duration",
                        secs, "--batch", 8, "--prefix", "r1m-%d" % rep])
            raw["remote_1m"].append(d)
            d = remote(["--mode", "put,get,get", "--sizes", "1M", "--count", 512, "--duration",
                        secs, "--prefix", "r1mb1-%d" % rep])
            raw["remote_1m_b1"].append(d)
            d = remote(["--mode", "put,get,get", "--sizes", "1M", "--count", 1024, "--duration",
                        secs, "--batch", 8, "--threads", 2, "--prefix", "r1mt2-%d" % rep])
            raw["remote_1m_t2"].append(d)
            # a client that remembers no locations (as one reading keys it has
            # never seen): every get waits for the master before its bytes move
            d = remote(["--mode", "put,get,get", "--sizes", "1M", "--count", 1024, "--duration",
                        secs, "--batch", 8, "--prefix", "r1mnl-%d" % rep],
                       {"KVSHELF_LOC_CACHE": "0"})
            raw["remote_1m_noloc"].append(d)
            t1 = ceiling("tcp")
            raw["ceil_tcp"].append({"before": t0, "after": t1,
                                    "gb_per_s": (t0["gb_per_s"] + t1["gb_per_s"]) / 2})
            d = remote(["--mode", "put,get,get", "--sizes", "64K", "--count", 8192, "--duration",
                        secs, "--batch", 64, "--threads", 2, "--prefix", "r64k-%d" % rep])
            raw["remote_64k"].append(d)
            m0 = ceiling("memcpy")
            d, _ = run_json(bench + ["--mode", "put,get_into,get_into", "--sizes", "1M", "--count", 1024,
                                     "--duration", secs, "--prefix", "l1m-%d" % rep], env)
            raw["local_1m"].append(d)
            d, _ = run_json(bench + ["--mode", "put,get_into,get_into", "--sizes", "1M", "--count", 1024,
                                     "--batch", 8, "--duration", secs,
                                     "--prefix", "l1mb8-%d" % rep], env)
            raw["local_1m_b8"].append(d)
            # the embedded pool: the same data path, master RPC over a unix socket
            d, _ = run_json([kvs, "bench", "--json", "--quiet", "--segment-size",
                             a.segment_size, "--mode", "put,get_into,get_into", "--sizes", "1M",
                             "--count", 1024, "--duration", secs, "--prefix", "e1m-%d" % rep],
                            env)
            raw["embedded_1m"].append(d)
            m1 = ceiling("memcpy")
            raw["ceil_memcpy"].append({"before": m0, "after": m1,
                                       "gb_per_s": (m0["gb_per_s"] + m1["gb_per_s"]) / 2})
            d, _ = run_json(bench + ["--mode", "put,exists,exists", "--sizes", "4K", "--count", 2048,
                                     "--batch", 2048, "--duration", secs,
                                     "--prefix", "ex-%d" % rep], env)
            raw["exists_2048"].append(d)

        # pool fill: a fresh pool per repetition, no watermark eviction
        for rep in range(a.reps):
            p, faddr = start_master(procs, kvs, "fill-master-%d" % rep, tmp, env,
                                    ["--evict-high", "1.0", "--evict-low", "0.99"])
            n = procs.start("fill-node-%d" % rep, [kvs, "node", "--master", faddr,
                                                   "--segment-size", a.fill_segment_size], env=env)
            wait_segments(kvs, faddr, 1, env)
            d, _ = run_json([kvs, "bench", "--master", faddr, "--json", "--quiet",
                             "--fill-mixed", "--seed", 1000 + rep], env)
            raw["fill"].append(d)
            procs.stop(n)
            procs.stop(p)
    finally:
        procs.stop_all()
        subprocess.run([kvs, "stop"], env=env, capture_output=True)  # the embedded pool

    def row(d, mode):
        """The last row of `mode`: each measured mode runs twice, the first
        pass warms up (connections, page tables, the client's background
        pre-faulting of a mapped segment)."""
        rows = [r for r in d["results"] if r["mode"] == mode]
        if not rows:
            raise KeyError(mode)
        return rows[-1]

    def errs(ds):
        return sum(d["totals"]["errors"] + d["totals"]["mismatches"] for d in ds)

    tcp = median([d["gb_per_s"] for d in raw["ceil_tcp"]])
    mcp = median([d["gb_per_s"] for d in raw["ceil_memcpy"]])

    def vs_ceiling(key, mode, ceil_key):
        """(median value, median of per-repetition ratios to the ceiling
        measured around it)."""
        vals = [row(d, mode)["gb_per_s"] for d in raw[key]]
        ratios = [v / c["gb_per_s"] for v, c in zip(vals, raw[ceil_key])]
        return median(vals), median(ratios)

    figs = []
    figs.append(("loopback TCP, one stream, 1 MiB writes", "%.2f GB/s" % tcp, "ceiling", "", "",
                 None))
    figs.append(("memcpy 1 MiB blocks, one thread", "%.2f GB/s" % mcp, "ceiling", "", "", None))
    how = "" if remote_ok else " [KVSHELF_NO_SHM=1]"
    def early(key):
        """Share of the gets whose bytes started moving before the master
        answered and were kept (the client reads back what it wrote, so it
        knows where the values lie)."""
        c = [d.get("counters", {}) for d in raw[key]]
        return median([x.get("early_kept", 0) / max(x.get("gets", 0), 1) for x in c])

    v, r = vs_ceiling("remote_1m", "get", "ceil_tcp")
    figs.append(("remote get 1 MiB (no segment, batch 8, 1 thread; early reads %.0f%%)"
                 % (100 * early("remote_1m")) + how, "%.2f GB/s" % v,
                 "TCP %.2f GB/s" % tcp, "%.0f%%" % (100 * r), ">= 80%", r >= 0.8))
    v, r = vs_ceiling("remote_1m_noloc", "get", "ceil_tcp")
    figs.append(("remote get 1 MiB (batch 8, 1 thread, no early reads: KVSHELF_LOC_CACHE=0)",
                 "%.2f GB/s" % v, "TCP %.2f GB/s" % tcp, "%.0f%%" % (100 * r), "(info)", None))
    v, r = vs_ceiling("remote_1m_t2", "get", "ceil_tcp")
    figs.append(("remote get 1 MiB (batch 8, 2 threads on one connection)", "%.2f GB/s" % v,
                 "TCP %.2f GB/s" % tcp, "%.0f%%" % (100 * r), "(info)", None))
    v, r = vs_ceiling("remote_1m_b1", "get", "ceil_tcp")
    p50 = median([row(d, "get")["lat_us"]["p50"] for d in raw["remote_1m_b1"]])
    figs.append(("remote get 1 MiB (batch 1, 1 thread; p50 %.0f us)" % p50, "%.2f GB/s" % v,
                 "TCP %.2f GB/s" % tcp, "%.0f%%" % (100 * r), "(info)", None))
    v = median([row(d, "get")["ops_per_s"] for d in raw["remote_64k"]])
    r = median([row(d, "get")["gb_per_s"] / c["gb_per_s"]
                for d, c in zip(raw["remote_64k"], raw["ceil_tcp"])])
    figs.append(("remote get 64 KiB (batch 64, 2 threads; bytes at %.0f%% of TCP)" % (100 * r)
                 + how, "%.0f /s" % v, "30,000 /s", "%.2fx" % (v / 30000), ">= 30,000/s",
                 v >= 30000))
    v, r = vs_ceiling("local_1m", "get_into", "ceil_memcpy")
    p50 = median([row(d, "get_into")["lat_us"]["p50"] for d in raw["local_1m"]])
    figs.append(("same-host get_into 1 MiB (mapped, batch 1, 1 thread; p50 %.0f us)" % p50,
                 "%.2f GB/s" % v, "memcpy %.2f GB/s" % mcp, "%.0f%%" % (100 * r), ">= 70%",
                 r >= 0.7))
    v, r = vs_ceiling("embedded_1m", "get_into", "ceil_memcpy")
    p50 = median([row(d, "get_into")["lat_us"]["p50"] for d in raw["embedded_1m"]])
    figs.append(("same-host get_into 1 MiB, embedded pool (unix socket; p50 %.0f us)" % p50,
                 "%.2f GB/s" % v, "memcpy %.2f GB/s" % mcp, "%.0f%%" % (100 * r), "(info)", None))
    v, r = vs_ceiling("local_1m_b8", "get_into", "ceil_memcpy")
    figs.append(("same-host get 1 MiB into registered memory (batch 8, 1 thread)",
                 "%.2f GB/s" % v, "memcpy %.2f GB/s" % mcp, "%.0f%%" % (100 * r), "(info)", None))
    v = median([row(d, "exists")["lat_us"]["p50"] for d in raw["exists_2048"]])
    v99 = median([row(d, "exists")["lat_us"]["p99"] for d in raw["exists_2048"]])
    figs.append(("batch exists of 2,048 keys, p50 (p99 %.3f ms)" % (v99 / 1000),
                 "%.3f ms" % (v / 1000), "0.5 ms", "%.2fx" % (v / 500), "<= 0.5 ms", v <= 500))
    v = median([d["fill"]["usable_pct"] for d in raw["fill"]])
    figs.append(("mixed 4 KiB-16 MiB pool fill of %s, used at first failure (min %.2f %%)"
                 % (a.fill_segment_size, min(d["fill"]["usable_pct"] for d in raw["fill"])),
                 "%.2f %%" % v, "95 %", "", ">= 95%", v >= 95))

    ds = [d for k, v in raw.items() if k not in ("ceil_tcp", "ceil_memcpy", "fill") for d in v]
    nerr = errs(ds)

    hdr = ("figure", "value", "reference", "ratio", "target", "met")
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for f in figs:
        met = "" if f[5] is None else ("yes" if f[5] else "**no**")
        lines.append("| " + " | ".join(list(f[:5]) + [met]) + " |")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    info = ("machine: %d CPUs (nproc), %s, kernel %s; %s; median of %d repetitions, %.0f s "
            "each (ratios: median of per-repetition ratios to the ceiling measured around each "
            "figure); scheduling: %s; load average at the end %.2f; bench errors+mismatches: %d"
            % (os.cpu_count(), cpu_model(), platform.release(), when, a.reps, secs,
               ("SCHED_FIFO %d" % a.rt) if a.rt else "niceness %d" % os.nice(0), load, nerr))
    print(info)
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *[
        list(f[:5]) + ["" if f[5] is None else ("yes" if f[5] else "NO")] for f in figs])]
    print("  ".join(h.ljust(wd) for h, wd in zip(hdr, widths)))
    for f in figs:
        cells = list(f[:5]) + ["" if f[5] is None else ("yes" if f[5] else "NO")]
        print("  ".join(str(c).ljust(wd) for c, wd in zip(cells, widths)))
    if a.json:
        Path(a.json).write_text(json.dumps({"info": info, "raw": raw}, indent=1))
    if a.markdown:
        Path(a.markdown).write_text(info + "\n\n" + "\n".join(lines) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if nerr == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
