"""torchrun worker for the critic tests (gloo on CPU).

  step  TP PP MODEL MC OUT --pack packed|unpacked   one critic training step on the first 12 examples
        -> OUT/loss.json, OUT/grads.safetensors (HF-named, incl. score.*)
  score TP PP MODEL OUT                              shared-prefix scoring vs scoring each s+a alone
        -> OUT (json of max abs diff and the values)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dapo_mcore.critic.data import pack_examples, read_mc, solution_examples
from dapo_mcore.training.values import ScoreGroup, score_groups
from dapo_mcore.packing import dp_share
from dapo_mcore.critic.train import value_forward_step
from dapo_mcore.models.convert import collect_hf_state, load_hf_weights
from dapo_mcore.models.gpt import build_model_chunks
from dapo_mcore.models.hf_config import load_arch, transformer_config
from dapo_mcore.parallel.runtime import ParallelConfig, destroy_parallel, initialize_parallel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("tp", type=int)
    ap.add_argument("pp", type=int)
    ap.add_argument("model")
    ap.add_argument("rest", nargs="+")
    ap.add_argument("--pack", default="packed")
    ap.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch")
    args = ap.parse_args()
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    arch = load_arch(args.model)
    chunks = build_model_chunks(arch, transformer_config(arch, tp=args.tp, pp=args.pp), value_head=True,
                                value_head_seed=3)
    load_hf_weights(chunks, args.model, arch)
    rank = torch.distributed.get_rank()

    if args.mode == "step":
        from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig

        mc, out = args.rest
        out = Path(out)
        exs = solution_examples(read_mc(mc))[:12]
        if args.pack == "packed":
            mbs = pack_examples(exs, 160, 0, args.rows)           # several examples per row
        else:
            mbs = [pack_examples([e], 160, 0)[0] for e in exs]   # one example per row
        trainer = MegatronTrainer(chunks, OptimConfig(lr=1e-3, adam_eps=1e-3, clip_grad=0.0), total_steps=1)
        res = trainer.train_step(dp_share(mbs, 0), value_forward_step)
        grads = collect_hf_state(trainer.chunks, arch, lambda n, p: p.main_grad)
        if rank == 0:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in grads.items()}, str(out / "grads.safetensors"))
            (out / "loss.json").write_text(json.dumps({"loss": res.loss, "count": res.count, "rows": len(mbs)}))
    elif args.mode == "score":
        (out,) = args.rest
        g = torch.Generator().manual_seed(11)
        rnd = lambda n: torch.randint(2, arch.vocab_size, (n,), generator=g).tolist()  # noqa: E731
        groups = [ScoreGroup(rnd(ls), [rnd(la) for la in las])
                  for ls, las in ((12, (3, 5, 1)), (7, (4,)), (20, (2, 2, 6, 3)), (5, (9, 1)))]
        packed = score_groups(chunks, groups, token_budget=48, pad_id=0)
        # each s + a_i alone (and s alone): one group per sequence, no sharing
        alone = score_groups(chunks, [ScoreGroup(gr.state + a, []) for gr in groups for a in gr.actions], 48, 0)
        state_alone = score_groups(chunks, [ScoreGroup(gr.state, []) for gr in groups], 48, 0)
        diff, k = 0.0, 0
        for gi, gr in enumerate(groups):
            diff = max(diff, abs(packed[gi][0] - state_alone[gi][0]))
            for j in range(len(gr.actions)):
                diff = max(diff, abs(packed[gi][1][j] - alone[k][0]))
                k += 1
        if rank == 0:
            Path(out).write_text(json.dumps({"max_abs_diff": diff, "packed": packed}))
    destroy_parallel()


if __name__ == "__main__":
    main()
