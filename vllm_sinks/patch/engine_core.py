"""Patches that act in the engine core, where the scheduler and the KV manager run (registry 7-11, 18)."""

from __future__ import annotations

import functools
from typing import Any

from vllm_sinks.config import sinks_active, sinks_config_from_vllm


def patch_eviction_order() -> None:
    """7. vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.__init__ builds the BlockPool with vLLM's LRU
    free-block queue; with SINKS layers the pool gets kv.eviction.TieredFreeBlockQueue instead (the same
    list, dead blocks evicted before any resumable state), so paused chats keep their state."""
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator

    from vllm_sinks.kv.eviction import TieredFreeBlockQueue
    from vllm_sinks.kv.manager import SinkWindowManager

    original = KVCacheCoordinator.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        pool = self.block_pool
        if any(isinstance(m, SinkWindowManager) for m in self.single_type_managers) and not isinstance(
            pool.free_block_queue, TieredFreeBlockQueue
        ):
            pool.free_block_queue = TieredFreeBlockQueue(pool.free_block_queue, pool.num_gpu_blocks)

    KVCacheCoordinator.__init__ = __init__


def _session_block_hashes_kept(scheduler: Any) -> tuple[int, int] | None:
    """What a live session's block hashes keep (sessions.tokens.block_hashes_to_keep) under this Scheduler's
    config; None where hashes are finer than its blocks (vLLM then views them at another size)."""
    from vllm_sinks.sessions import tokens

    if scheduler.hash_block_size != scheduler.block_size:
        return None
    sinks = sinks_config_from_vllm(scheduler.vllm_config)
    return tokens.block_hashes_to_keep(
        sinks.sink_tokens,
        sinks.window_tokens,
        scheduler.scheduler_config.max_num_batched_tokens,
        scheduler.hash_block_size,
    )


def patch_scheduler() -> None:
    """8. vllm.v1.core.sched.scheduler.Scheduler.__init__: under SINKS, log the pool's capacity
    (metrics.log_capacity) once, where the pool size is known, and decide once what this scheduler keeps of a
    session's block hashes and which groups' rows go sparse (kv.block_rows.row_heads; entry 11).
    Scheduler.make_stats: fill SchedulerStats.sinks_stats (entry 3) with metrics.collect_sinks_stats."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_sinks.kv import block_rows
    from vllm_sinks.metrics import collect_sinks_stats, log_capacity

    original_make_stats = Scheduler.make_stats
    original_init = Scheduler.__init__

    @functools.wraps(original_make_stats)
    def make_stats(self, *args, **kwargs):
        stats = original_make_stats(self, *args, **kwargs)
        if stats is not None and getattr(self, "_vllm_sinks_active", False):  # decided once, in __init__
            stats.sinks_stats = collect_sinks_stats(self)
        return stats

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._vllm_sinks_active = sinks_active(self.vllm_config)
        if self._vllm_sinks_active:
            log_capacity(self)
            self._vllm_sinks_hashes_kept = _session_block_hashes_kept(self)
            managers = self.kv_cache_manager.coordinator.single_type_managers
            self.kv_cache_manager._vllm_sinks_row_heads = block_rows.row_heads(managers)

    Scheduler.make_stats = make_stats
    Scheduler.__init__ = __init__


def patch_session_updates() -> None:
    """9. vllm.v1.core.sched.scheduler.Scheduler._update_request_as_session appends a turn to a
    streaming-input request's prompt; under SINKS the request then takes the turn's max_tokens (vLLM 0.26
    keeps the first input's Request.max_tokens for every later one, so a reply is capped by the first
    message's limit: vllm-project/vllm#37842), sessions.tokens.track stores its prompt and token-id lists as
    int32 (Python lists cost ~40 bytes per id, for the session's whole history), and its block hashes keep
    only the sink blocks' and the recent ones (sessions.tokens.forget_old_block_hashes; vLLM keeps one per
    16 tokens of the whole history). VLLM_SINKS_STOCK_SESSION_HANDOFF=1 keeps vLLM's lists (A/B)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_sinks.sessions import tokens

    stock_handoff = tokens.stock_handoff()
    original_update = Scheduler._update_request_as_session

    @functools.wraps(original_update)
    def _update_request_as_session(self, session, update):
        original_update(self, session, update)
        if getattr(self, "_vllm_sinks_active", False):
            session.max_tokens = update.max_tokens
            if not stock_handoff:
                tokens.track(session)
                keep = getattr(self, "_vllm_sinks_hashes_kept", None)  # decided in Scheduler.__init__
                if keep is not None:
                    tokens.forget_old_block_hashes(session, *keep)

    Scheduler._update_request_as_session = _update_request_as_session


def patch_new_request_data() -> None:
    """10. vllm.v1.core.sched.output.NewRequestData.from_request hands a resumed session to the worker with
    its whole prompt as a Python list (converted element by element by InputBatch.add_request: O(history) per
    turn), and for model runner V2 its every token id as `prefill_token_ids` (staged through a Python list by
    RequestState.add_request); for a tracked request it passes int32 arrays instead (entry 16 writes them)."""
    from vllm.v1.core.sched.output import NewRequestData

    from vllm_sinks.sessions import tokens

    original_from_request = NewRequestData.from_request.__func__

    @functools.wraps(original_from_request)
    def from_request(cls, request, block_ids, prefill_token_ids=None):
        data = original_from_request(cls, request, block_ids, prefill_token_ids)
        data.prompt_token_ids = tokens.prompt_for_worker(request)
        if prefill_token_ids is not None:  # model runner V2
            prompt = data.prompt_token_ids
            data.prefill_token_ids = tokens.prefill_for_worker(request, prefill_token_ids, prompt)
        return data

    NewRequestData.from_request = classmethod(from_request)


def patch_block_rows() -> None:
    """11. vllm.v1.core.kv_cache_manager.KVCacheManager.get_blocks: the scheduler hands a new or resumed
    request to the worker with its whole block-id list (get_blocks(...).get_block_ids(), built id by id);
    under SINKS a long stream's list is nearly all the null block (one id per block of history), O(history)
    per turn of a live session. Under SINKS it returns kv.block_rows.SparseKVCacheBlocks, whose
    get_block_ids gives a SparseBlockRow (a Sequence equal to the list) where a row has a null run. The heads
    are decided in Scheduler.__init__ (entry 8), where block_rows.enabled says whether rows go sparse
    (VLLM_SINKS_BLOCK_ROWS=lists keeps vLLM's lists). Model runner V1 takes the row as it is
    (BlockTable.add_row converts it with numpy through __array__); V2 needs entry 17."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from vllm_sinks.kv import block_rows
    from vllm_sinks.sessions import tokens

    if tokens.stock_handoff():
        return
    original_get_blocks = KVCacheManager.get_blocks

    @functools.wraps(original_get_blocks)
    def get_blocks(self, request_id):
        blocks = original_get_blocks(self, request_id)
        heads = getattr(self, "_vllm_sinks_row_heads", None)
        if heads is None:
            return blocks
        return block_rows.SparseKVCacheBlocks(blocks.blocks, heads)

    KVCacheManager.get_blocks = get_blocks


def patch_offloading_policy() -> None:
    """18. vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector.OffloadingConnectorScheduler (the
    name OffloadingConnector.__init__ builds its scheduler side with): vLLM's policy treats a SINKS group as a
    plain sliding window (stores every block, looks up and keeps only the last window, never loads the
    sinks). kv.offload.SinkOffloadingScheduler is that class with SINKS groups storing, looking up, loading
    and touching resumable states, storing (flushed) state blocks that _update_req_states would zero when the
    pool hands them out before their store, and keeping a finished request's state until its last stores are
    built (update_connector_output deletes it when an earlier job completes as it finishes); it is vLLM's
    class unchanged for any other group. upstream: a KV-cache-spec hook in the offloading scheduler (which
    chunks a group stores and needs for a hit), and finished requests' state kept until _build_store_jobs."""
    from vllm.distributed.kv_transfer.kv_connector.v1 import offloading_connector

    from vllm_sinks.kv.offload import SinkOffloadingScheduler

    offloading_connector.OffloadingConnectorScheduler = SinkOffloadingScheduler


def apply() -> None:
    patch_eviction_order()
    patch_scheduler()
    patch_session_updates()
    patch_new_request_data()
    patch_block_rows()
    patch_offloading_policy()
