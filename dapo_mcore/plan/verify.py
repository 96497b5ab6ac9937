"""Check the planner against megatron-core on this machine (CPU, gloo).

  torchrun --nproc-per-node N -m dapo_mcore.plan.verify params --tp T --pp P [--vpp V]
      builds the tiny models (Qwen2 untied, Llama tied, value model) with
      :func:`dapo_mcore.models.gpt.build_model_chunks` and prints, on rank 0, one line
      ``PLAN_PARAMS <json>``: real and predicted parameter counts of every rank.
  python -m dapo_mcore.plan.verify peak --batch B --seq S [--vocab V] [--logits naive|fused]
      one training step of a tiny model; prints ``PLAN_PEAK <json>`` with the bytes saved for backward
      (autograd saved-tensor hooks, unique storages), the measured RSS high-water delta of the step
      (``/proc/self/clear_refs`` reset, ``VmHWM - VmRSS``) and the planner's predictions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from dapo_mcore.models.gpt import build_model_chunks, unwrap_model
from dapo_mcore.models.hf_config import arch_from_dict
from dapo_mcore.ops import fused_target_logprob
from dapo_mcore.parallel.runtime import ParallelConfig, destroy_parallel, initialize_parallel
from dapo_mcore.plan import memory
from dapo_mcore.plan.layout import Layout
from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig, make_loss_fn

TINY = {
    "qwen2": dict(model_type="qwen2", vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "llama_tied": dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=176,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=True, rope_theta=500000.0),
}


def _params(args) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    initialize_parallel(ParallelConfig(args.tp, args.pp, args.vpp))
    rows = []
    for name, cfg in TINY.items():
        arch = arch_from_dict(cfg, name)
        for value_head in (False, True):
            chunks = build_model_chunks(arch, value_head=value_head)
            real = sum(p.numel() for c in chunks for p in c.parameters())
            pred = memory.rank_params(arch, args.tp, args.pp, ps.get_pipeline_model_parallel_rank(), args.vpp,
                                      value_head)
            rows.append({"model": name, "value_head": value_head, "rank": dist.get_rank(),
                         "tp_rank": ps.get_tensor_model_parallel_rank(),
                         "pp_rank": ps.get_pipeline_model_parallel_rank(), "real": real, "predicted": pred,
                         "total_predicted": memory.total_params(arch, value_head)})
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, rows)
    if dist.get_rank() == 0:
        print("PLAN_PARAMS " + json.dumps([r for per in out for r in per]), flush=True)
    destroy_parallel()


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes from /proc/self/status."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak(args) -> None:
    from megatron.core import tensor_parallel

    torch.set_num_threads(1)
    cfg = dict(TINY["qwen2"], vocab_size=args.vocab, max_position_embeddings=max(512, args.seq))
    arch = arch_from_dict(cfg, "tiny")
    initialize_parallel(ParallelConfig())
    chunks = build_model_chunks(arch)
    trainer = MegatronTrainer(chunks, OptimConfig(lr=1e-4), total_steps=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch.vocab_size, (args.batch, args.seq + 1), generator=g)
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
             "position_ids": torch.arange(args.seq).expand(args.batch, args.seq).contiguous()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        saved.setdefault(st.data_ptr(), st.nbytes())
        return t

    def forward_step(model, mb):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if args.logits == "naive":
                out = model(mb["input_ids"], mb["position_ids"], None)

                def compute(o):
                    tok = tensor_parallel.vocab_parallel_cross_entropy(o.float(), mb["labels"])
                    return tok.sum(), tok.numel(), {}
            else:
                out = model(mb["input_ids"], mb["position_ids"], None, output="hidden")
                w = unwrap_model(model).output_weight()

                def compute(o):
                    lp = fused_target_logprob(o.reshape(-1, o.shape[-1]), w, mb["labels"].reshape(-1))
                    return -lp.sum(), lp.numel(), {}
        fn = make_loss_fn(compute)

        def loss_fn(o):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return fn(o)
        return out, loss_fn

    trainer.train_step([batch], forward_step)          # warm-up: optimizer states, allocator pools
    param_ptrs = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
    saved.clear()
    rss0, _ = _rss()
    _reset_hwm()
    trainer.train_step([batch], forward_step)
    _, hwm = _rss()
    saved_bytes = sum(v for k, v in saved.items() if k not in param_ptrs)
    layout = Layout(gpus_per_node=1, micro_batch=args.batch, global_batch=args.batch, seq_length=args.seq,
                    bf16=False)
    tokens = args.batch * args.seq
    act = memory.stage_memory(arch, layout, "actor", impl="local", reserve_gb=0.0)
    res = {"tokens": tokens, "saved_bytes": saved_bytes, "rss_delta": hwm - rss0,
           "pred_activations": act.activations,
           "pred_logits": act.logits_naive if args.logits == "naive" else act.logits_fused,
           # saved for backward: the naive path keeps only the fp32 softmax [T, V] (4 B); the rest of its
           # peak is the backward copies
           "pred_saved": act.activations + (tokens * arch.vocab_size * 4 if args.logits == "naive"
                                             else act.logits_fused),
           "pred_peak_delta": (act.total_naive if args.logits == "naive" else act.total_fused) - act.static,
           "logits": args.logits, "vocab": arch.vocab_size, "batch": args.batch, "seq": args.seq}
    print("PLAN_PEAK " + json.dumps(res), flush=True)
    destroy_parallel()


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dapo_mcore.plan.verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("params")
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--vpp", type=int, default=None)
    b = sub.add_parser("peak")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--seq", type=int, default=256)
    b.add_argument("--vocab", type=int, default=320)
    b.add_argument("--logits", choices=("naive", "fused"), default="naive")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    (_params if args.mode == "params" else _peak)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
