#!/usr/bin/env bash
# One-command set-up from a fresh clone: a venv in .venv, the pinned CPU torch,
# megatron-core 0.16.x and the rest (pyproject.toml), then the CMake build of csrc/.
# Idempotent: a finished set-up is detected by a stamp and skipped.
# Usage: scripts/setup.sh [--force] [--gpu]   (--gpu adds transformer-engine/flash-attn)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DAPO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
FORCE=0; EXTRAS="dev"
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    --gpu) EXTRAS="dev,gpu" ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done
STAMP="$VENV/.dapo-setup-$(cat "$ROOT/pyproject.toml" "$ROOT/CMakeLists.txt" "$ROOT"/csrc/* | sha1sum | cut -c1-12)"
if [[ $FORCE == 0 && -f "$STAMP" ]]; then exit 0; fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC="${DAPO_TORCH_SPEC:-torch==2.13.0}"
echo "[setup] installing $TORCH_SPEC"
"$VPY" -m pip install -q "$TORCH_SPEC"
echo "[setup] installing dapo-mcore[$EXTRAS] (editable)"
"$VPY" -m pip install -q -e "$ROOT[$EXTRAS]"
echo "[setup] building csrc/ with CMake"
"$VPY" -m dapo_mcore.build_ops
rm -f "$VENV"/.dapo-setup-*
touch "$STAMP"
echo "[setup] done: $VENV"
