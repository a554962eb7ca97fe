"""Helpers of the fault tests (issue 12, "never wrong bytes"): the
`kvshelf verify` checker in its two forms (a load in the background with a
progress file, and a script driven line by line), private /dev/shm and PID
namespaces ("containers"), network namespaces with a partition switch, and
the receive queues of a process's TCP sockets.

Everything here starts real processes through the Harness of conftest.py
(so they are stopped and their logs reported like the others), or undoes
what it set up (namespaces, mounts) when the test ends.
"""
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Proc, segments_of

SECRET = "faults-secret-0123456789"


# ------------------------------------------------------------------ checks
def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, mounts, signals to other processes)")


def need_unshare(pid_ns=False):
    need_root()
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("unshare/nsenter (util-linux) not installed")
    args = ["unshare", "-m", "--propagation", "private"]
    if pid_ns:
        args += ["-p", "--fork"]
    r = subprocess.run(args + ["sh", "-c", "mount -t tmpfs -o size=1M tmpfs /dev/shm"],
                       capture_output=True, timeout=20)
    if r.returncode != 0:
        pytest.skip("unshare %s unavailable: %s" % (" ".join(args[1:]), r.stderr.decode()[-200:]))


def need_netns():
    need_root()
    for tool in ("ip", "nft"):
        if not shutil.which(tool):
            pytest.skip("%s not installed (scripts/deps.sh installs nftables)" % tool)
    name = "kvsprobe%d" % os.getpid()
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=20)
    if r.returncode != 0:
        pytest.skip("ip netns unavailable: %s" % r.stderr.decode()[-200:])
    try:
        r = subprocess.run(["ip", "netns", "exec", name, "nft", "add", "table", "inet", "probe"],
                           capture_output=True, timeout=20)
        if r.returncode != 0:
            pytest.skip("nftables unavailable in a network namespace: %s" % r.stderr.decode()[-200:])
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def signal_name(rc):
    if rc is not None and rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return "signal %d" % -rc
    return None


def no_sigbus(h):
    """No process of the test died of SIGBUS (or SIGSEGV)."""
    bad = []
    for p in h.procs:
        rc = p.p.poll()
        if rc in (-signal.SIGBUS, -signal.SIGSEGV, 128 + signal.SIGBUS, 128 + signal.SIGSEGV):
            bad.append("%s: rc %s" % (p.name, rc))
        text = p.log_text(limit=10 ** 6)
        if "Bus error" in text:
            bad.append("%s: log says Bus error" % p.name)
    return bad


# ---------------------------------------------------------------- verifier
def verify_argv(h, m, *extra, secret=None, master_addr=None):
    a = [h.bin, "verify", "--json", "--quiet", "--master", master_addr or m.addr]
    sec = secret if secret is not None else m.secret
    if sec:
        a += ["--secret", sec]
    return a + [str(x) for x in extra]


def wait_stopped(pid, timeout=10.0):
    """Waits until every thread of pid is stopped (state T after SIGSTOP):
    kill() returns before the threads reach the stop, and a thread that was
    running may still serve a request in between."""
    from pathlib import Path
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = []
        for t in Path("/proc/%d/task" % pid).iterdir():
            try:
                st = (t / "stat").read_text()
            except OSError:
                continue
            states.append(st[st.rindex(")") + 2])
        if states and all(c in "Tt" for c in states):
            return
        time.sleep(0.005)
    raise AssertionError("process %d did not stop within %.0f s" % (pid, timeout))


def remote_env(h, env=None):
    """A client that maps no other process's segment: every byte through the
    owner's transfer server (as from another host)."""
    e = dict(env or h.env)
    e["KVSHELF_NO_SHM"] = "1"
    return e


class Verifier:
    """`kvshelf verify` load in the background; --progress is read while it
    runs, the final report once it is stopped."""

    def __init__(self, h, m, name, *extra, env=None, wrap=(), secret=None, master_addr=None):
        self.h = h
        self.progress_path = h.dir / ("%s.progress.json" % name)
        argv = list(wrap) + verify_argv(h, m, "--progress", self.progress_path, *extra,
                                        secret=secret, master_addr=master_addr)
        self.proc = h.spawn(name, argv, env=env, stdout_to_file=True)
        self.name = self.proc.name
        self.report = None

    def progress(self):
        try:
            return json.loads(self.progress_path.read_text())
        except (OSError, ValueError):
            return None

    def get(self, field):
        p = self.progress()
        return p.get(field, 0) if p else 0

    def wait(self, cond, timeout, what):
        self.h.wait_for(lambda: cond(self.progress() or {}), timeout,
                        "%s: %s" % (self.name, what), proc=self.proc)

    def wait_more(self, field, base, n=1, timeout=60):
        """Waits until `field` has grown by n over `base`."""
        self.wait(lambda p: p.get(field, 0) >= base + n, timeout,
                  "%s to reach %d (now %s)" % (field, base + n, self.get(field)))

    def stop(self, timeout=60):
        """SIGTERM (the verifier finishes its current operation and reports),
        then the report with '_rc' added."""
        if self.report is not None:
            return self.report
        if self.proc.alive():
            self.proc.signal(signal.SIGCONT)
            self.proc.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.stop()
            raise AssertionError("verifier %s did not stop:\n%s" % (self.name, self.proc.log_text()))
        return self._result(rc)

    def finish(self, timeout=120):
        """Waits for a verifier with --ops/--duration to end by itself."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.stop()
            raise AssertionError("verifier %s did not finish in %ss:\n%s" % (
                self.name, timeout, self.proc.log_text()))
        return self._result(rc)

    def _result(self, rc):
        out = self.proc.stdout_text().strip()
        d = None
        for line in reversed(out.splitlines()):
            try:
                d = json.loads(line)
                break
            except ValueError:
                continue
        if d is None:
            raise AssertionError("verifier %s (rc %s, %s) printed no report:\n%s\n%s" % (
                self.name, rc, signal_name(rc), out[-2000:], self.proc.log_text()))
        d["_rc"] = rc
        self.report = d
        return d


def start_rewriters(h, m, n=2):
    """n verifiers that write, rewrite (remove, then put the next version)
    and read through master m, once each has read 30 hits."""
    vs = [Verifier(h, m, "verify-%d" % i, "--threads", 2, "--keys", 24, "--sizes", "4K-256K",
                   "--rewrite", 30, "--timeout-ms", 2000) for i in range(n)]
    for v in vs:
        v.wait(lambda p: p.get("hits", 0) >= 30, 60, "30 hits before the kill")
    return vs


def wait_more_hits(vs, n=30, timeout=60):
    """Waits until each verifier has read n more hits than now."""
    base = [v.get("hits") for v in vs]
    for v, b in zip(vs, base):
        v.wait_more("hits", b, n, timeout=timeout)


def stop_never_wrong(vs):
    """Stops the verifiers: none ever read another key's bytes, an older
    version than the last acknowledged one, or a corrupt byte."""
    for v in vs:
        rep = v.stop()
        assert rep.get("wrong", 1) == 0 and rep.get("wrong_bytes", 1) == 0, (
            "%s: wrong reads (foreign %s, stale %s, corrupt %s)" % (
                v.name, rep.get("foreign"), rep.get("stale"), rep.get("corrupt")), summary(rep))
        assert "fatal" not in rep, rep.get("fatal")


def summary(rep):
    keys = ("ops", "puts", "put_ok", "gets", "hits", "misses", "errors", "wrong", "wrong_bytes",
            "foreign", "stale", "corrupt", "error_codes", "_rc")
    return {k: rep.get(k) for k in keys}


class ScriptProc(Proc):
    """`kvshelf verify --script`: one operation per call of do(), its JSON
    result returned. Output also goes to the log."""

    def __init__(self, harness, name, args, env):
        self.h = harness
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = harness.dir / ("%s.log" % name)
        self.out_path = None
        self._log = open(self.log_path, "wb")
        self._out = None
        self._log.write(("$ " + " ".join(self.args) + "\n").encode())
        self._log.flush()
        self.p = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._log, env=env, start_new_session=True)
        self.pid = self.p.pid
        self.killed = self.forced = self.expect_failure = False
        self._buf = b""

    def _readline(self, timeout):
        deadline = time.time() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError("%s: no answer within %ss:\n%s" % (self.name, timeout,
                                                                       self.log_text()))
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError("%s exited (%s):\n%s" % (self.name, self.p.poll(),
                                                                 self.log_text()))
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        if not self._log.closed:
            self._log.write(b"> " + line + b"\n")
            self._log.flush()
        return json.loads(line)

    def do(self, line, timeout=60):
        if not self._log.closed:
            self._log.write(("< %s\n" % line).encode())
            self._log.flush()
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()
        return self._readline(timeout)

    def finish(self, timeout=30):
        """quit; returns the final report."""
        self.p.stdin.write(b"quit\n")
        self.p.stdin.flush()
        rep = self._readline(timeout)
        self.p.stdin.close()
        self.p.wait(timeout)
        self._close()
        return rep

    def _close(self):
        for f in (self.p.stdin, self.p.stdout):
            try:
                if f and not f.closed:
                    f.close()
            except OSError:
                pass
        super()._close()


def script(h, m, name, *extra, env=None, wrap=(), secret=None):
    argv = list(wrap) + verify_argv(h, m, "--script", *extra, secret=secret)
    base, i = name, 1
    while any(p.name == name for p in h.procs):
        i += 1
        name = "%s-%d" % (base, i)
    p = ScriptProc(h, name, argv, env or h.env)
    h.procs.append(p)
    return p


# --------------------------------------------------------------- sockets
def tcp_sockets(pid, port):
    """TCP sockets of the network namespace of `pid` with `port` at either
    end: list of (side, state, tx_queue, rx_queue), side "server" when the
    local port is `port`, "peer" when the remote one is. States: 01
    established, 08 close-wait, 0A listen."""
    out = []
    for f in ("tcp", "tcp6"):
        try:
            lines = Path("/proc/%d/net/%s" % (pid, f)).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            parts = ln.split()
            local, remote, st, queues = parts[1], parts[2], parts[3], parts[4]
            tx, rx = (int(x, 16) for x in queues.split(":"))
            if int(local.rsplit(":", 1)[1], 16) == port:
                out.append(("server", st, tx, rx))
            elif int(remote.rsplit(":", 1)[1], 16) == port:
                out.append(("peer", st, tx, rx))
    return out


def queued_bytes(pid, port):
    """Bytes on their way to the server on `port`: unread at the server,
    or not yet sent by a peer in the same network namespace."""
    n = 0
    for side, st, tx, rx in tcp_sockets(pid, port):
        if st != "0A":
            n += rx if side == "server" else tx
    return n


def drained(pid, port):
    """Every byte sent to the server on `port` has been read by it, and every
    connection its peer closed has been closed by it too."""
    socks = tcp_sockets(pid, port)
    return queued_bytes(pid, port) == 0 and \
        not any(side == "server" and st == "08" for side, st, _, _ in socks)


def segment_of(h, m):
    st = h.status(m)
    segs = segments_of(st) if st else []
    assert len(segs) == 1, segs
    return segs[0]


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def master_counters(h, m):
    st = h.status(m) or {}
    return st.get("counters", {})


# -------------------------------------------------------------- namespaces
class ShmNamespace:
    """A mount namespace with its own small /dev/shm (tmpfs of `size`), kept
    alive by a holder process; commands enter it with nsenter."""

    def __init__(self, h, name, size):
        self.h = h
        self.name = name
        script_ = ('mount -t tmpfs -o size=%s tmpfs /dev/shm && echo ready && exec cat' % size)
        self.p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script_],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True)
        line = self.p.stdout.readline()
        if line.strip() != b"ready":
            err = self.p.stderr.read().decode(errors="replace")
            self.close()
            raise AssertionError("mount namespace %s: %r %s" % (name, line, err))

    def wrap(self):
        return ["nsenter", "-t", str(self.p.pid), "-m", "--"]

    def run(self, *cmd):
        return subprocess.run(self.wrap() + [str(c) for c in cmd], capture_output=True,
                              timeout=20)

    def close(self):
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
            except OSError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


class Container:
    """`unshare -p -m --fork`: a PID namespace and a mount namespace with a
    private /dev/shm, running `kvshelf node` as its first process (pid 1
    inside). Clients enter it with nsenter -p -m (they get pids 2, 3, ...)."""

    def __init__(self, h, m, name, segment_size="64M", shm_size="256M", extra=()):
        self.h = h
        node = [h.bin, "node", "--master", m.addr, "--segment-size", segment_size]
        if m.secret:
            node += ["--secret", m.secret]
        node += list(extra)
        cmd = 'mount -t tmpfs -o size=%s tmpfs /dev/shm && exec "$@"' % shm_size
        # --kill-child: if unshare itself is stopped, the node gets SIGTERM too
        self.proc = h.spawn(name, ["unshare", "-p", "-m", "--fork", "--kill-child=SIGTERM",
                                   "--propagation", "private",
                                   "sh", "-c", cmd, "sh"] + node)
        self.name = self.proc.name
        self.node_pid = None
        h.wait_for(self._find_node, 15, "%s: the node process inside" % self.name,
                   proc=self.proc)

    def _find_node(self):
        try:
            for t in Path("/proc/%d/task" % self.proc.pid).iterdir():
                kids = (t / "children").read_text().split()
                for k in kids:
                    cmd = Path("/proc/%s/cmdline" % k).read_bytes().split(b"\0")
                    if len(cmd) > 1 and cmd[1] == b"node":
                        self.node_pid = int(k)
                        return True
        except OSError:
            return False
        return False

    def ns_pid(self):
        """The node's pid inside its namespace (NSpid's last field)."""
        for ln in Path("/proc/%d/status" % self.node_pid).read_text().splitlines():
            if ln.startswith("NSpid:"):
                return int(ln.split()[-1])
        return None

    def wrap(self):
        return ["nsenter", "-t", str(self.node_pid), "-p", "-m", "--"]

    def mounted(self):
        """The node said it contributes its segment (its MOUNT succeeded)."""
        return "contributing" in self.proc.log_text()

    def stop(self):
        """SIGTERM to the node (pid 1 inside: it handles SIGTERM), then the
        unshare process ends with it."""
        if self.node_pid and self.proc.alive():
            try:
                os.kill(self.node_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            return self.proc.stop()


class NetNs:
    """A network namespace joined to this one by a veth pair (/30 of
    10.213.x.y). `partition(True)` drops every packet on the namespace's end
    (nftables, inside the namespace only); `partition(False)` heals it."""

    def __init__(self, tag):
        self.name = "kvsf%d%s" % (os.getpid() % 100000, tag)
        self.host_if = ("kh%d%s" % (os.getpid() % 100000, tag))[:15]
        self.ns_if = ("kn%d%s" % (os.getpid() % 100000, tag))[:15]
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True).stdout.decode()
        for n in range(1, 250):
            net = "10.213.%d" % n
            if (net + ".") not in used:
                break
        self.host_ip, self.ns_ip = net + ".1", net + ".2"
        self.up = False
        cmds = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
            ["ip", "link", "set", self.ns_if, "netns", self.name],
            ["ip", "addr", "add", self.host_ip + "/24", "dev", self.host_if],
            ["ip", "link", "set", self.host_if, "up"],
            self.exec_args(["ip", "addr", "add", self.ns_ip + "/24", "dev", self.ns_if]),
            self.exec_args(["ip", "link", "set", self.ns_if, "up"]),
            self.exec_args(["ip", "link", "set", "lo", "up"]),
        ]
        for c in cmds:
            r = subprocess.run(c, capture_output=True, timeout=20)
            if r.returncode != 0:
                self.close()
                raise AssertionError("%s: %s" % (" ".join(c), r.stderr.decode()))
            self.up = True

    def exec_args(self, argv):
        return ["ip", "netns", "exec", self.name] + [str(a) for a in argv]

    def partition(self, on):
        if on:
            rules = ('table inet kvspart {\n'
                     ' chain in { type filter hook input priority 0; policy accept; '
                     'iifname "%s" drop; }\n'
                     ' chain out { type filter hook output priority 0; policy accept; '
                     'oifname "%s" drop; }\n}\n' % (self.ns_if, self.ns_if))
            r = subprocess.run(self.exec_args(["nft", "-f", "-"]), input=rules.encode(),
                               capture_output=True, timeout=20)
        else:
            r = subprocess.run(self.exec_args(["nft", "delete", "table", "inet", "kvspart"]),
                               capture_output=True, timeout=20)
        assert r.returncode == 0, r.stderr.decode()

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=20)
