"""Randomized test of the CUDA kernels against the float32 PyTorch path (ops_torch), on mixed batches of
prefill and decode requests with random block tables. GPU only."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu


def _rope(rotary_dim: int, neox: bool):
    from vllm_sinks.rope import RotaryParams

    half = rotary_dim // 2
    omega = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    return RotaryParams(
        head_size=0,
        rotary_dim=rotary_dim,
        is_neox_style=neox,
        omega=omega,
        mscale=torch.ones(half, dtype=torch.float64),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,W", [(4, 60), (1, 31), (0, 64), (16, 48), (4, 1020)])
@pytest.mark.parametrize(
    "head_size,heads,kv_heads,rotary_dim,neox",
    [(128, 8, 2, 128, True), (64, 4, 4, 64, True), (128, 8, 1, 64, False)],
)
def test_kernels_match_torch(dtype, S, W, head_size, heads, kv_heads, rotary_dim, neox):
    from vllm_sinks import ops_cuda, ops_torch
    from vllm_sinks.rope import apply_rotary

    g = torch.Generator().manual_seed(hash((S, W, head_size, str(dtype))) % 2**31)
    dev = "cuda"
    B = 16
    rope = _rope(rotary_dim, neox)
    num_reqs = 12
    # Mixed batch: decodes (1 token) and prefill chunks, contexts from short to far past S + W.
    q_lens = [1 if i % 3 else int(torch.randint(2, 90, (1,), generator=g)) for i in range(num_reqs)]
    seq_lens = [q + int(torch.randint(0, 5 * (S + W), (1,), generator=g)) for q in q_lens]
    max_blocks = max(math.ceil(s / B) for s in seq_lens)
    num_blocks = num_reqs * max_blocks + 1
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    block_table = perm[: num_reqs * max_blocks].view(num_reqs, max_blocks).to(torch.int32)
    kv = torch.randn(2, num_blocks, B, kv_heads, head_size, generator=g).to(dtype)
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
    sink_pos = positions.clamp(max=S + W)
    scale = head_size**-0.5

    # Reference: float32 torch path on the CPU.
    kv_ref = kv.float().clone()
    cw, sw = rope.cos_sin(positions, torch.float32)
    cs, ss = rope.cos_sin(sink_pos, torch.float32)
    k_rot = apply_rotary(k.float(), cw, sw, rotary_dim, neox)
    ops_torch.write_kv(kv_ref, k_rot, v.float(), slots)
    out_ref = torch.empty(n, heads, head_size)
    ops_torch.sink_window_attention(
        apply_rotary(q.float(), cw, sw, rotary_dim, neox),
        apply_rotary(q.float(), cs, ss, rotary_dim, neox),
        kv_ref,
        block_table,
        qsl,
        seq_lens,
        S,
        W,
        scale,
        out_ref,
    )

    # CUDA path.
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version

    kv_d = kv.to(dev)
    q_d, k_d, v_d = q.to(dev), k.to(dev), v.to(dev)
    q_sink = torch.empty_like(q_d)
    kc, vc = kv_d.unbind(0)
    ops_cuda.rope_and_cache(
        q_d,
        k_d,
        v_d,
        q_sink,
        kc,
        vc,
        slots.to(dev),
        cw.to(dev),
        sw.to(dev),
        cs.to(dev),
        ss.to(dev),
        rotary_dim,
        neox,
    )
    out = torch.full((n, heads, head_size), float("nan"), dtype=dtype, device=dev)
    bt = block_table.to(dev)
    _, lse = flash_attn_varlen_func(
        q=q_d,
        k=kc,
        v=vc,
        out=out,
        cu_seqlens_q=torch.tensor(qsl, dtype=torch.int32, device=dev),
        max_seqlen_q=max(q_lens),
        seqused_k=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        max_seqlen_k=max(seq_lens),
        softmax_scale=scale,
        causal=True,
        window_size=[W, 0],
        block_table=bt,
        return_softmax_lse=True,
        fa_version=get_flash_attn_version(head_size=head_size),
    )
    ops_cuda.sink_attention_merge(
        q_sink, kc, vc, out, lse, positions.to(dev), req_idx.to(dev), bt, S, W, scale
    )
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "unwritten output rows"
    # The cache written by the kernel equals the reference cache (bf16/fp16 rounding of the same values).
    cache_err = (kv_d.float().cpu() - kv_ref).abs().max().item()
    assert cache_err < 0.05, cache_err
    rel = ((out.float().cpu() - out_ref).norm() / out_ref.norm()).item()
    print(f"dtype={dtype} S={S} W={W} hd={head_size} rel_err={rel:.2e}")
    assert rel < (1e-2 if dtype == torch.bfloat16 else 2e-3), rel
