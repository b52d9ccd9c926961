#!/usr/bin/env bash
# Two SINKS replicas sharing one GPU behind `python -m vllm_sinks.routing` (docs/replicas.md), side by side:
#   1. affinity      CHATS growing chats (bench_serve.py) for DURATION s behind chat affinity;
#   2. power-of-two  CHATS new chats behind stock routing (the less loaded of two random replicas), same replicas;
#   3. kill          CHATS new chats behind chat affinity, replica 2 killed (SIGKILL, every process of it)
#                    KILL_AT s into the load.
# Every run's chats are new to the replicas (their own ids, so their own messages). Growing chats: user
# messages of 280-1,100 words, replies of 64 tokens, 20% dropped mid-stream, each chat until its prompt
# passed 32,768 tokens: far past the window, so a turn that lands on the replica without the chat's state
# re-prefills its whole history.
#   bash benchmarks/gpu/replicas.sh OUT [DURATION=90] [CHATS=64] [KILL_AT=30]
# Writes OUT/serve_{affinity,power-of-two,kill}.json (bench_serve.py), OUT/replica_*.log, OUT/router_*.log,
# OUT/router_metrics_*.txt and OUT/replicas_summary.json. Environment: SHAPE (benchmarks/model_shapes.py,
# default llama3-8b), WINDOW (4092), DTYPE (bfloat16), GPU_UTIL (per replica, 0.44), SERVER_ARGS, BENCH_ARGS,
# LOADS (which of the three loads, default "affinity power-of-two kill");
# a CPU check: VLLM_CPU_KVCACHE_SPACE=1 SHAPE=tiny WINDOW=200 DTYPE=float32 \
#   BENCH_ARGS="--user-words 20:60 --until-prompt-tokens 8000 --max-tokens 16 --block-size 128" bash ... /tmp/o 40 8 15
set -u
OUT=${1:?usage: bash benchmarks/gpu/replicas.sh OUT [DURATION] [CHATS] [KILL_AT]}
DURATION=${2:-90}
CHATS=${3:-64}
KILL_AT=${4:-30}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
VLLM=${VLLM:-python3 -m vllm.entrypoints.cli.main}
MODEL=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from model_shapes import model_dir; \
print(model_dir('/tmp/vllm_sinks_models', '${SHAPE:-llama3-8b}'))")
SINKS='{"sinks": {"sink_tokens": 4, "window_tokens": '"${WINDOW:-4092}"'}}'
BENCH=${BENCH_ARGS:---user-words 280:1100 --until-prompt-tokens 32768 --max-tokens 64}
pids=()

up() {  # port: wait for /health
  for _ in $(seq 1 400); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$1/health', timeout=2)" 2>/dev/null && return 0
    sleep 1
  done
  return 1
}

replica() {  # port: one SINKS server in its own process group (so that all of it can be killed)
  # shellcheck disable=SC2086
  setsid $VLLM serve "$MODEL" --load-format dummy --dtype "${DTYPE:-bfloat16}" --port "$1" \
    --gpu-memory-utilization "${GPU_UTIL:-0.44}" --max-num-seqs "$CHATS" --enable-prompt-tokens-details \
    --attention-backend SINKS --additional-config "$SINKS" ${SERVER_ARGS:-} >"$OUT/replica_$1.log" 2>&1 &
  pids+=($!)
  local t0=$SECONDS
  if ! up "$1"; then echo "replica $1 did not come up"; tail -30 "$OUT/replica_$1.log"; cleanup; exit 1; fi
  echo "replica $1 ready after $((SECONDS - t0)) s"
}

cleanup() { for p in "${pids[@]}"; do kill -9 -- "-$p" 2>/dev/null; done; }
trap cleanup EXIT

# One after the other: the second replica profiles its memory with the first one's already taken.
replica 8001
replica 8002

metrics() {  # file: the router's /metrics
  python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9000/metrics', timeout=5).read().decode())" >"$1" 2>&1
}

load() {  # name policy first_chat [kill_at]
  python3 -m vllm_sinks.routing --replica http://127.0.0.1:8001 --replica http://127.0.0.1:8002 --port 9000 \
    --policy "$2" --health-interval 2 >"$OUT/router_$1.log" 2>&1 &
  local router=$!
  up 9000 || { echo "router did not come up"; cat "$OUT/router_$1.log"; exit 1; }
  if [ -n "${4:-}" ]; then
    (sleep "$4"; metrics "$OUT/router_metrics_$1_before_kill.txt"
     kill -9 -- "-${pids[1]}"; echo "replica 8002 killed at +$4 s") &
  fi
  # shellcheck disable=SC2086
  python3 benchmarks/bench_serve.py --base-url http://127.0.0.1:9000 --model "$MODEL" --chats "$CHATS" \
    --first-chat "$3" --duration "$DURATION" --disconnect-rate 0.2 --allowed-token-ids 3:380 --window-s 15 \
    --sample-s 5 --out "$OUT/serve_$1.json" $BENCH >"$OUT/bench_$1.log" 2>&1
  metrics "$OUT/router_metrics_$1.txt"
  kill "$router"; wait "$router" 2>/dev/null
  echo "$1 ($2): done"
}

for name in ${LOADS:-affinity power-of-two kill}; do
  case $name in
    affinity) load affinity affinity 0 ;;
    power-of-two) load power-of-two power-of-two 1000 ;;
    kill) load kill affinity 2000 "$KILL_AT" ;;
  esac
done

python3 - "$OUT" "$KILL_AT" <<'EOF' | tee "$OUT/replicas_summary.json"
import json, re, sys
out, kill_at = sys.argv[1], float(sys.argv[2])
summary = {}
for name in ("affinity", "power-of-two", "kill"):
    try:
        d = json.load(open(f"{out}/serve_{name}.json"))
    except FileNotFoundError:
        continue
    row = {k: d[k] for k in ("turns_completed", "elapsed_s", "ttft_ms", "errors", "error_examples", "status",
                             "history_cached", "chats_past_until_prompt_tokens")}
    row["turns_per_s"] = round(d["turns_completed"] / d["elapsed_s"], 2)
    if name == "kill":
        turns = d["turns"]
        until = int((re.findall(r"--until-prompt-tokens (\d+)", d["command"]) or [10**12])[0])
        done_before = {t["chat"] for t in turns if t["t"] < kill_at and (t["prompt_tokens"] or 0) >= until}
        active = {t["chat"] for t in turns if t["t"] < kill_at} - done_before
        after = {t["chat"] for t in turns if t["t"] >= kill_at}
        row["chats_active_at_kill"] = len(active)
        row["of_them_answered_a_turn_after_kill"] = len(active & after)
    try:  # the router's placements: chats per replica, and how new chats were placed
        metrics = open(f"{out}/router_metrics_{name}.txt").read()
        row["router"] = {m[0] + m[1]: float(m[2]) for m in re.findall(
            r"^vllm_sinks_router:(replica_chats|placements_total)(\{[^}]*\}) (\S+)$", metrics, re.M)}
    except FileNotFoundError:
        pass
    summary[name] = row
print(json.dumps(summary, indent=1))
EOF
