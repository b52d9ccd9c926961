"""Engine start-up, SINKS vs stock, like for like: the same model shape and engine arguments as Workload A
(bench_decode.py), each start in a fresh process, modes alternating on the same host.

The comparison is the median over the counted rounds of the time LLM(...) takes to return (weights,
profiling, KV-cache allocation, compilation, CUDA-graph capture, kernel warm-up), with every cache warm: the
first --warmup-rounds rounds (torch.compile, FlashInfer's JIT, Triton's JIT) are reported but not counted.
Each mode gets its own TRITON_CACHE_DIR under --triton-cache-root. Without that, vLLM's model-runner and
sampler kernels (about 25 Triton JIT compilations, 8-10 s on an H100, for any backend) land in Inductor's
cache of the compiled model on the start that compiles it, and in ~/.triton/cache on the next start, which
loads the compiled model: that second start compiles them again, and in a shared cache whichever mode started
first in round 1 paid for both (SINKS measured 1.24x stock that way, 2026-11-23).
    python benchmarks/bench_startup.py --modes dense,sinks --rounds 3 --out benchmarks/results/startup.json
CPU smoke (CI): --shape tiny --rounds 1 --warmup-rounds 0 --enforce-eager --prompt-len 64 --streams 2
    --window-tokens 40
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="dense,sinks", help="bench_decode.py modes; the first is the baseline")
    p.add_argument("--rounds", type=int, default=3, help="rounds in all, warm-up rounds included")
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument(
        "--triton-cache-root",
        default=None,
        help="TRITON_CACHE_DIR of mode M is ROOT/M (default: a temporary folder, removed at the end; round 0 "
        "starts cold); reuse a root to continue an earlier invocation's warm-up",
    )
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=8192)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=4092)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--model-root", default=os.environ.get("TMPDIR", "/tmp") + "/vllm_sinks_models")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    modes = a.modes.split(",")
    own_root = a.triton_cache_root is None
    if own_root:
        a.triton_cache_root = tempfile.mkdtemp(prefix="bench_startup_triton_")
    starts: list[dict] = []
    try:
        for rnd in range(a.rounds):
            for mode in modes if rnd % 2 == 0 else modes[::-1]:
                starts.append(dict(round=rnd, mode=mode, warmup=rnd < a.warmup_rounds, **_start(mode, a)))
                print(json.dumps(starts[-1]), flush=True)
    finally:
        if own_root:
            shutil.rmtree(a.triton_cache_root, ignore_errors=True)
    counted = {m: [s["startup_s"] for s in starts if s["mode"] == m and not s["warmup"]] for m in modes}
    median = {m: round(statistics.median(v), 2) for m, v in counted.items() if v}
    base = modes[0]
    result = {
        "benchmark": "engine_startup",
        "shape": a.shape,
        "streams": a.streams,
        "prompt_len": a.prompt_len,
        "enforce_eager": a.enforce_eager,
        "warmup_rounds": a.warmup_rounds,
        "triton_cache": "one TRITON_CACHE_DIR per mode",
        "median_startup_s": median,
        "ratio_to_" + base: {m: round(median[m] / median[base], 3) for m in median if base in median},
        "starts": starts,
        "device": starts[0].get("device") if starts else None,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "starts"}, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _start(mode: str, a) -> dict:
    """One engine start in a fresh process (bench_decode.py --startup-only): startup_s and process wall."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "start.json")
        cmd = [sys.executable, os.path.join(HERE, "bench_decode.py"), "--mode", mode, "--startup-only",
               "--shape", a.shape, "--streams", str(a.streams), "--prompt-len", str(a.prompt_len),
               "--sink-tokens", str(a.sink_tokens), "--window-tokens", str(a.window_tokens),
               "--model-root", a.model_root, "--out", out]  # fmt: skip
        cmd += ["--enforce-eager"] if a.enforce_eager else []
        env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(a.triton_cache_root, mode))
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        wall = time.perf_counter() - t
        with open(out) as f:
            res = json.load(f)
    return {"startup_s": res["startup_s"], "process_wall_s": round(wall, 1), "device": res["device"]}


if __name__ == "__main__":
    main()
