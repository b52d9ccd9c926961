"""Chats that grow turn by turn through an OpenAI chat endpoint, recording for every turn after the first
how much of the previous turn's tokens the replica found in its prefix cache (the replica-routing tests)."""

from __future__ import annotations

import concurrent.futures
import random

B = 16  # the tests' KV block size
CHATS, TURNS = 16, 6
WORDS = "the sea boats bridge children count mill fox dog cat sun stream story anchor warm".split()


class Chat:
    """One chat's conversation; `turn` sends its next message and records, for every turn after the first,
    the tokens the previous turn left reusable and the tokens the replica found cached."""

    def __init__(self, base_url: str, model: str, chat: int, headers: dict[str, str] | None = None) -> None:
        import openai

        self.client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                                    default_headers=headers)  # fmt: skip
        self.model, self.chat = model, chat
        self.messages = [{"role": "system", "content": f"chat number {chat}"}]
        self.previous: list[int] = []
        self.turns: list[dict] = []
        self.k = 0

    def turn(self) -> None:
        k = self.k
        text = " ".join(WORDS[(self.chat * 7 + k * 3 + i) % len(WORDS)] for i in range(30))
        self.messages.append({"role": "user", "content": text})
        extra = {"return_token_ids": True, "ignore_eos": True}
        r = self.client.chat.completions.create(model=self.model, messages=self.messages, max_tokens=16,
                                                temperature=0, extra_body=extra)  # fmt: skip
        prompt = list(r.prompt_token_ids)
        common = next((i for i, (a, b) in enumerate(zip(prompt, self.previous, strict=False)) if a != b),
                      min(len(prompt), len(self.previous)))  # fmt: skip
        details = r.usage.prompt_tokens_details
        if k:
            cached = (details and details.cached_tokens) or 0
            self.turns.append({"turn": k, "reusable": common // B * B - B, "cached": cached})
        self.previous = prompt + list(r.choices[0].token_ids)
        self.messages.append({"role": "assistant", "content": r.choices[0].message.content})
        self.k += 1


def take_turns(chats: list[Chat], turns: int, seed: int = 0) -> None:
    """Turn k of every chat (4 at a time, in a shuffled order), then turn k + 1: between two turns of a chat
    the replicas serve the other chats, as between a user's messages."""
    order = random.Random(seed)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(turns):
            list(pool.map(lambda chat: chat.turn(), order.sample(chats, len(chats))))


def summarize(turns: list[dict]) -> dict:
    hits = sum(1 for t in turns if t["cached"] >= t["reusable"])
    cached, reusable = sum(t["cached"] for t in turns), sum(t["reusable"] for t in turns)
    return {"turns": len(turns), "turns_hit": hits, "cached_over_reusable": round(cached / reusable, 3)}


def run_chats(base_url: str, model: str, chats: int = CHATS, turns: int = TURNS) -> dict:
    """`chats` new chats take `turns` turns each; the summary of their later turns."""
    group = [Chat(base_url, model, c) for c in range(chats)]
    take_turns(group, turns)
    return summarize([t for chat in group for t in chat.turns])
