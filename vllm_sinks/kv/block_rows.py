"""A long stream's block-id row, handed to the worker as its live parts and the bounds of its null run.

Under SINKS a request's block list is [sink blocks][null blocks][window blocks] (kv_cache.SinkWindowManager):
for a long stream nearly all of it is the null block, one id per block of history (262,144 ids at 4M tokens
with 16-token blocks). vLLM hands a new or resumed request to the worker with that whole list: the
scheduler builds it id by id (KVCacheBlocks.get_block_ids), and model runner V2 stages it element by element
(BlockTables.append_block_ids: list.extend, then torch.tensor of the list; ~20 ms of host time for 262k ids
on a 2-core CPU, benchmarks/bench_block_rows.py), so every turn of a live session paid O(history) before its
first token.

`SparseBlockRow` is that list as the head (the sink blocks' ids), the bounds of the null run, and the tail
(the window's ids, growing as the worker appends new blocks). It is a Sequence[int] equal to the full list,
converts to an int32 array with one fill (`__array__`, what model runner V1's BlockTable.add_row uses), and
`stage_into_block_tables` writes it into model runner V2's block table as two staged writes plus one fill
of the null run on the device. Building one costs O(window blocks) plus a C-speed check of the run.

Rows go sparse under both model runners unless VLLM_SINKS_BLOCK_ROWS=lists (`enabled`). On an H200 (8B shape,
2026-12-05) a live session's time to first token stayed 43-46 ms from 16k to 4M tokens of history with sparse
rows, against 37 -> 82 ms with lists (benchmarks/results/session_turns_*_h200_2026-12-05_block_rows.json).

Invariants: row[i] == null_id for len(head) <= i < tail_start, row[:len(head)] == head,
row[tail_start:] == tail, len(row) == tail_start + len(tail).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.v1.core.kv_cache_manager import KVCacheBlocks


def enabled() -> bool:
    """Whether the scheduler hands long rows over as SparseBlockRow: VLLM_SINKS_BLOCK_ROWS=sparse (the
    default) or lists (vLLM's list of every id, for an A/B)."""
    choice = os.environ.get("VLLM_SINKS_BLOCK_ROWS", "").strip()
    if choice not in ("", "sparse", "lists"):
        raise ValueError(
            f"VLLM_SINKS_BLOCK_ROWS={choice!r}: expected 'sparse' (a long stream's block ids as sink blocks, "
            "null run and window blocks) or 'lists' (vLLM's list of every id); unset it for the default"
        )
    return choice != "lists"


def row_heads(managers: Sequence[Any]) -> tuple[int | None, ...] | None:
    """Per KV-cache group (its single-type manager), the head of the rows handed over as SparseBlockRow: a
    SinkWindowManager's sink blocks, None for a group that is not SINKS'. None where no group is SINKS' or
    rows stay lists (`enabled`)."""
    from vllm_sinks.kv.manager import SinkWindowManager

    if not enabled():
        return None
    heads = tuple(m.num_sink_blocks if isinstance(m, SinkWindowManager) else None for m in managers)
    return heads if any(h is not None for h in heads) else None


class SparseBlockRow(Sequence):
    """[head][null_id] * (tail_start - len(head))[tail]; `extend`/`append` add to the tail (model runner
    V1 extends a request's block ids in place as it grows)."""

    __slots__ = ("head", "tail_start", "tail", "null_id")

    def __init__(self, head: list[int], tail_start: int, tail: list[int], null_id: int) -> None:
        if not len(head) <= tail_start:
            raise ValueError(f"head of {len(head)} ids overlaps the tail at {tail_start}")
        self.head = head
        self.tail_start = tail_start
        self.tail = tail
        self.null_id = null_id

    def __len__(self) -> int:
        return self.tail_start + len(self.tail)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.to_array()[index].tolist()
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError("block row index out of range")
        if i < len(self.head):
            return self.head[i]
        if i < self.tail_start:
            return self.null_id
        return self.tail[i - self.tail_start]

    def __iter__(self) -> Iterator[int]:
        yield from self.head
        for _ in range(self.tail_start - len(self.head)):
            yield self.null_id
        yield from self.tail

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SparseBlockRow | list | tuple):
            return len(self) == len(other) and np.array_equal(self.to_array(), np.asarray(other))
        return NotImplemented

    __hash__ = None  # mutable, like the list it stands for

    def __repr__(self) -> str:
        return (
            f"SparseBlockRow(len={len(self)}, head={self.head}, null run [{len(self.head)}, "
            f"{self.tail_start}) of {self.null_id}, tail of {len(self.tail)})"
        )

    def extend(self, ids: Sequence[int]) -> None:
        self.tail.extend(ids)

    def append(self, block_id: int) -> None:
        self.tail.append(block_id)

    def to_array(self, dtype: Any = np.int32) -> np.ndarray:
        out = np.full(len(self), self.null_id, dtype=dtype)
        out[: len(self.head)] = self.head
        out[self.tail_start :] = self.tail
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.to_array(np.int32 if dtype is None else dtype)


def sparse_row(blocks: list[Any], num_head: int) -> SparseBlockRow | None:
    """`blocks` (KVCacheBlocks of one request and group) as a SparseBlockRow when blocks[num_head:] begins
    with a run of null blocks; None otherwise (the caller keeps the plain list). O(len(blocks) - end of the
    run) in Python, plus the run's check at C speed."""
    n = len(blocks)
    if n <= num_head or not blocks[num_head].is_null:
        return None
    null = blocks[num_head]
    tail_start = n
    while tail_start > num_head and not blocks[tail_start - 1].is_null:
        tail_start -= 1
    run = tail_start - num_head
    if blocks[num_head:tail_start].count(null) != run:
        return None  # not one run of the null block: keep vLLM's list
    return SparseBlockRow(
        [b.block_id for b in blocks[:num_head]],
        tail_start,
        [b.block_id for b in blocks[tail_start:]],
        null.block_id,
    )


def sparse_block_ids(
    blocks: tuple[list[Any], ...], num_heads: Sequence[int | None]
) -> tuple[Sequence[int], ...]:
    """KVCacheBlocks.get_block_ids for one request, with a SparseBlockRow for every group whose head size is
    given (a SinkWindowManager's sink blocks) and whose row has a null run after its head."""
    rows: list[Sequence[int]] = []
    for group, num_head in zip(blocks, num_heads, strict=True):
        row = sparse_row(group, num_head) if num_head is not None else None
        rows.append(row if row is not None else [b.block_id for b in group])
    return tuple(rows)


@dataclass
class SparseKVCacheBlocks(KVCacheBlocks):
    """A request's KVCacheBlocks (KVCacheManager.get_blocks) whose get_block_ids gives SparseBlockRows:
    `num_heads[g]` is group g's head size (its sink blocks) or None for a group that keeps plain lists."""

    num_heads: tuple[int | None, ...] = ()

    def get_block_ids(self, allow_none: bool = False) -> tuple[Sequence[int], ...] | None:
        if allow_none and all(len(group) == 0 for group in self.blocks):
            return None
        return sparse_block_ids(self.blocks, self.num_heads)


STAGED_WRITES_PER_ROW = 2
"""Staged writes one SparseBlockRow takes in a V2 block table (its head and its tail); a list takes one."""


def _pool_capacity(pool: Any) -> int:
    """Writes a vLLM UvaBufferPool of staged-write metadata holds (its first dimension)."""
    return pool.size if isinstance(pool.size, int) else int(pool.size[0])


def widen_staging(block_tables: Any) -> None:
    """Sizes model runner V2's staged-write buffers for sparse rows.

    vLLM sizes each block table's write metadata (StagedWriteTensor.write_indices / write_starts /
    write_cu_lens, UvaBufferPools) and the multi-group FusedStagedWriter for one staged write per request
    and step: `max_num_reqs` rows (times the groups). A step stages at most one write per scheduled request
    and group under vLLM's lists, but STAGED_WRITES_PER_ROW for a SparseBlockRow, so a step that hands over
    more than max_num_reqs / 2 resumed long streams overflowed the buffers (UvaBufferPool.copy_to_uva:
    "could not broadcast input array from shape (42,) into shape (32,)", the engine dead). After this every
    pool holds STAGED_WRITES_PER_ROW x its rows: a bound on any step (each scheduled request stages at most
    that many writes per group, and a step schedules at most max_num_reqs requests). Called once, right
    after BlockTables is built and before any write is staged (the pools are read by in-flight kernels
    through UVA, so they are never replaced later). A few KiB of pinned memory."""
    from vllm.v1.worker.gpu.buffer_utils import FusedStagedWriter, UvaBufferPool

    for table in block_tables.block_tables:
        rows = STAGED_WRITES_PER_ROW * table.num_rows
        for name in ("write_indices", "write_starts", "write_cu_lens"):
            pool = getattr(table, name)
            if _pool_capacity(pool) < rows:
                setattr(table, name, UvaBufferPool(rows, pool.dtype, pool.max_concurrency))
    fused = block_tables.fused_writer
    if fused is not None:
        writes = STAGED_WRITES_PER_ROW * block_tables.num_kv_cache_groups * block_tables.max_num_reqs
        if _pool_capacity(fused.indices) < writes:
            block_tables.fused_writer = FusedStagedWriter(
                fused.device, writes, max_concurrency=fused.indices.max_concurrency
            )


def _staging_has_room(block_tables: Any, rows: tuple[Sequence[int], ...]) -> bool:
    """Whether every group's staged writes, and the fused writer's, can take these rows' writes this step."""
    total = 0
    for table, row in zip(block_tables.block_tables, rows, strict=True):
        writes = STAGED_WRITES_PER_ROW if isinstance(row, SparseBlockRow) else 1
        staged = len(table._staged_write_indices) + writes
        if staged > _pool_capacity(table.write_indices):
            return False
        total += staged
    fused = block_tables.fused_writer
    return fused is None or total <= _pool_capacity(fused.indices)


def stage_into_block_tables(block_tables: Any, req_index: int, rows: tuple[Sequence[int], ...]) -> bool:
    """Writes a new request's rows into model runner V2's BlockTables (what append_block_ids does with
    overwrite=True): a SparseBlockRow as its head and tail (staged, applied with the step's other writes)
    and its null run filled on the device now, on the current stream (before the staged writes, which do
    not touch the run). Returns False, writing nothing, where a group splits its blocks for the kernel or
    the step's staged-write buffers have no room for two writes (buffers `widen_staging` did not size);
    the caller then hands over plain lists, one write each, as vLLM does."""
    if any(
        isinstance(row, SparseBlockRow) and block_tables.blocks_per_kv_block[i] != 1
        for i, row in enumerate(rows)
    ) or not _staging_has_room(block_tables, rows):
        return False
    for i, row in enumerate(rows):
        table = block_tables.block_tables[i]
        if isinstance(row, SparseBlockRow):
            table.stage_write(req_index, 0, row.head)
            table.stage_write(req_index, row.tail_start, row.tail)
            table.gpu[req_index, len(row.head) : row.tail_start].fill_(row.null_id)
        else:
            table.stage_write(req_index, 0, row)
        block_tables.num_blocks.np[i, req_index] = len(row)
    return True
