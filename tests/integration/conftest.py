"""Fixtures of the kvshelf integration tests.

Python only drives processes here: every test starts real `kvshelf master`,
`kvshelf node` and `kvshelf bench` processes (the binary named by
$KVSHELF_BIN, default build/bin/kvshelf) on loopback, on ports chosen free at
run time (port 0 + --port-file), and stops every one of them at the end
(SIGTERM, then SIGKILL). Byte-exact checks run inside `kvshelf bench --verify`
(values derived from their key, compared byte by byte), whose --json report
the tests assert on. When a test fails, the logs of its processes are added
to the pytest report.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
DEFAULT_TTL_MS = 1500


def kvshelf_bin():
    b = os.environ.get("KVSHELF_BIN") or str(REPO / "build" / "bin" / "kvshelf")
    return str(Path(b).resolve())


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s")
    config.addinivalue_line(
        "markers", "other_host: a client as on a second host (unshare -m, else KVSHELF_NO_SHM=1)")


def can_fake_other_host():
    """A process can be made to see another host id (boot id) and its own
    /dev/shm with a private mount namespace. Needs root (or user namespaces)."""
    if not shutil.which("unshare"):
        return False
    try:
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c",
             "mount --bind /proc/self/stat /proc/sys/kernel/random/boot_id"],
            capture_output=True, timeout=10)
        return r.returncode == 0
    except Exception:
        return False


class Proc:
    """A process with its output captured into log files."""

    def __init__(self, harness, name, args, env, stdout_to_file=False):
        self.h = harness
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = harness.dir / f"{name}.log"
        self.out_path = harness.dir / f"{name}.out" if stdout_to_file else None
        self._log = open(self.log_path, "wb")
        self._out = open(self.out_path, "wb") if self.out_path else None
        self._log.write(("$ " + " ".join(self.args) + "\n").encode())
        self._log.flush()
        self.p = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL,
            stdout=self._out if self._out else self._log,
            stderr=self._log, env=env, start_new_session=True)
        self.pid = self.p.pid
        self.killed = False  # SIGKILLed on purpose by a test
        self.forced = False  # needed SIGKILL after SIGTERM
        self.expect_failure = False  # a test expects it to fail (not a problem)

    def alive(self):
        return self.p.poll() is None

    def signal(self, sig):
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self):
        """SIGKILL and reap (a crash, as far as the rest of the pool knows)."""
        self.killed = True
        self.signal(signal.SIGKILL)
        self.p.wait(timeout=10)
        self._close()

    def stop(self, timeout=8.0):
        """SIGTERM, wait, then SIGKILL. Returns the exit status."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.forced = True
                self.signal(signal.SIGKILL)
                self.p.wait(timeout=10)
                self._log_note("harness: did not exit on SIGTERM within %.0f s: SIGKILL" % timeout)
        self._close()
        return self.p.returncode

    def wait(self, timeout):
        try:
            rc = self.p.wait(timeout=timeout)
        finally:
            pass
        self._close()
        return rc

    def _log_note(self, text):
        try:
            with open(self.log_path, "ab") as f:
                f.write(("\n" + text + "\n").encode())
        except OSError:
            pass

    def _close(self):
        for f in (self._log, self._out):
            if f and not f.closed:
                f.close()
        self.h.clean_shm(self.pid)

    def log_text(self, limit=20000):
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        text = data.decode(errors="replace")
        return text if len(text) <= limit else "...\n" + text[-limit:]

    def stdout_text(self):
        return self.out_path.read_text(errors="replace") if self.out_path else ""


class Master:
    def __init__(self, proc, rpc, http, secret=None, args=None):
        self.proc = proc
        self.rpc = rpc
        self.http = http
        self.secret = secret
        self.args = args

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.rpc

    @property
    def http_addr(self):
        return "127.0.0.1:%d" % self.http


class Harness:
    """Processes of one test. Everything started through it is stopped at the
    end, and its logs are attached to the report when the test fails."""

    def __init__(self, tmp_path):
        self.bin = kvshelf_bin()
        if not os.access(self.bin, os.X_OK):
            pytest.fail("kvshelf binary not found at %s (build it, or set KVSHELF_BIN)" % self.bin)
        self.dir = Path(tmp_path)
        # short path: unix socket names are limited to 108 bytes
        self.rt = Path(tempfile.mkdtemp(prefix="kvs-it-", dir="/tmp"))
        self.procs = []
        self.nbench = 0
        self.env = {k: v for k, v in os.environ.items()
                    if not (k.startswith("KVSHELF_") or k == "MOONCAKE_CONFIG_PATH")}
        self.env.update({
            "KVSHELF_BIN": self.bin,
            "KVSHELF_RUNTIME_DIR": str(self.rt / "pool"),
            "XDG_RUNTIME_DIR": str(self.rt),
            "KVSHELF_LOG": os.environ.get("KVSHELF_LOG", "info"),
        })
        if "ASAN_OPTIONS" in os.environ:
            self.env["ASAN_OPTIONS"] = os.environ["ASAN_OPTIONS"]
        self.uid = os.getuid()
        self._fake_host = None

    # ---------------------------------------------------------------- procs
    def spawn(self, name, args, env=None, stdout_to_file=False):
        base = name
        i = 1
        while any(p.name == name for p in self.procs):
            i += 1
            name = "%s-%d" % (base, i)
        p = Proc(self, name, args, env or self.env, stdout_to_file=stdout_to_file)
        self.procs.append(p)
        return p

    def clean_shm(self, pid):
        """Removes the shared-memory segments a dead process left behind."""
        for f in SHM.glob("kvshelf-%d-%d-*" % (self.uid, pid)):
            try:
                f.unlink()
            except OSError:
                pass

    def start_master(self, name="master", listen="127.0.0.1:0", http="127.0.0.1:0",
                     ttl_ms=DEFAULT_TTL_MS, lease_ms=None, put_timeout_ms=None,
                     evict=None, secret=None, extra=(), timeout=15):
        pf = self.dir / ("%s.port" % name)
        if pf.exists():
            pf.unlink()
        args = [self.bin, "master", "--listen", listen, "--http", http, "--port-file", pf,
                "--client-ttl-ms", ttl_ms]
        if lease_ms is not None:
            args += ["--lease-ms", lease_ms]
        if put_timeout_ms is not None:
            args += ["--put-timeout-ms", put_timeout_ms]
        if evict is not None:
            args += ["--evict-high", evict[0], "--evict-low", evict[1]]
        if secret:
            args += ["--secret", secret]
        args += list(extra)
        p = self.spawn(name, args)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not p.alive():
                raise AssertionError("master exited with %s:\n%s" % (p.p.returncode, p.log_text()))
            try:
                d = json.loads(pf.read_text())
                if d.get("rpc") and d.get("http"):
                    return Master(p, int(d["rpc"]), int(d["http"]), secret, args)
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError("master did not write its port file within %ss" % timeout)

    def restart_master(self, m, down_s=0.0, **kw):
        """Stops master m and starts a new one on the same ports (same
        options otherwise unless overridden)."""
        rc = m.proc.stop()
        time.sleep(down_s)
        kw.setdefault("secret", m.secret)
        return self.start_master(name="master", listen=m.addr, http=m.http_addr, **kw)

    def start_node(self, m, segment_size="256M", name="node", secret=None, wait=True,
                   extra=()):
        before = self.segment_count(m) if wait else 0
        args = [self.bin, "node", "--master", m.addr, "--segment-size", segment_size]
        sec = secret if secret is not None else m.secret
        if sec:
            args += ["--secret", sec]
        args += list(extra)
        p = self.spawn(name, args)
        if wait:
            self.wait_for(lambda: self.segment_count(m) >= before + 1, 15,
                          "node %s to mount its segment" % p.name, proc=p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:
                pass
        self.stop_embedded()
        shutil.rmtree(self.rt, ignore_errors=True)

    def problems(self):
        """Daemons that did not exit cleanly on SIGTERM, and sanitizer
        reports in any log: each a line of text."""
        out = []
        for p in self.procs:
            text = p.log_text(limit=10 ** 7)
            for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                           "Segmentation fault", "Assertion `"):
                if marker in text:
                    out.append("%s: log contains %r" % (p.name, marker))
            daemon = len(p.args) > 1 and p.args[1] in ("master", "node", "metadata")
            if daemon and not p.killed and not p.expect_failure:
                if p.forced:
                    out.append("%s did not exit within 8 s of SIGTERM" % p.name)
                elif p.p.returncode not in (0, None):
                    out.append("%s exited with status %s" % (p.name, p.p.returncode))
        return out

    # ---------------------------------------------------------- embedded
    def embedded_pids(self):
        """Pids of processes started for this test's runtime dir (the
        embedded pool's master), found by their command line."""
        pids = []
        me = str(self.rt)
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                env_hit = False
                if any(me.encode() in a for a in cmd):
                    env_hit = True
                if env_hit and int(d.name) not in (p.pid for p in self.procs):
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    def stop_embedded(self):
        pool = self.rt / "pool"
        if pool.exists():
            try:
                subprocess.run([self.bin, "stop"], env=self.env, capture_output=True, timeout=10)
            except Exception:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and self.embedded_pids():
            time.sleep(0.1)
        for pid in self.embedded_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            self.clean_shm(pid)

    # ------------------------------------------------------------- tools
    def run(self, *args, timeout=30, check=False, env=None):
        r = subprocess.run([self.bin] + [str(a) for a in args], capture_output=True,
                           timeout=timeout, env=env or self.env)
        with open(self.dir / "commands.log", "ab") as f:
            f.write(("$ kvshelf %s\n-> rc %d\n" % (" ".join(map(str, args)), r.returncode)).encode())
            f.write(r.stdout[-4000:] + b"\n" + r.stderr[-4000:] + b"\n")
        if check and r.returncode != 0:
            raise AssertionError("kvshelf %s failed (%d):\n%s\n%s" % (
                " ".join(map(str, args)), r.returncode, r.stdout.decode(errors="replace"),
                r.stderr.decode(errors="replace")))
        return r

    def status(self, m=None, env=None):
        args = ["status", "--json"]
        if m is not None:
            args += ["--master", m.addr]
            if m.secret:
                args += ["--secret", m.secret]
        r = self.run(*args, env=env)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def segment_count(self, m):
        st = self.status(m)
        if not st:
            return 0
        return len(segments_of(st))

    def wait_for(self, cond, timeout, what, interval=0.1, proc=None):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            if proc is not None and not proc.alive():
                raise AssertionError("%s exited (%s) while waiting for %s:\n%s" % (
                    proc.name, proc.p.returncode, what, proc.log_text()))
            time.sleep(interval)
        raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))

    def other_host_wrap(self, args, env):
        """Runs args as if on another host: a private mount namespace with its
        own boot id (so the host id differs: no shared-memory mapping, all
        bytes through the transfer engine) and its own /dev/shm. Without the
        privileges for that, KVSHELF_NO_SHM=1 gives the same data path (the
        client maps no other process's segment). Returns (argv, env)."""
        if self._fake_host is None:
            self._fake_host = can_fake_other_host()
        if not self._fake_host:
            env = dict(env or self.env)
            env["KVSHELF_NO_SHM"] = "1"
            return [str(a) for a in args], env
        fake = self.dir / "fake_boot_id"
        fake.write_text("0badc0de-0000-4000-8000-%012x\n" % (os.getpid() & 0xffffffffffff))
        script = ('mount --bind "$0" /proc/sys/kernel/random/boot_id && '
                  'mount -t tmpfs -o size=4g tmpfs /dev/shm && exec "$@"')
        return ["unshare", "-m", "sh", "-c", script, str(fake)] + [str(a) for a in args], env

    def bench_args(self, m, *args, secret=None):
        a = [self.bin, "bench", "--json", "--quiet"]
        if m is not None:
            a += ["--master", m.addr]
            sec = secret if secret is not None else m.secret
            if sec:
                a += ["--secret", sec]
        return a + [str(x) for x in args]

    def bench(self, m, *args, timeout=120, secret=None, other_host=False, env=None):
        """Runs `kvshelf bench --json` to completion; returns its report
        (dict) with '_rc' added."""
        p = self.bench_bg(m, *args, secret=secret, other_host=other_host, env=env)
        return self.bench_result(p, timeout)

    def bench_bg(self, m, *args, secret=None, other_host=False, env=None):
        self.nbench += 1
        argv = self.bench_args(m, *args, secret=secret)
        if other_host:
            argv, env = self.other_host_wrap(argv, env)
        return self.spawn("bench-%d" % self.nbench, argv, env=env, stdout_to_file=True)

    def bench_result(self, p, timeout=120):
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.stop()
            raise AssertionError("bench %s did not finish in %ss:\n%s" % (
                p.name, timeout, p.log_text()))
        out = p.stdout_text().strip()
        try:
            d = json.loads(out.splitlines()[-1]) if out else None
        except ValueError:
            d = None
        if d is None:
            raise AssertionError("bench %s (rc %s) printed no JSON report:\n%s\n%s" % (
                p.name, rc, out[-2000:], p.log_text()))
        d["_rc"] = rc
        return d

    # ------------------------------------------------------------- report
    def logs(self):
        out = []
        for p in self.procs:
            out.append(("%s (pid %d, rc %s)" % (p.name, p.pid, p.p.returncode), p.log_text()))
            if p.out_path:
                out.append(("%s stdout" % p.name, p.stdout_text()[-8000:]))
        cl = self.dir / "commands.log"
        if cl.exists():
            out.append(("commands", cl.read_text(errors="replace")[-20000:]))
        return out


# ------------------------------------------------------------------ helpers
def segments_of(status):
    segs = status.get("segments")
    if isinstance(segs, dict):
        segs = segs.get("list") or segs.get("items") or []
    return segs or []


def row(report, mode, size=None):
    """The result row of one mode (and size) in a bench report."""
    for r in report["results"]:
        if r["mode"] == mode and (size is None or r["size"] == size):
            return r
    raise AssertionError("no %s/%s row in bench report: %s" % (
        mode, size, [(r["mode"], r["size"]) for r in report["results"]]))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def assert_clean(rep, what=""):
    """A bench report with no fatal error, no wrong byte, no error, rc 0."""
    assert rep["fatal"] == 0, (what, rep.get("fatal_message"), rep["totals"])
    assert rep["totals"]["mismatches"] == 0, (what, rep["totals"])
    assert rep["totals"]["errors"] == 0, (what, [(r["mode"], r["error_codes"]) for r in rep["results"]])
    assert rep["_rc"] == 0, (what, rep["_rc"])


def small_and_large(prefix):
    """The key sets of the kill -9 tests, ((bench args, count), ...): 400
    small objects (1 B-64 KiB, keys <prefix>s/...) and 60 large ones
    (64 KiB-2 MiB, keys <prefix>l/...), verified and kept."""
    return ((["--sizes", "1-64K", "--count", 400, "--prefix", prefix + "s", "--verify", "--keep"],
             400),
            (["--sizes", "64K-2M", "--count", 60, "--prefix", prefix + "l", "--verify", "--keep"],
             60))


def put_sets(kv, m, sets, get=False):
    """Puts every object of each bench key set (args, count) through master
    m (and, with get, reads each set back at once)."""
    for args, n in sets:
        p = kv.bench(m, "--mode", "put", "--batch", 8, *args)
        assert_clean(p, "put")
        assert row(p, "put")["ok"] == n
        if get:
            g = kv.bench(m, "--mode", "get", *args)
            assert_clean(g, "get before")
            assert row(g, "get")["ok"] == n


def put_fresh(kv, m, prefix, nsegs, lease_ms):
    """After the quiet time of one lease (lease_ms) of a restarted master
    (or a new leader): 100 new objects (keys <prefix>/...) land through m
    and read back, and the nsegs segments' directories list them. Returns
    the key set (bench args, 100)."""
    time.sleep(lease_ms / 1000.0)
    fresh = ["--sizes", "4K-256K", "--count", 100, "--prefix", prefix, "--verify", "--keep"]
    f = kv.bench(m, "--mode", "put,get", *fresh)
    assert_clean(f, "fresh")
    assert row(f, "put")["ok"] == 100 and row(f, "get")["ok"] == 100
    kv.wait_for(lambda: directories_settled(kv, m, nsegs), 10, "the directories to settle")
    return fresh, 100


def assert_all_hits(kv, m, sets, what):
    """Every object of each bench key set (args, count) is a hit, byte for
    byte, and exists (gets and exists through master m)."""
    for args, n in sets:
        g = kv.bench(m, "--mode", "get,exists", "--batch", 8, *args)
        assert_clean(g, what)
        assert row(g, "get")["ok"] == n and row(g, "get")["miss"] == 0, row(g, "get")
        assert row(g, "exists")["ok"] == n


def recovery(st):
    """The "recovery" part of a master's status ({} when there is none)."""
    return (st or {}).get("recovery") or {}


def directories_settled(kv, m, nsegs, env=None):
    """The master has nsegs segments and every one's directory lists what
    the master stored (no change waits to be sent or confirmed)."""
    st = kv.status(m, env=env)
    if not st:
        return False
    segs = segments_of(st)
    return len(segs) == nsegs and all(
        s.get("directory") and s["directory"]["pending_changes"] == 0 for s in segs)


@pytest.fixture
def kv(request, tmp_path):
    h = Harness(tmp_path)
    request.node._kvs_harness = h
    yield h
    h.stop_all()
    bad = h.problems()
    if bad:
        pytest.fail("process problems: " + "; ".join(bad), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    h = getattr(item, "_kvs_harness", None)
    if h is not None and rep.failed:
        for name, text in h.logs():
            rep.sections.append(("kvshelf: " + name, text))
