"""The SINKS attention backend: StreamingLLM sink + window attention on vLLM's paged KV cache.

Per layer and step, the impl
  1. rotates the new keys at their true stream index and writes them (and the values) to the cache,
  2. rotates each query twice: at its index t for the window, at min(t, S + W) for the sinks,
  3. attends window [t - W, t] and sinks [0, min(S, t - W)) and merges them (ops_torch on CPU, ops_cuda on
     CUDA: FlashAttention's sliding window + a small sink attention + a log-sum-exp merge).
The model's own rotary module is bypassed (rope.DeferredRotary), so no position reaches its rotary table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_sinks.attention import ops_torch
from vllm_sinks.attention.layout import block_major_kv_pages
from vllm_sinks.attention.rope import RotaryParams
from vllm_sinks.config import BACKEND_NAME, SinksConfig, sinks_config_from_vllm


class SinksAttentionBackend(AttentionBackend):
    """Registered as `--attention-backend SINKS`."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True  # keys are rotated before they are cached
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SinksAttentionImpl]:
        return SinksAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AttentionMetadataBuilder]:
        from vllm.platforms import current_platform

        if current_platform.is_cuda():
            from vllm_sinks.attention.backend_cuda import SinksCudaMetadataBuilder

            return SinksCudaMetadataBuilder
        return SinksMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 224, 256]

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        """Memory order of the (2, blocks, block_size, kv heads, head dim) cache: K of every block, then V of
        every block; with a KV connector, block-major (blocks, 2, ...), so that a block's K and V are one
        page at block_id x page_size_bytes, which is what vLLM's offloading worker copies. The kernels read
        the cache through its strides either way."""
        if include_num_layers_dimension:
            # vLLM's protocol for "no layered order" (AttentionBackend's cross-layer check and the KV
            # connectors catch NotImplementedError): one KV tensor per layer, no cross-layer cache
            raise NotImplementedError("SINKS has no cross-layer KV cache layout")
        return (1, 0, 2, 3, 4) if block_major_kv_pages() else (0, 1, 2, 3, 4)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True  # a model's own uniform window is replaced by SINKS' cache (config.py checks it fits)

    @classmethod
    def supports_sink(cls) -> bool:
        return False  # learned per-head sinks (gpt-oss) are a different mechanism

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


@dataclass
class SinksMetadata:
    """Per-step metadata shared by all SINKS layers. Token i belongs to the request r with
    query_start_loc[r] <= i < query_start_loc[r + 1] and sits at stream index positions[i]."""

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, device
    query_start_loc_cpu: list[int]
    seq_lens: torch.Tensor  # [num_reqs] int32, device
    seq_lens_cpu: list[int]
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32, device
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64, device
    positions: torch.Tensor  # [num_actual_tokens] int64, device: true stream index of each token
    sink_positions: torch.Tensor  # [num_actual_tokens] int64: min(position, S + W), where sinks are scored


class SinksMetadataBuilder(AttentionMetadataBuilder[SinksMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.sinks: SinksConfig = sinks_config_from_vllm(vllm_config)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> SinksMetadata:
        cm = common_attn_metadata
        n = cm.num_actual_tokens
        qsl_cpu = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
        seq_lens_cpu = cm.seq_lens[: cm.num_reqs].cpu().tolist()  # on the CPU path: no device sync
        if cm.positions is not None:
            positions = cm.positions[:n].to(torch.int64)
        else:
            positions = _positions_from_lengths(qsl_cpu, seq_lens_cpu).to(cm.query_start_loc.device)
        return SinksMetadata(
            num_actual_tokens=n,
            num_reqs=cm.num_reqs,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc,
            query_start_loc_cpu=qsl_cpu,
            seq_lens=cm.seq_lens,
            seq_lens_cpu=seq_lens_cpu,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping[:n].to(torch.int64),
            positions=positions,
            sink_positions=positions.clamp(max=self.sinks.cache_tokens),
        )


def _positions_from_lengths(query_start_loc: list[int], seq_lens: list[int]) -> torch.Tensor:
    parts = []
    for r, seq_len in enumerate(seq_lens):
        n = query_start_loc[r + 1] - query_start_loc[r]
        parts.append(torch.arange(seq_len - n, seq_len, dtype=torch.int64))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class SinksAttentionImpl(AttentionImpl[SinksMetadata]):
    """One decoder layer's SINKS attention. `rope` is bound after the model is built (rope.bind_rotary)."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if logits_soft_cap:
            unsupported.append("logit soft-capping")
        if kv_sharing_target_layer_name is not None:
            unsupported.append("cross-layer KV sharing")
        if kwargs.get("sinks") is not None:
            unsupported.append("learned attention sinks")
        if unsupported:
            raise ValueError(
                f"--attention-backend SINKS does not support {', '.join(unsupported)}; "
                "use a RoPE decoder model without these features or another backend"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.sinks = sinks_config_from_vllm(get_current_vllm_config())
        self.rope: RotaryParams | None = None

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SinksMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("SINKS does not fuse output quantization")
        if attn_metadata is None:  # profiling run: no KV cache yet
            return output.fill_(0)
        if self.rope is None:
            raise RuntimeError(
                "SINKS: no rotary embedding was bound to this attention layer; the model is not a supported "
                "RoPE decoder (see vllm_sinks.attention.rope.bind_rotary)"
            )
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if not isinstance(attn_metadata, SinksMetadata):
            self._forward_cuda(q, k, v, kv_cache, attn_metadata, out)
            return output
        positions = attn_metadata.positions
        ops_torch.write_kv(kv_cache, self.rope.rotate(k, positions), v, attn_metadata.slot_mapping)
        ops_torch.sink_window_attention(
            self.rope.rotate(q, positions),
            self.rope.rotate(q, attn_metadata.sink_positions),
            kv_cache,
            attn_metadata.block_table,
            attn_metadata.query_start_loc_cpu,
            attn_metadata.seq_lens_cpu,
            self.sinks.sink_tokens,
            self.sinks.window_tokens,
            self.scale,
            out,
        )
        return output

    def _forward_cuda(self, q, k, v, kv_cache, md, out) -> None:
        """FlashAttention on the window, then the sinks merged in by log-sum-exp (see ops_cuda)."""
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version

        from vllm_sinks.attention import ops_cuda

        assert self.rope is not None
        fa = md.fa
        key_cache, value_cache = kv_cache.unbind(0)
        q_sink = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        ops_cuda.rope_and_cache(
            q, k, v, q_sink, key_cache, value_cache, fa.slot_mapping[: q.shape[0]],
            md.cos_win, md.sin_win, md.cos_sink, md.sin_sink, self.rope.rotary_dim, self.rope.is_neox_style,
        )  # fmt: skip
        S, W = self.sinks.sink_tokens, self.sinks.window_tokens
        lse = None
        if md.fa_window >= 0:
            _, lse = flash_attn_varlen_func(
                q=q,
                k=key_cache,
                v=value_cache,
                out=out,
                cu_seqlens_q=fa.query_start_loc,
                max_seqlen_q=fa.max_query_len,
                seqused_k=fa.seq_lens,
                max_seqlen_k=fa.max_seq_len,
                softmax_scale=self.scale,
                causal=True,
                window_size=[md.fa_window, 0],
                block_table=fa.block_table,
                return_softmax_lse=True,
                scheduler_metadata=fa.scheduler_metadata,
                fa_version=get_flash_attn_version(head_size=self.head_size),
                num_splits=fa.max_num_splits,
            )
        if md.band_tiles is None:  # FA's window is W: add the sinks
            ops_cuda.sink_attention_merge(
                q_sink, key_cache, value_cache, out, lse, md.positions, md.req_indices, fa.block_table,
                S, W, self.scale, fa.max_seq_len,
            )  # fmt: skip
        elif md.fa_window < 0 or fa.max_seq_len - 1 > md.fa_window:  # else FA's window holds every key
            ops_cuda.band_sink_attention(
                q, q_sink, key_cache, value_cache, out, lse, md.positions, fa.block_table, fa.query_start_loc,
                *md.band_tiles, S, W, md.fa_window, self.scale, md.band_heads_per_program,
            )  # fmt: skip
