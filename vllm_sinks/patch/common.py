"""Patches that act in every process that loads the plugin (registry entries 1-3 in patch/__init__.py)."""

from __future__ import annotations

import dataclasses

from vllm_sinks.config import BACKEND_NAME, BACKEND_PATH


def register_backend_name() -> None:
    """1. vllm.v1.attention.backends.registry.AttentionBackendEnum: make `SINKS` a name of the CUSTOM member.

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


def register_kv_cache_spec() -> None:
    """2. vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry: register SinkWindowSpec -> SinkWindowManager.
    The registry fills in vLLM's built-in specs only while it is empty, so those are registered first."""
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_spec_registry import _REGISTRY_KVCACHESPEC_LIST, KVCacheSpecRegistry

    from vllm_sinks.kv.manager import SinkWindowManager, SinkWindowSpec

    if not _REGISTRY_KVCACHESPEC_LIST:
        from vllm.config import get_current_vllm_config_or_none

        register_all_kvcache_specs(get_current_vllm_config_or_none())
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)


def add_scheduler_stats_field() -> None:
    """3. vllm.v1.metrics.stats.SchedulerStats: add the field `sinks_stats: dict[str, float] | None`.
    vLLM sends SchedulerStats from the engine core to the front end with msgspec, which carries declared
    dataclass fields only; the field must exist in both processes (a process without it decodes None). The
    engine core fills it (engine_core.py, entry 8) for metrics.SinksStatLogger in the front end."""
    from vllm.v1.metrics.stats import SchedulerStats

    if "sinks_stats" not in SchedulerStats.__dataclass_fields__:
        f = dataclasses.field(default=None)
        f.name, f.type = "sinks_stats", dict[str, float] | None
        f._field_type = dataclasses._FIELD  # what @dataclass sets for a regular field
        SchedulerStats.__dataclass_fields__["sinks_stats"] = f
        SchedulerStats.__annotations__["sinks_stats"] = dict[str, float] | None
        SchedulerStats.sinks_stats = None


def apply() -> None:
    register_backend_name()
    register_kv_cache_spec()
    add_scheduler_stats_field()
