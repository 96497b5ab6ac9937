"""GPU fast paths behind one switch: selection/validation on CPU, THD cu_seqlens, and the shared-prefix
flex_attention mask and kernel (forward runs on CPU) against the dense-mask path it replaces."""
from __future__ import annotations

import pytest
import torch

from dapo_mcore.models.attention import (doc_part_of, flex_core_attention, shared_prefix_block_mask,
                                         shared_prefix_mask_mod)
from dapo_mcore.packing import RowBuilder, thd_cu_seqlens
from dapo_mcore.parallel.fast_paths import FastPathConfig, FastPathError, resolve
from dapo_mcore.parallel.runtime import ParallelConfig, ParallelConfigError


def test_switch_selects_paths():
    cpu = resolve(FastPathConfig(), tp=2, cuda=False, te=False)
    assert (cpu.gpu, cpu.layer_spec, cpu.packing, cpu.shared_prefix_attention, cpu.params_dtype) == \
        (False, "local", "dense_mask", "dense_mask", "float32")
    assert cpu.recompute == "none" and not (cpu.distributed_optimizer or cpu.overlap_grad_reduce)
    gpu = resolve(FastPathConfig(recompute="full"), tp=2, cuda=True, te=True)
    assert (gpu.gpu, gpu.layer_spec, gpu.packing, gpu.shared_prefix_attention, gpu.params_dtype) == \
        (True, "transformer_engine", "thd", "flex", "bfloat16")
    assert gpu.recompute == "full" and gpu.distributed_optimizer and gpu.overlap_param_gather
    no_te = resolve(FastPathConfig(), tp=1, cuda=True, te=False)
    assert (no_te.layer_spec, no_te.packing) == ("local", "dense_mask")        # THD needs TE attention
    forced_cpu = resolve(FastPathConfig(mode="cpu"), tp=1, cuda=True, te=True)
    assert not forced_cpu.gpu and forced_cpu.layer_spec == "local"


@pytest.mark.parametrize("cfg,tp,cuda,te,msg", [
    (FastPathConfig(mode="gpu"), 1, False, False, "CUDA is not available"),
    (FastPathConfig(), 1, True, True, "requires tensor_model_parallel_size > 1"),
    (FastPathConfig(), 2, False, False, "sequence_parallel is a GPU path"),
    (FastPathConfig(mode="emulate"), 2, False, False, "sequence_parallel is a GPU path"),
    (FastPathConfig(), 2, True, False, "needs the Transformer Engine layer spec"),
    (FastPathConfig(distributed_optimizer=False), 1, True, True, "overlap_param_gather requires distributed_optimizer"),
    (FastPathConfig(mode="emulate", distributed_optimizer=False), 1, False, False,
     "overlap_param_gather requires distributed_optimizer"),
    (FastPathConfig(recompute="some"), 1, True, True, "recompute must be one of"),
    (FastPathConfig(mode="fast"), 1, True, True, "mode must be one of"),
    (FastPathConfig(shared_prefix_attention="xformers"), 1, True, True, "must be 'flex' or 'dense'"),
])
def test_switch_validates(cfg, tp, cuda, te, msg):
    sp = any(w in msg for w in ("sequence_parallel", "Transformer Engine", "tensor_model_parallel_size"))
    with pytest.raises(FastPathError, match=msg):
        resolve(cfg, tp=tp, sequence_parallel=sp, cuda=cuda, te=te)


def test_emulate_runs_the_gpu_configuration_on_cpu():
    """emulate on a CPU: the GPU run's megatron features, with the portable kernels (local spec, dense
    shared-prefix masks: flex has no CPU backward) and THD packing through the CPU varlen attention."""
    emu = resolve(FastPathConfig(mode="emulate", recompute="full"), tp=2, cuda=False, te=False)
    assert (emu.gpu, emu.layer_spec, emu.packing, emu.shared_prefix_attention, emu.params_dtype) == \
        (False, "local", "thd", "dense_mask", "bfloat16")
    assert emu.recompute == "full" and emu.distributed_optimizer and emu.overlap_grad_reduce \
        and emu.overlap_param_gather and not emu.sequence_parallel
    assert resolve(FastPathConfig(mode="emulate", thd_packing=False, bf16=False), tp=1, cuda=False).packing == \
        "dense_mask"
    auto = resolve(FastPathConfig(recompute="full"), tp=1, cuda=False, te=False)   # auto on CPU: portable
    assert auto.recompute == "none" and not auto.bf16 and not auto.distributed_optimizer


def test_stage_commands_take_the_launchers_layout_flags(monkeypatch, tmp_path, capsys):
    """Every distributed stage command takes the flags scripts/launch_torchrun.sh appends (--tp, --pp, --vpp,
    --sequence-parallel, --micro-batch, --global-batch, --recompute): each sets the config key its field
    declares, in that stage's section; a forward-only stage has no --global-batch."""
    from dapo_mcore import cli
    from dapo_mcore.run.pipeline import Pipeline

    seen = {}
    monkeypatch.setattr(Pipeline, "prepare", lambda self, echo=True, **kw: None)
    monkeypatch.setattr(Pipeline, "run_unit", lambda self, k, name, force=False: seen.update(cfg=self.cfg, name=name))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("toy: {}\n")
    assert cli.main(["train-critic", str(cfg), "critic.parallel.fast_paths.mode=emulate", "--tp", "2",
                     "--micro-batch", "2", "--global-batch", "64", "--recompute", "full"]) == 0
    c = seen["cfg"].critic
    assert seen["name"] == "critic" and c.parallel.tensor_model_parallel_size == 2
    assert (c.rows_per_microbatch, c.global_batch, c.parallel.fast_paths.recompute) == (2, 64, "full")
    assert c.parallel.paths(cuda=False).recompute == "full"
    assert cli.main(["train-actor", str(cfg), "--global-batch", "96", "--pp", "2", "--vpp", "2"]) == 0
    a = seen["cfg"].actor
    assert (a.global_batch_actions, a.parallel.pipeline_model_parallel_size,
            a.parallel.virtual_pipeline_model_parallel_size) == (96, 2, 2)
    assert cli.main(["advantage", str(cfg), "--micro-batch", "3"]) == 0
    assert seen["cfg"].advantage.rows_per_microbatch == 3
    with pytest.raises(SystemExit):
        cli.main(["advantage", str(cfg), "--global-batch", "64"])     # forward-only: no optimizer batch
    assert "unrecognized arguments: --global-batch" in capsys.readouterr().err
    with pytest.raises(ParallelConfigError, match="recompute must be one of"):
        ParallelConfig(fast_paths=FastPathConfig(recompute="x")).validate(1, cuda=False)


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


def test_run_config_fast_paths_flow_to_every_megatron_stage(tmp_path):
    from dapo_mcore.config import ConfigError
    from dapo_mcore.run.schema import load_run_config

    f = tmp_path / "c.yaml"
    f.write_text("toy: {}\nfast_paths: {mode: emulate, recompute: full}\nactor:\n  parallel: {fast_paths: {mode: cpu}}\n")
    c = load_run_config(f)
    assert [getattr(c, s).parallel.fast_paths.mode for s in ("critic", "advantage", "rft")] == ["emulate"] * 3
    assert c.critic.parallel.fast_paths.recompute == "full"
    assert c.actor.parallel.fast_paths.mode == "cpu"                  # a stage's own setting wins
    assert load_run_config(None, ["toy.seed=0"]).critic.parallel.fast_paths.mode == "auto"
    with pytest.raises(ConfigError, match="critic.parallel.fast_paths: .*recompute must be one of"):
        load_run_config(f, ["fast_paths.recompute=bad"])
