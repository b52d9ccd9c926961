"""CUDA kernels of SINKS (Triton), kept apart from the bookkeeping in backend_cuda.py.

Per step the metadata builder fills the rotary tables in one launch (rotary_tables). Per layer and step
SINKS launches three kernels:
  rope_and_cache       rotate q (window and sink variants) and k, write k and v to the paged cache;
  FlashAttention       the window of each query, with its log-sum-exp (vLLM's FA3);
  a merge kernel       what FlashAttention left out, merged into its output by log-sum-exp:
    decode-only steps:   FA3's window is [t - W, t]; sink_attention_merge adds the sinks [0, min(S, t - W));
    steps with prefill:  FA3's window is [t - W', t] with W' = exact_fa_window(W) <= W; band_sink_attention
                         adds the band [t - W, t - W' - 1] and the sinks, a tile of tokens per program.
Why two windows: FA3's IntraWGOverlap mainloop (vllm-project/flash-attention, hopper/; head dims 80-256)
computes its causal-mask limits from the unshifted key length after shifting the keys to the window's
start, so in a prefill chunk the first rows of a query tile can see keys past their own position. Measured
on an H100 (benchmarks/gpu/fa_window_diag.py): exact iff (W + 1) mod kBlockN = 0 and the query tile
(kBlockM / GQA group tokens) spans at most kBlockN + 1 tokens (head size 256 without GQA: never exact).
Decode rows (one token per request) are never affected.
The kernels take device tensors only; the decode-step ones can be captured in CUDA graphs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Launch layouts by step size, measured on an H100 (benchmarks/bench_kernel.py --merge-sweep, decode batch 64;
# benchmarks/gpu/prefill_ab.py, 8,192 prefill tokens). Decode-sized steps: rope_and_cache one program per KV
# head and its query heads, the merge one query head per program in one warp. Steps of at least this many
# tokens: rope_and_cache one program per token, the merge a KV head's query heads per program in 4 warps.
GROUPED_MIN_TOKENS = 512


@triton.jit
def _rotate_2d(x, x_partner, cos, sin, d, RD: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr):
    if NEOX:
        sign = tl.where(d < HALF, -1.0, 1.0)
    else:
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    rot = x * cos + sign * x_partner * sin
    return tl.where(d < RD, rot, x)


@triton.jit(do_not_specialize=["n", "cache_tokens"])
def _rotary_tables_kernel(
    pos_ptr, turns_ptr, mscale_ptr, two_pi_ptr, out_ptr, n, cache_tokens, out_sp, out_st,
    HALF: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
):  # fmt: skip
    """Program i: tokens [i * BT, (i + 1) * BT). Angles in float64 turns reduced to [0, 1) before cos/sin."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    f = tl.arange(0, BF)
    tm = t < n
    fm = f < HALF
    m2 = tm[:, None] & fm[None, :]
    pos = tl.load(pos_ptr + t, mask=tm, other=0)
    turns = tl.load(turns_ptr + f, mask=fm, other=0.0)  # float64, omega / (2 pi)
    mscale = tl.load(mscale_ptr + f, mask=fm, other=0.0)[None, :]  # float64
    two_pi = tl.load(two_pi_ptr)  # float64 (a Python float constant would be float32 in Triton)
    a = pos.to(tl.float64)[:, None] * turns[None, :]
    a = (a - tl.floor(a)) * two_pi
    b = tl.minimum(pos, cache_tokens).to(tl.float64)[:, None] * turns[None, :]
    b = (b - tl.floor(b)) * two_pi
    o = out_ptr + t[:, None] * out_st + f[None, :]
    tl.store(o, (tl.cos(a) * mscale).to(tl.float32), mask=m2)
    tl.store(o + out_sp, (tl.sin(a) * mscale).to(tl.float32), mask=m2)
    tl.store(o + 2 * out_sp, (tl.cos(b) * mscale).to(tl.float32), mask=m2)
    tl.store(o + 3 * out_sp, (tl.sin(b) * mscale).to(tl.float32), mask=m2)


def rotary_tables(
    positions: torch.Tensor, turns: torch.Tensor, mscale: torch.Tensor, two_pi: torch.Tensor,
    cache_tokens: int, out: torch.Tensor,
) -> None:  # fmt: skip
    """Fills out[:, :n] ([4, >= n, half] float32) for `positions` ([n] int64): cos and sin at the positions,
    then at min(positions, cache_tokens) (the sink queries' position), scaled by mscale. `turns` = omega /
    (2 pi) and `mscale` ([half] each) and `two_pi` ([1]) are float64. One launch: a step's tables cost one
    kernel, not the ~15 small torch kernels of computing them op by op."""
    n = positions.shape[0]
    if n == 0:
        return
    half = turns.shape[0]
    BT = 16
    _rotary_tables_kernel[(triton.cdiv(n, BT),)](
        positions, turns, mscale, two_pi, out, n, cache_tokens, out.stride(0), out.stride(1),
        HALF=half, BT=BT, BF=triton.next_power_of_2(half),
    )  # fmt: skip


@triton.jit
def _rope_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, qs_ptr, kc_ptr, vc_ptr, slot_ptr,
    cw_ptr, sw_ptr, cs_ptr, ss_ptr,
    q_st, q_sh, k_st, k_sh, v_st, v_sh, qs_st, qs_sh,
    kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, cos_st,
    QH: tl.constexpr, KH: tl.constexpr, D: tl.constexpr, RD: tl.constexpr, HALF: tl.constexpr,
    NEOX: tl.constexpr, BLOCK_SIZE: tl.constexpr, BH: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Program (t, g): token t, query heads [g * QH, (g + 1) * QH) and KV heads [g * KH, (g + 1) * KH)."""
    t = tl.program_id(0)
    g = tl.program_id(1)
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
    slot = tl.load(slot_ptr + t)
    # Queries: window rotation in place, sink rotation to qs.
    h = g * QH + tl.arange(0, BH)
    qm = (tl.arange(0, BH)[:, None] < QH) & dmask[None, :]
    q_off = t * q_st + h[:, None] * q_sh
    q = tl.load(q_ptr + q_off + d[None, :], mask=qm, other=0.0).to(tl.float32)
    qp = tl.load(q_ptr + q_off + partner[None, :], mask=qm, other=0.0).to(tl.float32)
    q_win = _rotate_2d(q, qp, cw[None, :], sw[None, :], d[None, :], RD, HALF, NEOX)
    q_sink = _rotate_2d(q, qp, cs[None, :], ss[None, :], d[None, :], RD, HALF, NEOX)
    tl.store(
        qs_ptr + t * qs_st + h[:, None] * qs_sh + d[None, :], q_sink.to(qs_ptr.dtype.element_ty), mask=qm
    )
    # q is rotated in place and an element's rotation reads its partner, which another warp may hold (e.g.
    # one head per program: a [1, D] tile spread over every warp): every load before any in-place store.
    tl.debug_barrier()
    tl.store(q_ptr + q_off + d[None, :], q_win.to(q_ptr.dtype.element_ty), mask=qm)
    # Keys rotated at the true index, values as they are, into the cache.
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        hk = g * KH + tl.arange(0, BHK)
        km = (tl.arange(0, BHK)[:, None] < KH) & dmask[None, :]
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
    programs_per_token: int | None = None,
) -> None:
    """query [n, H, D] is rotated in place (window); q_sink [n, H, D] receives the sink rotation;
    key/value [n, HK, D] go to key_cache/value_cache [blocks, B, HK, D] at slot_mapping (< 0: skipped).
    `programs_per_token` splits a token's heads over that many programs, each a share of the query and KV
    heads (a divisor of HK; None: one per KV head for decode-sized steps, one for larger ones)."""
    n, num_heads, head_size = query.shape
    num_kv_heads = key.shape[1]
    if n == 0:
        return
    p = programs_per_token
    if p is None:
        p = num_kv_heads if n < GROUPED_MIN_TOKENS else 1
    if p < 1 or num_kv_heads % p:
        raise ValueError(f"programs_per_token={p}: use a divisor of the KV heads ({num_kv_heads})")
    qh, kh = num_heads // p, num_kv_heads // p
    _rope_and_cache_kernel[(n, p)](
        query, key, value, q_sink, key_cache, value_cache, slot_mapping,
        cos_win, sin_win, cos_sink, sin_sink,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        q_sink.stride(0), q_sink.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), cos_win.stride(0),
        QH=qh, KH=kh, D=head_size, RD=rotary_dim, HALF=rotary_dim // 2, NEOX=is_neox_style,
        BLOCK_SIZE=key_cache.shape[1], BH=triton.next_power_of_2(qh),
        BHK=triton.next_power_of_2(kh), BD=triton.next_power_of_2(head_size),
    )  # fmt: skip


def merge_heads_per_program(num_tokens: int, group: int) -> int:
    """sink_attention_merge's default layout: for prefill-sized steps the largest power of two dividing the
    GQA group (at most 8), so each sink key is loaded once per KV head (8,192 tokens at 16k context, GQA
    32/8, H100: 0.30 ms vs 0.43 ms with one head per program); one head per program for decode-sized steps."""
    return min(group & -group, 8) if num_tokens >= GROUPED_MIN_TOKENS else 1


# The LSE's head stride is the step's token count: unspecialized, so one binary serves every batch size
# (not three, for 1, multiples of 16 and the rest, each a JIT compile and launcher build at start-up);
# likewise S and W (one binary for every configuration).
@triton.jit(do_not_specialize=["lse_sh", "S", "W"])
def _sink_merge_kernel(
    qs_ptr, kc_ptr, vc_ptr, out_ptr, lse_ptr, pos_ptr, req_ptr, bt_ptr,
    qs_st, qs_sh, kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, out_st, out_sh, lse_sh, lse_st, bt_sr,
    scale, S, W, GROUP: tl.constexpr, HPP: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Program (t, g): token t, query heads [g * HPP, (g + 1) * HPP); they share a KV head (HPP | GROUP).
    Loads that do not depend on one another are issued together (position, request, query, FA's row and
    LSE), so a decode step's merge waits on three memory round trips, not five."""
    t = tl.program_id(0)
    h0 = tl.program_id(1) * HPP
    hk = h0 // GROUP
    hh = h0 + tl.arange(0, HPP)
    d = tl.arange(0, BD)
    j = tl.arange(0, BS)
    dmask = d < D
    pos = tl.load(pos_ptr + t)
    r = tl.load(req_ptr + t)
    q = tl.load(qs_ptr + t * qs_st + hh[:, None] * qs_sh + d[None, :], mask=dmask[None, :], other=0.0)
    lse_w = tl.load(lse_ptr + hh * lse_sh + t * lse_st)
    od = t * out_st + hh[:, None] * out_sh + d[None, :]
    o_w = tl.load(out_ptr + od, mask=dmask[None, :], other=0.0)
    n_valid = tl.minimum(pos - W, S)
    if n_valid > 0:
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
        scores = tl.sum(q.to(tl.float32)[:, None, :] * k[None, :, :], axis=2) * scale  # [HPP, BS]
        scores = tl.where(jmask[None, :], scores, float("-inf"))
        m_s = tl.max(scores, axis=1)
        p = tl.exp(scores - m_s[:, None])
        l_s = tl.sum(p, axis=1)
        o_s = tl.sum(p[:, :, None] * v[None, :, :], axis=1) / l_s[:, None]  # [HPP, BD]
        lse_s = m_s + tl.log(l_s)
        m = tl.maximum(lse_w, lse_s)
        a = tl.exp(lse_w - m)
        b = tl.exp(lse_s - m)
        o = (a[:, None] * o_w.to(tl.float32) + b[:, None] * o_s) / (a + b)[:, None]
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
    num_warps: int | None = None,
) -> None:
    """Adds the sink part to `out` ([n, H, D], the window attention) in place, using the window's
    log-sum-exp `window_lse` ([H, n], FlashAttention's layout). Tokens with no sink outside their window
    are left as they are. `max_seq_len` (host int, the step's longest context): when no token can reach
    past its window, nothing is launched, except while a CUDA graph is captured (the graph is replayed with
    longer contexts). `heads_per_program`: query heads of one KV head per program, a power of two dividing
    H / HK; more means fewer programs and one load of each sink key (None: merge_heads_per_program);
    `num_warps`: Triton's per program (None: 1 for decode-sized steps, else 4)."""
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
    if num_warps is None:
        num_warps = 1 if n < GROUPED_MIN_TOKENS else 4
    _sink_merge_kernel[(n, num_heads // hpp)](
        q_sink, key_cache, value_cache, out, window_lse, positions, req_indices, block_table,
        q_sink.stride(0), q_sink.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        out.stride(0), out.stride(1), window_lse.stride(0), window_lse.stride(1), block_table.stride(0),
        scale, S=sink_tokens, W=window_tokens, GROUP=group, HPP=hpp, D=head_size,
        BLOCK_SIZE=key_cache.shape[1], BS=max(2, triton.next_power_of_2(sink_tokens)),
        BD=triton.next_power_of_2(head_size), num_warps=num_warps,
    )  # fmt: skip


# --- steps with prefill rows: FA3 on an exact window, the band and the sinks here --------------------------
def fa3_tiles(head_size: int) -> tuple[int, int] | None:
    """(kBlockM, kBlockN) of FA3's 16-bit local-attention forward kernel on SM90 when it uses the
    IntraWGOverlap mainloop (hopper/tile_size.h: tile_size_fwd_sm90); None where it does not (<= 64)."""
    if head_size <= 64:
        return None
    if head_size <= 96:
        return 192, 128
    if head_size <= 128:
        return 128, 128
    if head_size <= 192:
        return 128, 96
    return 128, 64


def exact_fa_window(window_tokens: int, head_size: int, group: int = 1) -> int:
    """The largest left window W' <= W that FA3 computes exactly in prefill rows, for query heads per KV
    head `group`: W itself where the mainloop is unaffected; else (W' + 1) mod kBlockN = 0, provided a
    query tile (kBlockM / group tokens, GQA packed) spans at most kBlockN + 1 tokens (H100, 2026-11-24:
    head size 256 without GQA was off for every window, with GQA 2-8 exact). -1 when there is no such W'
    (W < kBlockN - 1, or tiles too tall): no FA call, the band kernel takes the whole window."""
    tiles = fa3_tiles(head_size)
    if tiles is None:
        return window_tokens
    block_m, block_n = tiles
    if -(-block_m // group) > block_n + 1:
        return -1
    return (window_tokens + 1) // block_n * block_n - 1


@dataclass(frozen=True)
class BandTiling:
    """band_sink_attention's launch shape: query rows (tokens x heads) per program, keys per inner step, and
    Triton's num_warps / num_stages. Every tiling computes the same rows (the GPU kernel test pins the
    default); the default is the fastest measured (benchmarks/gpu/prefill_ab.py --band-sweep)."""

    rows: int = 64
    keys: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def tokens_per_tile(self, heads_per_program: int) -> int:
        return self.rows // heads_per_program

    @classmethod
    def from_env(cls) -> BandTiling:
        """VLLM_SINKS_BAND_TILING="rows,keys,num_warps,num_stages" overrides the default (to tune another
        GPU with prefill_ab.py --band-sweep); unset: the default."""
        spec = os.environ.get("VLLM_SINKS_BAND_TILING", "").strip()
        if not spec:
            return cls()
        try:
            rows, keys, warps, stages = (int(x) for x in spec.split(","))
        except ValueError:
            rows = keys = warps = stages = -1
        shapes_ok = all(x >= 16 and x & (x - 1) == 0 for x in (rows, keys))
        if not (shapes_ok and warps in (1, 2, 4, 8, 16) and 1 <= stages <= 8):
            raise ValueError(
                f"VLLM_SINKS_BAND_TILING={spec!r}: expected rows,keys,num_warps,num_stages: rows and keys "
                "powers of two >= 16, num_warps a power of two up to 16, num_stages 1..8; the default is "
                "64,32,4,2 (unset it for the default)"
            )
        return cls(rows, keys, warps, stages)


BAND_TILING = BandTiling.from_env()


def band_tiles(query_start_loc: list[int], tokens_per_tile: int) -> tuple[list[int], list[int]]:
    """(request, first token) of each tile: a request's tokens in runs of tokens_per_tile (host lists)."""
    reqs: list[int] = []
    starts: list[int] = []
    for r in range(len(query_start_loc) - 1):
        for t in range(query_start_loc[r], query_start_loc[r + 1], tokens_per_tile):
            reqs.append(r)
            starts.append(t)
    return reqs, starts


@triton.jit
def _online_update(m_i, l_i, acc, s, v, IEEE: tl.constexpr):
    """One online-softmax step: scores s [R, N] (-inf where masked) and values v [N, D]."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _load_kv(kc_ptr, vc_ptr, bt_row, kidx, kmask, hk, d, dmask,
             kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """Keys and values [N, BD] of KV head hk at stream positions kidx (masked: zeros) of one request."""
    blk = tl.load(bt_row + kidx // BLOCK_SIZE, mask=kmask, other=0).to(tl.int64)
    off = kidx % BLOCK_SIZE
    m2 = kmask[:, None] & dmask[None, :]
    k_off = blk[:, None] * kc_sb + off[:, None] * kc_so + hk * kc_sh + d[None, :]
    v_off = blk[:, None] * vc_sb + off[:, None] * vc_so + hk * vc_sh + d[None, :]
    return tl.load(kc_ptr + k_off, mask=m2, other=0.0), tl.load(vc_ptr + v_off, mask=m2, other=0.0)


@triton.jit(do_not_specialize=["lse_sh", "S", "W", "WL"])
def _band_sink_kernel(
    q_ptr, qs_ptr, kc_ptr, vc_ptr, out_ptr, lse_ptr, pos_ptr, bt_ptr, qsl_ptr, tile_req_ptr, tile_start_ptr,
    q_st, q_sh, qs_st, qs_sh, kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, out_st, out_sh, lse_sh, lse_st, bt_sr,
    scale, S, W, WL, HAS_FA: tl.constexpr, GROUP: tl.constexpr,
    HPP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BS: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Program (tile, g): tokens [start, start + BM) of one request x query heads [g * HPP, (g + 1) * HPP)
    of one KV head; rows are (token, head) pairs. Attends each row's band [t - W, t - WL - 1] (with FA) or
    window [t - W, t] (without) and its sinks [0, min(S, t - W)), then merges with FA's row by LSE."""
    tile = tl.program_id(0)
    h0 = tl.program_id(1) * HPP
    hk = h0 // GROUP
    r = tl.load(tile_req_ptr + tile)
    t0 = tl.load(tile_start_ptr + tile)
    t_end = tl.minimum(tl.load(qsl_ptr + r + 1), t0 + BM)
    rows = tl.arange(0, BM * HPP)
    tok = t0 + rows // HPP
    hh = h0 + rows % HPP
    row_ok = tok < t_end
    pos = tl.load(pos_ptr + tok, mask=row_ok, other=0)
    d = tl.arange(0, BD)
    dmask = d < D
    pos_first = tl.load(pos_ptr + t0)
    pos_last = tl.load(pos_ptr + t_end - 1)
    if HAS_FA:
        hi = pos - WL - 1  # last band key of each row
        k_hi = pos_last - WL - 1
    else:
        hi = pos
        k_hi = pos_last
    k_lo = tl.maximum(pos_first - W, 0)
    m_i = tl.full([BM * HPP], float("-inf"), tl.float32)
    l_i = tl.zeros([BM * HPP], tl.float32)
    acc = tl.zeros([BM * HPP, BD], tl.float32)
    qmask = row_ok[:, None] & dmask[None, :]
    # Sinks, scored with the sink-rotated queries.
    n_sink = tl.minimum(pos_last - W, S)
    if n_sink > 0:
        qs = tl.load(qs_ptr + tok[:, None] * qs_st + hh[:, None] * qs_sh + d[None, :], mask=qmask, other=0.0)
        j = tl.arange(0, BS)
        k, v = _load_kv(kc_ptr, vc_ptr, bt_ptr + r * bt_sr, j, j < n_sink, hk, d, dmask,
                        kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, BLOCK_SIZE)  # fmt: skip
        if IEEE:
            sc = tl.dot(qs, tl.trans(k), input_precision="ieee") * scale
        else:
            sc = tl.dot(qs, tl.trans(k)) * scale
        ok = row_ok[:, None] & (j[None, :] < tl.minimum(pos - W, S)[:, None])
        sc = tl.where(ok, sc, float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, sc, v, IEEE)
    # The band (the whole window without FA), scored with the window-rotated queries.
    if k_hi >= k_lo:
        q = tl.load(q_ptr + tok[:, None] * q_st + hh[:, None] * q_sh + d[None, :], mask=qmask, other=0.0)
        for kb in range(k_lo, k_hi + 1, BN):
            kidx = kb + tl.arange(0, BN)
            k, v = _load_kv(kc_ptr, vc_ptr, bt_ptr + r * bt_sr, kidx, kidx <= k_hi, hk, d, dmask,
                            kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, BLOCK_SIZE)  # fmt: skip
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                sc = tl.dot(q, tl.trans(k)) * scale
            ok = row_ok[:, None] & (kidx[None, :] >= (pos - W)[:, None]) & (kidx[None, :] <= hi[:, None])
            sc = tl.where(ok, sc, float("-inf"))
            m_i, l_i, acc = _online_update(m_i, l_i, acc, sc, v, IEEE)
    lse_b = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("-inf"))
    o_b = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    optr = out_ptr + tok[:, None] * out_st + hh[:, None] * out_sh + d[None, :]
    if HAS_FA:
        lse_w = tl.load(lse_ptr + hh * lse_sh + tok * lse_st, mask=row_ok, other=0.0)
        o_w = tl.load(optr, mask=qmask, other=0.0).to(tl.float32)
        m = tl.maximum(lse_w, lse_b)
        a = tl.exp(lse_w - m)
        b = tl.exp(lse_b - m)
        o_b = (a[:, None] * o_w + b[:, None] * o_b) / (a + b)[:, None]
    tl.store(optr, o_b.to(out_ptr.dtype.element_ty), mask=qmask)


def band_sink_attention(
    q: torch.Tensor,
    q_sink: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    out: torch.Tensor,
    fa_lse: torch.Tensor | None,
    positions: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    tile_req: torch.Tensor,
    tile_start: torch.Tensor,
    sink_tokens: int,
    window_tokens: int,
    fa_window: int,
    scale: float,
    heads_per_program: int,
    tiling: BandTiling = BAND_TILING,
) -> None:
    """Completes `out` ([n, H, D]) for a step with prefill rows. With FA (`fa_lse` [H, n] given, fa_window
    = W' >= 0) `out` holds FA3's attention over [t - W', t]; this adds the band [t - W, t - W' - 1] and the
    sinks by LSE. Without (fa_lse None) it computes the whole window and the sinks. q / q_sink [n, H, D]:
    the window- and sink-rotated queries. Tiles: band_tiles(query_start_loc,
    tiling.tokens_per_tile(heads_per_program)) as device int32 tensors. Not for CUDA-graph capture (the
    tiles come from the host)."""
    n, num_heads, head_size = q.shape
    num_tiles = tile_req.shape[0]
    if n == 0 or num_tiles == 0:
        return
    has_fa = fa_lse is not None
    if has_fa and fa_window >= window_tokens and sink_tokens == 0:
        return  # nothing left to add
    group = num_heads // key_cache.shape[2]
    hpp = heads_per_program
    if hpp < 1 or hpp & (hpp - 1) or group % hpp or hpp > 8:
        raise ValueError(f"heads_per_program={hpp}: a power of two dividing H / HK = {group}, at most 8")
    lse = fa_lse if has_fa else out  # unused without FA
    lse_sh, lse_st = (fa_lse.stride(0), fa_lse.stride(1)) if has_fa else (0, 0)
    _band_sink_kernel[(num_tiles, num_heads // hpp)](
        q, q_sink, key_cache, value_cache, out, lse, positions, block_table, query_start_loc, tile_req,
        tile_start,
        q.stride(0), q.stride(1), q_sink.stride(0), q_sink.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        out.stride(0), out.stride(1), lse_sh, lse_st, block_table.stride(0),
        scale, S=sink_tokens, W=window_tokens, WL=max(fa_window, -1), HAS_FA=has_fa, GROUP=group, HPP=hpp,
        BM=tiling.tokens_per_tile(hpp), BN=tiling.keys, D=head_size, BLOCK_SIZE=key_cache.shape[1],
        BS=max(16, triton.next_power_of_2(sink_tokens)), BD=triton.next_power_of_2(head_size),
        IEEE=q.dtype == torch.float32, num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )  # fmt: skip
