"""Typed config dataclasses: one way to describe a field, and strict construction from YAML + overrides.

Every config field of the package is declared with :func:`option`, which records, as dataclass field
metadata, the field's one-line doc, whether it counts toward a stage's identity (``identity=False``: it
cannot change results, e.g. progress bars or batch sizes sent to a server, or it is an input path
identified by content elsewhere), the values it accepts (bounds ``ge``/``gt``/``le``/``lt`` of a number,
``choices`` of a string) and, for the few layout settings the cluster launchers pass on the command line,
its ``flag``. One function reads each of them: :func:`describe` (``--help``), :func:`identity` (what a
stage's digest hashes), :func:`value_problem` (the accepted values) and :func:`flag_options` (launcher flags).

Loading is strict: an unknown key is a :class:`ConfigError` naming the key, the file and line (or the
override), and a close match; values are type-checked (int/float/bool/str/Optional/list/dict/nested
dataclass) and checked against their field's bounds and choices, so a bad value stops a run when its config
is read, before any stage spends compute. Relations between fields (``keep <= num_samples``) are checked
by the config class's ``__post_init__``; :func:`build` reports its ``ValueError`` with the section's origin.
Overrides use dotted keys and YAML scalars: ``critic.lr=1e-4 run.iterations=2``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import operator
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml


class ConfigError(ValueError):
    """A bad config (message names the key, and the file:line or the override it came from)."""


# ---------------------------------------------------------------------------------------------
# Declaring fields


def option(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Optional[Callable[[], Any]] = None,
           identity: bool = True, flag: Optional[str] = None, ge: Optional[float] = None, gt: Optional[float] = None,
           le: Optional[float] = None, lt: Optional[float] = None, choices: Optional[tuple] = None) -> Any:
    """A dataclass field with its doc (one line, shown by ``dapo-mcore <stage> --help``), whether it is part
    of the stage's identity (``identity=False``: excluded from the digest), the values it accepts (``ge``,
    ``gt``, ``le``, ``lt``: bounds of a number; ``choices``: the allowed values; ``None`` always passes, for
    ``Optional`` fields) and an optional launcher ``flag`` (e.g. ``"--tp"``). ``factory`` makes the default
    (mutable values, nested sections)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"doc": doc, "identity": identity, "flag": flag, "bounds": bounds,
            "choices": tuple(choices) if choices is not None else None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Checked:
    """Base of a config dataclass: constructing one (from a file by :func:`build`, or in Python) refuses a value
    that its field's :func:`option` declaration does not accept. A subclass's ``__post_init__`` (relations
    between fields) calls ``super().__post_init__()`` first."""

    def __post_init__(self):
        for f in fields(self):
            problem = value_problem(f, getattr(self, f.name))
            if problem:
                raise ValueError(f"{f.name} {problem}")


_BOUNDS = {"gt": (">", operator.gt), "ge": (">=", operator.ge), "lt": ("<", operator.lt), "le": ("<=", operator.le)}


def accepted(f: dataclasses.Field) -> str:
    """The values field ``f`` accepts, in words (``">= 1"``, ``"> 0 and < 1"``, ``"one of a | b"``), or ``""``."""
    choices = f.metadata.get("choices")
    if choices is not None:
        return "one of " + " | ".join(repr(c) if c == "" else str(c) for c in choices)
    bounds = f.metadata.get("bounds") or {}
    return " and ".join(f"{sym} {bounds[k]}" for k, (sym, _) in _BOUNDS.items() if k in bounds)


def value_problem(f: dataclasses.Field, value: Any) -> Optional[str]:
    """Why ``value`` is not accepted by field ``f`` (``"must be >= 1, got 0"``, with a close choice when one
    exists), or None when it is (``None`` always is)."""
    if value is None:
        return None
    choices = f.metadata.get("choices")
    if choices is not None:
        if value in choices:
            return None
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        return f"must be {accepted(f)}, got {value!r}" + (f"; did you mean {close[0]!r}?" if close else "")
    bounds = f.metadata.get("bounds") or {}
    if all(op(value, bounds[k]) for k, (_, op) in _BOUNDS.items() if k in bounds):
        return None
    return f"must be {accepted(f)}, got {value!r}"


def _type_name(t) -> str:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(t))
    if typing.get_origin(t) is not None:
        return str(t).replace("typing.", "")
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _section_type(t) -> Optional[type]:
    """The dataclass a field holds (``X`` or ``Optional[X]``), else None."""
    if is_dataclass(t):
        return t
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(t) if is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def describe(cls, prefix: str, filled: Optional[dict[str, str]] = None) -> list[tuple[str, str, str, str]]:
    """``[(dotted key, type, default, doc)]`` of every leaf field of config dataclass ``cls`` under ``prefix``
    (nested sections flattened). ``filled``: dotted key -> where the pipeline takes it from (shown instead
    of the default)."""
    filled = filled or {}
    hints = typing.get_type_hints(cls)
    rows = []
    defaults = cls() if all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                            for f in fields(cls)) else None
    for f in fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        sub = _section_type(hints[f.name])
        if sub is not None:
            rows.extend(describe(sub, key, filled))
            continue
        doc = f.metadata.get("doc", "")
        if key in filled:
            rows.append((key, _type_name(hints[f.name]), "", f"set by the pipeline: {filled[key]}"))
            continue
        default = repr(getattr(defaults, f.name)) if defaults is not None else "(required)"
        if f.metadata.get("bounds"):
            doc = f"{doc} [{accepted(f)}]"
        rows.append((key, _type_name(hints[f.name]), default, doc))
    return rows


def identity(obj: Any) -> Any:
    """The plain form of config ``obj`` restricted to the fields that can change results (``option(...,
    identity=False)`` fields dropped, at every depth): what a stage's digest hashes."""
    if is_dataclass(obj):
        return {f.name: identity(getattr(obj, f.name)) for f in fields(obj) if f.metadata.get("identity", True)}
    return to_dict(obj)


def flag_options(cls, prefix: str) -> dict[str, tuple[str, Any]]:
    """``{flag: (dotted key, field type)}`` of the fields of ``cls`` (at every depth) declared with a ``flag``."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[str, Any]] = {}
    for f in fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        sub = _section_type(hints[f.name])
        if sub is not None:
            out.update(flag_options(sub, key))
        elif f.metadata.get("flag"):
            out[f.metadata["flag"]] = (key, hints[f.name])
    return out


def add_flags(parser, cls) -> None:
    """One ``--field-name`` option per field of the flat dataclass ``cls`` (its default, its type and accepted
    values; a bool as ``--x/--no-x``; the field's :func:`option` doc as help). :func:`from_flags` reads them back."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name, doc = "--" + f.name.replace("_", "-"), f.metadata.get("doc", "") or None
        if hints[f.name] is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=doc)
        else:
            parser.add_argument(name, type=_flag_type(f, hints[f.name]), default=default, help=doc)


def _flag_type(f: dataclasses.Field, typ) -> Callable[[str], Any]:
    """argparse ``type`` of field ``f``: ``typ`` of the text, refused (a usage error) outside the accepted values."""
    def convert(text: str) -> Any:
        value = typ(text)
        problem = value_problem(f, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    convert.__name__ = getattr(typ, "__name__", "value")
    return convert


def from_flags(cls, args):
    """The ``cls`` instance of the options :func:`add_flags` added, from parsed ``args``."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


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
# Overrides


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


def flatten_keys(value: Any, prefix: str) -> list[str]:
    """Every dotted key of a nested mapping (sections and leaves)."""
    if not isinstance(value, dict):
        return []
    out = []
    for k, v in value.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.append(key)
        out.extend(flatten_keys(v, key))
    return out


def apply_overrides(data: dict, origins: dict[str, str], overrides: list[str]) -> None:
    """Set each ``key=value`` of ``overrides`` in ``data`` (in place), recording where every key came from."""
    for text in overrides:
        key, value = parse_override(text)
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
        origins[key] = f"override {text!r}"
        for i in range(1, len(parts)):
            origins.setdefault(".".join(parts[:i]), f"override {text!r}")
        for sub in flatten_keys(value, key):
            origins[sub] = f"override {text!r}"


# ---------------------------------------------------------------------------------------------
# Typed construction


def where(key: str, origins: dict[str, str]) -> str:
    """Origin of ``key`` (or of its closest parent) as ``"file:line: "`` / ``"override 'k=v': "``."""
    k = key
    while k:
        if k in origins:
            return origins[k] + ": "
        k = k.rpartition(".")[0]
    return ""


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
        raise ConfigError(f"{where(key, origins)}{key}: expected {_type_name(typ)}, got {value!r}")
    if is_dataclass(typ):
        if isinstance(value, typ):
            return value
        if value is None:
            return typ()
        if not isinstance(value, dict):
            raise ConfigError(f"{where(key, origins)}section {key!r} must be a mapping, got {value!r}")
        return build(typ, value, origins, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where(key, origins)}{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)[:1] or (Any,)
        return [_check(v, item, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(key, origins)}{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(typ) or (str, Any)
        return {_check(k, kt, f"{key}.{k}", origins): _check(v, vt, f"{key}.{k}", origins) for k, v in value.items()}
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where(key, origins)}{key}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where(key, origins)}{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):   # PyYAML (YAML 1.1) reads "5e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where(key, origins)}{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where(key, origins)}{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(typ)}")


def build(cls, data: dict, origins: Optional[dict[str, str]] = None, prefix: str = ""):
    """Construct dataclass ``cls`` from a mapping, strictly (unknown key, wrong type: ConfigError).

    ``origins``: dotted key -> where it was set (for messages); ``prefix``: dotted path of ``cls``.
    Missing fields take their defaults; a required field without a default must be present.
    """
    origins = origins or {}
    hints = typing.get_type_hints(cls)
    declared = {f.name: f for f in fields(cls)}
    names = list(declared)
    kw = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else \
                f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"{where(key, origins)}unknown config key {key!r}{hint}")
        kw[k] = _check(v, hints[k], key, origins)
        problem = value_problem(declared[k], kw[k])
        if problem:
            raise ConfigError(f"{where(key, origins)}{key} {problem}")
    try:
        obj = cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{where(prefix, origins)}section {prefix or cls.__name__!r}: {e}") from None
    except ValueError as e:     # a relation between fields (__post_init__): name the overrides it involves
        at = where(prefix, origins)
        set_by = sorted({origins[o] for o in (f"{prefix}.{k}" if prefix else str(k) for k in data)
                         if origins.get(o, "").startswith("override") and origins[o] + ": " != at})
        note = f" ({', '.join(set_by)})" if set_by else ""
        raise ConfigError(f"{at}{prefix or cls.__name__}: {e}{note}") from None
    return obj


__all__ = ["ConfigError", "Checked", "option", "accepted", "value_problem", "describe",
           "identity", "flag_options", "to_dict", "read_yaml", "parse_override",
           "flatten_keys", "apply_overrides", "where", "build"]
