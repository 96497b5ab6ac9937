"""Stage 3 — critic: train V_phi (transformer + scalar head + sigmoid) with BCE on soft MC targets.

Runs on every rank (in the pipeline's process, or under ``torchrun``): ``dapo-mcore train-critic CONFIG``
(section ``critic``; ``--help`` lists the keys). Outputs in ``out_dir``: ``checkpoints/`` (megatron dist checkpoints, resumable), ``hf/`` (the value model
as an HF ``ForTokenClassification`` checkpoint), ``calibration.png``, ``tb/`` (TensorBoard),
``metrics.jsonl`` (one line per step) and ``summary.json`` (written last: the stage is finished).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from dapo_mcore.config import option
from dapo_mcore.critic.data import (CriticExample, completion_examples, is_heldout, pack_examples, read_mc,
                                    solution_examples, split_by_problem, truncate)
from dapo_mcore.critic.metrics import calibration_plot, critic_metrics
from dapo_mcore.critic.tree import (WEIGHTINGS, build_trees, node_weight, pack_pieces, prune, split_completion,
                                    tree_pieces, tree_stats)
from dapo_mcore.models.convert import save_hf_checkpoint
from dapo_mcore.models.gpt import model_packing
from dapo_mcore.models.hf_config import load_arch
from dapo_mcore.packing import dp_share
from dapo_mcore.parallel.runtime import initialize_parallel
from dapo_mcore.training.config import TrainingConfig
from dapo_mcore.training.loop import (epoch_batches, load_chunks, make_trainer, pad_token_id, resume, run_loop,
                                      save_summary, tensorboard_scalars)
from dapo_mcore.training.trainer import DECAY_STYLES, make_loss_fn
from dapo_mcore.training.values import values_by_example
from dapo_mcore.verify.steps import STEP_CHECKERS, action_ranking, state_is_clean, step_checker


@dataclass
class CriticConfig(TrainingConfig):
    """Stage 3 (train-critic). Paper: 1 epoch, lr 5e-6, global batch 512 examples."""

    lr: float = option(5e-6, "peak learning rate", gt=0)
    decay_style: str = option("cosine", "decay after warm-up: constant | linear | cosine", choices=DECAY_STYLES)
    global_batch: int = option(512, "examples per optimizer step", flag="--global-batch", ge=1)
    max_length: Optional[int] = option(None, "tokens per example at most (default: the model's "
                                             "max_position_embeddings)", ge=1)
    use_completions: bool = option(False, "also train on MC completions, labelled with their single-sample outcome")
    heldout_fraction: float = option(0.1, "fraction of problems held out for the calibration metrics", ge=0, lt=1)
    data: str = option("examples", "examples: one sequence per solution / completion; tree: one prefix tree per "
                                   "problem, each distinct step-prefix once (dapo_mcore.critic.tree)",
                     choices=("examples", "tree"))
    tree_weighting: str = option("count", "tree: a label's weight: count (rollouts through the node) | sqrt | one",
                                 choices=WEIGHTINGS)
    tree_min_count: int = option(1, "tree: drop nodes fewer rollouts passed through (2: no single-rollout tails)", ge=1)
    step_checker: str = option("", "task step checker for the held-out ranking diagnostics ('chain'); "
                                   "diagnostics only", identity=False, choices=("", *STEP_CHECKERS))


def value_forward_step(model, batch: dict):
    """Value logits at the labelled positions; loss = BCE-with-logits sum (weighted by ``batch["weights"]``
    when present, weights of mean ~1), count = #labels."""
    out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                packed_seq_params=batch.get("packed_seq_params"))

    def compute(o):
        logit = o.float().reshape(-1)[batch["label_index"]]
        tgt = batch["targets"]
        w = batch.get("weights")
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, tgt, weight=w, reduction="sum")
        p = torch.sigmoid(logit.detach())
        sq = (p - tgt) ** 2
        return loss, int(tgt.numel()), {"sq_err": (sq if w is None else sq * w).sum()}

    return out, make_loss_fn(compute)


def predict(chunks: list, examples: list[CriticExample], token_budget: int, pad_id: int,
            rows_per_microbatch: int = 1) -> list[float]:
    """V at every label of ``examples`` (in order), through the pipeline; the same list on every rank.
    Batches in the layout the chunks were built for (THD or dense mask: ``model_packing``)."""
    if not examples:
        return []
    mbs = pack_examples(examples, token_budget, pad_id, rows_per_microbatch, model_packing(chunks))
    vals = values_by_example(chunks, mbs, [len(e.label_pos) for e in examples], pad_id)
    return [v for per in vals for v in per]


def predict_trees(chunks: list, trees: list, token_budget: int, pad_id: int,
                  rows_per_microbatch: int = 1) -> dict[tuple[int, int], float]:
    """V at every labelled node of ``trees``: ``{(tree index, node index): value}`` (tree rows, forward only)."""
    pieces = tree_pieces(trees, token_budget)
    if not pieces:
        return {}
    own = [[n for n in p.nodes[p.n_context:] if trees[p.tree].nodes[n].labelled] for p in pieces]
    vals = values_by_example(chunks, pack_pieces(trees, pieces, token_budget, pad_id, rows_per_microbatch),
                             [len(o) for o in own], pad_id)
    return {(p.tree, n): v for p, o, vs in zip(pieces, own, vals) for n, v in zip(o, vs)}


def heldout_ranking(chunks: list, records: list[dict], tok, cfg: CriticConfig, pad_id: int) -> dict:
    """Action-ranking accuracy of the critic on held-out problems (:func:`~dapo_mcore.verify.steps.action_ranking`):
    the distinct first steps of each non-terminal state's completions, their MC outcome (mean reward of the
    rollouts through them) and, with ``cfg.step_checker``, whether each step is right."""
    if not records:
        return {}
    check = step_checker(cfg.step_checker) if cfg.step_checker else None
    delims = set(tok.encode("\n", add_special_tokens=False))
    trees = build_trees(records, sorted(delims), tok.eos_token_id)
    values = predict_trees(chunks, trees, cfg.token_budget, pad_id, cfg.rows_per_microbatch)
    index = {t.problem_id: i for i, t in enumerate(trees)}
    states, clean = [], []
    for r in records:
        if r["terminal"] or not r.get("completions"):
            continue
        ti = index[r["problem_id"]]
        tree = trees[ti]
        node = 0
        for st in r["step_ids"]:
            node = tree.nodes[node].children[tuple(int(t) for t in st)]
        state_text = tok.decode(tree.path_tokens(node), skip_special_tokens=True)
        acts, seen = [], set()
        for c in r["completions"]:
            steps = split_completion(c["output_ids"], delims, tok.eos_token_id)
            if not steps or tuple(steps[0]) in seen:
                continue
            seen.add(tuple(steps[0]))
            child = tree.nodes[node].children[tuple(steps[0])]
            if (ti, child) not in values:
                continue
            ok = check(state_text, tok.decode(steps[0], skip_special_tokens=True)) if check else None
            acts.append((values[(ti, child)], tree.nodes[child].target, ok))
        if len(acts) >= 2:
            states.append((len(r["step_ids"]), acts))
            if check and state_is_clean(check, state_text):
                clean.append(states[-1])
    out = action_ranking(states)
    if check:
        out["clean"] = action_ranking(clean)   # states without a wrong step so far
    return out


def _build_tree_data(cfg: CriticConfig, records: list[dict], tok, max_len: int):
    """Training pieces of the prefix trees of the non-held-out problems, the weight scale that makes the
    mean label weight 1, and counts."""
    train_recs = [r for r in records if not is_heldout(r["problem_id"], cfg.heldout_fraction, cfg.seed)]
    trees = build_trees(train_recs, tok.encode("\n", add_special_tokens=False), tok.eos_token_id,
                        use_completions=cfg.use_completions)
    trees = [prune(t, cfg.tree_min_count) for t in trees]
    pieces = tree_pieces(trees, max_len)
    own = [trees[p.tree].nodes[n] for p in pieces for n in p.nodes[p.n_context:]]
    labelled = [n for n in own if n.labelled]
    wsum = sum(node_weight(n, cfg.tree_weighting) for n in labelled)
    scale = len(labelled) / wsum if wsum else 1.0
    mean = sum(node_weight(n, cfg.tree_weighting) * scale * n.target for n in labelled) / max(1, len(labelled))
    counts = {**tree_stats(trees), "pieces": len(pieces), "piece_tokens": sum(p.tokens for p in pieces),
              "train_labels": len(labelled)}
    return trees, pieces, scale, mean, counts


def _build_examples(cfg: CriticConfig, mc_dir: str | Path, tok, max_len: int) -> tuple[list, list, dict]:
    records = read_mc(mc_dir)
    exs = solution_examples(records)
    n_sol = len(exs)
    if cfg.use_completions:
        delim_ids = tok.encode("\n", add_special_tokens=False)
        exs += completion_examples(records, delim_ids, tok.eos_token_id)
    kept = [e for e in (truncate(e, max_len) for e in exs) if e is not None]
    train, val = split_by_problem(kept, cfg.heldout_fraction, cfg.seed)
    val = [e for e in val if e.kind == "solution"]   # evaluate on MC-labelled states only
    counts = {"mc_states": len(records), "solution_examples": n_sol, "completion_examples": len(exs) - n_sol,
              "dropped_too_long": len(exs) - len(kept), "train_examples": len(train), "val_examples": len(val),
              "train_labels": sum(len(e.targets) for e in train), "val_labels": sum(len(e.targets) for e in val)}
    return train, val, counts


def run_train_critic(cfg: CriticConfig, mc_dir: str | Path, out_dir: str | Path) -> dict:
    """Train (or resume) the critic on a finished ``mc`` output; returns the summary (every rank)."""
    from transformers import AutoTokenizer

    if not cfg.init_path:
        raise ValueError("critic.init_path is required (an HF checkpoint to initialise the critic from)")
    out = Path(out_dir)
    t0 = time.time()
    initialize_parallel(cfg.parallel)
    rank0 = dist.get_rank() == 0
    arch = load_arch(cfg.init_path)
    tok = AutoTokenizer.from_pretrained(cfg.init_path)
    pad_id = pad_token_id(tok)
    max_len = min(cfg.max_length or arch.max_position_embeddings, cfg.token_budget)
    train, val, counts = _build_examples(cfg, mc_dir, tok, max_len)
    if cfg.data == "tree":
        records = read_mc(mc_dir)
        trees, pieces, wscale, train_mean, tcounts = _build_tree_data(cfg, records, tok, max_len)
        counts = {**{k: counts[k] for k in ("mc_states", "val_examples", "val_labels")}, **tcounts}
        n_items = len(pieces)
    else:
        train_mean = sum(t for e in train for t in e.targets) / max(1, sum(len(e.targets) for e in train))
        n_items = len(train)
    if not n_items:
        raise ValueError(f"{mc_dir}: no training examples for the critic (all problems held out or no states)")

    _, chunks = load_chunks(cfg.init_path, cfg.parallel, value_head=True, value_head_seed=cfg.seed)
    steps = epoch_batches(n_items, cfg.global_batch, cfg.epochs, cfg.seed)
    trainer = make_trainer(chunks, cfg, total_steps=len(steps))
    resume(trainer, out / "checkpoints")
    loop = cfg.loop("critic", len(steps))
    packing = model_packing(trainer.chunks)          # "thd" | "dense_mask", from the fast-path switch
    if cfg.data == "tree":   # tree rows need the dense mask (a node attends to its ancestors, not a causal run)
        def batches(i):
            return dp_share(pack_pieces(trees, [pieces[j] for j in steps[i]], cfg.token_budget, pad_id,
                                        cfg.rows_per_microbatch, cfg.tree_weighting, wscale), pad_id)
    else:
        def batches(i):
            return dp_share(pack_examples([train[j] for j in steps[i]], cfg.token_budget, pad_id,
                                          cfg.rows_per_microbatch, packing), pad_id)
    finished = run_loop(
        trainer, loop, out, batches,
        value_forward_step,
        lambda r: {"loss": r.loss, "brier": r.logs.get("sq_err", float("nan")), "grad_norm": r.grad_norm,
                   "lr": r.lr, "labels": r.count})
    if not finished:
        return {"stage": "train-critic", "partial": True, "steps": trainer.step, "total_steps": len(steps)}

    preds = predict(trainer.chunks, val, cfg.token_budget, pad_id, cfg.rows_per_microbatch)
    targets = [t for e in val for t in e.targets]
    metrics = critic_metrics(preds, targets, train_mean)
    train_sol = [e for e in train if e.kind == "solution"][:2000]
    train_preds = predict(trainer.chunks, train_sol, cfg.token_budget, pad_id, cfg.rows_per_microbatch)
    train_metrics = critic_metrics(train_preds, [t for e in train_sol for t in e.targets], train_mean)

    t_rank = time.time()
    val_recs = [r for r in read_mc(mc_dir) if is_heldout(r["problem_id"], cfg.heldout_fraction, cfg.seed)]
    metrics["ranking"] = heldout_ranking(trainer.chunks, val_recs, tok, cfg, pad_id)
    metrics["ranking_seconds"] = time.time() - t_rank
    save_hf_checkpoint(trainer.chunks, out / "hf", arch, source_dir=cfg.init_path)
    summary = {"stage": "train-critic", "counts": counts, "steps": trainer.step, "train_mean_target": train_mean,
               "heldout": metrics, "train": train_metrics, "seconds": time.time() - t0,
               "config": json.loads(json.dumps(asdict(cfg), default=str)),
               "paths": trainer.paths.as_dict()}
    if cfg.tensorboard:
        tensorboard_scalars(out, "critic_heldout", metrics, trainer.step)
    if rank0 and preds:
        calibration_plot(preds, targets, out / "calibration.png", title="held-out critic")
    save_summary(out, summary)
    if rank0:
        rk = metrics.get("ranking") or {}
        print(f"[critic] held-out Brier {metrics['brier']:.4f} vs constant {metrics['brier_baseline']:.4f}, "
              f"Pearson r {metrics['pearson']:.3f}, ECE {metrics['ece']:.3f} ({metrics['n']} labels); action "
              f"ranking vs MC {rk.get('vs_mc', float('nan')):.3f}, vs step correctness "
              f"{rk.get('vs_correct', float('nan')):.3f}")
    return summary


def summary_note(summary: dict) -> str:
    """The critic's line in the report's stage table."""
    sec = summary.get("seconds") or 0.0
    if not sec:
        return ""
    n = summary["counts"]["train_labels"] * summary.get("config", {}).get("epochs", 1)
    return f"{summary['steps']} steps, {n / sec:.0f} labelled states/s"
