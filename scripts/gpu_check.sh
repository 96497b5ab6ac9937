#!/usr/bin/env bash
# The prepared device check of the kernels (docs/gpu.md): one run of <= 8 minutes on a lent H100/H200.
#
#   scripts/gpu_check.sh --prepare   here, once: download the wheels the device image lacks (megatron-core
#                                    0.16.1; Liger and Cut Cross-Entropy for the comparison) into .gpu_carry/
#                                    (git-ignored, ~3.5 MB): name it in the device tool's carry
#   scripts/gpu_check.sh --dry-run   here / CI: the same script on CPU, tiny shapes, Triton interpreted
#   scripts/gpu_check.sh             on the device: install .gpu_carry/*.whl into /tmp/site, run, write
#                                    $OUT/gpu_check.json and RESULT lines (extra arguments go to gpu_check.py)
# On the device (image: Python 3.12, torch 2.11 + CUDA, triton 3.6, transformers; nothing else installed):
#   run(command="bash scripts/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log", carry=[".gpu_carry"], timeout_s=560)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$ROOT/.gpu_carry"
WHEELS=(megatron-core==0.16.1 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
case "${1:-}" in
  -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
  --prepare)
    PY="${PYTHON:-$ROOT/.venv/bin/python}"
    mkdir -p "$CARRY"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY" "${WHEELS[@]}"
    ls -la "$CARRY"; du -sh "$CARRY"
    exit 0 ;;
  --dry-run)
    shift
    exec "${PYTHON:-$ROOT/.venv/bin/python}" "$ROOT/scripts/gpu_check.py" --dry-run "$@" ;;
esac
PY="${PYTHON:-python3}"
if compgen -G "$CARRY/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check.sh: no wheels in $CARRY (run --prepare here and carry .gpu_carry): megatron part will fail" >&2
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
exec timeout 500 "$PY" "$ROOT/scripts/gpu_check.py" --out "${OUT:-$ROOT/runs/gpu_check}" "$@"
