"""Stream one chat reply from a SINKS-backed `vllm serve` through the openai client.

python examples/stream_chat.py --base-url http://127.0.0.1:8000/v1 --model MODEL
"""

from __future__ import annotations

import argparse
import sys
import time

import openai


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="Tell me a story about a river that never ends.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    a = p.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key="unused")
    t0 = time.perf_counter()
    first = None
    n = 0
    stream = client.chat.completions.create(
        model=a.model,
        messages=[{"role": "user", "content": a.prompt}],
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        stream=True,
    )
    print(f"question: {a.prompt}\nreply: ", end="", flush=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            n += 1
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
    ttft = (first - t0) if first else float("nan")
    print(f"\n[{n} chunks streamed, time to first token {ttft:.2f} s]")


if __name__ == "__main__":
    main()
