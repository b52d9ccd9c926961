"""Paused chats: N chats with L-token histories take a turn together, pause, then each resends its whole
history (previous prompt + reply) plus new tokens. A chat "resumes" when the prefix cache still holds its
resumable state (sink blocks + the blocks of its last W tokens), so turn 2 computes only its new tokens;
otherwise it re-prefills its entire history.

Reported per run: chats resumed in turn 2 (vLLM's per-request cached-token count), turn times, prompt tokens
computed vs served from the cache, preemptions, and where the resumable states went: how many states were
still whole in the cache right after turn 1 and right before turn 2 (state blocks still carrying their hash),
and turn 2's engine steps (`turn2_steps`: how many, how many requests each scheduled, how long decode-only
steps and steps with host-tier loads pending took).
Right after turn 1 every chat also resends its turn-1 prompt unchanged (a "regenerate"), which must hit too:
it needs the W tokens before the prompt's end, some of which left the window while the reply was decoded.
    python benchmarks/bench_paused_chats.py --chats 32,64 --history 65536 --out ...       # H100, 8B shape
    python benchmarks/bench_paused_chats.py --shape tiny --chats 32 --history 4096 --window-tokens 252 \
        --num-gpu-blocks 3000                                                               # CPU
With --kv-offloading-size GiB the states beyond the pool go to host memory (vLLM's KV offloading); with
--disk-tier DIR also to disk, and --restart serves turn 2 on a new engine (states from disk only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sinks", "sliding", "dense"], default="sinks")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--chats", default="32", help="N, or N1,N2,... (cases in one engine)")
    p.add_argument("--history", type=int, default=65536, help="turn-1 prompt tokens per chat")
    p.add_argument("--gen", type=int, default=64, help="reply tokens per turn")
    p.add_argument("--new-tokens", type=int, default=200, help="new user tokens in turn 2")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=4092)
    p.add_argument("--sliding-window", type=int, default=4096)
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="force the KV pool size (blocks)")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="default: 16384 GPU, vLLM's on CPU"
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's")
    p.add_argument(
        "--kv-offloading-size", type=float, default=None, help="GiB of host memory for vLLM's KV offloading"
    )
    p.add_argument(
        "--disk-tier",
        default=None,
        help="with --kv-offloading-size: vLLM's file-system tier in this directory behind the host tier "
        "(TieringOffloadingSpec; the host tier then lives in /dev/shm)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="shut the engine down after turn 1 and serve turn 2 on a new one (its GPU pool and host tier "
        "empty; with --disk-tier the same disk and PYTHONHASHSEED; without, the baseline of a restart)",
    )
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-regenerate", action="store_true", help="skip the regenerate between the turns")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-root", default=os.environ.get("TMPDIR", "/tmp") + "/vllm_sinks_models")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def build_llm(a):
    from bench_endless import _on_gpu
    from model_shapes import model_dir
    from run_record import device_and_mode_kwargs
    from vllm import LLM

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the block pool is readable
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    path = model_dir(a.model_root, a.shape, sliding_window=a.sliding_window if a.mode == "sliding" else None)
    on_gpu = _on_gpu()
    kw = dict(
        load_format="dummy",
        enable_prefix_caching=True,
        max_model_len=a.history + 2 * a.gen + a.new_tokens + 64,
    )
    if a.max_num_seqs:
        kw["max_num_seqs"] = a.max_num_seqs
    if a.max_num_batched_tokens or on_gpu:
        kw["max_num_batched_tokens"] = a.max_num_batched_tokens or 16384
    if a.num_gpu_blocks:
        kw["num_gpu_blocks_override"] = a.num_gpu_blocks
    if a.kv_offloading_size and a.disk_tier:
        from vllm.config import KVTransferConfig

        tiers = {
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": int(a.kv_offloading_size * 2**30),
            "secondary_tiers": [{"type": "fs", "root_dir": a.disk_tier}],
        }
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="OffloadingConnector", kv_role="kv_both", kv_connector_extra_config=tiers
        )
    elif a.kv_offloading_size:
        kw.update(kv_offloading_size=a.kv_offloading_size, kv_offloading_backend="native")
    if a.enforce_eager:
        kw["enforce_eager"] = True
    kw.update(device_and_mode_kwargs(a.mode, on_gpu, a))
    return LLM(model=path, **kw), kw


class StateTracker:
    """Records each finished request's blocks (with their hashes) and counts later which are still cached.
    Wraps each manager's pop_blocks_for_free (every free path goes through it) and the scheduler's
    preemption, for the run (benchmark instrumentation only)."""

    def __init__(self, scheduler) -> None:
        self.manager = scheduler.kv_cache_manager
        self.states: dict[str, list[tuple[object, object]]] = {}
        self.preemptions = 0
        original_preempt = scheduler._preempt_request
        for manager in self.manager.coordinator.single_type_managers:
            manager.pop_blocks_for_free = self._recording(manager.pop_blocks_for_free)

        def preempt(request, timestamp):
            self.preemptions += 1
            return original_preempt(request, timestamp)

        scheduler._preempt_request = preempt

    def _recording(self, original):
        def pop_blocks_for_free(request_id):
            blocks = original(request_id)
            self.states.setdefault(request_id, []).extend(
                (b, b.block_hash) for b in blocks if b.block_hash is not None
            )
            return blocks

        return pop_blocks_for_free

    def whole(self, request_ids) -> int:
        """States of these requests whose every recorded block still carries its hash (not evicted).
        vLLM suffixes the ids it hands to the engine core ("<id>-<random>"), so match on the prefix."""
        wanted = set(request_ids)
        return sum(
            1
            for rid, blocks in self.states.items()
            if rid.rsplit("-", 1)[0] in wanted and blocks and all(b.block_hash == h for b, h in blocks)
        )


class StepRecorder:
    """Each engine step of a turn (benchmark instrumentation only): when it started, how many requests it
    scheduled and how many tokens, and how many requests waited for a KV load from the host tier. Turn 2's
    time is then read as steps x their length: a pool that holds fewer running chats at once takes more
    decode steps for the same replies, which is not the cost of the transfers."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.rows: list[tuple[float, int, int, int, int]] | None = None
        original = scheduler.schedule

        def schedule(*args, **kwargs):
            out = original(*args, **kwargs)
            if self.rows is not None:
                from vllm.v1.request import RequestStatus

                tokens = out.num_scheduled_tokens
                # vLLM parks a request whose KV loads from the host tier in skipped_waiting until it is loaded
                queued = [*scheduler.waiting, *getattr(scheduler, "skipped_waiting", ())]
                loading = sum(r.status == RequestStatus.WAITING_FOR_REMOTE_KVS for r in queued)
                decodes = sum(n == 1 for n in tokens.values())
                total = out.total_num_scheduled_tokens
                self.rows.append((time.perf_counter(), len(tokens), total, decodes, loading))
            return out

        scheduler.schedule = schedule

    def start(self) -> None:
        self.rows = []

    def stop(self, end: float) -> dict:
        rows, self.rows = self.rows or [], None
        if not rows:
            return {}
        lengths = [b[0] - a[0] for a, b in zip(rows, rows[1:], strict=False)] + [end - rows[-1][0]]
        decode_only = [i for i, r in enumerate(rows) if r[1] and r[3] == r[1]]
        waiting = [i for i, r in enumerate(rows) if r[4]]
        idle = [i for i, r in enumerate(rows) if not r[1]]
        return {
            "steps": len(rows),
            "decode_only_steps": len(decode_only),
            "decode_only_s": round(sum(lengths[i] for i in decode_only), 3),
            "mean_scheduled_requests": round(sum(r[1] for r in rows) / len(rows), 1),
            "max_scheduled_requests": max(r[1] for r in rows),
            "steps_with_loads_waiting": len(waiting),
            "steps_with_loads_waiting_s": round(sum(lengths[i] for i in waiting), 3),
            "idle_steps": len(idle),
            "idle_s": round(sum(lengths[i] for i in idle), 3),
        }


def run_turn(llm, prompts, gen, tag):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    return outs, wall


def drain_offloading(llm) -> int | None:
    """With KV offloading: steps the in-process engine until the connector has no job left (a finished
    request's last chunks are stored on the step after it finished) and returns SINKS' chunks stored."""
    from vllm_sinks.kv.introspection import scheduler_of
    from vllm_sinks.kv.offload import sink_offloading_scheduler

    scheduler = scheduler_of(llm)
    if scheduler.connector is None:
        return None
    connector = scheduler.connector.connector_scheduler
    for _ in range(100):
        if not (scheduler.has_requests() or connector.has_pending_push_work()):
            break
        llm.llm_engine.step()
    policy = sink_offloading_scheduler(scheduler)
    return policy.num_stored_chunks if policy is not None else None


def resumed(cached: int, reusable: int, block_size: int) -> bool:
    """Everything reusable came from the cache but the last partial block (hits are whole blocks, and the
    last prompt token is always recomputed)."""
    return cached >= (reusable // block_size) * block_size - block_size


class Engine:
    """The benchmark's in-process engine and its trackers. `restart` (--restart) shuts the engine down (its
    disk tier drained) and drops every reference to it before building the next, so that the new engine
    finds the GPU memory free."""

    def __init__(self, a) -> None:
        self.a = a
        self.start()

    def start(self) -> None:
        from vllm_sinks.kv.introspection import scheduler_of

        self.llm, self.kw = build_llm(self.a)
        self.scheduler = scheduler_of(self.llm)
        self.tracker, self.steps = StateTracker(self.scheduler), StepRecorder(self.scheduler)

    def close(self) -> None:
        """Shut the engine down: with vLLM's tiered offloading spec this drains its disk tier and removes its
        CPU tier's /dev/shm region (an in-process engine is not shut down at interpreter exit, so a region
        left open would stay behind, as large as the tier)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()

    def restart(self) -> None:
        import gc

        import torch

        self.close()
        self.llm = self.scheduler = self.tracker = self.steps = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.start()


def run_case(eng: Engine, a, chats: int, seed: int) -> dict:
    """One case: `chats` chats take turn 1, a regenerate, then turn 2 (see module docstring); with --restart
    the engine is replaced between the regenerate and turn 2 (turn 2's figures are the new engine's)."""
    llm, tracker = eng.llm, eng.tracker
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    rng = random.Random(seed)
    vocab = 380 if a.shape == "tiny" else 120_000
    prompts1 = [[rng.randrange(3, vocab) for _ in range(a.history)] for _ in range(chats)]
    preempt0 = tracker.preemptions
    outs1, wall1 = run_turn(llm, prompts1, a.gen, "turn1")
    ids1 = [o.request_id for o in outs1]
    whole_after_turn1 = tracker.whole(ids1)
    stored_turn1 = drain_offloading(llm)
    # A regenerate right after the turn that filled the pool: the same prompts again.
    resumed_r, wall_r = None, None
    if not a.no_regenerate:
        outs_r, wall_r = run_turn(llm, prompts1, a.gen, "regenerate")
        cached_r = [o.num_cached_tokens or 0 for o in outs_r]
        resumed_r = sum(resumed(c, len(p), block_size) for c, p in zip(cached_r, prompts1, strict=True))
    prompts2 = [
        p + list(o.outputs[0].token_ids) + [rng.randrange(3, vocab) for _ in range(a.new_tokens)]
        for p, o in zip(prompts1, outs1, strict=True)
    ]
    state_blocks = [len(v) for k, v in tracker.states.items() if k.rsplit("-", 1)[0] in set(ids1)]
    restart_s = None
    if a.restart:
        t0 = time.perf_counter()
        preempt0 -= tracker.preemptions  # turn 1's preemptions, carried over to the new engine's count
        llm = tracker = None
        eng.restart()
        llm, tracker = eng.llm, eng.tracker
        restart_s = round(time.perf_counter() - t0, 2)
    preempt_before = tracker.preemptions
    eng.steps.start()
    outs2, wall2 = run_turn(llm, prompts2, a.gen, "turn2")
    turn2_steps = eng.steps.stop(time.perf_counter())
    preempt_turn2 = tracker.preemptions - preempt_before
    reusable2 = [len(p) + len(o.outputs[0].token_ids) for p, o in zip(prompts1, outs1, strict=True)]
    cached2 = [o.num_cached_tokens or 0 for o in outs2]
    resumed2 = sum(resumed(c, r, block_size) for c, r in zip(cached2, reusable2, strict=True))
    ids2 = [o.request_id for o in outs2]
    return {
        "chats": chats,
        "blocks_held_at_finish_per_chat": max(state_blocks, default=0),
        "turn1_s": round(wall1, 2),
        "states_whole_after_turn1": whole_after_turn1,
        "regenerate_s": None if wall_r is None else round(wall_r, 2),
        "regenerate_resumed": resumed_r,
        **({"restart_s": restart_s} if a.restart else {}),
        "turn2_s": round(wall2, 2),
        "turn2_resumed": resumed2,
        "turn2_prompt_tokens": sum(len(p) for p in prompts2),
        "turn2_cached_tokens": sum(cached2),
        "turn2_computed_tokens": sum(len(p) for p in prompts2) - sum(cached2),
        "turn2_preemptions": preempt_turn2,
        # cached tokens of each chat that re-prefilled (a state lost shows as 0 or its sink block)
        "turn2_not_resumed_cached": [
            c for c, r in zip(cached2, reusable2, strict=True) if not resumed(c, r, block_size)
        ],
        "states_whole_after_turn2": tracker.whole(ids2),
        "preemptions_total": tracker.preemptions - preempt0,
        "turn2_s_per_chat": round(wall2 / chats, 4),
        "turn2_steps": turn2_steps,
        **(
            {"offload_chunks_stored_per_chat": round(stored_turn1 / chats, 2)}
            if stored_turn1 is not None
            else {}
        ),
    }


def offload_figures(scheduler, a) -> dict:
    """With --kv-offloading-size: the host tier's figures (SINKS: kv.offload's counters; host bytes per chat
    = chunks stored per chat x bytes of one block over all layers)."""
    if not a.kv_offloading_size:
        return {}
    from vllm_sinks.kv.offload import sink_offloading_scheduler

    out: dict = {"kv_offloading_size_gib": a.kv_offloading_size, "disk_tier": bool(a.disk_tier)}
    policy = sink_offloading_scheduler(scheduler)
    if policy is None:
        return out
    config = scheduler.kv_cache_config
    block_bytes = sum(t.size for t in config.kv_cache_tensors) // config.num_blocks
    state_blocks = -(-a.sink_tokens // 16) + -(-a.window_tokens // 16) + 1
    return out | {
        "offload": policy.stats(),
        "block_bytes": block_bytes,
        "resumable_state_bytes": state_blocks * block_bytes,
    }


def main(argv=None) -> dict:
    """--chats N: one case; --chats N1,N2,...: one case each in the same engine, the prefix cache reset in
    between (the result's `cases`)."""
    a = parse(argv)
    from run_record import emit

    if a.disk_tier and not os.environ.get("PYTHONHASHSEED"):
        os.environ["PYTHONHASHSEED"] = "0"  # the block hashes (the disk tier's file names) survive a restart
    eng = Engine(a)
    try:
        result = run_cases(eng, a, argv)
    finally:
        eng.close()
    return emit(result, a.out)


def run_cases(eng: Engine, a, argv) -> dict:
    from run_record import provenance

    cases = []
    for i, chats in enumerate(int(x) for x in str(a.chats).split(",")):
        if i:
            assert eng.llm.reset_prefix_cache(), "the previous case left blocks held"
        cases.append(run_case(eng, a, chats, a.seed + i))
        print(json.dumps(cases[-1]), flush=True)
    llm, scheduler = eng.llm, eng.scheduler  # turn 2's engine (--restart: the last one built)
    return {
        "benchmark": "paused_chats",
        "mode": a.mode,
        "shape": a.shape,
        "history_tokens": a.history,
        "gen": a.gen,
        "new_tokens": a.new_tokens,
        "sink_tokens": a.sink_tokens if a.mode == "sinks" else None,
        "window_tokens": a.window_tokens if a.mode == "sinks" else None,
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        "kv_pool_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks,
        "max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens,
        **(cases[0] if len(cases) == 1 else {"cases": cases}),
        **offload_figures(scheduler, a),
        **provenance(__file__, argv),
    }


if __name__ == "__main__":
    main()
