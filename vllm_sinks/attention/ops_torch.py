"""Sink + window attention over a paged KV cache in plain PyTorch (the CPU path and the GPU tests' oracle).

Cache layout (same as vLLM's FlashAttention backend): kv_cache[0] = keys, kv_cache[1] = values, each
[num_blocks, block_size, num_kv_heads, head_size]. Keys in the cache are rotated at their true index.

For query token t of a request, the attended keys are partitioned into
  window: [max(0, t - W), t]                     scored with q rotated at t,
  sinks:  [0, min(S, max(0, t - W)))             scored with q rotated at min(t, S + W),
whose union is the StreamingLLM set and whose scores carry StreamingLLM's cache-index distances.
"""

from __future__ import annotations

import torch


def write_kv(
    kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatters key/value ([n, kv_heads, head_size]) into the cache at `slot_mapping` ([n]; -1 = skip). The
    cache is read through its strides: K then V of every block, or block-major (attention.layout)."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    n = slot_mapping.shape[0]
    slots = slot_mapping.to(torch.int64)
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[:n][valid], value[:n][valid]
    m = slots.shape[0]
    if kv_cache[0].is_contiguous():
        flat_k = kv_cache[0].view(num_blocks * block_size, *kv_cache.shape[3:])
        flat_v = kv_cache[1].view(num_blocks * block_size, *kv_cache.shape[3:])
        flat_k.index_copy_(0, slots, key[:m].to(flat_k.dtype))
        flat_v.index_copy_(0, slots, value[:m].to(flat_v.dtype))
        return
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[0].index_put_((blocks, offsets), key[:m].to(kv_cache.dtype))
    kv_cache[1].index_put_((blocks, offsets), value[:m].to(kv_cache.dtype))


def _gather(kv_cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor):
    """Keys and values at stream `positions` of the request whose block-table row is `block_row`."""
    block_size = kv_cache.shape[2]
    blocks = block_row[positions // block_size].to(torch.int64)
    offsets = positions % block_size
    return kv_cache[0][blocks, offsets], kv_cache[1][blocks, offsets]


def sink_window_attention(
    q_window: torch.Tensor,
    q_sink: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    sink_tokens: int,
    window_tokens: int,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Writes attention for every query token into out ([n, heads, head_size]); float32 arithmetic.

    q_window / q_sink: [n, heads, head_size], the same queries rotated for the window and the sink part.
    query_start_loc: [num_reqs + 1] offsets; seq_lens: [num_reqs] context lengths including the new tokens.
    """
    num_heads = q_window.shape[1]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    device = q_window.device
    for r, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[r], query_start_loc[r + 1]
        n = end - start
        if n == 0:
            continue
        first_q = seq_len - n
        t = torch.arange(first_q, seq_len, device=device)  # [n]
        lo = max(0, first_q - window_tokens)
        num_sinks = min(sink_tokens, max(0, seq_len - 1 - window_tokens))
        key_pos = torch.arange(lo, seq_len, device=device)
        k, v = _gather(kv_cache, block_table[r], key_pos)  # [m, kv_heads, d]
        qw = q_window[start:end].float()
        scores = torch.einsum("nhd,mhd->hnm", qw, k.float().repeat_interleave(group, dim=1)) * scale
        visible = (key_pos[None, :] <= t[:, None]) & (key_pos[None, :] >= t[:, None] - window_tokens)
        values = v.float().repeat_interleave(group, dim=1)
        if num_sinks > 0:
            sink_pos = torch.arange(num_sinks, device=device)
            ks, vs = _gather(kv_cache, block_table[r], sink_pos)
            qs = q_sink[start:end].float()
            sink_scores = torch.einsum("nhd,mhd->hnm", qs, ks.float().repeat_interleave(group, dim=1)) * scale
            sink_visible = sink_pos[None, :] < (t[:, None] - window_tokens)
            scores = torch.cat((sink_scores, scores), dim=-1)
            visible = torch.cat((sink_visible, visible), dim=-1)
            values = torch.cat((vs.float().repeat_interleave(group, dim=1), values), dim=0)
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hnm,mhd->nhd", probs, values).to(out.dtype)
    return out
