"""Read-only views of the SINKS block policy, for tests and operators.

`sink_managers(llm)` and `real_blocks_per_request(llm)` work on an in-process engine (LLM or LLMEngine built
with VLLM_ENABLE_V1_MULTIPROCESSING=0); `block_stats(manager)` summarizes one manager.
"""

from __future__ import annotations

from typing import Any

from vllm_sinks.kv.manager import SinkWindowManager


def scheduler_of(llm: Any) -> Any:
    """The scheduler of an in-process LLM / LLMEngine; raises if the engine core runs in another process."""
    engine = getattr(llm, "llm_engine", llm)
    core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
    if core is None:
        raise RuntimeError("introspection needs an in-process engine: set VLLM_ENABLE_V1_MULTIPROCESSING=0")
    return core.scheduler


def sink_managers(llm: Any) -> list[SinkWindowManager]:
    coordinator = scheduler_of(llm).kv_cache_manager.coordinator
    return [m for m in coordinator.single_type_managers if isinstance(m, SinkWindowManager)]


def real_blocks_per_request(llm: Any) -> dict[str, int]:
    """Real (non-null) KV blocks each running request holds now, summed over KV-cache groups; works for any
    attention backend (dense, vLLM's sliding window, SINKS). O(block-table length): for snapshots only."""
    held: dict[str, int] = {}
    for manager in scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers:
        for request_id, blocks in manager.req_to_blocks.items():
            held[request_id] = held.get(request_id, 0) + sum(1 for b in blocks if not b.is_null)
    return held


def block_stats(manager: SinkWindowManager) -> dict[str, Any]:
    pool = manager.block_pool
    return {
        "num_requests": len(manager.held_blocks),
        "held_blocks": dict(manager.held_blocks),
        "max_held_blocks": manager.max_held_blocks,
        "window_freed_blocks": manager.num_window_freed_blocks,
        "sink_block_hits": manager.num_sink_block_hits,
        "free_blocks": pool.get_num_free_blocks(),
        "total_blocks": pool.num_gpu_blocks,
    }
