"""A real ``mooncake_master`` for a benchmark that runs in this process
(``bench/ttft.py --mode mooncake``), over the tests' helpers.

``bench/mooncake_bench.py`` runs its measurements in a child process started
with ``ip netns exec``; a benchmark that holds a GPU and a model for a whole
run instead moves its own process into the namespace: ``MooncakeNetns``
makes the namespace and its veth pair (``tests/python/mooncake_net.py``'s
``MooncakeNet``: Mooncake's client refuses a host whose only interface is
loopback), then joins it (``setns`` on the calling thread; threads started
afterwards inherit it, so call it before anything starts threads that will
talk to Mooncake), and starts ``mooncake_master`` there on free ports.

Mooncake itself comes from ``tests/integration/mooncake_env.py``'s venv
(``$KVSHELF_MOONCAKE_VENV``; ``provision()`` installs nothing where the
stamp file is there, as in the carried ``/tmp/mooncake-venv`` of
``bench/prepare_mooncake_carry.sh``), its Python package from
``$KVSHELF_MC_SITE`` or that venv's site-packages. Needs root and iproute2.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
_TESTS = str(REPO / "tests" / "python")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

import mooncake_net as mn  # noqa: E402  (tests/python/mooncake_net.py)


def mooncake_site() -> str:
    """Where Mooncake's Python package is: $KVSHELF_MC_SITE, else the venv's."""
    return os.environ.get("KVSHELF_MC_SITE") or str(mn.site_packages())


def use_mooncake() -> str:
    """Makes ``mooncake.store`` importable (appended to sys.path, so that the
    running interpreter's own packages win) and this tree's Python sources of
    kvshelf (``python/kvshelf``) the ones of ``kvshelf.mooncake_store`` and
    ``kvshelf.vllm_mooncake``, over the installed or carried extension (as
    ``bench/mooncake_bench.py`` does). Returns the site folder."""
    site = mooncake_site()
    if site not in sys.path:
        sys.path.append(site)
    os.environ.setdefault("GLOG_minloglevel", "1")  # Mooncake's INFO lines
    import kvshelf

    src = str(REPO / "python" / "kvshelf")
    if src not in kvshelf.__path__:
        kvshelf.__path__.insert(0, src)
    return site


def unavailable() -> str | None:
    """Why Mooncake's processes cannot run here (no root, no ip, no netns), or None."""
    return mn.netns_unavailable()


class MooncakeNetns:
    """A network namespace (a veth pair with ``mooncake_net.NS_IP``) that the
    calling thread joins, and ``mooncake_master`` started in it."""

    def __init__(self, workdir: str | Path, tag: str = "t"):
        why = unavailable()
        if why:
            raise RuntimeError("Mooncake's processes cannot run here: %s" % why)
        self.binary = mn.mooncake_env().provision()  # no pip where the venv's stamp is there
        self.net = mn.MooncakeNet(Path(workdir), tag)
        try:
            self._join()
        except BaseException:
            self.net.close()
            raise

    def _join(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open("/run/netns/%s" % self.net.name, os.O_RDONLY)
        try:
            if libc.setns(fd, mn.CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, "setns into network namespace %s: %s" % (self.net.name, os.strerror(e)))
        finally:
            os.close(fd)

    @property
    def name(self) -> str:
        return self.net.name

    def start_master(self, *extra: str) -> None:
        self.net.start_master(*extra)

    def stop_master(self) -> None:
        self.net.stop_master()

    @property
    def master_log(self) -> Path | None:
        return self.net.master_log

    def config(self, **over: Any) -> dict[str, Any]:
        """The store configuration for the running master (NS_IP, its ports)."""
        return self.net.config(**over)

    def close(self) -> None:
        """Kills the master and deletes the namespace (this process stays in
        it, unnamed, until it exits)."""
        self.net.close()
