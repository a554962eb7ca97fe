#!/usr/bin/env python3
"""Soak under faults (issue 12, "never wrong bytes"): a master and a node
(in its own network namespace when root and nftables allow, so it can be
partitioned) serve `kvshelf verify` writers and readers that check every
byte, while faults are injected in rotation for --minutes:

  pause      node SIGSTOP 3 s, SIGCONT
  kill-node  node kill -9, restarted (same segment size, new process)
  kill-master master kill -9, restarted on the same ports
  partition  every packet on the node's link dropped for 6 s (netns only)
  put-timeout master restarted with --put-timeout-ms 20 for 10 s, then back
  writer-ttl a slow in-place writer stopped past the client TTL

After each fault the soak waits for the readers to hit again (a recovery
that does not come within 60 s is counted, and the soak goes on). At the end
it prints a table: operations, hits, misses, errors, wrong reads and bytes
per verifier, faults injected, and the RSS of master and node at the start
and at the end. Exit status 1 if any read was wrong.

  sudo KVSHELF_BIN=build/bin/kvshelf python3 bench/soak_faults.py --minutes 5

Needs root for the namespaces and mounts (without root: no partitions, the
other faults still run). Logs stay in the directory printed at the start.
"""
import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

import conftest  # noqa: E402
import faults  # noqa: E402

SECRET = faults.SECRET


def rss_kib(pid):
    try:
        for ln in Path("/proc/%d/status" % pid).read_text().splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    except OSError:
        pass
    return None


def netns_usable():
    if os.geteuid() != 0:
        return False
    try:
        faults.need_netns()
        return True
    except BaseException:  # pytest.skip raises a BaseException subclass
        return False


class Soak:
    def __init__(self, args):
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="kvs-soak-", dir="/tmp"))
        os.environ.setdefault("KVSHELF_BIN", args.bin)
        self.h = conftest.Harness(self.dir)
        self.ns = faults.NetNs("s") if args.partition else None
        self.rpc = conftest.free_port()
        self.http = conftest.free_port()
        self.m = None
        self.node = None
        self.counts = {}
        self.recovery_misses = 0
        self.restarts = {"master": 0, "node": 0}

    # ------------------------------------------------------------ processes
    def start_master(self, put_timeout_ms=None):
        listen = ("0.0.0.0:%d" if self.ns else "127.0.0.1:%d") % self.rpc
        self.m = self.h.start_master(listen=listen, http="127.0.0.1:%d" % self.http,
                                     ttl_ms=self.args.ttl_ms, put_timeout_ms=put_timeout_ms,
                                     secret=SECRET)

    def start_node(self):
        env = dict(self.h.env)
        args = [self.h.bin, "node", "--segment-size", self.args.segment, "--secret", SECRET]
        if self.ns:
            env["KVSHELF_NO_LOCAL_SOCKET"] = "1"
            args += ["--master", "%s:%d" % (self.ns.host_ip, self.rpc),
                     "--local-hostname", self.ns.ns_ip]
            args = self.ns.exec_args(args)
        else:
            args += ["--master", self.m.addr]
        self.node = self.h.spawn("node", args, env=env)
        self.h.wait_for(lambda: self.h.segment_count(self.m) >= 1, 60, "the node's segment",
                        proc=self.node)

    def node_pid(self):
        """The kvshelf node process (ip netns exec execs it: same pid)."""
        return self.node.pid

    def start_verifiers(self):
        h, m = self.h, self.m
        remote = faults.remote_env(h)
        # fixed sizes where space is taken over: a given-up put's space fits
        # the next put exactly (what makes a late write land on another object)
        self.vs = [
            # mostly puts through the node's transfer server (T_WRITEs in flight)
            faults.Verifier(h, m, "verify-remote", "--threads", 4, "--keys", 4, "--sizes", "1M",
                            "--rewrite", 90, "--timeout-ms", 1000, env=remote),
            # mostly gets, memcpy from the mapped segment
            faults.Verifier(h, m, "verify-local", "--threads", 2, "--keys", 8, "--sizes", "1M",
                            "--rewrite", 30, "--timeout-ms", 1000),
            faults.Verifier(h, m, "verify-zero-copy", "--threads", 1, "--keys", 8,
                            "--sizes", "64K-4M", "--rewrite", 50, "--zero-copy"),
            # in-place writes of 2 MiB in 64 KiB pieces 1 ms apart (~35 ms a put)
            faults.Verifier(h, m, "verify-slow", "--threads", 1, "--keys", 4, "--sizes", "2M",
                            "--rewrite", 60, "--write-delay-us", 1000),
        ]

    # --------------------------------------------------------------- faults
    def f_pause(self):
        os.kill(self.node_pid(), signal.SIGSTOP)
        time.sleep(3.0)
        os.kill(self.node_pid(), signal.SIGCONT)

    def f_kill_node(self):
        self.node.kill()
        self.restarts["node"] += 1
        self.start_node()

    def f_kill_master(self):
        self.m.proc.kill()
        self.restarts["master"] += 1
        time.sleep(0.5)
        self.start_master()

    def f_partition(self):
        self.ns.partition(True)
        try:
            time.sleep(6.0)
        finally:
            self.ns.partition(False)

    def f_put_timeout(self):
        self.m.proc.stop()
        self.restarts["master"] += 1
        self.start_master(put_timeout_ms=20)
        time.sleep(10.0)
        self.m.proc.stop()
        self.restarts["master"] += 1
        self.start_master()

    def f_writer_ttl(self):
        v = self.vs[3]
        v.proc.signal(signal.SIGSTOP)
        time.sleep(self.args.ttl_ms / 1000.0 + 1.5)
        v.proc.signal(signal.SIGCONT)

    def recover(self):
        """Waits until every reader hits again; a node or master that died
        on its own is restarted (and counted)."""
        if not self.m.proc.alive():
            self.counts["master died"] = self.counts.get("master died", 0) + 1
            self.start_master()
        if not self.node.alive():
            self.counts["node died"] = self.counts.get("node died", 0) + 1
            self.start_node()
        for v in self.vs:
            base = v.get("hits")
            try:
                v.wait_more("hits", base, 3, timeout=60)
            except AssertionError as e:
                self.recovery_misses += 1
                print("soak: %s" % str(e).splitlines()[0], flush=True)

    # ------------------------------------------------------------------ run
    def run(self):
        a = self.args
        print("soak: logs in %s; %s; %.1f minutes" % (
            self.dir, "node in netns %s" % self.ns.name if self.ns else "no partitions",
            a.minutes), flush=True)
        self.start_master()
        self.start_node()
        self.start_verifiers()
        for v in self.vs:
            v.wait(lambda p: p.get("hits", 0) >= 10, 120, "10 hits before the faults")
        rss0 = {"master": rss_kib(self.m.proc.pid), "node": rss_kib(self.node_pid())}
        kinds = [("pause", self.f_pause), ("kill-node", self.f_kill_node),
                 ("kill-master", self.f_kill_master), ("put-timeout", self.f_put_timeout),
                 ("writer-ttl", self.f_writer_ttl)]
        if self.ns:
            kinds.insert(3, ("partition", self.f_partition))
        rng = random.Random(a.seed)
        order = []
        t_end = time.time() + a.minutes * 60
        i = 0
        while time.time() < t_end:
            if not order:
                order = kinds[:]
                rng.shuffle(order)
            name, fn = order.pop()
            print("soak: %6.0f s  fault %-12s  %s" % (
                time.time() - (t_end - a.minutes * 60), name, self.line()), flush=True)
            fn()
            self.counts[name] = self.counts.get(name, 0) + 1
            self.recover()
            i += 1
        rss1 = {"master": rss_kib(self.m.proc.pid), "node": rss_kib(self.node_pid())}
        reps = [v.stop() for v in self.vs]
        self.table(reps, rss0, rss1)
        wrong = sum(r.get("wrong", 0) for r in reps)
        return 1 if wrong else 0

    def line(self):
        tot = {k: sum(v.get(k) for v in self.vs) for k in ("ops", "hits", "wrong")}
        return "ops %(ops)d hits %(hits)d wrong %(wrong)d" % tot

    def table(self, reps, rss0, rss1):
        cols = ("ops", "hits", "misses", "errors", "wrong", "wrong_bytes")
        print()
        print("%-18s" % "verifier" + "".join("%13s" % c for c in cols))
        tot = dict.fromkeys(cols, 0)
        for v, r in zip(self.vs, reps):
            print("%-18s" % v.name + "".join("%13d" % r.get(c, 0) for c in cols))
            for c in cols:
                tot[c] += r.get(c, 0)
        print("%-18s" % "total" + "".join("%13d" % tot[c] for c in cols))
        print()
        print("faults: " + ", ".join("%s x %d" % kv for kv in sorted(self.counts.items())))
        print("restarts: master %d, node %d; recoveries not seen within 60 s: %d" % (
            self.restarts["master"], self.restarts["node"], self.recovery_misses))

        def kib(x):
            return "%.1f MiB" % (x / 1024.0) if x else "-"
        print("RSS       %12s %12s" % ("start", "end"))
        for who in ("master", "node"):
            print("%-9s %12s %12s" % (who, kib(rss0[who]), kib(rss1[who])))
        print("(master and node at the end are the processes started last)")
        print("\nRESULT: %s" % ("WRONG BYTES READ" if tot["wrong"] else "no wrong read"))

    def close(self):
        try:
            self.h.stop_all()
        finally:
            if self.ns:
                self.ns.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="how long (default 5)")
    ap.add_argument("--bin", default=os.environ.get("KVSHELF_BIN") or str(REPO / "build/bin/kvshelf"))
    ap.add_argument("--ttl-ms", type=int, default=8000,
                    help="master --client-ttl-ms (default 8000: longer than a pause or a "
                         "partition, so the node stays registered through them)")
    ap.add_argument("--segment", default="128M", help="node segment size (default 128M)")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--no-partition", action="store_true", help="no netns, no partitions")
    args = ap.parse_args()
    args.bin = str(Path(args.bin).resolve())
    os.environ["KVSHELF_BIN"] = args.bin
    args.partition = not args.no_partition and netns_usable()
    s = Soak(args)
    try:
        rc = s.run()
    finally:
        s.close()
    sys.exit(rc)


if __name__ == "__main__":
    main()
