#!/usr/bin/env bash
# One-command set-up from a fresh clone: a venv in .venv, the pinned CPU torch,
# megatron-core 0.16.x and the rest (pyproject.toml), then the CMake build of csrc/.
# Idempotent: a finished set-up is detected by a stamp and skipped. Also unpacks the GPU image's triton
# (3.6.0) into .venv/image-triton for the compile check (tests/test_kernels_compile.py).
# Usage: scripts/setup.sh [--force] [--gpu]   (--gpu adds transformer-engine/flash-attn)
#        scripts/setup.sh --sglang [--force]   a separate venv with the real SGLang 0.5.23 server for
#          CPUs (default $ROOT/.venv-sglang, or $DAPO_SGLANG_VENV): torch==2.13.0, the pinned list
#          scripts/sglang-cpu-requirements.txt, sglang==0.5.23 (--no-deps), sglang-router 0.3.2, and
#          the two stand-ins of scripts/sglang_cpu/ (sgl_kernel, torchvision) copied into its
#          site-packages. Used by the fleet (dapo_mcore/rollout/fleet.py) and scripts/test.sh --sglang.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DAPO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
FORCE=0; EXTRAS="dev"; SGLANG=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    --gpu) EXTRAS="dev,gpu" ;;
    --sglang) SGLANG=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

if [[ $SGLANG == 1 ]]; then
  SVENV="${DAPO_SGLANG_VENV:-$ROOT/.venv-sglang}"
  REQ="$ROOT/scripts/sglang-cpu-requirements.txt"
  SSTAMP="$SVENV/.dapo-sglang-setup-$(cat "$REQ" "$ROOT"/scripts/sglang_cpu/*/*.py | sha1sum | cut -c1-12)"
  if [[ $FORCE == 0 && -f "$SSTAMP" ]]; then exit 0; fi
  if [[ ! -x "$SVENV/bin/python" ]]; then
    echo "[setup --sglang] creating venv at $SVENV"
    "$PY" -m venv "$SVENV"
  fi
  SPY="$SVENV/bin/python"
  "$SPY" -m pip install -q --upgrade pip
  echo "[setup --sglang] installing torch==2.13.0 and the pinned SGLang CPU dependencies"
  "$SPY" -m pip install -q "${DAPO_TORCH_SPEC:-torch==2.13.0}"
  "$SPY" -m pip install -q -r "$REQ"
  # --no-deps: a resolved `pip install sglang` pulls ~207 packages with CUDA builds.
  echo "[setup --sglang] installing sglang==0.5.23 (--no-deps) and sglang-router==0.3.2"
  "$SPY" -m pip install -q --no-deps "sglang==0.5.23"
  "$SPY" -m pip install -q "sglang-router==0.3.2"
  SITE="$("$SPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  for pkg in sgl_kernel torchvision; do
    rm -rf "${SITE:?}/$pkg"
    cp -r "$ROOT/scripts/sglang_cpu/$pkg" "$SITE/$pkg"
  done
  "$SPY" -c 'import sgl_kernel, torchvision, sglang.srt.entrypoints.http_server; assert sgl_kernel.STANDIN'
  rm -f "$SVENV"/.dapo-sglang-setup-*
  touch "$SSTAMP"
  echo "[setup --sglang] done: $SVENV"
  exit 0
fi
# The triton of the GPU image scripts/gpu_check.sh runs on (torch 2.11's pin, docs/gpu.md), unpacked apart
# from the venv's own: tests/test_kernels_compile.py compiles the selectable kernel configurations with it too
# (PYTHONPATH=$VENV/image-triton), since register allocation and so spills differ between triton releases.
IMAGE_TRITON="${DAPO_IMAGE_TRITON:-3.6.0}"
image_triton() {
  local dir="$VENV/image-triton"
  [[ -f "$dir/.triton-$IMAGE_TRITON" ]] && return 0
  echo "[setup] unpacking triton==$IMAGE_TRITON (the GPU image's) into $dir"
  rm -rf "$dir"
  "$VENV/bin/python" -m pip install -q --no-deps --no-compile --target "$dir" "triton==$IMAGE_TRITON"
  touch "$dir/.triton-$IMAGE_TRITON"
}

STAMP="$VENV/.dapo-setup-$(cat "$ROOT/pyproject.toml" "$ROOT/CMakeLists.txt" "$ROOT"/csrc/* | sha1sum | cut -c1-12)"
if [[ $FORCE == 0 && -f "$STAMP" ]]; then image_triton; exit 0; fi

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
image_triton
rm -f "$VENV"/.dapo-setup-*
touch "$STAMP"
echo "[setup] done: $VENV"
