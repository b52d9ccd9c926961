"""Patches that act in the front end: the API server or LLM process (registry entries 4-6, 19)."""

from __future__ import annotations

import contextvars
import functools
import os

from vllm_sinks.config import configure_engine, is_sinks_selected, sinks_active, sinks_config_from_vllm

# True while EngineArgs.create_engine_config builds a SINKS engine's config (read by the max_model_len patch).
_BUILDING_SINKS_CONFIG: contextvars.ContextVar[bool] = contextvars.ContextVar("sinks_config", default=False)


def patch_engine_config() -> None:
    """4. vllm.engine.arg_utils.EngineArgs.create_engine_config: under SINKS, build vLLM's config with
    --max-model-len allowed beyond the trained context (entry 5; "fit to memory" becomes the default stream
    limit), then complete it with config.configure_engine (validation against the model, stream limit,
    per-request prefill chunk, start-up log), once, in the front-end process."""
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


def patch_max_model_len() -> None:
    """5. vllm.config.model.ModelConfig.get_and_verify_max_len: while a SINKS config is built, a
    --max-model-len beyond the model's trained context is the stream limit, not an error (SINKS attends to at
    most S + W cache indices, so positions never reach the end of the rotary table; the limit only sizes
    vLLM's per-request token buffers). Every other check stays vLLM's, and vLLM derives its defaults (e.g. the
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


def patch_front_end_session_state() -> None:
    """6. vllm.v1.engine.output_processor.OutputProcessor._update_streaming_request_state appends each
    input's ids of a live session to the RequestState's prompt list; under SINKS that list is stored as int32
    first (sessions.tokens.compact_front_end). vllm.v1.engine.async_llm.AsyncLLM.__init__ tells its
    OutputProcessor whether it serves SINKS. Off with VLLM_SINKS_STOCK_SESSION_HANDOFF=1 (A/B benchmarks)."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor

    from vllm_sinks.sessions import tokens

    if tokens.stock_handoff():
        return
    original_init = AsyncLLM.__init__
    original_update = OutputProcessor._update_streaming_request_state

    @functools.wraps(original_init)
    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        self.output_processor._vllm_sinks_active = sinks_active(vllm_config)

    @functools.wraps(original_update)
    def _update_streaming_request_state(self, req_state, request, prompt):
        if getattr(self, "_vllm_sinks_active", False) and request.resumable:
            tokens.compact_front_end(req_state)
        return original_update(self, req_state, request, prompt)

    AsyncLLM.__init__ = __init__
    OutputProcessor._update_streaming_request_state = _update_streaming_request_state


def patch_data_parallel_affinity() -> None:
    """19. vllm.v1.engine.core_client.DPLBAsyncMPClient.get_core_engine_for_request sends a request to the
    least loaded engine of `--data-parallel-size N` (waiting x 4 + running), so a chat's turns land on
    engines that do not hold its state. Under SINKS a request that names no `data_parallel_rank` goes to the
    engine routing.affinity places its chat on (the key: its first prompt tokens, which every turn of a chat
    repeats); a returning chat goes back to its engine, new chats shed from an engine whose score reaches
    max_num_seqs. VLLM_SINKS_DP_AFFINITY=0 keeps vLLM's balancer (A/B). upstream: a pluggable DP load
    balancer."""
    from vllm.v1.engine.core_client import DPLBAsyncMPClient

    from vllm_sinks.routing.affinity import data_parallel_rank

    original = DPLBAsyncMPClient.get_core_engine_for_request

    @functools.wraps(original)
    def get_core_engine_for_request(self, request):
        if request.data_parallel_rank is not None or request.pooling_params is not None:
            return original(self, request)
        if "_vllm_sinks_dp" not in vars(self):
            stock = os.environ.get("VLLM_SINKS_DP_AFFINITY", "1").strip() == "0"
            self._vllm_sinks_dp = sinks_active(self.vllm_config) and not stock
        if not self._vllm_sinks_dp:
            return original(self, request)
        rank = data_parallel_rank(self, request.prompt_token_ids, self.lb_engines,
                                  self.vllm_config.scheduler_config.max_num_seqs)  # fmt: skip
        if rank is None:
            return original(self, request)
        request.data_parallel_rank = rank
        try:
            return original(self, request)
        finally:
            request.data_parallel_rank = None

    DPLBAsyncMPClient.get_core_engine_for_request = get_core_engine_for_request


def apply() -> None:
    patch_engine_config()
    patch_max_model_len()
    patch_front_end_session_state()
    patch_data_parallel_affinity()
