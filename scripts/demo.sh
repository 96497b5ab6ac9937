#!/usr/bin/env bash
# The CPU demo, from nothing (README's main command):
#   1. set-up (venv, packages, CMake build) if needed,
#   2. a synthetic multi-step task, a tokenizer and a reference policy trained locally (megatron SFT),
#   3. the whole DAPO pipeline (generate -> mc -> critic -> advantage -> actor -> eval, plus the
#      outcome-only and RFT controls) for each seed, all seeds at once (JOBS) on the two cores,
#   4. the before/after table over seeds (also written to <out>/RESULTS.md).
# Usage: scripts/demo.sh [OUT_DIR=runs/demo]   env: SEEDS="0 1 2", JOBS=3, extra key=value overrides in DEMO_OVERRIDES
#        scripts/demo.sh --sparse [OUT_DIR=runs/sparse]   the sparse-reward variant (scripts/demo_sparse.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${1:-}" == "--sparse" ]]; then shift; exec "$ROOT/scripts/demo_sparse.sh" "$@"; fi
"$ROOT/scripts/setup.sh"
PY="${DAPO_VENV:-$ROOT/.venv}/bin/python"
OUT="${1:-runs/demo}"
SEEDS="${SEEDS:-0 1 2}"
JOBS="${JOBS:-3}"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
start=$(date +%s)
echo "[demo] preparing task and reference policy in $OUT/setup"
"$PY" -m dapo_mcore.tasks.demo prepare --out "$OUT/setup"
get() { "$PY" -c "import json,sys; print(json.load(open('$OUT/setup/setup.json'))['$1'])"; }
REF=$(get reference); TRAIN=$(get train); HELD=$(get heldout)
pids=()
for s in $SEEDS; do
  echo "[demo] seed $s -> $OUT/seed$s (log: $OUT/seed$s.log)"
  mkdir -p "$OUT"
  "$PY" -m dapo_mcore.cli run examples/demo/demo.yaml run.out_dir="$OUT/seed$s" run.seed="$s" \
      model.policy="$REF" data.train="$TRAIN" data.eval.heldout="$HELD" ${DEMO_OVERRIDES:-} \
      > "$OUT/seed$s.log" 2>&1 &
  pids+=($!)
  if (( ${#pids[@]} >= JOBS )); then wait "${pids[0]}" || { echo "[demo] a seed failed; see its log"; exit 1; }; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || { echo "[demo] a seed failed; see its log"; exit 1; }; done
"$PY" -m dapo_mcore.tasks.demo table $(for s in $SEEDS; do echo "$OUT/seed$s"; done) | tee "$OUT/RESULTS.md"
echo "[demo] done in $(( $(date +%s) - start )) s; per-seed reports: $OUT/seed*/report.md"
