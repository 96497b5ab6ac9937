"""Core-attention modules for the packed layouts, plugged into megatron's layer spec by
:func:`dapo_mcore.models.gpt.build_model` as the fast-path switch says (``ResolvedPaths``):

* :class:`FlexCoreAttention`: ``flex_attention`` with a ``BlockMask`` built from the shared-prefix rule
  (``shared_prefix_attention == "flex"``; GPU: the forward also runs on CPU, the backward does not);
* :class:`ThdCoreAttention`: THD packed sequences (``packing == "thd"``): Transformer Engine's attention on
  GPU, :func:`varlen_causal_attention` (one causal SDPA per document) on CPU; rows that carry a mask go to
  the masked core attention it wraps.

Each is tested against the dense-mask path it replaces (``tests/test_fast_paths.py``, ``tests/test_thd.py``).
"""
from __future__ import annotations

from typing import Optional

import torch


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
