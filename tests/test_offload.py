"""SINKS with vLLM's KV offloading, scheduler side, on the CPU: vLLM's real Scheduler and OffloadingConnector
scheduler (its CPU store, LRU) with kv.offload's policy, the worker simulated (tests/offload_harness.py). The
worker side (vLLM's CUDA transfers) and the outputs run in tests/test_gpu_offload.py."""

from __future__ import annotations

import os
import random
import time
from types import SimpleNamespace

import pytest
from offload_harness import OffloadHarness, corrupt_sink_stores

S, W = 4, 60  # one sink block, window run of cdiv(61, 16) = 4 chunks
SINK_CHUNKS, WINDOW_CHUNKS = 1, 4


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 400) for _ in range(n)]


def _two_turns(h: OffloadHarness, chats: int, history: int, reply: int = 8, new: int = 24, seed: int = 0):
    """Turn 1 of every chat (one after another), then turn 2 of every chat: history + reply + new tokens.
    Returns the turn-1 and turn-2 request ids and prompts."""
    rng = random.Random(seed)
    first = {f"c{i}-t1": _prompt(rng, history) for i in range(chats)}
    for rid, prompt in first.items():
        h.add(rid, prompt, reply)
        h.run()
    second = {}
    for i in range(chats):
        rid = f"c{i}-t1"
        second[f"c{i}-t2"] = first[rid] + h.outputs[rid] + _prompt(rng, new)
    for rid, prompt in second.items():
        h.add(rid, prompt, reply)
        h.run()
    return first, second


@pytest.fixture(scope="module")
def tiny(model_dir):
    return model_dir("offload", head_dim=16, num_kv_heads=2, num_heads=2)


def test_paused_chats_resume_from_host_with_their_sinks(tiny):
    """12 chats x 400 tokens through a 48-block pool (a state is 1 + 4 blocks; the pool keeps the last few):
    turn 2 of every chat whose state left the GPU loads its sinks and window from the host and computes only
    what follows; every block a request reads holds its own KV (checked at every step)."""
    h = OffloadHarness(tiny, (S, W), num_gpu_blocks=48, host_chunks=400)
    first, second = _two_turns(h, chats=12, history=400, reply=40)
    policy = h.policy
    assert policy.sink_groups and policy.num_host_hits >= 8, policy.stats()
    for i in range(12):
        rid = f"c{i}-t2"
        prompt = second[rid]
        computed = h.num_computed_tokens_scheduled[rid]
        history = len(first[f"c{i}-t1"])
        # a hit at the last whole chunk of turn 1 (prompt and reply but its last token, which has no KV)
        assert computed == (history + 40 - 1) // 16 * 16, (rid, computed, history)
        assert computed < len(prompt)
    assert h.checked_blocks > 0
    # loads: per host hit, the sink chunk and the ceil(W/B) window blocks, never a middle chunk
    assert policy.num_loaded_chunks == policy.num_host_hits * (SINK_CHUNKS + WINDOW_CHUNKS)
    assert h.manager().block_pool.get_num_free_blocks() == 48 - 1  # every block back (less the null block)
    assert not h.manager().external_sinks and not h.manager().held_blocks


def _paused_chats_benchmark(tiny) -> tuple[OffloadHarness, dict[int, int], int, int]:
    """benchmarks/gpu/runs.sh offload on the harness (its scheduler side, exactly): 64 chats x 8,192 tokens
    arrive at once (W=1020, 64-token replies, 16,384-token steps), then all their turn 2s (+200 tokens),
    through a pool of 2,940 blocks (2/3 of their states) and 8,192 host chunks. Returns the harness, each
    chat's turn-2 computed tokens, where a resumed turn 2 starts, and the chunks turn 1 stored."""
    chats, history, reply, w = 64, 8192, 64, 1020  # a state: 1 + 64 + 1 chunks
    h = OffloadHarness(tiny, (S, w), num_gpu_blocks=2940, host_chunks=8192, max_num_seqs=256,
                       max_num_batched_tokens=16384)  # fmt: skip
    rng = random.Random(0)
    first = {i: _prompt(rng, history) for i in range(chats)}
    for i, prompt in first.items():
        h.add(f"c{i}-t1", prompt, reply)
    h.run()
    stored = h.policy.num_stored_chunks
    for i in range(chats):
        h.add(f"c{i}-t2", first[i] + h.outputs[f"c{i}-t1"] + _prompt(rng, 200), reply)
    h.run()
    computed = {i: h.num_computed_tokens_scheduled[f"c{i}-t2"] for i in range(chats)}
    return h, computed, (history + reply - 1) // 16 * 16, stored


def test_paused_chats_benchmark_resumes_every_chat(tiny):
    """Every turn 2 hits at its turn 1's last whole chunk, from the GPU or the host; each chat's stores
    in turn 1 stay within 1.1x its state (sinks, window, the block its reply ends in); every block read
    holds its own KV and every block is back at the end."""
    h, computed, resumed_at, stored = _paused_chats_benchmark(tiny)
    lost = {i: n for i, n in computed.items() if n != resumed_at}
    assert not lost, lost
    assert stored <= 1.1 * 64 * 66, stored
    assert h.policy.num_host_hits >= 16, h.policy.stats()
    assert h.manager().block_pool.get_num_free_blocks() == 2940 - 1


@pytest.mark.parametrize("stock", ["_update_req_states", "update_connector_output"])
def test_paused_chats_benchmark_loses_chats_under_vllms_bookkeeping(tiny, monkeypatch, stock):
    """The same under vLLM's own bookkeeping of a finished request's blocks (_update_req_states) or of its
    offloading state (update_connector_output): some chats lose their state."""
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import OffloadingConnectorScheduler

    from vllm_sinks.kv.offload import SinkOffloadingScheduler

    monkeypatch.setattr(SinkOffloadingScheduler, stock, getattr(OffloadingConnectorScheduler, stock))
    _, computed, resumed_at, _ = _paused_chats_benchmark(tiny)
    assert sum(n < resumed_at for n in computed.values()) >= 2, computed


def test_host_holds_only_resumable_states(tiny):
    """What reaches the host per chat: its sink chunk, the window before its prompt's end (a regenerate's
    hit) and, once it finished, the window before its end (the next turn's, reply included): chunks {0},
    [45, 49) and [47, 51) of 800 prompt + 24 reply tokens, never one of the 44 middle chunks."""
    from vllm.v1.kv_offload.base import make_offload_key

    h = OffloadHarness(tiny, (S, W), num_gpu_blocks=48, host_chunks=400)
    rng = random.Random(1)
    for i in range(6):
        h.add(f"c{i}", _prompt(rng, 800), 24)
    h.run()
    expected = set()
    for i in range(6):
        hashes = h.requests[f"c{i}"].block_hashes
        regen, turn = 799 // 16, (800 + 24 - 1) // 16
        chunks = {0, *range(regen - WINDOW_CHUNKS, regen), *range(turn - WINDOW_CHUNKS, turn)}
        expected |= {make_offload_key(hashes[j], 0) for j in chunks}
    assert set(h.policy.manager._policy.blocks) == expected
    assert h.policy.num_stored_chunks == len(expected) == 6 * 7


def test_host_lru_evicts_least_recent_states_first(tiny):
    """A host store of 3 states (18 chunks), 6 chats, the GPU's prefix cache emptied: c3-c5's states
    evicted c0-c2's; turn 2 of c5, then c4, resume from the host (a hit touches the state) and store their
    new chunks, which evict the least recently used state, c3's; the rest re-prefill."""
    h = OffloadHarness(tiny, (S, W), num_gpu_blocks=48, host_chunks=3 * (SINK_CHUNKS + WINDOW_CHUNKS + 1))
    rng = random.Random(2)
    first = {f"c{i}": _prompt(rng, 400) for i in range(6)}
    for rid, prompt in first.items():
        h.add(rid, prompt, 4)
        h.run()
    assert h.policy.num_evicted_chunks == 3 * (SINK_CHUNKS + WINDOW_CHUNKS + 1)  # c0-c2's states, whole
    assert h.scheduler.kv_cache_manager.reset_prefix_cache()  # the GPU pool forgets every state
    host_hits = []
    for rid in ("c5", "c4", "c3", "c2", "c1", "c0"):  # most recent first: a hit touches, a miss stores
        turn2 = f"{rid}-t2"
        before = h.policy.num_host_hits
        h.add(turn2, first[rid] + h.outputs[rid] + _prompt(rng, 20), 1)
        h.run()
        host_hits.append(h.policy.num_host_hits > before)
        assert (h.num_computed_tokens_scheduled[turn2] > 0) == host_hits[-1]
    assert host_hits == [True, True, False, False, False, False]


def _finish_then_reuse_at_once(h: OffloadHarness) -> tuple[list[int], list[int]]:
    """Chat a's turn 1 finishes with every other free block taken (as when running streams fill the pool),
    so the next step's prefill (b) reuses a's freed state blocks in the step that builds a's last store.
    Returns a's turn-2 prompt."""
    rng = random.Random(3)
    first = _prompt(rng, 400)
    h.add("a", first, 40)
    while not h.requests["a"].is_finished():
        h.step()
    pool = h.manager().block_pool
    queue = pool.free_block_queue
    held = pool.get_new_blocks(queue.num_dead_blocks)  # only a's state is left free
    assert queue.num_dead_blocks == 0 and queue.num_free_blocks == 8  # a's state; b's prompt takes 7
    h.add("b", _prompt(rng, 100), 4)
    h.run()
    pool.free_blocks(held)
    return first + h.outputs["a"] + _prompt(rng, 20)


def _turn_two_after(tiny, scenario) -> tuple[int, int, int]:
    """Runs `scenario` (turn 1 of chat a) in a 48-block pool, then a's turn 2: the host hits, the tokens
    turn 2 found computed, and the free blocks at the end."""
    h = OffloadHarness(tiny, (S, W), num_gpu_blocks=48, host_chunks=400)
    h.add("a2", scenario(h), 1)
    h.run()
    pool = h.manager().block_pool
    return h.policy.num_host_hits, h.num_computed_tokens_scheduled["a2"], pool.get_num_free_blocks()


def test_a_finished_chats_state_is_stored_when_its_blocks_are_reused_at_once(tiny):
    """Its window reaches the host (stored before the step's forward overwrites the blocks, checked by the
    rows check when turn 2 loads it), and turn 2 computes only what follows."""
    assert _turn_two_after(tiny, _finish_then_reuse_at_once) == (1, (400 + 40 - 1) // 16 * 16, 48 - 1)


def test_vllms_update_drops_that_state(tiny, monkeypatch):
    """The same under vLLM's own _update_req_states, which zeroes the reused blocks' pending positions:
    nothing of a's window reaches the host and turn 2 re-prefills all but its sink block."""
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import OffloadingConnectorScheduler

    from vllm_sinks.kv.offload import SinkOffloadingScheduler

    monkeypatch.setattr(
        SinkOffloadingScheduler, "_update_req_states", OffloadingConnectorScheduler._update_req_states
    )
    assert _turn_two_after(tiny, _finish_then_reuse_at_once)[:2] == (0, 16)


def _window_block_reused_while_running(h: OffloadHarness, reply: int = 47) -> list[int]:
    """Chat a (400 + 47 tokens) frees block 23 at 444 computed tokens, 2 tokens before it ends; a hit at
    its last block boundary (432) still needs it (the window of 432 starts at 372). Chat c, decoding beside
    it, takes that block in the same step (every other free block is taken for that step). Returns a's
    turn-2 prompt. With a 46-token reply the step is a's last."""
    rng = random.Random(4)
    first = _prompt(rng, 400)
    h.add("a", first, reply)
    pool = h.manager().block_pool
    while not h.requests["a"].is_finished():
        computed = h.requests["a"].num_computed_tokens
        if computed == 427:
            h.add("c", _prompt(rng, 32), 60)  # c needs a new block in the step that a frees block 23
        held = pool.get_new_blocks(pool.get_num_free_blocks()) if computed == 444 else []
        h.step()
        pool.free_blocks(held)
    h.run()
    return first + h.outputs["a"] + _prompt(rng, 20)


def test_a_window_block_reused_while_the_chat_runs_is_stored(tiny):
    """Stored in the step its block is taken (flushed before the forward writes it; the rows check reads
    it back on turn 2), so turn 2 resumes from the host at the last block boundary."""
    assert _turn_two_after(tiny, _window_block_reused_while_running) == (1, (400 + 47 - 1) // 16 * 16, 48 - 1)


def test_without_that_store_the_state_is_lost(tiny, monkeypatch):
    """Not stored (vLLM zeroes the position), the host lacks block 23 and turn 2 re-prefills all but its
    sink block: what 7 of 64 chats did on an H100 before this store."""
    from vllm_sinks.kv.offload import SinkOffloadingScheduler

    monkeypatch.setattr(SinkOffloadingScheduler, "_freed_resumable", lambda *args: [])
    assert _turn_two_after(tiny, _window_block_reused_while_running)[:2] == (0, 16)


def _window_block_reused_in_the_last_step(h: OffloadHarness) -> list[int]:
    return _window_block_reused_while_running(h, reply=46)


def test_a_state_block_reused_in_the_last_step_leaves_the_rest_stored(tiny):
    """Block 23 reused in a's last step: its own store completes in the output where a finishes, and a's
    last window (stored in the next step) is stored too, so turn 2 resumes at its last block boundary."""
    assert _turn_two_after(tiny, _window_block_reused_in_the_last_step) == (1, (400 + 46 - 1) // 16 * 16, 47)


def test_vllm_forgets_a_finished_request_whose_last_job_completed(tiny, monkeypatch):
    """Under vLLM's update_connector_output alone, that completion deletes a's offloading state before the
    next step builds a's last stores: the host lacks a's end-of-turn window, and turn 2 falls back to the
    state before its turn-1 prompt's end (384), recomputing the reply. (On the CPU harness in the H100
    benchmark's shape, 4 of 64 chats lost their state so.)"""
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import OffloadingConnectorScheduler

    from vllm_sinks.kv.offload import SinkOffloadingScheduler

    stock = OffloadingConnectorScheduler.update_connector_output
    monkeypatch.setattr(SinkOffloadingScheduler, "update_connector_output", stock)
    assert _turn_two_after(tiny, _window_block_reused_in_the_last_step)[:2] == (1, (400 - 1) // 16 * 16)


def test_the_rows_check_sees_a_store_not_flushed(tiny, monkeypatch):
    """Kept but not flushed, a's window is stored after b's forward wrote b's KV into its blocks: the
    resumed turn reads b's KV, and the rows check fails."""
    from vllm_sinks.kv.offload import SinkOffloadingScheduler

    original = SinkOffloadingScheduler._build_store_jobs

    def no_flush(self, scheduler_output):
        jobs = original(self, scheduler_output)
        self._current_batch_jobs_to_flush.difference_update(jobs)
        return jobs

    monkeypatch.setattr(SinkOffloadingScheduler, "_build_store_jobs", no_flush)
    with pytest.raises(AssertionError, match="a2: block .* does not hold its KV"):
        _turn_two_after(tiny, _finish_then_reuse_at_once)


def test_stock_policy_loses_the_sinks(tiny, monkeypatch):
    """The same resume under vLLM's own policy, which sees a plain sliding window: the sink block the KV
    manager allocates for the hit is one more block than its window, and vLLM's scheduler asserts."""
    from vllm.distributed.kv_transfer.kv_connector.v1 import offloading_connector
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import OffloadingConnectorScheduler

    monkeypatch.setattr(offloading_connector, "OffloadingConnectorScheduler", OffloadingConnectorScheduler)
    h = OffloadHarness(tiny, (S, W), num_gpu_blocks=48, host_chunks=400)
    with pytest.raises(AssertionError) as failure:
        _two_turns(h, chats=12, history=400)
    assert "update_state_after_alloc" in str(failure.traceback[-1].name)


def test_corrupted_sinks_on_the_host_fail_the_check(tiny, monkeypatch):
    """The check of the resume test sees the sinks: store each chat's sink chunk from another of its blocks
    and the first resumed chat that reads it fails."""
    corrupt_sink_stores(monkeypatch)
    h = OffloadHarness(tiny, (S, W), num_gpu_blocks=48, host_chunks=400)
    with pytest.raises(AssertionError, match=r"c\d+-t2: block 0 of its row"):
        _two_turns(h, chats=12, history=400)


def test_bad_connector_settings_fail_at_start_up(tiny):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    def build(**kw):
        EngineArgs(
            model=tiny,
            attention_backend="SINKS",
            additional_config={"sinks": {"sink_tokens": S, "window_tokens": W}},
            block_size=16,
            **kw,
        ).create_engine_config()

    with pytest.raises(ValueError, match="does not support the KV connector 'LMCacheConnectorV1'"):
        build(kv_transfer_config=KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role="kv_both"))
    with pytest.raises(ValueError, match="one GPU block per chunk"):
        build(
            kv_transfer_config=KVTransferConfig(
                kv_connector="OffloadingConnector",
                kv_role="kv_both",
                kv_connector_extra_config={"cpu_bytes_to_use": 2**30, "blocks_per_chunk": 2},
            )
        )
    with pytest.raises(ValueError, match="lower --kv-offloading-size"):
        build(kv_offloading_size=1e6)
    with pytest.raises(ValueError, match="not 'SharedStorageSpec'.* remove 'spec_name'"):
        other = {"spec_name": "SharedStorageSpec", "cpu_bytes_to_use": 2**30}
        build(kv_transfer_config=KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                                                  kv_connector_extra_config=other))  # fmt: skip

    def tiered(*tiers, cpu_bytes=2**20):
        extra = {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": cpu_bytes}
        extra["secondary_tiers"] = list(tiers)
        return KVTransferConfig(
            kv_connector="OffloadingConnector", kv_role="kv_both", kv_connector_extra_config=extra
        )

    with pytest.raises(ValueError, match="not 'obj'.* change the tier's 'type' to 'fs'"):
        build(kv_transfer_config=tiered({"type": "obj", "bucket": "b"}))
    with pytest.raises(ValueError, match="add 'root_dir'"):
        build(kv_transfer_config=tiered({"type": "fs"}))
    with pytest.raises(ValueError, match="root_dir '/proc/sinks' cannot be created"):
        build(kv_transfer_config=tiered({"type": "fs", "root_dir": "/proc/sinks"}))
    shm = os.statvfs("/dev/shm")
    with pytest.raises(ValueError, match="keeps its CPU tier in /dev/shm.* or give /dev/shm more room"):
        build(kv_transfer_config=tiered(cpu_bytes=shm.f_bavail * shm.f_frsize + 2**30))
    # what --kv-offloading-size builds under VLLM_USE_SIMPLE_KV_OFFLOAD=1 (vLLM caches its env reads)
    with pytest.raises(ValueError, match="unset VLLM_USE_SIMPLE_KV_OFFLOAD"):
        simple = KVTransferConfig(kv_connector="SimpleCPUOffloadConnector", kv_role="kv_both")
        build(kv_transfer_config=simple)


def test_a_full_shared_memory_names_the_tier_files_left_behind(tmp_path, monkeypatch):
    """An engine killed before its shutdown leaves its CPU tier's /dev/shm file behind (as large as the tier;
    seen on an H100 host: 24 GiB after an in-process engine that was never shut down). When the tiered spec's
    tier does not fit, the error names those files, so that the user can tell a full /dev/shm from a small
    one."""
    from vllm_sinks.kv import offload

    monkeypatch.setattr(offload, "SHARED_MEMORY_DIR", str(tmp_path))
    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(
        kv_connector="OffloadingConnector",
        kv_connector_extra_config={"spec_name": "TieringOffloadingSpec", "secondary_tiers": [],
                                   "cpu_bytes_to_use": 2**60},
    ))  # fmt: skip
    with pytest.raises(ValueError, match=r"more room \(docker run --shm-size\)$"):
        offload.check_offloading(config)
    for name in ("vllm_offload_a.mmap", "vllm_offload_b.mmap"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(3 * 2**29)  # sparse: no space used
    (tmp_path / "other.mmap").write_bytes(b"x")
    with pytest.raises(
        ValueError,
        match=r"2 CPU tier file\(s\) of earlier vLLM engines hold 3.0 GiB of it "
        r"\(vllm_offload_a.mmap, vllm_offload_b.mmap\).* can be deleted",
    ):
        offload.check_offloading(config)


def test_offloading_size_larger_than_the_host_has_fails(tiny, monkeypatch):
    """SINKS pins the host tier exactly (kv.host_tier), so a size fits when the host has it available: 96 GiB
    on a host with 100 GiB passes (torch's pinned allocator alone would have pinned 128 GiB for the 8B
    shape's 32 layers and been killed by the kernel, H100 host, 2026-12-07); 101 GiB fails with the largest
    size that fits."""

    import psutil
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=100.5 * 2**30))

    def build(gib: float):
        return EngineArgs(
            model=tiny,
            attention_backend="SINKS",
            additional_config={"sinks": {"sink_tokens": S, "window_tokens": W}},
            block_size=16,
            kv_offloading_size=gib,
        ).create_engine_config()

    assert build(96).kv_transfer_config.kv_connector_extra_config["cpu_bytes_to_use"] == 96 * 2**30
    with pytest.raises(ValueError, match=r"101 GiB of pinned .* available \(100.5 GiB\): lower "
                                         r"--kv-offloading-size to 100 GiB or less"):  # fmt: skip
        build(101)


def test_worker_side_pins_the_host_tier_exactly_under_sinks_only(tiny, monkeypatch):
    """Patch 20: a SINKS engine's worker-side connector builds its CPU tier with kv.host_tier (host tensors
    page-locked as allocated, not rounded to a power of two); another engine's keeps vLLM's worker. The
    pinning itself needs CUDA: tests/test_gpu_offload.py."""
    import functools

    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import OffloadingConnector
    from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

    from vllm_sinks.kv.host_tier import exactly_pinned_cpu_worker

    h = OffloadHarness(tiny, (S, W), num_gpu_blocks=48, host_chunks=100)
    sinks = OffloadingConnector(h.vllm_config, KVConnectorRole.WORKER, h.kv_cache_config)
    create = sinks.connector_worker.spec.create_worker
    assert isinstance(create, functools.partial) and create.func is exactly_pinned_cpu_worker
    assert create.args == (sinks.connector_worker.spec,)
    monkeypatch.setattr(h.vllm_config.attention_config, "backend", None)
    stock = OffloadingConnector(h.vllm_config, KVConnectorRole.WORKER, h.kv_cache_config)
    assert stock.connector_worker.spec.create_worker.__func__ is CPUOffloadingSpec.create_worker


def test_step_recorder_counts_steps_waiting_for_host_loads(tiny):
    """bench_paused_chats' turn-2 step record on vLLM's scheduler and connector: a step in which a chat's
    state is loaded from the host counts as a step with loads pending (vLLM parks such requests in
    skipped_waiting, not waiting: the GPU run of 2026-12-07 counted none through `waiting` alone)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from bench_paused_chats import StepRecorder

    h = OffloadHarness(tiny, (S, W), num_gpu_blocks=48, host_chunks=400)
    steps = StepRecorder(h.scheduler)
    steps.start()
    _two_turns(h, chats=10, history=400)
    record = steps.stop(time.perf_counter())
    hits = h.policy.stats()["offload_host_hits"]
    assert hits >= 4 and record["steps_with_loads_waiting"] >= hits, (hits, record)
    assert record["steps"] == h.step_count


def test_metrics_count_offloaded_states(tiny):
    from vllm_sinks.metrics import collect_sinks_stats

    h = OffloadHarness(tiny, (S, W), num_gpu_blocks=48, host_chunks=400)
    _two_turns(h, chats=10, history=400)
    stats = collect_sinks_stats(h.scheduler)
    assert stats["offload_host_chunks"] == 400
    assert stats["offload_state_chunks"] == SINK_CHUNKS + WINDOW_CHUNKS + 1
    assert stats["offload_paused_chats_capacity"] == 400 // 6
    assert stats["offload_stored_chunks"] == h.policy.num_stored_chunks > 0
    assert stats["offload_loaded_chunks"] > 0 and stats["offload_host_hits"] >= 6
    assert stats["offload_evicted_chunks"] == h.policy.num_evicted_chunks == 0  # 10 states fit in 400 chunks
    chunk_bytes = h.kv_cache_config.kv_cache_groups[0].kv_cache_spec.page_size_bytes * 2  # 2 layers
    assert stats["offload_host_bytes"] == 400 * chunk_bytes


def test_random_traffic_reads_only_its_own_kv(tiny):
    """Seeded random traffic through a 64-block pool and a 60-chunk host store (about 6 states): new chats,
    next turns, regenerates, aborts, and the GPU's prefix cache emptied at times, 4 requests at once. At
    every step every block a request reads holds its own KV; at the end every GPU block is back."""
    from vllm.v1.request import RequestStatus

    rng = random.Random(7)
    h = OffloadHarness(tiny, (S, W), num_gpu_blocks=64, host_chunks=60, max_num_seqs=4)
    streams: dict[str, list[int]] = {}  # chat -> its last finished turn's prompt + reply
    last_prompt: dict[str, list[int]] = {}
    live: dict[str, str] = {}  # request id -> chat
    n = 0
    for _ in range(1500):
        roll = rng.random()
        if len(live) < 6 and roll < 0.1:
            chat = f"chat{len(streams) + len(live)}-{n}"
            prompt = _prompt(rng, rng.randrange(20, 900))
        elif len(live) < 6 and roll < 0.25 and streams:
            chat = rng.choice(sorted(streams))
            regenerate = rng.random() < 0.25
            prompt = last_prompt[chat] if regenerate else streams[chat] + _prompt(rng, rng.randrange(1, 60))
        else:
            chat = None
        if chat is not None and chat not in live.values():
            n += 1
            rid = f"{chat}/{n}"
            last_prompt[chat] = prompt
            h.add(rid, prompt, rng.randrange(1, 40))
            live[rid] = chat
        if live and rng.random() < 0.01:
            rid = rng.choice(sorted(live))
            h.scheduler.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
        if rng.random() < 0.01:
            h.scheduler.kv_cache_manager.reset_prefix_cache()  # refused while a request holds blocks
        if h.scheduler.has_requests() or h.pending_stores:
            h.step()
        for rid in [r for r in live if h.requests[r].is_finished()]:
            chat = live.pop(rid)
            if h.requests[rid].status == RequestStatus.FINISHED_LENGTH_CAPPED:
                streams[chat] = list(h.requests[rid].prompt_token_ids) + h.outputs[rid]
    h.run()
    assert h.policy.num_host_hits > 5 and h.checked_blocks > 1000, (h.policy.stats(), h.checked_blocks)
    manager = h.manager()
    assert manager.block_pool.get_num_free_blocks() == 64 - 1
    assert not manager.external_sinks and not manager.held_blocks


def test_kv_pages_are_block_major_under_a_connector(monkeypatch):
    """vLLM's offloading worker copies block b as the page_size_bytes at b x page_size_bytes of a layer's
    cache. Under a KV connector SINKS' cache is laid out so that this page is exactly block b's K and V."""
    import torch
    from vllm.config import KVTransferConfig, VllmConfig, set_current_vllm_config

    from vllm_sinks.attention.backend import SinksAttentionBackend as backend

    monkeypatch.delenv("VLLM_SINKS_KV_LAYOUT", raising=False)
    assert backend.get_kv_cache_stride_order() == (0, 1, 2, 3, 4)
    connector = KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both")
    config = VllmConfig(kv_transfer_config=connector)
    with set_current_vllm_config(config):
        order = backend.get_kv_cache_stride_order()
    assert order == (1, 0, 2, 3, 4)
    blocks, block_size, heads, dim = 6, 16, 2, 8
    shape = backend.get_kv_cache_shape(blocks, block_size, heads, dim)
    # as vLLM allocates it: raw bytes viewed in the stride order, permuted back to the logical shape
    raw = torch.zeros(2 * blocks * block_size * heads * dim, dtype=torch.float32)
    physical = raw.view(tuple(shape[i] for i in order))
    kv = physical.permute(*[order.index(i) for i in range(len(order))])
    kv.copy_(torch.randn(shape))
    page = 2 * block_size * heads * dim  # elements of one block's K and V
    pages = torch.as_strided(raw, (blocks, page), (page, 1))  # what the offloading worker copies
    for b in range(blocks):
        assert torch.equal(pages[b], torch.cat((kv[0, b].flatten(), kv[1, b].flatten())))


def _disk_harness(tiny, root: str) -> OffloadHarness:
    tiers = {"spec_name": "TieringOffloadingSpec", "secondary_tiers": [{"type": "fs", "root_dir": root}]}
    return OffloadHarness(tiny, (S, W), num_gpu_blocks=48, host_chunks=400, extra_config=tiers)


def _restart(tiny, root: str, chats: int = 8, history: int = 400, reply: int = 40):
    """Turn 1 of every chat on one engine's scheduler, its shutdown, then turn 2 of every chat on a new one
    (an empty GPU pool and CPU tier, the same disk). Returns the new harness and each chat's history."""
    rng = random.Random(3)
    h = _disk_harness(tiny, root)
    first = {f"c{i}": _prompt(rng, history) for i in range(chats)}
    for cid, prompt in first.items():
        h.add(f"{cid}-t1", prompt, reply)
        h.run()
    replies = {cid: h.outputs[f"{cid}-t1"] for cid in first}
    h.shutdown()  # drains the disk tier's writes
    h2 = _disk_harness(tiny, root)
    for cid, prompt in first.items():
        h2.add(f"{cid}-t2", prompt + replies[cid] + _prompt(rng, 24), reply)
        h2.run()
    h2.shutdown()
    return h2, {cid: len(p) + reply for cid, p in first.items()}


def test_paused_chats_resume_from_disk_after_a_restart(tiny, tmp_path, monkeypatch):
    """vLLM's file-system tier behind the CPU tier (TieringOffloadingSpec): every stored state chunk is also
    written to disk, and after a restart (a new scheduler, its CPU tier empty, the same PYTHONHASHSEED) every
    chat's turn 2 promotes its state from disk and computes only what follows; every block a request reads
    holds its own KV, moved GPU -> CPU tier -> file -> CPU tier -> GPU (the harness keeps hashes in the CPU
    tier's own bytes)."""
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    h, turn1 = _restart(tiny, str(tmp_path))
    files = [f for _, _, names in os.walk(tmp_path) for f in names if f.endswith(".bin")]
    # on disk: turn 1's states (per chat its sink chunk and the window chunks before its prompt's end and
    # before its end: chunks 20-26 of 400 + 40 tokens) and what turn 2 stored after restart; nothing else
    assert len(files) == 8 * (SINK_CHUNKS + 7) + h.policy.num_stored_chunks
    for cid, tokens in turn1.items():
        assert h.num_computed_tokens_scheduled[f"{cid}-t2"] == (tokens - 1) // 16 * 16, cid
    assert h.policy.num_host_hits == 8
    assert h.policy.num_loaded_chunks == 8 * (SINK_CHUNKS + WINDOW_CHUNKS)
    assert h.checked_blocks > 0
    assert h.manager().block_pool.get_num_free_blocks() == 48 - 1


def test_disk_states_need_the_same_hash_seed(tiny, tmp_path, monkeypatch):
    """What does not survive a restart: block hashes are seeded by PYTHONHASHSEED (at random without it), so
    a server started with another seed finds none of the states on disk and recomputes every history."""
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    h = _disk_harness(tiny, str(tmp_path))
    h.add("c0-t1", _prompt(random.Random(3), 400), 40)
    h.run()
    prompt = h.requests["c0-t1"].all_token_ids[:-1] + [5] * 24
    h.shutdown()
    monkeypatch.setenv("PYTHONHASHSEED", "1")
    h2 = _disk_harness(tiny, str(tmp_path))
    h2.add("c0-t2", prompt, 8)
    h2.run()
    h2.shutdown()
    assert h2.policy.num_host_hits == 0 and h2.num_computed_tokens_scheduled["c0-t2"] == 0


def test_a_corrupted_state_file_fails_the_check(tiny, tmp_path, monkeypatch):
    """The restart test sees the disk: a state's sink chunk file overwritten with another chunk's bytes
    fails the row check of the chat that resumes from it."""
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    from vllm_sinks.kv.offload import disk_tiers

    h = _disk_harness(tiny, str(tmp_path))
    h.add("c0-t1", _prompt(random.Random(3), 400), 40)
    h.run()
    req = h.requests["c0-t1"]
    (tier,) = disk_tiers(h.policy.manager)
    keys = h.policy._req_status.get("c0-t1")
    prompt = req.all_token_ids[:-1] + [5] * 24
    h.shutdown()
    sink_file = tier.file_mapper.get_file_name(_offload_key(req.block_hashes[0]))
    window_file = tier.file_mapper.get_file_name(_offload_key(req.block_hashes[-2]))
    assert keys is None and os.path.exists(sink_file) and os.path.exists(window_file)
    with open(window_file, "rb") as f:
        other = f.read()
    with open(sink_file, "wb") as f:
        f.write(other)
    h2 = _disk_harness(tiny, str(tmp_path))
    h2.add("c0-t2", prompt, 8)
    try:
        with pytest.raises(AssertionError, match="c0-t2: block 0 of its row"):
            h2.run()
    finally:
        h2.shutdown()  # its CPU tier's /dev/shm region


def _offload_key(block_hash, group: int = 0):
    from vllm.v1.kv_offload.base import make_offload_key

    return make_offload_key(block_hash, group)
