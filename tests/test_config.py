"""Run config: YAML + overrides, strict keys with file:line and close matches, types, round trip."""
from __future__ import annotations

import textwrap

import pytest

from dapo_mcore.config import ConfigError, parse_override, read_yaml
from dapo_mcore.run.schema import dump_config, load_run_config

BASE = """\
run:
  out_dir: /tmp/x
  iterations: 2
model:
  policy: /models/ref
data:
  train: train.jsonl
  eval:
    gsm8k: gsm8k.jsonl
critic:
  lr: 5e-6
  parallel:
    tensor_model_parallel_size: 2
"""


def write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_file_defaults_and_overrides(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE), ["critic.lr=1e-4", "generate.num_samples=32", "run.controls=[outcome]",
                                                  "mc.max_context=null", "data.eval.math=math.jsonl"])
    assert cfg.run.iterations == 2 and cfg.run.out_dir == "/tmp/x"
    assert cfg.critic.lr == pytest.approx(1e-4) and isinstance(cfg.critic.lr, float)
    assert cfg.critic.parallel.tensor_model_parallel_size == 2
    assert cfg.critic.epochs == 1                     # CriticConfig default kept
    assert cfg.generate.num_samples == 32 and cfg.generate.keep == 4
    assert cfg.run.controls == ["outcome"] and cfg.mc.max_context is None
    assert cfg.data.eval == {"gsm8k": "gsm8k.jsonl", "math": "math.jsonl"}


def test_yaml_exponent_floats_are_numbers(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE))
    assert cfg.critic.lr == pytest.approx(5e-6)       # PyYAML reads "5e-6" as a string


def test_unknown_key_in_file_names_file_line_and_close_match(tmp_path):
    p = write(tmp_path, BASE.replace("  lr: 5e-6", "  lrr: 5e-6"))
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert f"{p}:11" in msg and "'critic.lrr'" in msg and "did you mean 'critic.lr'" in msg


def test_unknown_nested_key_and_section(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"override 'critic\.parallel\.tensor_parallel=2'.*"
                                          r"did you mean 'critic\.parallel\.tensor_model_parallel_size'"):
        load_run_config(p, ["critic.parallel.tensor_parallel=2"])
    with pytest.raises(ConfigError, match=r"unknown config key 'critc'.*did you mean 'critic'"):
        load_run_config(p, ["critc.lr=1"])


@pytest.mark.parametrize("override, match", [
    ("run.iterations=two", r"run\.iterations: expected an integer, got 'two'"),
    ("run.iterations=1.5", r"expected an integer"),
    ("critic.use_completions=1", r"expected true/false"),
    ("critic.lr=fast", r"critic\.lr: expected a number"),
    ("run.stages=generate", r"run\.stages: expected a list"),
    ("run.stages=[generate, sample]", r"unknown stage\(s\) \['sample'\]"),
    ("critic=3", r"section 'critic' must be a mapping"),
    ("run.iterations=0", r"run\.iterations must be >= 1"),
    ("generate.problems=a.jsonl", r"'generate\.problems' is filled by the pipeline from data\.train"),
    ("actor.init_path=x", r"'actor\.init_path' is filled by the pipeline"),
    ("critic.lr", r"expected dotted\.key=value"),
])
def test_bad_values(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(write(tmp_path, BASE), [override])


def test_type_error_in_file_has_line(tmp_path):
    p = write(tmp_path, BASE.replace("iterations: 2", "iterations: many"))
    with pytest.raises(ConfigError, match=rf"{p}:3: run\.iterations: expected an integer"):
        load_run_config(p)


def test_invalid_yaml_and_missing_file(tmp_path):
    p = write(tmp_path, "run:\n  out_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{p}:\d+: invalid YAML"):
        load_run_config(p)
    with pytest.raises(ConfigError, match="no such config file"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="duplicate key 'run.seed'"):
        read_yaml(write(tmp_path, "run:\n  seed: 1\n  seed: 2\n"))


def test_required_inputs_and_toy_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="model.policy is required"):
        load_run_config(None, ["data.train=x"])
    with pytest.raises(ConfigError, match="model.policy is set together with the toy section"):
        load_run_config(None, ["model.policy=x", "toy.seed=1"])
    cfg = load_run_config(None, ["toy.train_problems=8"])
    assert cfg.toy.train_problems == 8 and cfg.toy.eval_problems == 64


def test_round_trip(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE), ["mc.delimiter=\"\\n\\n\"", "eval.limit=10"])
    assert cfg.mc.delimiter == "\n\n"
    text = dump_config(cfg)
    assert "problems:" not in text and "model_path" not in text      # pipeline-filled fields left out
    again = load_run_config(write(tmp_path, text))
    assert again == cfg


def test_parse_override_scalars():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=") == ("a", "")


def test_add_flags_round_trip_and_bool_flags():
    import argparse
    from dataclasses import dataclass

    from dapo_mcore.config import add_flags, from_flags, option

    @dataclass
    class Setup:
        steps: int = option(3, "how many steps")
        lr: float = 1e-3
        name: str = "a"
        fast: bool = option(True, "go fast")

    p = argparse.ArgumentParser()
    add_flags(p, Setup)
    assert from_flags(Setup, p.parse_args([])) == Setup()
    got = from_flags(Setup, p.parse_args(["--steps", "7", "--lr", "2e-4", "--name", "b", "--no-fast"]))
    assert got == Setup(steps=7, lr=2e-4, name="b", fast=False)  # "--fast False" would have read as True
    assert "how many steps" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "x"])
