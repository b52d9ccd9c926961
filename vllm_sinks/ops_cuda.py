"""CUDA kernels of SINKS (Triton), kept apart from the bookkeeping in backend_cuda.py.

Per layer and step SINKS launches three kernels:
  rope_and_cache       rotate q (window and sink variants) and k, write k and v to the paged cache;
  FlashAttention       the window [t - W, t] of each query, with its log-sum-exp (vLLM's FA3);
  sink_attention_merge the sinks [0, min(S, t - W)) of each query, merged into the window output by LSE.
All take device tensors only, so they can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_2d(x, x_partner, cos, sin, d, RD: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr):
    if NEOX:
        sign = tl.where(d < HALF, -1.0, 1.0)
    else:
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    rot = x * cos + sign * x_partner * sin
    return tl.where(d < RD, rot, x)


@triton.jit
def _rope_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, qs_ptr, kc_ptr, vc_ptr, slot_ptr,
    cw_ptr, sw_ptr, cs_ptr, ss_ptr,
    q_st, q_sh, k_st, k_sh, v_st, v_sh, qs_st, qs_sh,
    kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, cos_st,
    H: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, RD: tl.constexpr, HALF: tl.constexpr,
    NEOX: tl.constexpr, BLOCK_SIZE: tl.constexpr, BH: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    d = tl.arange(0, BD)
    if NEOX:
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        fi = d % HALF
    else:
        partner = d ^ 1
        fi = d // 2
    partner = tl.where(d < RD, partner, d)
    fi = tl.where(d < RD, fi, 0)
    dmask = d < D
    cw = tl.load(cw_ptr + t * cos_st + fi, mask=dmask, other=1.0)
    sw = tl.load(sw_ptr + t * cos_st + fi, mask=dmask, other=0.0)
    cs = tl.load(cs_ptr + t * cos_st + fi, mask=dmask, other=1.0)
    ss = tl.load(ss_ptr + t * cos_st + fi, mask=dmask, other=0.0)
    # Queries: window rotation in place, sink rotation to qs.
    h = tl.arange(0, BH)
    qm = (h[:, None] < H) & dmask[None, :]
    q_off = t * q_st + h[:, None] * q_sh
    q = tl.load(q_ptr + q_off + d[None, :], mask=qm, other=0.0).to(tl.float32)
    qp = tl.load(q_ptr + q_off + partner[None, :], mask=qm, other=0.0).to(tl.float32)
    q_win = _rotate_2d(q, qp, cw[None, :], sw[None, :], d[None, :], RD, HALF, NEOX)
    q_sink = _rotate_2d(q, qp, cs[None, :], ss[None, :], d[None, :], RD, HALF, NEOX)
    tl.store(
        qs_ptr + t * qs_st + h[:, None] * qs_sh + d[None, :], q_sink.to(qs_ptr.dtype.element_ty), mask=qm
    )
    tl.store(q_ptr + q_off + d[None, :], q_win.to(q_ptr.dtype.element_ty), mask=qm)
    # Keys rotated at the true index, values as they are, into the cache.
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        hk = tl.arange(0, BHK)
        km = (hk[:, None] < HK) & dmask[None, :]
        k_off = t * k_st + hk[:, None] * k_sh
        k = tl.load(k_ptr + k_off + d[None, :], mask=km, other=0.0).to(tl.float32)
        kp = tl.load(k_ptr + k_off + partner[None, :], mask=km, other=0.0).to(tl.float32)
        k_rot = _rotate_2d(k, kp, cw[None, :], sw[None, :], d[None, :], RD, HALF, NEOX)
        kc = kc_ptr + blk * kc_sb + off * kc_so + hk[:, None] * kc_sh + d[None, :]
        tl.store(kc, k_rot.to(kc_ptr.dtype.element_ty), mask=km)
        v = tl.load(v_ptr + t * v_st + hk[:, None] * v_sh + d[None, :], mask=km, other=0.0)
        vc = vc_ptr + blk * vc_sb + off * vc_so + hk[:, None] * vc_sh + d[None, :]
        tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=km)


def rope_and_cache(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_sink: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_win: torch.Tensor,
    sin_win: torch.Tensor,
    cos_sink: torch.Tensor,
    sin_sink: torch.Tensor,
    rotary_dim: int,
    is_neox_style: bool,
) -> None:
    """query [n, H, D] is rotated in place (window); q_sink [n, H, D] receives the sink rotation;
    key/value [n, HK, D] go to key_cache/value_cache [blocks, B, HK, D] at slot_mapping (< 0: skipped)."""
    n, num_heads, head_size = query.shape
    num_kv_heads = key.shape[1]
    if n == 0:
        return
    _rope_and_cache_kernel[(n,)](
        query, key, value, q_sink, key_cache, value_cache, slot_mapping,
        cos_win, sin_win, cos_sink, sin_sink,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        q_sink.stride(0), q_sink.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), cos_win.stride(0),
        H=num_heads, HK=num_kv_heads, D=head_size, RD=rotary_dim, HALF=rotary_dim // 2, NEOX=is_neox_style,
        BLOCK_SIZE=key_cache.shape[1], BH=triton.next_power_of_2(num_heads),
        BHK=triton.next_power_of_2(num_kv_heads), BD=triton.next_power_of_2(head_size),
    )  # fmt: skip


# Steps of at least this many tokens merge all query heads of a KV head in one program.
GROUPED_MIN_TOKENS = 512


def merge_heads_per_program(num_tokens: int, group: int) -> int:
    """sink_attention_merge's default layout: for prefill-sized steps the largest power of two dividing the
    GQA group (at most 8), so each sink key is loaded once per KV head (8,192 tokens at 16k context, GQA
    32/8, H100: 0.30 ms vs 0.43 ms with one head per program); one head per program for decode-sized steps."""
    return min(group & -group, 8) if num_tokens >= GROUPED_MIN_TOKENS else 1


# The LSE's head stride is the step's token count: unspecialized, so one binary serves every batch size
# (not three, for 1, multiples of 16 and the rest, each a JIT compile and launcher build at start-up).
@triton.jit(do_not_specialize=["lse_sh"])
def _sink_merge_kernel(
    qs_ptr, kc_ptr, vc_ptr, out_ptr, lse_ptr, pos_ptr, req_ptr, bt_ptr,
    qs_st, qs_sh, kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, out_st, out_sh, lse_sh, lse_st, bt_sr,
    scale, S: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr, HPP: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Program (t, g): token t, query heads [g * HPP, (g + 1) * HPP); they share a KV head (HPP | GROUP)."""
    t = tl.program_id(0)
    h0 = tl.program_id(1) * HPP
    pos = tl.load(pos_ptr + t)
    n_valid = tl.minimum(pos - W, S)
    if n_valid > 0:
        r = tl.load(req_ptr + t)
        hk = h0 // GROUP
        hh = h0 + tl.arange(0, HPP)
        d = tl.arange(0, BD)
        j = tl.arange(0, BS)
        dmask = d < D
        jmask = j < n_valid
        blk = tl.load(bt_ptr + r * bt_sr + j // BLOCK_SIZE, mask=jmask, other=0).to(tl.int64)
        off = j % BLOCK_SIZE
        m2 = jmask[:, None] & dmask[None, :]
        k = tl.load(
            kc_ptr + blk[:, None] * kc_sb + off[:, None] * kc_so + hk * kc_sh + d[None, :], mask=m2, other=0.0
        ).to(tl.float32)  # [BS, BD]
        v = tl.load(
            vc_ptr + blk[:, None] * vc_sb + off[:, None] * vc_so + hk * vc_sh + d[None, :], mask=m2, other=0.0
        ).to(tl.float32)
        hd = hh[:, None] * qs_sh + d[None, :]
        q = tl.load(qs_ptr + t * qs_st + hd, mask=dmask[None, :], other=0.0).to(tl.float32)  # [HPP, BD]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [HPP, BS]
        scores = tl.where(jmask[None, :], scores, float("-inf"))
        m_s = tl.max(scores, axis=1)
        p = tl.exp(scores - m_s[:, None])
        l_s = tl.sum(p, axis=1)
        o_s = tl.sum(p[:, :, None] * v[None, :, :], axis=1) / l_s[:, None]  # [HPP, BD]
        lse_s = m_s + tl.log(l_s)
        lse_w = tl.load(lse_ptr + hh * lse_sh + t * lse_st)
        od = t * out_st + hh[:, None] * out_sh + d[None, :]
        o_w = tl.load(out_ptr + od, mask=dmask[None, :], other=0.0).to(tl.float32)
        m = tl.maximum(lse_w, lse_s)
        a = tl.exp(lse_w - m)
        b = tl.exp(lse_s - m)
        o = (a[:, None] * o_w + b[:, None] * o_s) / (a + b)[:, None]
        tl.store(out_ptr + od, o.to(out_ptr.dtype.element_ty), mask=dmask[None, :])


def sink_attention_merge(
    q_sink: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    out: torch.Tensor,
    window_lse: torch.Tensor,
    positions: torch.Tensor,
    req_indices: torch.Tensor,
    block_table: torch.Tensor,
    sink_tokens: int,
    window_tokens: int,
    scale: float,
    max_seq_len: int | None = None,
    heads_per_program: int | None = None,
) -> None:
    """Adds the sink part to `out` ([n, H, D], the window attention) in place, using the window's
    log-sum-exp `window_lse` ([H, n], FlashAttention's layout). Tokens with no sink outside their window
    are left as they are. `max_seq_len` (host int, the step's longest context): when no token can reach
    past its window, nothing is launched, except while a CUDA graph is captured (the graph is replayed with
    longer contexts). `heads_per_program`: query heads of one KV head per program, a power of two dividing
    H / HK; more means fewer programs and one load of each sink key (None: merge_heads_per_program)."""
    n, num_heads, head_size = q_sink.shape
    if n == 0 or sink_tokens == 0:
        return
    no_sink_reached = max_seq_len is not None and max_seq_len - 1 <= window_tokens
    if no_sink_reached and not (q_sink.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    hpp = heads_per_program
    if hpp is None:
        hpp = merge_heads_per_program(n, group)
    if hpp < 1 or hpp & (hpp - 1) or group % hpp:
        raise ValueError(f"heads_per_program={hpp}: use a power of two that divides H / HK = {group}")
    _sink_merge_kernel[(n, num_heads // hpp)](
        q_sink, key_cache, value_cache, out, window_lse, positions, req_indices, block_table,
        q_sink.stride(0), q_sink.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        out.stride(0), out.stride(1), window_lse.stride(0), window_lse.stride(1), block_table.stride(0),
        scale, S=sink_tokens, W=window_tokens, GROUP=group, HPP=hpp, D=head_size,
        BLOCK_SIZE=key_cache.shape[1], BS=max(2, triton.next_power_of_2(sink_tokens)),
        BD=triton.next_power_of_2(head_size),
    )  # fmt: skip
