"""StreamingLLM attention sinks for vLLM 0.26.0: the SINKS attention backend and its KV-cache policy.

Select it with `vllm serve MODEL --attention-backend SINKS` or `LLM(model, attention_backend="SINKS")`;
configure it with `--additional-config '{"sinks": {"sink_tokens": 4, "window_tokens": 1020}}'`.
"""

from vllm_sinks.config import SinksConfig, SinksConfigError, parse_sinks_config

__version__ = "0.1.0"
__all__ = ["SinksConfig", "SinksConfigError", "parse_sinks_config", "__version__"]
