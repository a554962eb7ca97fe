"""Mooncake's own processes for the tests that meet it, installed from PyPI at a
pinned version into a cached virtual environment.

    python3 tests/integration/mooncake_env.py     # provisions (or checks), prints the bin dir

What is installed, from PyPI only: ``mooncake-transfer-engine-non-cuda==0.3.13.post1``
(``mooncake_master``, ``mooncake_client``, the Python ``mooncake.store``), without
its dependencies (the master is a self-contained binary). Its store library
needs ``libibverbs1`` (a Debian package: scripts/deps.sh installs it).

Cached at $KVSHELF_MOONCAKE_VENV (default
~/.cache/kvshelf/mooncake-0.3.13.post1-venv); the stamp file holds the pin.
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

MOONCAKE_REQ = "mooncake-transfer-engine-non-cuda==0.3.13.post1"


def venv_dir() -> Path:
    return Path(os.environ.get("KVSHELF_MOONCAKE_VENV")
                or Path.home() / ".cache" / "kvshelf" / "mooncake-0.3.13.post1-venv")


def master_bin() -> Path:
    return venv_dir() / "bin" / "mooncake_master"


def provision() -> Path:
    """Creates the venv with Mooncake's wheel if it is not there; returns the
    path of mooncake_master. Raises RuntimeError with pip's output on failure."""
    d = venv_dir()
    stamp = d / ".kvshelf-mooncake-ok"
    if stamp.exists() and stamp.read_text() == MOONCAKE_REQ + "\n" and master_bin().exists():
        return master_bin()
    venv.EnvBuilder(with_pip=True, clear=True).create(d)
    r = subprocess.run([str(d / "bin" / "pip"), "install", "-q", "--no-deps", MOONCAKE_REQ],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode != 0 or not master_bin().exists():
        raise RuntimeError("pip install %s failed:\n%s%s" % (MOONCAKE_REQ, r.stdout, r.stderr))
    stamp.write_text(MOONCAKE_REQ + "\n")
    return master_bin()


if __name__ == "__main__":
    try:
        print(provision().parent)
    except RuntimeError as e:
        sys.exit(str(e))
