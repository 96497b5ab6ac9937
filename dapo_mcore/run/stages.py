"""The one table of stages: every unit an iteration can hold, in run order, and what the pipeline, the CLI,
the run schema, the launcher and the report know of it.

A unit is one directory ``<out>/iter_<k>/<name>``. The six stages of the algorithm have a CLI command and
are chosen with ``run.stages``; the controls (``run.controls``) reuse a stage's function and config
section with other inputs. A unit's function is called as ``run(cfg, *input_dirs, out_dir)`` with
``cfg`` its config section after the pipeline set the fields named in ``fills``; ``inputs`` are upstream
units whose output directories it reads. A ``rollout`` unit's function also takes ``backend=`` (the generation
backend to sample from instead of making its own: the pipeline passes its SGLang fleet's). To add a stage: a package of its own with its config
dataclass and run function, and a row here (``docs/architecture.md``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from dapo_mcore.actor.train import ActorConfig, run_train_actor
from dapo_mcore.actor.train import summary_note as actor_note
from dapo_mcore.advantage.stage import AdvantageConfig, run_advantage
from dapo_mcore.advantage.stage import summary_note as advantage_note
from dapo_mcore.critic.train import CriticConfig, run_train_critic
from dapo_mcore.critic.train import summary_note as critic_note
from dapo_mcore.eval.evaluate import EvalConfig, evaluate_checkpoint
from dapo_mcore.generate.stage import GenerateConfig, run_generate
from dapo_mcore.mc.stage import MCConfig, run_mc
from dapo_mcore.rollout.common import throughput_note
from dapo_mcore.sft.rft import run_rft, samples_per_problem
from dapo_mcore.sft.train import SFTConfig

# What a unit leaves in its directory (checked before a finished unit is skipped; dapo_mcore.run.checks):
SHARDS = "shards"            # manifest.json + shards (every one's size and sha256), summary.json
CHECKPOINT = "checkpoint"    # summary.json + hf/ (an HF checkpoint whose every listed tensor is there)
EVAL = "eval"                # <label>/results.json + one row per problem, per evaluated model

NEXT_REFERENCE = "actor"     # the unit whose hf/ is the next iteration's reference policy


@dataclass(frozen=True)
class Fill:
    """A config field the pipeline sets. ``source`` says where the value comes from (the error for a user who
    sets it, ``--help``); ``value(plan)`` computes it for one iteration (:class:`dapo_mcore.run.pipeline.Plan`);
    ``kind``: ``"model"`` (a checkpoint path) or ``"file"`` (a data file): its content, not its path, goes
    into the unit's digest."""

    source: str
    value: Callable[[Any], Any]
    kind: str = ""


@dataclass(frozen=True)
class Stage:
    """One row of the table (see the module doc)."""

    name: str                                  # unit directory; the job and stamp name
    section: str                               # config section (several units may share one)
    config: type                               # that section's dataclass
    run: Callable[..., Any]                    # run(cfg, *input_dirs, out_dir) -> summary
    output: str                                # SHARDS | CHECKPOINT | EVAL
    help: str
    inputs: tuple[str, ...] = ()               # upstream units whose directories are passed to run, in order
    fills: Mapping[str, Fill] = field(default_factory=dict)
    distributed: bool = False                  # a torchrun job when it needs more than one process
    rollout: bool = False                      # samples from its section's ``backend`` (the model: ``model_path``;
                                               # eval: each compared checkpoint); ``kind: sglang``: the pipeline
                                               # serves it from its fleet and stops that before distributed units
    command: Optional[str] = None              # `dapo-mcore COMMAND CONFIG`; None: a control, run by `run` only
    control: Optional[str] = None              # the run.controls value that adds this unit
    label: Optional[str] = None                # its hf/ is compared in eval under this label
    note: Callable[[dict], str] = lambda summary: ""   # its line in the report's stage table


REF = Fill("the iteration's reference policy (model.policy, then the previous iteration's actor)",
           lambda p: p.ref, "model")
SEED = Fill("run.seed (+1000 per iteration)", lambda p: p.seed)
TRAIN_SET = Fill("data.train", lambda p: p.train_set, "file")


def same_as(key: str) -> Fill:
    """A field that must equal ``key`` (``section.field``) of the same run."""
    section, name = key.split(".")
    return Fill(key, lambda p: getattr(getattr(p.cfg, section), name))


def _rft_k(p) -> int:
    return samples_per_problem(p.output("generate"), p.output("mc"), p.cfg.run.budget)


def _outcome_beta(p) -> float:
    return p.cfg.actor.beta if p.cfg.run.outcome_beta is None else p.cfg.run.outcome_beta


STAGES: tuple[Stage, ...] = (
    Stage("generate", "generate", GenerateConfig, run_generate, SHARDS, command="generate",
          help="stage 1: sample K solutions per training problem, verify, keep M balanced",
          fills={"problems": TRAIN_SET, "model_path": REF, "seed": SEED}, rollout=True, note=throughput_note),
    Stage("mc", "mc", MCConfig, run_mc, SHARDS, inputs=("generate",), command="mc",
          help="stage 2: N completions per step-prefix state -> MC values and candidate actions",
          fills={"model_path": REF, "seed": SEED, "verifier": same_as("generate.verifier"),
                 "verify_timeout_s": same_as("generate.verify_timeout_s")}, rollout=True, note=throughput_note),
    Stage("critic", "critic", CriticConfig, run_train_critic, CHECKPOINT, inputs=("mc",), distributed=True,
          command="train-critic", help="stage 3: train the critic V(s) on the MC values (megatron)",
          fills={"init_path": Fill("model.critic_init, else the iteration's reference policy",
                                   lambda p: p.cfg.model.critic_init or p.ref, "model"), "seed": SEED},
          note=critic_note),
    Stage("advantage", "advantage", AdvantageConfig, run_advantage, SHARDS, inputs=("mc",), distributed=True,
          command="advantage",
          help="stage 4: critic-scored advantages A_i = Q_i - mean Q, gap filter, reference log-probs",
          fills={"source": Fill("run.controls (critic in the main run, outcome in the 'outcome' control)", lambda p: "critic"),
                 "critic_path": Fill("the iteration's critic stage (critic/hf)",
                                     lambda p: str(p.output("critic") / "hf"), "model"),
                 "reference_path": REF}, note=advantage_note),
    Stage("actor", "actor", ActorConfig, run_train_actor, CHECKPOINT, inputs=("advantage",), distributed=True,
          command="train-actor", label="dapo", help="stage 5: train the actor with the DAPO loss (megatron)",
          fills={"init_path": REF, "seed": SEED}, note=actor_note),
    Stage("advantage-outcome", "advantage", AdvantageConfig, run_advantage, SHARDS, inputs=("mc",), distributed=True,
          control="outcome", help="outcome-only advantages: Q_i from the MC completions' outcomes, no critic",
          fills={"source": Fill("run.controls (outcome in the 'outcome' control)", lambda p: "outcome"),
                 "critic_path": Fill("nothing: the outcome control uses no critic", lambda p: ""),
                 "reference_path": REF}, note=advantage_note),
    Stage("actor-outcome", "actor", ActorConfig, run_train_actor, CHECKPOINT, inputs=("advantage-outcome",),
          distributed=True, control="outcome", label="outcome-only",
          help="the actor trained on the outcome-only advantages",
          fills={"init_path": REF, "seed": SEED,
                 "beta": Fill("run.outcome_beta, else actor.beta (its advantages have another scale)", _outcome_beta)},
          note=actor_note),
    Stage("rft-generate", "generate", GenerateConfig, run_generate, SHARDS, control="rft",
          help="the reference samples every training problem with DAPO's generate + mc budget",
          fills={"problems": TRAIN_SET, "model_path": REF,
                 "seed": Fill("run.seed + 17 (+1000 per iteration)", lambda p: p.seed + 17),
                 "num_samples": Fill("generate + mc budget per training problem (run.budget: samples or tokens)", _rft_k),
                 "keep": Fill("num_samples (every sample is kept)", _rft_k)}, rollout=True, note=throughput_note),
    Stage("rft", "rft", SFTConfig, run_rft, CHECKPOINT, inputs=("rft-generate",), distributed=True, control="rft",
          label="rft", help="rejection-sampling fine-tuning of the reference on its verified-correct samples",
          fills={"init_path": REF, "seed": SEED}),
    Stage("eval", "eval", EvalConfig, evaluate_checkpoint, EVAL, command="eval", rollout=True,
          help="greedy accuracy of the iteration's reference and trained policies on data.eval, side by side",
          fills={k: same_as(f"generate.{k}") for k in ("verifier", "verify_timeout_s", "prompt_template",
                                                       "system_prompt")}),
)

STAGE: dict[str, Stage] = {s.name: s for s in STAGES}
COMMANDS: dict[str, Stage] = {s.command: s for s in STAGES if s.command}
MAIN: tuple[str, ...] = tuple(s.name for s in STAGES if s.control is None)       # what run.stages chooses from
CONTROLS: tuple[str, ...] = tuple(dict.fromkeys(s.control for s in STAGES if s.control))
SECTIONS: dict[str, type] = {s.section: s.config for s in STAGES}                 # config section -> dataclass


def _filled() -> dict[str, str]:
    """``section.field`` -> source, for the fields the pipeline sets in every unit of their section."""
    out = {}
    for section in SECTIONS:
        rows = [s for s in STAGES if s.section == section]
        common = set(rows[0].fills).intersection(*(r.fills for r in rows[1:]))
        out.update({f"{section}.{f}": rows[0].fills[f].source for f in rows[0].fills if f in common})
    return out


FILLED: dict[str, str] = _filled()

__all__ = ["Stage", "Fill", "STAGES", "STAGE", "COMMANDS", "MAIN", "CONTROLS", "SECTIONS", "FILLED", "SHARDS",
           "CHECKPOINT", "EVAL", "NEXT_REFERENCE"]
