"""The Triton kernels of ops_cuda run by Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set
before Triton is imported, so tests/test_kernels_interpreted.py runs this in a fresh process).

FlashAttention (the window part on the GPU) is CUDA-only; here the window output and its log-sum-exp come
from PyTorch, in FlashAttention's layout ([n, H, D] and [H, n]), over the cache that rope_and_cache wrote.
Prints one JSON line per case: relative error of the output and the largest cache error against the
float32 PyTorch path (ops_torch), the same oracle as tests/test_gpu_kernels.py.
"""

from __future__ import annotations

import json
import math
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
from attention_oracle import window_attention  # noqa: E402


def run_case(
    S, W, head_size, heads, kv_heads, rotary_dim, neox, dtype, seed, hpp=1, short=False, band_fa_window=None,
    rope_programs=1,
) -> dict:  # fmt: skip
    """hpp: the merge kernel's heads_per_program; rope_programs: rope_and_cache's programs per token;
    short: every context <= W + 1, so no token reaches a sink outside its window and the merge is not
    launched (max_seq_len passed as the backend does).
    band_fa_window: check band_sink_attention (the path of steps with prefill rows) instead, with FA's part
    over [t - band_fa_window, t] (-1: no FA part, the kernel takes the whole window)."""
    from vllm_sinks.attention import ops_cuda, ops_torch
    from vllm_sinks.attention.rope import RotaryParams, apply_rotary

    g = torch.Generator().manual_seed(seed)
    B = 16
    half = rotary_dim // 2
    omega = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    rope = RotaryParams(head_size=0, rotary_dim=rotary_dim, is_neox_style=neox, omega=omega,
                        mscale=torch.ones(half, dtype=torch.float64))  # fmt: skip
    num_reqs = 6
    # Mixed batch: decodes and prefill chunks, contexts from inside the first window to far past S + W.
    q_lens = [1 if i % 2 else int(torch.randint(2, 24, (1,), generator=g)) for i in range(num_reqs)]
    seq_lens = [q + int(torch.randint(0, 3 * (S + W), (1,), generator=g)) for q in q_lens]
    if short:
        seq_lens = [min(s, W + 1) for s in seq_lens]
        q_lens = [min(q, s) for q, s in zip(q_lens, seq_lens, strict=True)]
    else:
        q_lens.append(S + 6)  # a chunk across the boundary: positions W - 2 .. W + S + 3
        seq_lens.append(W + S + 4)
        num_reqs += 1
    max_blocks = max(math.ceil(s / B) for s in seq_lens)
    num_blocks = num_reqs * max_blocks + 1
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    block_table = perm[: num_reqs * max_blocks].view(num_reqs, max_blocks).to(torch.int32)
    kv = torch.randn(2, num_blocks, B, kv_heads, head_size, generator=g).to(dtype)
    if os.environ.get("VLLM_SINKS_KV_LAYOUT") == "block_major":  # the layout under a KV connector
        kv = kv.permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4)
    n = sum(q_lens)
    q = torch.randn(n, heads, head_size, generator=g).to(dtype)
    k = torch.randn(n, kv_heads, head_size, generator=g).to(dtype)
    v = torch.randn(n, kv_heads, head_size, generator=g).to(dtype)
    qsl = [0]
    for ql in q_lens:
        qsl.append(qsl[-1] + ql)
    positions = torch.cat([torch.arange(s - ql, s) for s, ql in zip(seq_lens, q_lens, strict=True)])
    req_idx = torch.cat([torch.full((ql,), r) for r, ql in enumerate(q_lens)]).to(torch.int32)
    slots = block_table[req_idx.long(), positions // B].long() * B + positions % B
    scale = head_size**-0.5
    cw, sw = rope.cos_sin(positions, torch.float32)
    cs, ss = rope.cos_sin(positions.clamp(max=S + W), torch.float32)
    # The metadata builder's tables (rotary_tables, one launch) against the float64 PyTorch path.
    tables = torch.zeros(4, n + 3, half)
    two_pi = torch.tensor([2 * math.pi], dtype=torch.float64)
    ops_cuda.rotary_tables(positions, omega / (2 * math.pi), rope.mscale, two_pi, S + W, tables)
    table_err = max((x - y).abs().max().item() for x, y in zip(tables[:, :n], (cw, sw, cs, ss), strict=True))
    assert tables[:, n:].abs().max().item() == 0, "rotary_tables wrote past n"

    kv_ref = kv.float().clone()
    ops_torch.write_kv(kv_ref, apply_rotary(k.float(), cw, sw, rotary_dim, neox), v.float(), slots)
    out_ref = torch.empty(n, heads, head_size)
    ops_torch.sink_window_attention(
        apply_rotary(q.float(), cw, sw, rotary_dim, neox), apply_rotary(q.float(), cs, ss, rotary_dim, neox),
        kv_ref, block_table, qsl, seq_lens, S, W, scale, out_ref,
    )  # fmt: skip

    q_k = q.clone()
    q_sink = torch.empty_like(q_k)
    kc, vc = kv.unbind(0)
    ops_cuda.rope_and_cache(q_k, k, v, q_sink, kc, vc, slots, cw, sw, cs, ss, rotary_dim, neox, rope_programs)
    if band_fa_window is None:
        out_w, lse = window_attention(q_k, kv, block_table, qsl, seq_lens, W, scale)
        out = out_w.to(dtype)
        ops_cuda.sink_attention_merge(
            q_sink, kc, vc, out, lse, positions, req_idx, block_table, S, W, scale, max(seq_lens), hpp
        )
    else:
        lse = None
        out = torch.full((n, heads, head_size), float("nan"), dtype=dtype)
        if band_fa_window >= 0:
            out_w, lse = window_attention(q_k, kv, block_table, qsl, seq_lens, band_fa_window, scale)
            out = out_w.to(dtype)
        tile_req, tile_start = ops_cuda.band_tiles(qsl, ops_cuda.BAND_TILING.tokens_per_tile(hpp))
        ops_cuda.band_sink_attention(
            q_k, q_sink, kc, vc, out, lse, positions, block_table, torch.tensor(qsl, dtype=torch.int32),
            torch.tensor(tile_req, dtype=torch.int32), torch.tensor(tile_start, dtype=torch.int32),
            S, W, band_fa_window, scale, hpp,
        )  # fmt: skip
    return {
        "kernel": "merge" if band_fa_window is None else "band", "fa_window": band_fa_window,
        "S": S, "W": W, "head_size": head_size, "heads": heads, "kv_heads": kv_heads, "dtype": str(dtype),
        "heads_per_program": hpp, "rope_programs": rope_programs, "short": short,
        "tokens": n, "merged_tokens": int(((positions - W).clamp(min=0) > 0).sum()) if S else 0,
        "cache_err": (kv.float() - kv_ref).abs().max().item(), "table_err": table_err,
        "rel_err": ((out.float() - out_ref).norm() / out_ref.norm()).item(),
    }  # fmt: skip


CASES = [
    # S, W, head_size, heads, kv_heads, rotary_dim, neox
    (4, 60, 128, 8, 2, 128, True),
    (1, 31, 64, 4, 4, 64, True),
    (16, 48, 128, 8, 1, 64, False),
    (0, 40, 64, 4, 2, 64, True),
]

# FA's window W' for the band cases, one per case above: what exact_fa_window gives for head size 128 where
# it is below W (127 needs W >= 127), otherwise an arbitrary W' < W: the kernel is exact for any.
BAND_FA_WINDOWS = [31, 15, 20, 39]


def tables_far() -> dict:
    """rotary_tables at positions up to 10**7 (angles reduced in float64) with mscale != 1, against the
    float64 PyTorch path (rope.RotaryParams)."""
    from vllm_sinks.attention import ops_cuda
    from vllm_sinks.attention.rope import RotaryParams

    rd, half, cache = 128, 64, 4096
    omega = 1.0 / (500000.0 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    mscale = torch.linspace(0.9, 1.3, half, dtype=torch.float64)
    rope = RotaryParams(head_size=rd, rotary_dim=rd, is_neox_style=True, omega=omega, mscale=mscale)
    positions = torch.tensor([0, 1, 4095, 4096, 4097, 123_457, 1_000_003, 4_000_000, 10_000_019])
    out = torch.zeros(4, len(positions), half)
    two_pi = torch.tensor([2 * math.pi], dtype=torch.float64)
    ops_cuda.rotary_tables(positions, omega / (2 * math.pi), mscale, two_pi, cache, out)
    want = (*rope.cos_sin(positions, torch.float32), *rope.cos_sin(positions.clamp(max=cache), torch.float32))
    err = max((x - y).abs().max().item() for x, y in zip(out, want, strict=True))
    return {"kernel": "tables", "positions": positions.tolist(), "table_err": err}


if __name__ == "__main__":
    print(json.dumps(tables_far()), flush=True)
    dtypes = [getattr(torch, d) for d in (sys.argv[1:] or ["float32", "float16"])]
    for i, case in enumerate(CASES):
        group = case[3] // case[4]
        for dtype in dtypes:
            print(json.dumps(run_case(*case, dtype, seed=1000 + i)), flush=True)
            if group > 1:  # a KV head's query heads in one program (the largest power of two dividing H/HK),
                # and rope_and_cache with one program per KV head and its query heads
                row = run_case(*case, dtype, seed=1000 + i, hpp=group & -group, rope_programs=case[4])
                print(json.dumps(row), flush=True)
            elif case[4] > 1:  # no GQA: rope_and_cache with one program per head
                print(json.dumps(run_case(*case, dtype, seed=1000 + i, rope_programs=case[4])), flush=True)
    for dtype in dtypes:
        print(json.dumps(run_case(*CASES[0], dtype, seed=999, short=True)), flush=True)
    # band_sink_attention: FA's part over an exact window W' < W (or none), the band and sinks here.
    for i, (case, fa_window) in enumerate(zip(CASES, BAND_FA_WINDOWS, strict=True)):
        group = case[3] // case[4]
        for dtype in dtypes:
            for hpp in sorted({1, group & -group}):
                row = run_case(*case, dtype, seed=2000 + i, hpp=hpp, band_fa_window=fa_window)
                print(json.dumps(row), flush=True)
        if case[0]:  # and with no FA part at all (W below one FA key tile)
            print(json.dumps(run_case(*case, dtypes[0], seed=3000 + i, band_fa_window=-1)), flush=True)
