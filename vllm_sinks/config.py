"""One validated SINKS configuration: sink tokens S and window tokens W.

Sources, later ones winning: defaults (S=4, W=1020, as `attention_sinks` and the StreamingLLM paper),
the environment (`VLLM_SINKS_SINK_TOKENS`, `VLLM_SINKS_WINDOW_TOKENS`), then
`--additional-config '{"sinks": {"sink_tokens": 4, "window_tokens": 1020}}'`.
Every error says what to change.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

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
        """Blocks one stream can hold at once: sink blocks, blocks covering the W tokens before a chunk of
        `max_chunk_tokens` new tokens and the chunk itself, plus one for misalignment."""
        window_and_chunk = self.window_tokens + max_chunk_tokens
        return self.sink_blocks(block_size) + -(-window_and_chunk // block_size) + 1

    def validate_for(self, block_size: int, max_position_embeddings: int | None) -> None:
        """Checks that depend on the engine: block size and the model's trained context."""
        if self.window_tokens <= block_size:
            raise SinksConfigError(
                f"window_tokens={self.window_tokens} must be larger than one KV block ({block_size} tokens): "
                f"raise window_tokens or lower --block-size"
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
        unknown = sorted(set(section) - set(_FIELDS))
        if unknown:
            raise SinksConfigError(
                f'--additional-config "sinks" has unknown key(s) {unknown}; valid keys: {list(_FIELDS)}'
            )
        for name in _FIELDS:
            if name in section:
                values[name] = _as_int(name, section[name], '--additional-config "sinks"')
    config = SinksConfig(**values)
    if config.sink_tokens < 0:
        raise SinksConfigError(f"sink_tokens={config.sink_tokens} must be >= 0 (0 means window only)")
    if config.window_tokens < 1:
        raise SinksConfigError(f"window_tokens={config.window_tokens} must be >= 1")
    return config


def sinks_config_from_vllm(vllm_config: Any) -> SinksConfig:
    """The SINKS config of a VllmConfig (its additional_config plus the environment)."""
    return parse_sinks_config(getattr(vllm_config, "additional_config", None) or {})
