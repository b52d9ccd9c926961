"""Host time of handing one resumed session's block ids to the worker, against the session's length.

A live session is re-added to the worker each turn with its whole block-id row: under SINKS one id per
16-token block of history, nearly all the null block (kv_cache.SinkWindowManager). Timed here per turn on
the host, with vLLM's real KVCacheBlock objects from a BlockPool (1 sink block, a null run, the window's
blocks), side by side in one run:
  lists_v1 / sparse_v1  KVCacheBlocks.get_block_ids (vLLM's list) or block_rows.sparse_block_ids, then model
                        runner V1's BlockTable row write (numpy assignment: from the list, or __array__)
  lists_v2 / sparse_v2  the same row into model runner V2's staging (BlockTables.append_block_ids ->
                        StagedWriteTensor.stage_write: list.extend of every id, then async_tensor_h2d's
                        torch.tensor of the list; sparse: the head and tail staged, the null run left to one
                        device fill, not timed here)
The GPU's part (the H2D copy and the fill) is not timed: this is the host's O(history) work per turn.

    python benchmarks/bench_block_rows.py --out benchmarks/results/block_rows_cpu_DATE.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="16384,262144,1048576,4194304", help="session lengths")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--window-tokens", type=int, default=4092)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 3)


def main(argv=None) -> dict:
    from run_record import emit, provenance
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks

    from vllm_sinks.kv.block_rows import SparseKVCacheBlocks

    a = parse(argv)
    lengths = [int(x) for x in a.tokens.split(",")]
    window_blocks = -(-a.window_tokens // a.block_size) + 1
    pool = BlockPool(num_gpu_blocks=1 + 1 + window_blocks, enable_caching=False, hash_block_size=a.block_size)
    sink, *window = pool.get_new_blocks(1 + window_blocks)
    max_blocks = max(lengths) // a.block_size
    table = np.zeros((2, max_blocks), dtype=np.int32)  # V1's BlockTable.block_table.np, two rows
    rows = []
    for tokens in lengths:
        n = tokens // a.block_size
        blocks = [sink] + [pool.null_block] * (n - 1 - window_blocks) + window
        stock = KVCacheBlocks((blocks,))
        sparse = SparseKVCacheBlocks((blocks,), (1,))

        def v1(kv):
            (ids,) = kv.get_block_ids()
            table[1, : len(ids)] = ids

        def v2(kv):
            (ids,) = kv.get_block_ids()
            staged: list[int] = []
            if hasattr(ids, "tail_start"):
                for part in (ids.head, ids.tail):
                    staged.extend(part)
            else:
                staged.extend(ids)
            torch.tensor(staged, dtype=torch.int32, device="cpu")

        v1(sparse)
        assert np.array_equal(table[1, :n], [b.block_id for b in blocks])
        row = {
            "session_tokens": tokens,
            "block_ids": n,
            "lists_v1_ms": _median_ms(partial(v1, stock), a.repeats),
            "sparse_v1_ms": _median_ms(partial(v1, sparse), a.repeats),
            "lists_v2_ms": _median_ms(partial(v2, stock), a.repeats),
            "sparse_v2_ms": _median_ms(partial(v2, sparse), a.repeats),
        }
        rows.append(row)
        print(row, flush=True)
    result = {
        "benchmark": "host time per turn to hand a resumed session's block ids to the worker",
        "block_size": a.block_size,
        "window_tokens": a.window_tokens,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
        **provenance(__file__, argv),
    }
    return emit(result, a.out)


if __name__ == "__main__":
    main()
