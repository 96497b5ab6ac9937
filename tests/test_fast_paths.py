"""GPU fast paths behind one switch: selection/validation on CPU, THD cu_seqlens, and the shared-prefix
flex_attention mask and kernel (forward runs on CPU) against the dense-mask path it replaces."""
from __future__ import annotations

import pytest
import torch

from dapo_mcore.packing import RowBuilder
from dapo_mcore.parallel.fast_paths import (FastPathConfig, FastPathError, doc_part_of, flex_core_attention,
                                            resolve, shared_prefix_block_mask, shared_prefix_mask_mod,
                                            thd_cu_seqlens)


def test_switch_selects_paths():
    cpu = resolve(FastPathConfig(), tp=2, cuda=False, te=False)
    assert (cpu.gpu, cpu.layer_spec, cpu.packing, cpu.shared_prefix_attention, cpu.params_dtype) == \
        (False, "local", "dense_mask", "dense_mask", "float32")
    assert not (cpu.recompute or cpu.distributed_optimizer or cpu.overlap_grad_reduce)
    gpu = resolve(FastPathConfig(recompute=True), tp=2, cuda=True, te=True)
    assert (gpu.gpu, gpu.layer_spec, gpu.packing, gpu.shared_prefix_attention, gpu.params_dtype) == \
        (True, "transformer_engine", "thd", "flex", "bfloat16")
    assert gpu.recompute and gpu.distributed_optimizer and gpu.overlap_param_gather
    no_te = resolve(FastPathConfig(), tp=1, cuda=True, te=False)
    assert (no_te.layer_spec, no_te.packing) == ("local", "dense_mask")        # THD needs TE attention
    forced_cpu = resolve(FastPathConfig(mode="cpu"), tp=1, cuda=True, te=True)
    assert not forced_cpu.gpu and forced_cpu.layer_spec == "local"


@pytest.mark.parametrize("cfg,tp,cuda,te,msg", [
    (FastPathConfig(mode="gpu"), 1, False, False, "CUDA is not available"),
    (FastPathConfig(sequence_parallel=True), 1, True, True, "requires tensor_model_parallel_size > 1"),
    (FastPathConfig(sequence_parallel=True), 2, False, False, "sequence_parallel is a GPU path"),
    (FastPathConfig(sequence_parallel=True), 2, True, False, "needs the Transformer Engine layer spec"),
    (FastPathConfig(distributed_optimizer=False), 1, True, True, "overlap_param_gather requires distributed_optimizer"),
    (FastPathConfig(mode="fast"), 1, True, True, "mode must be one of"),
    (FastPathConfig(shared_prefix_attention="xformers"), 1, True, True, "must be 'flex' or 'dense'"),
])
def test_switch_validates(cfg, tp, cuda, te, msg):
    with pytest.raises(FastPathError, match=msg):
        resolve(cfg, tp=tp, cuda=cuda, te=te)


def test_thd_cu_seqlens_from_packed_row():
    rb = RowBuilder()
    for n in (5, 3, 7):
        rb.add_example(list(range(1, n + 1)))
    row = rb.build()
    doc = torch.cat([row.doc, torch.full((4,), -2)])   # trailing padding is ignored
    assert thd_cu_seqlens(doc).tolist() == [0, 5, 8, 15]
    assert thd_cu_seqlens(doc).dtype == torch.int32


def _rows():
    a, b = RowBuilder(), RowBuilder()
    a.add_state([1, 2, 3, 4], [[5, 6], [7], [8, 9, 10]])
    a.add_example([11, 12, 13])
    b.add_state([14, 15], [[16, 17, 18]])
    return [a.build(), b.build()]


def test_flex_mask_mod_equals_dense_rule():
    rows = _rows()
    doc, part = doc_part_of(rows)
    L = doc.shape[1]
    mm = shared_prefix_mask_mod(doc, part)
    q = torch.arange(L)[:, None].expand(L, L)
    kv = torch.arange(L)[None, :].expand(L, L)
    for i, r in enumerate(rows):
        dense_allowed = ~r.attention_mask(L)
        assert torch.equal(mm(torch.full_like(q, i), 0, q, kv), dense_allowed), i


def test_flex_attention_forward_equals_dense_mask_attention():
    """The GPU kernel path (flex_attention + block mask, GQA) on CPU forward == SDPA with the dense mask."""
    rows = _rows()
    doc, part = doc_part_of(rows)
    B, L = doc.shape
    h, g, d = 4, 2, 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(L, B, h, d, generator=gen)
    k = torch.randn(L, B, g, d, generator=gen)
    v = torch.randn(L, B, g, d, generator=gen)
    out = flex_core_attention(q, k, v, shared_prefix_block_mask(doc, part))
    mask = torch.stack([~r.attention_mask(L) for r in rows])[:, None]         # True = attend
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3).repeat_interleave(h // g, 1),
        v.permute(1, 2, 0, 3).repeat_interleave(h // g, 1), attn_mask=mask)
    ref = ref.permute(2, 0, 1, 3).reshape(L, B, h * d)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.dist
@pytest.mark.parametrize("tp", [1, 2])
def test_flex_core_attention_in_megatron_equals_dense(tp, tiny_qwen2, torchrun, tmp_path):
    """The megatron model built with the flex_attention core attention (the GPU shared-prefix path) gives
    the dense-mask local attention's logits on packed rows (forward; flex has no CPU backward), and a
    wrong mask changes them (the mask reaches the kernel)."""
    import json

    out = tmp_path / "flex.json"
    torchrun("foundation_worker.py", tp, "flex", tp, 1, tiny_qwen2, out)
    r = json.loads(out.read_text())
    assert r["core"] == "FlexCoreAttention" and r["backend"] == "flex"
    assert r["max_abs_diff"] <= 1e-5
    assert r["wrong_mask_diff"] > 1e-2
