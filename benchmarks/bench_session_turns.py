"""Turn latency of one live session against its length (vllm_sinks.sessions on AsyncLLM, SINKS).

The session is grown to each checkpoint by fill messages (--fill-message tokens, one generated token each),
then --probe-turns turns of --probe-message new tokens + --probe-gen generated tokens are timed there. Under
SINKS a turn computes its new tokens against S + W tokens of KV, so its time should not depend on how long
the session is; what can make it grow is host-side work per turn that scales with the history. Reported per
checkpoint: median and p90 turn time, the ratio of each median to the first checkpoint's, and the resident
memory of the front end, engine core and workers (bytes per session token between the first and last).

--handoff stock runs the same with vLLM's own hand-off of a resumed session (the whole prompt as a Python
list each turn; VLLM_SINKS_STOCK_SESSION_HANDOFF=1) for an A/B on one host. --block-rows sparse or lists sets
VLLM_SINKS_BLOCK_ROWS: a long session's block ids handed over as block_rows.SparseBlockRow or as vLLM's list
of every id (default: sparse).

    python benchmarks/bench_session_turns.py --shape llama3-8b --checkpoints 16384,262144,1048576   (GPU)
    python benchmarks/bench_session_turns.py --checkpoints 4096,65536,262144                          (CPU)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", help="a model shape of model_shapes.py (dummy weights)")
    p.add_argument("--checkpoints", default="4096,65536,262144", help="session lengths (tokens) to probe at")
    p.add_argument("--probe-turns", type=int, default=10)
    p.add_argument("--probe-message", type=int, default=200)
    p.add_argument("--probe-gen", type=int, default=64)
    p.add_argument("--fill-message", type=int, default=16384)
    p.add_argument("--fill-gen", type=int, default=1, help="tokens generated per fill message")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=None, help="default: 4092 on GPU, 252 on CPU")
    p.add_argument("--handoff", choices=("sinks", "stock"), default="sinks")
    p.add_argument("--block-rows", choices=("default", "sparse", "lists"), default="default")
    p.add_argument("--backend", default="SINKS", help="or a stock backend (e.g. FLASH_ATTN) for comparison")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--no-async-scheduling", action="store_true", help="vLLM's synchronous scheduler (GPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: last checkpoint + the probes")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV pool size in blocks (num_gpu_blocks_override; default: what memory allows). The "
                   "prefix cache keeps ~100 bytes of host memory per cached block, so a small pool bounds "
                   "that part early and leaves the per-token growth alone in the slope")  # fmt: skip
    p.add_argument("--model-root", default=os.environ.get("TMPDIR", "/tmp") + "/vllm_sinks_models")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


async def probe(a: argparse.Namespace, engine, checkpoints: list[int]) -> list[dict]:
    import random

    from bench_session_memory import tree_rss_mib

    from vllm_sinks.sessions import Session

    rng = random.Random(0)
    session = Session(engine, temperature=0.0, ignore_eos=True)
    total, rows = 0, []

    async def turn(n_new: int, gen: int, marks: list | None = None) -> float:
        """Sends one message; returns the turn's time. `marks`: appends (time to first token, mean time
        between later tokens) in seconds."""
        nonlocal total
        message = [rng.randrange(3, 380) for _ in range(n_new)]
        t0 = time.perf_counter()
        first = None
        async for reply in session.send(message, max_tokens=gen):  # noqa: B007 - the last one is kept
            if first is None and reply.token_ids:
                first = time.perf_counter()
        end = time.perf_counter()
        total += n_new + len(reply.token_ids) - 1
        if marks is not None and first is not None and len(reply.token_ids) > 1:
            marks.append((first - t0, (end - first) / (len(reply.token_ids) - 1)))
        return end - t0

    for checkpoint in checkpoints:
        t_fill = time.perf_counter()
        while total + a.fill_message <= checkpoint:
            await turn(a.fill_message, a.fill_gen)
        if checkpoint - total > a.fill_gen:
            await turn(checkpoint - total - a.fill_gen + 1, a.fill_gen)
        fill_s = time.perf_counter() - t_fill
        start = total
        await turn(a.probe_message, a.probe_gen)  # one warm-up turn at this length, not timed
        marks: list = []
        times = sorted([await turn(a.probe_message, a.probe_gen, marks) for _ in range(a.probe_turns)])
        rss = tree_rss_mib()
        rows.append(
            {
                "session_tokens": start,
                "fill_s": round(fill_s, 1),
                "turn_ms_median": round(statistics.median(times) * 1e3, 1),
                "turn_ms_p90": round(times[int(0.9 * (len(times) - 1))] * 1e3, 1),
                "turn_ms_min": round(times[0] * 1e3, 1),
                "ttft_ms_median": round(statistics.median(m[0] for m in marks) * 1e3, 1) if marks else None,
                "itl_ms_median": round(statistics.median(m[1] for m in marks) * 1e3, 2) if marks else None,
                "rss_total_mib": round(sum(rss.values()), 1),
                "rss_mib": {k: round(v, 1) for k, v in rss.items()},
            }
        )
        print({k: v for k, v in rows[-1].items() if k != "rss_mib"}, flush=True)
    await session.close()
    return rows


def main(argv=None) -> dict:
    a = parse(argv)
    if a.handoff == "stock":
        os.environ["VLLM_SINKS_STOCK_SESSION_HANDOFF"] = "1"
    if a.block_rows != "default":
        os.environ["VLLM_SINKS_BLOCK_ROWS"] = a.block_rows
    import torch
    from bench_session_memory import run_on_engine
    from model_shapes import model_dir
    from run_record import emit, provenance
    from vllm.engine.arg_utils import AsyncEngineArgs

    on_gpu = torch.cuda.is_available()
    window = a.window_tokens or (4092 if on_gpu else 252)
    checkpoints = sorted(int(c) for c in a.checkpoints.split(","))
    probes = (a.probe_turns + 1) * (a.probe_message + a.probe_gen)
    max_model_len = a.max_model_len or checkpoints[-1] + probes + 1024
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    kw: dict = dict(
        model=model_dir(a.model_root, a.shape),
        load_format="dummy",
        attention_backend=a.backend,
        max_model_len=max_model_len,
        max_num_seqs=4,
        max_num_batched_tokens=max(8192, a.fill_message),
        long_prefill_token_threshold=max(8192, a.fill_message),
        num_gpu_blocks_override=a.kv_blocks,
    )
    if a.backend == "SINKS":
        kw["additional_config"] = {"sinks": {"sink_tokens": a.sink_tokens, "window_tokens": window}}
    if on_gpu:
        kw.update(dtype="bfloat16", gpu_memory_utilization=a.gpu_memory_utilization)
        if a.no_async_scheduling:
            kw.update(async_scheduling=False)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kw.update(dtype="float32", block_size=16, gpu_memory_utilization=0.3, enforce_eager=True)
    rows = run_on_engine(AsyncEngineArgs(**kw), lambda engine: probe(a, engine, checkpoints))
    first, last = rows[0], rows[-1]
    result = {
        "benchmark": "session turn latency against length",
        "backend": a.backend,
        "handoff": a.handoff,
        "block_rows": a.block_rows,
        "async_scheduling": not a.no_async_scheduling if on_gpu else False,
        "shape": a.shape,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "sink_tokens": a.sink_tokens,
        "window_tokens": window,
        "probe": {"message_tokens": a.probe_message, "generated_tokens": a.probe_gen, "turns": a.probe_turns},
        "fill_message_tokens": a.fill_message,
        "kv_blocks": a.kv_blocks,
        "max_model_len": max_model_len,
        "checkpoints": rows,
        "median_ratio_to_first": [round(r["turn_ms_median"] / first["turn_ms_median"], 3) for r in rows],
        "rss_bytes_per_session_token": round(
            (last["rss_total_mib"] - first["rss_total_mib"])
            * 2**20
            / max(1, last["session_tokens"] - first["session_tokens"]),
            1,
        ),
        **provenance(__file__, argv),
    }
    return emit(result, a.out)


if __name__ == "__main__":
    main()
