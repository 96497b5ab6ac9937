"""The run configuration: typed dataclasses, a YAML file plus ``key=value`` overrides, strict.

A run config is one :class:`RunConfig`: ``run`` (output dir, seed, iterations, processes, which
stages and controls), ``model`` (reference policy, critic init), ``data`` (training and held-out
problem sets), optional ``toy`` (build a tiny model and chain-task problem sets locally), and one
section per stage whose type is that stage's own config dataclass (``generate: GenerateConfig``,
``mc: MCConfig``, ``critic: CriticConfig``, ``advantage: AdvantageConfig``, ``actor: ActorConfig``,
``eval: EvalConfig``). Stage fields that the pipeline fills (paths, seeds, the verifier shared by all
stages) are listed in :data:`PIPELINE_FILLED`; setting one is an error that says where it comes from.

Loading is strict: an unknown key is a :class:`ConfigError` naming the key, the file and line (or
the override), and a close match; values are type-checked (int/float/bool/str/Optional/list/dict/
nested dataclass). Overrides use dotted keys and YAML scalars: ``critic.lr=1e-4 run.iterations=2``.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from dapo_mcore.critic.train import CriticConfig
from dapo_mcore.parallel.fast_paths import FastPathConfig
from dapo_mcore.sft.train import SFTConfig
from dapo_mcore.eval.evaluate import EvalConfig
from dapo_mcore.rollout.generate import GenerateConfig
from dapo_mcore.rollout.mc import MCConfig

STAGES = ("generate", "mc", "critic", "advantage", "actor", "eval")
MEGATRON_STAGES = ("critic", "advantage", "actor", "rft")   # sections with a ``parallel.fast_paths``
OPTIONAL_SECTIONS = ("toy", "fast_paths")
CONTROLS = ("outcome", "rft")


class ConfigError(ValueError):
    """A bad config (message names the key, and the file:line or the override it came from)."""


@dataclass
class RunSection:
    """``nproc``: processes for the distributed stages (critic, advantage, actor); raised to the
    model-parallel size (TP x PP x CP) when that is larger. ``stages``: which stages to run per
    iteration (in pipeline order). ``controls``: ``"outcome"`` (outcome-only advantages: A_i from the
    MC completions' outcomes instead of the critic) and/or ``"rft"`` (rejection-sampling fine-tuning
    on the reference's verified-correct samples)."""

    out_dir: str = "runs/dapo"
    seed: int = 0
    iterations: int = 1
    nproc: int = 1
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    controls: list[str] = field(default_factory=list)
    controls_first_only: bool = False   # run the controls in iteration 0 only (iterative DAPO vs one-shot controls)
    budget: str = "samples"             # how RFT's generation budget matches DAPO's: "samples" | "tokens" (generated)
    outcome_beta: Optional[float] = None  # beta of the outcome-only control's actor (default: actor.beta)


@dataclass
class ModelSection:
    """``policy``: HF checkpoint of the reference policy (generator and completer of iteration 0).
    ``critic_init``: HF checkpoint the critic starts from (default: the iteration's reference)."""

    policy: str = ""
    critic_init: Optional[str] = None


@dataclass
class DataSection:
    """``train``: problem set (JSONL/parquet with id/prompt/answer) for generation; ``eval``: held-out
    problem sets by name."""

    train: str = ""
    eval: dict[str, str] = field(default_factory=dict)


@dataclass
class ToySection:
    """Build a tiny chain-task policy and problem sets under ``<out_dir>/toy`` (CPU smoke runs and
    demos); then ``model.policy``/``data.train``/``data.eval`` must be left empty."""

    train_problems: int = 64
    eval_problems: int = 64
    sft_steps: int = 150
    carry_error_rate: float = 0.5
    min_ops: int = 3
    max_ops: int = 5
    seed: int = 0


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    toy: Optional[ToySection] = None
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(problems="", model_path=""))
    mc: MCConfig = field(default_factory=lambda: MCConfig(model_path=""))
    critic: CriticConfig = field(default_factory=CriticConfig)
    advantage: Any = None   # dapo_mcore.actor.advantage.AdvantageConfig (see section_types())
    actor: Any = None       # dapo_mcore.actor.train.ActorConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    rft: SFTConfig = field(default_factory=SFTConfig)   # the rejection-sampling fine-tuning control
    # the fast-path switch of every Megatron stage (critic, advantage, actor, rft) unless a stage sets its
    # own ``<stage>.parallel.fast_paths`` (see dapo_mcore.parallel.fast_paths)
    fast_paths: Optional[FastPathConfig] = None

    def __post_init__(self):
        for name, typ in section_types().items():
            if getattr(self, name) is None and typ is not None and name not in OPTIONAL_SECTIONS:
                setattr(self, name, _default_instance(typ))


# What the pipeline fills in each stage section (never set by the user), and where it comes from.
PIPELINE_FILLED: dict[str, str] = {
    "generate.problems": "data.train",
    "generate.model_path": "the iteration's reference policy (model.policy, then the previous actor)",
    "generate.seed": "run.seed",
    "mc.model_path": "the iteration's reference policy",
    "mc.seed": "run.seed",
    "mc.verifier": "generate.verifier",
    "mc.verify_timeout_s": "generate.verify_timeout_s",
    "critic.init_path": "model.critic_init or the iteration's reference policy",
    "critic.seed": "run.seed",
    "advantage.source": "run.controls (the main run uses the critic, the 'outcome' control the MC outcomes)",
    "advantage.critic_path": "the iteration's critic stage (critic/hf; empty for the outcome control)",
    "advantage.reference_path": "the iteration's reference policy",
    "actor.init_path": "the iteration's reference policy",
    "actor.seed": "run.seed",
    "rft.init_path": "the iteration's reference policy",
    "rft.seed": "run.seed",
    "eval.verifier": "generate.verifier",
    "eval.verify_timeout_s": "generate.verify_timeout_s",
    "eval.prompt_template": "generate.prompt_template",
    "eval.system_prompt": "generate.system_prompt",
}


def _default_instance(cls):
    """``cls()`` with every required field that the pipeline fills set to an empty value."""
    kw = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw[f.name] = "" if hints[f.name] is str else None
    return cls(**kw)


def section_types() -> dict[str, Optional[type]]:
    """Section name -> dataclass; ``None`` for a stage whose module is not installed yet."""
    out: dict[str, Optional[type]] = {"run": RunSection, "model": ModelSection, "data": DataSection,
                                      "toy": ToySection, "generate": GenerateConfig, "mc": MCConfig,
                                      "critic": CriticConfig, "eval": EvalConfig, "rft": SFTConfig,
                                      "fast_paths": FastPathConfig}
    try:
        from dapo_mcore.actor.advantage import AdvantageConfig
    except ImportError:
        AdvantageConfig = None
    try:
        from dapo_mcore.actor.train import ActorConfig
    except ImportError:
        ActorConfig = None
    out["advantage"], out["actor"] = AdvantageConfig, ActorConfig
    return out


# ---------------------------------------------------------------------------------------------
# Reading YAML with line numbers


def _node_to_python(node: yaml.Node, prefix: str, lines: dict[str, int]) -> Any:
    """Convert a composed YAML node to Python, recording ``dotted.key -> line`` of every mapping key."""
    if isinstance(node, yaml.MappingNode):
        out = {}
        for knode, vnode in node.value:
            key = yaml.safe_load(yaml.serialize(knode))
            if not isinstance(key, str):
                raise ConfigError(f"line {knode.start_mark.line + 1}: keys must be strings, got {key!r}")
            dotted = f"{prefix}.{key}" if prefix else key
            if key in out:
                raise ConfigError(f"line {knode.start_mark.line + 1}: duplicate key {dotted!r}")
            lines[dotted] = knode.start_mark.line + 1
            out[key] = _node_to_python(vnode, dotted, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(v, f"{prefix}[{i}]", lines) for i, v in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """``(mapping, {dotted key: 1-based line})`` of a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    lines: dict[str, int] = {}
    try:
        data = {} if node is None else _node_to_python(node, "", lines)
    except ConfigError as e:
        raise ConfigError(f"{path}:{e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of sections, got {type(data).__name__}")
    return data, lines


# ---------------------------------------------------------------------------------------------
# Typed construction


def _where(key: str, origins: dict[str, str]) -> str:
    """Origin of ``key`` (or of its closest parent) as ``"file:line: "`` / ``"override 'k=v': "``."""
    k = key
    while k:
        if k in origins:
            return origins[k] + ": "
        k = k.rpartition(".")[0]
    return ""


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _check(value: Any, typ, key: str, origins: dict[str, str]) -> Any:
    """``value`` converted to ``typ`` (dataclasses built recursively) or a ConfigError."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, key, origins)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{_where(key, origins)}{key}: expected {_type_name(typ)}, got {value!r}")
    if is_dataclass(typ):
        if isinstance(value, typ):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, origins)}{key}: expected a mapping (section {typ.__name__}), "
                              f"got {value!r}")
        return build(typ, value, origins, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(key, origins)}{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)[:1] or (Any,)
        return [_check(v, item, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, origins)}{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(typ) or (str, Any)
        return {_check(k, kt, f"{key}.{k}", origins): _check(v, vt, f"{key}.{k}", origins) for k, v in value.items()}
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(key, origins)}{key}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(key, origins)}{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):   # PyYAML (YAML 1.1) reads "5e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(key, origins)}{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(key, origins)}{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(typ)}")


def build(cls, data: dict, origins: Optional[dict[str, str]] = None, prefix: str = ""):
    """Construct dataclass ``cls`` from a mapping, strictly (unknown key, wrong type: ConfigError).

    ``origins``: dotted key -> where it was set (for messages); ``prefix``: dotted path of ``cls``.
    Missing fields take their defaults; a required field without a default must be present.
    """
    origins = origins or {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kw = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else \
                f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"{_where(key, origins)}unknown config key {key!r}{hint}")
        kw[k] = _check(v, hints[k], key, origins)
    try:
        obj = cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{_where(prefix, origins)}section {prefix or cls.__name__!r}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{_where(prefix, origins)}{prefix or cls.__name__}: {e}") from None
    return obj


def _has_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in fields(cls))


def to_dict(obj) -> Any:
    """Plain (YAML/JSON-able) form of a config dataclass."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------
# Run configs


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b.c=VALUE"`` -> ``("a.b.c", yaml_scalar(VALUE))``."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key, value


def _set_dotted(data: dict, key: str, value: Any, text: str) -> None:
    parts = key.split(".")
    d = data
    for i, p in enumerate(parts[:-1]):
        nxt = d.setdefault(p, {})
        if nxt is None:
            nxt = d[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[:i + 1])!r} is not a section")
        d = nxt
    d[parts[-1]] = value


def load_run_config(path: Optional[str | Path], overrides: list[str] = (), *,
                    allow_filled: bool = False) -> RunConfig:
    """Read ``path`` (YAML; may be None), apply ``key=value`` overrides, validate; return the config."""
    data: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        data, lines = read_yaml(path)
        origins = {k: f"{path}:{ln}" for k, ln in lines.items()}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value, text)
        origins[key] = f"override {text!r}"
        parts = key.split(".")
        for i in range(1, len(parts)):
            origins.setdefault(".".join(parts[:i]), f"override {text!r}")
        for sub in _flatten_keys(value, key):
            origins[sub] = f"override {text!r}"
    types_ = section_types()
    for name, sec in data.items():
        if name in types_ and types_[name] is None and sec not in (None, {}):
            mod = "dapo_mcore.actor.advantage" if name == "advantage" else "dapo_mcore.actor.train"
            raise ConfigError(f"{_where(name, origins)}section {name!r}: stage not available ({mod} is not "
                              "installed in this version)")
    if not allow_filled:
        for key in _flatten_keys(data, ""):
            if key in PIPELINE_FILLED:
                raise ConfigError(f"{_where(key, origins)}{key!r} is filled by the pipeline from "
                                  f"{PIPELINE_FILLED[key]}; do not set it")
    data = {k: v for k, v in data.items() if not (k in types_ and types_[k] is None)}
    kw = {}
    for k, v in data.items():
        if k not in types_:
            close = difflib.get_close_matches(k, list(types_), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f" (sections: {', '.join(types_)})"
            raise ConfigError(f"{_where(k, origins)}unknown config key {k!r}{hint}")
        sec_t = types_[k]
        if v is None:
            kw[k] = None if k in OPTIONAL_SECTIONS else _default_instance(sec_t)
            continue
        if not isinstance(v, dict):
            raise ConfigError(f"{_where(k, origins)}section {k!r} must be a mapping, got {v!r}")
        base = {} if _has_defaults(sec_t) else to_dict(_default_instance(sec_t))  # required = pipeline-filled
        base.update(v)
        kw[k] = build(sec_t, base, origins, k)
    cfg = RunConfig(**kw)
    _apply_fast_paths(cfg, data)
    validate(cfg)
    return cfg


def _apply_fast_paths(cfg: RunConfig, data: dict) -> None:
    """Copy the run-level ``fast_paths`` into every Megatron stage that does not set its own."""
    if cfg.fast_paths is None:
        return
    for name in MEGATRON_STAGES:
        sec = getattr(cfg, name, None)
        par = getattr(sec, "parallel", None)
        own = ((data.get(name) or {}).get("parallel") or {}).get("fast_paths") is not None
        if par is not None and not own:
            par.fast_paths = dataclasses.replace(cfg.fast_paths)


def _flatten_keys(value: Any, prefix: str) -> list[str]:
    if not isinstance(value, dict):
        return []
    out = []
    for k, v in value.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.append(key)
        out.extend(_flatten_keys(v, key))
    return out


def validate(cfg: RunConfig) -> None:
    """Cross-field checks (raise ConfigError naming the key)."""
    r = cfg.run
    bad = [s for s in r.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"run.stages: unknown stage(s) {bad}; choose from {list(STAGES)}")
    bad = [c for c in r.controls if c not in CONTROLS]
    if bad:
        raise ConfigError(f"run.controls: unknown control(s) {bad}; choose from {list(CONTROLS)}")
    if r.budget not in ("samples", "tokens"):
        raise ConfigError(f"run.budget must be 'samples' or 'tokens', got {r.budget!r}")
    if r.iterations < 1:
        raise ConfigError(f"run.iterations must be >= 1, got {r.iterations}")
    if r.nproc < 1:
        raise ConfigError(f"run.nproc must be >= 1, got {r.nproc}")
    from dapo_mcore.parallel.runtime import ParallelConfigError

    for name in MEGATRON_STAGES:
        par = getattr(getattr(cfg, name, None), "parallel", None)
        if par is not None:
            try:
                par.paths(cuda=None)
            except ParallelConfigError as e:
                raise ConfigError(f"{name}.parallel.fast_paths: {e}") from None
    if cfg.toy is not None:
        for key, v in (("model.policy", cfg.model.policy), ("data.train", cfg.data.train),
                       ("data.eval", cfg.data.eval)):
            if v:
                raise ConfigError(f"{key} is set together with the toy section; the toy section builds it")
        if cfg.toy.min_ops > cfg.toy.max_ops or cfg.toy.min_ops < 1:
            raise ConfigError(f"toy.min_ops/max_ops: need 1 <= min_ops <= max_ops, got {cfg.toy.min_ops}/"
                              f"{cfg.toy.max_ops}")
    else:
        if not cfg.model.policy:
            raise ConfigError("model.policy is required (an HF checkpoint), or add a toy section")
        if not cfg.data.train and "generate" in r.stages:
            raise ConfigError("data.train is required (a problem set), or add a toy section")


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (pipeline-filled fields omitted, so it loads back unchanged)."""
    d = to_dict(cfg)
    for key in PIPELINE_FILLED:
        sec, _, name = key.partition(".")
        if isinstance(d.get(sec), dict):
            d[sec].pop(name, None)
    for name, typ in section_types().items():
        if typ is None:
            d.pop(name, None)
    for name in OPTIONAL_SECTIONS:
        if d.get(name) is None:
            d.pop(name, None)
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=False, allow_unicode=True)


__all__ = ["ConfigError", "RunConfig", "RunSection", "ModelSection", "DataSection", "ToySection", "STAGES",
           "CONTROLS", "PIPELINE_FILLED", "build", "to_dict", "load_run_config", "dump_config", "parse_override",
           "read_yaml", "section_types", "validate"]
