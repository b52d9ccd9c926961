"""The oracle split used by the GPU kernel test: exact window part merged with the sink part equals the
StreamingLLM reference (ops_torch.sink_window_attention). CPU."""

from __future__ import annotations

import math

import pytest
import torch
from attention_oracle import merge, sink_part, window_attention


@pytest.mark.parametrize("S,W,kv_heads", [(4, 60, 2), (1, 31, 4), (16, 48, 1), (4, 20, 2)])
def test_window_plus_sink_part_is_the_streamingllm_reference(S, W, kv_heads):
    from vllm_sinks.attention import ops_torch

    g = torch.Generator().manual_seed(S * 1000 + W)
    B, H, D, num_reqs = 16, 4, 32, 6
    q_lens = [1 if i % 2 else int(torch.randint(2, 30, (1,), generator=g)) for i in range(num_reqs)]
    seq_lens = [q + int(torch.randint(0, 4 * (S + W), (1,), generator=g)) for q in q_lens]
    max_blocks = max(math.ceil(s / B) for s in seq_lens)
    nb = num_reqs * max_blocks + 1
    bt = (torch.randperm(nb - 1, generator=g) + 1)[: num_reqs * max_blocks].view(num_reqs, max_blocks)
    kv = torch.randn(2, nb, B, kv_heads, D, generator=g)
    n = sum(q_lens)
    q_win, q_sink = torch.randn(n, H, D, generator=g), torch.randn(n, H, D, generator=g)
    qsl = [0]
    for ql in q_lens:
        qsl.append(qsl[-1] + ql)
    pos = torch.cat([torch.arange(s - ql, s) for s, ql in zip(seq_lens, q_lens, strict=True)])
    req = torch.cat([torch.full((ql,), r) for r, ql in enumerate(q_lens)])
    scale = D**-0.5
    ref = torch.empty(n, H, D)
    ops_torch.sink_window_attention(q_win, q_sink, kv, bt, qsl, seq_lens, S, W, scale, ref)
    o_w, lse_w = window_attention(q_win, kv, bt, qsl, seq_lens, W, scale)
    o_s, lse_s = sink_part(q_sink, kv, bt, pos, req, S, W, scale)
    assert bool((lse_s > float("-inf")).any()), "no row has a sink outside its window: the case tests nothing"
    torch.testing.assert_close(merge(o_w, lse_w, o_s, lse_s), ref, rtol=1e-5, atol=1e-5)
