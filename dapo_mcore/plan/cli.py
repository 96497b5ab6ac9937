"""``dapo-mcore plan MODEL [layout flags]`` (also ``python -m dapo_mcore.plan``).

MODEL is a preset (Qwen2.5-7B, Qwen2.5-Math-7B, Llama-3.1-8B, Qwen2.5-72B), an HF checkpoint directory
or a ``config.json``. Prints, per training stage, the per-GPU memory breakdown on the worst pipeline
rank, whether it fits the GPU, the estimated tokens/s at ``--mfu``, and the fastest layout that fits;
with ``--servers K`` also the generation-fleet hours for the paper's recipe. ``--json`` prints the
same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from typing import Optional

from dapo_mcore.models.hf_config import ModelConfigError
from dapo_mcore.plan import fleet
from dapo_mcore.plan.layout import Layout, LayoutError, add_layout_args, layout_from_args
from dapo_mcore.plan.memory import ATTN_IMPLS, GB, STAGES, peak_bytes, stage_memory_ranks, total_params
from dapo_mcore.plan.presets import PRESETS, resolve_model
from dapo_mcore.plan.search import candidates
from dapo_mcore.plan.throughput import GPUS, estimate


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dapo-mcore plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help=f"preset ({', '.join(PRESETS)}), HF checkpoint dir or config.json")
    ap.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    add_layout_args(ap)
    ap.add_argument("--seq-length", type=int, default=4096, help="tokens per sequence / packed row")
    ap.add_argument("--distributed-optimizer", action="store_true", help="shard optimizer states over DP")
    ap.add_argument("--fp32", action="store_true", help="fp32 params (default: bf16 params, fp32 grads/main)")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="H100-SXM-80GB")
    ap.add_argument("--memory-gb", type=float, default=None, help="override the GPU memory (GB, 1e9 bytes)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for tokens/s")
    ap.add_argument("--reserve-gb", type=float, default=4.0,
                    help="per-GPU reserve for CUDA context, NCCL buffers, fragmentation (an assumption)")
    ap.add_argument("--attn", choices=ATTN_IMPLS, default="te",
                    help="activation model: te (GPU, flash attention) or local (megatron local spec, CPU)")
    f = ap.add_argument_group("generation fleet (stages 1-2, shown with --servers)")
    f.add_argument("--servers", type=int, default=None, help="number of SGLang servers")
    f.add_argument("--server-decode-tps", type=float, default=None, help="output tokens/s per server (measured)")
    f.add_argument("--server-prefill-tps", type=float, default=None, help="prefill tokens/s per server (measured)")
    for k, v in asdict(fleet.Recipe()).items():
        f.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v, dest=f"recipe_{k}")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return ap


def _gb(x: float) -> float:
    return round(x / GB, 2)


def plan(args: argparse.Namespace) -> dict:
    """The whole report as a dict (what ``--json`` prints)."""
    name, arch = resolve_model(args.model)
    gpu = GPUS[args.gpu]
    if args.memory_gb is not None:
        gpu = replace(gpu, memory_gb=args.memory_gb)
    layout = layout_from_args(args, Layout(), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                              seq_length=args.seq_length, distributed_optimizer=args.distributed_optimizer or None,
                              bf16=False if args.fp32 else None)
    layout.validate(arch, args.dp)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    out: dict = {"model": name, "params": {"policy": _params(arch, False), "value": _params(arch, True)},
                 "gpu": asdict(gpu), "mfu": args.mfu, "layout": {**asdict(layout), "dp": layout.dp},
                 "layout_str": layout.describe(), "stages": {}}
    for st in stages:
        ranks = stage_memory_ranks(arch, layout, st, args.attn, args.reserve_gb)
        m = max(ranks, key=lambda r: r.total_fused)
        pf, pn = peak_bytes(ranks, True), peak_bytes(ranks, False)
        t = estimate(arch, layout, st, args.mfu, gpu)
        best = candidates(arch, layout, st, gpu, args.mfu, args.attn, args.reserve_gb)
        out["stages"][st] = {
            "description": STAGES[st][2], "pp_rank": m.pp_rank, "params_per_gpu": m.params,
            "memory_gb": {"weights": _gb(m.weights), "grads": _gb(m.grads), "optimizer": _gb(m.optimizer),
                          "optimizer_other_setting": _gb(m.optimizer_alt), "activations": _gb(m.activations),
                          "activations_other_recompute": _gb(m.activations_alt),
                          "logits_fused": _gb(m.logits_fused), "logits_naive": _gb(m.logits_naive),
                          "backward_transient": _gb(m.transient), "reserve": _gb(m.reserve),
                          "total_fused": _gb(m.total_fused), "total_naive": _gb(m.total_naive),
                          "peak_fused": _gb(pf), "peak_naive": _gb(pn), "naive_extra_peak": _gb(pn - pf),
                          "naive_extra_last_stage": _gb(ranks[-1].naive_extra)},
            "fits_fused": pf <= gpu.memory_gb * GB, "fits_naive": pn <= gpu.memory_gb * GB,
            "throughput": asdict(t),
            "suggested": None if not best else {
                "layout": {**asdict(best[0].layout), "dp": best[0].layout.dp}, "layout_str": best[0].layout.describe(),
                "peak_fused_gb": _gb(best[0].peak_fused), "peak_naive_gb": _gb(best[0].peak_naive),
                "naive_extra_last_stage_gb": _gb(stage_memory_ranks(arch, best[0].layout, st, args.attn,
                                                                    args.reserve_gb)[-1].naive_extra),
                "tokens_per_s": best[0].throughput.tokens_per_s},
        }
    if args.servers is not None:
        if args.server_decode_tps is None or args.server_prefill_tps is None:
            raise ValueError("--servers needs --server-decode-tps and --server-prefill-tps (measured per server)")
        recipe = fleet.Recipe(**{k: getattr(args, f"recipe_{k}") for k in asdict(fleet.Recipe())})
        est = fleet.estimate(recipe, args.servers, args.server_decode_tps, args.server_prefill_tps)
        out["fleet"] = {"recipe": asdict(recipe), "servers": args.servers,
                        "server_decode_tps": args.server_decode_tps, "server_prefill_tps": args.server_prefill_tps,
                        "stages": {e.stage: {**asdict(e.tokens), "hours_no_cache": e.hours_no_cache,
                                             "hours_cached": e.hours_cached} for e in est}}
    return out


def _params(arch, value_head: bool) -> int:
    return total_params(arch, value_head)


def _print(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    gpu = rep["gpu"]
    con.print(f"[bold]{rep['model']}[/]: {rep['params']['policy'] / 1e9:.3f}B parameters "
              f"(value model {rep['params']['value'] / 1e9:.3f}B); {rep['layout']['nodes']} node(s) x "
              f"{rep['layout']['gpus_per_node']} {gpu['name']} ({gpu['memory_gb']:g} GB)")
    con.print(f"layout: {rep['layout_str']}")
    rows = [("weights", "weights"), ("grads (fp32)", "grads"), ("optimizer", "optimizer"),
            ("  optimizer, other dist-opt setting", "optimizer_other_setting"),
            ("activations", "activations"), ("  activations, other recompute setting", "activations_other_recompute"),
            ("backward transient", "backward_transient"), ("logits peak, fused kernel", "logits_fused"),
            ("logits peak, naive path", "logits_naive"), ("reserve (assumed)", "reserve"),
            ("total on this rank, fused kernel", "total_fused"), ("total on this rank, naive logits", "total_naive"),
            ("PEAK over PP ranks, fused kernel", "peak_fused"), ("PEAK over PP ranks, naive logits", "peak_naive"),
            ("naive path adds to the peak", "naive_extra_peak"),
            ("naive path adds on the last PP stage", "naive_extra_last_stage")]
    tab = Table(title="per-GPU memory (GB, worst pipeline rank)")
    tab.add_column("")
    for st, s in rep["stages"].items():
        tab.add_column(f"{st} (PP rank {s['pp_rank']})", justify="right")
    for label, key in rows:
        tab.add_row(label, *[f"{s['memory_gb'][key]:.2f}" for s in rep["stages"].values()])
    tab.add_row("fits (fused / naive)", *[f"{'yes' if s['fits_fused'] else 'NO'} / {'yes' if s['fits_naive'] else 'NO'}"
                                           for s in rep["stages"].values()])
    tab.add_row(f"tokens/s at MFU {rep['mfu']:g}", *[f"{s['throughput']['tokens_per_s']:,.0f}"
                                                     for s in rep["stages"].values()])
    tab.add_row("step time (s)", *[f"{s['throughput']['step_seconds']:.1f}" for s in rep["stages"].values()])
    con.print(tab)
    for st, s in rep["stages"].items():
        sug = s["suggested"]
        if sug is None:
            con.print(f"[red]{st}: no layout on these GPUs fits {gpu['memory_gb']:g} GB; add nodes or shorten --seq-length[/]")
        else:
            con.print(f"{st}: fastest fitting layout: [bold]{sug['layout_str']}[/] -> peak {sug['peak_fused_gb']:.1f} GB "
                      f"with the fused kernel ({sug['peak_naive_gb']:.1f} GB naive; the naive logits path adds "
                      f"{sug['naive_extra_last_stage_gb']:.2f} GB on the last PP stage), "
                      f"{sug['tokens_per_s']:,.0f} tokens/s")
    if "fleet" in rep:
        fl = rep["fleet"]
        ft = Table(title=f"generation fleet: {fl['servers']} SGLang servers at {fl['server_decode_tps']:,.0f} decode / "
                         f"{fl['server_prefill_tps']:,.0f} prefill tokens/s each")
        for c in ("stage", "requests", "prefill tokens (no cache)", "prefill tokens (prefix cache)", "decode tokens",
                  "hours (no cache)", "hours (prefix cache)"):
            ft.add_column(c, justify="right")
        for st, e in fl["stages"].items():
            ft.add_row(st, f"{e['requests']:,.0f}", f"{e['prefill_no_cache']:.3g}", f"{e['prefill_cached']:.3g}",
                       f"{e['decode']:.3g}", f"{e['hours_no_cache']:.1f}", f"{e['hours_cached']:.1f}")
        con.print(ft)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``dapo-mcore plan`` / ``python -m dapo_mcore.plan``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        rep = plan(args)
    except (LayoutError, ModelConfigError, ValueError, FileNotFoundError) as e:
        print(f"dapo-mcore plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        _print(rep)
    return 0
