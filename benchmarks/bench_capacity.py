"""Capacity: how many long chats prefill and decode at once, and what limits it.

N chats with L-token prompts arrive together (cold: nothing cached; `--cached`: a first pass leaves their
resumable states in the prefix cache, then the same prompts come again). The engine is stepped in-process and
each step records how many requests are prefilling and decoding, the free blocks and preemptions. Reported:
the most streams decoding in one step, the most prefilling in one step, when the last stream started
decoding, prefill tok/s (prompt tokens computed / time until every stream has decoded), decode tok/s in the
steps where all N decode, and the capacity figures SINKS states at start-up, to compare with the measurement.
    python benchmarks/bench_capacity.py --chats 100 --prompt-len 65536 --out ...                 # H100
    python benchmarks/bench_capacity.py --shape tiny --chats 100 --prompt-len 8192 --window-tokens 508 \
        --max-num-batched-tokens 2048 --num-gpu-blocks 3472                                       # CPU model
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sinks", "sliding", "dense"], default="sinks")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--chats", type=int, default=100)
    p.add_argument("--prompt-len", type=int, default=65536)
    p.add_argument("--gen", type=int, default=0, help="tokens per chat; 0: all N decode together")
    p.add_argument("--cached", action="store_true", help="a first pass caches the prompts' states")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=4092)
    p.add_argument("--sliding-window", type=int, default=4096)
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="force the KV pool size (blocks)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 16384 GPU, 2048 CPU")
    p.add_argument("--long-prefill-token-threshold", type=int, default=None, help="vLLM's per-request cap")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--model-root", default=os.environ.get("TMPDIR", "/tmp") + "/vllm_sinks_models")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    from bench_endless import _on_gpu
    from bench_paused_chats import StateTracker
    from model_shapes import model_dir
    from run_record import device_and_mode_kwargs, emit, provenance
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sinks.kv.introspection import scheduler_of

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    on_gpu = _on_gpu()
    chunk = a.max_num_batched_tokens or (16384 if on_gpu else 2048)
    # Enough tokens that the first stream still decodes when the last one's prefill ends.
    gen = a.gen or 64 + 2 * -(-a.chats * a.prompt_len // chunk)
    path = model_dir(a.model_root, a.shape, sliding_window=a.sliding_window if a.mode == "sliding" else None)
    kw = dict(load_format="dummy", enable_prefix_caching=True, max_num_seqs=max(a.chats, 1),
              max_num_batched_tokens=chunk, max_model_len=a.prompt_len + gen + 64)  # fmt: skip
    if a.num_gpu_blocks:
        kw["num_gpu_blocks_override"] = a.num_gpu_blocks
    if a.long_prefill_token_threshold:
        kw["long_prefill_token_threshold"] = a.long_prefill_token_threshold
    kw.update(device_and_mode_kwargs(a.mode, on_gpu, a))
    t0 = time.perf_counter()
    llm = LLM(model=path, **kw)
    startup_s = time.perf_counter() - t0
    engine = llm.llm_engine
    scheduler = scheduler_of(llm)
    tracker = StateTracker(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    stated = None
    if a.mode == "sinks":
        from vllm_sinks.metrics import collect_sinks_stats

        stated = collect_sinks_stats(scheduler)
    rng = random.Random(0)
    vocab = 380 if a.shape == "tiny" else 120_000
    prompts = [[rng.randrange(3, vocab) for _ in range(a.prompt_len)] for _ in range(a.chats)]
    if a.cached:
        warm = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, detokenize=False)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], warm, use_tqdm=False)
    sp = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True, detokenize=False)
    preempt0 = tracker.preemptions
    t_start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"c{i}", TokensPrompt(prompt_token_ids=p), sp)
    generated: dict[str, int] = {}
    steps = []
    all_decoding_since = None  # first step with all N decoding
    all_started_s = None  # when the last stream produced its first token
    while engine.has_unfinished_requests():
        running = list(scheduler.running)
        prefilling = sum(1 for r in running if r.num_computed_tokens < r.num_prompt_tokens)
        t = time.perf_counter()
        for out in engine.step():
            generated[out.request_id] = len(out.outputs[0].token_ids)
        now = time.perf_counter()
        decoding = sum(1 for n in generated.values() if 0 < n < gen)
        steps.append(
            dict(t=now - t_start, dt=now - t, running=len(running), prefilling=prefilling, decoding=decoding,
                 free=pool.get_num_free_blocks(), tokens=sum(generated.values()))
        )  # fmt: skip
        if all_started_s is None and len(generated) == a.chats:
            all_started_s = now - t_start
        if all_decoding_since is None and decoding == a.chats:
            all_decoding_since = len(steps) - 1
    decode_rate = None
    if all_decoding_since is not None:
        end = next((i for i in range(all_decoding_since, len(steps)) if steps[i]["decoding"] < a.chats), None)
        if end is not None and end - 1 > all_decoding_since:
            s0, s1 = steps[all_decoding_since], steps[end - 1]
            decode_rate = (s1["tokens"] - s0["tokens"]) / (s1["t"] - s0["t"])
    computed = a.chats * a.prompt_len
    result = {
        "benchmark": "capacity",
        "mode": a.mode,
        "shape": a.shape,
        "chats": a.chats,
        "prompt_len": a.prompt_len,
        "cached": a.cached,
        "gen": gen,
        "max_num_batched_tokens": chunk,
        "long_prefill_token_threshold": engine.vllm_config.scheduler_config.long_prefill_token_threshold,
        "sink_tokens": a.sink_tokens if a.mode == "sinks" else None,
        "window_tokens": a.window_tokens if a.mode == "sinks" else None,
        "kv_pool_blocks": pool.num_gpu_blocks,
        "stated": stated,
        "max_decoding_at_once": max(s["decoding"] for s in steps),
        "all_decoding_at_once": all_decoding_since is not None,
        "max_prefilling_at_once": max(s["prefilling"] for s in steps),
        "max_running_at_once": max(s["running"] for s in steps),
        "min_free_blocks": min(s["free"] for s in steps),
        "preemptions": tracker.preemptions - preempt0,
        "steps": len(steps),
        "all_started_s": round(all_started_s, 2),
        "prompt_tok_s_until_all_started": round(computed / all_started_s, 1),
        "decode_tok_s_all_decoding": round(decode_rate, 1) if decode_rate else None,
        "wall_s": round(steps[-1]["t"], 2),
        "startup_s": round(startup_s, 1),
        **provenance(__file__, argv),
    }
    return emit(result, a.out)


if __name__ == "__main__":
    main()
