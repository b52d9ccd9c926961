"""Many live sessions over HTTP (the plugin's /v1/sessions on `vllm serve`), some clients disconnecting.

--sessions clients each keep one live session and send it messages back to back for --duration seconds,
reading every reply's event stream to [DONE]. A share of replies (--disconnect-rate) is dropped by the
client after its first chunk: the server ends that session (documented), and the client opens a new one.
At the end every session still open must answer one more message; then all are closed and the plugin's
/metrics must show no live session and no held KV block. Reported: status codes, 5xx, sessions opened,
messages answered, disconnects, the final check, reply latency (TTFT, total) and per-message tokens.

    VLLM_PLUGINS=sinks vllm serve MODEL --attention-backend SINKS &
    python benchmarks/bench_sessions_http.py --base-url http://127.0.0.1:8000 --sessions 64 --duration 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--disconnect-rate", type=float, default=0.2)
    p.add_argument("--message-words", default="40:400", help="words per message, uniform in LO:HI")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--allowed-token-ids", default=None, help="LO:HI (a random model with a tiny tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


WORDS = "the river ran past old stone walls where children played and the market opened at dawn".split()


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))], 1)


class Load:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.status: Counter = Counter()
        self.errors: Counter = Counter()
        self.opened = self.answered = self.disconnects = self.closed_by_server = 0
        self.ttft_ms: list[float] = []
        self.reply_ms: list[float] = []
        self.reply_chunks: list[int] = []
        self.live: dict[int, str] = {}

    def session_body(self) -> dict:
        body = {"max_tokens": self.a.max_tokens, "temperature": 0.8, "ignore_eos": True}
        if self.a.allowed_token_ids:
            lo, hi = (int(x) for x in self.a.allowed_token_ids.split(":"))
            body["allowed_token_ids"] = list(range(lo, hi))
        return body

    async def open(self, client) -> str | None:
        r = await client.post("/v1/sessions", json=self.session_body())
        self.status[r.status_code] += 1
        if r.status_code == 429:  # at the cap while the server is still ending a dropped session: retry
            return None
        if r.status_code != 200:
            self.errors[f"create {r.status_code}: {r.text[:200]}"] += 1
            return None
        self.opened += 1
        return r.json()["id"]

    async def message(self, client, sid: str, text: str, drop: bool) -> str:
        """'ok', 'dropped', 'gone' (404: the server ended it) or 'error'."""
        t0 = time.perf_counter()
        first, chunks, done = None, 0, False
        async with client.stream("POST", f"/v1/sessions/{sid}/messages", json={"prompt": text}) as r:
            self.status[r.status_code] += 1
            if r.status_code != 200:
                body = (await r.aread()).decode()[:200]
                if r.status_code == 404:
                    return "gone"
                self.errors[f"message {r.status_code}: {body}"] += 1
                return "error"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    self.errors[f"stream error: {obj['error'].get('message', '')[:200]}"] += 1
                    return "error"
                if first is None:
                    first = time.perf_counter()
                    if drop:
                        break  # leaving the block closes the connection mid-reply
                chunks += 1
        if drop and not done:
            self.disconnects += 1
            return "dropped"
        if not done:
            self.errors["stream ended without [DONE]"] += 1
            return "error"
        self.answered += 1
        self.ttft_ms.append(((first or time.perf_counter()) - t0) * 1e3)
        self.reply_ms.append((time.perf_counter() - t0) * 1e3)
        self.reply_chunks.append(chunks)
        return "ok"

    def text(self, rng: random.Random) -> str:
        lo, hi = (int(x) for x in self.a.message_words.split(":"))
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    async def client_loop(self, i: int, deadline: float) -> None:
        import httpx

        rng = random.Random(self.a.seed * 1000 + i)
        async with httpx.AsyncClient(base_url=self.a.base_url, timeout=httpx.Timeout(600.0)) as client:
            sid = None
            while time.monotonic() < deadline:
                try:
                    if sid is None:
                        sid = await self.open(client)
                        if sid is None:
                            await asyncio.sleep(0.5)
                            continue
                        self.live[i] = sid
                    drop = rng.random() < self.a.disconnect_rate
                    outcome = await self.message(client, sid, self.text(rng), drop)
                except httpx.HTTPError as e:
                    self.errors[f"{type(e).__name__}: {e}"[:200]] += 1
                    outcome = "error"
                if outcome in ("dropped", "gone", "error"):
                    if outcome == "gone":
                        self.closed_by_server += 1
                    self.live.pop(i, None)
                    sid = None

    async def final_check(self) -> dict:
        """Every session still open answers one more message, then is closed; then the metrics."""
        import httpx

        async with httpx.AsyncClient(base_url=self.a.base_url, timeout=httpx.Timeout(600.0)) as client:
            before = self.answered
            outcomes = await asyncio.gather(
                *(self.message(client, sid, "one more question", False) for sid in self.live.values())
            )
            answered = self.answered - before
            for sid in self.live.values():
                r = await client.delete(f"/v1/sessions/{sid}")
                self.status[r.status_code] += 1
            listed = (await client.get("/v1/sessions")).json()["data"]
            # the block metrics are recorded per engine step: one short completion steps the engine
            models = (await client.get("/v1/models")).json()["data"]
            step = {"model": models[0]["id"], "prompt": "hi", "max_tokens": 2}
            await client.post("/v1/completions", json=step)
            metrics = (await client.get("/metrics")).text
        sinks = {
            line.rsplit(" ", 1)[0].split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("vllm_sinks:")
        }
        return {
            "sessions_open_at_end": len(outcomes),
            "answered_at_end": answered,
            "outcomes_at_end": dict(Counter(outcomes)),
            "listed_after_close": len(listed),
            "live_sessions_metric": sinks.get("vllm_sinks:live_sessions"),
            "held_blocks_metric": sinks.get("vllm_sinks:held_blocks"),
        }


async def run(a: argparse.Namespace) -> dict:
    load = Load(a)
    t0 = time.monotonic()
    await asyncio.gather(*(load.client_loop(i, t0 + a.duration) for i in range(a.sessions)))
    elapsed = time.monotonic() - t0
    final = await load.final_check()
    five_xx = sum(n for code, n in load.status.items() if code >= 500)
    return {
        "benchmark": "live sessions over HTTP",
        "sessions": a.sessions,
        "duration_s": round(elapsed, 1),
        "disconnect_rate": a.disconnect_rate,
        "message_words": a.message_words,
        "max_tokens": a.max_tokens,
        "status": {str(k): v for k, v in sorted(load.status.items())},
        "http_5xx": five_xx,
        "errors": dict(load.errors.most_common(10)),
        "sessions_opened": load.opened,
        "messages_answered": load.answered,
        "client_disconnects": load.disconnects,
        "sessions_ended_by_server": load.closed_by_server,
        "ttft_ms": {"p50": percentile(load.ttft_ms, 0.5), "p99": percentile(load.ttft_ms, 0.99)},
        "reply_ms": {"p50": percentile(load.reply_ms, 0.5), "p99": percentile(load.reply_ms, 0.99)},
        "final": final,
        "passed": five_xx == 0
        and not load.errors
        and final["answered_at_end"] == final["sessions_open_at_end"]
        and final["held_blocks_metric"] == 0
        and final["live_sessions_metric"] == 0,
    }


def main(argv=None) -> dict:
    a = parse(argv)
    from run_record import emit, provenance

    result = asyncio.run(run(a))
    result.update(provenance(__file__, argv))
    return emit(result, a.out)


if __name__ == "__main__":
    main()
