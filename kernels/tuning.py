"""Launch configurations of the Triton kernels: the autotune grid, the configurations the GPU path can
select per target, and the helpers that turn them into ``triton.Config`` lists.

A kernel module gives ``GRID[dtype]`` (every candidate that ``scripts/kernel_report.py`` compiles) and
``SELECT[(dtype, cc)]`` (the subset the GPU path autotunes over on that target: candidates that
compile without spills and fit the target's shared memory, see docs/kernels.md). Configurations are
tuples ``(block sizes..., num_warps, num_stages)`` named by the module's ``BLOCKS``.
On a GPU the autotuner gets the union of the selectable lists and ``early_config_prune`` keeps the
ones of the input dtype and the device: sm_90 and newer use the sm_90 list, older GPUs the sm_80 list.
"""
from __future__ import annotations

import triton

TARGETS = (80, 90)


def as_dict(blocks: tuple, cfg: tuple) -> dict:
    *sizes, warps, stages = cfg
    return {**dict(zip(blocks, sizes)), "num_warps": warps, "num_stages": stages}


def as_config(blocks: tuple, cfg: tuple) -> triton.Config:
    d = as_dict(blocks, cfg)
    warps, stages = d.pop("num_warps"), d.pop("num_stages")
    return triton.Config(d, num_warps=warps, num_stages=stages)


def target_of(cc_major: int, cc_minor: int = 0) -> int:
    return 90 if cc_major >= 9 else 80


def union(select: dict) -> list[tuple]:
    out: list[tuple] = []
    for cfgs in select.values():
        out += [c for c in cfgs if c not in out]
    return out


def dtype_name(dtype) -> str:
    """'bfloat16' | 'float32' | ... of a torch dtype (fp16 is tuned like bf16, fp64 like fp32)."""
    s = str(dtype).replace("torch.", "")
    return {"float16": "bfloat16", "float64": "float32"}.get(s, s)


def pruner(blocks: tuple, select: dict, tensor_arg: str):
    """``early_config_prune`` keeping the selectable configs of the dtype of ``tensor_arg`` on its device."""

    def prune(configs, named_args, **kwargs):
        import torch

        t = named_args[tensor_arg]
        cc = target_of(*torch.cuda.get_device_capability(t.device)) if t.is_cuda else 90
        keep = {tuple(sorted(as_dict(blocks, c).items())) for c in select[(dtype_name(t.dtype), cc)]}
        out = [c for c in configs
               if tuple(sorted({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}.items())) in keep]
        return out or configs[:1]

    return prune


def autotune_configs(blocks: tuple, select: dict) -> list[triton.Config]:
    return [as_config(blocks, c) for c in union(select)]
