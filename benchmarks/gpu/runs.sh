#!/usr/bin/env bash
# The GPU benchmarks and GPU tests, one step per command (each well under 10 minutes on an H100), writing
# logs and results under OUT. Run from the repository root of a GPU host with vLLM 0.26.0 and the project
# installed (bash scripts/setup.sh):
#   bash benchmarks/gpu/runs.sh STEP OUT
# The regression command before a change of a default path is benchmarks/gpu/regression.sh.
# Steps:
#   correctness    FA3's window defect row by row (fa_window_diag.py) and the GPU kernel test (540 batches)
#   kernels        the GPU kernel test alone
#   speed          decode kernel vs copy bandwidth, prefill attention A/B, model-level error vs dense
#   equality       the GPU equality test (5 configurations, bf16 vs the float32 reference)
#   model_error_all  the random model's error with a 4,096-token trained context, so that dense is compared with
#                  full attention at every position (like for like with SINKS' "all"), each position's error kept
#   model_error_seeds  the same over five prompts (seeds 11-15), pooled and per prompt: the largest error of one
#                  prompt is one extreme of a noisy sample (benchmarks/model_error_floor.py shows how noisy)
#   sessions_test  the GPU sessions test (model runner V2's token rows, the pinned staging, replies vs vLLM's own)
#   band_sweep     band_sink_attention's launch shapes at 16k context (prefill_ab.py --band-sweep); writes the
#                  fastest at the default heads per program to OUT/band_best.txt
#   band_sweep2    the same over smaller shapes (rows 32/64, keys 16/32, 2/4 warps)
#   decode_sweep [PREV_OPS]  bench_kernel.py --merge-sweep (decode merge: heads per program x num_warps;
#                  rope_and_cache: programs per token), side by side with PREV_OPS (an earlier ops_cuda.py)
#   ab_prev PREV_OPS  prefill_ab.py and bench_kernel.py (32k, 256k) with --prev-ops PREV_OPS (an earlier
#                  ops_cuda.py): the prefill and decode kernels of both, side by side on one host
#   fa_windows     prefill_ab.py at 16k with --fa-window-steps 3: SINKS' prefill attention with FA3 over smaller
#                  immune windows (W' - 128 k) and the band kernel over the rest, next to the default W'
#   band_check [TILING]  the GPU kernel test and prefill_ab.py with VLLM_SINKS_BAND_TILING=TILING (default:
#                  OUT/band_best.txt)
#   paused         paused chats, 32 and 64 chats x 65,536-token histories (S=4, W=4092)
#   bursts         64 chats x 65,536 tokens coming back at once with max_num_seqs 64, 16 chats with max_num_seqs 8
#   offload [CHATS]  paused chats beyond the GPU pool with vLLM's KV offloading (W = 1020, CHATS x 8,192 tokens,
#                  default 64, the pool cut to ~2/3 of their states, 16 GiB of host memory, eager): SINKS with
#                  offloading, SINKS without (re-prefill), stock sliding window 1024 with offloading, and SINKS
#                  with the whole pool (every state on the GPU), one engine after another on one host
#   offload_scale CHATS GIB CONFIG...  the same at scale with the whole default pool (0.9 of the GPU: on an
#                  H100 ~421 states at W = 1020, so 640 chats are 1.5x what it holds) and GIB of host memory;
#                  CONFIG: sinks_offload, sinks_no_offload, sliding_offload (one engine after another);
#                  POOL_BLOCKS=N sets their pool instead (another GPU: 27,808 blocks is the H100's at 0.9);
#                  sinks_all_gpu: SINKS with the default pool (an H200's holds 640 states at W = 1020)
#   offload_serving DURATION CONFIG...  serving (OpenAI server) with more growing chats than the GPU holds
#                  states for: 192 chats growing from ~1k to 16,384 tokens by 280-1,100 words a turn, W = 1020,
#                  the pool cut to 4,224 blocks (64 states: 1/3 of the chats), 20% of replies dropped, DURATION s
#                  per CONFIG (150 on an H100): sinks_offload (SINKS + 32 GiB of host tier), sinks (SINKS alone),
#                  sliding_offload (stock sliding window 1024 + the same 32 GiB); one server after another
#   offload_restart CHATS GIB  paused chats across a server restart (W = 1020, CHATS x 8,192 tokens, eager): turn 1,
#                  the engine shut down, turn 2 on a new one; SINKS with GIB of host tier and vLLM's file-system
#                  tier in DISK (default /tmp/vllm_sinks_disk_tier, emptied first and after; ~138 MiB per
#                  chat for the 8B shape), PYTHONHASHSEED=0; then SINKS without a disk tier (a restart's
#                  baseline: every history re-prefilled)
#   stress [STEPS] the GPU stress test (tests/test_gpu_stress.py: 8B shape, model runner V2, STEPS per row mode)
#   capacity       100 chats x 65,536-token uncached prompts arriving together
#   prefill_batch  prefill of 64 chats x 16,384 tokens with SINKS' chunk (8,192) and the whole budget (16,384)
#   growing MODE   serving: 64 chats growing past 32k tokens by 1-4k per turn, 20% dropped (MODE: sinks,
#                  dense, sliding)
#   growing_stock [DURATION]  growing for dense, then sliding (one call, same host)
#   serve MODE     serving: 256 chats, the 150 s load of earlier sessions (MODE: sinks, dense)
#   decode MODE    Workload A (bench_decode.py, MODE: sinks, sliding, dense)
#   session_turns HANDOFF  one live session's turn latency at 16k / 256k / 1M tokens of history, 8B shape
#                  (bench_session_turns.py; HANDOFF: sinks, or stock for vLLM's own hand-off of a resumed session)
#   block_rows_ab [CHECKPOINTS]  one live session's turn latency (8B shape) with vLLM's block-id lists
#                  (--block-rows lists), then with block_rows.SparseBlockRow (sparse), same host, 16k / 1M / 4M
#   session_memory TAG [SESSION_TOKENS_PY]  one live session grown to 4,194,304 tokens (8B shape, turn latency
#                  at 16k / 1M / 4M) under the memory probe (session_memory_probe/): per 256k session tokens,
#                  the engine core's mappings, malloc heap and pinned host memory; with SESSION_TOKENS_PY (an
#                  earlier session_tokens.py) run in its place, for an A/B on one host; SHAPE=tiny for a small
#                  model (host memory per session token does not depend on the model), SESSION_ARGS for more
#                  bench_session_turns.py arguments (the tiny shape needs --window-tokens 4060; --kv-blocks N)
#   session_trace TAG ARGS...  bench_session_turns.py (8B shape) with ARGS under the engine-core step trace
#                  (step_trace/): per session input, the steps, their token counts, gaps and CUDA graph modes
#   sessions_http [DURATION]  64 live HTTP sessions (/v1/sessions), 20% of replies dropped, then the final check
# Real weights (Qwen2.5-Coder-1.5B-Instruct, head dim 128), prepared first by
# `python benchmarks/quality/prepare.py --model qwen2.5-coder-1.5b-instruct` (into VLLM_SINKS_DATA):
#   qwen_error     model-level error vs the float64 reference (GPU), W = 1020 and 1023, KJV prompt (QWEN_SEEDS:
#                  runs of 3,000 tokens of the text, default 0; e.g. 0,1,2,3,4 pools five)
#   qwen_ppl       1M-token streaming perplexity: 4+1020, 0+1020, dense to the trained context (32k)
#   qwen_demo EXP...  examples/streaming_demo.py past the trained context (EXP: sinks windowed dense)
set -uo pipefail
STEP=$1
OUT=$2
mkdir -p "$OUT"
export VLLM_WORKER_MULTIPROC_METHOD=spawn PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
export VLLM_SINKS_DATA=${VLLM_SINKS_DATA:-/tmp/qdata}
QWEN=qwen2.5-coder-1.5b-instruct
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device_$STEP.txt"
case $STEP in
  correctness)
    python3 benchmarks/gpu/fa_window_diag.py 2>&1 | tee "$OUT/fa_window_diag.log" | grep -E "^(bfloat|float|prediction)"
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 | tee "$OUT/gpu_kernels_test.log" | tail -15
    ;;
  kernels)
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 | tee "$OUT/gpu_kernels_test.log" | tail -15
    ;;
  speed)
    python3 benchmarks/bench_kernel.py --out "$OUT/kernel_decode.json" 2>&1 | tail -8
    python3 benchmarks/gpu/prefill_ab.py --out "$OUT/prefill_ab.json" 2>&1 | tail -4
    python3 benchmarks/gpu/model_error.py --out "$OUT/model_error.json" > "$OUT/model_error.log" 2>&1
    grep -E '^\{"(sinks|dense)' "$OUT/model_error.log" | tail -2
    ;;
  equality)
    python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_equality.py 2>&1 | tee "$OUT/gpu_equality.log" | grep -E "mean|passed|failed|Error" | tail -12
    ;;
  model_error_all)
    python3 benchmarks/gpu/model_error.py --trained-context 4096 --reference-device cuda --save-errors \
      --out "$OUT/model_error_all.json" > "$OUT/model_error_all.log" 2>&1
    grep -E '^\{"(sinks|dense)' "$OUT/model_error_all.log" | tail -1 | cut -c1-1500
    tail -3 "$OUT/model_error_all.log" | grep -i error
    ;;
  model_error_seeds)
    python3 benchmarks/gpu/model_error.py --trained-context 4096 --reference-device cuda --seeds 11,12,13,14,15 \
      --save-errors --out "$OUT/model_error_seeds.json" > "$OUT/model_error_seeds.log" 2>&1
    grep -E '^\{"(sinks|dense)' "$OUT/model_error_seeds.log" | tail -1 | cut -c1-1500
    tail -3 "$OUT/model_error_seeds.log" | grep -i error
    ;;
  sessions_test)
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu_sessions.py 2>&1 | tee "$OUT/gpu_sessions_test.log" | tail -15
    ;;
  fa_windows)
    python3 benchmarks/gpu/prefill_ab.py --contexts 16384 --fa-window-steps 3 --out "$OUT/prefill_fa_windows.json" \
      2>&1 | tee "$OUT/prefill_fa_windows.log" | grep -v "^WARNING"
    ;;
  band_sweep)
    python3 benchmarks/gpu/prefill_ab.py --contexts 16384 --band-sweep 16384 --out "$OUT/prefill_band_sweep.json" \
      > "$OUT/prefill_band_sweep.log" 2>&1
    python3 - "$OUT" <<'PY'
import json, sys
d = json.load(open(f"{sys.argv[1]}/prefill_band_sweep.json"))
print(json.dumps(d["rows"][0]))
sweep = d["band_sweep"]
for r in sweep[:10] + [r for r in sweep if r["default"]]:
    print(r)
hpp = next(r["heads_per_program"] for r in sweep if r["default"])
best = next(r for r in sweep if r["heads_per_program"] == hpp)
open(f"{sys.argv[1]}/band_best.txt", "w").write(f"{best['rows']},{best['keys']},{best['num_warps']},{best['num_stages']}")
PY
    tail -3 "$OUT/prefill_band_sweep.log" | grep -i error
    ;;
  band_sweep2)
    python3 benchmarks/gpu/prefill_ab.py --contexts 16384 --band-sweep 16384 --band-grid 32,64/16,32/2,4/1,2,3 \
      --out "$OUT/prefill_band_sweep2.json" > "$OUT/prefill_band_sweep2.log" 2>&1
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['rows'][0]); [print(r) for r in d['band_sweep'][:8]]" \
      "$OUT/prefill_band_sweep2.json"
    tail -3 "$OUT/prefill_band_sweep2.log" | grep -i error
    ;;
  decode_sweep)
    PREV=${3:+--prev-ops $3}
    python3 benchmarks/bench_kernel.py --contexts 32768,262144 --merge-sweep $PREV --out "$OUT/kernel_decode_sweep.json" \
      > "$OUT/kernel_decode_sweep.log" 2>&1
    grep -E '^\{"context' "$OUT/kernel_decode_sweep.log" | cut -c1-1500
    tail -3 "$OUT/kernel_decode_sweep.log" | grep -i error
    ;;
  ab_prev)
    python3 benchmarks/gpu/prefill_ab.py --prev-ops "$3" --out "$OUT/prefill_ab_prev.json" > "$OUT/prefill_ab_prev.log" 2>&1
    grep -E '^\{"context' "$OUT/prefill_ab_prev.log"
    tail -3 "$OUT/prefill_ab_prev.log" | grep -i error
    python3 benchmarks/bench_kernel.py --contexts 32768,262144 --prev-ops "$3" --out "$OUT/kernel_decode_prev.json" \
      > "$OUT/kernel_decode_prev.log" 2>&1
    grep -E '^\{"context' "$OUT/kernel_decode_prev.log" | cut -c1-1800
    tail -3 "$OUT/kernel_decode_prev.log" | grep -i error
    ;;
  band_check)
    TILING=${3:-$(cat "$OUT/band_best.txt")}
    echo "VLLM_SINKS_BAND_TILING=$TILING"
    VLLM_SINKS_BAND_TILING=$TILING python3 benchmarks/gpu/prefill_ab.py --out "$OUT/prefill_ab_tiling.json" 2>&1 | tail -2
    python3 benchmarks/gpu/prefill_ab.py --out "$OUT/prefill_ab_default.json" 2>&1 | tail -2
    VLLM_SINKS_BAND_TILING=$TILING python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 \
      | tee "$OUT/gpu_kernels_test_tiling.log" | tail -4
    ;;
  bursts)
    python3 benchmarks/bench_paused_chats.py --chats 64 --history 65536 --max-num-seqs 64 --out "$OUT/burst_64_seqs64.json" \
      > "$OUT/burst_64_seqs64.log" 2>&1
    grep -E '^\{"chats"|Error' "$OUT/burst_64_seqs64.log" | tail -3
    python3 benchmarks/bench_paused_chats.py --chats 16 --history 65536 --max-num-seqs 8 --out "$OUT/burst_16_seqs8.json" \
      > "$OUT/burst_16_seqs8.log" 2>&1
    grep -E '^\{"chats"|Error' "$OUT/burst_16_seqs8.log" | tail -3
    ;;
  offload)
    chats=${3:-64}
    blocks=$((chats * 2 / 3 * 70))  # a chat's state: 1 + 64 + 1 blocks, its reply up to 4 more
    common=(--chats "$chats" --history 8192 --window-tokens 1020 --sliding-window 1024 --no-regenerate --enforce-eager)
    for run in "sinks_offload --mode sinks --num-gpu-blocks $blocks --kv-offloading-size 16" \
               "sinks_no_offload --mode sinks --num-gpu-blocks $blocks" \
               "sliding_offload --mode sliding --num-gpu-blocks $blocks --kv-offloading-size 16" \
               "sinks_all_gpu --mode sinks"; do
      set -- $run
      name=$1; shift
      python3 benchmarks/bench_paused_chats.py "${common[@]}" "$@" --out "$OUT/offload_$name.json" \
        > "$OUT/offload_$name.log" 2>&1
      echo "$name: $(grep -E '^\{"chats"|Error' "$OUT/offload_$name.log" | tail -1)"
    done
    ;;
  offload_scale)
    chats=$3 gib=$4
    shift 4
    common=(--chats "$chats" --history 8192 --window-tokens 1020 --sliding-window 1024 --no-regenerate --enforce-eager)
    pool=()
    if [ -n "${POOL_BLOCKS:-}" ]; then pool=(--num-gpu-blocks "$POOL_BLOCKS"); fi
    for name in "$@"; do
      case $name in
        sinks_offload) args=(--mode sinks --kv-offloading-size "$gib" "${pool[@]}") ;;
        sinks_no_offload) args=(--mode sinks "${pool[@]}") ;;
        sliding_offload) args=(--mode sliding --kv-offloading-size "$gib" "${pool[@]}") ;;
        sinks_all_gpu) args=(--mode sinks) ;;  # the whole default pool, whatever POOL_BLOCKS
        *) echo "offload_scale: unknown configuration $name"; exit 2 ;;
      esac
      python3 benchmarks/bench_paused_chats.py "${common[@]}" "${args[@]}" --out "$OUT/scale_$name.json" \
        > "$OUT/scale_$name.log" 2>&1
      echo "$name: $(grep -E '^\{"chats"|Error' "$OUT/scale_$name.log" | tail -1)"
    done
    ;;
  offload_serving)
    dur=$3
    shift 3
    offload="--kv-offloading-size 32 --kv-offloading-backend native"
    for name in "$@"; do
      case $name in
        sinks_offload) mode=sinks extra=$offload ;;
        sinks) mode=sinks extra= ;;
        sliding_offload) mode=sliding extra=$offload ;;
        *) echo "offload_serving: unknown configuration $name"; exit 2 ;;
      esac
      WINDOW=1020 TAG=offload_$name SERVER_ARGS="--num-gpu-blocks-override 4224 $extra" \
        BENCH_ARGS="--user-words 280:1100 --until-prompt-tokens 16384 --max-tokens 64 --window-s 20 --sample-s 5" \
        bash benchmarks/gpu/serve_load.sh $mode "$OUT" "$dur" 192 2>&1 | tail -4
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], {k: d[k] for k in \
        ('turns_completed','ttft_ms','prompt_tokens','history_cached','chats_past_until_prompt_tokens','preemptions')})" \
        "$OUT/serve_offload_$name.json"
    done
    ;;
  offload_restart)
    chats=$3 gib=$4 disk=${DISK:-/tmp/vllm_sinks_disk_tier}
    rm -rf "$disk"
    common=(--chats "$chats" --history 8192 --window-tokens 1020 --no-regenerate --enforce-eager --restart)
    for run in "sinks_disk --kv-offloading-size $gib --disk-tier $disk" "sinks_no_disk"; do
      set -- $run
      name=$1; shift
      PYTHONHASHSEED=0 python3 benchmarks/bench_paused_chats.py "${common[@]}" "$@" --out "$OUT/restart_$name.json" \
        > "$OUT/restart_$name.log" 2>&1
      echo "$name: $(grep -E '^\{"chats"|Error' "$OUT/restart_$name.log" | tail -1)"
    done
    du -sh "$disk"; rm -rf "$disk"
    ;;
  stress)
    STRESS_STEPS=${3:-600} python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_stress.py 2>&1 \
      | tee "$OUT/gpu_stress_test.log" | grep -E "^GPU |passed|failed|Error" | tail -8
    ;;
  paused)
    python3 benchmarks/bench_paused_chats.py --chats 32,64 --history 65536 --out "$OUT/paused_chats.json" > "$OUT/paused_chats.log" 2>&1
    grep -E '^\{"chats"|SINKS KV pool' "$OUT/paused_chats.log"
    ;;
  capacity)
    python3 benchmarks/bench_capacity.py --chats 100 --prompt-len 65536 --out "$OUT/capacity.json" > "$OUT/capacity.log" 2>&1
    grep -E 'SINKS (attention backend|KV pool)|"max_|"all_|"preemptions|"prompt_tok|"decode_tok|"min_free' "$OUT/capacity.log"
    ;;
  prefill_batch)
    for chunk in 8192 16384; do
      python3 benchmarks/bench_capacity.py --chats 64 --prompt-len 16384 --gen 16 --long-prefill-token-threshold $chunk \
        --out "$OUT/prefill_batch_$chunk.json" > "$OUT/prefill_batch_$chunk.log" 2>&1
      grep -E '"long_prefill|"prompt_tok|"all_started|"max_prefilling|"preemptions' "$OUT/prefill_batch_$chunk.log"
    done
    ;;
  growing)
    BENCH_ARGS="--user-words 280:1100 --until-prompt-tokens 32768 --max-tokens 64 --window-s 20 --sample-s 5" \
      bash benchmarks/gpu/serve_load.sh "$3" "$OUT" "${4:-150}" 64 2>&1 | tail -25
    ;;
  growing_stock)
    for mode in dense sliding; do
      BENCH_ARGS="--user-words 280:1100 --until-prompt-tokens 32768 --max-tokens 64 --window-s 20 --sample-s 5" \
        bash benchmarks/gpu/serve_load.sh $mode "$OUT" "${3:-120}" 64 2>&1 | tail -4
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], {k: d[k] for k in \
        ('turns_completed','output_tokens_per_s','ttft_ms','itl_ms','chats_past_until_prompt_tokens','prompt_tokens','preemptions')})" \
        "$OUT/serve_$mode.json"
    done
    ;;
  serve)
    bash benchmarks/gpu/serve_load.sh "$3" "$OUT" "${4:-150}" 256 2>&1 | grep -E '"(turns|output|p50|p99|errors)|ready|status' | head -20
    ;;
  decode)
    python3 benchmarks/bench_decode.py --mode "$3" --out "$OUT/decode_$3.json" 2>&1 | tail -5
    ;;
  session_turns)
    python3 benchmarks/bench_session_turns.py --shape llama3-8b --checkpoints 16384,65536,262144,1048576 --handoff "$3" \
      --out "$OUT/session_turns_$3.json" > "$OUT/session_turns_$3.log" 2>&1
    grep -E "^\{'session_tokens'|Error" "$OUT/session_turns_$3.log" | tail -6
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['median_ratio_to_first'], \
      d['rss_bytes_per_session_token'])" "$OUT/session_turns_$3.json"
    ;;
  block_rows_ab)
    for H in lists sparse; do
      python3 benchmarks/bench_session_turns.py --shape llama3-8b --checkpoints "${3:-16384,1048576,4194304}" \
        --probe-turns 6 --block-rows $H --out "$OUT/session_turns_$H.json" > "$OUT/session_turns_$H.log" 2>&1
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], [(c['session_tokens'], \
        c['ttft_ms_median'], c['turn_ms_median']) for c in d['checkpoints']], d['median_ratio_to_first'], \
        d['rss_bytes_per_session_token'])" "$OUT/session_turns_$H.json" $H
      grep -E "Error|Traceback" "$OUT/session_turns_$H.log" | tail -3
    done
    ;;
  session_memory)
    TAG=$3
    if [ -n "${4:-}" ]; then cp vllm_sinks/sessions/tokens.py /tmp/session_tokens.current.py && cp "$4" vllm_sinks/sessions/tokens.py; fi
    rm -f /tmp/memprobe_$TAG.*
    PYTHONPATH=benchmarks/gpu/session_memory_probe${PYTHONPATH:+:$PYTHONPATH} VLLM_SINKS_MEMORY_PROBE=/tmp/memprobe_$TAG \
      timeout "${MEMORY_TIMEOUT_S:-540}" python3 benchmarks/bench_session_turns.py --shape "${SHAPE:-llama3-8b}" \
      --checkpoints 16384,1048576,4194304 --probe-turns 5 ${SESSION_ARGS:-} --out "$OUT/session_turns_$TAG.json" > "$OUT/session_turns_$TAG.log" 2>&1
    if [ -n "${4:-}" ]; then cp /tmp/session_tokens.current.py vllm_sinks/sessions/tokens.py; fi
    grep -E "^\{'session_tokens'|Error" "$OUT/session_turns_$TAG.log" | tail -6
    cat /tmp/memprobe_$TAG.* > "$OUT/memprobe_$TAG.jsonl" 2>/dev/null
    python3 benchmarks/gpu/session_memory_probe/summarize.py "$OUT/memprobe_$TAG.jsonl" "$OUT/session_turns_$TAG.json" \
      | tee "$OUT/memprobe_$TAG.txt"
    ;;
  session_trace)
    TAG=$3
    rm -f /tmp/trace_$TAG.*
    PYTHONPATH=benchmarks/gpu/step_trace${PYTHONPATH:+:$PYTHONPATH} VLLM_SINKS_STEP_TRACE=/tmp/trace_$TAG \
      timeout "${TRACE_TIMEOUT_S:-400}" python3 benchmarks/bench_session_turns.py --shape llama3-8b "${@:4}" \
      --out "$OUT/session_turns_$TAG.json" > "$OUT/session_turns_$TAG.log" 2>&1
    grep -E "^\{'session_tokens'|Error" "$OUT/session_turns_$TAG.log" | tail -6
    python3 benchmarks/gpu/step_trace/summarize.py /tmp/trace_$TAG --last 6 --raw 36 > "$OUT/trace_$TAG.txt" 2>&1
    cat "$OUT/trace_$TAG.txt"
    for f in /tmp/trace_$TAG.*.txt; do [ -f "$f" ] && { echo "== $f"; head -"${TRACE_SHOW_LINES:-60}" "$f"; }; done
    tar czf "$OUT/trace_$TAG.tgz" -C /tmp $(cd /tmp && ls trace_$TAG.*)
    ;;
  sessions_http)
    CLIENT=sessions bash benchmarks/gpu/serve_load.sh sinks "$OUT" "${3:-300}" 64 2>&1 | tail -40
    ;;
  qwen_error)
    python3 benchmarks/gpu/model_error.py --model "$VLLM_SINKS_DATA/$QWEN" --windows 1020,1023 --save-errors \
      --seeds "${QWEN_SEEDS:-0}" --out "$OUT/model_error_qwen15.json" > "$OUT/model_error_qwen15.log" 2>&1
    grep -E '^\{"(sinks|dense)' "$OUT/model_error_qwen15.log" | tail -1
    ;;
  qwen_ppl)
    python3 benchmarks/quality/streaming_ppl.py --model "$VLLM_SINKS_DATA/$QWEN" --tokens 1002614 \
      --configs 4:1020,0:1020,dense --max-num-batched-tokens 4096 --out "$OUT/quality_qwen15.json" \
      > "$OUT/quality_qwen15.log" 2>&1
    grep -E '^\{' "$OUT/quality_qwen15.log"
    ;;
  qwen_demo)
    for exp in "${@:3}"; do
      timeout "${DEMO_TIMEOUT_S:-570}" python3 examples/streaming_demo.py --model "$VLLM_SINKS_DATA/$QWEN" --experiment "$exp" --prompts 200 \
        --stop-after-tokens 36000 --max-new-tokens 1000 --dtype bfloat16 --out "$OUT/demo_qwen15_$exp.json" > "$OUT/demo_qwen15_$exp.log" 2>&1
      tail -4 "$OUT/demo_qwen15_$exp.log"
    done
    ;;
  *) echo "unknown step $STEP" >&2; exit 2 ;;
esac
