"""Plot of the growing-chats serving benchmark (benchmarks/bench_serve.py with --until-prompt-tokens), one
line per mode over time: inter-token latency and TTFT p50/p99, prompt tokens computed and served from the
prefix cache, KV-cache usage, waiting requests and preemptions.
    python benchmarks/plot_serving.py sinks=serve_sinks.json dense=serve_dense.json sliding=... --out PNG
"""

from __future__ import annotations

import argparse
import json

COLORS = {"sinks": "tab:blue", "dense": "tab:red", "sliding": "tab:green"}


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="MODE=RESULT.json")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), sharex=True)
    (ax_itl, ax_ttft, ax_tok), (ax_kv, ax_wait, ax_pre) = axes
    for spec in a.runs:
        mode, path = spec.split("=", 1)
        with open(path) as f:
            r = json.load(f)
        color = COLORS.get(mode)
        tl = r["timeline"]
        t = [row["t"] for row in tl]
        for ax, key in ((ax_itl, "itl_ms"), (ax_ttft, "ttft_ms")):
            ax.plot(t, [row[f"{key}_p50"] for row in tl], color=color, label=f"{mode} p50")
            ax.plot(t, [row[f"{key}_p99"] for row in tl], color=color, ls="--", label=f"{mode} p99")
        ax_tok.plot(t, [row["prompt_tokens_computed"] for row in tl], color=color, label=f"{mode} computed")
        cached = [row["prompt_tokens_cached"] for row in tl]
        ax_tok.plot(t, cached, color=color, ls=":", label=f"{mode} cached")
        s = r["samples"]
        ts = [x["t"] for x in s]
        ax_kv.plot(ts, [100 * x.get("vllm:kv_cache_usage_perc", 0) for x in s], color=color, label=mode)
        waiting = [x.get("vllm:num_requests_waiting", 0) for x in s]
        ax_wait.plot(ts, waiting, color=color, label=f"{mode} waiting")
        ax_wait.plot(ts, [x.get("vllm:num_requests_running", 0) for x in s], color=color, ls=":",
                     label=f"{mode} running")  # fmt: skip
        pre = [x.get("vllm:num_preemptions_total", 0) for x in s]
        ax_pre.plot(ts, [v - pre[0] for v in pre], color=color, label=mode)
    titles = ["inter-token latency (ms)", "time to first token (ms)", "prompt tokens per window",
              "KV cache usage (%)", "requests", "preemptions (cumulative)"]  # fmt: skip
    for ax, title in zip(axes.flat, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax_itl.set_yscale("log")
    ax_ttft.set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("seconds since start")
    fig.suptitle("Growing chats: multi-turn streaming chats grown past 32k tokens, 20% dropped mid-stream")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)
    return a.out


if __name__ == "__main__":
    main()
