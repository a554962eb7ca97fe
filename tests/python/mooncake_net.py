"""Mooncake's real processes in a network namespace of the test's own (issue 16).

Mooncake's client refuses to start where the only interface is loopback
("not valid LAN address found"), so the tests make a network namespace with a
veth pair inside it (10.88.0.1/24 on one end; the namespace has no link to the
host's network), start ``mooncake_master`` (with its HTTP metadata service)
there on free ports, and run each scenario in a Python process inside it:
that process imports ``kvshelf`` and Mooncake's ``mooncake.store`` (from the
venv of tests/integration/mooncake_env.py: ``mooncake-transfer-engine-non-cuda
==0.3.13.post1`` from PyPI), calls ``scenario_<name>(ctx)`` of the test module
and prints its result as a JSON line.

``MooncakeHosts``: several such "hosts" (a namespace each, routed through
the master's namespace) for scenarios across hosts (test_mooncake_hosts.py).

    python3 tests/python/mooncake_net.py bench [--rounds N]   # the side-by-side (root)

Needs root (``ip netns``), iproute2, and libibverbs1 for Mooncake's library.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NS_IP = "10.88.0.1"
CLONE_NEWNET = 0x40000000


def mooncake_env():
    """tests/integration/mooncake_env.py (loaded by path: that folder's
    conftest is not for these tests)."""
    name = "kvshelf_mooncake_env"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "integration" / "mooncake_env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def site_packages() -> Path:
    d = mooncake_env().venv_dir()
    found = sorted(d.glob("lib/python3*/site-packages"))
    if not found:
        raise RuntimeError("no site-packages in %s" % d)
    return found[0]


def netns_unavailable() -> str | None:
    """Why a network namespace with a veth pair cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to make a network namespace (ip netns) for Mooncake's processes"
    if not shutil.which("ip"):
        return "iproute2 (ip) is not installed"
    name = "kvsmcprobe%d" % os.getpid()
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=20)
    if r.returncode != 0:
        return "ip netns add failed: %s" % r.stderr.decode()[-300:]
    try:
        r = subprocess.run(["ip", "-n", name, "link", "add", "pa", "type", "veth", "peer", "name", "pb"],
                           capture_output=True, timeout=20)
        if r.returncode != 0:
            return "cannot make a veth pair in a network namespace: %s" % r.stderr.decode()[-300:]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
    return None


def net_fixture(tmp_path_factory, name: str, tag: str):
    """The body of a test module's ``net`` fixture (``yield from`` it): skips
    where a network namespace cannot be made, installs Mooncake from PyPI
    when missing (the test fails if it cannot), yields a MooncakeNet in a
    temporary folder named after `name` (`tag`: a suffix of the namespace's
    name, so that the modules' namespaces differ) and closes it after."""
    import pytest

    why = netns_unavailable()
    if why:
        pytest.skip(why)
    try:
        mooncake_env().provision()
    except RuntimeError as e:
        pytest.fail("cannot install Mooncake from PyPI for these tests: %s" % e)
    n = MooncakeNet(tmp_path_factory.mktemp(name), tag)
    yield n
    n.close()


class MooncakeNet:
    """A network namespace holding a veth pair with NS_IP, mooncake_master
    started on free ports inside it, and scenario processes run there."""

    def __init__(self, workdir: Path, tag: str = ""):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = "kvsmc%d%s" % (os.getpid() % 100000, tag)
        self.master = None
        self.master_log = None
        self.rpc = self.http = self.metrics = None
        self._n = 0
        cmds = [
            ["ip", "netns", "add", self.name],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
            ["ip", "-n", self.name, "link", "add", "mca", "type", "veth", "peer", "name", "mcb"],
            ["ip", "-n", self.name, "addr", "add", NS_IP + "/24", "dev", "mca"],
            ["ip", "-n", self.name, "link", "set", "mca", "up"],
            ["ip", "-n", self.name, "link", "set", "mcb", "up"],
        ]
        for c in cmds:
            r = subprocess.run(c, capture_output=True, timeout=20)
            if r.returncode != 0:
                self.close()
                raise RuntimeError("%s: %s" % (" ".join(c), r.stderr.decode()))

    # ------------------------------------------------------- namespace
    def in_ns(self, fn, *args):
        """fn(*args) on a thread that joined the namespace (setns affects
        only the calling thread), its value returned."""
        box = {}

        def run():
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open("/run/netns/%s" % self.name, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    box["exc"] = OSError(ctypes.get_errno(), "setns")
                    return
            finally:
                os.close(fd)
            try:
                box["val"] = fn(*args)
            except BaseException as e:  # noqa: BLE001
                box["exc"] = e

        th = threading.Thread(target=run)
        th.start()
        th.join()
        if "exc" in box:
            raise box["exc"]
        return box.get("val")

    def free_ports(self, n: int) -> list[int]:
        def get():
            socks = []
            try:
                for _ in range(n):
                    s = socket.socket()
                    s.bind((NS_IP, 0))
                    socks.append(s)
                return [s.getsockname()[1] for s in socks]
            finally:
                for s in socks:
                    s.close()
        return self.in_ns(get)

    def listening(self, port: int) -> bool:
        def probe():
            try:
                socket.create_connection((NS_IP, port), 0.5).close()
                return True
            except OSError:
                return False
        return self.in_ns(probe)

    # ---------------------------------------------------------- master
    def start_master(self, *extra: str, timeout: float = 30.0) -> subprocess.Popen:
        binary = mooncake_env().provision()
        self.rpc, self.http, self.metrics = self.free_ports(3)
        self._n += 1
        self.master_log = self.dir / ("mooncake_master.%d.log" % self._n)
        args = ["ip", "netns", "exec", self.name, str(binary),
                "--rpc_port", str(self.rpc), "--rpc_address", NS_IP,
                "--enable_http_metadata_server=true", "--http_metadata_server_host", NS_IP,
                "--http_metadata_server_port", str(self.http),
                "--metrics_port", str(self.metrics), *extra]
        with open(self.master_log, "wb") as logf:
            logf.write(("$ " + " ".join(args) + "\n").encode())
            logf.flush()
            self.master = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                raise RuntimeError("mooncake_master exited (rc %s):\n%s"
                                   % (self.master.returncode, self.log_tail(self.master_log)))
            if self.listening(self.rpc) and self.listening(self.http):
                return self.master
            time.sleep(0.1)
        self.stop_master()
        raise RuntimeError("mooncake_master did not listen within %.0f s:\n%s"
                           % (timeout, self.log_tail(self.master_log)))

    def stop_master(self, sig: int = signal.SIGTERM) -> None:
        p = self.master
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def config(self, **over) -> dict:
        cfg = {
            "store": "mooncake",
            "local_hostname": NS_IP,
            "metadata_server": "http://%s:%d/metadata" % (NS_IP, self.http),
            "master_server_address": "%s:%d" % (NS_IP, self.rpc),
            "protocol": "tcp",
            "device_name": "",
            "global_segment_size": "256MiB",
            "local_buffer_size": "32MiB",
            "staging_size": "64MiB",
        }
        cfg.update(over)
        return cfg

    # -------------------------------------------------------- scenarios
    def run(self, module: str, scenario: str, config: dict | None = None, timeout: float = 120.0,
            env: dict | None = None, python: str | None = None, **params) -> dict:
        """Runs scenario_<scenario>(ctx) of tests/python/<module>.py in a
        process inside the namespace; returns the dict it returned. Raises
        AssertionError with its output if it failed or ran past timeout.
        python: another interpreter (a venv's: then PYTHONPATH and
        KVSHELF_BIN, which point at this one's packages, are not passed)."""
        self._n += 1
        errf = self.dir / ("%s.%d.stderr" % (scenario, self._n))
        ctx = {"config": config if config is not None else self.config(),
               "master_pid": self.master.pid if self.master else None,
               "dir": str(self.dir), "params": params}
        e = dict(os.environ)
        if python:
            e.pop("PYTHONPATH", None)
            e.pop("KVSHELF_BIN", None)
        e.update({"KVSHELF_MC_CTX": json.dumps(ctx), "GLOG_minloglevel": "1"})
        e.update(env or {})
        args = ["ip", "netns", "exec", self.name, python or sys.executable, str(Path(__file__)),
                "child", module, scenario]
        t0 = time.monotonic()
        with open(errf, "wb") as err:
            p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=e,
                                 start_new_session=True)
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, _ = p.communicate()
                raise AssertionError("scenario %s ran past %.0f s (hung):\n%s\n%s" % (
                    scenario, timeout, out.decode()[-2000:], self.log_tail(errf)))
        took = time.monotonic() - t0
        text = out.decode()
        if p.returncode != 0:
            raise AssertionError("scenario %s failed (rc %s, %.1f s):\n%s\n--- stderr:\n%s" % (
                scenario, p.returncode, took, text[-3000:], self.log_tail(errf)))
        for line in reversed(text.strip().splitlines()):
            if line.startswith("{"):
                d = json.loads(line)
                d["_seconds"] = took
                return d
        raise AssertionError("scenario %s printed no result:\n%s" % (scenario, text[-3000:]))

    @staticmethod
    def log_tail(path: Path, n: int = 60) -> str:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        keep = [ln for ln in lines if not ln.startswith("I")]  # glog INFO lines are noise
        return "\n".join(keep[-n:])

    def close(self) -> None:
        self.stop_master(signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=20)


# ------------------------------------------------------------ many hosts
#: MooncakeHosts: host i (1, 2, ...) is HOSTS_NET.i.2 on its own /24, routed
#: through the master's namespace, which holds HOSTS_NET.i.1 on each link
HOSTS_NET = "10.88"
HOSTS_SUBNET0 = 21


class Spawned:
    """A scenario process started by MooncakeHosts.spawn (not waited for)."""

    def __init__(self, host: str, scenario: str, proc: subprocess.Popen, errf: Path, t0: float):
        self.host, self.scenario, self.proc, self.errf, self.t0 = host, scenario, proc, errf, t0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """sig to the process's group (its own session: only what it started)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


class MooncakeHosts:
    """Several "hosts" for Mooncake: a network namespace per host (``hosts``:
    their names), each linked by a veth pair to one more namespace, the
    master's, which routes between them (ip_forward) and runs
    ``mooncake_master`` with its HTTP metadata service. Host i has
    10.88.(20+i).2/24 on its interface ``eth0`` (default route via
    10.88.(20+i).1, the master's end); the master listens on the first
    host's link address (``master_ip``). Scenario processes run in a host's
    namespace (``run``: to the end; ``spawn``/``collect``: in the background,
    e.g. to kill one). Everything started here is stopped by ``close``."""

    def __init__(self, workdir: Path, tag: str = "", hosts: tuple[str, ...] = ("a", "b")):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        base = "kvsmh%d%s" % (os.getpid() % 100000, tag)
        self.mns = base + "m"
        self.ns = {h: base + h for h in hosts}
        self.ip = {h: "%s.%d.2" % (HOSTS_NET, HOSTS_SUBNET0 + i) for i, h in enumerate(hosts)}
        self.gw = {h: "%s.%d.1" % (HOSTS_NET, HOSTS_SUBNET0 + i) for i, h in enumerate(hosts)}
        self.master_ip = self.gw[hosts[0]]
        self.ifname = "eth0"
        self.master = None
        self.master_log = None
        self.rpc = self.http = self.metrics = None
        self.spawned: list[Spawned] = []
        self._n = 0
        cmds = [["ip", "netns", "add", self.mns],
                ["ip", "-n", self.mns, "link", "set", "lo", "up"],
                ["ip", "netns", "exec", self.mns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]]
        for i, h in enumerate(hosts):
            ns, port = self.ns[h], "h%d" % i
            cmds += [
                ["ip", "netns", "add", ns],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
                ["ip", "-n", self.mns, "link", "add", port, "type", "veth", "peer", "name",
                 self.ifname, "netns", ns],
                ["ip", "-n", self.mns, "addr", "add", self.gw[h] + "/24", "dev", port],
                ["ip", "-n", self.mns, "link", "set", port, "up"],
                ["ip", "-n", ns, "addr", "add", self.ip[h] + "/24", "dev", self.ifname],
                ["ip", "-n", ns, "link", "set", self.ifname, "up"],
                ["ip", "-n", ns, "route", "add", "default", "via", self.gw[h]],
            ]
        for c in cmds:
            r = subprocess.run(c, capture_output=True, timeout=20)
            if r.returncode != 0:
                self.close()
                raise RuntimeError("%s: %s" % (" ".join(c), r.stderr.decode()))

    # ------------------------------------------------------- namespaces
    def in_ns(self, ns: str, fn, *args):
        """fn(*args) on a thread inside network namespace ns (a name)."""
        box = {}

        def run():
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open("/run/netns/%s" % ns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    box["exc"] = OSError(ctypes.get_errno(), "setns")
                    return
            finally:
                os.close(fd)
            try:
                box["val"] = fn(*args)
            except BaseException as e:  # noqa: BLE001
                box["exc"] = e

        th = threading.Thread(target=run)
        th.start()
        th.join()
        if "exc" in box:
            raise box["exc"]
        return box.get("val")

    def link_bytes(self, host: str) -> dict:
        """{"rx": .., "tx": ..} bytes of host's eth0 so far (/proc/net/dev of its namespace)."""
        def read():
            # thread-self: setns moved this thread only; /proc/self/net is the process's
            for line in Path("/proc/thread-self/net/dev").read_text().splitlines():
                name, _, rest = line.partition(":")
                if name.strip() == self.ifname:
                    f = rest.split()
                    return {"rx": int(f[0]), "tx": int(f[8])}
            raise RuntimeError("no %s in /proc/net/dev" % self.ifname)
        return self.in_ns(self.ns[host], read)

    def free_ports(self, n: int) -> list[int]:
        def get():
            socks = []
            try:
                for _ in range(n):
                    s = socket.socket()
                    s.bind((self.master_ip, 0))
                    socks.append(s)
                return [s.getsockname()[1] for s in socks]
            finally:
                for s in socks:
                    s.close()
        return self.in_ns(self.mns, get)

    def reachable(self, host: str, port: int) -> bool:
        """Can `host` connect to the master's namespace on port (through the links)?"""
        def probe():
            try:
                socket.create_connection((self.master_ip, port), 0.5).close()
                return True
            except OSError:
                return False
        return self.in_ns(self.ns[host], probe)

    # ---------------------------------------------------------- master
    def start_master(self, *extra: str, timeout: float = 30.0) -> subprocess.Popen:
        binary = mooncake_env().provision()
        self.rpc, self.http, self.metrics = self.free_ports(3)
        self._n += 1
        self.master_log = self.dir / ("mooncake_master.%d.log" % self._n)
        args = ["ip", "netns", "exec", self.mns, str(binary),
                "--rpc_port", str(self.rpc), "--rpc_address", self.master_ip,
                "--enable_http_metadata_server=true", "--http_metadata_server_host", self.master_ip,
                "--http_metadata_server_port", str(self.http),
                "--metrics_port", str(self.metrics), *extra]
        with open(self.master_log, "wb") as logf:
            logf.write(("$ " + " ".join(args) + "\n").encode())
            logf.flush()
            self.master = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        last = list(self.ns)[-1]  # the farthest host: its packets cross the master's routing
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                raise RuntimeError("mooncake_master exited (rc %s):\n%s"
                                   % (self.master.returncode, MooncakeNet.log_tail(self.master_log)))
            if self.reachable(last, self.rpc) and self.reachable(last, self.http):
                return self.master
            time.sleep(0.1)
        self.stop_master()
        raise RuntimeError("mooncake_master did not listen within %.0f s:\n%s"
                           % (timeout, MooncakeNet.log_tail(self.master_log)))

    def stop_master(self, sig: int = signal.SIGTERM) -> None:
        MooncakeNet.stop_master(self, sig)

    def config(self, host: str, **over) -> dict:
        """MooncakeBlockStore's configuration for a client on `host`."""
        cfg = {
            "store": "mooncake",
            "local_hostname": self.ip[host],
            "metadata_server": "http://%s:%d/metadata" % (self.master_ip, self.http),
            "master_server_address": "%s:%d" % (self.master_ip, self.rpc),
            "protocol": "tcp",
            "device_name": "",
            "global_segment_size": "128MiB",
            "local_buffer_size": "32MiB",
            "staging_size": "64MiB",
        }
        cfg.update(over)
        return cfg

    # -------------------------------------------------------- scenarios
    def spawn(self, host: str, module: str, scenario: str, config: dict | None = None,
              env: dict | None = None, **params) -> Spawned:
        """Starts scenario_<scenario>(ctx) of tests/python/<module>.py in a
        process on `host` (its namespace, its own session) and returns at
        once; ``collect`` waits for its result. ctx.params has ``params``
        plus "host"; ctx.dir is this object's folder (shared by all hosts:
        a place for the scenarios to meet)."""
        self._n += 1
        errf = self.dir / ("%s.%s.%d.stderr" % (host, scenario, self._n))
        ctx = {"config": config if config is not None else self.config(host),
               "master_pid": self.master.pid if self.master else None,
               "dir": str(self.dir), "params": dict(params, host=host)}
        e = dict(os.environ)
        e.update({"KVSHELF_MC_CTX": json.dumps(ctx), "GLOG_minloglevel": "1"})
        e.update(env or {})
        args = ["ip", "netns", "exec", self.ns[host], sys.executable, str(Path(__file__)),
                "child", module, scenario]
        with open(errf, "wb") as err:
            p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=e,
                                 start_new_session=True)
        sp = Spawned(host, scenario, p, errf, time.monotonic())
        self.spawned.append(sp)
        return sp

    def collect(self, sp: Spawned, timeout: float = 120.0) -> dict:
        """The dict sp's scenario returned; AssertionError with its output
        if it failed or is not done within timeout (then it is killed)."""
        p = sp.proc
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            sp.kill()
            out, _ = p.communicate()
            raise AssertionError("scenario %s on host %s ran past %.0f s (hung):\n%s\n%s" % (
                sp.scenario, sp.host, timeout, out.decode()[-2000:], MooncakeNet.log_tail(sp.errf)))
        took = time.monotonic() - sp.t0
        text = out.decode()
        if p.returncode != 0:
            raise AssertionError("scenario %s on host %s failed (rc %s, %.1f s):\n%s\n--- stderr:\n%s"
                                 % (sp.scenario, sp.host, p.returncode, took, text[-3000:],
                                    MooncakeNet.log_tail(sp.errf)))
        for line in reversed(text.strip().splitlines()):
            if line.startswith("{"):
                d = json.loads(line)
                d["_seconds"] = took
                return d
        raise AssertionError("scenario %s on host %s printed no result:\n%s"
                             % (sp.scenario, sp.host, text[-3000:]))

    def run(self, host: str, module: str, scenario: str, config: dict | None = None,
            timeout: float = 120.0, env: dict | None = None, **params) -> dict:
        return self.collect(self.spawn(host, module, scenario, config, env, **params), timeout)

    def close(self) -> None:
        for sp in self.spawned:
            sp.kill()
            try:
                sp.proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError, OSError):
                pass
        self.stop_master(signal.SIGKILL)
        for ns in list(self.ns.values()) + [self.mns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def hosts_fixture(tmp_path_factory, name: str, tag: str, hosts: tuple[str, ...] = ("a", "b")):
    """As net_fixture, for a MooncakeHosts."""
    import pytest

    why = netns_unavailable()
    if why:
        pytest.skip(why)
    try:
        mooncake_env().provision()
    except RuntimeError as e:
        pytest.fail("cannot install Mooncake from PyPI for these tests: %s" % e)
    n = MooncakeHosts(tmp_path_factory.mktemp(name), tag, hosts)
    try:
        yield n
    finally:
        n.close()


# ------------------------------------------------------------- child side
def import_store(with_mooncake: bool = True):
    """kvshelf.mooncake_store: the installed package's, else the source's
    (python/kvshelf) on top of the installed package (its C extension).
    with_mooncake: also make Mooncake's package (in its venv) importable."""
    if with_mooncake:
        sp = str(site_packages())
        if sp not in sys.path:
            sys.path.append(sp)
    import kvshelf
    try:
        return importlib.import_module("kvshelf.mooncake_store")
    except ImportError:
        kvshelf.__path__.append(str(REPO / "python" / "kvshelf"))
        return importlib.import_module("kvshelf.mooncake_store")


class Ctx:
    def __init__(self, d: dict):
        self.config = d["config"]
        self.master_pid = d["master_pid"]
        self.dir = Path(d["dir"])
        self.params = d.get("params", {})

    def kill_master(self) -> None:
        os.kill(self.master_pid, signal.SIGKILL)


def child_main(module: str, scenario: str) -> int:
    sys.path.insert(0, str(HERE))
    ctx = Ctx(json.loads(os.environ["KVSHELF_MC_CTX"]))
    mod = importlib.import_module(module)
    res = getattr(mod, "scenario_" + scenario)(ctx)
    sys.stdout.write(json.dumps(res if isinstance(res, dict) else {"result": res}) + "\n")
    sys.stdout.flush()
    return 0


# ------------------------------------------------------------------ bench
def _gbps(nbytes: int, secs: float) -> float:
    return nbytes / secs / 1e9 if secs > 0 else float("inf")


def scenario_bench(ctx: Ctx) -> dict:
    """kvshelf's own pool (embedded, same host) vs Mooncake's own batch calls
    vs MooncakeBlockStore: host buffers, 1 MiB blocks, batches of 64, fresh
    keys every round; the best of the rounds (GB/s of payload)."""
    import numpy as np

    ms = import_store()
    import kvshelf

    rounds = int(ctx.params.get("rounds", 4))
    nb, bs = 64, 1 << 20
    rng = np.random.default_rng(1)
    src = [rng.integers(0, 255, bs, dtype=np.uint8) for _ in range(nb)]
    dst = [np.ones(bs, np.uint8) for _ in range(nb)]  # touched: no page faults in the timing
    out: dict = {"blocks": nb, "block_bytes": bs, "rounds": rounds}

    def best(fn):
        ts = []
        for r in range(rounds):
            t0 = time.perf_counter()
            fn(r)
            ts.append(time.perf_counter() - t0)
        return round(_gbps(nb * bs, min(ts)), 3)

    # kvshelf's own pool: the embedded pool of this namespace (shared memory)
    rd = tempfile.mkdtemp(prefix="kvshelf-mcbench-")
    kcfg = {"master_server_address": "", "runtime_dir": rd, "global_segment_size": "768MiB"}
    with kvshelf.Client(kcfg) as c:
        def kput(r):
            st = c.put_batch([b"kv-%d-%d" % (r, i) for i in range(nb)], src)
            assert all(x == 0 for x in st), st

        def kget(r):
            st = c.get_batch([b"kv-%d-%d" % (r, i) for i in range(nb)], dst)
            assert all(x == bs for x in st), st
        out["kvshelf_client_put"] = best(kput)
        out["kvshelf_client_get"] = best(kget)
        assert all(np.array_equal(a, b) for a, b in zip(src, dst))
    conn = kvshelf.Connector(kcfg, device=-2, namespace="mcbench")
    kv = np.stack(src)  # [blocks, 1 MiB]: block i = row i
    kv2 = np.ones_like(kv)
    conn.register_layout([kvshelf.layout_from_tensor(kv, block_dim=0)], num_blocks=nb)
    conn2 = kvshelf.Connector(kcfg, device=-2, namespace="mcbench")
    conn2.register_layout([kvshelf.layout_from_tensor(kv2, block_dim=0)], num_blocks=nb)

    def cdump(r):
        t = conn.dump([b"c-%d-%d" % (r, i) for i in range(nb)], list(range(nb)))
        assert t.wait(60) and t.failed() == [], t.results()

    def cload(r):
        t = conn2.load([b"c-%d-%d" % (r, i) for i in range(nb)], list(range(nb)))
        assert t.wait(60) and t.failed() == [], t.results()
    out["kvshelf_connector_dump"] = best(cdump)
    out["kvshelf_connector_load"] = best(cload)
    assert np.array_equal(kv, kv2)
    del conn, conn2
    kvshelf.stop_pool(rd)
    shutil.rmtree(rd, ignore_errors=True)

    # Mooncake's own batch calls from registered memory (the engine's ceiling)
    from mooncake.store import MooncakeDistributedStore
    mc = MooncakeDistributedStore()
    c = ctx.config
    rc = mc.setup({"local_hostname": c["local_hostname"], "metadata_server": c["metadata_server"],
                   "global_segment_size": kvshelf.parse_size(c["global_segment_size"]),
                   "local_buffer_size": kvshelf.parse_size(c["local_buffer_size"]),
                   "protocol": "tcp", "rdma_devices": "",
                   "master_server_addr": c["master_server_address"]})
    assert rc == 0, rc
    reg = np.ones(2 * nb * bs, np.uint8)
    reg[:nb * bs] = kv.reshape(-1)
    base = int(reg.ctypes.data)
    assert mc.register_buffer(base, reg.nbytes) == 0

    def mput(r):
        st = mc.batch_put_from(["mc-%d-%d" % (r, i) for i in range(nb)],
                               [base + i * bs for i in range(nb)], [bs] * nb)
        assert all(x == 0 for x in st), st

    def mget(r):
        st = mc.batch_get_into(["mc-%d-%d" % (r, i) for i in range(nb)],
                               [base + (nb + i) * bs for i in range(nb)], [bs] * nb)
        assert all(x == bs for x in st), st
    out["mooncake_batch_put_from"] = best(mput)
    out["mooncake_batch_get_into"] = best(mget)
    assert np.array_equal(reg[:nb * bs], reg[nb * bs:])
    mc.unregister_buffer(base)
    mc.close()

    # kvshelf blocks over Mooncake (this class): the caller's batches of 64,
    # cut into Mooncake calls of batch_size blocks (two stages in a pipeline)
    for bsz in ctx.params.get("store_batch", [16, 64]):
        with ms.MooncakeBlockStore(dict(c, staging_size="256MiB", batch_size=bsz)) as s:
            def sdump(r):
                t = s.dump([b"ms-%d-%d" % (r, i) for i in range(nb)], src)
                assert s.wait(t, 60) == [0] * nb, t.error

            def sload(r):
                t = s.load([b"ms-%d-%d" % (r, i) for i in range(nb)], dst)
                assert s.wait(t, 60) == [0] * nb, t.error
            for d in dst:
                d.fill(1)
            out["mooncake_block_store_dump_b%d" % bsz] = best(sdump)
            out["mooncake_block_store_load_b%d" % bsz] = best(sload)
            assert all(np.array_equal(a, b) for a, b in zip(src, dst))
            st = s.stats()
            out["store_stats_b%d" % bsz] = {
                "put_GBps": round(_gbps(st["dumped_bytes"], st["put_seconds"]), 3),
                "get_GBps": round(_gbps(st["loaded_bytes"], st["get_seconds"]), 3),
                "put_calls": st["put_calls"], "get_calls": st["get_calls"]}
    return out


def bench_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mooncake_net.py bench")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--store-batch", default="16,64",
                    help="batch_size values of MooncakeBlockStore to run (comma-separated)")
    a = ap.parse_args(argv)
    why = netns_unavailable()
    if why:
        print("cannot run: %s" % why, file=sys.stderr)
        return 2
    d = Path(tempfile.mkdtemp(prefix="kvshelf-mcbench-"))
    net = MooncakeNet(d, "b")
    try:
        net.start_master()
        sb = [int(x) for x in a.store_batch.split(",") if x]
        cfg = net.config(global_segment_size="%dMiB" % (64 * (a.rounds + 1) * 2 + 128))
        res = net.run("mooncake_net", "bench", cfg, timeout=600, rounds=a.rounds, store_batch=sb)
    except AssertionError as e:
        net.close()
        print(e, file=sys.stderr)
        print("logs kept in %s" % d, file=sys.stderr)
        return 1
    net.close()
    shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2], sys.argv[3]))
    if len(sys.argv) >= 2 and sys.argv[1] == "bench":
        sys.exit(bench_main(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
