"""Host memory of one live session as it grows (vllm_sinks.sessions on AsyncLLM, SINKS): the resident memory
of the front-end process, the engine core and its workers every --sample-every tokens, and the bytes each
session token costs (the slope after the first sample): of the whole process tree with each page counted
once (PSS), per process (USS, its own pages) and shared between them, next to the sum of RSS. KV memory
is flat by construction (S + W tokens); this measures what is not: vLLM's Request keeps every token id (and
a block hash per full block) for the life of the request, in the engine core and in the front end.

    python benchmarks/bench_session_memory.py --tokens 400000 --out session_memory.json      (CPU, tiny model)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=400_000, help="grow the session to this many tokens")
    p.add_argument("--message", type=int, default=1000, help="tokens per message")
    p.add_argument("--gen", type=int, default=16, help="tokens generated per reply")
    p.add_argument("--sample-every", type=int, default=50_000)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=60)
    p.add_argument("--kv-blocks", type=int, default=512,
                   help="KV pool size in blocks (num_gpu_blocks_override). A block that leaves a session's "
                   "window stays in vLLM's prefix cache until reused: a pool of N blocks adds up to N hash "
                   "entries, bounded, but over a large pool it looks like growth per token")  # fmt: skip
    p.add_argument("--model", default=None, help="a checkpoint folder (default: a tiny random Llama)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _tree(measure) -> dict:
    """measure(process) for this process and each live descendant, keyed by name and pid."""
    import psutil

    me = psutil.Process()
    out = {f"front-end {me.pid}": measure(me)}
    for child in me.children(recursive=True):
        try:
            out[f"{child.name()} {child.pid}"] = measure(child)
        except psutil.NoSuchProcess:
            pass
    return out


def tree_rss_mib() -> dict[str, float]:
    """Resident memory (MiB) of this process and of each descendant, keyed by name and pid."""
    return _tree(lambda p: p.memory_info().rss / 2**20)


def tree_memory_mib() -> dict[str, dict[str, float]]:
    """Memory (MiB) of this process and of each descendant, keyed by name and pid: rss, pss (shared pages
    split among the processes that map them, so the tree's pss sums count each page once) and uss (pages
    of that process alone). The engine core and a CPU worker share vLLM's shared-memory message ring
    (/dev/shm), which a sum of RSS counts twice."""

    def one(p) -> dict[str, float]:
        info = p.memory_full_info()
        return {"rss": info.rss / 2**20, "pss": info.pss / 2**20, "uss": info.uss / 2**20}

    return _tree(one)


async def grow(a: argparse.Namespace, engine) -> list[dict]:
    import random

    from vllm_sinks.sessions import Session

    rng = random.Random(0)
    session = Session(engine, temperature=0.0, ignore_eos=True)
    samples, total, next_sample, times = [], 0, 0, []
    while True:
        if total >= next_sample:
            mem = tree_memory_mib()
            recent = sorted(times[-21:])
            turn_ms = round(recent[len(recent) // 2] * 1e3, 1) if recent else None
            sample = {"tokens": total, "turn_ms_median_recent": turn_ms}
            for kind in ("rss", "pss", "uss"):
                sample[f"{kind}_mib"] = {k: round(v[kind], 1) for k, v in mem.items()}
                sample[f"{kind}_total_mib"] = round(sum(v[kind] for v in mem.values()), 1)
            samples.append(sample)
            print(total, sample["rss_total_mib"], sample["pss_total_mib"], turn_ms, flush=True)
            next_sample += a.sample_every
        if total >= a.tokens:
            break
        # Ids above 256, as most of a real vocabulary's: CPython shares the objects of small ints, which would
        # hide what a Python list of token ids costs.
        message = [rng.randrange(257, 380) for _ in range(a.message)]
        t0 = time.perf_counter()
        async for reply in session.send(message, max_tokens=a.gen):  # noqa: B007 - the last one is kept
            pass
        times.append(time.perf_counter() - t0)
        total += len(message) + len(reply.token_ids) - 1
    await session.close()
    return samples


def run_on_engine(engine_args, work):
    """Builds an AsyncLLM from `engine_args`, runs the coroutine `work(engine)` on one event loop (the
    engine's output handler runs on it), shuts the engine down and drains the loop; returns work's result."""
    from vllm.v1.engine.async_llm import AsyncLLM

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    engine = AsyncLLM.from_engine_args(engine_args)
    try:
        return loop.run_until_complete(work(engine))
    finally:
        engine.shutdown()
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def main(argv=None) -> dict:
    a = parse(argv)
    from run_record import emit, provenance
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_sinks_testing.tiny_model import TinyLlamaSpec, build_tiny_llama

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    path = a.model or build_tiny_llama(tempfile.mkdtemp(prefix="session_memory_"), TinyLlamaSpec())
    max_model_len = a.tokens + a.message + 2 * a.gen + 64
    args = AsyncEngineArgs(model=path, attention_backend="SINKS", dtype="float32", enforce_eager=True,
                           block_size=16, gpu_memory_utilization=0.3, max_model_len=max_model_len,
                           max_num_seqs=4, max_num_batched_tokens=2048, num_gpu_blocks_override=a.kv_blocks,
                           additional_config={"sinks": {"sink_tokens": a.sink_tokens,
                                                        "window_tokens": a.window_tokens}})  # fmt: skip
    samples = run_on_engine(args, lambda engine: grow(a, engine))
    first, last = samples[min(1, len(samples) - 2)], samples[-1]  # the first sample after warm-up
    tokens = max(1, last["tokens"] - first["tokens"])

    def slope(kind: str) -> float:
        return round((last[f"{kind}_total_mib"] - first[f"{kind}_total_mib"]) * 2**20 / tokens, 1)

    def per_process(kind: str) -> dict[str, float]:
        grown = {}
        for name, mib in last[f"{kind}_mib"].items():
            b = (mib - first[f"{kind}_mib"].get(name, 0.0)) * 2**20
            grown[name.rsplit(" ", 1)[0]] = round(b / tokens, 1)
        return grown

    pss_slope, uss_slope = slope("pss"), slope("uss")
    result = {
        "benchmark": "session host memory",
        "session_tokens": samples[-1]["tokens"],
        "message_tokens": a.message,
        "gen_tokens": a.gen,
        "sink_tokens": a.sink_tokens,
        "window_tokens": a.window_tokens,
        "max_model_len": max_model_len,
        "kv_blocks": a.kv_blocks,
        # The tree's memory, each page once (PSS); shared = what the processes share (vLLM's message ring).
        "bytes_per_session_token": pss_slope,
        "bytes_per_session_token_by_process": per_process("uss"),
        "bytes_per_session_token_shared": round(pss_slope - uss_slope, 1),
        # The sum of RSS (the measure of earlier runs): pages mapped by two processes count twice.
        "rss_sum_bytes_per_session_token": slope("rss"),
        "rss_bytes_per_session_token_by_process": per_process("rss"),
        "samples": samples,
        **provenance(__file__, argv),
    }
    return emit(result, a.out)


if __name__ == "__main__":
    main()
