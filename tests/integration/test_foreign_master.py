"""A kvshelf client pointed at a server that speaks another protocol fails at
once, saying so (issue 16: the seed's configuration points
master_server_address at a Mooncake master, port 50001), instead of waiting
out its whole timeout and reporting "cannot reach the master: timed out".

The judge is Mooncake's real master (`mooncake_master` from PyPI's
mooncake-transfer-engine-non-cuda 0.3.13.post1, cached by mooncake_env.py),
plus an HTTP server. A kvshelf master still works through the same code path
(the client probes only when no CHALLENGE came within 250 ms).
"""
import http.server
import socket
import subprocess
import threading
import time

import pytest

import mooncake_env

TIMEOUT_MS = 20000  # the seed's timeout; the failure must come long before it


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def run_put(kv, addr):
    env = dict(kv.env)
    env["KVSHELF_MASTER_SERVER_ADDRESS"] = addr
    env["KVSHELF_TIMEOUT_MS"] = str(TIMEOUT_MS)
    t0 = time.time()
    r = subprocess.run([kv.bin, "put", "k", "v"], env=env, capture_output=True, text=True,
                       timeout=TIMEOUT_MS / 1000 + 30)
    return r, time.time() - t0


def assert_foreign(r, took, addr):
    assert r.returncode != 0, r.stdout
    assert "does not speak kvshelf's protocol" in r.stderr, r.stderr
    assert addr in r.stderr and "KVS_ERR_PROTO" in r.stderr, r.stderr
    assert took < 5.0, "took %.1f s (timeout %d ms): %s" % (took, TIMEOUT_MS, r.stderr)


def test_mooncake_master_is_named_not_waited_for(kv):
    try:
        binary = mooncake_env.provision()
    except RuntimeError as e:
        pytest.fail("cannot install Mooncake from PyPI for this test: %s" % e)
    port, admin = free_port(), free_port()
    p = kv.spawn("mooncake-master", [str(binary), "--rpc_port", str(port),
                                     "--rpc_address", "127.0.0.1", "--metrics_port", str(admin)])
    kv.wait_for(lambda: listening(port), 30, "mooncake_master to listen", proc=p)
    r, took = run_put(kv, "127.0.0.1:%d" % port)
    assert_foreign(r, took, "127.0.0.1:%d" % port)
    assert p.alive(), "the probe killed Mooncake's master:\n" + p.log_text()


def test_http_server_is_named(kv):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        addr = "127.0.0.1:%d" % srv.server_address[1]
        r, took = run_put(kv, addr)
        assert_foreign(r, took, addr)
    finally:
        srv.shutdown()


def test_kvshelf_master_still_answers_a_slow_start(kv):
    """A master that sends its CHALLENGE late (stopped for a moment after the
    connect) receives the probe, ignores it, and the client carries on."""
    m = kv.start_master()
    m.proc.signal(19)  # SIGSTOP: the connection is queued, no CHALLENGE
    threading.Timer(0.8, lambda: m.proc.signal(18)).start()  # SIGCONT
    env = dict(kv.env)
    env["KVSHELF_MASTER_SERVER_ADDRESS"] = m.addr
    env["KVSHELF_TIMEOUT_MS"] = "5000"
    r = subprocess.run([kv.bin, "put", "slow-k", "v", "--secret", m.secret] if m.secret else
                       [kv.bin, "put", "slow-k", "v"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 or "NO_SPACE" in r.stderr, r.stderr  # (no node: no space is fine)
    assert "does not speak" not in r.stderr, r.stderr
