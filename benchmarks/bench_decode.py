"""Decode throughput, Workload A of the performance issue: N streams with P-token random prompts, greedy,
ignore_eos; decode rate = N * (G - g) / (time to generate G tokens - time to generate g tokens).

One engine per run (one mode). Side by side = the same command with --mode sinks / sliding / dense on the
same host, e.g. on one H100:
    python benchmarks/bench_decode.py --mode sinks   --out benchmarks/results/decode_sinks.json
    python benchmarks/bench_decode.py --mode sliding --out benchmarks/results/decode_sliding.json
    python benchmarks/bench_decode.py --mode dense   --out benchmarks/results/decode_dense.json
CPU smoke (CI): --shape tiny --streams 2 --prompt-len 64 --gen 24 --short-gen 8 --device-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sinks", "sliding", "dense"], required=True)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=8192)
    p.add_argument("--gen", type=int, default=576)
    p.add_argument("--short-gen", type=int, default=64)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=4092)
    p.add_argument("--sliding-window", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--startup-only", action="store_true", help="build the engine, report startup_s, exit")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--distributed-executor-backend", default=None, help="e.g. ray (default: vLLM's choice)")
    p.add_argument("--model-root", default=os.environ.get("TMPDIR", "/tmp") + "/vllm_sinks_models")
    p.add_argument("--out", default=None, help="JSON result file")
    return p.parse_args(argv)


def engine_kwargs(a) -> tuple[str, dict]:
    from model_shapes import model_dir

    kw = dict(
        load_format="dummy",
        enable_prefix_caching=False,
        max_num_seqs=a.streams,
        max_model_len=a.prompt_len + a.gen + 16,
        enforce_eager=a.enforce_eager,
        tensor_parallel_size=a.tensor_parallel_size,
        pipeline_parallel_size=a.pipeline_parallel_size,
    )
    if a.distributed_executor_backend:
        kw["distributed_executor_backend"] = a.distributed_executor_backend
    if a.tensor_parallel_size > 1:
        # FlashInfer's fused allreduce+RMSNorm (auto-selected "mnnvl" workspace) failed with
        # CUBLAS_STATUS_EXECUTION_FAILED on the 2 x H200 host, where NVLink multicast is off: use NCCL.
        kw["compilation_config"] = {"pass_config": {"fuse_allreduce_rms": False}}
        os.environ.setdefault("VLLM_ALLREDUCE_USE_SYMM_MEM", "0")
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except Exception:
        on_gpu = False
    if on_gpu:
        kw.update(dtype="bfloat16", gpu_memory_utilization=a.gpu_memory_utilization)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kw.update(dtype="float32", block_size=16, gpu_memory_utilization=0.3)
    if a.mode == "sinks":
        path = model_dir(a.model_root, a.shape)
        kw.update(
            attention_backend="SINKS",
            additional_config={"sinks": {"sink_tokens": a.sink_tokens, "window_tokens": a.window_tokens}},
        )
    elif a.mode == "sliding":
        path = model_dir(a.model_root, a.shape, sliding_window=a.sliding_window)
        if on_gpu:
            kw.update(attention_backend="FLASH_ATTN")
    else:
        path = model_dir(a.model_root, a.shape)
        if on_gpu:
            kw.update(attention_backend="FLASH_ATTN")
    return path, kw


def main(argv=None) -> dict:
    a = parse(argv)
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    from run_record import device, emit, provenance
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path, kw = engine_kwargs(a)
    t0 = time.perf_counter()
    llm = LLM(model=path, **kw)
    startup_s = time.perf_counter() - t0
    if a.startup_only:
        result = {"mode": a.mode, "startup_s": round(startup_s, 2), "device": device()}
        print(json.dumps(result))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f)
        return result
    import random

    rng = random.Random(0)
    prompts = [
        TokensPrompt(prompt_token_ids=[rng.randrange(3, 380) for _ in range(a.prompt_len)])
        for _ in range(a.streams)
    ]

    def run(max_tokens: int) -> float:
        # detokenize=False: dummy weights emit ids the tiny tokenizer does not know; the front end must not
        # spend the step detokenizing them.
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return dt

    run(4)  # warm-up
    t_short = run(a.short_gen)
    t_long = run(a.gen)
    decode_tok_s = a.streams * (a.gen - a.short_gen) / (t_long - t_short)
    cache = llm.llm_engine.vllm_config.cache_config
    result = {
        "benchmark": "decode_workload_A",
        "mode": a.mode,
        "shape": a.shape,
        "streams": a.streams,
        "tensor_parallel_size": a.tensor_parallel_size,
        "pipeline_parallel_size": a.pipeline_parallel_size,
        "distributed_executor_backend": a.distributed_executor_backend,
        "prompt_len": a.prompt_len,
        "gen": a.gen,
        "short_gen": a.short_gen,
        "sink_tokens": a.sink_tokens if a.mode == "sinks" else None,
        "window_tokens": a.window_tokens if a.mode == "sinks" else None,
        "sliding_window": a.sliding_window if a.mode == "sliding" else None,
        "t_short_s": round(t_short, 3),
        "t_long_s": round(t_long, 3),
        "decode_tok_s": round(decode_tok_s, 1),
        "startup_s": round(startup_s, 1),
        "num_gpu_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "kv_pool_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
        "engine_kwargs": {k: v for k, v in kw.items()},
        **provenance(__file__, argv),
    }
    return emit(result, a.out)


if __name__ == "__main__":
    main()
