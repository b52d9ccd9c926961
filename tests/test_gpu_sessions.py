"""Live sessions on a CUDA GPU, where vLLM's model runner V2 (its default there) takes a resumed session's
history as `prefill_token_ids` and stages it through a Python list (O(history) per turn: 325 ms at 4M tokens
on an H100). The plugin hands it session_tokens' int32 view, which the patched RequestState.add_request
writes with one copy (vllm_sinks/patch/worker.py, patch_v2_request_state):

* RequestState given a view holds exactly those tokens in its table, next to a request staged vLLM's way, and
  again after the session is removed and re-added with a grown view (what each turn does);
* rows longer than the plugin's fixed pinned staging arrive whole, and torch's pinned host allocator grows
  by that staging only;
* a long stream's block ids (vllm_sinks.kv.block_rows.SparseBlockRow: head, null run, tail) land in V2's block
  table equal to the full list, over a row another request left behind;
* a session of many turns on an engine with model runner V2 replies with the same greedy tokens under the
  plugin's hand-off (int32 tokens, sparse block rows) as under vLLM's own
  (VLLM_SINKS_STOCK_SESSION_HANDOFF=1), on the same weights.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_v2_request_state_takes_a_session_view():
    from vllm_sinks import patch

    patch.apply_patches()
    from vllm.v1.worker.gpu.states import RequestState

    state = RequestState(max_num_reqs=4, max_model_len=100_000, max_num_batched_tokens=1024,
                         num_speculative_steps=0, vocab_size=1000, device=torch.device("cuda"))  # fmt: skip
    plain = list(range(300))
    view = (np.arange(70_000, dtype=np.int32) * 7) % 997
    state.add_request("plain", prompt_len=300, all_token_ids=plain, num_computed_tokens=0, max_tokens=8)
    state.add_request("session", prompt_len=len(view), all_token_ids=view, num_computed_tokens=69_800,
                      max_tokens=8)  # fmt: skip
    state.apply_staged_writes()
    torch.cuda.synchronize()
    table = state.all_token_ids.gpu
    i, j = state.req_id_to_index["plain"], state.req_id_to_index["session"]
    assert table[i, :300].cpu().tolist() == plain
    assert np.array_equal(table[j, : len(view)].cpu().numpy(), view)
    assert int(state.prefill_len.np[j]) == len(view) and int(state.total_len.gpu[j]) == len(view)
    assert int(state.num_computed_tokens.gpu[j]) == 69_800

    state.remove_request("session")  # the next turn: removed and re-added with the grown history
    grown = np.concatenate([view, np.full(500, 5, dtype=np.int32)])
    state.add_request("session", prompt_len=len(grown), all_token_ids=grown, num_computed_tokens=len(view),
                      max_tokens=8)  # fmt: skip
    state.apply_staged_writes()
    torch.cuda.synchronize()
    j = state.req_id_to_index["session"]
    assert np.array_equal(table[j, : len(grown)].cpu().numpy(), grown)
    assert int(state.total_len.gpu[j]) == len(grown) and table[i, :300].cpu().tolist() == plain


def test_session_rows_stage_through_bounded_pinned_memory():
    """A session's token row reaches model runner V2's table through session_tokens.RowStaging: rows longer
    than its buffers arrive whole, and the pinned memory held by torch's host allocator grows by the
    staging's two fixed buffers at most, not by a block per power-of-two row size (26 MiB here before)."""
    from vllm_sinks import patch
    from vllm_sinks.sessions import tokens as session_tokens

    patch.apply_patches()
    from vllm.v1.worker.gpu.states import RequestState

    state = RequestState(max_num_reqs=2, max_model_len=2_600_000, max_num_batched_tokens=1024,
                         num_speculative_steps=0, vocab_size=1000, device=torch.device("cuda"))  # fmt: skip
    torch.cuda.synchronize()
    before = torch.cuda.host_memory_stats()["allocated_bytes.current"]
    rng = np.random.default_rng(0)
    for n in (300_000, 1_200_000, 2_500_000):  # one chunk, two, three (the third waits for the first)
        row = rng.integers(0, 150_000, n, dtype=np.int32)
        state.add_request("session", prompt_len=n, all_token_ids=row, num_computed_tokens=n - 200,
                          max_tokens=8)  # fmt: skip
        state.apply_staged_writes()
        torch.cuda.synchronize()
        j = state.req_id_to_index["session"]
        assert np.array_equal(state.all_token_ids.gpu[j, :n].cpu().numpy(), row)
        state.remove_request("session")
    grown = torch.cuda.host_memory_stats()["allocated_bytes.current"] - before
    staging = session_tokens._ROW_STAGING
    assert staging is not None and staging.pinned_bytes() == 2 * staging.chunk * 4
    assert grown <= staging.pinned_bytes() + 2**20, grown


def test_v2_block_tables_take_a_sparse_row():
    """A SparseBlockRow (a long stream's block ids: head, null run, tail) written into model runner V2's
    BlockTables over a row a longer request left behind equals the full list on the device, next to a row
    staged vLLM's way; later blocks append after it; where kernel blocks split the KV blocks, vLLM's own
    path takes the row as a list."""
    from vllm_sinks import patch
    from vllm_sinks.kv.block_rows import SparseBlockRow

    patch.apply_patches()
    from vllm.v1.worker.gpu.block_table import BlockTables

    cuda = torch.device("cuda")
    tables = BlockTables(block_sizes=[16], max_num_reqs=4, max_num_batched_tokens=1024,
                         max_num_blocks_per_group=[300_000], device=cuda,
                         kernel_block_sizes=[16])  # fmt: skip
    tables.append_block_ids(1, (list(range(1000, 281_000)),), overwrite=True)  # a longer request's leftovers
    tables.apply_staged_writes()
    row = SparseBlockRow([5], 262_144 - 300, list(range(2000, 2300)), null_id=0)
    tables.append_block_ids(1, (row,), overwrite=True)
    tables.append_block_ids(2, ([7, 8, 9],), overwrite=True)
    tables.apply_staged_writes()
    tables.append_block_ids(1, ([42, 43],), overwrite=False)
    tables.apply_staged_writes()
    torch.cuda.synchronize()
    gpu = tables.block_tables[0].gpu
    n = len(row)
    assert np.array_equal(gpu[1, :n].cpu().numpy(), row.to_array())
    assert gpu[1, n : n + 2].tolist() == [42, 43] and int(tables.num_blocks.np[0, 1]) == n + 2
    assert gpu[2, :3].tolist() == [7, 8, 9] and int(tables.num_blocks.np[0, 2]) == 3

    split = BlockTables(block_sizes=[32], max_num_reqs=2, max_num_batched_tokens=1024,
                        max_num_blocks_per_group=[64], device=cuda, kernel_block_sizes=[16])  # fmt: skip
    split.append_block_ids(0, (SparseBlockRow([3], 10, [4, 5], null_id=0),), overwrite=True)
    split.apply_staged_writes()
    torch.cuda.synchronize()
    expected = [b * 2 + k for b in [3] + [0] * 9 + [4, 5] for k in range(2)]
    assert split.block_tables[0].gpu[0, : len(expected)].tolist() == expected


def _session_replies(model: str, stock_handoff: bool) -> tuple[list[list[int]], bool]:
    from bench_session_memory import run_on_engine
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_sinks.sessions import Session

    rng = random.Random(0)
    messages = [[rng.randrange(3, 380) for _ in range(2500)]]
    messages += [[rng.randrange(3, 380) for _ in range(rng.randrange(20, 200))] for _ in range(12)]
    args = AsyncEngineArgs(model=model, attention_backend="SINKS", dtype="bfloat16", block_size=16,
                           max_model_len=20_000, max_num_seqs=4, gpu_memory_utilization=0.15,
                           kv_cache_memory_bytes=2 * 2**30,
                           additional_config={"sinks": {"sink_tokens": 4, "window_tokens": 252}})  # fmt: skip

    async def work(engine):
        session = Session(engine, temperature=0.0, ignore_eos=True)
        replies = []
        for message in messages:
            async for reply in session.send(message, max_tokens=24):  # noqa: B007 - the last one is kept
                pass
            replies.append(list(reply.token_ids))
        await session.close()
        return replies, engine.vllm_config.use_v2_model_runner

    # Read by the engine core when it starts: vLLM's own hand-off with its block-id lists, or the plugin's
    # defaults (int32 tokens, sparse block rows: block_rows.enabled).
    if stock_handoff:
        os.environ["VLLM_SINKS_STOCK_SESSION_HANDOFF"] = "1"
        os.environ["VLLM_SINKS_BLOCK_ROWS"] = "lists"
    try:
        return run_on_engine(args, work)
    finally:
        os.environ.pop("VLLM_SINKS_STOCK_SESSION_HANDOFF", None)
        os.environ.pop("VLLM_SINKS_BLOCK_ROWS", None)


def test_session_handoff_equals_vllms_on_model_runner_v2(model_dir):
    path = model_dir("hd128-kv2", head_dim=128, num_kv_heads=2, num_heads=4)
    ours, v2 = _session_replies(path, stock_handoff=False)
    stock, _ = _session_replies(path, stock_handoff=True)
    assert v2, "this engine did not use model runner V2; the test would not exercise the patched path"
    assert [len(r) for r in ours] == [24] * len(ours)
    assert ours == stock
