"""Megatron GPT models built from an HF architecture: the policy (LM head) and the value model.

:class:`DapoGPTModel` extends megatron's ``GPTModel`` with two things the DAPO stages need:

* RoPE taken from ``position_ids`` (megatron's GPTModel uses ``0..s-1`` whatever ``position_ids`` say,
  which breaks packed rows and the shared-prefix layout where an action's positions continue from its
  state's length);
* THD packed batches (``packed_seq_params``, ``input_ids`` ``[1, T]``, no mask): megatron's own RoPE then
  restarts at 0 in every ``cu_seqlens`` document, which is what THD ``position_ids`` say (checked), and the
  core attention is :class:`~dapo_mcore.models.attention.ThdCoreAttention` on CPU (TE's on GPU);
* ``forward(..., output="hidden")`` returning the final-norm hidden states ``[b, s, H]`` instead of
  logits, so the fused log-prob kernel can read them with :meth:`output_weight` and never build
  ``[tokens, vocab]`` logits.

The value model replaces the LM head with :class:`ValueHead` (``[b, s, 1]`` logits; ``sigmoid`` gives V).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dapo_mcore.models.attention import FlexCoreAttention, ThdCoreAttention, block_mask_from_dense
from dapo_mcore.models.hf_config import ArchSpec, transformer_config
from dapo_mcore.packing import thd_positions
from dapo_mcore.parallel.fast_paths import FastPathConfig, resolve


class ValueHead(torch.nn.Module):
    """Scalar head ``[s, b, H] -> [s, b, 1]`` (logit of V), replicated across TP ranks (HF: ``score``)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32, init_std: float = 0.02,
                 seed: int = 0):
        super().__init__()
        # A private generator: every TP rank must hold the same replica, whatever RNG the layers consumed.
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(1, hidden_size, generator=g, dtype=torch.float32) * init_std
        self.weight = torch.nn.Parameter(w.to(dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, hidden_states: Tensor, weight: Optional[Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias), None


def default_paths():
    """The fast-path choice for this machine and the current TP size (``FastPathConfig()`` defaults)."""
    from megatron.core import parallel_state as ps

    return resolve(FastPathConfig(), tp=ps.get_tensor_model_parallel_world_size())


def _layer_spec(paths, arch: Optional[ArchSpec] = None):
    """The layer spec the fast-path switch chose (``paths``: a ``ResolvedPaths``) for ``arch`` (q/k RMSNorm
    for Qwen3; for MoE the spec's MoE layer with ``SequentialMLP`` experts, the layout the HF converter maps).

    Core attention: the spec's own, or ``FlexCoreAttention`` with ``shared_prefix_attention == "flex"``
    (masked rows). With ``packing == "thd"`` it is wrapped in ``ThdCoreAttention`` (THD batches: CPU varlen
    SDPA, or TE's attention when flex took its slot) unless the TE attention already does both."""
    import copy
    import functools

    from megatron.core.models.gpt import gpt_layer_specs as specs

    kw = dict(num_experts=arch.num_experts if arch is not None else None, moe_grouped_gemm=False,
              qk_layernorm=bool(arch is not None and arch.qk_norm))
    if paths.layer_spec == "transformer_engine":
        spec = specs.get_gpt_layer_with_transformer_engine_spec(**kw)
    else:
        spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm", **kw)
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention.submodules
    native = attn.core_attention
    if paths.shared_prefix_attention == "flex":
        attn.core_attention = FlexCoreAttention
    if paths.packing == "thd" and not (paths.layer_spec == "transformer_engine" and attn.core_attention is native):
        thd = native if paths.layer_spec == "transformer_engine" else None
        attn.core_attention = functools.partial(ThdCoreAttention, masked=attn.core_attention, thd=thd)
    return spec


def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    class DapoGPTModel(GPTModel):
        """megatron ``GPTModel`` + RoPE from ``position_ids`` + ``output="hidden"`` (see module doc)."""

        _output_mode = "logits"

        def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor],
                    *args, output: str = "logits", packed_seq_params=None, **kwargs):
            if output not in ("logits", "hidden"):
                raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
            span = getattr(self, "max_attention_span", None)
            if span is not None and position_ids is not None and position_ids.numel() \
                    and int(position_ids.max()) >= span:
                raise ValueError(f"position {int(position_ids.max())} is beyond the model's sliding window "
                                 f"({span}): full causal attention equals the window only within it")
            thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
            if thd:
                _check_thd_inputs(input_ids, position_ids, attention_mask, packed_seq_params)
                kwargs["packed_seq_params"] = packed_seq_params
            elif packed_seq_params is not None:
                raise ValueError(f"packed_seq_params.qkv_format must be 'thd', got {packed_seq_params.qkv_format!r}")
            if getattr(self, "attention_backend", "dense_mask") == "flex" and torch.is_tensor(attention_mask):
                attention_mask = block_mask_from_dense(attention_mask)
            self._output_mode = output
            # THD: megatron's cu_seqlens RoPE (positions restart per document) == position_ids (checked)
            self._position_ids = None if thd else position_ids
            try:
                return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
            finally:
                self._output_mode = "logits"
                self._position_ids = None

        def _preprocess(self, *args, **kwargs):
            out = super()._preprocess(*args, **kwargs)
            pos = getattr(self, "_position_ids", None)
            if pos is None or self.position_embedding_type != "rope" or out[1] is None:
                return out
            # megatron built freqs for positions 0..s-1 ([s, 1, 1, d]); index by the real positions.
            table = self.rotary_pos_emb(int(pos.max().item()) + 1)
            emb = table[pos.t().long()]                      # [s, b, 1, 1, d] -> [s, b, 1, d]
            emb = emb.reshape(pos.shape[1], pos.shape[0], 1, table.shape[-1])
            return (out[0], emb) + tuple(out[2:])

        def _postprocess(self, hidden_states, *args, **kwargs):
            if self._output_mode == "hidden" and self.post_process:
                return hidden_states.transpose(0, 1).contiguous()   # [s, b, H] -> [b, s, H]
            return super()._postprocess(hidden_states, *args, **kwargs)

        def output_weight(self) -> Tensor:
            """The (local vocab shard of the) LM-head weight ``[V/tp, H]`` used with ``output="hidden"``."""
            if self.share_embeddings_and_output_weights:
                return self.shared_embedding_or_output_weight()
            return self.output_layer.weight

    return DapoGPTModel


def _check_thd_inputs(input_ids: Optional[Tensor], position_ids: Optional[Tensor], attention_mask, psp) -> None:
    """A THD batch: ``[1, T]`` tokens, no mask, ``cu_seqlens`` ending at T, positions restarting per document."""
    cu = psp.cu_seqlens_q
    if attention_mask is not None:
        raise ValueError("a THD batch (packed_seq_params) takes attention_mask=None")
    if position_ids is None:
        return
    if position_ids.dim() != 2 or position_ids.shape[0] != 1 or int(cu[-1]) != position_ids.shape[1]:
        raise ValueError(f"THD position_ids must be [1, T] with T = cu_seqlens[-1] = {int(cu[-1])}, "
                         f"got {tuple(position_ids.shape)}")
    if input_ids is not None and input_ids.shape != position_ids.shape:
        raise ValueError(f"THD input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} differ")
    if not torch.equal(position_ids[0], thd_positions(cu).to(position_ids.device)):
        raise ValueError("THD position_ids must restart at 0 in every cu_seqlens document (megatron's RoPE does)")


def unwrap_model(model):
    """The model inside megatron's DDP / Float16 wrappers (each holds the next as ``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_packing(chunks) -> str:
    """The packing (``"thd"`` | ``"dense_mask"``) the model chunk(s) were built for (``ResolvedPaths.packing``),
    through DDP/Float16 wrappers: what batch builders must produce for them."""
    m = chunks[0] if isinstance(chunks, (list, tuple)) else chunks
    return getattr(unwrap_model(m), "packing", "dense_mask")


def build_model(arch: ArchSpec, config=None, *, value_head: bool = False, pre_process: bool = True,
                post_process: bool = True, vp_stage: Optional[int] = None, max_sequence_length: Optional[int] = None,
                value_head_seed: int = 0, paths=None):
    """One model chunk on this rank (``pre_process``/``post_process`` = first/last PP stage).

    Args:
        arch: architecture from :func:`dapo_mcore.models.hf_config.load_arch`.
        config: a megatron ``TransformerConfig`` (default: :func:`transformer_config` for the current layout).
        value_head: build the critic (scalar head, never tied to the embeddings).
        value_head_seed: seed of the head's fresh init (used when the checkpoint has no ``score``).
        paths: the fast-path choice (:func:`dapo_mcore.parallel.fast_paths.resolve`; default: this machine's).
    """
    from megatron.core import parallel_state as ps

    if config is None:
        config = transformer_config(arch, tp=ps.get_tensor_model_parallel_world_size(),
                                    pp=ps.get_pipeline_model_parallel_world_size(),
                                    ep=ps.get_expert_model_parallel_world_size())
    paths = paths if paths is not None else default_paths()
    cls = _gpt_model_class()
    model = cls(
        config=config, transformer_layer_spec=_layer_spec(paths, arch), vocab_size=arch.vocab_size,
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        pre_process=pre_process, post_process=post_process, parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings and not value_head,
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None, rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )
    if value_head and post_process:
        model.output_layer = ValueHead(arch.hidden_size, config.params_dtype, arch.init_std, value_head_seed)
    model.is_value_model = value_head
    model.max_attention_span = arch.max_attention_span
    model.attention_backend = paths.shared_prefix_attention
    model.packing = paths.packing
    return model


def build_model_chunks(arch: ArchSpec, config=None, *, value_head: bool = False, value_head_seed: int = 0,
                       paths=None) -> list:
    """All model chunks of this rank (one, or ``vpp`` with interleaved pipelining)."""
    from megatron.core import parallel_state as ps

    if config is None:
        config = transformer_config(arch, tp=ps.get_tensor_model_parallel_world_size(),
                                    pp=ps.get_pipeline_model_parallel_world_size(),
                                    vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
                                    ep=ps.get_expert_model_parallel_world_size())
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None:
        return [build_model(arch, config, value_head=value_head, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), value_head_seed=value_head_seed,
                            paths=paths)]
    return [build_model(arch, config, value_head=value_head, value_head_seed=value_head_seed, paths=paths,
                        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i),
                        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i), vp_stage=i)
            for i in range(vpp)]
