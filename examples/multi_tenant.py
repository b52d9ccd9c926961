"""N concurrent tenants, each with its own endless conversation, streaming replies from one
`vllm serve MODEL --attention-backend SINKS`; some tenants hang up mid-stream. At the end it reads the
server's KV-cache usage from /metrics: with every conversation finished or dropped it must be back to 0
(no leaked block).

    python examples/multi_tenant.py --base-url http://127.0.0.1:8000 --model MODEL --tenants 32 --turns 4
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
import urllib.request

import openai


async def tenant(client, model: str, tid: int, turns: int, max_tokens: int, drop: float, stats: dict) -> None:
    rng = random.Random(tid)
    messages: list[dict] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"tenant {tid}, turn {turn}: tell me more about the sea"})
        hang_up_after = rng.randrange(1, max_tokens) if rng.random() < drop else None
        reply, n = [], 0
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0.8, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                reply.append(chunk.choices[0].delta.content)
                n += 1
                if hang_up_after is not None and n >= hang_up_after:
                    await stream.close()  # the client disconnects mid-stream
                    stats["dropped"] += 1
                    break
        stats["chunks"] += n
        stats["turns"] += 1
        messages.append({"role": "assistant", "content": "".join(reply)})


def kv_cache_usage(base_url: str) -> float:
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = re.findall(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.eE+-]+)$", text, re.M)
    return max(float(v) for v in values)


async def run(a) -> dict:
    client = openai.AsyncOpenAI(base_url=a.base_url + "/v1", api_key="unused", max_retries=0)
    stats = {"turns": 0, "chunks": 0, "dropped": 0}
    stats["kv_cache_usage_peak"] = 0.0

    async def watch() -> None:  # samples /metrics while the tenants talk
        while True:
            usage = await asyncio.to_thread(kv_cache_usage, a.base_url)
            stats["kv_cache_usage_peak"] = max(stats["kv_cache_usage_peak"], usage)
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    t0 = time.perf_counter()
    await asyncio.gather(
        *(tenant(client, a.model, t, a.turns, a.max_tokens, a.drop, stats) for t in range(a.tenants))
    )
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    watcher.cancel()
    for _ in range(50):  # the server frees a dropped stream's blocks when it notices the disconnect
        stats["kv_cache_usage_after"] = kv_cache_usage(a.base_url)
        if stats["kv_cache_usage_after"] == 0.0:
            break
        await asyncio.sleep(0.2)
    return stats


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--tenants", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--drop", type=float, default=0.2, help="chance that a tenant hangs up during a reply")
    a = p.parse_args(argv)
    stats = asyncio.run(run(a))
    print(
        f"{a.tenants} tenants, {stats['turns']} turns, {stats['chunks']} streamed chunks, "
        f"{stats['dropped']} replies dropped mid-stream, {stats['seconds']} s; "
        f"KV-cache usage peak {stats['kv_cache_usage_peak']:.3f}, "
        f"afterwards {stats['kv_cache_usage_after']:.3f}"
    )
    return stats


if __name__ == "__main__":
    main()
