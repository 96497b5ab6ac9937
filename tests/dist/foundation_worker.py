"""torchrun worker for the foundation tests (gloo on CPU).

Modes (argv[1]):
  logits    TP PP MODEL OUT            full-vocab logits of a fixed batch -> OUT (torch.save, rank 0)
  roundtrip TP PP MODEL OUT            HF -> megatron(TP, PP) -> HF checkpoint at OUT
  packing   TP 1  MODEL OUT            block-diagonal and shared-prefix rows vs unpacked runs -> OUT json
  value     TP PP MODEL OUT            value model from a policy checkpoint -> HF export at OUT/hf, logits at
                                       OUT/values.pt; then re-imported from OUT/hf -> OUT/values2.pt
  flex      TP 1  MODEL OUT            the flex_attention core attention (GPU fast path; forward only on CPU)
                                       vs the dense-mask local attention on packed rows -> OUT json
  train     TP PP MODEL OUT [--steps N] [--save-at K --ckpt DIR] [--load DIR] [--vpp V]
            LM training steps on fixed synthetic batches; rank 0 writes OUT/losses.json and
            OUT/grads_step1.safetensors (HF-named gradients of the first step run)
  params    TP PP MODEL OUT            real parameter count of every rank's chunks and the planner's prediction
                                       (dapo_mcore.plan.memory.rank_params) -> OUT json (rank 0)
  realtext  TP PP MODEL OUT --groups FILE
            shared-prefix packed log-probs (actor/reference path) and critic scores (critic scoring path)
            of the states/actions in FILE (JSON [{"state": ids, "actions": [ids, ...]}, ...]) vs one
            unpacked forward per sequence -> OUT json

Every mode takes ``--ep E`` (MoE expert parallel size; the world size is then a multiple of TP x PP x E and
the extra ranks are data-parallel copies that run the same batches).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dapo_mcore.models.convert import collect_hf_state, load_hf_weights, save_hf_checkpoint
from dapo_mcore.models.gpt import build_model_chunks
from dapo_mcore.models.hf_config import load_arch, transformer_config
from dapo_mcore.parallel.runtime import ParallelConfig, destroy_parallel, initialize_parallel

SEQ, MBS, NUM_MB = 16, 2, 4


def fixed_batch(step: int, vocab: int, n_mb: int = NUM_MB) -> list[dict]:
    """Deterministic micro-batches for ``step`` (same on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    mbs = []
    for _ in range(n_mb):
        ids = torch.randint(0, vocab, (MBS, SEQ + 1), generator=g)
        mask = torch.ones(MBS, SEQ)
        mask[1, SEQ - 5:] = 0  # a few unlabelled tokens
        mbs.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "position_ids": torch.arange(SEQ).expand(MBS, SEQ).contiguous(), "loss_mask": mask})
    return mbs


def lm_forward_step(model, batch):
    from megatron.core import tensor_parallel

    from dapo_mcore.training.trainer import make_loss_fn

    logits = model(batch["input_ids"], batch["position_ids"], None)

    def compute(out):
        if out.dim() != 3:  # non-last PP stage never calls loss_fn
            raise RuntimeError("unexpected output")
        tok = tensor_parallel.vocab_parallel_cross_entropy(out.float().transpose(0, 1).contiguous(),
                                                           batch["labels"].t().contiguous()).t()
        mask = batch["loss_mask"]
        return (tok * mask).sum(), mask.sum().int(), {}

    return logits, make_loss_fn(compute)


def gather_full_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [..., V/tp] -> [..., V] (differentiable)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


def _token_logp(model, batch: dict, src: list[int], tgt: list[int], row: int = 0) -> torch.Tensor:
    """log p(tgt | hidden at src) for one row, full vocab (gathered over TP)."""
    logits = gather_full_logits(model(batch["input_ids"], batch["position_ids"], batch.get("attention_mask")))
    lp = torch.log_softmax(logits[row].float(), dim=-1)
    return lp[torch.tensor(src), torch.tensor(tgt)]


def packing_check(model, arch) -> dict:
    """Max abs differences packed vs unpacked: logits (examples, shared prefix) and gradients."""
    from dapo_mcore.packing import RowBuilder, collate

    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(2, arch.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    res = {}
    # (a) block-diagonal examples, two rows with padding
    exs = [rnd(n) for n in (7, 12, 5, 9)]
    rb1, rb2 = RowBuilder(), RowBuilder()
    spans = [rb1.add_example(exs[0]), rb1.add_example(exs[1]), rb1.add_example(exs[2]), rb2.add_example(exs[3])]
    batch = collate([rb1.build(), rb2.build()], pad_id=0)
    model.eval()
    with torch.no_grad():
        packed = gather_full_logits(model(batch["input_ids"], batch["position_ids"], batch["attention_mask"]))
        diff = 0.0
        for k, (ex, sp) in enumerate(zip(exs, spans)):
            row = 0 if k < 3 else 1
            alone = gather_full_logits(model(torch.tensor([ex]), torch.arange(len(ex))[None], None))[0]
            diff = max(diff, (packed[row, sp.start:sp.end] - alone).abs().max().item())
    res["example_logits"] = diff
    # (b) shared prefix: two states with 3 and 2 actions of different lengths in one row
    states = [rnd(10), rnd(6)]
    actions = [[rnd(3), rnd(5), rnd(1)], [rnd(4), rnd(2)]]
    rb = RowBuilder()
    groups = [rb.add_state(s, acts) for s, acts in zip(states, actions)]
    batch = collate([rb.build()], pad_id=0)
    with torch.no_grad():
        packed = gather_full_logits(model(batch["input_ids"], batch["position_ids"], batch["attention_mask"]))[0]
        diff = 0.0
        for s, acts, grp in zip(states, actions, groups):
            for a, sp in zip(acts, grp.actions):
                seq = s + a
                alone = gather_full_logits(model(torch.tensor([seq]), torch.arange(len(seq))[None], None))[0]
                diff = max(diff, (packed[sp.start:sp.end] - alone[len(s):]).abs().max().item(),
                           (packed[grp.state_end - 1] - alone[len(s) - 1]).abs().max().item())
    res["shared_prefix_logits"] = diff
    # (c) gradients of the summed action log-probs: packed (gather src/tgt) vs one run per (s, a)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    tot = sum(_token_logp(model, batch, sp.src, sp.tgt).sum() for grp in groups for sp in grp.actions)
    tot.backward()
    g_packed = [p.grad.clone() for p in params]
    model.zero_grad()
    tot2 = 0.0
    for s, acts in zip(states, actions):
        for a in acts:
            seq = s + a
            b1 = {"input_ids": torch.tensor([seq]), "position_ids": torch.arange(len(seq))[None]}
            tot2 = tot2 + _token_logp(model, b1, list(range(len(s) - 1, len(seq) - 1)), a).sum()
    tot2.backward()
    res["logp_sum_diff"] = abs(float(tot) - float(tot2))
    res["grad_rel"] = max(((p.grad - gp).abs().max() / gp.abs().max().clamp_min(1e-12)).item()
                          for p, gp in zip(params, g_packed))
    model.zero_grad()
    return res


def pipeline_forward(chunks, batches, collect) -> torch.Tensor:
    """Forward-only through the pipeline schedule: ``collect(last_stage_output)`` of every micro-batch,
    concatenated on dim 0, returned on every rank (broadcast from the last pipeline stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["input_ids"], b["position_ids"], None)
        return out, lambda o: (o.sum() * 0, {"x": collect(o).detach()})

    for c in chunks:
        c.eval()
    with torch.no_grad():
        res = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=chunks[0],
                                          num_microbatches=len(batches), seq_length=batches[0]["input_ids"].shape[1],
                                          micro_batch_size=batches[0]["input_ids"].shape[0], forward_only=True)
    x = torch.cat([r["x"] for r in res]) if res else torch.zeros(0)
    obj = [x]
    torch.distributed.broadcast_object_list(obj, src=ps.get_pipeline_model_parallel_last_rank(),
                                            group=ps.get_pipeline_model_parallel_group())
    return obj[0]


def pipeline_values(chunks, batches) -> torch.Tensor:
    """Forward-only value logits [b, s] through the pipeline schedule (returned on every rank)."""
    return pipeline_forward(chunks, batches, lambda o: o.squeeze(-1))


def pipeline_logits(chunks, batches) -> torch.Tensor:
    """Forward-only full-vocab logits [b, s, V] (gathered over TP) through the pipeline schedule."""
    return pipeline_forward(chunks, batches, gather_full_logits)


def realtext_check(chunks, arch, cfg, model_dir: str, groups_file: str) -> dict:
    """Shared-prefix packed log-probs (``reference_logprobs``, the fused op on packed rows) and critic scores
    (``score_groups``) vs one unpacked forward per sequence (full-vocab log_softmax / value at the last token)."""
    from dapo_mcore.training.logprobs import reference_logprobs
    from dapo_mcore.training.logprobs import ActionGroup
    from dapo_mcore.training.values import ScoreGroup, score_groups

    raw = json.loads(Path(groups_file).read_text())
    groups = [ActionGroup(state=g["state"], actions=g["actions"]) for g in raw]
    budget = max(sum(g.cost() for g in groups) // 2, max(g.cost() for g in groups))  # several groups per row
    packed = reference_logprobs(chunks, groups, budget, pad_id=0)
    lp_diff, n_tok, unpacked_tokens = 0.0, 0, 0
    for g, lps in zip(groups, packed):
        for a, lp in zip(g.actions, lps):
            seq = g.state + a
            unpacked_tokens += len(seq)
            b = {"input_ids": torch.tensor([seq]), "position_ids": torch.arange(len(seq))[None]}
            full = torch.log_softmax(pipeline_logits(chunks, [b])[0].double(), dim=-1)
            ref = full[torch.arange(len(g.state) - 1, len(seq) - 1), torch.tensor(a)]
            lp_diff = max(lp_diff, (torch.tensor(lp, dtype=torch.float64) - ref).abs().max().item())
            n_tok += len(a)
    vchunks = build_model_chunks(arch, cfg, value_head=True)
    load_hf_weights(vchunks, model_dir, arch)
    scores = score_groups(vchunks, [ScoreGroup(g.state, g.actions) for g in groups], budget, pad_id=0)

    def value(seq):
        b = {"input_ids": torch.tensor([seq]), "position_ids": torch.arange(len(seq))[None]}
        return torch.sigmoid(pipeline_values(vchunks, [b])[0, -1].double()).item()

    v_diff, n_v = 0.0, 0
    for g, (vs, vsa) in zip(groups, scores):
        v_diff = max(v_diff, abs(vs - value(g.state)))
        for a, v in zip(g.actions, vsa):
            v_diff = max(v_diff, abs(v - value(g.state + a)))
        n_v += 1 + len(g.actions)
    return {"logp_max_abs_diff": lp_diff, "logp_tokens": n_tok, "value_max_abs_diff": v_diff, "values": n_v,
            "packed_tokens": sum(g.cost() for g in groups), "unpacked_tokens": unpacked_tokens,
            "values_range": [min(min([v] + vv) for v, vv in scores), max(max([v] + vv) for v, vv in scores)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("tp", type=int)
    ap.add_argument("pp", type=int)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--load", default=None)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--groups", default=None)
    args = ap.parse_args()

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                       virtual_pipeline_model_parallel_size=args.vpp,
                                       expert_model_parallel_size=args.ep))
    arch = load_arch(args.model)
    cfg = transformer_config(arch, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep)
    chunks = build_model_chunks(arch, cfg, value_head=args.mode == "value")
    load_hf_weights(chunks, args.model, arch)
    rank = torch.distributed.get_rank()
    out = Path(args.out)

    if args.mode == "logits":
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, arch.vocab_size, (3, 21), generator=g)
        pos = torch.arange(21).expand(3, 21).contiguous()
        logits = pipeline_logits(chunks, [{"input_ids": ids, "position_ids": pos}])
        if rank == 0:
            torch.save({"ids": ids, "logits": logits}, out)
    elif args.mode == "value":
        out.mkdir(parents=True, exist_ok=True)
        ids = torch.randint(0, arch.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
        batch = [{"input_ids": ids, "position_ids": torch.arange(9).expand(2, 9).contiguous()}]
        torch.save({"ids": ids, "values": pipeline_values(chunks, batch)}, out / "values.pt")
        save_hf_checkpoint(chunks, out / "hf", arch, source_dir=args.model)
        chunks2 = build_model_chunks(arch, cfg, value_head=True)
        load_hf_weights(chunks2, out / "hf", arch, init_value_head=False)
        torch.save({"values": pipeline_values(chunks2, batch)}, out / "values2.pt")
    elif args.mode == "flex":
        import dataclasses

        from dapo_mcore.packing import RowBuilder, collate
        from dapo_mcore.parallel.fast_paths import FastPathConfig, resolve

        flex_paths = dataclasses.replace(resolve(FastPathConfig(), tp=args.tp, cuda=False),
                                         shared_prefix_attention="flex")
        flex = build_model_chunks(arch, cfg, paths=flex_paths)
        load_hf_weights(flex, args.model, arch)
        g = torch.Generator().manual_seed(9)
        rnd = lambda n: torch.randint(2, arch.vocab_size, (n,), generator=g).tolist()  # noqa: E731
        r1, r2 = RowBuilder(), RowBuilder()
        r1.add_state(rnd(9), [rnd(3), rnd(5)])
        r1.add_example(rnd(6))
        r2.add_state(rnd(4), [rnd(2), rnd(2), rnd(7)])
        b = collate([r1.build(), r2.build()], pad_id=0)
        with torch.no_grad():
            dense = gather_full_logits(chunks[0](b["input_ids"], b["position_ids"], b["attention_mask"]))
            fl = gather_full_logits(flex[0](b["input_ids"], b["position_ids"], b["attention_mask"]))
            # a wrong mask (no causality) must change the flex output: the mask really reaches the kernel
            nocausal = torch.zeros_like(b["attention_mask"])
            wrong = gather_full_logits(flex[0](b["input_ids"], b["position_ids"], nocausal))
        real = torch.zeros_like(b["input_ids"], dtype=torch.bool)
        for i, n in enumerate(b["lengths"].tolist()):
            real[i, :n] = True
        if rank == 0:
            out.write_text(json.dumps({"max_abs_diff": (dense - fl)[real].abs().max().item(),
                                       "wrong_mask_diff": (wrong - fl)[real].abs().max().item(),
                                       "backend": flex[0].attention_backend,
                                       "core": type(flex[0].decoder.layers[0].self_attention.core_attention).__name__}))
    elif args.mode == "packing":
        result = packing_check(chunks[0], arch)
        if rank == 0:
            out.write_text(json.dumps(result))
    elif args.mode == "params":
        from megatron.core import parallel_state as ps

        from dapo_mcore.plan.memory import rank_params

        row = {"rank": rank, "pp_rank": ps.get_pipeline_model_parallel_rank(),
               "ep_rank": ps.get_expert_model_parallel_rank(),
               "real": sum(p.numel() for c in chunks for p in c.parameters()),
               "predicted": rank_params(arch, args.tp, args.pp, ps.get_pipeline_model_parallel_rank(), args.vpp,
                                        ep=args.ep)}
        rows: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(rows, row)
        if rank == 0:
            out.write_text(json.dumps(rows))
    elif args.mode == "realtext":
        result = realtext_check(chunks, arch, cfg, args.model, args.groups)
        if rank == 0:
            out.write_text(json.dumps(result))
    elif args.mode == "roundtrip":
        save_hf_checkpoint(chunks, out, arch, source_dir=args.model, max_shard_bytes=200_000)
    elif args.mode == "train":
        from dapo_mcore.training.checkpoint import load_checkpoint, save_checkpoint
        from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig

        # eps 1e-3: Adam with eps 1e-8 amplifies float noise in near-zero grads (notes); clip off so the
        # grads read after the step are the raw ones.
        trainer = MegatronTrainer(chunks, OptimConfig(lr=args.lr, adam_eps=1e-3, clip_grad=0.0), total_steps=args.steps)
        if args.load:
            load_checkpoint(trainer, args.load)
        losses = {}
        first = True
        while trainer.step < args.steps:
            step = trainer.step + 1
            res = trainer.train_step(fixed_batch(step, arch.vocab_size), lm_forward_step)
            losses[step] = res.loss
            if first:
                grads = collect_hf_state(trainer.chunks, arch, lambda n, p: p.main_grad)
                if rank == 0:
                    from safetensors.torch import save_file

                    out.mkdir(parents=True, exist_ok=True)
                    save_file({k: v.contiguous() for k, v in grads.items()}, str(out / "grads_step1.safetensors"))
                first = False
            if args.save_at and trainer.step == args.save_at:
                save_checkpoint(trainer, args.ckpt, extra={"note": "test"})
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "losses.json").write_text(json.dumps(losses))
    else:
        raise SystemExit(f"unknown mode {args.mode}")
    destroy_parallel()


if __name__ == "__main__":
    main()
