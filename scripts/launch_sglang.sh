#!/usr/bin/env bash
# Launch K SGLang servers for one HF checkpoint (each with TP x DP GPUs) behind an sglang-router
# with cache-aware routing, for the rollout stages' `--backend sglang --url http://HOST:ROUTER_PORT`.
#
#   scripts/launch_sglang.sh --model /ckpt/qwen2.5-math-7b-instruct --servers 4 --tp 2 --dp 1
#   scripts/launch_sglang.sh --model /ckpt --servers 2 --dry-run     # print the exact commands only
#
# Options:
#   --model PATH         HF checkpoint directory (required)
#   --servers K          number of SGLang servers (default 1)
#   --tp N / --dp N      tensor / data parallel size per server (default 1 / 1); server i gets GPUs
#                        i*TP*DP .. (i+1)*TP*DP-1 via CUDA_VISIBLE_DEVICES
#   --host H             bind address (default 127.0.0.1)
#   --base-port P        server i listens on P+i (default 30001)
#   --router-port P      router port (default 30000); with --servers 1 no router is started
#                        unless --router is given
#   --router             start the router even for one server
#   --mem-fraction F     --mem-fraction-static (default 0.85)
#   --log-dir DIR        logs and pids (default ./sglang-logs)
#   --python BIN         python with sglang installed (default: python3)
#   --dry-run            print the commands and exit
#   -- ARGS...           extra arguments passed to every sglang.launch_server
# Servers keep the radix cache on (SGLang's default) and use --schedule-policy lpm (longest prefix
# match first) so the N completions of a state reuse its prefix.
set -euo pipefail

MODEL="" SERVERS=1 TP=1 DP=1 HOST=127.0.0.1 BASE_PORT=30001 ROUTER_PORT=30000 ROUTER=0
MEM=0.85 LOG_DIR=./sglang-logs PY=python3 DRY=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --servers) SERVERS="$2"; shift 2 ;;
    --tp) TP="$2"; shift 2 ;;
    --dp) DP="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --base-port) BASE_PORT="$2"; shift 2 ;;
    --router-port) ROUTER_PORT="$2"; shift 2 ;;
    --router) ROUTER=1; shift ;;
    --mem-fraction) MEM="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "launch_sglang.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$MODEL" ]] || { echo "launch_sglang.sh: --model is required" >&2; exit 2; }
for pair in servers:SERVERS tp:TP dp:DP base-port:BASE_PORT router-port:ROUTER_PORT; do
  v=${pair#*:}
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "launch_sglang.sh: --${pair%%:*} must be a positive integer, got '${!v}'" >&2; exit 2; }
done
[[ $SERVERS -gt 1 ]] && ROUTER=1

GPUS_PER=$((TP * DP))
SERVER_CMDS=() URLS=()
for ((i = 0; i < SERVERS; i++)); do
  first=$((i * GPUS_PER))
  devs=$(seq -s, "$first" $((first + GPUS_PER - 1)))
  port=$((BASE_PORT + i))
  URLS+=("http://$HOST:$port")
  cmd="CUDA_VISIBLE_DEVICES=$devs $PY -m sglang.launch_server --model-path $(printf %q "$MODEL") --host $HOST --port $port --tp-size $TP --dp-size $DP --mem-fraction-static $MEM --schedule-policy lpm"
  for a in "${EXTRA[@]}"; do cmd+=" $(printf %q "$a")"; done
  SERVER_CMDS+=("$cmd")
done
ROUTER_CMD="sglang-router launch --host $HOST --port $ROUTER_PORT --worker-urls ${URLS[*]} --policy cache_aware --prometheus-host $HOST"

if [[ $DRY -eq 1 ]]; then
  printf '%s\n' "${SERVER_CMDS[@]}"
  [[ $ROUTER -eq 1 ]] && echo "$ROUTER_CMD"
  echo "# rollout backend url: http://$HOST:$([[ $ROUTER -eq 1 ]] && echo "$ROUTER_PORT" || echo "$BASE_PORT")"
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < SERVERS; i++)); do
  bash -c "exec ${SERVER_CMDS[$i]}" >"$LOG_DIR/server-$i.log" 2>&1 &
  PIDS+=($!)
  echo "$!" >"$LOG_DIR/server-$i.pid"
  echo "server $i: ${URLS[$i]} (pid $!, log $LOG_DIR/server-$i.log)"
done
for u in "${URLS[@]}"; do
  until curl -sf "$u/health" >/dev/null; do
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a server exited; see $LOG_DIR" >&2; exit 1; }; done
    sleep 2
  done
  echo "healthy: $u"
done
if [[ $ROUTER -eq 1 ]]; then
  bash -c "exec $ROUTER_CMD" >"$LOG_DIR/router.log" 2>&1 &
  PIDS+=($!)
  echo "$!" >"$LOG_DIR/router.pid"
  until curl -sf "http://$HOST:$ROUTER_PORT/health" >/dev/null; do sleep 1; done
  echo "router: http://$HOST:$ROUTER_PORT"
fi
echo "ready; Ctrl-C stops everything"
wait
