"""The package's import structure, read from its own imports (function-local ones included): no cycles, at
most 8 levels, the stages of the stage table are peers (none imports another), and the layers below them
import no stage, no task, no orchestration. A folder (or a top-level module) of dapo_mcore is one node;
scripts/ is one node too."""
from __future__ import annotations

import ast
from pathlib import Path

from dapo_mcore.run.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "dapo_mcore"
BASE = ("config", "data", "packing", "parallel", "ops", "models", "training", "rollout", "verify", "_C")
ABOVE_STAGES = ("run", "cli", "tasks")


def _node(path: Path) -> str:
    if path.is_relative_to(PKG):
        return path.relative_to(PKG).parts[0].removesuffix(".py")
    return "scripts"


def import_graph() -> dict[str, set[str]]:
    """node -> the nodes it imports."""
    graph: dict[str, set[str]] = {}
    for f in [*PKG.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        src = _node(f)
        deps = graph.setdefault(src, set())
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                names = [n.module] if n.module != "dapo_mcore" else [f"dapo_mcore.{a.name}" for a in n.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "dapo_mcore" and len(parts) > 1 and parts[1] != src:
                    deps.add(parts[1])
    return graph


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """1 for a node that imports nothing of the package, else 1 + the highest level it imports; raises on a
    cycle."""
    out: dict[str, int] = {}

    def level(n: str, stack: tuple[str, ...]) -> int:
        if n in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(n):] + (n,))}")
        if n not in out:
            out[n] = 1 + max((level(d, stack + (n,)) for d in graph.get(n, ())), default=0)
        return out[n]

    for n in graph:
        level(n, ())
    return out


def test_no_cycles_and_at_most_eight_levels():
    lv = levels(import_graph())
    by_level = {k: sorted(n for n, v in lv.items() if v == k) for k in sorted(set(lv.values()))}
    assert max(lv.values()) <= 8, by_level
    assert lv["cli"] == max(lv.values()), by_level


def test_stages_are_peers_and_the_base_imports_no_stage():
    graph = import_graph()
    stages = {s.run.__module__.split(".")[1] for s in STAGES}
    assert stages >= {"generate", "mc", "critic", "advantage", "actor", "sft", "eval"}
    for s in stages:
        assert not graph[s] & (stages - {s}), f"stage package {s} imports stage packages {graph[s] & stages}"
        assert not graph[s] & set(ABOVE_STAGES), f"stage package {s} imports {graph[s] & set(ABOVE_STAGES)}"

    def reach(n: str, seen: set[str]) -> set[str]:
        for d in graph.get(n, ()):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    for b in BASE:
        bad = reach(b, set()) & (stages | set(ABOVE_STAGES))
        assert not bad, f"{b} reaches {sorted(bad)}"
    assert "cli" not in reach("scripts", set())


def test_every_subpackage_is_packaged():
    """pyproject.toml lists every package directory (a non-editable install would miss the others)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "dapo_mcore").rglob("__init__.py")}
    assert found - listed == set(), f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"


def test_the_worked_example_of_adding_a_stage_still_applies(tmp_path):
    """docs/architecture.md shows the whole diff that adds a stage; it must apply to today's tree (``git apply
    --check``: the table's context lines, and the new package not existing yet)."""
    import shutil
    import subprocess

    text = (ROOT / "docs" / "architecture.md").read_text()
    diff = text.split("```diff\n", 1)[1].split("\n```", 1)[0] + "\n"
    (tmp_path / "passrate.diff").write_text(diff)
    git = shutil.which("git")
    assert git, "git is needed to check the worked example"
    r = subprocess.run([git, "apply", "--check", str(tmp_path / "passrate.diff")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "dapo_mcore/passrate/stage.py" in diff and "class PassRateConfig(Checked)" in diff
