"""GPU fast paths behind one switch, each with the CPU path it replaces.

``FastPathConfig.mode`` is the switch: ``"auto"`` (GPU paths when CUDA is present), ``"gpu"`` (require them;
an error on a machine without CUDA) or ``"cpu"`` (the portable paths everywhere). :func:`resolve` turns it
into one :class:`ResolvedPaths` per run and validates the combination before any model is built.

| fast path (GPU)                         | CPU path it replaces                         | equality tested against |
|-----------------------------------------|----------------------------------------------|-------------------------|
| Transformer Engine layer spec           | megatron local spec                          | HF logits (both)        |
| THD packed sequences (PackedSeqParams)  | block-diagonal dense mask                    | unpacked runs           |
| shared-prefix attention: flex_attention | dense boolean mask (megatron local attention) | dense-mask logits       |
|   with a block mask from doc/part ids   |                                              |                         |
| sequence parallel                       | off (needs TE LayerNorm)                     | TP=1                    |
| bf16 + fp32 main params                 | fp32                                         | fp32 (tolerance)        |
| activation recompute                    | off (CUDA RNG state)                         | no recompute            |
| distributed optimizer                   | megatron non-distributed optimizer           | same steps              |
| overlap grad reduce / param gather      | synchronous reduce                           | same grads              |

On CPU the tests check the selection and validation logic, the THD ``cu_seqlens`` derivation, and the
flex_attention mask (its forward runs on CPU; its backward does not) against the dense mask.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

MODES = ("auto", "gpu", "cpu")


class FastPathError(ValueError):
    """An impossible fast-path combination (named in the message)."""


@dataclass
class FastPathConfig:
    mode: str = "auto"
    bf16: bool = True
    recompute: bool = False
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    sequence_parallel: bool = False
    thd_packing: bool = True
    shared_prefix_attention: str = "flex"      # flex | dense


@dataclass(frozen=True)
class ResolvedPaths:
    """What a run will use (every field is the path actually taken)."""

    gpu: bool
    layer_spec: str                 # "transformer_engine" | "local"
    packing: str                    # "thd" | "dense_mask"
    shared_prefix_attention: str    # "flex" | "dense_mask"
    sequence_parallel: bool
    params_dtype: str               # "bfloat16" | "float32"
    recompute: bool
    distributed_optimizer: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
        return True
    except ImportError:
        return False


def resolve(cfg: FastPathConfig, tp: int, cuda: Optional[bool] = None, te: Optional[bool] = None) -> ResolvedPaths:
    """Choose every path for this machine and layout; raise :class:`FastPathError` naming what is wrong."""
    if cfg.mode not in MODES:
        raise FastPathError(f"fast_paths.mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.shared_prefix_attention not in ("flex", "dense"):
        raise FastPathError(f"fast_paths.shared_prefix_attention must be 'flex' or 'dense', "
                            f"got {cfg.shared_prefix_attention!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    te = _have_te() if te is None else te
    if cfg.mode == "gpu" and not cuda:
        raise FastPathError("fast_paths.mode='gpu' but CUDA is not available on this machine (use 'auto' or 'cpu')")
    gpu = cuda and cfg.mode != "cpu"
    if cfg.sequence_parallel and tp < 2:
        raise FastPathError("sequence_parallel requires tensor_model_parallel_size > 1")
    if gpu:
        if cfg.sequence_parallel and not te:
            raise FastPathError("sequence_parallel needs the Transformer Engine layer spec (install transformer-engine)")
        if cfg.overlap_param_gather and not cfg.distributed_optimizer:
            raise FastPathError("overlap_param_gather requires distributed_optimizer")
        return ResolvedPaths(
            gpu=True, layer_spec="transformer_engine" if te else "local",
            packing="thd" if (cfg.thd_packing and te) else "dense_mask",
            shared_prefix_attention="flex" if cfg.shared_prefix_attention == "flex" else "dense_mask",
            sequence_parallel=cfg.sequence_parallel, params_dtype="bfloat16" if cfg.bf16 else "float32",
            recompute=cfg.recompute, distributed_optimizer=cfg.distributed_optimizer,
            overlap_grad_reduce=cfg.overlap_grad_reduce, overlap_param_gather=cfg.overlap_param_gather)
    if cfg.sequence_parallel:
        raise FastPathError("sequence_parallel is a GPU path (the CPU local spec's LayerNorm does not support it)")
    return ResolvedPaths(gpu=False, layer_spec="local", packing="dense_mask", shared_prefix_attention="dense_mask",
                         sequence_parallel=False, params_dtype="float32", recompute=False,
                         distributed_optimizer=False, overlap_grad_reduce=False, overlap_param_gather=False)


# --------------------------------------------------------------------------------------- THD packing
def thd_cu_seqlens(doc: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` int32 ``[n_docs + 1]`` of a block-diagonal row from its per-token document ids ``[L]``
    (documents contiguous, padding = -2 ignored): what ``PackedSeqParams(qkv_format="thd")`` takes."""
    real = doc[doc >= 0]
    if real.numel() == 0:
        return torch.zeros(1, dtype=torch.int32)
    change = torch.nonzero(real[1:] != real[:-1]).flatten() + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), change, torch.tensor([real.numel()])])
    return bounds.to(torch.int32)


def thd_packed_seq_params(doc: torch.Tensor):
    """megatron ``PackedSeqParams`` for a block-diagonal row (GPU path; Transformer Engine attention)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = thd_cu_seqlens(doc)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)


# --------------------------------------------------------------------- shared-prefix flex attention
def shared_prefix_mask_mod(doc: torch.Tensor, part: torch.Tensor):
    """flex_attention ``mask_mod`` of the shared-prefix rule (True = attend), for rows ``doc``/``part``
    ``[B, L]``: ``kv <= q and doc[q] == doc[kv] and (part[kv] == -1 or part[kv] == part[q])``, and every
    token sees itself (padding rows stay finite) — the same rule as :meth:`PackedRow.attention_mask`."""

    def mask_mod(b, h, q, kv):
        same = (doc[b, q] == doc[b, kv]) & (doc[b, q] >= 0)
        vis = (part[b, kv] == -1) | (part[b, kv] == part[b, q])
        return ((kv <= q) & same & vis) | (q == kv)

    return mask_mod


def shared_prefix_block_mask(doc: torch.Tensor, part: torch.Tensor, heads: Optional[int] = None):
    """A flex_attention ``BlockMask`` for rows ``doc``/``part`` ``[B, L]`` (GPU path)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = doc.shape
    return create_block_mask(shared_prefix_mask_mod(doc, part), B, heads, L, L, device=doc.device)


def flex_core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """Attention with a block mask, megatron layout: q ``[s, b, h, d]``, k/v ``[s, b, g, d]`` (GQA) ->
    ``[s, b, h * d]``. Softmax scale 1/sqrt(d), as megatron's core attention."""
    from torch.nn.attention.flex_attention import flex_attention

    qt, kt, vt = (x.permute(1, 2, 0, 3) for x in (q, k, v))          # [b, h|g, s, d]
    out = flex_attention(qt, kt, vt, block_mask=block_mask, enable_gqa=qt.shape[1] != kt.shape[1])
    s, b, h, d = q.shape
    return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def doc_part_of(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """``doc``/``part`` ``[B, L]`` of packed rows padded to the longest (padding doc = -2)."""
    L = max(len(r) for r in rows)
    doc = torch.full((len(rows), L), -2, dtype=torch.long)
    part = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        doc[i, :len(r)], part[i, :len(r)] = r.doc, r.part
    return doc, part


def block_mask_from_dense(mask: torch.Tensor):
    """A flex_attention ``BlockMask`` from a dense boolean mask ``[b, 1, L, L]`` (True = masked, megatron
    convention): the block structure lets the kernel skip fully masked tiles."""
    from torch.nn.attention.flex_attention import create_block_mask

    allowed = ~mask[:, 0]
    B, L, _ = allowed.shape

    def mask_mod(b, h, q, kv):
        return allowed[b, q, kv]

    return create_block_mask(mask_mod, B, None, L, L, device=mask.device)


class FlexCoreAttention(torch.nn.Module):
    """megatron core-attention module running ``flex_attention`` with a ``BlockMask`` (GPU fast path for
    packed and shared-prefix rows; forward also runs on CPU, backward does not). Drop-in for the
    ``core_attention`` submodule of megatron's self-attention spec; ``attention_mask`` must be a BlockMask
    (``DapoGPTModel`` converts the dense mask)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.config = config
        if softmax_scale is not None and abs(softmax_scale - config.kv_channels ** -0.5) > 1e-12:
            raise ValueError("FlexCoreAttention uses the default 1/sqrt(head_dim) softmax scale")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("FlexCoreAttention has no attention dropout (DAPO trains with dropout 0)")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("FlexCoreAttention takes neither packed_seq_params nor attention_bias")
        return flex_core_attention(query, key, value, attention_mask)
