"""Every Triton kernel compiles for real GPU targets (sm_80 A100, sm_90 H100/H200) on this CPU machine,
and the configurations the GPU path can select fit the hardware (dapo_kernels.compile_check).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` + the triton wheel's cuobjdump:
registers, spill (stack) bytes, shared memory, tensor-core instructions. The default suite compiles the
selectable configurations of every kernel x {bf16, fp32} x {sm_80, sm_90} and fails on a compile error,
on shared memory over the target's limit and on spills in a bf16 configuration; the slow tier compiles
the whole autotune grid (``scripts/kernel_report.py`` prints the same table). The same default check
also runs under the triton of the GPU image scripts/gpu_check.sh runs on (3.6.0, unpacked by
scripts/setup.sh into ``$VENV/image-triton``): register allocation differs between triton releases (under
3.6.0 two sm_80 bf16 configurations that 3.9 fits spilled 8 and 16 B).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns when unset; 1 is its default

cc = pytest.importorskip("dapo_kernels.compile_check")

# Kernels built on tl.dot: in bf16 they must reach the tensor cores of each target.
DOT_KERNELS = ("target_logprob_fwd", "fused_loss_logits", "target_logprob_grad_logits", "gemm_grad_hidden",
               "gemm_grad_weight")


@pytest.fixture(scope="module")
def selectable(record_testsuite_property):
    usages = cc.run(full=False)
    print("\n" + cc.table(usages))
    record_testsuite_property("triton_compile_table", cc.table(usages))
    return usages


def test_selectable_configs_compile_fit_and_do_not_spill(selectable):
    assert cc.problems(selectable) == []
    assert cc.spill_max(selectable, "bfloat16") == 0


def test_every_kernel_dtype_and_target_has_a_selectable_config(selectable):
    seen = {(u.kernel, u.dtype, u.cc) for u in selectable}
    for spec in cc.all_specs():
        for dtype in spec.dtypes:
            for target in cc.TARGETS:
                assert (spec.name, dtype, target) in seen, (spec.name, dtype, target)


def test_bf16_dot_kernels_use_tensor_cores(selectable):
    for u in selectable:
        if u.dtype == "bfloat16" and u.kernel.startswith(DOT_KERNELS):
            assert u.tensor_cores == cc.TENSOR_CORE_OP[u.cc], (u.kernel, u.cc, u.config_str(), u.tensor_cores)
        if u.dtype == "float32":
            assert u.tensor_cores == "none", (u.kernel, u.cc, "fp32 must stay IEEE (no TF32)")


IMAGE_TRITON = os.environ.get("DAPO_IMAGE_TRITON", "3.6.0")
_UNDER_IMAGE_TRITON = """
import json, triton
import dapo_kernels.compile_check as cc
us = cc.run(full=False)
print(json.dumps({"version": triton.__version__, "n": len(us), "problems": cc.problems(us),
                  "bf16_spill": cc.spill_max(us, "bfloat16"), "errors": [u.error for u in us if u.error]}))
"""


def test_selectable_configs_fit_under_the_gpu_images_triton(selectable):
    site = Path(sys.prefix) / "image-triton"
    assert (site / f".triton-{IMAGE_TRITON}").is_file(), f"{site}: triton {IMAGE_TRITON} not unpacked (scripts/setup.sh)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-c", _UNDER_IMAGE_TRITON], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"] == IMAGE_TRITON
    assert got["n"] == len(selectable) and got["errors"] == []
    assert got["problems"] == [] and got["bf16_spill"] == 0


def test_resource_reader_sees_spills():
    """The check can fail: a deliberately oversized fp32 tile (the old backward's 128x256x64) spills."""
    from dapo_kernels import gemm

    spec = next(s for s in gemm.COMPILE_SPECS if s.name.startswith("gemm_grad_weight"))
    u = cc.compile_one(spec, "float32", 80, {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 32, "num_warps": 4,
                                              "num_stages": 2}, selectable=True)
    assert not u.error and u.spill_bytes > 0
    bad = cc.problems([cc.Usage(**{**u.as_dict(), "dtype": "bfloat16"})])
    assert bad and "spills" in bad[0]


@pytest.mark.slow
def test_full_autotune_grid_compiles_within_shared_memory():
    usages = cc.run(full=True)
    print("\n" + cc.table(usages))
    errors = [p for p in cc.problems(usages) if "spills" not in p]
    assert errors == []
