"""Build the C++ CPU op library (``csrc/``) with CMake against the installed torch.

``python -m dapo_mcore.build_ops [--clean]`` configures ``build/`` and writes
``dapo_mcore/_lib/libdapo_mcore_ops.so``; :mod:`dapo_mcore._C` loads it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build"


def _cmake() -> str:
    exe = shutil.which("cmake", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise RuntimeError("cmake not found: install it (`pip install cmake`) or run scripts/setup.sh")
    return exe


def build(clean: bool = False, jobs: int | None = None) -> Path:
    """Configure and build the op library; returns the path of the shared library."""
    import torch

    if clean and BUILD_DIR.exists():
        shutil.rmtree(BUILD_DIR)
    cmake = _cmake()
    cfg = [cmake, "-S", str(ROOT), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release",
           # Torch_DIR explicitly: a build/ cache configured by another venv must not win.
           f"-DTorch_DIR={Path(torch.utils.cmake_prefix_path) / 'Torch'}"]
    if shutil.which("ninja", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")):
        cfg += ["-G", "Ninja"]
    if os.environ.get("DAPO_NATIVE_ARCH", "1") == "1":
        cfg += ["-DDAPO_NATIVE_ARCH=ON"]
    subprocess.run(cfg, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(BUILD_DIR), "-j", str(jobs or os.cpu_count() or 1)], check=True)
    lib = ROOT / "dapo_mcore" / "_lib" / "libdapo_mcore_ops.so"
    if not lib.exists():
        raise RuntimeError(f"CMake build finished but {lib} is missing")
    return lib


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clean", action="store_true", help="remove build/ first")
    ap.add_argument("-j", "--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    print(build(args.clean, args.jobs))


if __name__ == "__main__":
    main()
