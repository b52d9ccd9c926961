"""attention_sinks' streaming demo as ONE live session over HTTP: each prompt is sent alone and the server,
which keeps the conversation's StreamingLLM state between messages, computes only the new tokens.

Start the server with the plugin's endpoints, then run this against it:
    VLLM_PLUGINS=sinks vllm serve MODEL --attention-backend SINKS
    python examples/session_chat.py --base-url http://127.0.0.1:8000 --prompts 16 --max-tokens 256

Prints each reply as it streams and, per message, its time to first token, its duration and the session's
length so far (the payload stays one prompt long however long the conversation grows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from streaming_demo import PROMPTS  # noqa: E402  (the demo's prompt list, shared)


def converse(
    base_url: str, prompts: int, max_tokens: int, raw: bool = False, quiet: bool = False
) -> list[dict]:
    """Creates a session, sends `prompts` messages (as chat turns, or raw text with `raw`), closes it."""
    turns = []
    with httpx.Client(base_url=base_url, timeout=600) as c:
        r = c.post("/v1/sessions", json={"max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        sid = r.json()["id"]
        try:
            for i in range(prompts):
                prompt = PROMPTS[i % len(PROMPTS)]
                body = {"prompt": prompt} if raw else {"content": prompt}
                t0, first, text = time.perf_counter(), None, ""
                with c.stream("POST", f"/v1/sessions/{sid}/messages", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"message {i}: {r.status_code} {r.read().decode()}")
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RuntimeError(f"message {i}: {event['error']['message']}")
                        piece = event["choices"][0]["delta"].get("content") or ""
                        if piece and first is None:
                            first = time.perf_counter() - t0
                        text += piece
                        if not quiet:
                            print(piece, end="", flush=True)
                info = {s["id"]: s for s in c.get("/v1/sessions").json()["data"]}[sid]
                seconds = round(time.perf_counter() - t0, 3)
                turn = {"prompt": prompt, "reply": text, "ttft_s": round(first or 0.0, 3), "seconds": seconds,
                        "session_tokens": info["tokens"]}  # fmt: skip
                turns.append(turn)
                if not quiet:
                    print(f"\n[message {i}: first token {turn['ttft_s']} s, {turn['seconds']} s, session "
                          f"{turn['session_tokens']} tokens]\n", flush=True)  # fmt: skip
        finally:
            c.delete(f"/v1/sessions/{sid}")
    return turns


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--raw", action="store_true", help="send the prompts as raw text (no chat template)")
    a = p.parse_args(argv)
    return converse(a.base_url, a.prompts, a.max_tokens, a.raw)


if __name__ == "__main__":
    main()
