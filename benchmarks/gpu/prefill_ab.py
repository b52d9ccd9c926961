"""Prefill-shaped attention of one layer on a CUDA GPU: SINKS' kernels and stock vLLM's calls, side by side.

The serving load (benchmarks/gpu/serve_load.sh) is prefill-bound, and SINKS' inter-token latency there was
1.4x dense's. This times the attention work of one layer for a batch of prefill chunks (default: 4 requests x
2,048 new tokens, at contexts under and over the window), Llama-3-8B attention shape:
  dense_fa      FA3 causal, no window (stock FLASH_ATTN on a dense model)
  sliding_fa    FA3 with window_size=[W, 0] (stock sliding window; SINKS' window part without LSE)
  sinks_attn    SINKS' attention as the backend calls it in a step with prefill rows: FA3 over the exact
                window W' = exact_fa_window(W) with LSE, then band_sink_attention (the band [t-W, t-W'-1] and
                the sinks; skipped when no token reaches past W') in its default layout
  band_hppN     band_sink_attention alone with N query heads per program (N=1, 2, 4; tiles of 64/N tokens)
  sinks_attn_inexact  the previous path: FA3 over W (not exact in prefill rows) + sink_attention_merge
  merge_only    sink_attention_merge alone, always launched (as under CUDA-graph capture), one head per
                program
  merge_grouped the same with all query heads of a KV head in one program (heads_per_program=H/HK)
  rope_cache    rope_and_cache (SINKS: rotates q and k, writes k and v; stock does this in two kernels)
  stock_cache   vLLM's reshape_and_cache_flash alone (stock's cache write, without its rotary kernel)
    python3 benchmarks/gpu/prefill_ab.py --out $OUT/prefill_ab.json
--band-sweep CTX times band_sink_attention alone at context CTX over launch shapes (ops_cuda.BandTiling: rows
per program, keys per step, num_warps, num_stages; then heads per program for the fastest three) and adds
them, fastest first, as "band_sweep" (a shape Triton cannot launch, e.g. out of shared memory, is skipped);
--band-grid picks the shapes (default: the 2026-11-24 sweep's). --fa-window-steps K adds sinks_attn_faN (FA3
over a smaller immune window N = W' - kBlockN k, the band kernel over the rest: exact too, less FA3 work, more
band work). --prev-ops FILE times sinks_attn, the band
and rope_cache again with the kernels of another ops_cuda.py, side by side in the same run (prev_*; then
again_* for this code once more).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--contexts", default="3584,16384", help="context length of each request after its chunk")
    p.add_argument("--window", type=int, default=4092)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--band-sweep", type=int, default=None, metavar="CTX")
    p.add_argument("--band-grid", default="64,128/32,64,128/4,8/1,2,3", metavar="ROWS/KEYS/WARPS/STAGES",
                   help="--band-sweep shapes: lists of rows, keys, num_warps, num_stages")  # fmt: skip
    p.add_argument("--prev-ops", default=None, help="an earlier ops_cuda.py to time side by side")
    p.add_argument("--fa-window-steps", type=int, default=0, metavar="K",
                   help="also time sinks_attn with FA3 over W' - kBlockN k, k = 1..K")  # fmt: skip
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from bench_kernel import _timed

    rows = []
    for ctx in [int(c) for c in a.contexts.split(",")]:
        row = _bench(ctx, a, _timed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {
        "benchmark": "prefill_attention_one_layer",
        "device": torch.cuda.get_device_name(),
        "requests": a.requests,
        "chunk": a.chunk,
        "window": a.window,
        "sinks": a.sinks,
        "rows": rows,
        **({"band_sweep": _band_sweep(a.band_sweep, a, _timed)} if a.band_sweep else {}),
        "date": datetime.date.today().isoformat(),
        "command": "python3 benchmarks/gpu/prefill_ab.py " + " ".join(argv or sys.argv[1:]),
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


def _band_sweep(ctx: int, a, timed) -> list[dict]:
    import itertools

    from vllm_sinks.attention.ops_cuda import BAND_TILING, BandTiling

    band, hpp_default, hpps = _bench(ctx, a, timed, band_only=True)
    results = []

    def run(tiling, hpp):
        try:
            ms = round(timed(lambda: band(hpp, tiling)), 4)
        except Exception as e:  # e.g. triton's OutOfResources for a large shape
            print(f"skip {tiling} hpp={hpp}: {type(e).__name__}", flush=True)
            return
        results.append({**vars(tiling), "heads_per_program": hpp, "ms": ms,
                        "default": tiling == BAND_TILING and hpp == hpp_default})  # fmt: skip
        print(json.dumps(results[-1]), flush=True)

    grid = [[int(x) for x in part.split(",")] for part in a.band_grid.split("/")]
    for rows, keys, warps, stages in itertools.product(*grid):
        run(BandTiling(rows, keys, warps, stages), hpp_default)
    best = sorted(results, key=lambda r: r["ms"])[:3]
    for r in best:
        for hpp in hpps - {hpp_default}:
            run(BandTiling(r["rows"], r["keys"], r["num_warps"], r["num_stages"]), hpp)
    return sorted(results, key=lambda r: r["ms"])


def _bench(ctx: int, a, timed, band_only: bool = False):
    from vllm import _custom_ops
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version

    from vllm_sinks.attention import ops_cuda

    dev, dt = "cuda", torch.bfloat16
    B, H, HK, D, W, S, R, c = 16, a.heads, a.kv_heads, a.head_dim, a.window, a.sinks, a.requests, a.chunk
    assert ctx >= c, "each context must hold its chunk"
    max_blocks = math.ceil(ctx / B)
    num_blocks = R * max_blocks + 1
    kv = torch.randn(2, num_blocks, B, HK, D, dtype=dt, device=dev)
    kc, vc = kv.unbind(0)
    bt = (torch.randperm(num_blocks - 1, device=dev).to(torch.int32) + 1)[: R * max_blocks].view(
        R, max_blocks
    )
    n = R * c
    q = torch.randn(n, H, D, dtype=dt, device=dev)
    k = torch.randn(n, HK, D, dtype=dt, device=dev)
    v = torch.randn(n, HK, D, dtype=dt, device=dev)
    out = torch.empty(n, H, D, dtype=dt, device=dev)
    qs = torch.empty_like(q)
    cu = torch.arange(0, n + 1, c, dtype=torch.int32, device=dev)
    seq = torch.full((R,), ctx, dtype=torch.int32, device=dev)
    pos = torch.arange(ctx - c, ctx, device=dev).repeat(R)
    req = torch.arange(R, dtype=torch.int32, device=dev).repeat_interleave(c)
    slots = bt[req.long(), pos // B].long() * B + pos % B
    cos = torch.rand(n, D // 2, device=dev)
    sin = torch.rand(n, D // 2, device=dev)
    fa_version = get_flash_attn_version(head_size=D)

    def fa(window: list[int], lse: bool):
        return flash_attn_varlen_func(
            q=q, k=kc, v=vc, out=out, cu_seqlens_q=cu, max_seqlen_q=c, seqused_k=seq, max_seqlen_k=ctx,
            softmax_scale=D**-0.5, causal=True, window_size=window, block_table=bt, return_softmax_lse=lse,
            fa_version=fa_version,
        )  # fmt: skip

    group = H // HK
    wx = ops_cuda.exact_fa_window(W, D, group)
    hpp_default = min(group & -group, 8)
    qsl = list(range(0, n + 1, c))
    tiles = {}
    for hpp in sorted({1, 2, 4, hpp_default} & {d for d in (1, 2, 4, 8) if group % d == 0}):
        reqs, starts = ops_cuda.band_tiles(qsl, ops_cuda.BAND_TILING.tokens_per_tile(hpp))
        tiles[hpp] = (torch.tensor(reqs, dtype=torch.int32, device=dev),
                      torch.tensor(starts, dtype=torch.int32, device=dev))  # fmt: skip

    def band(lse, hpp, ops=ops_cuda, fa_window=wx):
        tr, ts = tiles[hpp]
        ops.band_sink_attention(q, qs, kc, vc, out, lse, pos, bt, cu, tr, ts, S, W, fa_window, D**-0.5, hpp)

    if band_only:
        _, lse_band = fa([wx, 0], True)
        swept: dict = {}

        def band_tiled(hpp, tiling):
            key = (hpp, tiling.tokens_per_tile(hpp))
            if key not in swept:
                reqs, starts = ops_cuda.band_tiles(qsl, key[1])
                swept[key] = (torch.tensor(reqs, dtype=torch.int32, device=dev),
                              torch.tensor(starts, dtype=torch.int32, device=dev))  # fmt: skip
            ops_cuda.band_sink_attention(q, qs, kc, vc, out, lse_band, pos, bt, cu, *swept[key], S, W, wx,
                                         D**-0.5, hpp, tiling)  # fmt: skip

        return band_tiled, hpp_default, set(tiles)

    def sinks_attn(ops=ops_cuda, fa_window=wx):
        _, lse = fa([fa_window, 0], True)
        if ctx - 1 > fa_window:
            band(lse, hpp_default, ops, fa_window)

    def rope_cache(ops=ops_cuda):
        ops.rope_and_cache(q, k, v, qs, kc, vc, slots, cos, sin, cos, sin, D, True)

    def sinks_attn_inexact():
        _, lse = fa([W, 0], True)
        ops_cuda.sink_attention_merge(qs, kc, vc, out, lse, pos, req, bt, S, W, D**-0.5, ctx)

    _, lse_exact = fa([wx, 0], True)
    _, lse_fixed = fa([W, 0], True)
    scale = torch.ones((), dtype=torch.float32, device=dev)
    row = {
        "context": ctx,
        "tokens": n,
        "dense_fa_ms": timed(lambda: fa([-1, -1], False)),
        "sliding_fa_ms": timed(lambda: fa([W, 0], False)),
        "exact_fa_window": wx,
        "sinks_attn_ms": timed(sinks_attn),
        "sinks_attn_inexact_ms": timed(sinks_attn_inexact),
        **{f"band_hpp{h}_ms": timed(lambda h=h: band(lse_exact, h)) for h in tiles},
        "merge_only_ms": timed(
            lambda: ops_cuda.sink_attention_merge(
                qs, kc, vc, out, lse_fixed, pos, req, bt, S, W, D**-0.5, None, 1
            )
        ),
        "merge_grouped_ms": timed(
            lambda: ops_cuda.sink_attention_merge(
                qs, kc, vc, out, lse_fixed, pos, req, bt, S, W, D**-0.5, None, (H // HK) & -(H // HK)
            )
        ),
        "rope_cache_ms": timed(rope_cache),
        "stock_cache_ms": timed(
            lambda: _custom_ops.reshape_and_cache_flash(k, v, kc, vc, slots, "auto", scale, scale)
        ),
    }
    if a.prev_ops:
        from bench_kernel import _load_module

        prev = _load_module(a.prev_ops)
        row["prev_sinks_attn_ms"] = timed(lambda: sinks_attn(prev))
        row[f"prev_band_hpp{hpp_default}_ms"] = timed(lambda: band(lse_exact, hpp_default, prev))
        row["prev_rope_cache_ms"] = timed(lambda: rope_cache(prev))
        row["again_sliding_fa_ms"] = timed(lambda: fa([W, 0], False))
        row["again_sinks_attn_ms"] = timed(sinks_attn)
        row[f"again_band_hpp{hpp_default}_ms"] = timed(lambda: band(lse_exact, hpp_default))
        row["again_rope_cache_ms"] = timed(rope_cache)
    block_n = (ops_cuda.fa3_tiles(D) or (0, 0))[1]
    for k in range(1, a.fa_window_steps + 1):
        w_k = wx - k * block_n
        if block_n and w_k >= 0:
            row[f"sinks_attn_fa{w_k}_ms"] = timed(lambda w_k=w_k: sinks_attn(fa_window=w_k))
    if a.fa_window_steps:
        row["again_sinks_attn_ms"] = timed(sinks_attn)
        row["again_sliding_fa_ms"] = timed(lambda: fa([W, 0], False))
    row["band_default_hpp"] = hpp_default
    for key in [x for x in row if x.endswith("_ms")]:
        row[key] = round(row[key], 4)
    row["sinks_attn_over_sliding"] = round(row["sinks_attn_ms"] / row["sliding_fa_ms"], 3)
    row["sinks_attn_over_dense"] = round(row["sinks_attn_ms"] / row["dense_fa_ms"], 3)
    return row


if __name__ == "__main__":
    main()
