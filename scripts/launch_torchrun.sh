#!/usr/bin/env bash
# Run any Megatron stage of dapo-mcore on this node of a (multi-node) torchrun job.
#
#   scripts/launch_torchrun.sh --nnodes 4 --node-rank 0 --master-addr node0 --nproc-per-node 8 \
#       --tp 8 --pp 4 -- dapo-mcore train-critic config.yaml
#   scripts/launch_torchrun.sh ... --dry-run -- dapo-mcore train-actor config.yaml   # print the command only
#
# Rendezvous (flag, else environment, else default):
#   --nnodes N          $NNODES, $SLURM_NNODES, 1
#   --node-rank R       $NODE_RANK, $SLURM_NODEID, 0
#   --master-addr A     $MASTER_ADDR, 127.0.0.1
#   --master-port P     $MASTER_PORT, 29500
#   --nproc-per-node G  $NPROC_PER_NODE, $SLURM_GPUS_ON_NODE, number of GPUs (nvidia-smi -L), 1
#   --python BIN        $PYTHON, python3
# Layout flags (the same everywhere: dapo-mcore plan, slurm_dapo.sbatch, the stage commands); each flag
# given is checked against the world size and appended, spelled the same, to the stage command:
#   --tp N --pp N --vpp N --dp N --sequence-parallel --micro-batch N --global-batch N --recompute none|full
#   (--dp is only checked: DP = nnodes * nproc-per-node / (TP * PP); it is not forwarded)
# Command after `--`: `python -m pkg.mod ARGS`, `-m pkg.mod ARGS`, `script.py ARGS` or any executable
# (`dapo-mcore train-critic CONFIG`, run with torchrun --no-python).
set -euo pipefail

die() { echo "launch_torchrun.sh: $*" >&2; exit 2; }
gpus() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1; }

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
PY=${PYTHON:-python3}
DRY=0 TP="" PP="" VPP="" DP="" SP=0 MB="" GB="" REC="" CMD=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --master-addr) MASTER_ADDR="$2"; shift 2 ;;
    --master-port) MASTER_PORT="$2"; shift 2 ;;
    --nproc-per-node) NPROC="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --tp) TP="$2"; shift 2 ;;
    --pp) PP="$2"; shift 2 ;;
    --vpp) VPP="$2"; shift 2 ;;
    --dp) DP="$2"; shift 2 ;;
    --sequence-parallel) SP=1; shift ;;
    --micro-batch) MB="$2"; shift 2 ;;
    --global-batch) GB="$2"; shift 2 ;;
    --recompute) REC="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; CMD=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help; the stage command goes after --)" ;;
  esac
done
[[ -n "$NPROC" ]] || NPROC=$(gpus)
[[ ${#CMD[@]} -gt 0 ]] || die "no command: put the stage command after --"
for pair in nnodes:NNODES nproc-per-node:NPROC master-port:MASTER_PORT tp:TP pp:PP vpp:VPP dp:DP \
            micro-batch:MB global-batch:GB; do
  v=${pair#*:}
  [[ -z "${!v}" || "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--${pair%%:*} must be a positive integer, got '${!v}'"
done
[[ "$NODE_RANK" =~ ^[0-9]+$ && $NODE_RANK -lt $NNODES ]] || die "--node-rank must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
[[ -z "$REC" || "$REC" == none || "$REC" == full ]] || die "--recompute must be none or full, got '$REC'"
WORLD=$((NNODES * NPROC)) T=${TP:-1} P=${PP:-1}
((WORLD % (T * P) == 0)) || die "TP x PP = $T x $P does not divide the world size $WORLD ($NNODES nodes x $NPROC)"
D=$((WORLD / (T * P)))
[[ -z "$DP" || "$DP" == "$D" ]] || die "--dp $DP != world / (TP x PP) = $WORLD / $((T * P)) = $D"
[[ -z "$VPP" || $P -ge 2 ]] || die "--vpp needs --pp >= 2"
[[ $SP -eq 0 || $T -ge 2 ]] || die "--sequence-parallel requires --tp > 1"
[[ -z "$GB" ]] || (( GB % (${MB:-1} * D) == 0 )) || die "--global-batch $GB is not a multiple of micro-batch x DP = ${MB:-1} x $D"

# the stage command -> torchrun's target
if [[ "$(basename -- "${CMD[0]}")" =~ ^python[0-9.]*$ ]]; then CMD=("${CMD[@]:1}"); fi
[[ ${#CMD[@]} -gt 0 ]] || die "no module or script after python"
TARGET=()
if [[ "${CMD[0]}" == -m || "${CMD[0]}" == *.py ]]; then TARGET=("${CMD[@]}"); else TARGET=(--no-python "${CMD[@]}"); fi
LAYOUT=()
[[ -n "$TP" ]] && LAYOUT+=(--tp "$TP")
[[ -n "$PP" ]] && LAYOUT+=(--pp "$PP")
[[ -n "$VPP" ]] && LAYOUT+=(--vpp "$VPP")
[[ $SP -eq 1 ]] && LAYOUT+=(--sequence-parallel)
[[ -n "$MB" ]] && LAYOUT+=(--micro-batch "$MB")
[[ -n "$GB" ]] && LAYOUT+=(--global-batch "$GB")
[[ -n "$REC" ]] && LAYOUT+=(--recompute "$REC")

FULL=("$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
      --master-port "$MASTER_PORT" --nproc-per-node "$NPROC" "${TARGET[@]}" "${LAYOUT[@]}")
if [[ $DRY -eq 1 ]]; then
  printf '%q ' "${FULL[@]}" | sed 's/ $//'; echo
  echo "# world $WORLD = TP $T x PP $P x DP $D; node $NODE_RANK of $NNODES"
  exit 0
fi
exec "${FULL[@]}"
