"""Search layouts (TP, PP, VPP, sequence parallel, recompute, distributed optimizer) that fit a GPU."""
from __future__ import annotations

from dataclasses import dataclass, replace

from dapo_mcore.models.hf_config import ArchSpec
from dapo_mcore.plan.layout import Layout, LayoutError
from dapo_mcore.plan.memory import GB, MemoryBreakdown, peak_bytes, stage_memory_ranks
from dapo_mcore.plan.throughput import GpuSpec, Throughput, estimate


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryBreakdown     # worst pipeline rank with the fused kernel
    peak_fused: float           # per-GPU peak over pipeline ranks (bytes)
    peak_naive: float
    throughput: Throughput


def candidates(arch: ArchSpec, base: Layout, stage: str, gpu: GpuSpec, mfu: float, impl: str = "te",
               reserve_gb: float = 4.0, fused: bool = True) -> list[Candidate]:
    """Every valid layout on ``base``'s GPUs and batch shape that fits ``gpu.memory_gb`` with the fused
    (or naive) logits path, fastest first; ties prefer fewer model-parallel GPUs."""
    out = []
    tps = [t for t in (1, 2, 4, 8, 16) if t <= base.gpus_per_node]
    pps = [p for p in range(1, arch.num_layers + 1) if arch.num_layers % p == 0 and p <= base.world]
    for tp in tps:
        for pp in pps:
            for vpp in (None, 2):
                for sp in ((False, True) if tp > 1 and impl == "te" else (False,)):
                    for rec in ("none", "full"):
                        for dist in (False, True):
                            lay = replace(base, tp=tp, pp=pp, vpp=vpp if pp > 1 else None, sequence_parallel=sp,
                                          recompute=rec, distributed_optimizer=dist)
                            if vpp and pp == 1:
                                continue
                            try:
                                lay.validate(arch)
                            except LayoutError:
                                continue
                            ranks = stage_memory_ranks(arch, lay, stage, impl, reserve_gb)
                            pf, pn = peak_bytes(ranks, True), peak_bytes(ranks, False)
                            if (pf if fused else pn) <= gpu.memory_gb * GB:
                                mem = max(ranks, key=lambda m: m.total_fused)
                                out.append(Candidate(lay, mem, pf, pn, estimate(arch, lay, stage, mfu, gpu)))
    out.sort(key=lambda c: (-round(c.throughput.tokens_per_s, -1), c.layout.tp * c.layout.pp,
                            c.layout.distributed_optimizer, c.peak_fused))
    return out
