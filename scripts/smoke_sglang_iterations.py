#!/usr/bin/env python
"""Smoke run: two DAPO iterations with generate, mc and eval on real SGLang servers that the pipeline launches
(``backend.launch: true``, ``swap_weights: true``; CPU engine), the Megatron stages in between.

What it runs is ``dapo-mcore run CONFIG`` (default ``examples/configs/smoke.yaml``, two iterations, the
``outcome`` control so eval compares three checkpoints, generate/mc/eval on SGLang), with one check between
iteration 1's mc unit and its critic unit, while the fleet is still up: the fleet was swapped to iteration
0's actor (it served eval's last checkpoint), so the server's greedy outputs on the iteration-1 mc states
must agree with the embedded engine's greedy outputs from that actor; the reference's (iteration 0's
policy) are printed for contrast. Then it checks every rollout unit's ``served_model`` stamp and prints::

    RESULT sglang_iter1_served_model_is_actor0 <0|1> bool   (iteration 1's generate and mc stamps)
    RESULT sglang_swap_greedy_agreement <f> fraction         (server after the swap vs embedded actor)
    RESULT sglang_reference_greedy_agreement <f> fraction    (server vs embedded reference: the contrast)
    RESULT sglang_swap_states <n> states
    RESULT sglang_server_launches <n> launches

Needs the SGLang venv (``scripts/setup.sh --sglang``; ``$DAPO_SGLANG_VENV``). Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/smoke_sglang_iterations.py --out /tmp/smoke-sglang [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dapo_mcore.data.shards import iter_records  # noqa: E402
from dapo_mcore.rollout.backend import GenRequest, SamplingParams  # noqa: E402
from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig  # noqa: E402
from dapo_mcore.rollout.fleet import checkpoint_version, open_backend, same_model  # noqa: E402
from dapo_mcore.run.layout import read_stamp  # noqa: E402
from dapo_mcore.run.pipeline import Pipeline  # noqa: E402
from dapo_mcore.run.schema import load_run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROLLOUT_SECTIONS = ("generate", "mc", "eval")
# tiny sizes: the point is the fleet's hand-over, not the numbers
OVERRIDES = ["run.iterations=2", "run.controls=[outcome]", "toy.train_problems=8", "toy.eval_problems=8",
             "toy.sft_steps=150",
             "generate.num_samples=4", "mc.num_completions=4", "mc.max_new_tokens=32", "eval.max_new_tokens=40",
             "actor.lr=5e-4"]
FLEET = ["kind=sglang", "launch=true", "swap_weights=true", "port=0", "device=cpu", "concurrency=8",
         "launch_timeout_s=900", "stop_grace_s=20"]


def greedy_requests(mc_dir: Path, max_new_tokens: int) -> list[GenRequest]:
    """One greedy request per non-terminal state of an mc output (its prompt and steps)."""
    reqs = []
    for r in iter_records(mc_dir):
        if not r["terminal"]:
            ids = r["prompt_ids"] + [t for st in r["step_ids"] for t in st]
            reqs.append(GenRequest(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)))
    return reqs


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def run(out: Path, config: Path, overrides: list[str], log=print) -> dict:
    """Run the smoke; return its figures (the RESULT values) and the paths it checked."""
    cfg = load_run_config(config, [f"run.out_dir={out}", *OVERRIDES,
                                   *[f"{s}.backend.{kv}" for s in ROLLOUT_SECTIONS for kv in FLEET], *overrides])
    launches: list[str] = []

    def logged(line: str) -> None:
        if line.strip().startswith("sglang: launching"):
            launches.append(line.strip())
        log(line)

    pipe = Pipeline(cfg, log=logged)
    figures: dict = {}

    def check(k: int, unit: str) -> None:
        if (k, unit) != (1, "mc"):
            return
        actor0, ref0 = pipe.policy(1), pipe.policy(0)
        reqs = greedy_requests(pipe.layout.unit(1, "mc"), cfg.mc.max_new_tokens)
        before = pipe.fleet.served()          # what the swap left there, asked before anything else is sent
        if not all(same_model(m.model_path, actor0) for m in before.values()):
            raise SystemExit(f"after iteration 1's mc the fleet serves {before}, not iteration 0's actor {actor0}")
        t0 = time.perf_counter()
        with open_backend(cfg.mc.backend, actor0, fleet=pipe.fleet) as server:   # checks it serves actor0
            served = [s[0]["output_ids"] for s in server.generate(reqs)]
            version = server.served_model.weight_version
        log(f"[smoke] {len(reqs)} iteration-1 states, greedy on the server ({time.perf_counter() - t0:.1f} s, "
            f"weight_version {version})")
        for name, path in (("actor", actor0), ("reference", ref0)):
            engine = EmbeddedEngine(EngineConfig(path))
            figures[name] = agreement(served, [s[0]["output_ids"] for s in engine.generate(reqs)])
        figures.update(states=len(reqs), version=version)

    pipe.run(after_unit=check)
    actor0 = pipe.policy(1)
    stamps = {u: read_stamp(pipe.layout.unit(1, u))["served_model"] for u in ("generate", "mc")}
    want = {"model_path": actor0, "weight_version": checkpoint_version(actor0)}
    return {"served_is_actor0": all(s == want for s in stamps.values()) and figures["version"] == want[
                "weight_version"], "swap_agreement": figures["actor"], "reference_agreement": figures["reference"],
            "states": figures["states"], "launches": launches, "stamps": stamps, "actor0": actor0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/smoke-sglang", help="run directory (default: %(default)s)")
    ap.add_argument("--config", default=str(ROOT / "examples" / "configs" / "smoke.yaml"))
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, as for dapo-mcore run")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    r = run(Path(a.out), Path(a.config), a.overrides)
    print(f"iteration 1 served_model stamps: {json.dumps(r['stamps'])} (iteration 0's actor: {r['actor0']})")
    print(f"server launches: {len(r['launches'])} ({r['launches']}); wall time {time.perf_counter() - t0:.0f} s")
    print(f"RESULT sglang_iter1_served_model_is_actor0 {int(r['served_is_actor0'])} bool")
    print(f"RESULT sglang_swap_greedy_agreement {r['swap_agreement']:.4f} fraction")
    print(f"RESULT sglang_reference_greedy_agreement {r['reference_agreement']:.4f} fraction")
    print(f"RESULT sglang_swap_states {r['states']} states")
    print(f"RESULT sglang_server_launches {len(r['launches'])} launches")
    return 0 if r["served_is_actor0"] and r["swap_agreement"] >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
