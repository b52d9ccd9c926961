"""SINKS metrics: collected from the block policy in the engine-core process, exported on /metrics.

Flow: the scheduler's per-step `SchedulerStats` (engine core) carries a `sinks_stats` dict (vllm_sinks/patch
adds the field and fills it from `collect_sinks_stats`); the front end hands every `SchedulerStats` to the
stat-logger plugins (entry point `vllm.stat_logger_plugins`), where `SinksStatLogger` sets Prometheus metrics
next to vLLM's own. Names start with ``vllm_sinks:`` (vLLM unregisters every ``vllm:`` collector it did not
make).

Exported, labelled by model_name and engine (capacity figures: kv/capacity.py):
  vllm_sinks:config_info{sink_tokens, window_tokens, block_size}  1
  vllm_sinks:request_blocks_bound       KV blocks a prefilling stream holds at most (admitted while free)
  vllm_sinks:decode_blocks_bound        KV blocks a decoding stream holds at most
  vllm_sinks:max_concurrent_streams     streams that can decode at once (usable pool / decode bound)
  vllm_sinks:max_concurrent_streams_cold  the same when each arrives with an uncached long prompt
  vllm_sinks:max_concurrent_prefills    long prompts that prefill at once (token budget and memory)
  vllm_sinks:streams                    requests holding KV blocks now
  vllm_sinks:held_blocks                KV blocks held by all requests now
  vllm_sinks:request_held_blocks_max    most blocks held by any one request now
  vllm_sinks:request_held_blocks_peak   most blocks held by any one request since start-up
  vllm_sinks:window_freed_blocks_total  blocks returned to the pool because they left the window
  vllm_sinks:sink_block_hits_total      prefix-cache hits on sink blocks
With --kv-offloading-size (vLLM's native KV offloading, kv/offload.py):
  vllm_sinks:offload_host_chunks        chunks (one KV block each) the host tier holds
  vllm_sinks:offload_state_chunks       host chunks of one paused chat's state (sinks + window)
  vllm_sinks:offload_paused_chats_capacity  paused chats' states the host tier holds
  vllm_sinks:offload_stored_chunks_total    chunks stored to the host (resumable states only)
  vllm_sinks:offload_loaded_chunks_total    chunks loaded back from the host
  vllm_sinks:offload_host_hits_total        requests that resumed from the host tier
  vllm_sinks:offload_evicted_chunks_total   chunks the host tier evicted (least recently used) for a store
  vllm_sinks:offload_host_bytes             bytes of the host tier
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from vllm_sinks.config import sinks_active
from vllm_sinks.kv.capacity import StreamCapacity, stream_capacity

PREFIX = "vllm_sinks:"


def _managers(scheduler: Any) -> list:
    from vllm_sinks.kv.manager import SinkWindowManager

    coordinator = scheduler.kv_cache_manager.coordinator
    return [m for m in coordinator.single_type_managers if isinstance(m, SinkWindowManager)]


def scheduler_capacity(scheduler: Any) -> StreamCapacity | None:
    """The capacity of a v1 Scheduler's KV pool under SINKS (one KV-cache group of SINKS layers).

    Computed once per scheduler and kept on it: neither the pool nor the configuration changes after start-up,
    and make_stats asks for it every engine step, where vLLM's config properties it derives from are not cheap
    (VllmConfig.max_in_flight_tokens -> max_concurrent_batches -> use_v2_model_runner scans every installed
    package's entry points: 15-25 ms per step on a GPU host under async scheduling)."""
    if "_vllm_sinks_capacity" in vars(scheduler):
        return scheduler._vllm_sinks_capacity
    managers = _managers(scheduler)
    cap = None
    if managers:
        cap = stream_capacity(
            managers[0].kv_cache_spec, scheduler.vllm_config, managers[0].block_pool.num_gpu_blocks
        )
    scheduler._vllm_sinks_capacity = cap
    return cap


def log_capacity(scheduler: Any) -> None:
    cap = scheduler_capacity(scheduler)
    if cap is not None:
        init_logger("vllm.sinks").info("SINKS KV pool: %s", cap.describe())
    from vllm_sinks.kv.offload import sink_offloading_scheduler

    offload = sink_offloading_scheduler(scheduler)
    if offload is not None:
        init_logger("vllm.sinks").info("SINKS KV offloading: %s", offload.describe())


def collect_sinks_stats(scheduler: Any) -> dict[str, float] | None:
    """Snapshot of the SinkWindowManagers of a v1 Scheduler; None when SINKS is not in use. Runs every engine
    step while stats are logged (vllm serve, AsyncLLM): O(running streams), no config reads."""
    cap = scheduler_capacity(scheduler)
    if cap is None:
        return None
    managers = _managers(scheduler)
    held: dict[str, int] = {}
    for m in managers:
        for rid, n in m.held_blocks.items():
            held[rid] = held.get(rid, 0) + n
    spec = managers[0].kv_cache_spec
    from vllm_sinks.kv.offload import sink_offloading_scheduler

    offload = sink_offloading_scheduler(scheduler)
    return (offload.stats() if offload is not None else {}) | {
        "sink_tokens": float(spec.sink_tokens),
        "window_tokens": float(spec.window_tokens),
        "block_size": float(spec.block_size),
        "request_blocks_bound": float(cap.prefill_blocks),
        "decode_blocks_bound": float(cap.decode_blocks),
        "max_concurrent_streams": float(cap.decode_streams),
        "max_concurrent_streams_cold": float(cap.decode_streams_cold),
        "max_concurrent_prefills": float(cap.concurrent_prefills),
        "streams": float(sum(1 for n in held.values() if n > 0)),
        "held_blocks": float(sum(held.values())),
        "request_held_blocks_max": float(max(held.values(), default=0)),
        "request_held_blocks_peak": float(sum(m.max_held_blocks for m in managers)),
        "window_freed_blocks": float(sum(m.num_window_freed_blocks for m in managers)),
        "sink_block_hits": float(sum(m.num_sink_block_hits for m in managers)),
    }


def _unregister(names: set[str]) -> None:
    """Removes the collectors of these metric names from the default registry (an earlier engine's)."""
    from prometheus_client import REGISTRY

    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "") in names:
            REGISTRY.unregister(collector)


def _metric_classes() -> tuple[type, type]:
    """(Gauge, Counter): prometheus_client's for `vllm serve` (its /metrics), Ray's metrics (vLLM's wrappers,
    names with ':' as '_') inside a Ray Serve replica, whose process has no HTTP server of its own: Ray
    exports them as vLLM's RayPrometheusStatLogger does its own."""
    try:
        from vllm.v1.metrics.ray_wrappers import RayCounterWrapper, RayGaugeWrapper, _get_replica_id

        if _get_replica_id():
            return RayGaugeWrapper, RayCounterWrapper
    except ImportError:  # no Ray installed
        pass
    from prometheus_client import Counter, Gauge

    return Gauge, Counter


class SinksStatLogger(AggregateStatLoggerBase):
    """Stat-logger plugin: SINKS metrics on the API server's /metrics (inert without SINKS stats)."""

    _GAUGES = {
        "request_blocks_bound": "KV blocks a prefilling stream holds at most (admitted while that many free)",
        "decode_blocks_bound": "KV blocks a decoding stream holds at most",
        "max_concurrent_streams": "Streams that can decode at once (usable KV pool / decode bound)",
        "max_concurrent_streams_cold": "Streams decoding at once, each arriving with an uncached long prompt",
        "max_concurrent_prefills": "Long prompts that prefill at once (token budget and KV memory)",
        "streams": "Requests holding KV blocks now",
        "held_blocks": "KV blocks held by all requests now",
        "request_held_blocks_max": "Most KV blocks held by any one request now",
        "request_held_blocks_peak": "Most KV blocks held by any one request since start-up",
        "offload_host_chunks": "Chunks (one KV block each) the host offloading tier holds",
        "offload_state_chunks": "Host chunks of one paused chat's resumable state (sinks + window)",
        "offload_paused_chats_capacity": "Paused chats' resumable states the host offloading tier holds",
        "offload_host_bytes": "Bytes of the host offloading tier (its chunks x bytes per chunk)",
    }
    _COUNTERS = {
        "window_freed_blocks": "KV blocks returned to the pool because they left the attention window",
        "sink_block_hits": "Prefix-cache hits on sink blocks",
        "offload_stored_chunks": "Chunks stored to the host offloading tier (resumable states only)",
        "offload_loaded_chunks": "Chunks loaded back from the host offloading tier",
        "offload_host_hits": "Requests that resumed from the host offloading tier",
        "offload_evicted_chunks": "Chunks the host offloading tier evicted (least recently used) for a store",
    }

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
        Gauge, Counter = _metric_classes()
        self.engine_indexes = engine_indexes or [0]
        # Installed but not selected: export nothing (no empty vllm_sinks:* families on /metrics) and leave
        # every other collector alone.
        self.enabled = sinks_active(vllm_config)
        if not self.enabled:
            return
        # A second SINKS engine in the same process (tests) re-creates this logger's metrics; the session
        # server's vllm_sinks:* gauges are not this logger's and stay.
        _unregister({PREFIX + k for k in ("config_info", *self._GAUGES, *self._COUNTERS)})
        self.model_name = str(vllm_config.model_config.served_model_name)
        labels = ["model_name", "engine"]
        self.info = Gauge(PREFIX + "config_info", "SINKS configuration (value 1)",
                          labels + ["sink_tokens", "window_tokens", "block_size"])  # fmt: skip
        self.gauges = {k: Gauge(PREFIX + k, doc, labels) for k, doc in self._GAUGES.items()}
        self.counters = {k: Counter(PREFIX + k, doc, labels) for k, doc in self._COUNTERS.items()}
        self._last: dict[tuple[int, str], float] = {}
        self._info_set: set[int] = set()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        stats = getattr(scheduler_stats, "sinks_stats", None) if scheduler_stats is not None else None
        if not self.enabled or not stats:
            return
        lv = (self.model_name, str(engine_idx))
        if engine_idx not in self._info_set:
            self.info.labels(*lv, str(int(stats["sink_tokens"])), str(int(stats["window_tokens"])),
                             str(int(stats["block_size"]))).set(1)  # fmt: skip
            self._info_set.add(engine_idx)
        for k, g in self.gauges.items():
            if k in stats:
                g.labels(*lv).set(stats[k])
        for k, c in self.counters.items():
            if k not in stats:
                continue
            value = stats[k]
            delta = value - self._last.get((engine_idx, k), 0.0)
            if delta > 0:
                c.labels(*lv).inc(delta)
            self._last[(engine_idx, k)] = value

    def log_engine_initialized(self) -> None:
        pass
