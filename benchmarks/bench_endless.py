"""Workload B, endless streams: N streams grown to several lengths; decode tok/s and KV blocks per stream
at each length, in one engine.

For each length L: prompts of L tokens are served once (max_tokens=1) to fill the prefix cache, then
timed with g and G generated tokens (both hit the cache, so the difference is decode only):
decode tok/s = N * (G - g) / (T_G - T_g). KV blocks per stream = the most real blocks any stream held
(SinkWindowManager counter; SINKS only) and vLLM's KV-cache usage.
    python benchmarks/bench_endless.py --mode sinks --lengths 16384,65536,262144 --out ...
    python benchmarks/bench_endless.py --mode dense --lengths 16384,65536 --out ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sinks", "dense"], required=True)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--lengths", default="16384,65536,262144")
    p.add_argument("--gen", type=int, default=160)
    p.add_argument("--short-gen", type=int, default=32)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=4092)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--model-root", default=os.environ.get("TMPDIR", "/tmp") + "/vllm_sinks_models")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the block counters are readable
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    from bench_decode import _device
    from model_shapes import model_dir
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    lengths = [int(x) for x in a.lengths.split(",")]
    path = model_dir(a.model_root, a.shape)
    kw = dict(load_format="dummy", enable_prefix_caching=True, max_num_seqs=a.streams,
              max_model_len=max(lengths) + a.gen + 16, dtype="bfloat16",
              gpu_memory_utilization=a.gpu_memory_utilization)  # fmt: skip
    if a.mode == "sinks":
        sinks = {"sink_tokens": a.sink_tokens, "window_tokens": a.window_tokens}
        kw.update(attention_backend="SINKS", additional_config={"sinks": sinks})
    else:
        kw.update(attention_backend="FLASH_ATTN")
    t0 = time.perf_counter()
    llm = LLM(model=path, **kw)
    startup_s = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    pool_tokens = cache.num_gpu_blocks * cache.block_size
    managers = []
    if a.mode == "sinks":
        from vllm_sinks.introspection import sink_managers

        managers = sink_managers(llm)
    rows = []
    for L in lengths:
        rng = random.Random(L)
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, 380) for _ in range(L)])
                   for _ in range(a.streams)]  # fmt: skip
        for m in managers:
            m.max_held_blocks = 0

        def run(n: int, prompts=prompts) -> float:
            sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False)
            t = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=True)
            return time.perf_counter() - t

        t_fill = run(1)
        t_short = run(a.short_gen)
        t_long = run(a.gen)
        row = {
            "length": L,
            "fill_s": round(t_fill, 2),
            "t_short_s": round(t_short, 3),
            "t_long_s": round(t_long, 3),
            "decode_tok_s": round(a.streams * (a.gen - a.short_gen) / (t_long - t_short), 1),
            "dense_kv_tokens_needed": a.streams * (L + a.gen),
            "streams_that_fit_dense": pool_tokens // (L + a.gen),
        }
        if managers:
            row["max_kv_blocks_per_stream"] = max(m.max_held_blocks for m in managers)
            row["max_kv_tokens_per_stream"] = row["max_kv_blocks_per_stream"] * cache.block_size
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "endless_streams_workload_B",
        "mode": a.mode,
        "shape": a.shape,
        "streams": a.streams,
        "gen": a.gen,
        "short_gen": a.short_gen,
        "sink_tokens": a.sink_tokens if a.mode == "sinks" else None,
        "window_tokens": a.window_tokens if a.mode == "sinks" else None,
        "kv_pool_tokens": pool_tokens,
        "startup_s": round(startup_s, 1),
        "rows": rows,
        "device": _device(),
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
    }
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
