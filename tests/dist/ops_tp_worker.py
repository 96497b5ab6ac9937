"""torchrun worker of tests/test_ops_tp.py: TP vocab-parallel fused_target_logprob (+ dapo_loss) and
fused_dapo_loss against the same computation at TP=1, forward and gradients (hidden; weight shards
gathered; the fused loss also with its weight gradient into a pre-filled main_grad).

    torchrun --nproc-per-node 2 tests/dist/ops_tp_worker.py --impl cpp --out result.json
"""
import argparse
import json

import torch
import torch.distributed as dist

from dapo_mcore.ops import dapo_loss, fused_dapo_loss, fused_target_logprob


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", required=True)
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    T, H, V, S = 41, 24, 302, 5
    h = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    seg = torch.randint(-1, S, (T,), generator=g)
    y[seg < 0] = -100
    y[seg == 0] = torch.arange(int((seg == 0).sum())) % V  # targets in both shards
    ref_logp = -torch.rand(T, generator=g, dtype=torch.float64).to(dtype)
    adv = torch.randn(S, generator=g, dtype=torch.float64).to(dtype) * 0.05
    v_local = V // world

    def run(weight, tp_group):
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = fused_target_logprob(hh, ww, y, tp_group, impl=args.impl, block_t=16, block_v=32)
        out = dapo_loss(logp, ref_logp, seg, adv, 0.02, impl="reference")
        out.loss.backward()
        return logp.detach(), out.loss.detach(), hh.grad, ww.grad

    lp1, loss1, gh1, gw1 = run(w, None)
    lp2, loss2, gh2, gw_shard = run(w[rank * v_local:(rank + 1) * v_local], group)
    shards = [torch.empty_like(gw_shard) for _ in range(world)]
    dist.all_gather(shards, gw_shard.contiguous(), group=group)
    gw2 = torch.cat(shards)

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

    res = {"rank": rank, "logp": rel(lp2, lp1), "loss": rel(loss2.reshape(1), loss1.reshape(1)),
           "grad_hidden": rel(gh2, gh1), "grad_weight": rel(gw2, gw1)}

    def run_fused(weight, tp_group):
        # chunks of ~8 tokens of whole actions: a per-chunk all-reduce of the softmax statistics
        hh = h.clone().requires_grad_()
        p = torch.nn.Parameter(weight.clone())
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        prefill = torch.full(weight.shape, 0.5, dtype=acc)
        p.main_grad = prefill.clone()
        out = fused_dapo_loss(hh, p, y, ref_logp, seg, adv, 0.02, tp_group=tp_group, impl=args.impl,
                              chunk_bytes=4 * weight.shape[0] * 8)
        out.loss.backward()
        return out.loss.detach(), out.log_ratio, out.logp, hh.grad, p.main_grad - prefill

    f1 = run_fused(w, None)
    f2 = run_fused(w[rank * v_local:(rank + 1) * v_local], group)
    shards = [torch.empty_like(f2[4]) for _ in range(world)]
    dist.all_gather(shards, f2[4].contiguous(), group=group)
    res.update({"fused_loss": rel(f2[0].reshape(1), f1[0].reshape(1)), "fused_log_ratio": rel(f2[1], f1[1]),
                "fused_logp": rel(f2[2], f1[2]), "fused_grad_hidden": rel(f2[3], f1[3]),
                "fused_grad_weight": rel(torch.cat(shards), f1[4]),
                "fused_vs_per_token_loss": rel(f1[0].reshape(1), loss1.reshape(1))})
    all_res = [None] * world
    dist.all_gather_object(all_res, res, group=group)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(all_res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
