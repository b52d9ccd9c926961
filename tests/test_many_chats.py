"""Many long chats on one KV pool (CPU, tiny model, in-process engines):

* paused chats resume from the prefix cache: 32 chats with 4,096-token histories (W=252; the histories are
  2.7 times the pool of 3,000 blocks), 512-token prefill chunks so that prefills outlast replies as 16k
  chunks of 64k histories do on a GPU. Before the tiered eviction order 0 of 32 resumed
  (benchmarks/results/paused_chats_cpu_2026-11-24_before.json); a regenerate right after the first turn
  hits too;
* the capacity SINKS states at start-up is what the scheduler does: chats with uncached long prompts
  arriving together decode at once exactly up to the stated number, with no preemption.
"""

from __future__ import annotations

import gc
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def _teardown():
    gc.collect()
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)


def test_paused_chats_resume_from_the_cache(tmp_path):
    import bench_paused_chats

    try:
        r = bench_paused_chats.main(
            ["--shape", "tiny", "--chats", "32", "--history", "4096", "--window-tokens", "252",
             "--num-gpu-blocks", "3000", "--max-num-batched-tokens", "512", "--model-root", str(tmp_path)]
        )  # fmt: skip
    finally:
        _teardown()
    assert r["chats"] * r["history_tokens"] > 2.5 * r["kv_pool_blocks"] * r["block_size"]
    assert r["states_whole_after_turn1"] >= 29
    assert r["regenerate_resumed"] >= 29
    assert r["turn2_resumed"] >= 29
    assert r["turn2_computed_tokens"] <= 32 * (64 + 200 + 2 * 16)
    assert r["preemptions_total"] == 0
    # Turn 2's steps: every chat decodes its 64-token reply, so at least 63 decode-only steps, each
    # scheduling no more chats than there are; nothing waits for a host tier (none configured).
    steps = r["turn2_steps"]
    assert steps["steps"] >= steps["decode_only_steps"] >= r["gen"] - 1, steps
    assert 1 <= steps["mean_scheduled_requests"] <= steps["max_scheduled_requests"] <= 32, steps
    assert steps["steps_with_loads_waiting"] == 0 and steps["decode_only_s"] > 0, steps


def test_stated_capacity_is_what_the_scheduler_admits(tmp_path):
    import bench_capacity

    try:
        r = bench_capacity.main(
            ["--shape", "tiny", "--chats", "26", "--prompt-len", "1024", "--window-tokens", "124",
             "--max-num-batched-tokens", "512", "--num-gpu-blocks", "227", "--model-root", str(tmp_path)]
        )  # fmt: skip
    finally:
        _teardown()
    stated = r["stated"]
    # Decoding: 1 sink block + ceil((124 + 1)/16) + 1 = 10 blocks; prefilling with 256-token chunks
    # (half the budget): 1 + ceil((124 + 256)/16) + 1 = 26 blocks.
    assert (stated["decode_blocks_bound"], stated["request_blocks_bound"]) == (10, 26)
    assert stated["max_concurrent_streams_cold"] == (226 - 26) // 10 + 1 < r["chats"]
    assert r["max_decoding_at_once"] == stated["max_concurrent_streams_cold"]
    assert r["max_prefilling_at_once"] == stated["max_concurrent_prefills"] == 2
    assert r["preemptions"] == 0


def test_paused_chats_restart_without_a_disk_tier_resumes_none(tmp_path):
    """bench_paused_chats --restart (the baseline for the disk tier, which runs on a GPU): turn 2 on a new
    engine finds no state, so every chat re-prefills; the new engine's own figures are reported."""
    import bench_paused_chats

    try:
        r = bench_paused_chats.main(
            ["--shape", "tiny", "--chats", "4", "--history", "600", "--window-tokens", "60", "--gen", "8",
             "--new-tokens", "24", "--no-regenerate", "--restart", "--enforce-eager",
             "--num-gpu-blocks", "400", "--max-num-batched-tokens", "512", "--model-root", str(tmp_path)]
        )  # fmt: skip
    finally:
        _teardown()
    assert r["restart_s"] > 0 and r["turn2_resumed"] == 0
    assert r["blocks_held_at_finish_per_chat"] > 0  # turn 1's states, recorded before the restart
    assert r["turn2_cached_tokens"] == 0 and r["turn2_computed_tokens"] == r["turn2_prompt_tokens"]
    assert r["turn2_steps"]["steps"] > 0
