"""ChatAffinityRouter (vllm_sinks.routing.ray_serve) inside a real Ray Serve app, without engines: an echo
deployment of two replicas that each hold 8 requests at most, called through a handle with OpenAI-like
bodies of 16 chats. Every call of a chat reaches one replica, in order and in bursts far past the replicas'
room (256 at once: Ray Serve queues them, the router keeps each chat's replica), and none is lost."""

from __future__ import annotations

import asyncio
import collections
import os

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve (bash scripts/setup.sh installs ray[serve] 2.58.1)")
pytest.importorskip("ray.serve")

CHATS = 16


@pytest.fixture(scope="module")
def handle():
    from pydantic import BaseModel
    from ray import serve

    class Body(BaseModel):  # the fields of an OpenAI chat request the router reads
        messages: list
        user: str | None = None

    router = {"request_router_class": "vllm_sinks.routing.ray_serve:ChatAffinityRouter"}

    @serve.deployment(num_replicas=2, max_ongoing_requests=8, request_router_config=router)
    class Echo:
        async def chat(self, body):
            await asyncio.sleep(0.02)
            return os.getpid()

    @serve.deployment
    class Front:
        def __init__(self, echo):
            self.echo = echo

        async def __call__(self, chat: int):
            body = Body(
                messages=[
                    {"role": "system", "content": "shared"},
                    {"role": "user", "content": f"chat {chat}"},
                ]
            )
            return chat, await self.echo.chat.remote(body)

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        yield serve.run(Front.bind(Echo.bind()))
    finally:
        serve.shutdown()
        ray.shutdown()


def _calls(handle, chats: list[int]) -> list[tuple[int, int]]:
    responses = [handle.remote(c) for c in chats]
    return [r.result(timeout_s=120) for r in responses]


def test_each_chat_stays_on_one_replica_through_bursts(handle):
    first = dict(_calls(handle, list(range(CHATS))))
    assert len(set(first.values())) == 2  # 16 chats over both replicas (by hashing: all on one, 2 ** -15)
    for burst in (64, 256):
        results = _calls(handle, [i % CHATS for i in range(burst)])
        assert len(results) == burst
        moved = [(c, pid) for c, pid in results if first[c] != pid]
        assert not moved, moved
    counts = collections.Counter(first.values())
    assert min(counts.values()) >= 1


def test_request_key_is_the_chats_not_the_turns():
    """The key of a Ray Serve LLM call: the session id (X-Session-ID), else `user`, else the first messages;
    a chat's later turn (its whole history resent) has its first turn's key."""
    from types import SimpleNamespace

    from ray.serve._private.request_router.common import RequestRoutingContext
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from vllm_sinks.routing.ray_serve import request_key

    def call(messages, session="", user=None):
        body = ChatCompletionRequest(model="m", messages=messages, user=user)
        return SimpleNamespace(args=[body, None], metadata=SimpleNamespace(session_id=session),
                               routing_context=RequestRoutingContext())  # fmt: skip

    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    later = [*first, {"role": "assistant", "content": "x" * 100_000}, {"role": "user", "content": "more"}]
    other = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "good morning"}]
    assert request_key(call(later)) == request_key(call(first)) != request_key(call(other))
    assert request_key(call(later, session="s1")) == request_key(call(other, session="s1")) == "session:s1"
    assert request_key(call(later, user="u1")) == "user:u1"
    assert request_key(None) is None
    once = call(later, user="u1")
    assert request_key(once) == "user:u1"
    once.args[0].user = "u2"  # computed once per request, kept on its routing context: not read again
    assert request_key(once) == "user:u1"


def test_new_chats_are_balanced_and_counted():
    """ChatAffinityRouter.choose_replicas offers a new chat's replicas in its rendezvous order with those
    holding the mean number of chats or more last (64 chats on two replicas: 32 each, where hashing alone
    gives these keys more); a returning chat gets its own replica alone; on_request_routed keeps the
    counts."""
    from types import SimpleNamespace

    from ray.serve._private.request_router.common import RequestRoutingContext

    from vllm_sinks.routing.affinity import rendezvous_order
    from vllm_sinks.routing.ray_serve import ChatAffinityRouter

    def replica(name):
        return SimpleNamespace(replica_id=SimpleNamespace(to_full_id_str=lambda: name))

    def call(user):
        body = SimpleNamespace(messages=None, prompt=None, user=user)
        return SimpleNamespace(args=[body], metadata=SimpleNamespace(session_id=""),
                               routing_context=RequestRoutingContext())  # fmt: skip

    replicas = [replica("r1"), replica("r2")]
    keys = [f"chat{i}" for i in range(64)]
    hashed = collections.Counter(rendezvous_order("user:" + k, ["r1", "r2"])[0] for k in keys)
    assert max(hashed.values()) > 36, hashed  # what the bound fixes
    router = object.__new__(ChatAffinityRouter)
    router.initialize_state()
    placed = {}
    for k in keys:
        request = call(k)
        ranks = asyncio.run(router.choose_replicas(replicas, request))
        assert sorted(r[0].replica_id.to_full_id_str() for r in ranks) == ["r1", "r2"]
        chosen = ranks[0][0].replica_id
        router.on_request_routed(request, chosen, None)
        placed[k] = chosen.to_full_id_str()
    assert router.chats == collections.Counter(placed.values()) and max(router.chats.values()) == 32
    for k in keys[:8]:
        ranks = asyncio.run(router.choose_replicas(replicas, call(k)))
        assert [[r.replica_id.to_full_id_str() for r in rank] for rank in ranks] == [[placed[k]]]
