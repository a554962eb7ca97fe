"""Memory a segment costs the process that contributes it (issue 13 item 9).

A client that contributes a segment (an engine process with
global_segment_size > 0) must not become resident for the whole segment at
once: its memory is reserved (posix_fallocate) but touched as it is used.
The pool daemons (`kvshelf node`, the embedded pool) populate theirs on
purpose, which the second half checks so that this test can tell the two
apart.
"""
import time

from conftest import row

GIB = 1 << 30


def rss_kib(pid):
    """VmRSS of a process in KiB (0 if it is gone)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss(proc, seconds):
    peak = 0
    end = time.time() + seconds
    while time.time() < end and proc.alive():
        peak = max(peak, rss_kib(proc.pid))
        time.sleep(0.1)
    return peak


def test_contributing_client_stays_small(kv):
    m = kv.start_master()
    # a client with a 1 GiB segment that writes 64 values of 64 KiB into it
    # (the only segment of the pool, so they land there) and keeps running
    p = kv.bench_bg(m, "--segment-size", "1G", "--mode", "put,get", "--sizes", "64K",
                    "--count", 64, "--duration", 3, "--verify")
    peak = peak_rss(p, 2.5)
    r = kv.bench_result(p)
    assert r["fatal"] == 0 and r["totals"]["mismatches"] == 0
    assert row(r, "get")["ok"] > 0
    assert 0 < peak < 160 * 1024, "client with a 1 GiB segment reached %d MiB resident" % (
        peak // 1024)


def test_pool_daemon_populates_its_segment(kv):
    m = kv.start_master()
    n = kv.start_node(m, segment_size="512M")
    kv.wait_for(lambda: rss_kib(n.pid) > 400 * 1024, 20,
                "the node's 512 MiB segment to become resident (prefault)", proc=n)
