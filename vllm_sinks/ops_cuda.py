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


@triton.jit
def _sink_merge_kernel(
    qs_ptr, kc_ptr, vc_ptr, out_ptr, lse_ptr, pos_ptr, req_ptr, bt_ptr,
    qs_st, qs_sh, kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, out_st, out_sh, lse_sh, lse_st, bt_sr,
    scale, S: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    n_valid = tl.minimum(pos - W, S)
    if n_valid > 0:
        r = tl.load(req_ptr + t)
        hk = h // GROUP
        d = tl.arange(0, BD)
        j = tl.arange(0, BS)
        dmask = d < D
        jmask = j < n_valid
        blk = tl.load(bt_ptr + r * bt_sr + j // BLOCK_SIZE, mask=jmask, other=0).to(tl.int64)
        off = j % BLOCK_SIZE
        m2 = jmask[:, None] & dmask[None, :]
        k = tl.load(
            kc_ptr + blk[:, None] * kc_sb + off[:, None] * kc_so + hk * kc_sh + d[None, :], mask=m2, other=0.0
        )
        v = tl.load(
            vc_ptr + blk[:, None] * vc_sb + off[:, None] * vc_so + hk * vc_sh + d[None, :], mask=m2, other=0.0
        )
        q = tl.load(qs_ptr + t * qs_st + h * qs_sh + d, mask=dmask, other=0.0).to(tl.float32)
        scores = tl.sum(q[None, :] * k.to(tl.float32), axis=1) * scale
        scores = tl.where(jmask, scores, float("-inf"))
        m_s = tl.max(scores, axis=0)
        p = tl.exp(scores - m_s)
        l_s = tl.sum(p, axis=0)
        o_s = tl.sum(p[:, None] * v.to(tl.float32), axis=0) / l_s
        lse_s = m_s + tl.log(l_s)
        lse_w = tl.load(lse_ptr + h * lse_sh + t * lse_st)
        o_w = tl.load(out_ptr + t * out_st + h * out_sh + d, mask=dmask, other=0.0).to(tl.float32)
        m = tl.maximum(lse_w, lse_s)
        a = tl.exp(lse_w - m)
        b = tl.exp(lse_s - m)
        o = (a * o_w + b * o_s) / (a + b)
        tl.store(out_ptr + t * out_st + h * out_sh + d, o.to(out_ptr.dtype.element_ty), mask=dmask)


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
) -> None:
    """Adds the sink part to `out` ([n, H, D], the window attention) in place, using the window's
    log-sum-exp `window_lse` ([H, n], FlashAttention's layout). Tokens with no sink outside their window
    are left as they are."""
    n, num_heads, head_size = q_sink.shape
    if n == 0 or sink_tokens == 0:
        return
    num_kv_heads = key_cache.shape[2]
    _sink_merge_kernel[(n, num_heads)](
        q_sink, key_cache, value_cache, out, window_lse, positions, req_indices, block_table,
        q_sink.stride(0), q_sink.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        out.stride(0), out.stride(1), window_lse.stride(0), window_lse.stride(1), block_table.stride(0),
        scale, S=sink_tokens, W=window_tokens, GROUP=num_heads // num_kv_heads, D=head_size,
        BLOCK_SIZE=key_cache.shape[1], BS=max(16, triton.next_power_of_2(sink_tokens)),
        BD=triton.next_power_of_2(head_size),
    )  # fmt: skip
