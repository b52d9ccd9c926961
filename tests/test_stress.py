"""A randomized, seeded, bounded stress test of SINKS' scheduling and block policy (CPU, in-process engine).

Each configuration drives one engine core for STEPS steps with random traffic: bursts of arrivals up to and
past max_num_seqs (fresh chats, chats resumed from the cache with their whole history plus new tokens,
regenerates of a finished prompt, live sessions' next turns), aborts mid-prefill and mid-decode, and forced
preemption (every free block taken away for a few steps). Every step's SchedulerOutput runs through model
runner V1 (vLLM-CPU's runner, which computes the tokens) and through model runner V2's block-table staging
replayed on the CPU (tests/v2_staging.py: vLLM's own BlockTables and staged-write buffers), with
sparse block rows (the default) or vLLM's lists.

Checked at every step: no exception; every live request's row in V2's table holds the scheduler's block id
wherever the scheduler holds a real block, and has its length; no request holds more real blocks than
SinksConfig.max_blocks_per_request; no sparse row fell back to a list for want of staging room.
At the end: every request finished or was aborted, the scheduler holds none, every block is back in the pool,
and every finished request's greedy tokens (every live session's replies) equal what the engine computes for
the same stream served alone (teacher-forced: each token the argmax there, or within 1e-4 of it).

test_stress_finds_the_burst_overflow runs the same driver on V2's buffers as vLLM sizes them and the writer
of 5422dd8 (no room check): it must die as the engine did on an H100 ("could not broadcast input array").
"""

from __future__ import annotations

import os
import random

import pytest
from engines import shut_down
from stress_driver import TIE, Driver, check_alone
from v2_staging import V2BlockTableMirror

S, W, B = 4, 60, 16
STEPS = int(os.environ.get("STRESS_STEPS", 2000))
MAX_MODEL_LEN = 8192


@pytest.fixture(scope="module", params=[4, 1], ids=lambda n: f"max_num_seqs{n}")
def engine(request, model_dir):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    max_seqs = request.param
    llm = LLM(
        model=model_dir("hd64-gqa", head_dim=64, num_heads=4, num_kv_heads=2),
        attention_backend="SINKS",
        dtype="float32",
        enforce_eager=True,
        block_size=B,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=256,
        max_model_len=MAX_MODEL_LEN,
        enable_prefix_caching=True,
        num_gpu_blocks_override=40 * max_seqs + 30,  # a small pool: preemption and eviction under bursts
        additional_config={"sinks": {"sink_tokens": S, "window_tokens": W}},
    )
    yield llm
    shut_down(llm)
    del llm
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)


@pytest.mark.parametrize("rows", ["sparse", "lists"])
def test_random_traffic_keeps_every_invariant(engine, rows):
    llm = engine
    llm.reset_prefix_cache()
    from vllm_sinks.kv.introspection import sink_managers

    (manager,) = sink_managers(llm)
    free_before = manager.block_pool.get_num_free_blocks()
    mirror = V2BlockTableMirror(llm.llm_engine.vllm_config, MAX_MODEL_LEN)
    rng = random.Random(f"{rows}-{mirror.max_num_reqs}")
    driver = Driver(llm, rng, mirror, sparse=rows == "sparse", sinks=(S, W), max_model_len=MAX_MODEL_LEN)
    stats = driver.run(STEPS)
    driver.check_end(free_before)
    checked, ties = check_alone(llm, driver.streams())
    print(f"{rows}, max_num_seqs {mirror.max_num_reqs}: {STEPS} steps, {stats}; V2 staging: at most "
          f"{mirror.max_writes_staged} writes in a step (room for {mirror.capacity()}); {checked} tokens "
          f"equal to the streams served alone ({ties} within {TIE} of a tie)")  # fmt: skip
    assert stats["preempted"] and stats["aborted_prefill"] and stats["aborted_decode"]
    assert stats["resumed_chats"] and stats["regenerates"] and checked
    assert stats["session_turns"] or driver.max_sessions == 0
    if rows == "sparse":
        assert stats["sparse_rows"], "no request reached the worker as a sparse row"


def test_stress_finds_the_burst_overflow(engine, monkeypatch):
    """The driver on V2's staging as vLLM 0.26 sizes it (one write per request and step) with the sparse
    writer of 5422dd8 (two writes per row, no room check) dies with the H100's error: the stress test sees
    the bug the default settings had."""
    from vllm_sinks.kv import block_rows

    llm = engine
    llm.reset_prefix_cache()
    monkeypatch.setattr(block_rows, "_staging_has_room", lambda tables, rows: True)
    mirror = V2BlockTableMirror(llm.llm_engine.vllm_config, MAX_MODEL_LEN, widen=False)
    driver = Driver(llm, random.Random("sparse-4"), mirror, True, sinks=(S, W), max_model_len=MAX_MODEL_LEN)
    with pytest.raises(ValueError, match="could not broadcast input array"):
        driver.run(STEPS)
    for req_id in list(driver.scheduler.requests):  # leave the engine clean for the next test
        driver.client.abort_requests([req_id])
    driver.client.get_output()
