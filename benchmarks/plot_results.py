"""Plot of the committed throughput and memory results (benchmarks/results/*.json) into one PNG.

    python benchmarks/plot_results.py --out benchmarks/results/throughput_memory.png
Left: decode tok/s of Workload A (Llama-3-8B shape, 64 streams x 8,192-token prompts) for SINKS, vLLM's
sliding window and dense attention on one H100 (576 generated, 64 subtracted), and SINKS at TP=1/TP=2 on a
2 x H200 host (Ray; 320 generated, 64 subtracted).
Right: KV memory per stream against stream length: dense grows with the stream (L x bytes per token, what
vLLM's FlashAttention backend allocates), SINKS as measured by the block policy (Workload B: the most
blocks any stream held, in-flight chunks included) stays flat. Only measured points are drawn as markers.
"""

from __future__ import annotations

import argparse
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(RESULTS, "throughput_memory.png"))
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        ("dense\nH100", load("decode_dense_h100_2026-11-23.json")),
        ("sliding 4096\nH100", load("decode_sliding_h100_2026-11-23.json")),
        ("SINKS 4+4092\nH100", load("decode_sinks_h100_2026-11-23.json")),
        ("SINKS TP=1\nH200", load("decode_sinks_tp1_h200x2_2026-11-23.json")),
        ("SINKS TP=2\n2 x H200", load("decode_sinks_tp2_h200x2_2026-11-23.json")),
    ]
    endless = load("endless_sinks_h100_2026-11-23.json")
    # Llama-3-8B: K and V, 32 layers, 8 KV heads of 128, bf16.
    bytes_per_token = 2 * 32 * 8 * 128 * 2
    gib = 2**30
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = ["#999999", "#4c72b0", "#dd8452", "#dd8452", "#c44e52"]
    xs = range(len(bars))
    ax1.bar(xs, [r["decode_tok_s"] for _, r in bars], color=colors)
    for x, (_, r) in zip(xs, bars, strict=True):
        ax1.text(x, r["decode_tok_s"] + 60, f"{r['decode_tok_s']:,.0f}", ha="center", fontsize=9)
    ax1.set_xticks(list(xs), [n for n, _ in bars], fontsize=8)
    ax1.set_ylabel("decode tokens/s (Workload A)")
    ax1.set_title("Workload A: 64 streams x 8,192-token prompts, Llama-3-8B shape, bf16")
    lengths = [1 << k for k in range(12, 19)]
    ax2.plot(lengths, [L * bytes_per_token / gib for L in lengths], "--", color="#999999",
             label="dense (FlashAttention): L x 128 KiB")  # fmt: skip
    rows = endless["rows"]
    block = 16  # vLLM's block size in that run (tokens)
    ax2.plot([r["length"] for r in rows], [r["max_kv_blocks_per_stream"] * block * bytes_per_token / gib
                                           for r in rows], "o-", color="#dd8452",
             label="SINKS 4+4092, measured peak per stream (Workload B, H100)")  # fmt: skip
    pool = endless["kv_pool_tokens"] * bytes_per_token / gib
    ax2.axhline(pool, color="black", lw=0.8, ls=":", label=f"whole KV pool of the H100 run ({pool:.0f} GiB)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("stream length (tokens)")
    ax2.set_ylabel("KV memory per stream (GiB)")
    ax2.set_title("KV memory per stream against stream length")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
