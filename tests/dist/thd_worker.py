"""torchrun worker for the THD tests (gloo on CPU): ``thd_worker.py TP MODEL MC OUT``.

With the fast-path choice ``packing="thd"`` (local spec, ThdCoreAttention) at tensor-parallel size TP:

1. policy model, forward + backward of a fixed linear functional of the logits, three ways: a THD batch
   (two packed rows concatenated, no padding), the same rows as a dense block-diagonal-mask batch, and
   every example alone -> max relative differences of logits and of every parameter gradient;
2. one critic training step (first 12 solution examples, 2 rows per micro-batch), THD and dense mask,
   each on a fresh value model -> ``OUT/critic_<packing>.json`` (loss, count, tokens, padding) and
   ``OUT/critic_<packing>.safetensors`` (HF-named gradients), for the TP=2 vs TP=1 comparison;
3. one SFT step (fused log-probs read from the ``[1, T, H]`` / ``[b, L, H]`` hidden states), THD and dense
   mask -> ``OUT/sft_<packing>.json`` / ``.safetensors``.

Writes ``OUT/model.json`` (the relative differences of part 1, the THD batch's token count, and a negative
control: the same THD tokens run as ONE document must differ from the examples alone).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from dapo_mcore.critic.data import pack_examples, read_mc, solution_examples
from dapo_mcore.critic.train import value_forward_step
from dapo_mcore.models.convert import collect_hf_state, load_hf_weights
from dapo_mcore.models.gpt import build_model_chunks, model_packing
from dapo_mcore.models.hf_config import load_arch, transformer_config
from dapo_mcore.packing import RowBuilder, batch_rows, dp_share
from dapo_mcore.parallel.fast_paths import FastPathConfig, resolve
from dapo_mcore.parallel.runtime import ParallelConfig, destroy_parallel, initialize_parallel


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def thd_paths(tp: int):
    return dataclasses.replace(resolve(FastPathConfig(mode="cpu"), tp=tp), packing="thd")


def model_part(tp: int, model_dir: str) -> dict:
    """THD == dense mask == alone for the policy model (logits and parameter grads)."""
    from megatron.core import parallel_state as ps

    arch = load_arch(model_dir)
    (model,) = build_model_chunks(arch, transformer_config(arch, tp=tp), paths=thd_paths(tp))
    load_hf_weights([model], model_dir, arch)
    assert model_packing([model]) == "thd"
    g = torch.Generator().manual_seed(5)
    lengths = [(7, 12), (5, 9, 3)]                        # two rows of 2 and 3 examples
    exs = [[torch.randint(2, arch.vocab_size, (n,), generator=g).tolist() for n in row] for row in lengths]
    vshard = arch.vocab_size // tp
    r0 = ps.get_tensor_model_parallel_rank() * vshard
    # a fixed random functional of each example's logits (this rank's vocab shard)
    weights = [[torch.randn(len(e), arch.vocab_size, generator=g)[:, r0:r0 + vshard] for e in row] for row in exs]

    def run(batch, spans):
        """Forward + backward; spans: per example (flat start in [b * L], length). Returns (logits, grads)."""
        model.zero_grad()
        out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                    packed_seq_params=batch.get("packed_seq_params"))
        flat = out.reshape(-1, out.shape[-1])
        logits = [flat[s:s + n] for s, n in spans]
        loss = sum((lg * w).sum() for lg, w in zip(logits, [w for row in weights for w in row]))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        return [lg.detach() for lg in logits], grads

    rows = []
    for row in exs:
        rb = RowBuilder()
        spans = [rb.add_example(e) for e in row]
        rows.append((rb.build(), {"label_index": [s.start for s in spans]}))
    res = {}
    for packing in ("thd", "dense_mask"):
        (mb,) = batch_rows(rows, 2, 0, packing)
        L = mb["input_ids"].shape[1]
        starts = mb["row_offsets"].tolist() if packing == "thd" else [i * L for i in range(len(rows))]
        spans = [(starts[i] + s.start, s.end - s.start) for i, (r, _) in enumerate(rows) for s in r.docs]
        if packing == "thd":
            assert mb["input_ids"].shape == (1, sum(len(e) for row in exs for e in row)), "THD batch has padding"
            res["thd_tokens"] = int(mb["input_ids"].numel())
            res["thd_max_seqlen"] = int(mb["max_seqlen"])
        else:
            res["dense_tokens"] = int(mb["input_ids"].numel())
        res[packing] = run(mb, spans)
    # every example alone: its own single-document THD batch (cu_seqlens [0, n]) and its own dense batch
    alone_logits, alone_grads = [], None
    for ri, row in enumerate(exs):
        for ei, e in enumerate(row):
            rb = RowBuilder()
            rb.add_example(e)
            (mb,) = batch_rows([(rb.build(), {})], 1, 0, "dense_mask")
            model.zero_grad()
            out = model(mb["input_ids"], mb["position_ids"], mb["attention_mask"])
            lg = out.reshape(-1, out.shape[-1])
            (lg * weights[ri][ei]).sum().backward()
            alone_logits.append(lg.detach())
            gi = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            alone_grads = gi if alone_grads is None else {n: alone_grads[n] + gi[n] for n in gi}
    res["alone"] = (alone_logits, alone_grads)
    # negative control: the same tokens as ONE document (cu_seqlens [0, T]) must differ from alone
    from dapo_mcore.packing import thd_packed_seq_params

    (mb,) = batch_rows(rows, 2, 0, "thd")
    T = mb["input_ids"].shape[1]
    with torch.no_grad():
        merged = model(mb["input_ids"], torch.arange(T)[None], None,
                       packed_seq_params=thd_packed_seq_params(torch.tensor([0, T], dtype=torch.int32)))
    merged = merged.reshape(T, -1)
    spans = [(mb["row_offsets"][i].item() + s.start, s.end - s.start) for i, (r, _) in enumerate(rows) for s in r.docs]
    res["merged_vs_alone"] = max(rel(merged[s:s + n], a) for (s, n), a in zip(spans, alone_logits))

    def cmp(a, b):
        (la, ga), (lb, gb) = res[a], res[b]
        return {"logits": max(rel(x, y) for x, y in zip(la, lb)), "grads": max(rel(ga[n], gb[n]) for n in gb),
                "n_grads": len(gb)}

    return {"thd_vs_dense": cmp("thd", "dense_mask"), "thd_vs_alone": cmp("thd", "alone"),
            "dense_vs_alone": cmp("dense_mask", "alone"), "thd_tokens": res["thd_tokens"],
            "dense_tokens": res["dense_tokens"], "thd_max_seqlen": res["thd_max_seqlen"],
            "merged_vs_alone": res["merged_vs_alone"]}


def critic_part(tp: int, model_dir: str, mc: str, out: Path, packing: str) -> None:
    from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig

    arch = load_arch(model_dir)
    paths = dataclasses.replace(thd_paths(tp), packing=packing)
    chunks = build_model_chunks(arch, transformer_config(arch, tp=tp), value_head=True, value_head_seed=3,
                                paths=paths)
    load_hf_weights(chunks, model_dir, arch)
    exs = solution_examples(read_mc(mc))[:12]
    mbs = pack_examples(exs, 160, 0, 2, model_packing(chunks))
    assert all(("packed_seq_params" in mb) == (packing == "thd") for mb in mbs)
    tokens = sum(int(mb["input_ids"].numel()) for mb in mbs)
    pad = sum(int((mb["lengths"].sum())) for mb in mbs)
    trainer = MegatronTrainer(chunks, OptimConfig(lr=1e-3, adam_eps=1e-3, clip_grad=0.0), total_steps=1)
    res = trainer.train_step(dp_share(mbs, 0), value_forward_step)
    grads = collect_hf_state(trainer.chunks, arch, lambda n, p: p.main_grad)
    if torch.distributed.get_rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in grads.items()}, str(out / f"critic_{packing}.safetensors"))
        (out / f"critic_{packing}.json").write_text(json.dumps(
            {"loss": res.loss, "count": res.count, "microbatches": len(mbs), "tokens_computed": tokens,
             "real_tokens": pad, "example_tokens": sum(len(e) for e in exs)}))


def sft_part(tp: int, model_dir: str, out: Path, packing: str) -> None:
    """One SFT step (fused log-probs from the hidden states) on fixed random examples -> ``OUT/sft_<packing>.*``."""
    from dapo_mcore.sft.train import SFTExample, pack_sft, sft_forward_step
    from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig

    arch = load_arch(model_dir)
    paths = dataclasses.replace(thd_paths(tp), packing=packing)
    chunks = build_model_chunks(arch, transformer_config(arch, tp=tp), paths=paths)
    load_hf_weights(chunks, model_dir, arch)
    g = torch.Generator().manual_seed(9)
    rnd = lambda n: torch.randint(2, arch.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    exs = [SFTExample(rnd(n), rnd(m)) for n, m in ((6, 4), (9, 7), (3, 5), (12, 2), (5, 8))]
    mbs = pack_sft(exs, 24, 0, 2, model_packing(chunks))
    trainer = MegatronTrainer(chunks, OptimConfig(lr=1e-3, adam_eps=1e-3, clip_grad=0.0), total_steps=1)
    res = trainer.train_step(dp_share(mbs, 0), sft_forward_step)
    grads = collect_hf_state(trainer.chunks, arch, lambda n, p: p.main_grad)
    if torch.distributed.get_rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in grads.items()}, str(out / f"sft_{packing}.safetensors"))
        (out / f"sft_{packing}.json").write_text(json.dumps({"loss": res.loss, "count": res.count}))


def main() -> None:
    tp, model_dir, mc, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp))
    out.mkdir(parents=True, exist_ok=True)
    model_res = model_part(tp, model_dir)
    per_rank: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, model_res)      # each TP rank checked its own shards
    for key in ("thd_vs_dense", "thd_vs_alone", "dense_vs_alone"):
        for f in ("logits", "grads"):
            model_res[key][f] = max(r[key][f] for r in per_rank)
    model_res["merged_vs_alone"] = min(r["merged_vs_alone"] for r in per_rank)
    for packing in ("thd", "dense_mask"):
        critic_part(tp, model_dir, mc, out, packing)
        sft_part(tp, model_dir, out, packing)
    if torch.distributed.get_rank() == 0:
        (out / "model.json").write_text(json.dumps(model_res))
    destroy_parallel()


if __name__ == "__main__":
    main()
