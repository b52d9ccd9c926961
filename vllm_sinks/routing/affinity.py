"""Chat affinity: which replica serves a request, so that every turn of a chat reaches the replica holding
its SINKS state (its KV pool, and its host tier with offloading).

A request's chat key, first found of:
  1. the `X-Session-ID` header (any client that names its conversations);
  2. the OpenAI `user` field;
  3. what every turn of a chat shares: its first message(s) (system prompt and first user message) for chat
     completions, the prompt's first `PREFIX_CHARS` characters for text completions. These are the tokens
     SINKS keeps as sinks, so a chat's key does not change as it grows. A token-id prompt (completions, and
     vLLM's data parallel, patch 19) is keyed by its prefixes of 16, 32, ..., 256 tokens, the longest one
     remembered winning (`token_prefix_keys`, `AffinityTable.place_tokens`): a later turn contains its
     first turn's longest prefix.

Placement: rendezvous (highest-random-weight) hashing of the key over the live replicas gives each chat an
order of preference that does not depend on the others (`rendezvous_order`). Hashing alone leaves the chats
unevenly spread (64 chats over two replicas split 27/37 on the H100 benchmark, docs/replicas.md), and a
replica's pool holds a fixed number of states: so a new chat skips, in its order, the replicas that already
hold `balance` times the mean number of chats (consistent hashing with bounded loads, `balanced_order`; the
default 1.0 keeps the replicas' chat counts within one of each other as chats arrive), and
goes to the first replica left that is not full (in-flight requests < `max_load`), or the least loaded if
all are. The replica a chat was placed on is remembered (least recently used keys forgotten past
`max_keys`): a returning chat goes back to it while it is alive, full or not, so a full replica sheds new
chats, never returning ones. A dead replica's chats move to their next choice (their next turn re-prefills
there).

Invariants: `place` never returns a dead replica while a live one exists; a key maps to one replica at a
time; the table holds at most `max_keys` keys; `chats[url]` is the number of keys placed on `url`; a new chat
goes to a live replica below `balance` times the live replicas' mean (one always is) unless every such
replica is full.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SESSION_HEADER = "x-session-id"
PREFIX_CHARS = 2048  # of the first messages: a system prompt and a first user message
PREFIX_TOKENS = 256  # of a token-id prompt
BALANCE = 1.0  # a new chat skips replicas holding this many times the mean number of chats (or more)


def chat_key(body: Mapping[str, Any], headers: Mapping[str, str]) -> tuple[str | None, str]:
    """(key, where it came from: "header", "user", "prefix" or "none") for an OpenAI request body."""
    header = next((v for k, v in headers.items() if k.lower() == SESSION_HEADER), None)
    if header:
        return "session:" + header, "header"
    user = body.get("user")
    if isinstance(user, str) and user:
        return "user:" + user, "user"
    prefix = _shared_prefix(body)
    if prefix is None:
        return None, "none"
    return "prefix:" + hashlib.sha256(prefix.encode()).hexdigest()[:32], "prefix"


def _shared_prefix(body: Mapping[str, Any]) -> str | None:
    """The part of a request every later turn of its chat repeats: its first messages up to the first user
    message (chat), or the start of its prompt (completions)."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        first: list[Any] = []
        for message in messages:
            first.append(message.get("content") if isinstance(message, dict) else message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
        return json.dumps(first, sort_keys=True, default=str)[:PREFIX_CHARS]
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt[:PREFIX_CHARS]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return json.dumps(prompt[:PREFIX_TOKENS])
    return None


def _weight(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{replica}\0{key}".encode(), digest_size=8).digest(), "big")


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """The replicas in this key's order of preference (highest-random-weight hashing): removing a replica
    moves only the keys it came first for."""
    return sorted(replicas, key=lambda name: _weight(key, name), reverse=True)


def balanced_order(key: str, chats: Mapping[str, int], balance: float = BALANCE) -> list[str]:
    """The replicas of `chats` (name -> chats placed on it) in this key's rendezvous order, those holding
    `balance` x the mean after one more chat (or more) moved behind the others. One replica at least is below
    that bound, so with n replicas none ends up with more than ceil(balance x chats / n) new chats."""
    order = rendezvous_order(key, list(chats))
    if not order:
        return order
    bound = balance * (sum(chats.values()) + 1) / len(order)  # chats < bound <=> chats < ceil(bound)
    return [n for n in order if chats[n] < bound] + [n for n in order if chats[n] >= bound]


def remember_placement(placed: OrderedDict[str, str], chats: dict[str, int], key: str, replica: str,
                       max_keys: int) -> None:  # fmt: skip
    """Records `key` on `replica` as the most recently used key of `placed`, forgets the least recently used
    past `max_keys`, and keeps `chats` (keys per replica) in step."""
    before = placed.get(key)
    if before != replica:
        if before is not None:
            chats[before] -= 1
        chats[replica] = chats.get(replica, 0) + 1
    placed[key] = replica
    placed.move_to_end(key)
    while len(placed) > max_keys:
        _, gone = placed.popitem(last=False)
        chats[gone] -= 1


@dataclass
class Replica:
    url: str
    alive: bool = True
    in_flight: int = 0


@dataclass
class AffinityTable:
    """Places chats on replicas (module docstring). Not thread-safe: one event loop owns it."""

    replicas: dict[str, Replica]
    max_load: int = 64
    max_keys: int = 1_000_000
    balance: float = BALANCE
    placed: OrderedDict[str, str] = field(default_factory=OrderedDict)
    chats: dict[str, int] = field(default_factory=dict)  # replica url -> keys placed on it
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("returning", "new", "balanced", "shed", "moved", "unkeyed"), 0))  # fmt: skip

    @classmethod
    def of(cls, urls: Sequence[str], **kw: Any) -> AffinityTable:
        if not urls:
            raise ValueError("the router needs at least one replica (--replica URL)")
        return cls({u: Replica(u) for u in urls}, **kw)

    def order(self, key: str) -> list[Replica]:
        """The live replicas in this key's order of preference (hashing alone)."""
        live = {r.url: r for r in self.replicas.values() if r.alive}
        return [live[url] for url in rendezvous_order(key, list(live))]

    def balanced(self, key: str) -> list[Replica]:
        """The live replicas in this key's order, those holding too many chats last (`balanced_order`)."""
        live = {r.url: r for r in self.replicas.values() if r.alive}
        chats = {url: self.chats.get(url, 0) for url in live}
        return [live[url] for url in balanced_order(key, chats, self.balance)]

    def place(self, key: str | None) -> Replica:
        live = [r for r in self.replicas.values() if r.alive]
        if not live:
            raise LookupError("no replica is alive")
        if key is None:
            self.counts["unkeyed"] += 1
            return min(live, key=lambda r: r.in_flight)
        url = self.placed.get(key)
        if url is not None:
            replica = self.replicas[url]
            if replica.alive:
                self.placed.move_to_end(key)
                self.counts["returning"] += 1
                return replica
            self.counts["moved"] += 1
        else:
            self.counts["new"] += 1
        order = self.balanced(key)
        choice = next((r for r in order if r.in_flight < self.max_load), None)
        if choice is None:
            choice = min(order, key=lambda r: r.in_flight)
        if order[0] is not self.order(key)[0]:
            self.counts["balanced"] += 1  # its first choice holds too many chats
        elif choice is not order[0]:
            self.counts["shed"] += 1  # its first choice is full
        self.remember(key, choice.url)
        return choice

    def place_tokens(self, keys: Sequence[str]) -> Replica:
        """Places a token prompt by its prefix keys (token_prefix_keys, longest first): the chat whose earlier
        turn's longest key is one of them, else a new chat. Only each turn's longest key is remembered, so
        chats that share a system prompt but not their first message stay apart."""
        known = next((k for k in keys if k in self.placed), None)
        replica = self.place(known if known is not None else keys[0])
        self.remember(keys[0], replica.url)
        return replica

    def remember(self, key: str, url: str) -> None:
        remember_placement(self.placed, self.chats, key, url, self.max_keys)

    def mark_dead(self, url: str) -> None:
        self.replicas[url].alive = False

    def mark_alive(self, url: str) -> None:
        self.replicas[url].alive = True


def token_prefix_keys(prompt_token_ids: Sequence[int]) -> list[str]:
    """Keys of a token prompt's prefixes, longest first: its first 256, 240, ..., 16 tokens (whole multiples
    of 16 within the prompt). A later turn of a chat contains its first turn's prompt, so one of its keys is
    the one its first turn remembered (AffinityTable.place_tokens)."""
    n = min(len(prompt_token_ids), PREFIX_TOKENS) // 16 * 16
    digest, keys = hashlib.sha256(), []
    for m in range(16, n + 1, 16):  # one pass: each prefix's hash extends the previous one's
        digest.update(
            b"".join(int(t).to_bytes(4, "little", signed=True) for t in prompt_token_ids[m - 16 : m])
        )
        keys.append("tokens:" + digest.copy().hexdigest()[:32])
    return keys[::-1]


def data_parallel_rank(owner: Any, prompt_token_ids: Sequence[int] | None, loads: Sequence[Sequence[int]],
                       max_load: int) -> int | None:  # fmt: skip
    """The engine rank of `vllm serve --data-parallel-size N` for a request (patch 19), placed by an
    AffinityTable kept on `owner` (the front end's engine client); each engine's load is its score in vLLM's
    balancer (waiting x 4 + running). None: the prompt is too short to key."""
    keys = token_prefix_keys(prompt_token_ids or [])
    if not keys:
        return None
    table = vars(owner).get("_vllm_sinks_affinity")
    if table is None:
        table = AffinityTable.of([str(i) for i in range(len(loads))], max_load=max_load)
        owner._vllm_sinks_affinity = table
    for i, (waiting, running) in enumerate(loads):
        table.replicas[str(i)].in_flight = waiting * 4 + running
    return int(table.place_tokens(keys).url)
