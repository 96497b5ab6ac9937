"""Compile every Triton kernel of ``dapo_kernels`` for real GPU targets on a machine without a GPU, and
read what the hardware would see: registers, spill (stack) bytes, shared memory, tensor-core use.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
options={"num_warps": w, "num_stages": s})`` runs Triton's whole NVIDIA pipeline (TTIR -> TTGIR ->
LLVM -> PTX -> ptxas cubin) with no GPU present. The resource usage of the cubin comes from the
``cuobjdump --dump-resource-usage`` shipped inside the triton wheel (``triton/backends/nvidia/bin/``):
``REG`` registers per thread, ``STACK`` the per-thread stack frame (for Triton kernels: register
spills), ``SHARED`` static shared memory (Triton's shared memory is dynamic: ``metadata.shared``; the
two are added). Tensor cores: ``wgmma.mma_async`` in the PTX on sm_90, ``mma.sync`` on sm_80.

Each kernel module lists its kernels in ``COMPILE_SPECS`` (:class:`KernelSpec`): the argument types
of a launch as the JIT would specialise them (pointers and the ints marked ``aligned`` divisible by
16, as they are at the shapes we run), the constexprs of a dtype, the autotune grid and the subset the
GPU path can select. Used by ``tests/test_kernels_compile.py`` and ``scripts/kernel_report.py``.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

TARGETS = (80, 90)                 # A100 (sm_80), H100/H200 (sm_90)
DTYPES = ("bfloat16", "float32")
# Max shared memory per block (the opt-in dynamic limit): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TENSOR_CORE_OP = {90: "wgmma", 80: "mma"}


@dataclass(frozen=True)
class KernelSpec:
    """How to compile one ``@triton.jit`` kernel for a dtype and a launch config.

    ``signature(dtype)``: ``{arg: triton type}`` of the non-constexpr args (``"*bf16"``, ``"i32"``, ...).
    ``constexprs(dtype)``: the constexpr args that depend on the dtype only (ACC, PRECISION, ...).
    ``grid(dtype)``: every autotune candidate, dicts of block constexprs plus ``num_warps``/``num_stages``.
    ``selectable(dtype, cc)``: the configs the GPU path can launch on that target (its autotune list).
    ``aligned``: int args that are multiples of 16 at the shapes we run (JIT ``tt.divisibility``).
    """

    name: str
    fn: object
    signature: Callable[[str], dict]
    constexprs: Callable[[str], dict]
    grid: Callable[[str], list]
    selectable: Callable[[str, int], list]
    aligned: tuple = ()
    dtypes: tuple = DTYPES


@dataclass
class Usage:
    kernel: str
    dtype: str
    cc: int
    config: dict
    selectable: bool
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    tensor_cores: str = "none"
    compile_s: float = 0.0
    error: str = ""

    @property
    def shared_ok(self) -> bool:
        return 0 <= self.shared_bytes <= SHARED_LIMIT[self.cc]

    def config_str(self) -> str:
        blocks = "x".join(str(v) for k, v in self.config.items() if k.startswith("BLOCK"))
        return f"{blocks or '-'}, w{self.config.get('num_warps', 4)}, s{self.config.get('num_stages', 3)}"

    def as_dict(self) -> dict:
        return asdict(self)


def triton_type(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}[dtype]


def cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the triton wheel carries no cuobjdump (needed to read resource usage)")
    return path


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """``{registers, stack, shared, local}`` of the (one) function in a cubin, via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = _RES.search(out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


_CACHE: dict = {}


def compile_one(spec: KernelSpec, dtype: str, cc: int, config: dict, selectable: bool) -> Usage:
    """Compile one variant (cached for the life of the process; Triton's disk cache also applies)."""
    key = (spec.name, dtype, cc, tuple(sorted(config.items())))
    if key in _CACHE:
        hit = _CACHE[key]
        return Usage(**{**hit.as_dict(), "selectable": selectable})
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    u = Usage(spec.name, dtype, cc, dict(config), selectable)
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    sig = dict(spec.signature(dtype))
    consts = {**spec.constexprs(dtype), **meta}
    arg_names = spec.fn.arg_names
    missing = [a for a in arg_names if a not in sig and a not in consts]
    if missing:
        raise ValueError(f"compile spec of {spec.name}: no type or value for {missing}")
    for a in consts:
        sig[a] = "constexpr"
    sig = {a: sig[a] for a in arg_names}
    attrs = {(arg_names.index(a),): [["tt.divisibility", 16]] for a in arg_names
             if sig[a].startswith("*") or a in spec.aligned}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn=spec.fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 3)})
        res = resource_usage(k.asm["cubin"])
        ptx = k.asm["ptx"]
        u.registers = res["registers"]
        u.spill_bytes = res["stack"] + res["local"]
        u.shared_bytes = int(k.metadata.shared) + res["shared"]
        u.tensor_cores = ("wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx)
                          else "none")
    except Exception as e:  # reported per variant; the test fails on it
        u.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:400]
    u.compile_s = time.perf_counter() - t0
    _CACHE[key] = u
    return u


def all_specs() -> list[KernelSpec]:
    """The compile specs of every kernel module of dapo_kernels."""
    from dapo_kernels import dapo_loss, fused_dapo_loss, gemm, target_logprob

    return [*target_logprob.COMPILE_SPECS, *gemm.COMPILE_SPECS, *fused_dapo_loss.COMPILE_SPECS,
            *dapo_loss.COMPILE_SPECS]


def variants(specs: Iterable[KernelSpec], full: bool, targets=TARGETS, dtypes=DTYPES):
    """(spec, dtype, cc, config, selectable) to compile: the selectable configs only, or the full grid."""
    for spec in specs:
        for dtype in dtypes:
            if dtype not in spec.dtypes:
                continue
            for cc in targets:
                sel = spec.selectable(dtype, cc)
                for cfg in (spec.grid(dtype) if full else sel):
                    yield spec, dtype, cc, cfg, cfg in sel


def _compile_named(name: str, dtype: str, cc: int, cfg: dict, sel: bool) -> Usage:
    spec = next(s for s in all_specs() if s.name == name)
    return compile_one(spec, dtype, cc, cfg, sel)


def run(full: bool = False, specs=None, targets=TARGETS, dtypes=DTYPES, progress: bool = False,
        workers: int | None = None) -> list[Usage]:
    """Compile the variants (``full``: the whole grid, else the selectable configs) in ``workers``
    processes (default: one per CPU); results in a stable order."""
    import concurrent.futures as cf
    import multiprocessing as mp

    todo = list(variants(specs if specs is not None else all_specs(), full, targets, dtypes))
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    out: list = [None] * len(todo)
    done = 0

    def report(i: int, u: Usage) -> None:
        nonlocal done
        out[i] = u
        done += 1
        if progress:
            print(f"[{done}/{len(todo)}] {u.kernel} {u.dtype} sm_{u.cc} {u.config_str()}: "
                  f"{u.error or f'{u.registers} regs, {u.spill_bytes} B spill'} ({u.compile_s:.1f} s)", flush=True)

    if workers == 1:
        for i, (spec, dtype, cc, cfg, sel) in enumerate(todo):
            report(i, compile_one(spec, dtype, cc, cfg, sel))
        return out
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_compile_named, spec.name, dtype, cc, cfg, sel): i
                for i, (spec, dtype, cc, cfg, sel) in enumerate(todo)}
        for f in cf.as_completed(futs):
            report(futs[f], f.result())
    return out


def problems(usages: Iterable[Usage]) -> list[str]:
    """What the CI check fails on: a compile error, shared memory over the target's limit, spills in a
    selectable bf16 configuration."""
    bad = []
    for u in usages:
        where = f"{u.kernel} {u.dtype} sm_{u.cc} ({u.config_str()})"
        if u.error:
            bad.append(f"{where}: compile error: {u.error}")
        elif not u.shared_ok:
            bad.append(f"{where}: {u.shared_bytes} B shared memory > sm_{u.cc} limit {SHARED_LIMIT[u.cc]} B")
        elif u.selectable and u.dtype == "bfloat16" and u.spill_bytes > 0:
            bad.append(f"{where}: selectable bf16 config spills {u.spill_bytes} B")
    return bad


def spill_max(usages: Iterable[Usage], dtype: str = "bfloat16") -> int:
    """Largest spill over the selectable configurations of ``dtype`` (sm_80 and sm_90)."""
    vals = [u.spill_bytes for u in usages if u.selectable and u.dtype == dtype and not u.error]
    return max(vals) if vals else 0


def table(usages: Iterable[Usage]) -> str:
    lines = ["| kernel | dtype | target | config (blocks, warps, stages) | selectable | registers | spill (stack) B | "
             "shared KiB | tensor cores | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for u in usages:
        if u.error:
            lines.append(f"| {u.kernel} | {u.dtype} | sm_{u.cc} | {u.config_str()} | {'yes' if u.selectable else 'no'} | "
                         f"compile error: {u.error} | | | | {u.compile_s:.1f} |")
            continue
        lines.append(f"| {u.kernel} | {u.dtype} | sm_{u.cc} | {u.config_str()} | {'yes' if u.selectable else 'no'} | "
                     f"{u.registers} | {u.spill_bytes} | {u.shared_bytes / 1024:.0f} | {u.tensor_cores} | "
                     f"{u.compile_s:.1f} |")
    return "\n".join(lines)


@dataclass
class Summary:
    n: int
    errors: int
    bf16_spill_max: int
    fp32_spill_max: int
    seconds: float
    problems: list = field(default_factory=list)


def summarize(usages: list[Usage]) -> Summary:
    return Summary(len(usages), sum(bool(u.error) for u in usages), spill_max(usages, "bfloat16"),
                   spill_max(usages, "float32"), sum(u.compile_s for u in usages), problems(usages))
