"""SINKS configuration: the validated parameters (S, W), whether SINKS is selected, and what selecting it
sets in vLLM's engine configuration.

Sources of S and W, later ones winning: defaults (S=4, W=1020, as `attention_sinks` and the StreamingLLM
paper), the environment (`VLLM_SINKS_SINK_TOKENS`, `VLLM_SINKS_WINDOW_TOKENS`), then
`--additional-config '{"sinks": {"sink_tokens": 4, "window_tokens": 1020}}'`, where attention_sinks' names
`attention_sink_size` (S) and `attention_sink_window_size` (W) are accepted too. Every error says what to
change.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

BACKEND_NAME = "SINKS"
BACKEND_PATH = "vllm_sinks.attention.backend.SinksAttentionBackend"
# Default stream length limit (vLLM's max_model_len) under SINKS when --max-model-len is not given.
# Memory per stream is bounded by S + W; this only sizes vLLM's per-request token buffers.
DEFAULT_SINKS_MAX_MODEL_LEN = 1 << 17
ENV_PREFIX = "VLLM_SINKS_"
ADDITIONAL_CONFIG_KEY = "sinks"
DEFAULT_SINK_TOKENS = 4
DEFAULT_WINDOW_TOKENS = 1020


class SinksConfigError(ValueError):
    """Invalid SINKS configuration; the message says what to change."""


@dataclass(frozen=True)
class SinksConfig:
    """StreamingLLM parameters. Token t attends to tokens [0, min(S, t)) and [max(0, t - W), t]."""

    sink_tokens: int = DEFAULT_SINK_TOKENS
    window_tokens: int = DEFAULT_WINDOW_TOKENS

    @property
    def cache_tokens(self) -> int:
        """S + W: the tokens a query attends to besides itself; also the largest query position."""
        return self.sink_tokens + self.window_tokens

    def sink_blocks(self, block_size: int) -> int:
        return -(-self.sink_tokens // block_size)

    def max_blocks_per_request(self, block_size: int, max_chunk_tokens: int) -> int:
        """Blocks one stream can hold at once: sink blocks, blocks covering the W tokens before
        `max_chunk_tokens` new tokens in flight and those tokens, plus one for misalignment."""
        from vllm_sinks.kv.capacity import stream_blocks

        return stream_blocks(self.sink_tokens, self.window_tokens, block_size, max_chunk_tokens)

    def validate_for(self, max_position_embeddings: int | None, sliding_window: int | None = None) -> None:
        """Checks that depend on the model: its trained context and its own sliding window, which the
        StreamingLLM cache replaces (as attention_sinks does) when S + W fits inside it. Any W works with
        any block size (a window smaller than a block costs memory, not correctness)."""
        if sliding_window is not None and self.cache_tokens >= sliding_window:
            raise SinksConfigError(
                f"sink_tokens + window_tokens = {self.cache_tokens} does not fit inside the model's own "
                f"sliding window of {sliding_window} tokens; choose sink_tokens + window_tokens <= "
                f"{sliding_window - 1}"
            )
        if max_position_embeddings is not None and self.cache_tokens >= max_position_embeddings:
            raise SinksConfigError(
                f"sink_tokens + window_tokens = {self.cache_tokens} reaches the model's trained context "
                f"(max_position_embeddings={max_position_embeddings}); choose "
                f"sink_tokens + window_tokens <= {max_position_embeddings - 1}"
            )

    def describe(self) -> str:
        return f"sink_tokens={self.sink_tokens}, window_tokens={self.window_tokens}"


_FIELDS = ("sink_tokens", "window_tokens")
# attention_sinks' names, same meaning (its cache holds attention_sink_size + attention_sink_window_size).
ALIASES = {"attention_sink_size": "sink_tokens", "attention_sink_window_size": "window_tokens"}


def _as_int(name: str, value: Any, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise SinksConfigError(f"{source}: {name} must be an integer, got {value!r}")
    return value


def parse_sinks_config(
    additional_config: dict[str, Any] | str | None = None, environ: dict[str, str] | None = None
) -> SinksConfig:
    """Builds and validates the config from vLLM's additional_config and the environment."""
    environ = os.environ if environ is None else environ
    values: dict[str, int] = {}
    for name in _FIELDS:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ and environ[env_name] != "":
            values[name] = _as_int(name, environ[env_name], f"environment variable {env_name}")
    if isinstance(additional_config, str):
        try:
            additional_config = json.loads(additional_config)
        except json.JSONDecodeError as e:
            raise SinksConfigError(f"--additional-config is not valid JSON: {e}") from None
    section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if section is not None:
        if not isinstance(section, dict):
            raise SinksConfigError(
                f'--additional-config "sinks" must be an object such as '
                f'{{"sink_tokens": 4, "window_tokens": 1020}}, got {section!r}'
            )
        unknown = sorted(set(section) - set(_FIELDS) - set(ALIASES))
        if unknown:
            raise SinksConfigError(
                f'--additional-config "sinks" has unknown key(s) {unknown}; valid keys: {list(_FIELDS)} '
                f"(or attention_sinks' names {list(ALIASES)})"
            )
        for alias, name in ALIASES.items():
            if alias in section and name in section:
                raise SinksConfigError(
                    f'--additional-config "sinks" gives both {name!r} and its attention_sinks name '
                    f"{alias!r}; keep one"
                )
        for key, value in section.items():
            name = ALIASES.get(key, key)
            values[name] = _as_int(key, value, '--additional-config "sinks"')
    config = SinksConfig(**values)
    if config.sink_tokens < 0:
        raise SinksConfigError(f"sink_tokens={config.sink_tokens} must be >= 0 (0 means window only)")
    if config.window_tokens < 1:
        raise SinksConfigError(f"window_tokens={config.window_tokens} must be >= 1")
    return config


def sinks_config_from_vllm(vllm_config: Any) -> SinksConfig:
    """The SINKS config of a VllmConfig (its additional_config plus the environment)."""
    return parse_sinks_config(getattr(vllm_config, "additional_config", None) or {})


# --- SINKS selected? ------------------------------------------------------------------------------------
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


# --- the engine configuration under SINKS ---------------------------------------------------------------
def configure_engine(config: Any, sinks: SinksConfig, requested_max_model_len: int | None) -> None:
    """Completes a SINKS engine's VllmConfig once vLLM built it: validates S and W against the model and
    block size, refuses unsupported models, sets the stream limit and the per-request prefill chunk, logs."""
    from vllm.logger import init_logger

    from vllm_sinks.kv import capacity

    model_config = config.model_config
    hf_config = model_config.hf_text_config
    trained = getattr(hf_config, "max_position_embeddings", None)
    block_size = config.cache_config.block_size
    native_window = uniform_sliding_window(model_config)
    sinks.validate_for(trained, native_window)
    reject_unsupported_models(model_config)
    from vllm_sinks.kv.offload import check_offloading

    check_offloading(config)
    stream_len = (
        requested_max_model_len if requested_max_model_len not in (None, -1) else DEFAULT_SINKS_MAX_MODEL_LEN
    )
    model_config.max_model_len = int(stream_len)
    scheduler_config = config.scheduler_config
    if scheduler_config.long_prefill_token_threshold <= 0:
        scheduler_config.long_prefill_token_threshold = capacity.default_prefill_chunk_tokens(
            scheduler_config.max_num_batched_tokens, block_size
        )
    in_flight = capacity.request_in_flight_tokens(config)
    chunk = capacity.prefill_chunk_tokens(scheduler_config)
    S, W, k = sinks.sink_tokens, sinks.window_tokens, config.max_concurrent_batches
    logger = init_logger("vllm.sinks")
    if native_window is not None:
        logger.info(
            "SINKS: the model's own sliding window of %d tokens is replaced by the StreamingLLM cache of "
            "sink_tokens + window_tokens = %d tokens (as attention_sinks does)",
            native_window,
            sinks.cache_tokens,
        )
    logger.info(
        "SINKS attention backend: %s, block_size=%d, trained context=%s, stream limit (max_model_len)=%d; "
        "a stream holds <= %d KV blocks decoding, <= %d prefilling (%d-token prefill chunks: "
        "--long-prefill-token-threshold; %d batches in flight)",
        sinks.describe(),
        block_size,
        trained,
        model_config.max_model_len,
        capacity.stream_blocks(S, W, block_size, k),
        capacity.stream_blocks(S, W, block_size, in_flight),
        chunk,
        k,
    )


def _layer_types(model_config: Any) -> list[str]:
    return [str(t) for t in getattr(model_config.hf_text_config, "layer_types", None) or []]


def uniform_sliding_window(model_config: Any) -> int | None:
    """The model's own sliding window when every attention layer has it (Mistral-7B-v0.1: 4096), else None
    (no window, or a hybrid of sliding and full layers: reject_unsupported_models refuses those)."""
    window = model_config.get_sliding_window()
    types = _layer_types(model_config)
    if window is None or (types and not all("sliding" in t for t in types)):
        return None
    return int(window)


def reject_unsupported_models(model_config: Any) -> None:
    reasons = []
    if getattr(model_config, "is_encoder_decoder", False):
        reasons.append("encoder-decoder models")
    if getattr(model_config, "use_mla", False):
        reasons.append("MLA attention")
    if getattr(model_config, "is_hybrid", False):
        reasons.append("hybrid (attention + state-space) models")
    types = _layer_types(model_config)
    if any("sliding" in t for t in types) and not all("sliding" in t for t in types):
        reasons.append(
            "models that mix sliding-window and full-attention layers (e.g. Gemma 2/3: one cache policy must "
            "hold for every layer)"
        )
    if getattr(model_config, "uses_mrope", False):
        reasons.append("multimodal rotary positions (M-RoPE)")
    if reasons:
        raise ValueError(
            f"--attention-backend SINKS does not support {', '.join(reasons)} "
            f"({model_config.model}); use a RoPE decoder model such as Llama, Mistral or Qwen2, or serve "
            f"this one without --attention-backend SINKS"
        )
