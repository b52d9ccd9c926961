"""Workload B, endless streams: N streams grown to several lengths; decode tok/s and KV blocks per stream
at each length, in one engine.

For each length L, N requests of L prompt tokens and G generated tokens each are stepped through the engine
(LLMEngine.step, in-process) with a timestamp per step. Decode tok/s is timed inside that one run, over the
steps in which all N streams decode together: from the first step at which every stream has generated
`--short-gen` tokens (all prefills done) to the step before the first stream finishes; tokens generated in
between / seconds. Prefills run one after another, so the first stream starts decoding about N*L/chunk steps
before the last: G (default: auto) is short-gen + that stagger + `--timed-steps`, so that every length is
timed with all N streams decoding. Nothing depends on the prefix cache. KV blocks per stream (SINKS):
the most real blocks any stream held while decoding, and separately during prefill (a prefill chunk's
blocks are held until the chunk is computed); for every mode, the real blocks in vLLM's block tables when
decoding starts and just before it ends. vLLM's pool size gives how many such streams dense could hold, and
the most streams the scheduler ran at once shows whether the others queued. Modes: sinks; sliding = stock
vLLM with every layer given a --sliding-window; dense = stock FlashAttention.
    python benchmarks/bench_endless.py --mode sinks --lengths 16384,65536,262144 --out ...
    python benchmarks/bench_endless.py --mode sliding --out ...
    python benchmarks/bench_endless.py --mode dense --lengths 16384,65536 --out ...
CPU smoke (CI): --shape tiny --streams 2 --lengths 200,400 --gen 12 --short-gen 4 --window-tokens 40
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sinks", "sliding", "dense"], required=True)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--lengths", default="16384,65536,262144")
    p.add_argument("--gen", type=int, default=0, help="tokens generated per stream; 0: auto (see above)")
    p.add_argument("--short-gen", type=int, default=32)
    p.add_argument("--timed-steps", type=int, default=128, help="--gen 0: steps timed, all N decoding")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 16384 on a GPU")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=4092)
    p.add_argument("--sliding-window", type=int, default=4096, help="--mode sliding: vLLM's own window")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--model-root", default=os.environ.get("TMPDIR", "/tmp") + "/vllm_sinks_models")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the block counters are readable
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    from model_shapes import model_dir
    from run_record import device_and_mode_kwargs, emit, provenance
    from vllm import LLM

    lengths = [int(x) for x in a.lengths.split(",")]
    path = model_dir(a.model_root, a.shape, sliding_window=a.sliding_window if a.mode == "sliding" else None)
    on_gpu = _on_gpu()
    chunk = a.max_num_batched_tokens or (16384 if on_gpu else 2048)
    gens = {L: a.gen or a.short_gen + -(-a.streams * L // chunk) + a.timed_steps for L in lengths}
    kw = dict(load_format="dummy", enable_prefix_caching=False, max_num_seqs=a.streams,
              max_num_batched_tokens=chunk, max_model_len=max(L + gens[L] for L in lengths) + 16)  # fmt: skip
    kw.update(device_and_mode_kwargs(a.mode, on_gpu, a))
    t0 = time.perf_counter()
    llm = LLM(model=path, **kw)
    startup_s = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    pool_tokens = cache.num_gpu_blocks * cache.block_size
    managers = []
    if a.mode == "sinks":
        from vllm_sinks.kv.introspection import sink_managers

        managers = sink_managers(llm)
    rows = []
    for L in lengths:
        rows.append(_run_length(llm, managers, a, L, gens[L], pool_tokens, cache.block_size))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "endless_streams_workload_B",
        "mode": a.mode,
        "shape": a.shape,
        "streams": a.streams,
        "gen": {str(L): g for L, g in gens.items()},
        "short_gen": a.short_gen,
        "max_num_batched_tokens": chunk,
        "sink_tokens": a.sink_tokens if a.mode == "sinks" else None,
        "window_tokens": a.window_tokens if a.mode == "sinks" else None,
        "sliding_window": a.sliding_window if a.mode == "sliding" else None,
        "kv_pool_tokens": pool_tokens,
        "startup_s": round(startup_s, 1),
        "rows": rows,
        **provenance(__file__, argv),
    }
    return emit(result, a.out)


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _run_length(llm, managers, a, L: int, gen: int, pool_tokens: int, block_size: int) -> dict:
    """One length: N streams of L prompt tokens + `gen` generated, stepped with a clock per step."""
    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sinks.kv.introspection import real_blocks_per_request, scheduler_of

    engine = llm.llm_engine
    scheduler = scheduler_of(llm)
    rng = random.Random(L)
    sp = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True, detokenize=False)
    for m in managers:
        m.max_held_blocks = 0
    t0 = time.perf_counter()
    for i in range(a.streams):
        ids = [rng.randrange(3, 380) for _ in range(L)]
        engine.add_request(f"L{L}-{i}", TokensPrompt(prompt_token_ids=ids), sp)
    generated: dict[str, int] = {}
    steps: list[tuple[float, int]] = []  # (time, total generated) after each step
    decode_start: tuple[float, int] | None = None
    decode_end: tuple[float, int] | None = None  # the last step in which all N streams decoded
    prefill_peak = max_running = held_at_decode_start = held_before_end = streams_timed = 0
    bar = tqdm(total=a.streams * (L + gen), desc=f"L={L}", unit="tok", unit_scale=True)
    excluded_s = 0.0  # time spent in block snapshots inside the timed decode window, not counted
    while engine.has_unfinished_requests():
        before = (time.perf_counter(), sum(generated.values()))
        for out in engine.step():
            generated[out.request_id] = len(out.outputs[0].token_ids)
        total = sum(generated.values())
        max_running = max(max_running, len(scheduler.running))
        if decode_start is not None and decode_end is None and max(generated.values()) >= gen:
            decode_end = before  # a stream finished in this step: the window ends before it
        if decode_start is None and len(generated) == a.streams and min(generated.values()) >= a.short_gen:
            prefill_peak = max((m.max_held_blocks for m in managers), default=0)
            held_at_decode_start = max(real_blocks_per_request(llm).values(), default=0)
            for m in managers:
                m.max_held_blocks = 0
            streams_timed = sum(1 for n in generated.values() if n < gen)
            decode_start = (time.perf_counter(), total)  # the clock starts after the snapshot
        elif decode_start is not None and not held_before_end and min(generated.values()) >= gen - 2:
            t_snap = time.perf_counter()
            held_before_end = max(real_blocks_per_request(llm).values(), default=0)
            if decode_end is None:  # inside the timed window: not counted
                excluded_s += time.perf_counter() - t_snap
        steps.append((time.perf_counter(), total))
        bar.n = sum(min(n, 1) * L + n for n in generated.values())
        bar.refresh()
    bar.close()
    t_end, total_end = steps[-1]
    assert decode_start is not None and total_end == a.streams * gen, (decode_start, total_end)
    together = decode_end is not None and decode_end[1] > decode_start[1]
    if not together:  # e.g. dense at a length where the pool holds fewer than N streams: the rest queued
        print(f"L={L}: no step had all {a.streams} streams decoding together; decode_tok_s is not reported")
    timed_tokens = decode_end[1] - decode_start[1] if together else 0
    timed_s = decode_end[0] - decode_start[0] - excluded_s if together else 0.0
    row = {
        "length": L,
        "wall_s": round(t_end - t0, 2),
        "prefill_s": round(decode_start[0] - t0, 2),
        "gen": gen,
        "decode_window_s": round(timed_s, 3),
        "decode_tokens_timed": timed_tokens,
        "decode_steps_timed": timed_tokens // a.streams,
        "all_streams_decoded_together": together,
        "streams_decoding_when_timed": streams_timed if together else 0,
        "decode_tok_s": round(timed_tokens / timed_s, 1) if together else None,
        "dense_kv_tokens_needed": a.streams * (L + gen),
        "streams_that_fit_dense": pool_tokens // (L + gen),
        "max_streams_running_at_once": max_running,
        # Real blocks of the longest-holding stream, counted in vLLM's block tables (any backend).
        "kv_blocks_per_stream_at_decode_start": held_at_decode_start,
        "kv_blocks_per_stream_near_end": held_before_end,
        "block_size": block_size,
    }
    if managers:
        decode_blocks = max(m.max_held_blocks for m in managers)
        row["kv_blocks_per_stream_decode"] = decode_blocks
        row["kv_tokens_per_stream_decode"] = decode_blocks * block_size
        row["kv_blocks_per_stream_prefill_peak"] = prefill_peak
    return row


if __name__ == "__main__":
    main()
