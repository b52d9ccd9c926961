"""Keep one conversation going turn after turn against `vllm serve MODEL --attention-backend SINKS`, printing
per-turn latency, how many prompt tokens the server had to compute (the rest came from the prefix cache: the
sink blocks and the window before the new text) and the KV blocks the server holds for the conversation
(read from /metrics, `vllm_sinks:request_held_blocks_max`, sampled during the reply): flat, however long it
gets. Start the server with --enable-prompt-tokens-details.

    python examples/endless_chat.py --base-url http://127.0.0.1:8000/v1 --model MODEL --turns 50
"""

from __future__ import annotations

import argparse
import re
import time
import urllib.request

import openai

QUESTIONS = [
    "Tell me a story about a river.",
    "What happened next?",
    "Describe the people who lived there.",
    "What did they eat in winter?",
    "Go on, and add a storm.",
    "How does it end?",
]


def held_blocks(base_url: str) -> int | None:
    """Most KV blocks any running request holds now (this conversation, when it is the only one)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(root + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^vllm_sinks:request_held_blocks_max\{[^}]*\} ([0-9.eE+-]+)$", text, re.M)
    return int(float(m.group(1))) if m else None


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args(argv)
    client = openai.OpenAI(base_url=a.base_url, api_key="unused")
    messages: list[dict] = []
    rows = []
    for turn in range(a.turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        t0 = time.perf_counter()
        first = None
        reply = []
        usage = None
        blocks = None
        stream = client.chat.completions.create(
            model=a.model,
            messages=messages,
            max_tokens=a.max_tokens,
            temperature=0.7,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                reply.append(chunk.choices[0].delta.content)
                if len(reply) % 8 == 0:  # a few samples mid-reply; the most is this conversation's
                    sample = held_blocks(a.base_url)
                    if sample is not None and (blocks is None or sample > blocks):
                        blocks = sample
        total = time.perf_counter() - t0
        messages.append({"role": "assistant", "content": "".join(reply)})
        prompt = usage.prompt_tokens if usage else 0
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        cached = (details.cached_tokens or 0) if details else 0
        row = {
            "turn": turn,
            "prompt_tokens": prompt,
            "computed_prompt_tokens": prompt - cached,
            "server_kv_blocks": blocks,
            "ttft_s": round((first or time.perf_counter()) - t0, 3),
            "total_s": round(total, 3),
        }
        rows.append(row)
        print(
            f"turn {turn:3d}: conversation {prompt:6d} prompt tokens, computed {prompt - cached:4d} "
            f"(cached {cached:6d}), KV blocks held {blocks}, time to first token {row['ttft_s']:.2f} s, "
            f"turn {total:.2f} s",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
