#!/usr/bin/env bash
# The GPU regression command: run it on one GPU before committing any change to a path that runs by default
# (no flag), and commit its summary with the change (benchmarks/results/). About 8-9 minutes on one H100.
#   bash benchmarks/gpu/regression.sh OUT [PARTS]      PARTS: any of tests burst decode (default: all three)
# 1. The GPU equality, sessions and offloading tests (tests/test_gpu_equality.py, one process per
#    configuration, tests/test_gpu_sessions.py, tests/test_gpu_offload.py), side by side (each engine has a
#    fixed KV pool, no memory profiling to disturb).
# 2. The burst: 32 chats with 65,536-token histories take a turn, then all come back at once with their whole
#    history plus 200 new tokens, max_num_seqs 32, every other setting the defaults
#    (benchmarks/bench_paused_chats.py). Passes when 32 of 32 resume from the cache, in the regenerate and in
#    turn 2, and no engine error.
# 3. Workload A (benchmarks/bench_decode.py): SINKS, then stock sliding window 4096, one engine each, back to
#    back on the same GPU (Llama-3-8B shape, dummy weights, 64 streams x 8,192-token prompts).
# Prints a summary (OUT/summary.json) and exits non-zero if any part failed.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu/regression.sh OUT [PARTS]}
PARTS=${2:-tests burst decode}
mkdir -p "$OUT"
want() { [[ " $PARTS " == *" $1 "* ]]; }
export VLLM_WORKER_MULTIPROC_METHOD=spawn PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import vllm; print('vllm', vllm.__version__)" | tee -a "$OUT/device.txt"
stamp() { echo "[regression +$((SECONDS - start)) s] $*"; }

tests_rc=0
if want tests; then
stamp "GPU equality, sessions and offloading tests, side by side"
# One pytest process per equality configuration, one for the sessions test, one for the offloading test, all
# at once: each engine has a fixed KV pool (no memory profiling to disturb), so they share the GPU.
# (pytest-xdist did not start its workers within 250 s on the H100 host of 2026-12-06: plain processes.)
# Two CPU threads each: seven processes with a float32 reference on the CPU would otherwise each start a
# thread per core (the parallel part did not finish in ~7 minutes on a 16-core H200 host, 2026-12-06).
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
pids=()
for config in S4-W60 S1-W31 S0-W64 S16-W48 S4-W1020; do
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu_equality.py -k "$config-" > "$OUT/gpu_equality_$config.log" 2>&1 &
  pids+=($!)
done
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_sessions.py > "$OUT/gpu_sessions.log" 2>&1 &
pids+=($!)
python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_offload.py > "$OUT/gpu_offload.log" 2>&1 &
pids+=($!)
for pid in "${pids[@]}"; do wait "$pid" || tests_rc=1; done
tail -qn1 "$OUT"/gpu_equality_*.log "$OUT/gpu_sessions.log" "$OUT/gpu_offload.log"
unset OMP_NUM_THREADS MKL_NUM_THREADS
fi

if want burst; then
stamp "burst: 32 chats x 65,536 tokens, max_num_seqs 32"
python3 benchmarks/bench_paused_chats.py --chats 32 --history 65536 --max-num-seqs 32 --out "$OUT/burst.json" \
  > "$OUT/burst.log" 2>&1 || { echo "burst failed:"; grep -E "Error|error" "$OUT/burst.log" | tail -8; }
fi

want decode && for mode in sinks sliding; do
  stamp "Workload A, $mode"
  python3 benchmarks/bench_decode.py --mode $mode --out "$OUT/decode_$mode.json" > "$OUT/decode_$mode.log" 2>&1 \
    || { echo "Workload A ($mode) failed:"; tail -20 "$OUT/decode_$mode.log"; }
done

stamp "done"

python3 - "$OUT" "$tests_rc" "$((SECONDS - start))" "$PARTS" <<'PY'
import json, os, sys

out, tests_rc, wall, parts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()

def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None

sinks, sliding, burst = load("decode_sinks.json"), load("decode_sliding.json"), load("burst.json")
summary = {"device": open(os.path.join(out, "device.txt")).read().strip(), "wall_s": wall, "parts": parts}
ok = True
if "decode" not in parts:
    summary["workload_a"] = "not run"
elif sinks and sliding:
    summary["workload_a_tok_s"] = {"sinks": sinks["decode_tok_s"], "sliding": sliding["decode_tok_s"]}
    summary["workload_a_sinks_over_sliding"] = round(sinks["decode_tok_s"] / sliding["decode_tok_s"], 3)
else:
    ok = False
if "burst" not in parts:
    summary["burst"] = "not run"
elif burst:
    keys = ("chats", "turn1_s", "regenerate_resumed", "regenerate_s", "turn2_resumed", "turn2_s", "turn2_preemptions")
    summary["burst"] = {k: burst[k] for k in keys}
    ok &= burst["turn2_resumed"] == burst["chats"] == burst["regenerate_resumed"]
else:
    ok = False
summary["gpu_tests"] = "not run" if "tests" not in parts else "passed" if tests_rc == 0 else "failed (gpu_equality_*.log, gpu_sessions.log, gpu_offload.log)"
ok &= tests_rc == 0
summary["passed"] = bool(ok)
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
sys.exit(0 if ok else 1)
PY
