"""Fixtures of the kvshelf Python package tests.

The package must be installed (`pip install .`). Every test session uses its
own embedded pool in a temporary runtime_dir (stopped at the end with
`kvshelf stop`), and the tests that need a separate master start
`kvshelf master` on free loopback ports (port 0 + --port-file) and stop it.
"""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

kvshelf = pytest.importorskip("kvshelf", reason="the kvshelf package is not installed (pip install .)")

# Small pool for tests: the embedded master's segment is sized by the first client.
SEGMENT = "256MiB"


def kvshelf_bin():
    return os.environ.get("KVSHELF_BIN") or kvshelf._find_bin()


@pytest.fixture(scope="session")
def runtime_dir():
    d = tempfile.mkdtemp(prefix="kvshelf-pytest-")
    old = os.environ.get("KVSHELF_RUNTIME_DIR")
    os.environ["KVSHELF_RUNTIME_DIR"] = d
    yield d
    kvshelf.stop_pool(d)
    if old is None:
        os.environ.pop("KVSHELF_RUNTIME_DIR", None)
    else:
        os.environ["KVSHELF_RUNTIME_DIR"] = old
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def cfg(runtime_dir):
    """Configuration of the session's embedded pool."""
    return {"runtime_dir": runtime_dir, "global_segment_size": SEGMENT, "master_server_address": ""}


@pytest.fixture
def client(cfg):
    c = kvshelf.Client(cfg)
    yield c
    c.close()


@pytest.fixture
def uniq(request):
    """A prefix unique to the test, so keys never collide across tests."""
    return "%s-%d-%d-" % (request.node.name, os.getpid(), time.monotonic_ns())


class Master:
    def __init__(self, proc, rpc, http, logf):
        self.proc, self.rpc, self.http, self.logf = proc, rpc, http, logf

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.rpc

    @property
    def metadata_url(self):
        return "http://127.0.0.1:%d/metadata" % self.http

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def master(tmp_path):
    """A `kvshelf master` on free loopback ports (stopped at the end)."""
    exe = kvshelf_bin()
    if not exe:
        pytest.skip("the kvshelf binary is not available")
    pf = tmp_path / "master.port"
    logf = open(tmp_path / "master.log", "wb")
    p = subprocess.Popen([exe, "master", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
                          "--port-file", str(pf)], stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.time() + 15
    m = None
    while time.time() < deadline:
        if p.poll() is not None:
            logf.close()
            raise AssertionError("master exited: " + (tmp_path / "master.log").read_text())
        try:
            d = json.loads(pf.read_text())
            if d.get("rpc") and d.get("http"):
                m = Master(p, int(d["rpc"]), int(d["http"]), logf)
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    if m is None:
        p.kill()
        raise AssertionError("master did not start")
    yield m
    m.stop()
    logf.close()
