"""vllm_sinks.kv.block_rows: a long stream's block-id row as its head, null run and tail.

* SparseBlockRow is the list it stands for to every reader vLLM has: len, indexing, slices, iteration,
  equality, numpy conversion (model runner V1's BlockTable.add_row), in-place extend (V1's request state),
  pickling (the scheduler's output to other workers);
* sparse_row builds one only from [head][one run of the null block][tail] lists of a real BlockPool;
* in an engine, a resent stream's cache hit (sinks + nulls + window) reaches the worker as one: see
  test_block_policy.test_cache_hit_reaches_the_worker_as_a_sparse_row; replies equal with and without it:
  tests/test_server.py (prefix caching on vs off).
The model runner V2 writer (stage_into_block_tables) runs here over V2's BlockTables on CPU tensors
(test_v2_staging_holds_two_writes_per_sparse_row) and on CUDA in tests/test_gpu_sessions.py (passed on an
H200, 2026-12-05). Rows are sparse by default under both runners; VLLM_SINKS_BLOCK_ROWS=lists keeps vLLM's.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from vllm_sinks.kv.block_rows import (
    SparseBlockRow,
    SparseKVCacheBlocks,
    enabled,
    sparse_block_ids,
    sparse_row,
)


def _pool(n: int = 64):
    from vllm.v1.core.block_pool import BlockPool

    return BlockPool(num_gpu_blocks=n, enable_caching=False, hash_block_size=16)


def test_sparse_row_reads_as_the_list_it_stands_for():
    row = SparseBlockRow([7], 5, [11, 12], null_id=0)
    full = [7, 0, 0, 0, 0, 11, 12]
    assert len(row) == 7 and list(row) == full and row == full and row == tuple(full)
    assert [row[i] for i in range(-7, 7)] == full + full
    assert row[2:6] == full[2:6] and row[::-1] == full[::-1] and row[5:] == [11, 12]
    with pytest.raises(IndexError):
        row[7]
    table = np.full((2, 10), -1, dtype=np.int32)
    table[1, 2 : 2 + len(row)] = row  # what model runner V1's BlockTable.append_row does
    assert table[1].tolist() == [-1, -1, *full, -1]
    assert np.array(row).dtype == np.int32 and np.asarray(row, dtype=np.int64).tolist() == full
    row.extend([13, 14])
    row.append(15)
    assert row == full + [13, 14, 15]
    copy = pickle.loads(pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL))  # as shm_broadcast sends it
    assert isinstance(copy, SparseBlockRow) and copy == row and copy.tail_start == 5
    assert row != full and row != [7, 0, 0, 0, 0, 11, 12, 13, 14, 16]
    with pytest.raises(ValueError):
        SparseBlockRow([1, 2, 3], 2, [], null_id=0)


def test_sparse_row_only_for_one_null_run_after_the_head():
    pool = _pool()
    null = pool.null_block
    a, b, c, d = pool.get_new_blocks(4)
    ids = lambda blocks: [blk.block_id for blk in blocks]  # noqa: E731

    blocks = [a] + [null] * 100 + [b, c]
    row = sparse_row(blocks, 1)
    assert row is not None and row == ids(blocks) and row.head == [a.block_id] and row.tail_start == 101
    assert row.null_id == null.block_id

    # The head may itself hold the null block (no sink hit); the run starts at the head's end.
    blocks = [null, a] + [null] * 3 + [b]
    row = sparse_row(blocks, 2)
    assert row == ids(blocks) and row.head == [null.block_id, a.block_id]

    assert sparse_row([a, b, c], 1) is None  # no null at all
    assert sparse_row([a, b, null, c], 1) is None  # the run does not start at the head's end
    assert sparse_row([a, null, b, null, c], 1) is None  # two runs: not this shape
    assert sparse_row([a], 1) is None
    # Nothing after the run yet (a row that ends in nulls only has no tail).
    row = sparse_row([a, null, null], 1)
    assert row == ids([a, null, null]) and row.tail == []

    groups = ([a] + [null] * 5 + [d], [a, b])
    rows = sparse_block_ids(groups, (1, None))
    assert isinstance(rows[0], SparseBlockRow) and rows[1] == ids(groups[1]) and isinstance(rows[1], list)
    kv = SparseKVCacheBlocks(groups, (1, None))
    assert kv.get_block_ids() == rows and kv.blocks is groups
    assert SparseKVCacheBlocks(([], []), (1, None)).get_block_ids(allow_none=True) is None


def test_sparse_rows_by_default_and_lists_on_request(monkeypatch):
    monkeypatch.delenv("VLLM_SINKS_BLOCK_ROWS", raising=False)
    assert enabled()
    monkeypatch.setenv("VLLM_SINKS_BLOCK_ROWS", "sparse")
    assert enabled()
    monkeypatch.setenv("VLLM_SINKS_BLOCK_ROWS", "lists")
    assert not enabled()
    monkeypatch.setenv("VLLM_SINKS_BLOCK_ROWS", "yes")
    with pytest.raises(ValueError, match="expected 'sparse'"):
        enabled()


def test_v2_staging_holds_two_writes_per_sparse_row():
    """vLLM sizes model runner V2's staged-write buffers for one write per request and step; a SparseBlockRow
    stages two (head and tail). On buffers as vLLM sizes them the writer hands a row that does not fit over as
    a list (one write) instead of overflowing; widen_staging sizes them for two per request, and every row of
    a full step then lands sparse and equal to its list (V2's BlockTables on the CPU: tests/v2_staging.py)."""
    import torch
    from v2_staging import cpu_staging
    from vllm.v1.worker.gpu.block_table import BlockTables

    from vllm_sinks.kv import block_rows

    rows = [SparseBlockRow([1], 10, [20, 21], null_id=0), SparseBlockRow([2], 12, [30], null_id=0)]
    with cpu_staging():
        tables = BlockTables(block_sizes=[16], max_num_reqs=2, max_num_batched_tokens=64,
                             max_num_blocks_per_group=[64], device=torch.device("cpu"),
                             kernel_block_sizes=[16])  # fmt: skip
        assert block_rows.stage_into_block_tables(tables, 0, (rows[0],))
        assert not block_rows.stage_into_block_tables(tables, 1, (rows[1],))  # 2 writes staged, room for 2
        tables.block_tables[0].clear_staged_writes()
        block_rows.widen_staging(tables)
        assert tables.block_tables[0].write_indices.size == 2 * 2
        assert all(block_rows.stage_into_block_tables(tables, i, (row,)) for i, row in enumerate(rows))
        tables.apply_staged_writes()
    table = tables.block_tables[0].gpu.numpy()
    for i, row in enumerate(rows):
        assert table[i, : len(row)].tolist() == list(row) and int(tables.num_blocks.np[0, i]) == len(row)
