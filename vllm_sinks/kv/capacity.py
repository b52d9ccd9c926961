"""How many SINKS streams a KV pool holds, decoding and prefilling: one source for admission, the start-up
log and /metrics.

A stream holds its sink blocks, the blocks covering its last W tokens and its tokens in flight (scheduled but
not yet computed: blocks are freed on the computed-token basis), plus one block for misalignment:

* decoding:   ceil(S/B) + ceil((W + k)/B) + 1, with k batches in flight (1; 2 with async scheduling);
* prefilling: ceil(S/B) + ceil((W + k * C)/B) + 1, with C the most prompt tokens one step gives one request.

C is vLLM's per-request chunk limit (`--long-prefill-token-threshold`). Under SINKS it defaults to half the
token budget (`--max-num-batched-tokens`): two long prompts share each step, as many tokens per step as one
would take, while the room a prompt needs to be admitted (vLLM admits a prompt when its prefill bound is free)
shrinks toward what a decoding stream holds.

Admission (kv_cache.SinkWindowManager) also keeps free what the running streams may still grow to, each up
to its bound, so an admitted stream never needs a preemption to make room: the counts below are what the
scheduler enforces, not estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.utils.math_utils import cdiv


def prefill_chunk_tokens(scheduler_config: Any) -> int:
    """The most prompt tokens one step gives one request."""
    budget = scheduler_config.max_num_batched_tokens
    threshold = scheduler_config.long_prefill_token_threshold
    return threshold if 0 < threshold < budget else budget


def default_prefill_chunk_tokens(max_num_batched_tokens: int, block_size: int) -> int:
    """SINKS' default per-request chunk: half the token budget, a whole number of blocks, at least one."""
    half = max_num_batched_tokens // 2 // block_size * block_size
    return max(half, block_size)


def request_in_flight_tokens(vllm_config: Any) -> int:
    """Tokens of one request scheduled but not yet computed, at most: one chunk per batch in flight."""
    return vllm_config.max_concurrent_batches * prefill_chunk_tokens(vllm_config.scheduler_config)


def stream_blocks(sink_tokens: int, window_tokens: int, block_size: int, in_flight_tokens: int) -> int:
    """ceil(S/B) + ceil((W + in-flight)/B) + 1."""
    return cdiv(sink_tokens, block_size) + cdiv(window_tokens + in_flight_tokens, block_size) + 1


@dataclass(frozen=True)
class StreamCapacity:
    """What one KV pool holds. Invariants: decode_blocks <= prefill_blocks; every count >= 0."""

    pool_blocks: int  # usable blocks (vLLM's null block excluded)
    block_size: int
    decode_blocks: int
    prefill_blocks: int
    prefill_chunk_tokens: int
    token_budget: int

    @property
    def decode_streams(self) -> int:
        """Streams that can decode at once."""
        return self.pool_blocks // self.decode_blocks

    @property
    def decode_streams_cold(self) -> int:
        """Streams decoding at once when each arrived with an uncached long prompt: the last one is admitted
        only while its prefill bound is free next to the others' decode holdings."""
        if self.pool_blocks < self.prefill_blocks:
            return 0
        return min(self.decode_streams, (self.pool_blocks - self.prefill_blocks) // self.decode_blocks + 1)

    @property
    def concurrent_prefills(self) -> int:
        """Long prompts prefilling in one step: bounded by the token budget and by memory."""
        by_budget = max(1, self.token_budget // self.prefill_chunk_tokens)
        return min(by_budget, self.pool_blocks // self.prefill_blocks)

    def describe(self) -> str:
        return (
            f"{self.pool_blocks} usable blocks of {self.block_size} tokens. A decoding stream holds <= "
            f"{self.decode_blocks} blocks: up to {self.decode_streams} streams decode at once "
            f"({self.decode_streams_cold} when each arrives with an uncached long prompt). A prefilling "
            f"stream holds <= {self.prefill_blocks} blocks ({self.prefill_chunk_tokens}-token chunks) and is "
            f"admitted while that many are free: up to {self.concurrent_prefills} long prompts prefill at "
            f"once (token budget {self.token_budget})"
        )


def stream_capacity(spec: Any, vllm_config: Any, num_gpu_blocks: int) -> StreamCapacity:
    """The capacity of a pool of `num_gpu_blocks` blocks of SinkWindowSpec `spec` under `vllm_config`."""
    scheduler_config = vllm_config.scheduler_config
    decode = spec.decode_blocks()
    prefill = spec.max_admission_blocks_per_request(
        vllm_config.max_in_flight_tokens, vllm_config.model_config.max_model_len
    )
    return StreamCapacity(
        pool_blocks=num_gpu_blocks - 1,
        block_size=spec.block_size,
        decode_blocks=min(decode, prefill),
        prefill_blocks=prefill,
        prefill_chunk_tokens=prefill_chunk_tokens(scheduler_config),
        token_budget=scheduler_config.max_num_batched_tokens,
    )
