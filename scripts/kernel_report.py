"""Compile table of the Triton kernels for sm_80 (A100) and sm_90 (H100/H200), no GPU needed.

Every kernel x autotune configuration x {bf16, fp32} x {sm_80, sm_90} is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and its cubin read with the
``cuobjdump`` of the triton wheel (:mod:`dapo_kernels.compile_check`, the code the CI test runs).
Columns: registers per thread, stack (spill) bytes per thread, shared memory per block, tensor-core
instructions in the PTX (wgmma on sm_90, mma.sync on sm_80), compile seconds. ``selectable``: the
configuration is in the autotune list the GPU path launches (the others are candidates that were
measured here and left out).

    python scripts/kernel_report.py                 # the full autotune grid (a few minutes)
    python scripts/kernel_report.py --selectable    # only what the GPU path can select (what CI compiles)
    python scripts/kernel_report.py --json out.json
    python scripts/kernel_report.py --image-triton  # under the GPU image's triton (scripts/setup.sh unpacks it)

Ends with ``RESULT triton_bf16_spill_bytes_max <n> bytes`` (over the selectable bf16 configurations,
sm_80 and sm_90) and exits 1 if the CI check would fail.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selectable", action="store_true", help="only the configurations the GPU path can select")
    ap.add_argument("--kernel", action="append", help="only these kernels (name as in the table; repeatable)")
    ap.add_argument("--json", type=Path, help="also write every row here")
    ap.add_argument("--quiet", action="store_true", help="no per-compile progress lines")
    ap.add_argument("--workers", type=int, help="compile processes (default: one per CPU)")
    ap.add_argument("--image-triton", action="store_true",
                    help="compile with the triton of the GPU image ($VENV/image-triton, from scripts/setup.sh)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # triton >= 3.9 warns when unset; 1 = its default
    if args.image_triton:
        site = Path(sys.prefix) / "image-triton"
        if not site.is_dir():
            ap.error(f"{site} does not exist: run scripts/setup.sh (it unpacks the GPU image's triton there)")
        if os.environ.get("DAPO_IMAGE_TRITON_SITE") != str(site):  # re-run once with it first on the path
            rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--image-triton"]
            env = dict(os.environ, DAPO_IMAGE_TRITON_SITE=str(site),
                       PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
            os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *rest, "--image-triton"], env)

    import triton

    from dapo_kernels import compile_check as cc

    specs = cc.all_specs()
    if args.kernel:
        unknown = set(args.kernel) - {s.name for s in specs}
        if unknown:
            ap.error(f"unknown kernel(s) {sorted(unknown)}; have {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in args.kernel]
    t0 = time.perf_counter()
    usages = cc.run(full=not args.selectable, specs=specs, progress=not args.quiet, workers=args.workers)
    wall = time.perf_counter() - t0
    print()
    print(cc.table(usages))
    s = cc.summarize(usages)
    print(f"\ntriton {triton.__version__}: {s.n} compiles in {wall:.0f} s ({s.errors} errors); shared-memory limits {cc.SHARED_LIMIT} B")
    for p in s.problems:
        print("PROBLEM", p)
    if args.json:
        args.json.write_text(json.dumps([u.as_dict() for u in usages], indent=1))
    print(f"RESULT triton_fp32_spill_bytes_max {s.fp32_spill_max} bytes")
    print(f"RESULT triton_bf16_spill_bytes_max {s.bf16_spill_max} bytes")
    return 1 if s.problems else 0


if __name__ == "__main__":
    sys.exit(main())
