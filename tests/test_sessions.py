"""Live sessions (vllm_sinks.sessions) on vLLM's streaming-input requests under SINKS, CPU, tiny model:

* a session fed messages M1, M2, ... gives, for each message, the reference's greedy continuation of one
  StreamingLLM stream over M1 + R1 + M2 + R2 + ... (each reply without its last sampled token, which vLLM
  never feeds back), far past S + W; each reply is as long as its own message's max_tokens;
* closing a session, or abandoning a reply mid-stream (the session is then aborted), returns every KV
  block; a second message while a reply streams is refused and the session stays usable;
* a 50,000-token session of short turns: the time per turn stays flat (the last 10 turns within 20% of the
  first 10), blocks held stay bounded, and its first 2,000 tokens equal the reference.
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
import torch

S, W, B = 4, 60, 16


@pytest.fixture(scope="module")
def engine(model_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    path = model_dir("hd64-gqa", head_dim=64, num_heads=4, num_kv_heads=2)
    args = AsyncEngineArgs(model=path, attention_backend="SINKS", dtype="float32", enforce_eager=True,
                           block_size=B, gpu_memory_utilization=0.3, max_model_len=200_000,
                           additional_config={"sinks": {"sink_tokens": S, "window_tokens": W}})  # fmt: skip
    loop = asyncio.new_event_loop()  # one loop for the engine's life: its output handler runs on it
    asyncio.set_event_loop(loop)
    eng = AsyncLLM.from_engine_args(args)
    yield eng, path, loop
    eng.shutdown()
    # shutdown() cancels the output handler from outside the loop: let the loop finish the cancelled tasks,
    # or they are reported as destroyed while pending at interpreter exit.
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    asyncio.set_event_loop(None)
    del eng
    gc.collect()


def held_blocks() -> float:
    """vllm_sinks:held_blocks as the SINKS stat logger last recorded it in this process."""
    from prometheus_client import REGISTRY

    for metric in REGISTRY.collect():
        if metric.name == "vllm_sinks:held_blocks":
            return sum(s.value for s in metric.samples)
    raise AssertionError("no vllm_sinks:held_blocks metric")


async def settle() -> float:
    """Held blocks once the engine has logged a step after the last change."""
    await asyncio.sleep(1.5)
    return held_blocks()


def reference_check(path: str, turns: list[tuple[list[int], list[int]]], limit: int) -> int:
    """Runs the reference once over the stream of (message, reply) turns up to `limit` tokens; at each reply
    token, the reference's argmax must be that token (or a genuine tie). Returns the tokens checked."""
    from reference import StreamingLlama

    ref = StreamingLlama(path, S, W)
    ref.reset()
    logits, seen, checked = None, 0, 0
    for message, reply in turns:
        for tok in message:
            logits = ref.step(tok)
            seen += 1
        for i, tok in enumerate(reply):
            top2 = torch.topk(logits, 2)
            if int(top2.indices[0]) != tok:
                assert (top2.values[0] - top2.values[1]).item() < 1e-4, f"reply token differs at {seen}"
            checked += 1
            if i == len(reply) - 1:
                break  # the last sampled token is not part of the stream
            logits = ref.step(tok)
            seen += 1
        if seen >= limit:
            break
    return checked


def test_session_equals_one_streamingllm_stream_and_returns_its_blocks(engine):
    from vllm_sinks.sessions import Session, SessionBusyError, SessionClosedError

    eng, path, loop = engine

    async def run():
        g = torch.Generator().manual_seed(3)
        messages = [torch.randint(3, 380, (n,), generator=g).tolist() for n in (100, 50, 70, 30, 90)]
        session = Session(eng, temperature=0.0, ignore_eos=True)
        turns = []
        for m, max_tokens in zip(messages, (20, 4, 25, 1, 20), strict=True):  # own limits: vllm#37842
            async for reply in session.send(m, max_tokens=max_tokens):  # noqa: B007 - the last one is kept
                pass
            assert reply.finish_reason == "length" and len(reply.token_ids) == max_tokens
            turns.append((m, reply.token_ids))
        held_open = await settle()
        # A second message while a reply streams is refused; the first reply goes on.
        first = session.send(messages[0], max_tokens=30)
        await first.__anext__()
        with pytest.raises(SessionBusyError):
            await session.send(messages[1]).__anext__()
        async for _ in first:
            pass
        await session.close()
        with pytest.raises(SessionClosedError):
            await session.send(messages[0]).__anext__()
        held_closed = await settle()
        # A client that goes away mid-reply: the session is aborted and returns its blocks.
        other = Session(eng, temperature=0.0, ignore_eos=True)
        async for _ in other.send(messages[0], max_tokens=10):
            pass
        gen = other.send(messages[1], max_tokens=50)
        await gen.__anext__()
        await gen.aclose()
        held_aborted = await settle()
        return turns, held_open, held_closed, held_aborted

    turns, held_open, held_closed, held_aborted = loop.run_until_complete(run())
    stream_len = sum(len(m) + len(r) - 1 for m, r in turns)
    print(f"stream {stream_len} tokens; blocks held open {held_open}, after close {held_closed}, "
          f"after an abandoned reply {held_aborted}")  # fmt: skip
    assert stream_len > 5 * (S + W)
    assert 0 < held_open <= 1 + -(-(W + 2 + 1) // B) + 1  # the live session holds its resumable state
    assert held_closed == 0 and held_aborted == 0
    assert reference_check(path, turns, stream_len) == sum(len(r) for _, r in turns)


def test_50k_token_session_turn_time_stays_flat(engine):
    from vllm_sinks.sessions import Session

    eng, path, loop = engine

    async def run():
        g = torch.Generator().manual_seed(5)
        session = Session(eng, temperature=0.0, ignore_eos=True)
        turns, times, total = [], [], 0
        while total < 50_000:
            m = torch.randint(3, 380, (80,), generator=g).tolist()
            t0 = time.perf_counter()
            async for reply in session.send(m, max_tokens=20):  # noqa: B007 - the last one is kept
                pass
            times.append(time.perf_counter() - t0)
            turns.append((m, reply.token_ids))
            total += len(m) + len(reply.token_ids) - 1
        held = await settle()
        await session.close()
        return turns, times, total, held

    turns, times, total, held = loop.run_until_complete(run())
    first, last = sorted(times[1:11])[4:6], sorted(times[-10:])[4:6]  # medians of 10 (turn 0: warm-up)
    ratio = (sum(last) / 2) / (sum(first) / 2)
    print(f"{len(turns)} turns, {total} tokens: median turn {sum(first) / 2 * 1e3:.1f} ms (turns 1-10) vs "
          f"{sum(last) / 2 * 1e3:.1f} ms (last 10), x{ratio:.2f}; blocks held {held}")  # fmt: skip
    assert total >= 50_000 and ratio < 1.2
    assert held <= 1 + -(-(W + 2 + 1) // B) + 1
    assert reference_check(path, turns, 2000) >= 2000 // 100 * 20


def test_session_tokens_mirror_appends_and_refuse_a_rewritten_prompt():
    """The int32 hand-off (vllm_sinks.session_tokens): each view equals the prompt; an earlier view is not
    changed by later growth; a prompt that shrank or changed where it was mirrored is refused."""
    from vllm_sinks.session_tokens import SessionTokens

    tokens, prompt = SessionTokens(), list(range(5))
    first = tokens.view(prompt)
    prompt += list(range(5, 3000))
    second = tokens.view(prompt)
    assert first.tolist() == list(range(5)) and second.tolist() == prompt and second.dtype.name == "int32"
    with pytest.raises(RuntimeError, match="rewritten"):
        tokens.view(prompt[:10])
    with pytest.raises(RuntimeError, match="rewritten"):
        tokens.view(prompt[:-1] + [7, 8])


def test_session_view_goes_to_model_runner_v2_only_at_a_turns_start():
    """Model runner V2 takes a new request's every token id (`prefill_token_ids`): a tracked session gets the
    int32 view there when those ids are its prompt (a turn's start), vLLM's list otherwise (output ids too,
    e.g. preempted mid-reply); an untracked request always gets vLLM's."""
    from types import SimpleNamespace

    from vllm_sinks.session_tokens import SessionTokens, prefill_for_worker

    prompt = list(range(100))
    request = SimpleNamespace(prompt_token_ids=prompt, _all_token_ids=list(prompt))
    view = SessionTokens().view(prompt)
    assert prefill_for_worker(request, request._all_token_ids, view) is view
    request._all_token_ids.append(7)  # an output id
    assert prefill_for_worker(request, request._all_token_ids, view) is request._all_token_ids
    assert prefill_for_worker(request, list(prompt), view) is not view  # not the request's own ids
    assert prefill_for_worker(request, request._all_token_ids, prompt) is request._all_token_ids
