"""Float32 PyTorch pieces of the sink + window split, for checking the CUDA path one part at a time.

`window_attention` is the attention of each query over its window alone, `sink_part` the same over its sinks
alone (each with its natural-log LSE, in FlashAttention's [H, n] layout); `merge` is the
log-sum-exp combination of a window part and a sink part. merge(exact window, sink_part) equals
ops_torch.sink_window_attention (tests/test_attention_oracle.py checks that), so on the GPU
merge(FlashAttention's window output and LSE, sink_part) is what ops_cuda.sink_attention_merge must return
from FlashAttention's output: that isolates the project's kernels from FlashAttention's own rounding.
"""

from __future__ import annotations

import torch


def window_attention(q_win, kv, block_table, qsl, seq_lens, W, scale, W_right=None, right_edge=None):
    """Attention of each query t over keys [t - W, t - W_right - 1] of its request (W_right None: [t - W, t];
    right_edge [n] or [n, H] given: [t - W, right_edge]), and the natural-log LSE ([H, n]); rows with no
    key get output 0 and LSE -inf."""
    from vllm_sinks.attention.ops_torch import _gather

    n, H, D = q_win.shape
    group = H // kv.shape[3]
    out = torch.zeros(n, H, D)
    lse = torch.full((H, n), float("-inf"))
    for r, seq_len in enumerate(seq_lens):
        start, end = qsl[r], qsl[r + 1]
        first = seq_len - (end - start)
        key_pos = torch.arange(max(0, first - W), seq_len)
        k, v = _gather(kv, block_table[r], key_pos)
        k = k.float().repeat_interleave(group, dim=1)
        v = v.float().repeat_interleave(group, dim=1)
        t = torch.arange(first, seq_len)
        hi = t if W_right is None else t - W_right - 1
        if right_edge is not None:
            hi = right_edge[start:end]
        hi = hi.t() if hi.dim() == 2 else hi[None, :]  # [H or 1, n]
        s = torch.einsum("nhd,mhd->hnm", q_win[start:end].float(), k) * scale
        vis = (key_pos[None, None, :] <= hi[..., None]) & (key_pos[None, None, :] >= (t - W)[None, :, None])
        s = s.masked_fill(~vis, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        lse[:, start:end] = row_lse
        p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)
        out[start:end] = torch.einsum("hnm,mhd->nhd", p, v)
    return out, lse


def sink_part(
    q_sink: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    req_indices: torch.Tensor,
    sink_tokens: int,
    window_tokens: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, H, D] output, [H, n] LSE) over sinks [0, min(S, t - W)); rows with no sink get LSE -inf."""
    from vllm_sinks.attention.ops_torch import _gather

    n, H, D = q_sink.shape
    group = H // kv_cache.shape[3]
    out = torch.zeros(n, H, D)
    lse = torch.full((H, n), float("-inf"))
    for i in range(n):
        num = min(sink_tokens, int(positions[i]) - window_tokens)
        if num <= 0:
            continue
        k, v = _gather(kv_cache, block_table[int(req_indices[i])], torch.arange(num))
        k = k.float().repeat_interleave(group, dim=1)  # [num, H, D]
        v = v.float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,mhd->hm", q_sink[i].float(), k) * scale
        lse[:, i] = torch.logsumexp(s, dim=-1)
        out[i] = torch.einsum("hm,mhd->hd", torch.softmax(s, dim=-1), v)
    return out, lse


def merge(o_w: torch.Tensor, lse_w: torch.Tensor, o_s: torch.Tensor, lse_s: torch.Tensor) -> torch.Tensor:
    """Softmax over the union of two disjoint key sets from each set's output and LSE ([n,H,D], [H,n]);
    a set with LSE -inf (no key) contributes nothing."""
    lw, ls = lse_w.t()[..., None].float(), lse_s.t()[..., None].float()  # [n, H, 1]
    m = torch.maximum(lw, ls)
    a, b = torch.exp(lw - m), torch.exp(ls - m)
    return (a * o_w.float() + b * o_s.float()) / (a + b)


def band_sink_part(q_win, q_sink, kv, block_table, qsl, seq_lens, positions, req_idx, S, W, fa_window, scale):
    """What ops_cuda.band_sink_attention adds to FlashAttention's [t - W', t] (W' = fa_window): the band
    [t - W, t - W' - 1] (the whole window if W' < 0) and the sinks, as one (output, LSE) part."""
    o_b, lse_b = window_attention(q_win, kv, block_table, qsl, seq_lens, W, scale,
                                  W_right=fa_window if fa_window >= 0 else None)  # fmt: skip
    o_s, lse_s = sink_part(q_sink, kv, block_table, positions, req_idx, S, W, scale)
    lse = torch.logaddexp(lse_b, lse_s)
    return merge(o_b, lse_b, o_s, lse_s).nan_to_num(0.0), lse
