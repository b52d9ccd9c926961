"""Plot of the committed throughput and memory results (benchmarks/results/*.json) into one PNG.

    python benchmarks/plot_results.py --out benchmarks/results/throughput_memory.png
Left: decode tok/s of Workload A (Llama-3-8B shape, 64 streams x 8,192-token prompts) for SINKS, vLLM's
sliding window and dense attention on one H100 (576 generated, 64 subtracted), and SINKS at TP=1/TP=2 on a
2 x H200 host (Ray; 320 generated, 64 subtracted).
Middle: decode tok/s of Workload B (16 streams) against stream length, per mode, from every committed
endless_*.json. Only valid points are drawn: all rows of the current harness (decode timed inside one run);
of the first harness (prompts re-sent, prefix cache relied on) only rows whose timed runs did find the prompts
in the cache (t_short_s < fill_s / 4).
Right: KV memory per stream against stream length: dense grows with the stream (L x bytes per token, what
vLLM's FlashAttention backend allocates); measured points: real blocks a stream held near the end of decoding
(current harness, any mode) or the peak including in-flight prefill chunks (first harness, SINKS).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def endless_results(paths: list[str] | None = None) -> list[dict]:
    """Workload B results (all committed endless_*.json but experiments), each with its file name."""
    if paths is None:
        paths = [p for p in sorted(glob.glob(os.path.join(RESULTS, "endless_*.json"))) if "evict" not in p]
    out = []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        res["file"] = os.path.basename(path)
        out.append(res)
    return out


def valid_decode_rows(res: dict) -> list[dict]:
    """Rows whose decode rate was timed with every stream decoding: the current harness says so itself; the
    first harness's rows count where its short-run time was small against the fill (prefix cache held)."""
    if any("decode_tokens_timed" in r for r in res["rows"]):
        return [r for r in res["rows"] if r.get("all_streams_decoded_together")]
    return [r for r in res["rows"] if r["t_short_s"] < r["fill_s"] / 4]


def blocks_per_stream(row: dict) -> int | None:
    return row.get("kv_blocks_per_stream_near_end") or row.get("max_kv_blocks_per_stream")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(RESULTS, "throughput_memory.png"))
    p.add_argument("--endless", nargs="*", default=None, help="Workload B JSON files (default: committed)")
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
    endless = endless_results(a.endless)
    # Llama-3-8B: K and V, 32 layers, 8 KV heads of 128, bf16.
    bytes_per_token = 2 * 32 * 8 * 128 * 2
    gib = 2**30
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(19, 4.8))
    colors = ["#999999", "#4c72b0", "#dd8452", "#dd8452", "#c44e52"]
    mode_color = {"dense": "#999999", "sliding": "#4c72b0", "sinks": "#dd8452"}
    xs = range(len(bars))
    ax1.bar(xs, [r["decode_tok_s"] for _, r in bars], color=colors)
    for x, (_, r) in zip(xs, bars, strict=True):
        ax1.text(x, r["decode_tok_s"] + 60, f"{r['decode_tok_s']:,.0f}", ha="center", fontsize=9)
    ax1.set_xticks(list(xs), [n for n, _ in bars], fontsize=8)
    ax1.set_ylabel("decode tokens/s (Workload A)")
    ax1.set_title("Workload A: 64 streams x 8,192-token prompts, Llama-3-8B shape, bf16", fontsize=10)
    for res in endless:
        rows = valid_decode_rows(res)
        if rows:
            label = f"{res['mode']} ({res['device']}; {res['file']})"
            ys = [r["decode_tok_s"] for r in rows]
            ax3.plot([r["length"] for r in rows], ys, "o-", color=mode_color.get(res["mode"]), label=label)
    ax3.set_xscale("log", base=2)
    ax3.set_xlim(2**13, 2**19)
    ax3.set_ylim(bottom=0)
    ax3.set_xlabel("stream length (tokens)")
    ax3.set_ylabel("decode tokens/s, 16 streams (Workload B)")
    ax3.set_title("Workload B: decode rate against stream length", fontsize=10)
    ax3.legend(fontsize=7)
    lengths = [1 << k for k in range(12, 19)]
    ax2.plot(lengths, [L * bytes_per_token / gib for L in lengths], "--", color="#999999",
             label="dense (FlashAttention): L x 128 KiB")  # fmt: skip
    for res in endless:
        rows = [r for r in res["rows"] if blocks_per_stream(r)]
        block = rows[0].get("block_size", 16) if rows else 16  # vLLM's block size on the GPU runs
        ys = [blocks_per_stream(r) * block * bytes_per_token / gib for r in rows]
        # The first harness counted the most blocks ever held, i.e. the prefill peak (a chunk's blocks are
        # held until computed); the current one counts the blocks held while decoding.
        peak = not any("kv_blocks_per_stream_near_end" in r for r in rows)
        what = "prefill peak" if peak else "while decoding"
        label = f"{res['mode']}, {what} ({res['file']})"
        style = "o:" if peak else "o-"
        ax2.plot([r["length"] for r in rows], ys, style, color=mode_color.get(res["mode"]), label=label)
    pool = endless[0]["kv_pool_tokens"] * bytes_per_token / gib if endless else 0
    ax2.axhline(pool, color="black", lw=0.8, ls=":", label=f"whole KV pool of the H100 run ({pool:.0f} GiB)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("stream length (tokens)")
    ax2.set_ylabel("KV memory per stream (GiB)")
    ax2.set_title("KV memory per stream against stream length", fontsize=10)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
