"""Decode attention of one layer, SINKS vs vLLM's FlashAttention sliding window, on a CUDA GPU.

SINKS = rope_and_cache (Triton) + FA3 window with LSE + sink_attention_merge (Triton).
Stock = FA3 paged varlen with window_size=[W, 0] (what vLLM's sliding-window layer calls), with and without
return_softmax_lse. Bytes = the window's K+V the kernel must read. Reports ms per layer (median of CUDA-event
timings over a CUDA graph of the step) and GB/s, plus the host's device-to-device copy bandwidth:
  attention  = FA3 window with LSE + sink_attention_merge (what stock's FA call alone stands for);
  sinks      = rope_and_cache + attention (the whole SINKS step, rotation and cache write included; stock does
               those in two more kernels outside its attention call);
and each of the two Triton kernels alone; and the metadata builder's per-step rotary tables (rotary_tables,
one launch, vs the torch ops it replaced).
    python benchmarks/bench_kernel.py --out benchmarks/results/kernel_h100.json
--merge-sweep adds, per context, `attention` over the merge's launch shapes (query heads per program x
num_warps) and `sinks` over rope_and_cache's programs per token. --prev-ops FILE times `attention` and `sinks`
again with the kernels of another ops_cuda.py
(e.g. `git show REV:vllm_sinks/attention/ops_cuda.py > /tmp/prev.py`),
side by side in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import math
import sys

import torch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--window", type=int, default=4092)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--contexts", default="8192,32768,262144")
    p.add_argument("--merge-sweep", action="store_true")
    p.add_argument("--prev-ops", default=None, help="an earlier ops_cuda.py to time side by side")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    fa_version = get_flash_attn_version(head_size=a.head_dim)
    copy_gbs = _copy_bandwidth()
    rows = []
    for ctx in [int(c) for c in a.contexts.split(",")]:
        row = _bench_context(ctx, a, fa_version, copy_gbs)
        rows.append(row)
        print(json.dumps(row))
    res = {
        "benchmark": "decode_attention_one_layer",
        "device": torch.cuda.get_device_name(),
        "copy_gbs": round(copy_gbs, 1),
        "fa_version": fa_version,
        "heads": a.heads,
        "kv_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "date": datetime.date.today().isoformat(),
        "rows": rows,
        "command": "python benchmarks/bench_kernel.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


def _copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written, GB/s."""
    from triton.testing import do_bench

    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return 2 * x.numel() / ms / 1e6


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location("prev_ops_cuda", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _torch_tables(positions, omega, mscale, cache_tokens, out):
    """The metadata builder's cos/sin tables as it computed them until 2026-11-25 (op by op, about 15 small
    torch kernels), for ops_cuda.rotary_tables to be timed against."""
    n = positions.shape[0]
    pos = positions.to(torch.float64)
    both = torch.stack((pos, pos.clamp(max=float(cache_tokens))))
    angle = torch.remainder(both[..., None] * omega, 2 * math.pi)
    cos = angle.cos().to(torch.float32) * mscale
    sin = angle.sin().to(torch.float32) * mscale
    out[0, :n] = cos[0]
    out[1, :n] = sin[0]
    out[2, :n] = cos[1]
    out[3, :n] = sin[1]


def _timed(fn) -> float:
    """Median ms of one replay of a CUDA graph holding fn()."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=50, rep=300, return_mode="median")


def _bench_context(ctx: int, a, fa_version: int, copy_gbs: float) -> dict:
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    from vllm_sinks.attention import ops_cuda

    dev, dt = "cuda", torch.bfloat16
    B, H, HK, D, W, S, n = 16, a.heads, a.kv_heads, a.head_dim, a.window, a.sinks, a.batch
    blocks_per_req = math.ceil(S / B) + math.ceil((W + 1) / B) + 1  # what a stream holds
    num_blocks = n * blocks_per_req + 1
    kv = torch.randn(2, num_blocks, B, HK, D, dtype=dt, device=dev)
    kc, vc = kv.unbind(0)
    max_blocks = math.ceil(ctx / B)
    # Block table as SINKS' block policy leaves it: sink block, null blocks, then the window's blocks.
    bt = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
    perm = torch.randperm(num_blocks - 1, device=dev).to(torch.int32) + 1
    first_win = (ctx - 1 - W) // B
    for r in range(n):
        ids = perm[r * blocks_per_req : (r + 1) * blocks_per_req]
        bt[r, 0] = ids[0]
        bt[r, first_win:max_blocks] = ids[1 : 1 + max_blocks - first_win]
    seq = torch.full((n,), ctx, dtype=torch.int32, device=dev)
    cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
    q = torch.randn(n, H, D, dtype=dt, device=dev)
    k = torch.randn(n, HK, D, dtype=dt, device=dev)
    v = torch.randn(n, HK, D, dtype=dt, device=dev)
    out = torch.empty(n, H, D, dtype=dt, device=dev)
    qs = torch.empty_like(q)
    pos = torch.full((n,), ctx - 1, dtype=torch.int64, device=dev)
    req = torch.arange(n, dtype=torch.int32, device=dev)
    slots = (bt[:, (ctx - 1) // B].long() * B + (ctx - 1) % B).contiguous()
    cos = torch.rand(n, D // 2, device=dev)
    sin = torch.rand(n, D // 2, device=dev)

    def fa(lse: bool):
        return flash_attn_varlen_func(
            q=q, k=kc, v=vc, out=out, cu_seqlens_q=cu, max_seqlen_q=1, seqused_k=seq, max_seqlen_k=ctx,
            softmax_scale=D**-0.5, causal=True, window_size=[W, 0], block_table=bt,
            return_softmax_lse=lse, fa_version=fa_version,
        )  # fmt: skip

    def sinks_step(rope_programs=None, ops=ops_cuda):
        if ops is ops_cuda:
            ops.rope_and_cache(q, k, v, qs, kc, vc, slots, cos, sin, cos, sin, D, True, rope_programs)
        else:
            ops.rope_and_cache(q, k, v, qs, kc, vc, slots, cos, sin, cos, sin, D, True)
        _, lse = fa(True)
        ops.sink_attention_merge(qs, kc, vc, out, lse, pos, req, bt, S, W, D**-0.5)

    def attention(hpp=None, num_warps=None, ops=ops_cuda):
        """Window + sinks + merge: the attention proper, without rotation and cache write."""
        _, lse = fa(True)
        extra = {} if num_warps is None else {"num_warps": num_warps}
        ops.sink_attention_merge(qs, kc, vc, out, lse, pos, req, bt, S, W, D**-0.5, None, hpp, **extra)

    _, lse_fixed = fa(True)
    # The metadata builder's per-step tables (once per step, not per layer).
    omega = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64, device=dev) / D))
    mscale = torch.ones(D // 2, dtype=torch.float64, device=dev)
    tables = torch.zeros(4, n, D // 2, dtype=torch.float32, device=dev)
    two_pi = torch.tensor([2 * math.pi], dtype=torch.float64, device=dev)
    window_bytes = n * (W + 1) * HK * D * 2 * 2
    row = {
        "context": ctx, "batch": n, "window": W, "sinks": S, "window_kv_bytes": window_bytes,
        "fa_window_ms": _timed(lambda: fa(False)), "fa_window_lse_ms": _timed(lambda: fa(True)),
        "attention_ms": _timed(attention), "sinks_ms": _timed(sinks_step),
        "rope_and_cache_only_ms": _timed(
            lambda: ops_cuda.rope_and_cache(q, k, v, qs, kc, vc, slots, cos, sin, cos, sin, D, True)
        ),
        "merge_only_ms": _timed(
            lambda: ops_cuda.sink_attention_merge(qs, kc, vc, out, lse_fixed, pos, req, bt, S, W, D**-0.5)
        ),
        "rotary_tables_ms": _timed(
            lambda: ops_cuda.rotary_tables(pos, omega / (2 * math.pi), mscale, two_pi, S + W, tables)
        ),
        "rotary_tables_torch_ms": _timed(lambda: _torch_tables(pos, omega, mscale.float(), S + W, tables)),
    }  # fmt: skip
    if a.merge_sweep:
        row["merge_sweep"] = []
        for hpp in [x for x in (1, 2, 4) if (H // HK) % x == 0]:
            for nw in (1, 2, 4):
                ms = _timed(functools.partial(attention, hpp, nw))
                row["merge_sweep"].append(
                    {"heads_per_program": hpp, "num_warps": nw, "attention_ms": round(ms, 4)}
                )
        row["rope_sweep"] = []
        for pp in [x for x in sorted({1, 2, HK}) if HK % x == 0]:
            ms = _timed(functools.partial(sinks_step, pp))
            row["rope_sweep"].append({"programs_per_token": pp, "sinks_ms": round(ms, 4)})
    if a.prev_ops:
        prev = _load_module(a.prev_ops)
        row["prev_attention_ms"] = round(_timed(lambda: attention(ops=prev)), 4)
        row["prev_sinks_ms"] = round(_timed(lambda: sinks_step(ops=prev)), 4)
        row["again_attention_ms"] = round(_timed(attention), 4)  # this code again, after the earlier one
        row["again_sinks_ms"] = round(_timed(sinks_step), 4)
    for key in ("fa_window_ms", "fa_window_lse_ms", "attention_ms", "sinks_ms"):
        row[key.replace("_ms", "_gbs")] = round(window_bytes / row[key] / 1e6, 1)
    for key in [k for k in row if k.endswith("_ms")]:
        row[key] = round(row[key], 4)
    row["sinks_over_fa"] = round(row["sinks_ms"] / row["fa_window_ms"], 3)
    row["attention_fraction_of_copy_bw"] = round(row["attention_gbs"] / copy_gbs, 3)
    row["sinks_fraction_of_copy_bw"] = round(row["sinks_gbs"] / copy_gbs, 3)
    return row


if __name__ == "__main__":
    main()
