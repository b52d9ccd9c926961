"""SINKS metadata on CUDA: vLLM's FlashAttention metadata for the window part, plus what the sink part, the
band part and the rotary re-encoding need. Everything the kernels read lives in persistent buffers.

Two kinds of step (ops_cuda): decode-only steps call FA3 with the window W and merge the sinks per token;
their metadata is device-only, so they are captured in full CUDA graphs. Steps with prefill rows call FA3
with the exact window W' = ops_cuda.exact_fa_window(W) (W' = W where FA3 is exact anyway) and, if W' < W,
band_sink_attention over tiles of tokens listed on the host; they run outside full CUDA graphs
(UNIFORM_BATCH: vLLM captures full graphs for decode-only batches only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata, FlashAttentionMetadataBuilder
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_sinks.attention import ops_cuda
from vllm_sinks.attention.rope import TWO_PI, RotaryParams
from vllm_sinks.config import sinks_config_from_vllm


@dataclass
class SinksCudaMetadata:
    """Invariant: rows [0, num_actual_tokens) of every per-token tensor describe this step's tokens."""

    fa: FlashAttentionMetadata
    num_actual_tokens: int
    positions: torch.Tensor  # [n] int64, true stream index
    req_indices: torch.Tensor  # [n] int32
    cos_win: torch.Tensor  # [n, rotary_dim // 2] float32, at positions (scaled by the rope's mscale)
    sin_win: torch.Tensor
    cos_sink: torch.Tensor  # at min(positions, S + W)
    sin_sink: torch.Tensor
    # The step's left window for FA3: W (decode-only steps) or exact_fa_window(W); -1: FA is not called.
    fa_window: int
    # band_sink_attention's tiles (request, first token) when fa_window < W, else None.
    band_tiles: tuple[torch.Tensor, torch.Tensor] | None = None
    band_heads_per_program: int = 1


class SinksCudaMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's builder with the step's FA window for its ahead-of-time scheduler."""

    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.sinks = sinks_config_from_vllm(vllm_config)
        self.aot_sliding_window = (self.sinks.window_tokens, 0)
        group = self.num_heads_q // self.num_heads_kv
        self.prefill_fa_window = ops_cuda.exact_fa_window(
            self.sinks.window_tokens, kv_cache_spec.head_size, group
        )
        self.band_heads_per_program = min(group & -group, 8)
        self.rope: RotaryParams | None = None
        forward_context = vllm_config.compilation_config.static_forward_context
        for name in layer_names:
            rope = getattr(getattr(forward_context.get(name), "impl", None), "rope", None)
            if rope is not None:
                if self.rope is not None and rope is not self.rope and not _same_rope(rope, self.rope):
                    raise ValueError("SINKS: layers of one KV-cache group use different rotary embeddings")
                self.rope = rope
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        max_tokens = max(max_tokens, vllm_config.compilation_config.max_cudagraph_capture_size or 0)
        half = (self.rope.rotary_dim // 2) if self.rope is not None else 1
        if self.rope is not None:
            self._turns = (self.rope.omega / TWO_PI).to(device, torch.float64)
            self._mscale = self.rope.mscale.to(device, torch.float64)
        self._two_pi = torch.tensor([TWO_PI], dtype=torch.float64, device=device)
        self._cos_sin = torch.zeros(4, max_tokens, half, dtype=torch.float32, device=device)
        self._req_indices = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        self._tiles = torch.zeros(2, max_tokens, dtype=torch.int32, device=device)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> SinksCudaMetadata:
        cm = common_attn_metadata
        W = self.sinks.window_tokens
        # FA3 is exact on decode rows for any window; rows of prefill chunks need the exact window.
        fa_window = W if cm.max_query_len <= 1 else self.prefill_fa_window
        self.aot_sliding_window = (max(fa_window, 0), 0)
        fa = super().build(common_prefix_len, cm, fast_build)
        n = cm.num_actual_tokens
        positions = cm.positions[:n]
        if self.rope is None:
            raise RuntimeError("SINKS: no rotary embedding bound to this KV-cache group")
        ops_cuda.rotary_tables(
            positions, self._turns, self._mscale, self._two_pi, self.sinks.cache_tokens, self._cos_sin
        )
        cos_sin = self._cos_sin[:, :n]
        return SinksCudaMetadata(
            fa=fa,
            num_actual_tokens=n,
            positions=positions,
            req_indices=cm.token_to_req_indices(self._req_indices),
            cos_win=cos_sin[0],
            sin_win=cos_sin[1],
            cos_sink=cos_sin[2],
            sin_sink=cos_sin[3],
            fa_window=fa_window,
            band_tiles=self._band_tiles(cm) if fa_window < W else None,
            band_heads_per_program=self.band_heads_per_program,
        )

    def _band_tiles(self, cm: CommonAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """band_sink_attention's tiles from the host's query_start_loc, copied into a persistent buffer.
        The host tensor is pinned (PyTorch's caching host allocator keeps it until the copy has run): a
        copy from pageable memory may synchronize with the stream (CUDA's API synchronization behavior),
        which would stall the CPU's preparation of this step until the GPU finished the previous one."""
        qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
        tokens_per_tile = ops_cuda.BAND_TILING.tokens_per_tile(self.band_heads_per_program)
        reqs, starts = ops_cuda.band_tiles(qsl, tokens_per_tile)
        num = len(reqs)
        host = torch.tensor([reqs, starts], dtype=torch.int32, pin_memory=True)
        self._tiles[:, :num].copy_(host, non_blocking=True)
        return self._tiles[0, :num], self._tiles[1, :num]


def _same_rope(a: RotaryParams, b: RotaryParams) -> bool:
    return (
        a.rotary_dim == b.rotary_dim
        and a.is_neox_style == b.is_neox_style
        and torch.equal(a.omega, b.omega)
        and torch.equal(a.mscale, b.mscale)
    )
