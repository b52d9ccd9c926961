"""Plot of streaming perplexity against position from one or more streaming_ppl.py JSONs (one row each).

    python benchmarks/quality/plot_ppl.py benchmarks/results/quality_smollm2_kjv_h200_2026-11-23.json \
        benchmarks/results/quality_qwen15_kjv_h100_2026-11-24.json --out benchmarks/results/quality_ppl.png
Left: the whole stream, PPL per 1,000-token bucket averaged over --smooth buckets. Right: the stream up to a
little past the trained context, unsmoothed, with dense attention as far as it runs (the trained context).
"""

from __future__ import annotations

import argparse
import json
import math
import os


def smooth(values: list[float | None], k: int) -> list[float]:
    """exp of the mean log-PPL over a trailing window of k buckets (None buckets skipped)."""
    out = []
    for i in range(len(values)):
        window = [math.log(v) for v in values[max(0, i - k + 1) : i + 1] if v]
        out.append(math.exp(sum(window) / len(window)) if window else float("nan"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--smooth", type=int, default=20)
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(a.results), 2, figsize=(13, 4.8 * len(a.results)), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]})  # fmt: skip
    for (ax1, ax2), path in zip(axes, a.results, strict=True):
        with open(path) as f:
            r = json.load(f)
        B = r["bucket"]
        trained = r["trained_context"]
        head = max(16, (trained * 5 // 4) // B + 1)
        for label, c in r["configs"].items():
            ppl = c["bucket_ppl"]
            xs = [(i + 0.5) * B for i in range(len(ppl))]
            style = "--" if c["kind"] == "dense" else "-"
            ax1.plot(xs, smooth(ppl, a.smooth), style, label=label, lw=1.2)
            n = min(len(ppl), head)
            head_ppl = [v if v else float("nan") for v in ppl[:n]]
            ax2.plot(xs[:n], head_ppl, style + "o", label=label, ms=3, lw=1.2)
        for ax in (ax1, ax2):
            ax.axvline(trained, color="grey", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_xlabel("position in the stream (tokens)")
            ax.grid(alpha=0.3)
        name = os.path.basename(os.path.normpath(r["model"]))
        ax1.set_ylabel(f"perplexity (1,000-token buckets, {a.smooth}-bucket moving average)")
        ax1.set_title(f"{name}: {r['text_tokens_total']:,}-token stream, {r['dtype']} on {r['device']}")
        ax2.set_title(f"first {head * B // 1000}k tokens (dotted: trained context, {trained:,})")
        ax1.legend(fontsize=8)
    fig.suptitle("Streaming perplexity on the King James Bible through vLLM: SINKS (S+W), window only, dense")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
