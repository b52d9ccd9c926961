#!/usr/bin/env bash
# Online serving load on one GPU host: `vllm serve` of the Llama-3-8B shape (dummy weights, the tiny local
# tokenizer) with SINKS (S=4, W=4092), stock FLASH_ATTN (dense), or stock FLASH_ATTN with every layer given a
# 4096-token sliding window (sliding), then benchmarks/bench_serve.py: CHATS concurrent multi-turn streaming
# chats for DURATION seconds, 20% dropped mid-stream. Run once per mode, same host.
#   bash benchmarks/gpu/serve_load.sh sinks|dense|sliding OUTDIR [DURATION_S=240] [CHATS=256]
# Writes OUTDIR/serve_TAG.json (bench_serve.py's result) and OUTDIR/server_TAG.log (TAG: $TAG, default MODE).
# Environment: SHAPE (benchmarks/model_shapes.py), WINDOW, DTYPE, GPU_UTIL, BENCH_ARGS (more bench_serve.py
# options, e.g. growing chats: BENCH_ARGS="--user-words 280:1100 --until-prompt-tokens 32768 --max-tokens 64"),
# SERVER_ARGS (more vllm serve options), CLIENT=sessions (bench_sessions_http.py instead: CHATS live sessions
# over /v1/sessions, 20% of replies dropped; sinks only; writes OUTDIR/sessions_http.json); e.g. a CPU check:
#   VLLM_CPU_KVCACHE_SPACE=1 SHAPE=tiny WINDOW=200 DTYPE=float32 GPU_UTIL=0.3 bash ... sinks /tmp/o 20 8
set -u
MODE=$1
OUTDIR=$2
DURATION=${3:-240}
CHATS=${4:-256}
TAG=${TAG:-$MODE}
VLLM=${VLLM:-python3 -m vllm.entrypoints.cli.main}  # works where the `vllm` script is not on PATH
SW=None
[ "$MODE" = sliding ] && SW=$(( ${WINDOW:-4092} + 4 ))
MODEL=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from model_shapes import model_dir; \
print(model_dir('/tmp/vllm_sinks_models', '${SHAPE:-llama3-8b}', sliding_window=$SW))")
case $MODE in
  sinks) BACKEND=(--attention-backend SINKS --additional-config '{"sinks": {"sink_tokens": 4, "window_tokens": '"${WINDOW:-4092}"'}}') ;;
  dense|sliding) BACKEND=(--attention-backend FLASH_ATTN) ;;
  *) echo "MODE must be sinks, dense or sliding" >&2; exit 2 ;;
esac
mkdir -p "$OUTDIR"
SEQS=$CHATS
if [ "${CLIENT:-serve}" = sessions ]; then
  export VLLM_PLUGINS=sinks  # the endpoint plugin is opt-in
  # A live session waiting for input holds a request slot: CHATS sessions need more than CHATS slots.
  SEQS=$((2 * CHATS)); export VLLM_SINKS_MAX_SESSIONS=$CHATS
fi
t0=$(date +%s)
# shellcheck disable=SC2086
$VLLM serve "$MODEL" --load-format dummy --dtype "${DTYPE:-bfloat16}" --gpu-memory-utilization "${GPU_UTIL:-0.90}" --max-num-seqs "$SEQS" \
  --port 8000 --enable-prompt-tokens-details "${BACKEND[@]}" ${SERVER_ARGS:-} >"$OUTDIR/server_$TAG.log" 2>&1 &
PID=$!
ready=0
for _ in $(seq 1 400); do
  if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=2)" 2>/dev/null; then
    ready=1; break
  fi
  kill -0 $PID 2>/dev/null || break
  sleep 1
done
if [ $ready != 1 ]; then
  echo "server ($MODE) did not come up"; tail -40 "$OUTDIR/server_$TAG.log"; kill $PID 2>/dev/null; exit 1
fi
echo "server ($MODE) ready after $(( $(date +%s) - t0 )) s"
if [ "${CLIENT:-serve}" = sessions ]; then
  # shellcheck disable=SC2086
  python3 benchmarks/bench_sessions_http.py --base-url http://127.0.0.1:8000 --sessions "$CHATS" \
    --duration "$DURATION" --disconnect-rate 0.2 --allowed-token-ids 3:380 --out "$OUTDIR/sessions_http.json" ${BENCH_ARGS:-}
else
  # shellcheck disable=SC2086
  python3 benchmarks/bench_serve.py --base-url http://127.0.0.1:8000 --model "$MODEL" --chats "$CHATS" \
    --duration "$DURATION" --disconnect-rate 0.2 --allowed-token-ids 3:380 --server-pid $PID \
    --out "$OUTDIR/serve_$TAG.json" ${BENCH_ARGS:-}
fi
rc=$?
kill -INT $PID
wait $PID
grep -E "SINKS (attention backend|KV pool)|Maximum concurrency|GPU KV cache size" "$OUTDIR/server_$TAG.log" | head -5
exit $rc
