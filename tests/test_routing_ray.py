"""ChatAffinityRouter (vllm_sinks.routing.ray_serve) inside a real Ray Serve app, without engines: an echo
deployment of two replicas that each hold 8 requests at most, called through a handle with OpenAI-like
bodies of 8 chats. Every call of a chat reaches one replica, in order and in bursts far past the replicas'
room (256 at once: Ray Serve queues them, the router keeps each chat's replica), and none is lost."""

from __future__ import annotations

import asyncio
import collections
import os

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve (bash scripts/setup.sh installs ray[serve] 2.58.1)")
pytest.importorskip("ray.serve")

CHATS = 8


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
    assert len(set(first.values())) == 2  # 8 chats spread over both replicas
    for burst in (64, 256):
        results = _calls(handle, [i % CHATS for i in range(burst)])
        assert len(results) == burst
        moved = [(c, pid) for c, pid in results if first[c] != pid]
        assert not moved, moved
    counts = collections.Counter(first.values())
    assert min(counts.values()) >= 1
