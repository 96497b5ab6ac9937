"""Run config: YAML + overrides, strict keys with file:line and close matches, types, round trip."""
from __future__ import annotations

import dataclasses
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
    ("run.iterations=0", r"override 'run\.iterations=0': run\.iterations must be >= 1, got 0"),
    ("generate.num_samples=-3", r"generate\.num_samples must be >= 1, got -3"),
    ("actor.beta=0", r"actor\.beta must be > 0, got 0"),
    ("critic.heldout_fraction=1", r"critic\.heldout_fraction must be >= 0 and < 1, got 1"),
    ("mc.top_p=1.5", r"mc\.top_p must be > 0 and <= 1, got 1\.5"),
    ("advantage.gap_threshold=-0.1", r"advantage\.gap_threshold must be >= 0"),
    ("critic.decay_style=cosin", r"critic\.decay_style must be one of constant \| linear \| cosine, got 'cosin'; "
                                 r"did you mean 'cosine'\?"),
    ("generate.backend.kind=sglan", r"generate\.backend\.kind must be one of embedded \| sglang.*'sglang'"),
    ("critic.parallel.tensor_model_parallel_size=0", r"tensor_model_parallel_size must be >= 1, got 0"),
    ("actor.ops_impl=cuda", r"actor\.ops_impl must be one of auto \| triton \| cpp \| reference"),
    ("run.budget=token", r"run\.budget must be one of samples \| tokens.*did you mean 'tokens'"),
    ("mc.top_k=0", r"^override 'mc\.top_k=0': mc: top_k must be -1 \(off\) or >= 1, got 0$"),
    ("critic.min_lr=1", r"cfg\.yaml:\d+: critic: need 0 <= min_lr <= lr .*\(override 'critic\.min_lr=1'\)$"),
    ("mc.delimiter=", r"mc: delimiter must be a non-empty string"),
    ("generate.problems=a.jsonl", r"'generate\.problems' is filled by the pipeline from data\.train"),
    ("actor.init_path=x", r"'actor\.init_path' is filled by the pipeline"),
    ("critic.lr", r"expected dotted\.key=value"),
])
def test_bad_values(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(write(tmp_path, BASE), [override])


def test_bad_value_in_file_names_its_line(tmp_path):
    p = write(tmp_path, BASE.replace("  lr: 5e-6", "  lr: -5e-6"))
    with pytest.raises(ConfigError, match=rf"{p}:11: critic\.lr must be > 0, got -5e-06"):
        load_run_config(p)
    p = write(tmp_path, BASE + "generate:\n  num_samples: 4\n  keep: 6\n")
    with pytest.raises(ConfigError, match=rf"{p}:14: generate: keep \(M=6\) must be <= num_samples \(K=4\)$"):
        load_run_config(p)          # a relation: the section's line
    with pytest.raises(ConfigError, match=r"critic: need 0 <= min_lr <= lr.*\(override 'critic\.min_lr=1e-5'\)"):
        load_run_config(write(tmp_path, BASE), ["critic.min_lr=1e-5"])


def _fields(cls, prefix=""):
    """``(dotted key, field, declaring class)`` of every leaf field under config dataclass ``cls``."""
    import typing

    from dapo_mcore.config import _section_type
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        sub = _section_type(hints[f.name])
        if sub is not None:
            yield from _fields(sub, key)
        else:
            yield key, f, cls


def test_every_default_is_accepted_and_every_bound_is_shown_by_help():
    from dapo_mcore.config import describe, value_problem
    from dapo_mcore.run.schema import RunConfig, ToySection

    rows = {key: doc for key, _, _, doc in describe(RunConfig, "") + describe(ToySection, "toy")}
    checked = 0
    for key, f, cls in list(_fields(RunConfig)) + list(_fields(ToySection, "toy")):
        default = None if f.default is dataclasses.MISSING else f.default
        assert value_problem(f, default) is None, (key, default)
        if f.metadata.get("bounds"):
            checked += 1
            assert rows[key].endswith("]") and ("<" in rows[key] or ">" in rows[key]), (key, rows[key])
        for c in f.metadata.get("choices") or ():
            assert c == "" or c in f.metadata["doc"], (key, c)     # the doc names every choice
    assert checked >= 60


def test_a_redeclared_field_keeps_its_declared_values():
    """A stage config that redeclares a shared field (a new default) must not drop its bounds or choices."""
    from dapo_mcore.run.stages import SECTIONS
    for name, cls in SECTIONS.items():
        for base in cls.__mro__[1:]:
            if not dataclasses.is_dataclass(base):
                continue
            inherited = {f.name: f for f in dataclasses.fields(base)}
            for f in dataclasses.fields(cls):
                g = inherited.get(f.name)
                if g is not None:
                    assert (f.metadata.get("bounds"), f.metadata.get("choices")) == \
                        (g.metadata.get("bounds"), g.metadata.get("choices")), (name, f.name, base.__name__)


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

    @dataclass
    class Bounded:
        steps: int = option(3, "how many steps", ge=1)
        mode: str = option("a", "a | b", choices=("a", "b"))

    p = argparse.ArgumentParser()
    add_flags(p, Bounded)
    assert from_flags(Bounded, p.parse_args(["--steps", "2", "--mode", "b"])) == Bounded(2, "b")
    for bad in (["--steps", "0"], ["--mode", "c"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_constructing_a_config_in_python_checks_the_same_declarations():
    from dapo_mcore.actor.train import ActorConfig
    from dapo_mcore.generate.stage import GenerateConfig
    from dapo_mcore.rollout.backend_config import BackendConfig

    with pytest.raises(ValueError, match=r"^beta must be > 0, got 0$"):
        ActorConfig(beta=0)
    with pytest.raises(ValueError, match=r"^lr must be > 0, got -1"):
        ActorConfig(lr=-1.0)
    with pytest.raises(ValueError, match=r"keep \(M=9\) must be <= num_samples \(K=4\)"):
        GenerateConfig(num_samples=4, keep=9)
    with pytest.raises(ValueError, match=r"temperature must be >= 0"):
        GenerateConfig(temperature=-1.0)
    with pytest.raises(ValueError, match=r"kind must be one of embedded \| sglang, got 'sglan'; did you mean 'sglang'"):
        BackendConfig("sglan")
    cfg = dataclasses.replace(GenerateConfig(), num_samples=23, keep=23)     # how the RFT unit fills both
    assert (cfg.num_samples, cfg.keep) == (23, 23)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        dataclasses.replace(cfg, num_samples=0, keep=0)
