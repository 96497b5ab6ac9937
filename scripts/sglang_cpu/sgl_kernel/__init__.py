"""dapo-mcore's stand-in for SGLang's ``sgl_kernel`` on CPUs (test tier only; installed by
``scripts/setup.sh --sglang`` into the SGLang venv's site-packages).

SGLang 0.5.23's CPU path imports ``sgl_kernel`` unconditionally, but no CPU build of it is on PyPI
(it is built from source for Intel AMX Xeons). The one entry point that a text model on
``--attention-backend torch_native`` calls is :func:`assign_req_to_token_pool_cpu`; it is
implemented here in plain PyTorch. Every other name imports (SGLang imports many at module load)
but raises ``NotImplementedError`` naming the call when it is called, so a code path that needs the
real kernels fails loudly instead of computing something else.
"""
from __future__ import annotations

import torch

__version__ = "0.0.0+dapo.cpu.standin"
STANDIN = True                      # lets a test (or an operator) tell this module from the real one
IMPLEMENTED = ("assign_req_to_token_pool_cpu",)


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """Scatter freshly allocated KV slots into the request-to-token map, in place.

    For each request i in order, with ``n_i = end_offset[i] - start_offset[i]``:
    ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] = out_cache_loc[off_i:off_i + n_i]``
    with ``off_i = n_0 + ... + n_{i-1}``, cast to ``req_to_token``'s dtype.

    Shapes: ``req_pool_indices``, ``start_offset``, ``end_offset``: [bs] (int32/int64);
    ``req_to_token``: [max_num_reqs, pool_len] (int32, written); ``out_cache_loc``: [sum n_i] (int64).
    """
    if req_to_token.dim() != 2 or req_to_token.size(1) != pool_len:
        raise ValueError(f"assign_req_to_token_pool_cpu: req_to_token has shape {tuple(req_to_token.shape)}, "
                         f"expected [max_num_reqs, pool_len={pool_len}]")
    start = start_offset.to(torch.int64)
    lens = end_offset.to(torch.int64) - start
    if bool((lens < 0).any()):
        raise ValueError("assign_req_to_token_pool_cpu: end_offset < start_offset for some request")
    total = int(lens.sum())
    if out_cache_loc.numel() < total:
        raise ValueError(f"assign_req_to_token_pool_cpu: out_cache_loc has {out_cache_loc.numel()} slots, "
                         f"the requests need {total}")
    if total == 0:
        return
    rows = torch.repeat_interleave(req_pool_indices.to(torch.int64), lens)
    # column of flat slot k of request i: start[i] + (k - off_i)
    offs = torch.cumsum(lens, 0) - lens
    cols = torch.arange(total, dtype=torch.int64) + torch.repeat_interleave(start - offs, lens)
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


def _missing(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name}() was called, but this is dapo-mcore's CPU stand-in for sgl_kernel, which "
            f"implements only {', '.join(IMPLEMENTED)} (scripts/sglang_cpu/sgl_kernel). This SGLang code path "
            f"needs the real sgl_kernel (built from source for Intel AMX CPUs, or the CUDA wheel on a GPU).")

    call.__name__ = call.__qualname__ = name
    return call


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
