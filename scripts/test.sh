#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up if needed, then pytest.
#   scripts/test.sh            default suite (CPU, < ~20 min)
#   scripts/test.sh --slow     only the slow tests
#   scripts/test.sh --all      everything
# Extra arguments after the mode go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
VENV="${DAPO_VENV:-$ROOT/.venv}"
MARK=(-m "not slow")
case "${1:-}" in
  --slow) MARK=(-m "slow"); shift ;;
  --all) MARK=(); shift ;;
esac
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q "${MARK[@]}" "$@"
