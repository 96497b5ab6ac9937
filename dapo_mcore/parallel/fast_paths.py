"""GPU fast paths behind one switch, each with the CPU path it replaces.

``FastPathConfig.mode`` is the switch:

* ``"auto"``: the GPU paths when CUDA is present, else the portable CPU paths (fp32, no recompute, plain
  optimizer, synchronous reduce, dense masks: the fast way to run the demo on a laptop);
* ``"gpu"``: require the GPU paths (an error on a machine without CUDA);
* ``"cpu"``: the portable paths everywhere;
* ``"emulate"``: the megatron features of the GPU configuration, run where megatron can run them, i.e. also
  on a CPU: bf16 params with fp32 main params (``bf16``), activation recompute, the distributed optimizer,
  overlapped grad reduce / param gather, THD packing (through the CPU varlen core attention), with the
  local layer spec and dense shared-prefix masks (flex_attention has no CPU backward). Purpose: check a
  GPU job's configuration end to end on a laptop with a tiny model before the cluster run, and test each
  path against the CPU path it replaces.

:func:`resolve` turns the switch and the layout into one :class:`ResolvedPaths` per run (the single
source of truth for the model build, :func:`dapo_mcore.models.hf_config.transformer_config`, and
:class:`dapo_mcore.training.trainer.MegatronTrainer`) and validates the combination before any model
is built. Sequence parallelism is a layout setting (``ParallelConfig.sequence_parallel``), passed in.

| fast path (GPU)                         | CPU path it replaces                          | tested on CPU (emulate) against          |
|-----------------------------------------|-----------------------------------------------|------------------------------------------|
| Transformer Engine layer spec           | megatron local spec                           | (GPU only; local spec vs HF logits)      |
| THD packed sequences (PackedSeqParams)  | block-diagonal dense mask                     | unpacked runs (CPU varlen attention)     |
|   critic training, SFT only: shared-    |                                               |   ThdCoreAttention == dense mask == alone,|
|   prefix rows (actor, ref log-probs,    |                                               |   TP=2 == TP=1 (tests/test_thd.py)       |
|   critic scoring) cannot be THD and     |                                               |                                          |
|   keep the dense mask / flex            |                                               |                                          |
| shared-prefix attention: flex_attention | dense boolean mask (megatron local attention) | dense-mask logits (forward only on CPU)  |
|   with a block mask from doc/part ids   |                                               |                                          |
| sequence parallel                       | off (needs TE LayerNorm)                      | (GPU only; refused on CPU)               |
| bf16 + fp32 main params                 | fp32                                          | fp32 within tolerance; main params fp32, |
|                                         |                                               | updates below bf16 resolution accumulate |
| activation recompute (full, selective)  | off                                           | loss and every gradient, TP=1 and TP=2   |
| distributed optimizer                   | megatron non-distributed optimizer            | params after 3 steps, DP=2; checkpoint   |
|                                         |                                               | resume == uninterrupted run              |
| overlap grad reduce / param gather      | synchronous reduce                            | grads and params after steps, DP=2       |

Tests: ``tests/test_fast_paths.py`` (selection, validation, THD ``cu_seqlens``, the flex mask and kernel
forward) and ``tests/test_train_fast_paths.py`` (every emulated path in ``MegatronTrainer`` under torchrun).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Optional

import torch

MODES = ("auto", "gpu", "cpu", "emulate")
RECOMPUTE = ("none", "full", "selective")


class FastPathError(ValueError):
    """An impossible fast-path combination (named in the message)."""


@dataclass
class FastPathConfig:
    """What a run asks for; :func:`resolve` decides what it gets on this machine (see the module doc).

    ``recompute``: ``"none"``, ``"full"`` (every layer, megatron ``recompute_granularity="full"``, method
    uniform) or ``"selective"`` (core attention only)."""

    mode: str = "auto"
    bf16: bool = True
    recompute: str = "none"
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
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
    recompute: str                  # "none" | "full" | "selective"
    distributed_optimizer: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.params_dtype)

    @property
    def bf16(self) -> bool:
        return self.params_dtype == "bfloat16"

    def as_dict(self) -> dict:
        return asdict(self)


PORTABLE = ResolvedPaths(gpu=False, layer_spec="local", packing="dense_mask", shared_prefix_attention="dense_mask",
                         sequence_parallel=False, params_dtype="float32", recompute="none",
                         distributed_optimizer=False, overlap_grad_reduce=False, overlap_param_gather=False)
"""The portable CPU paths (``mode="cpu"``, or ``"auto"`` without CUDA)."""


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
        return True
    except ImportError:
        return False


def resolve(cfg: FastPathConfig, tp: int, sequence_parallel: bool = False, cuda: Optional[bool] = None,
            te: Optional[bool] = None) -> ResolvedPaths:
    """Choose every path for this machine and layout; raise :class:`FastPathError` naming what is wrong."""
    if cfg.mode not in MODES:
        raise FastPathError(f"fast_paths.mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.shared_prefix_attention not in ("flex", "dense"):
        raise FastPathError(f"fast_paths.shared_prefix_attention must be 'flex' or 'dense', "
                            f"got {cfg.shared_prefix_attention!r}")
    if cfg.recompute not in RECOMPUTE:
        raise FastPathError(f"fast_paths.recompute must be one of {RECOMPUTE}, got {cfg.recompute!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    te = _have_te() if te is None else te
    if cfg.mode == "gpu" and not cuda:
        raise FastPathError("fast_paths.mode='gpu' but CUDA is not available on this machine "
                            "(use 'auto', 'cpu' or 'emulate')")
    if sequence_parallel and tp < 2:
        raise FastPathError("sequence_parallel requires tensor_model_parallel_size > 1")
    gpu = cuda and cfg.mode in ("auto", "gpu")
    if gpu or cfg.mode == "emulate":
        if cfg.overlap_param_gather and not cfg.distributed_optimizer:
            raise FastPathError("overlap_param_gather requires distributed_optimizer")
    # the megatron features, taken as asked on a GPU and in emulate mode
    features = dict(params_dtype="bfloat16" if cfg.bf16 else "float32", recompute=cfg.recompute,
                    distributed_optimizer=cfg.distributed_optimizer, overlap_grad_reduce=cfg.overlap_grad_reduce,
                    overlap_param_gather=cfg.overlap_param_gather)
    if gpu:
        if sequence_parallel and not te:
            raise FastPathError("sequence_parallel needs the Transformer Engine layer spec (install transformer-engine)")
        return ResolvedPaths(
            gpu=True, layer_spec="transformer_engine" if te else "local",
            packing="thd" if (cfg.thd_packing and te) else "dense_mask",
            shared_prefix_attention="flex" if cfg.shared_prefix_attention == "flex" else "dense_mask",
            sequence_parallel=sequence_parallel, **features)
    if sequence_parallel:
        raise FastPathError("sequence_parallel is a GPU path (the CPU local spec's LayerNorm does not support it)")
    if cfg.mode == "emulate":
        return ResolvedPaths(gpu=False, layer_spec="local", packing="thd" if cfg.thd_packing else "dense_mask",
                             shared_prefix_attention="dense_mask", sequence_parallel=False, **features)
    return PORTABLE


def add_fast_path_args(ap: argparse.ArgumentParser) -> None:
    """The fast-path flags of every Megatron stage's command line (unset: the config's value)."""
    g = ap.add_argument_group("fast paths")
    g.add_argument("--fast-paths", choices=MODES, default=None, dest="fast_paths",
                   help="auto: GPU paths with CUDA, else portable; emulate: the GPU configuration's megatron "
                        "features on this machine (see dapo_mcore.parallel.fast_paths)")
    g.add_argument("--recompute", choices=RECOMPUTE, default=None, help="activation recompute")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 params with fp32 main params")
    g.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="shard optimizer states over data-parallel ranks")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap grad reduce (and param gather with the distributed optimizer)")


def fast_paths_from_args(a: argparse.Namespace, base: Optional[FastPathConfig] = None) -> FastPathConfig:
    """``base`` (default ``FastPathConfig()``) with the flags of :func:`add_fast_path_args` that were given."""
    import dataclasses

    base = base or FastPathConfig()
    kw: dict = {}
    if a.fast_paths is not None:
        kw["mode"] = a.fast_paths
    if a.recompute is not None:
        kw["recompute"] = a.recompute
    if a.bf16 is not None:
        kw["bf16"] = a.bf16
    if a.distributed_optimizer is not None:
        kw["distributed_optimizer"] = a.distributed_optimizer
    if a.overlap is not None:
        kw["overlap_grad_reduce"] = kw["overlap_param_gather"] = a.overlap
    if kw.get("distributed_optimizer") is False and a.overlap is None:
        kw["overlap_param_gather"] = False      # param gather overlap exists only with the distributed optimizer
    return dataclasses.replace(base, **kw)


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


def thd_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions int64 ``[T]`` of a THD pack: ``0..len-1`` in every document delimited by ``cu_seqlens``
    ``[n_docs + 1]`` (what megatron's ``cu_seqlens`` RoPE uses)."""
    cu = cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
    return torch.arange(int(cu[-1]), device=cu.device) - starts


def thd_packed_seq_params(cu_seqlens: torch.Tensor):
    """megatron ``PackedSeqParams(qkv_format="thd")`` for self-attention over the documents delimited by
    ``cu_seqlens`` int32 ``[n_docs + 1]`` (see :func:`thd_cu_seqlens`; Transformer Engine attention on GPU,
    :class:`ThdCoreAttention` on CPU)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
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


# ------------------------------------------------------------------ THD core attention (CPU varlen)
def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention within each document of a THD pack: q ``[T, h, d]``, k/v ``[T, g, d]`` (GQA,
    ``h % g == 0``), ``cu_seqlens`` int ``[n + 1]`` with ``cu_seqlens[-1] == T`` -> ``[T, h * d]`` in q's
    dtype. One SDPA call per document (no padding, no ``T x T`` mask); computed in fp32 (float64 stays
    float64); scale ``softmax_scale`` or 1/sqrt(d)."""
    T, h, d = q.shape
    if k.shape[0] != T or v.shape[0] != T or k.shape[1] != v.shape[1] or h % k.shape[1]:
        raise ValueError(f"THD attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(need [T, h, d] and [T, g, d] with h % g == 0)")
    cu = [int(x) for x in cu_seqlens.tolist()]
    if not cu or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"THD attention: cu_seqlens must rise from 0 to T={T}, got {cu[:8]}...")
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qt, kt, vt = (x.to(dt).transpose(0, 1) for x in (q, k, v))          # [h|g, T, d]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    outs = [torch.nn.functional.scaled_dot_product_attention(
                qt[:, a:b], kt[:, a:b], vt[:, a:b], is_causal=True, scale=scale, enable_gqa=h != kt.shape[0])
            for a, b in zip(cu, cu[1:]) if b > a]
    out = torch.cat(outs, dim=1) if outs else qt.new_zeros(h, 0, d)      # [h, T, d]
    return out.transpose(0, 1).reshape(T, h * d).to(q.dtype)


class ThdCoreAttention(torch.nn.Module):
    """megatron core attention that consumes THD ``PackedSeqParams`` (``packing == "thd"``).

    With ``packed_seq_params`` (q ``[T, h, d]``, k/v ``[T, g, d]``) it runs ``thd`` if given (Transformer
    Engine's attention on GPU, when flex_attention took the spec's core-attention slot) or else
    :func:`varlen_causal_attention` over ``cu_seqlens_q`` (CPU, local spec). Without them (dense-mask or
    shared-prefix rows: actor, critic scoring) it calls ``masked``, the core attention the spec would
    otherwise use (megatron's ``DotProductAttention`` or :class:`FlexCoreAttention`). ``masked``/``thd`` are
    builders called with the same arguments; bind them with ``functools.partial`` (megatron calls the spec
    entry as a builder)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, masked=None, thd=None):
        super().__init__()
        self.config = config
        if thd is None and getattr(config, "context_parallel_size", 1) > 1:
            raise ValueError("ThdCoreAttention's CPU path does not do context parallelism (Transformer Engine does)")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("ThdCoreAttention has no attention dropout (DAPO trains with dropout 0)")
        if attention_type != "self":
            raise ValueError(f"ThdCoreAttention is self-attention only, got attention_type={attention_type!r}")
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        args = dict(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                    attention_type=attention_type, attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                    cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.masked = None if masked is None else masked(**args)
        self.thd = None if thd is None else thd(**args)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            if self.masked is None:
                raise ValueError("ThdCoreAttention got no packed_seq_params and has no masked core attention")
            return self.masked(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias)
        if self.thd is not None:
            return self.thd(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                            attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if packed_seq_params.qkv_format != "thd" or attention_bias is not None:
            raise ValueError(f"ThdCoreAttention takes qkv_format='thd' and no attention_bias, got "
                             f"{packed_seq_params.qkv_format!r}")
        cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if cu_kv is not None and not torch.equal(cu_q, cu_kv):
            raise ValueError("ThdCoreAttention is self-attention: cu_seqlens_q must equal cu_seqlens_kv")
        if packed_seq_params.cu_seqlens_q_padded is not None or packed_seq_params.cu_seqlens_kv_padded is not None:
            raise ValueError("ThdCoreAttention takes unpadded THD packs (cu_seqlens_*_padded must be None)")
        return varlen_causal_attention(query, key, value, cu_q, self.softmax_scale)
