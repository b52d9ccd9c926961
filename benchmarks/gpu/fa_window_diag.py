"""FlashAttention-3's sliding window in prefill rows, row by row: the defect and its cause.

Reading of vllm-project/flash-attention (hopper/): with a left window wl, the local-attention path shifts the
K/V pointers to the window's start by n_offset keys (block.h, PR #78); the IntraWGOverlap mainloop
(mainloop_fwd_sm90_tma_gmma_ws.hpp, head dims 80-256 in 16-bit) then computes the block limit of its
causal-mask loop from the unshifted key length (PR #93; PR #102 fixed block.h only), so only the query tile's
last key block is causally masked. Prediction: in a query tile of T tokens (kBlockM packed rows / GQA group)
whose first token lies past its window (n_offset > 0), every row sees the keys up to the end of key block
L - 1, L = ceil((T + wl) / kBlockN) - 1 (counted from the window start), even past its own position: rows
0 .. kBlockN - 2 - (wl mod kBlockN) of the tile see up to kBlockN - 1 - (wl mod kBlockN) future keys. A
window with (wl + 1) mod kBlockN = 0 is immune; decode rows are immune.

For each W, head size, GQA ratio and dtype, on mixed batches of tests/test_gpu_kernels.py, this calls FA3 as
SINKS did before its fix (window W) and compares every row with (a) the exact window attention and (b) the
predicted attention (right edge extended as above), then calls it with the exact window W' of
ops_cuda.exact_fa_window. The prediction is confirmed if FA3 matches (b) on every row.
    python3 benchmarks/gpu/fa_window_diag.py | tee fa_window_diag.log        # on a GPU host, ~1 min
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

# FA3's 16-bit local-attention tiles on SM90 (hopper/tile_size.h): head size -> (kBlockM, kBlockN) of the
# IntraWGOverlap mainloop; head sizes <= 64 use the other mainloop.
TILES = {128: (128, 128), 256: (128, 64)}


def predicted_right_edge(c: dict, wl: int, group: int) -> torch.Tensor:
    """[n, H] last key each (row, head) sees in FA3 with left window wl, per the reading above."""
    heads = c["heads"]
    edge = c["positions"][:, None].repeat(1, heads).clone()
    if c["head_size"] not in TILES:
        return edge
    block_m, block_n = TILES[c["head_size"]]
    for r, (ql, sl) in enumerate(zip(c["q_lens"], c["seq_lens"], strict=True)):
        if ql == 1:
            continue
        first = c["qsl"][r]
        for m in range(ql):
            for h in range(heads):
                packed = m * group + h % group  # FA3 packs the query heads of one KV head (PackGQA)
                m_block = packed // block_m
                m_min = m_block * block_m // group
                m_max = min((m_block * block_m + block_m - 1) // group + 1, ql)
                n_offset = (sl - ql + m_min) - wl
                if n_offset <= 0:
                    continue
                last_block = math.ceil((m_max - m_min + wl) / block_n) - 1
                edge[first + m, h] = max(sl - ql + m, n_offset + last_block * block_n - 1)
    return edge


def rows_against(c, d, out, W, scale, edge=None):
    """[n, H] relative error of each (row, head) of `out` against the attention over [t - W, right edge]
    (edge [n, H]; None: t)."""
    from attention_oracle import window_attention

    ref, _ = window_attention(d["q"].float().cpu(), d["kv"].float().cpu(), c["block_table"], c["qsl"],
                              c["seq_lens"], W, scale, right_edge=edge)  # fmt: skip
    return (out - ref).norm(dim=2) / ref.norm(dim=2)


def main() -> None:
    from test_gpu_kernels import fa_window, make_case, rope_and_cache_on_device

    from vllm_sinks.attention import ops_cuda

    print(torch.cuda.get_device_name())
    confirmed = True
    for dtype in (torch.bfloat16, torch.float16):
        tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
        for hd in (64, 128, 256):
            for heads, kvh in ((4, 4), (8, 2), (8, 1)):
                for W in (60, 252, 496, 1020, 1023, 4092):
                    wx = ops_cuda.exact_fa_window(W, hd, heads // kvh)
                    totals = dict(rows=0, off_exact=0, predicted=0, off_predicted=0, exact_window_off=0)
                    worst_pred = 0.0
                    for seed in range(2):
                        c = make_case(dtype, 4, W, hd, heads, kvh, hd, True, seed=seed)
                        d = rope_and_cache_on_device(c)
                        out = torch.empty(c["n"], heads, hd, dtype=dtype, device="cuda")
                        fa_window(c, d, out, W)
                        torch.cuda.synchronize()
                        out = out.float().cpu()
                        edge = predicted_right_edge(c, W, heads // kvh)
                        prefill = torch.tensor([c["q_lens"][int(r)] > 1 for r in c["req_idx"]])[:, None]
                        e_exact = rows_against(c, d, out, W, c["scale"])
                        e_pred = rows_against(c, d, out, W, c["scale"], edge)
                        affected = edge > c["positions"][:, None]
                        totals["rows"] += int(prefill.sum()) * heads
                        totals["off_exact"] += int((e_exact > tol).sum())
                        totals["predicted"] += int(affected.sum())
                        totals["off_predicted"] += int((e_pred > tol).sum())
                        worst_pred = max(worst_pred, e_pred.max().item())
                        if wx >= 0:
                            o2 = torch.empty_like(d["q"])
                            fa_window(c, d, o2, wx)
                            torch.cuda.synchronize()
                            e2 = rows_against(c, d, o2.float().cpu(), wx, c["scale"])
                            totals["exact_window_off"] += int((e2 > tol).sum())
                    confirmed &= totals["off_predicted"] == 0
                    print(f"{str(dtype)[6:]} hd={hd} {heads}/{kvh} W={W} (W mod kBlockN: "
                          f"{W % TILES[hd][1] if hd in TILES else '-'}): prefill row-heads {totals['rows']}, "
                          f"off the exact window {totals['off_exact']}, predicted to see future keys "
                          f"{totals['predicted']}, off the prediction {totals['off_predicted']} (worst "
                          f"{worst_pred:.1e}); FA3 on W'={wx} off the exact "
                          f"window: {totals['exact_window_off']}", flush=True)  # fmt: skip
    verdict = "CONFIRMED: FA3 equals the predicted attention on every row" if confirmed else "REFUTED"
    print("prediction", verdict)


if __name__ == "__main__":
    main()
