"""CLI: help everywhere, overrides, one-line user errors, plan forwarding, and stage caching (finished stages
skipped, damaged outputs recomputed, interrupted stages resumed, changed configs recomputed)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dapo_mcore.cli import main
from dapo_mcore.data.shards import iter_records, load_manifest
from dapo_mcore.run.stages import COMMANDS as STAGE_COMMANDS

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["run", *STAGE_COMMANDS, "export", "report"]

CFG = """\
run:
  out_dir: {out}
  stages: [generate, mc]
toy:
  train_problems: 4
  eval_problems: 4
  sft_steps: 20
generate: {{num_samples: 4, keep: 2, max_new_tokens: 40, shard_size: 2, show_progress: false}}
mc: {{num_completions: 2, max_new_tokens: 30, shard_size: 6, show_progress: false}}
"""


@pytest.mark.parametrize("cmd", [[], *[[c] for c in COMMANDS]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: dapo-mcore" in out
    if cmd and cmd[0] != "export":
        assert "key=value" in out


@pytest.mark.parametrize("command", list(STAGE_COMMANDS))
def test_stage_help_lists_its_config_keys_from_the_dataclass(command, capsys):
    """A stage's --help is generated from its config dataclass: every key with its type and default, the keys
    the pipeline fills with where they come from, and (distributed stages) the launchers' layout flags."""
    import dataclasses

    stage = STAGE_COMMANDS[command]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(stage.config):
        assert f"{stage.section}.{f.name}" in out, f.name
    for key in stage.fills:
        assert f"{stage.section}.{key}: " in out and "set by the pipeline: " in out
    if command == "train-critic":
        assert "critic.lr: float = 5e-06\n      peak learning rate" in out
        assert "critic.parallel.fast_paths.mode: str = 'auto'" in out
        assert "--tp N" in out and "--global-batch N" in out
    if not stage.distributed:
        assert "--tp" not in out


def test_console_entry_help():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "dapo_mcore.cli", "--help"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "train-critic" in p.stdout and "Traceback" not in p.stderr


def _cfg(tmp_path, out=None) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(CFG.format(out=out or tmp_path / "run"))
    return p


def test_bad_key_is_one_clear_line(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    assert main(["run", str(cfg), "mc.num_completion=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "unknown config key 'mc.num_completion'" in err and "did you mean 'mc.num_completions'" in err
    cfg.write_text(cfg.read_text().replace("  sft_steps: 20", "  sft_step: 20"))
    assert main(["generate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:7: unknown config key 'toy.sft_step'" in err and "did you mean 'toy.sft_steps'" in err


def test_bad_value_of_a_late_stage_stops_the_run_before_any_compute(tmp_path, capsys):
    """actor.beta is read by stage 5; the run refuses it when it reads the config, before the toy build and
    stages 1-4 (hours at scale), with the key, the accepted values and where the value came from."""
    cfg = _cfg(tmp_path)
    cfg.write_text(cfg.read_text() + "actor:\n  beta: -0.5\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{cfg}:11: actor.beta must be > 0, got -0.5" in err
    assert not (tmp_path / "run").exists()                  # nothing built, nothing written
    cfg.write_text(cfg.read_text().replace("beta: -0.5", "beta: 0.1"))
    assert main(["run", str(cfg), "generate.keep=5"]) == 2
    err = capsys.readouterr().err
    assert "generate: keep (M=5) must be <= num_samples (K=4) (override 'generate.keep=5')" in err
    assert not (tmp_path / "run").exists()


def test_missing_inputs_are_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{out_dir: {tmp_path / 'r'}}}\nmodel: {{policy: {tmp_path / 'nomodel'}}}\n"
                   f"data: {{train: {tmp_path / 'none.jsonl'}}}\n")
    assert main(["generate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "data.train" in err and "no such problem-set file" in err and "Traceback" not in err


def test_plan_and_import_model_are_forwarded(monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "dapo_mcore.plan", types.SimpleNamespace(main=lambda argv: seen.append(argv)))
    monkeypatch.setitem(sys.modules, "dapo_mcore.models.importer",
                        types.SimpleNamespace(main=lambda argv: seen.append(argv) or 3))
    assert main(["plan", "--model", "x", "--tp", "2"]) == 0
    assert main(["import-model", "--list"]) == 3          # the forwarded command's exit code
    assert seen == [["--model", "x", "--tp", "2"], ["--list"]]


# ------------------------------------------------------------------------------------------ caching


def _timings(run: Path) -> dict:
    return {k.split("/")[1]: v["status"] for k, v in json.loads((run / "timings.json").read_text()).items()}


def _mc_records(run: Path) -> list:
    return list(iter_records(run / "iter_0" / "mc"))


def test_stage_caching(tmp_path, capsys):
    """One run, then in turn: re-run skips; a corrupt shard is recomputed; an interrupted stage resumes;
    a changed config recomputes; a stage whose input is missing refuses to run."""
    cfg, run = _cfg(tmp_path), tmp_path / "run"
    assert main(["run", str(cfg)]) == 0
    assert _timings(run) == {"generate": "ran", "mc": "ran"}
    ref = _mc_records(run)
    mc = run / "iter_0" / "mc"

    before = {p: p.stat().st_mtime_ns for p in (run / "iter_0").rglob("shard-*")}
    assert main(["run", str(cfg)]) == 0
    assert _timings(run) == {"generate": "skipped", "mc": "skipped"}
    assert {p: p.stat().st_mtime_ns for p in (run / "iter_0").rglob("shard-*")} == before
    assert "resolved config" in capsys.readouterr().out
    assert (run / "config.yaml").is_file() and (run / "report.md").is_file()

    shard = mc / "shard-00001.parquet"               # corrupt: same size, different content
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["run", str(cfg)]) == 0
    assert _timings(run) == {"generate": "skipped", "mc": "ran"}
    assert json.loads((mc / "summary.json").read_text())["shards_computed"] == 1
    assert _mc_records(run) == ref                   # the recomputed shard is identical (seeded)

    # what a kill during shard 1 leaves: stamp unfinished, manifest incomplete without shard 1
    st = json.loads((mc / "stage.json").read_text())
    (mc / "stage.json").write_text(json.dumps({**st, "finished": False}))
    m = load_manifest(mc)
    n = len(m["shards"])
    del m["shards"]["00001"]
    m["complete"] = False
    (mc / "manifest.json").write_text(json.dumps(m))
    shard.unlink()
    assert main(["mc", str(cfg)]) == 0
    s = json.loads((mc / "summary.json").read_text())
    assert (s["shards"], s["shards_computed"]) == (n, 1)
    assert _mc_records(run) == ref

    assert main(["mc", str(cfg), "mc.num_completions=3"]) == 0
    assert _timings(run)["mc"] == "ran"
    assert all(r["num_completions"] == 3 for r in _mc_records(run) if not r["terminal"])
    assert main(["generate", str(cfg)]) == 0 and _timings(run)["generate"] == "skipped"
    shutil.rmtree(run / "iter_0" / "generate")
    capsys.readouterr()
    assert main(["mc", str(cfg)]) == 2
    assert "input stage 'generate' has not finished" in capsys.readouterr().err
