"""Private by default (issue 12 items 4 and 5): with nothing configured, the
processes of one user on a host work together, and every other user of the
host gets nothing from any port.

The tests run as root and act as another user (`nobody`) through
`setpriv --reuid=nobody --regid=nogroup --clear-groups`: this file, run as a
script, is the attacker; it prints what it got as JSON. It tries the
master's loopback TCP port (HELLO without or with a wrong secret, HELLO
claiming uid 0, requests without HELLO, pipelined HELLO + request), the
master's unix sockets (peer credentials), a node's and the embedded pool's
transfer ports (T_READ / T_WRITE, without and after a refused HELLO) and
SHUTDOWN; then the owner checks that the master still runs and that its
bytes are unchanged. `/metadata` on a master with a secret (loopback or not)
needs `Authorization: Bearer <secret>`. The owner, with nothing configured,
still puts and gets over TCP and through the transfer engine."""
import json
import os
import pwd
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kvswire as w

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------- attacker side
def _status(frames, mtype=None):
    """Statuses of the response frames (of type mtype if given)."""
    return [h[4] for h, _ in frames if mtype is None or h[1] == mtype]


def _try(fn):
    try:
        return fn()
    except OSError as e:
        return {"oserror": e.__class__.__name__ + ": " + str(e)}


def _master_attempt(connect, first_frames, secret=None, claim_uid=0, with_hello=True):
    """One connection: CHALLENGE, then (optionally) a HELLO as given and the
    other frames, all in one write. Returns what came back."""
    s = connect()
    try:
        hdr, body = w.read_frame(s)
        flags, nonce = struct.unpack("<I", body[:4])[0], body[4:20]
        data = b""
        if with_hello:
            data += w.frame(w.HELLO, w.hello_body(nonce, secret, uid=claim_uid), req_id=1)
        data += b"".join(first_frames)
        w.send_quietly(s, data)
        frames, closed = w.replies(s, timeout=2.0)
        return {"flags": flags, "offered_unix": w.challenge_unix_path(body),
                "statuses": [[h[1], h[4]] for h, _ in frames], "closed": closed}
    finally:
        s.close()


def _requests(key):
    k = w.wbytes(key)
    return {
        "GET": w.frame(w.GET, w.u64(1) + w.u32(1) + k, req_id=2),
        "PUT_START": w.frame(w.PUT_START, w.u64(1) + w.u32(1) + k + w.u64(4096), req_id=3),
        "REMOVE": w.frame(w.REMOVE, w.u32(1) + k, req_id=4),
        "EXISTS": w.frame(w.EXISTS, w.u32(1) + k, req_id=5),
        "SHUTDOWN": w.frame(w.SHUTDOWN, b"", req_id=6),
    }


def attack_master(a):
    """Everything a stranger can try on the master's TCP port (and the unix
    socket it offers)."""
    port, key = a["port"], a["key"].encode()
    conn = lambda: w.connect(port)  # noqa: E731
    reqs = _requests(key)
    out = {"uid": os.getuid()}
    out["hello_no_secret"] = _try(lambda: _master_attempt(conn, [], None))
    out["hello_wrong_secret"] = _try(lambda: _master_attempt(conn, [], "guess"))
    out["hello_claims_root_then_all"] = _try(
        lambda: _master_attempt(conn, list(reqs.values()), None, claim_uid=0))
    for name, f in reqs.items():
        out["no_hello_" + name] = _try(lambda f=f: _master_attempt(conn, [f], with_hello=False))
    offered = out["hello_no_secret"].get("offered_unix") if isinstance(
        out["hello_no_secret"], dict) else None
    out["offered_unix"] = offered
    if offered:
        out["unix_offered"] = _try(
            lambda: _master_attempt(lambda: w.connect_unix(offered), list(reqs.values())))
    out["read_secret"] = _try(lambda: {"secret": w.pool_secret(a["runtime_dir"])})
    return out


def attack_unix(a):
    """HELLO (claiming uid 0, no secret) on a unix socket, then requests."""
    reqs = _requests(a["key"].encode())
    conn = lambda: w.connect_unix(a["path"])  # noqa: E731
    order = ["EXISTS", "SHUTDOWN", "REMOVE"]
    return {"uid": os.getuid(),
            "hello_then": _try(lambda: _master_attempt(conn, [reqs[n] for n in order], None,
                                                      claim_uid=0))}


def attack_transfer(a):
    """T_READ / T_WRITE on a transfer port: without HELLO, after a HELLO
    without the secret, after one with a wrong secret; writes try every
    epoch from 0 to 4 over the first `span` bytes of the segment."""
    port, seg, span = a["port"], a["segment"], a["span"]
    junk = bytes([0x5A]) * min(span, 4 << 20)
    reads = [w.t_read(seg, off, min(4 << 20, span - off), req_id=100 + i)
             for i, off in enumerate(range(0, span, 4 << 20))]
    writes = [w.t_write(seg, off, junk[:min(4 << 20, span - off)], epoch=e, req_id=200 + e)
              for e in range(5) for off in range(0, span, 4 << 20)]
    out = {"uid": os.getuid()}

    def attempt(hello, secret, frames):
        s = w.connect(port)
        try:
            hdr, body = w.read_frame(s)
            nonce = body[4:20]
            data = b""
            if hello:
                data += w.frame(w.HELLO, w.hello_body(nonce, secret, role=1, uid=0), req_id=1)
            data += b"".join(frames)
            w.send_quietly(s, data)
            frames_back, closed = w.replies(s, timeout=2.0)
            return {"statuses": [[h[1], h[4]] for h, _ in frames_back],
                    "payload_bytes": sum(len(b) for h, b in frames_back
                                         if h[1] == w.T_READ and h[4] == 0),
                    "closed": closed}
        finally:
            s.close()

    for name, hello, secret, frames in (
            ("read_no_hello", False, None, reads),
            ("write_no_hello", False, None, writes),
            ("read_after_hello_no_secret", True, None, reads),
            ("write_after_hello_no_secret", True, None, writes),
            ("read_after_hello_wrong_secret", True, "guess", reads),
            ("write_after_hello_wrong_secret", True, "guess", writes)):
        out[name] = _try(lambda: attempt(hello, secret, frames))
    return out


if __name__ == "__main__":
    fn = {"master": attack_master, "unix": attack_unix, "transfer": attack_transfer}[sys.argv[1]]
    print(json.dumps(fn(json.loads(sys.argv[2]))))
    sys.exit(0)


# --------------------------------------------------------------- test side
import pytest  # noqa: E402

from conftest import row, segments_of  # noqa: E402

SECRET = "it-private-secret"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs root and setpriv to act as another user (nobody)")


def nobody():
    return pwd.getpwnam("nobody")


def as_nobody(argv, env=None, timeout=60, input=None):
    """Runs argv as nobody (own uid, gid, no supplementary groups)."""
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] + [str(x) for x in argv]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, cwd="/",
                          input=input)


def attack(kind, **args):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(HERE)}
    r = as_nobody([sys.executable, str(HERE / "test_private.py"), kind, json.dumps(args)],
                  env=env, timeout=120)
    assert r.returncode == 0, "attacker failed: %s\n%s" % (r.stdout, r.stderr.decode())
    out = json.loads(r.stdout)
    assert out["uid"] == nobody().pw_uid
    return out


_NOBODY_DIRS = []


@pytest.fixture(autouse=True)
def _remove_nobody_dirs():
    yield
    while _NOBODY_DIRS:
        shutil.rmtree(_NOBODY_DIRS.pop(), ignore_errors=True)


def nobody_env(kv):
    """Environment of a kvshelf command run by nobody: its own runtime dir."""
    d = tempfile.mkdtemp(prefix="kvs-nobody-", dir="/tmp")
    _NOBODY_DIRS.append(d)
    os.chown(d, nobody().pw_uid, nobody().pw_gid)
    os.chmod(d, 0o700)
    env = {k: v for k, v in kv.env.items() if k != "XDG_RUNTIME_DIR"}
    env["KVSHELF_RUNTIME_DIR"] = d
    env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
    return env


def refused(attempt):
    """A connection attempt got nothing: no reply of status 0 and no T_READ
    payload, and the server closed it (or it could not connect at all)."""
    if "oserror" in attempt:
        return True
    ok = [s for s in attempt["statuses"] if s[1] == 0]
    return not ok and attempt.get("payload_bytes", 0) == 0 and attempt["closed"]


def put_value(kv, m, key, value, env=None):
    args = [kv.bin, "put"] + (["--master", m.addr] if m else []) + [key, "-"]
    r = subprocess.run(args, input=value, capture_output=True, timeout=30, env=env or kv.env)
    assert r.returncode == 0, r.stderr.decode()


def get_value(kv, m, key, env=None):
    args = [kv.bin, "get"] + (["--master", m.addr] if m else []) + [key]
    r = subprocess.run(args, capture_output=True, timeout=30, env=env or kv.env)
    return r.returncode, r.stdout


def segment_of(kv, m=None, env=None):
    st = kv.status(m, env=env)
    assert st is not None, "kvshelf status failed"
    segs = segments_of(st)
    assert len(segs) == 1, segs
    s = segs[0]
    return (s["id"] if "id" in s else s["segment_id"]), int(s["transfer_addr"].rsplit(":", 1)[1])


def test_other_user_gets_nothing_from_the_master(kv):
    m = kv.start_master()
    kv.start_node(m, segment_size="16M")
    value = os.urandom(5000)
    put_value(kv, m, "priv-key", value)
    pool = kv.rt / "pool"
    out = attack("master", port=m.rpc, key="priv-key", runtime_dir=str(pool))
    assert out["hello_no_secret"]["flags"] & 1, "the CHALLENGE does not ask for a secret"
    for name in ("hello_no_secret", "hello_wrong_secret", "hello_claims_root_then_all"):
        assert refused(out[name]), (name, out[name])
        assert [w.HELLO, w.ERR_AUTH] in out[name]["statuses"], (name, out[name])
    for name in ("GET", "PUT_START", "REMOVE", "EXISTS", "SHUTDOWN"):
        assert refused(out["no_hello_" + name]), (name, out["no_hello_" + name])
    # the unix socket it offers lives in the owner's 0700 directory
    assert out["offered_unix"], out
    assert "oserror" in out["unix_offered"], out["unix_offered"]
    assert "oserror" in out["read_secret"], "nobody read the pool secret: %s" % out["read_secret"]
    assert stat.S_IMODE(os.stat(pool).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(pool / "secret").st_mode) == 0o600

    # the CLI as nobody, with its own (empty) runtime dir: nothing works
    env = nobody_env(kv)
    for args in (["get", "--master", m.addr, "priv-key"],
                 ["put", "--master", m.addr, "priv-key", "mine"],
                 ["put", "--master", m.addr, "new-key", "mine"],
                 ["rm", "--master", m.addr, "priv-key"],
                 ["stop", "--master", m.addr],
                 ["status", "--master", m.addr]):
        r = as_nobody([kv.bin] + args, env=env)
        assert r.returncode != 0, (args, r.stdout, r.stderr)
        assert value not in r.stdout
        assert b"AUTH" in r.stderr.upper() or b"authentication" in r.stderr, (args, r.stderr)

    assert m.proc.alive(), "the master stopped:\n" + m.proc.log_text()
    rc, got = get_value(kv, m, "priv-key")
    assert rc == 0 and got == value, "the owner's value changed"
    assert get_value(kv, m, "new-key")[0] != 0
    st = kv.status(m)
    assert st["counters"]["auth_failures"] >= 10, st["counters"]


def test_other_user_refused_on_a_unix_socket(kv, tmp_path):
    """A unix socket anyone may connect to (0777, in a 0755 dir): the master
    tells users apart by peer credentials, not by the uid HELLO claims."""
    pub = Path(tempfile.mkdtemp(prefix="kvs-pub-", dir="/tmp"))
    try:
        os.chmod(pub, 0o755)
        for allow in (False, True):
            path = pub / ("m%d.sock" % allow)
            extra = ["--listen", "unix:%s" % path] + (["--allow-uid", "nobody"] if allow else [])
            m = kv.start_master(name="master-allow" if allow else "master", extra=extra)
            os.chmod(path, 0o777)
            out = attack("unix", path=str(path), key="k")["hello_then"]
            statuses = out["statuses"]
            if not allow:
                assert refused(out), out
                assert [w.HELLO, w.ERR_AUTH] in statuses, out
            else:
                # let in (its uid is allowed), but SHUTDOWN is only for the owner
                assert [w.HELLO, 0] in statuses and [w.EXISTS, 0] in statuses, out
                assert [w.SHUTDOWN, w.ERR_AUTH] in statuses, out
                assert [w.REMOVE, 0] in statuses, out
            time.sleep(0.3)
            assert m.proc.alive(), "SHUTDOWN claiming uid 0 stopped the master"
            m.proc.stop()
            assert m.proc.p.returncode == 0
    finally:
        shutil.rmtree(pub, ignore_errors=True)


def _check_transfer_refused(out):
    for name, attempt in out.items():
        if name == "uid":
            continue
        assert refused(attempt), (name, attempt)


def test_other_user_gets_nothing_from_a_node_transfer_port(kv):
    m = kv.start_master()
    kv.start_node(m, segment_size="8M")
    value = os.urandom(64 << 10)
    put_value(kv, m, "node-key", value)
    seg, port = segment_of(kv, m)
    out = attack("transfer", port=port, segment=seg, span=8 << 20)
    _check_transfer_refused(out)
    rc, got = get_value(kv, m, "node-key")
    assert rc == 0 and got == value, "the owner's bytes changed"
    # and the owner (same user, nothing configured) reads through that port
    env = dict(kv.env, KVSHELF_NO_SHM="1", KVSHELF_NO_LOCAL_SOCKET="1")
    rc, got = get_value(kv, m, "node-key", env=env)
    assert rc == 0 and got == value


def test_other_user_gets_nothing_from_the_embedded_pool(kv):
    env = dict(kv.env, KVSHELF_GLOBAL_SEGMENT_SIZE="8M")
    value = os.urandom(64 << 10)
    put_value(kv, None, "emb-key", value, env=env)
    assert kv.embedded_pids(), "no embedded pool started"
    pool = kv.rt / "pool"
    seg, port = segment_of(kv, None, env=env)
    out = attack("transfer", port=port, segment=seg, span=8 << 20)
    _check_transfer_refused(out)
    assert stat.S_IMODE(os.stat(pool / "secret").st_mode) == 0o600
    rc, got = get_value(kv, None, "emb-key", env=env)
    assert rc == 0 and got == value, "the owner's bytes changed"
    # the owner through the pool's transfer server (no shared memory)
    rc, got = get_value(kv, None, "emb-key", env=dict(env, KVSHELF_NO_SHM="1"))
    assert rc == 0 and got == value
    # nobody cannot reach the pool's socket, nor start a pool there
    r = as_nobody([kv.bin, "get", "emb-key"], env=dict(nobody_env(kv),
                                                      KVSHELF_RUNTIME_DIR=str(pool)))
    assert r.returncode != 0 and value not in r.stdout


def test_shutdown_needs_the_owner(kv):
    """SHUTDOWN after a HELLO claiming uid 0 (refused, master keeps running);
    the owner's `kvshelf stop` over TCP (pool secret) stops it."""
    m = kv.start_master()
    out = attack("master", port=m.rpc, key="k", runtime_dir=str(kv.rt / "pool"))
    assert refused(out["hello_claims_root_then_all"])
    assert refused(out["no_hello_SHUTDOWN"])
    time.sleep(0.3)
    assert m.proc.alive()
    env = dict(kv.env, KVSHELF_NO_LOCAL_SOCKET="1")  # TCP: the secret is the proof
    r = kv.run("stop", "--master", m.addr, env=env)
    assert r.returncode == 0, r.stderr
    assert m.proc.wait(10) == 0


def test_metadata_needs_the_secret(kv):
    for public in (False, True):
        if public:
            m = kv.start_master(name="master-public", listen="0.0.0.0:0", http="0.0.0.0:0",
                                secret=SECRET)
        else:
            m = kv.start_master(secret=SECRET)
        port = m.http
        st, _ = w.http(port, "PUT", "/metadata?key=mk", b'{"v": 1}', secret=SECRET)
        assert st == 200
        for auth in (None, "Bearer wrong", "Basic " + SECRET, SECRET):
            st, _ = w.http(port, "PUT", "/metadata?key=mk", b'{"v": 2}', auth=auth)
            assert st in (401, 403), (auth, st)
            st, body = w.http(port, "GET", "/metadata?key=mk", auth=auth)
            assert st in (401, 403) and b'"v"' not in body, (auth, st, body)
            st, _ = w.http(port, "DELETE", "/metadata?key=mk", auth=auth)
            assert st in (401, 403), (auth, st)
            st, _ = w.http(port, "PUT", "/metadata?key=other", b"{}", auth=auth)
            assert st in (401, 403), (auth, st)
        st, body = w.http(port, "GET", "/metadata?key=mk", secret=SECRET)
        assert st == 200 and json.loads(body) == {"v": 1}, (st, body)
        st, _ = w.http(port, "GET", "/metadata?key=other", secret=SECRET)
        assert st == 404
        st, _ = w.http(port, "DELETE", "/metadata?key=mk", secret=SECRET)
        assert st == 200
        st, _ = w.http(port, "GET", "/metadata?key=mk", secret=SECRET)
        assert st == 404
        # reads: /health always open; /metrics open on loopback only
        assert w.http(port, "GET", "/health")[0] == 200
        st, _ = w.http(port, "GET", "/metrics")
        assert st == (401 if public else 200), st
        st, body = w.http(port, "GET", "/metrics", secret=SECRET)
        assert st == 200 and b"kvshelf_" in body
        assert w.http(port, "POST", "/health", b"x")[0] in (401, 403)


def test_same_user_with_nothing_configured_works(kv):
    m = kv.start_master()
    kv.start_node(m, segment_size="64M")
    secret_file = kv.rt / "pool" / "secret"
    first = secret_file.read_text()
    assert len(first.strip()) == 64
    # over TCP (no unix socket switch) and the transfer engine (no shm mapping)
    env = dict(kv.env, KVSHELF_NO_LOCAL_SOCKET="1", KVSHELF_NO_SHM="1")
    d = kv.bench(m, "--mode", "put,get", "--sizes", "4K,256K", "--count", 64, "--verify",
                 "--segment-size", 0, env=env)
    assert d["_rc"] == 0 and d["totals"]["errors"] == 0 and d["totals"]["mismatches"] == 0, d
    assert row(d, "get", "4K")["ok"] == 64
    value = os.urandom(3000)
    put_value(kv, m, "mine", value, env=env)
    assert get_value(kv, m, "mine", env=env) == (0, value)
    # the secret is made once and kept: a restarted master uses the same one
    m = kv.restart_master(m)
    assert secret_file.read_text() == first
    kv.start_node(m, segment_size="16M", name="node2")
    put_value(kv, m, "again", value, env=env)
    assert get_value(kv, m, "again", env=env) == (0, value)


def test_standalone_metadata_secret(kv):
    """`kvshelf metadata --secret S` asks for the same header; with it, a
    non-loopback address needs no --allow-remote (without either: refused)."""
    r = kv.run("metadata", "--addr", "0.0.0.0:0")
    assert r.returncode == 2, r.stderr
    pf = kv.dir / "md.port"
    p = kv.spawn("metadata", [kv.bin, "metadata", "--addr", "0.0.0.0:0", "--port-file", pf,
                              "--secret", SECRET])
    kv.wait_for(lambda: pf.exists() and pf.read_text().strip(), 10, "metadata port file", proc=p)
    port = json.loads(pf.read_text())["http"]
    assert w.http(port, "PUT", "/metadata?key=a", b"1")[0] == 401
    assert w.http(port, "PUT", "/metadata?key=a", b"1", auth="Bearer x")[0] == 403
    assert w.http(port, "GET", "/metadata?key=a", secret=SECRET)[0] == 404
    assert w.http(port, "PUT", "/metadata?key=a", b"1", secret=SECRET)[0] == 200
    assert w.http(port, "DELETE", "/metadata?key=a")[0] == 401
    st, body = w.http(port, "GET", "/metadata?key=a", secret=SECRET)
    assert st == 200 and body == b"1"
