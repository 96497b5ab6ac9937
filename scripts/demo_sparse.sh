#!/usr/bin/env bash
# The sparse-reward demo (issue #17; `scripts/demo.sh --sparse`), from nothing:
#   1. set-up if needed,
#   2. the sparse chain task (8-10 steps; the reference drops a needed carry 85% of the time) and its
#      reference policy (python -m dapo_mcore.tasks.sparse prepare; reused when already built),
#   3. per seed one `dapo-mcore run examples/demo/sparse.yaml`: DAPO with the learned critic, outcome-only
#      advantages and RFT at the same generation budget, and iterative DAPO (a second iteration, which
#      samples again: its budget is printed apart),
#   4. the table over seeds with Wilson intervals, paired differences, the budget and RESULT lines
#      (<out>/RESULTS.md). The RESULT time counts steps 3-4 (the demo from a prepared reference).
# Usage: scripts/demo_sparse.sh [OUT_DIR=runs/sparse]   env: SEEDS="0 1 2", JOBS=3, DEMO_OVERRIDES="k=v ..."
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
PY="${DAPO_VENV:-$ROOT/.venv}/bin/python"
OUT="${1:-runs/sparse}"
SEEDS="${SEEDS:-0 1 2}"
JOBS="${JOBS:-3}"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
echo "[sparse] preparing task and reference policy in $OUT/setup"
"$PY" -m dapo_mcore.tasks.sparse prepare --out "$OUT/setup"
get() { "$PY" -c "import json,sys; print(json.load(open('$OUT/setup/setup.json'))['$1'])"; }
REF=$(get reference); TRAIN=$(get train); HELD=$(get heldout)
start=$(date +%s)
pids=()
for s in $SEEDS; do
  echo "[sparse] seed $s -> $OUT/seed$s (log: $OUT/seed$s.log)"
  mkdir -p "$OUT"
  "$PY" -m dapo_mcore.cli run examples/demo/sparse.yaml run.out_dir="$OUT/seed$s" run.seed="$s" \
      model.policy="$REF" data.train="$TRAIN" data.eval.heldout="$HELD" ${DEMO_OVERRIDES:-} \
      > "$OUT/seed$s.log" 2>&1 &
  pids+=($!)
  if (( ${#pids[@]} >= JOBS )); then wait "${pids[0]}" || { echo "[sparse] a seed failed; see its log"; exit 1; }; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || { echo "[sparse] a seed failed; see its log"; exit 1; }; done
secs=$(( $(date +%s) - start ))
"$PY" -m dapo_mcore.tasks.sparse table $(for s in $SEEDS; do echo "$OUT/seed$s"; done) --seconds "$secs" | tee "$OUT/RESULTS.md"
echo "[sparse] done in $secs s from the prepared reference; per-seed reports: $OUT/seed*/report.md"
