"""Online serving load: N concurrent multi-turn streaming chats against a running OpenAI-compatible server.

Each chat is an endless conversation: it sends its whole history plus a new user message, streams the reply,
appends it, and starts the next turn, until --duration seconds have passed (the turn in flight finishes).
A share of replies (--disconnect-rate) is dropped by the client mid-stream. Measured from the client: TTFT
(request sent -> first content chunk) and inter-token latency (gaps between content chunks), p50/p99, status
codes (2xx / 4xx / 5xx) and transport errors (a request that got no response at all is sent again up to
--connection-retries times, as the openai client does, and counted in connection_retries; an error after the
response began is never retried). Sampled from the server every --sample-s: /metrics (running
requests, KV-cache usage, vllm_sinks:* when served with SINKS) and, with --server-pid, the resident memory of
the server and all its child processes (API server, engine core, workers). At the end it waits until the
server is idle and reports the KV blocks still held (must be 0).

Growing chats (--user-words LO:HI --until-prompt-tokens N): each user message has LO..HI words and a chat
stops once a turn's prompt passed N tokens, so every history grows far past the window; per turn the server's
usage (--enable-prompt-tokens-details) gives the prompt tokens served from the prefix cache and computed.
Timelines per --window-s: TTFT and ITL p50/p99, turns, computed and cached prompt tokens, and from /metrics
running/waiting requests, KV usage and preemptions.

    vllm serve MODEL --attention-backend SINKS --enable-prompt-tokens-details ... &
    python benchmarks/bench_serve.py --base-url http://127.0.0.1:8000 --model MODEL --chats 256 \
        --duration 300 --disconnect-rate 0.2 --server-pid $! --out benchmarks/results/serve_sinks.json
Side by side: the same command against a server started with another --attention-backend.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import re
import sys
import time

WORDS = ("sea wind light river stone king city road night fire bread water mountain garden letter song ship "
         "winter field voice door story friend").split()  # fmt: skip


SAMPLED = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
           "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total",
           "vllm_sinks:held_blocks", "vllm_sinks:request_held_blocks_max")  # fmt: skip
FINAL = ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm_sinks:held_blocks",
         "vllm_sinks:streams", "vllm_sinks:request_held_blocks_peak", "vllm_sinks:request_blocks_bound",
         "vllm_sinks:window_freed_blocks_total", "vllm_sinks:sink_block_hits_total")  # fmt: skip


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of each metric's samples over label sets (one engine: the value), for vllm:* and vllm_sinks:*."""
    out: dict[str, float] = {}
    for m in re.finditer(r"^(vllm(?:_sinks)?:[a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", text, re.M):
        name, value = m.group(1), float(m.group(2))
        out[name] = out.get(name, 0.0) + value
    return out


def process_tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Load:
    def __init__(self, a) -> None:
        self.a = a
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.status: dict[str, int] = {"2xx": 0, "4xx": 0, "5xx": 0}
        self.errors: list[str] = []
        self.turns = self.disconnects = self.output_chunks = self.connection_retries = 0
        self.samples: list[dict] = []
        self.turn_log: list[dict] = []  # per completed turn: start time, TTFT, prompt and cached tokens
        self.itl_at: list[tuple[float, float]] = []  # (seconds since start, inter-token gap)
        self.start = time.monotonic()
        self.chats_done = 0
        lo, _, hi = str(a.user_words).partition(":")
        self.user_words = (int(lo), int(hi or lo))
        ids_lo, ids_hi = (int(x) for x in a.allowed_token_ids.split(":")) if a.allowed_token_ids else (0, 0)
        self.allowed_token_ids = list(range(ids_lo, ids_hi)) if a.allowed_token_ids else None

    def user_message(self, rng: random.Random, cid: int) -> str:
        """One user turn: --user-words words (N, or LO:HI at random)."""
        return f"chat {cid}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*self.user_words)))

    async def chat(self, client, cid: int, deadline: float) -> None:
        import httpx

        rng = random.Random(cid)
        messages: list[dict] = []
        url = self.a.base_url + "/v1/chat/completions"
        while time.monotonic() < deadline:
            messages.append({"role": "user", "content": self.user_message(rng, cid)})
            drop = rng.random() < self.a.disconnect_rate
            drop_after = rng.randrange(1, self.a.max_tokens) if drop else None
            body = {"model": self.a.model, "messages": messages, "max_tokens": self.a.max_tokens,
                    "temperature": 0.0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            if self.allowed_token_ids:
                body["allowed_token_ids"] = self.allowed_token_ids
            reply, n, last, usage, ttft = [], 0, None, None, None
            t0 = time.perf_counter()
            t_turn = time.monotonic() - self.start
            failed = False
            for attempt in range(self.a.connection_retries + 1):
                responded = False
                try:
                    async with client.stream("POST", url, json=body) as r:
                        responded = True
                        code = f"{r.status_code // 100}xx"
                        self.status[code] = self.status.get(code, 0) + 1
                        if r.status_code != 200:
                            await r.aread()
                            self.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                            failed = True
                            break
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            usage = chunk.get("usage") or usage
                            choices = chunk.get("choices") or []
                            if not choices or not choices[0].get("delta", {}).get("content"):
                                continue
                            now = time.perf_counter()
                            if last is None:
                                ttft = now - t0
                                self.ttft.append(ttft)
                            else:
                                self.itl.append(now - last)
                                self.itl_at.append((time.monotonic() - self.start, now - last))
                            last = now
                            n += 1
                            reply.append(choices[0]["delta"]["content"])
                            if drop_after is not None and n >= drop_after:
                                self.disconnects += 1
                                break  # leaving the block closes the connection mid-stream
                    break
                except (httpx.HTTPError, OSError) as e:
                    if not responded and attempt < self.a.connection_retries:
                        # No response yet (typically a pooled keep-alive connection the server closed at
                        # that moment): send again, as the openai client does (max_retries=2).
                        self.connection_retries += 1
                        continue
                    where = "mid-stream" if responded else "no response"
                    self.errors.append(f"{type(e).__name__} ({where}): {e}")
                    failed = True
                    break
            if failed:
                await asyncio.sleep(0.5)
                continue
            self.turns += 1
            self.output_chunks += n
            prompt_tokens = (usage or {}).get("prompt_tokens")
            details = (usage or {}).get("prompt_tokens_details") or {}
            self.turn_log.append(dict(t=round(t_turn, 2), chat=cid, ttft_s=ttft and round(ttft, 4),
                                      prompt_tokens=prompt_tokens, cached_tokens=details.get("cached_tokens"),
                                      dropped=drop_after is not None and n >= drop_after))  # fmt: skip
            messages.append({"role": "assistant", "content": "".join(reply)})
            if len(messages) > 2 * self.a.max_turns_kept:  # a client that trims very old turns
                messages = messages[-2 * self.a.max_turns_kept :]
            if self.a.until_prompt_tokens and (prompt_tokens or 0) >= self.a.until_prompt_tokens:
                self.chats_done += 1
                return

    async def sampler(self, client, start: float) -> None:
        while True:
            sample = {"t": round(time.monotonic() - start, 1)}
            try:
                r = await client.get(self.a.base_url + "/metrics")
                m = parse_metrics(r.text)
                for k in SAMPLED:
                    if k in m:
                        sample[k] = m[k]
            except Exception as e:  # the sampler must not end the run
                sample["error"] = repr(e)
            if self.a.server_pid:
                sample["rss_mib"] = round(process_tree_rss(self.a.server_pid) / 2**20, 1)
            self.samples.append(sample)
            await asyncio.sleep(self.a.sample_s)

    async def run(self) -> dict:
        import httpx

        limits = httpx.Limits(max_connections=self.a.chats + 8, max_keepalive_connections=self.a.chats + 8)
        timeout = httpx.Timeout(self.a.request_timeout_s)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            start = self.start = time.monotonic()
            deadline = start + self.a.duration
            sampler = asyncio.create_task(self.sampler(client, start))
            ids = range(self.a.first_chat, self.a.first_chat + self.a.chats)
            await asyncio.gather(*(self.chat(client, i, deadline) for i in ids))
            elapsed = time.monotonic() - start
            # Idle: every chat finished or dropped. Give the engine a moment to settle, then read the pool.
            final: dict[str, float] = {}
            for _ in range(30):
                await asyncio.sleep(1.0)
                final = parse_metrics((await client.get(self.a.base_url + "/metrics")).text)
                idle = final.get("vllm:num_requests_running", 0) == 0
                if idle and final.get("vllm_sinks:held_blocks", 0) == 0:
                    break
            await asyncio.sleep(self.a.sample_s)
            sampler.cancel()
        return self.summary(elapsed, final)

    def summary(self, elapsed: float, final: dict[str, float]) -> dict:
        a = self.a
        rss = [s["rss_mib"] for s in self.samples if "rss_mib" in s]
        warm = [s["rss_mib"] for s in self.samples if "rss_mib" in s and s["t"] >= a.warmup_s]
        ms = 1000.0
        return {
            "benchmark": "online serving: concurrent multi-turn streaming chats",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/bench_serve.py", *sys.argv[1:]]),
            "chats": a.chats, "duration_s": a.duration, "elapsed_s": round(elapsed, 1),
            "max_tokens": a.max_tokens, "disconnect_rate": a.disconnect_rate,
            "turns_completed": self.turns, "client_disconnects": self.disconnects, "status": self.status,
            "errors": len(self.errors), "error_examples": self.errors[:5],
            "connection_retries": self.connection_retries,
            "output_tokens_per_s": round(self.output_chunks / elapsed, 1),
            "ttft_ms": {"p50": _r(percentile(self.ttft, 50), ms), "p99": _r(percentile(self.ttft, 99), ms),
                        "n": len(self.ttft)},
            "itl_ms": {"p50": _r(percentile(self.itl, 50), ms), "p99": _r(percentile(self.itl, 99), ms),
                       "n": len(self.itl)},
            "server_rss_mib": {"first_after_warmup": warm[0] if warm else None, "max_after_warmup": max(warm)
                               if warm else None, "last": rss[-1] if rss else None, "warmup_s": a.warmup_s},
            "final_metrics": {k: v for k, v in final.items() if k in FINAL},
            "chats_past_until_prompt_tokens": self.chats_done if a.until_prompt_tokens else None,
            "prompt_tokens": {"total": sum(t["prompt_tokens"] or 0 for t in self.turn_log),
                              "cached": sum(t["cached_tokens"] or 0 for t in self.turn_log)},
            "history_cached": history_cached(self.turn_log, a.block_size),
            "preemptions": _delta(self.samples, "vllm:num_preemptions_total"),
            "timeline": self.timeline(elapsed),
            "turns": self.turn_log,
            "samples": self.samples,
        }  # fmt: skip

    def timeline(self, elapsed: float) -> list[dict]:
        """Per --window-s window: TTFT (turns started in it) and ITL (gaps in it) p50/p99 in ms, turns,
        prompt tokens computed and served from the cache."""
        w = self.a.window_s
        rows = []
        for i in range(int(elapsed // w) + 1):
            t0, t1 = i * w, (i + 1) * w
            turns = [t for t in self.turn_log if t0 <= t["t"] < t1]
            ttft = [t["ttft_s"] for t in turns if t["ttft_s"] is not None]
            itl = [g for at, g in self.itl_at if t0 <= at < t1]
            prompt = sum(t["prompt_tokens"] or 0 for t in turns)
            cached = sum(t["cached_tokens"] or 0 for t in turns)
            row = dict(t=t0, turns=len(turns), prompt_tokens_computed=prompt - cached)
            row["prompt_tokens_cached"] = cached
            for name, xs in (("ttft", ttft), ("itl", itl)):
                for q in (50, 99):
                    row[f"{name}_ms_p{q}"] = _r(percentile(xs, q), 1000)
            rows.append(row)
        return rows


def history_cached(turn_log: list[dict], block_size: int = 16) -> dict:
    """Every turn after a chat's first resends the chat's previous prompts (and replies, new messages): the
    tokens of the last prompt the server reported for the chat that this turn found in the prefix cache, over
    all such turns. A turn whose cached tokens reach that prompt's last whole block "hit" (one that
    re-prefilled did not). Turns dropped mid-stream report no usage: they are not counted."""
    previous: dict[int, int] = {}
    resent = cached = turns = hits = 0
    for t in sorted(turn_log, key=lambda t: t["t"]):
        prompt, got = t["prompt_tokens"], t["cached_tokens"]
        if prompt is None or got is None:
            continue
        if t["chat"] in previous:
            before = previous[t["chat"]]
            turns += 1
            resent += before
            cached += min(got, before)
            hits += got >= before // block_size * block_size
        previous[t["chat"]] = prompt
    return {"turns": turns, "turns_hit": hits, "resent_tokens": resent, "cached_tokens": cached,
            "ratio": round(cached / resent, 4) if resent else None}  # fmt: skip


def _r(x: float | None, scale: float) -> float | None:
    return None if x is None else round(x * scale, 2)


def _delta(samples: list[dict], key: str) -> float | None:
    values = [s[key] for s in samples if key in s]
    return values[-1] - values[0] if values else None


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--chats", type=int, default=100)
    p.add_argument("--block-size", type=int, default=16, help="the server's KV block size")
    p.add_argument("--first-chat", type=int, default=0,
                   help="chat ids from N (each its own messages)")  # fmt: skip
    p.add_argument("--duration", type=float, default=300.0, help="seconds; turns in flight then finish")
    p.add_argument("--disconnect-rate", type=float, default=0.2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--user-words", default="12", help="words per user message: N, or LO:HI (random)")
    p.add_argument("--until-prompt-tokens", type=int, default=0, help="a chat stops once its prompt passed N")
    p.add_argument("--window-s", type=float, default=30.0, help="timeline window")
    p.add_argument("--max-turns-kept", type=int, default=1000)
    p.add_argument("--allowed-token-ids", default=None, help="LO:HI (dummy weights with a tiny tokenizer)")
    p.add_argument("--server-pid", type=int, default=None)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--warmup-s", type=float, default=60.0)
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--connection-retries", type=int, default=2,
                   help="resend a request that got no response at all, as openai's client does")  # fmt: skip
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    result = asyncio.run(Load(a).run())
    brief = {k: v for k, v in result.items() if k not in ("samples", "turns", "timeline")}
    print(json.dumps(brief, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
