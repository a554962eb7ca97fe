#!/usr/bin/env python3
"""Time for a restarted master to rebuild its index from the nodes' segment
directories (issue 17), against the number of objects, and the master's
memory per object.

For each count N: a `kvshelf master` and one `kvshelf node` on loopback (a
runtime dir of the bench's own), N objects of --size bytes put with
`kvshelf bench --keep`, the master's resident memory read before and after
the fill, then `kill -9` of the master and a new one on the same ports. The
clock starts when the new master is started; the table gives the time until
its status reports every object recovered (the node re-mounted and handed in
its directory) and until it reports the rebuild complete (that plus
KVSHELF_RECOVERY_WAIT_MS, 5000 by default, after its start). The node's
directory gets one slot per object (KVSHELF_DIR_SLOTS; by default a segment
has one slot per 64 KiB of data, which suits KV blocks of megabytes, not
small objects).

    python3 bench/rebuild_time.py [--counts 10000,100000,1000000] [--size 1K]
                                  [--bin build/bin/kvshelf]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Pool:
    def __init__(self, binary: str, env: dict, workdir: Path):
        self.bin, self.env, self.dir = binary, env, workdir
        self.master = None
        self.procs = []
        self.rpc = self.http = 0

    def spawn(self, name: str, args: list, extra_env: dict | None = None) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")
        p = subprocess.Popen([self.bin] + [str(a) for a in args], stdout=log, stderr=subprocess.STDOUT,
                             env=dict(self.env, **(extra_env or {})))
        self.procs.append(p)
        return p

    def start_master(self) -> float:
        pf = self.dir / "master.port"
        if pf.exists():
            pf.unlink()
        listen = f"127.0.0.1:{self.rpc}"
        http = f"127.0.0.1:{self.http}"
        t0 = time.monotonic()
        self.master = self.spawn("master", ["master", "--listen", listen, "--http", http,
                                            "--port-file", pf])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                d = json.loads(pf.read_text())
                if d.get("rpc") and d.get("http"):
                    self.rpc, self.http = int(d["rpc"]), int(d["http"])
                    return t0
            except (OSError, ValueError):
                pass
            if self.master.poll() is not None:
                sys.exit(f"master exited: see {self.dir / 'master.log'}")
            time.sleep(0.01)
        sys.exit("master did not start")

    def status(self) -> dict:
        out = subprocess.run([self.bin, "status", "--json", "--master", f"127.0.0.1:{self.rpc}"],
                             capture_output=True, env=self.env, timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def one(binary: str, n: int, size: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kvshelf-rebuild-"))
    env = dict(os.environ, KVSHELF_RUNTIME_DIR=str(work / "rt"))
    pool = Pool(binary, env, work)
    try:
        pool.start_master()
        rss0 = rss_bytes(pool.master.pid)
        seg = max(64 << 20, int(n * max(size, 4096) * 1.25))
        pool.spawn("node", ["node", "--master", f"127.0.0.1:{pool.rpc}", "--segment-size", seg],
                   extra_env={"KVSHELF_DIR_SLOTS": str(int(n * 1.05) + 64)})
        deadline = time.monotonic() + 60
        while not pool.status().get("segments"):
            if time.monotonic() > deadline:
                sys.exit("node did not mount")
            time.sleep(0.05)
        t = time.monotonic()
        fill = subprocess.run([binary, "bench", "--json", "--quiet", "--master", f"127.0.0.1:{pool.rpc}",
                               "--mode", "put", "--sizes", str(size), "--count", str(n), "--threads", "2",
                               "--batch", "64", "--prefix", "rb", "--keep"],
                              capture_output=True, env=env, timeout=3600)
        fill_s = time.monotonic() - t
        rep = json.loads(fill.stdout)
        put = [r for r in rep["results"] if r["mode"] == "put"][0]
        st = pool.status()
        objects = st.get("objects", 0)
        rss1 = rss_bytes(pool.master.pid)
        pool.master.send_signal(signal.SIGKILL)
        pool.master.wait()
        t0 = pool.start_master()
        t_all = t_done = None
        deadline = t0 + 600
        while time.monotonic() < deadline and t_done is None:
            rec = pool.status().get("recovery", {})
            now = time.monotonic()
            if t_all is None and rec.get("objects_recovered", 0) >= objects:
                t_all = now - t0
            if rec.get("complete"):
                t_done = now - t0
            time.sleep(0.02)
        st2 = pool.status()
        return {"n": n, "size": size, "put_ok": put.get("ok"), "objects": objects, "fill_s": fill_s,
                "rss_empty": rss0, "rss_full": rss1,
                "bytes_per_object": (rss1 - rss0) / objects if objects else 0,
                "recovered": st2.get("recovery", {}).get("objects_recovered"),
                "t_all_recovered_s": t_all, "t_complete_s": t_done}
    finally:
        pool.stop()
        subprocess.run(["rm", "-rf", str(work)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="10000,100000,1000000")
    ap.add_argument("--size", default="1K")
    ap.add_argument("--bin", default=os.environ.get("KVSHELF_BIN", str(ROOT / "build" / "bin" / "kvshelf")))
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    if not os.access(a.bin, os.X_OK):
        sys.exit(f"no kvshelf binary at {a.bin} (build it: make, or give --bin)")
    rows = []
    print(f"{'objects':>9} {'size':>6} {'fill s':>7} {'master RSS empty':>17} {'full':>10} "
          f"{'B/object':>9} {'recovered':>10} {'all back s':>10} {'complete s':>10}")
    for n in [int(x) for x in a.counts.split(",")]:
        r = one(a.bin, n, parse_size(a.size))
        rows.append(r)
        print(f"{r['objects']:>9} {r['size']:>6} {r['fill_s']:>7.1f} {r['rss_empty'] / 2**20:>14.1f} MiB "
              f"{r['rss_full'] / 2**20:>6.1f} MiB {r['bytes_per_object']:>9.0f} {r['recovered']!s:>10} "
              f"{r['t_all_recovered_s'] if r['t_all_recovered_s'] is None else round(r['t_all_recovered_s'], 3)!s:>10} "
              f"{r['t_complete_s'] if r['t_complete_s'] is None else round(r['t_complete_s'], 3)!s:>10}",
              flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["recovered"] == r["objects"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
