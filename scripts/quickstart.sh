#!/usr/bin/env bash
# Set up, serve a tiny locally built Llama with --attention-backend SINKS on 127.0.0.1, stream one reply
# through the openai client, show the server's SINKS log lines, stop the server.
#   usage: bash scripts/quickstart.sh        (PORT=8000 MODEL_DIR=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PORT=${PORT:-8000}
MODEL_DIR=${MODEL_DIR:-${TMPDIR:-/tmp}/vllm_sinks_tiny_llama}
LOG=${LOG:-${TMPDIR:-/tmp}/vllm_sinks_quickstart_server.log}
.venv/bin/python -m vllm_sinks.tiny_model "$MODEL_DIR" >/dev/null
echo "quickstart: starting vllm serve $MODEL_DIR --attention-backend SINKS on 127.0.0.1:$PORT (log: $LOG)"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} .venv/bin/vllm serve "$MODEL_DIR" \
  --host 127.0.0.1 --port "$PORT" --attention-backend SINKS \
  --additional-config '{"sinks": {"sink_tokens": 4, "window_tokens": 252}}' \
  --block-size 16 --gpu-memory-utilization 0.3 --max-num-seqs 16 --enforce-eager >"$LOG" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -40 "$LOG"; echo "quickstart: server exited"; exit 1; }
  sleep 1
done
echo "quickstart: server log names the backend:"
grep -E "SINKS attention backend|re-encoding rotary" "$LOG" | sed 's/^/    /'
.venv/bin/python examples/stream_chat.py --base-url "http://127.0.0.1:$PORT/v1" --model "$MODEL_DIR"
