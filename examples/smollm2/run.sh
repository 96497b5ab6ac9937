#!/usr/bin/env bash
# The real-model example, from nothing (README "more"; results and timings: docs/real-model.md):
#   1. set-up (venv, packages, CMake build) if needed,
#   2. SmolLM2-135M-Instruct imported into ~/.cache/dapo-mcore/models if missing, and the problems
#      (sums of three single-digit numbers: python -m dapo_mcore.tasks.digit_sums prepare),
#   3. the whole pipeline (generate -> mc -> critic -> advantage -> actor -> eval, plus the outcome-only
#      and RFT controls) with examples/smollm2/smollm2.yaml; the before/after table is in OUT/run/report.md.
# Usage: examples/smollm2/run.sh [OUT_DIR=runs/smollm2] [key=value ...]
#   env: TRAIN_PROBLEMS=16 EVAL_PROBLEMS=64 SEED=0 (problem counts and seed of the prepared sets)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$ROOT/scripts/setup.sh"
PY="${DAPO_VENV:-$ROOT/.venv}/bin/python"
OUT="${1:-runs/smollm2}"
shift || true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
start=$(date +%s)
echo "[smollm2] model + problems -> $OUT/setup"
"$PY" -m dapo_mcore.tasks.digit_sums prepare --out "$OUT/setup" --seed "${SEED:-0}" \
    --train-problems "${TRAIN_PROBLEMS:-16}" --eval-problems "${EVAL_PROBLEMS:-64}"
get() { "$PY" -c "import json,sys; print(json.load(open('$OUT/setup/setup.json'))['$1'])"; }
"$PY" -m dapo_mcore.cli run examples/smollm2/smollm2.yaml run.out_dir="$OUT/run" run.seed="${SEED:-0}" \
    model.policy="$(get model)" data.train="$(get train)" data.eval.heldout="$(get heldout)" "$@"
echo "[smollm2] done in $(( $(date +%s) - start )) s; report: $OUT/run/report.md"
