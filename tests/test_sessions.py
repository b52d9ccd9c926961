"""Live sessions (vllm_sinks.sessions) on vLLM's streaming-input requests under SINKS, CPU, tiny model:

* a session fed messages M1, M2, ... gives, for each message, the reference's greedy continuation of one
  StreamingLLM stream over M1 + R1 + M2 + R2 + ... (each reply without its last sampled token, which vLLM
  never feeds back), far past S + W; each reply is as long as its own message's max_tokens;
* closing a session, or abandoning a reply mid-stream (the session is then aborted), returns every KV
  block; a second message while a reply streams is refused and the session stays usable;
* a 50,000-token session of short turns: the time per turn stays flat (10 turns past 50,000 tokens within
  20% of a fresh session's first 10, the two alternated), blocks held stay bounded, and its first 2,000
  tokens equal the reference.
"""

from __future__ import annotations

import asyncio
import gc
import time
from types import SimpleNamespace

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
    """The turns against one StreamingLLM stream over them (reference.StreamingLlama.check_session)."""
    from reference import StreamingLlama

    return StreamingLlama(path, S, W).check_session(turns, limit)


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
        # The front end keeps the session's inputs as int32 (vllm_sinks.sessions.tokens), equal to vLLM's
        # list.
        from vllm_sinks.sessions.tokens import TokenIds

        state = next(s for s in eng.output_processor.request_states.values()
                     if s.external_req_id == session.session_id)  # fmt: skip
        assert isinstance(state.prompt_token_ids, TokenIds) and state.prompt_len == sum(map(len, messages))
        assert state.prompt_token_ids == [t for m in messages for t in m]
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
    """The issue's CPU target: after 50,000 tokens a session's turns take within 20% of a session's first
    turns. The 10 last turns alternate with the 10 first turns of a fresh session, so both see the same load
    on a shared host: measured one after the other, 10-turn medians of one session wander by +-20% with no
    trend in its length (58-80 ms per 50 turns on a 2-core CI host, 2026-12-05), which failed CI once."""
    from vllm_sinks.sessions import Session

    eng, path, loop = engine
    g = torch.Generator().manual_seed(5)

    async def turn(session, turns: list | None = None) -> float:
        m = torch.randint(3, 380, (80,), generator=g).tolist()
        t0 = time.perf_counter()
        async for reply in session.send(m, max_tokens=20):  # noqa: B007 - the last one is kept
            pass
        if turns is not None:
            turns.append((m, reply.token_ids))
        return time.perf_counter() - t0

    async def run():
        session = Session(eng, temperature=0.0, ignore_eos=True)
        turns, total = [], 0
        while total < 50_000:
            await turn(session, turns)
            total += len(turns[-1][0]) + len(turns[-1][1]) - 1
        fresh = Session(eng, temperature=0.0, ignore_eos=True)
        await turn(fresh)  # its turn 0, like the engine's first turn, is not counted
        last, first = [], []
        for _ in range(10):
            last.append(await turn(session, turns))
            first.append(await turn(fresh))
        await fresh.close()
        held = await settle()
        await session.close()
        return turns, total, sorted(first)[4:6], sorted(last)[4:6], held

    turns, total, first, last, held = loop.run_until_complete(run())
    ratio = sum(last) / sum(first)  # medians of 10 turns each
    print(f"{len(turns)} turns, {total} tokens: median turn {sum(last) / 2 * 1e3:.1f} ms past 50k vs "
          f"{sum(first) / 2 * 1e3:.1f} ms (a fresh session), x{ratio:.2f}; blocks held {held}")  # fmt: skip
    assert total >= 50_000 and ratio < 1.2
    assert held <= 1 + -(-(W + 2 + 1) // B) + 1
    assert reference_check(path, turns, 2000) >= 2000 // 100 * 20


def _session_turns(tracked: bool, turns: int = 40, seed: int = 0):
    """Runs vLLM's own Request and Scheduler._update_request_as_session (as patched by the plugin) through
    `turns` turns of a live session: replies appended as the engine core appends them (the last sampled id
    never computed), then the next message. Yields the request and the update after each turn's update."""
    import random
    import time

    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request, StreamingUpdate

    from vllm_sinks import patch

    patch.apply_patches()
    rng = random.Random(seed)
    # Block hashes kept by a tracked session: 2 at the head, the last 8 to 16 (small, so that 40 turns
    # forget most; an engine derives them from S, W and its step size: session_tokens.block_hashes_to_keep).
    scheduler = SimpleNamespace(_vllm_sinks_active=tracked, log_stats=False)
    scheduler.num_waiting_for_streaming_input, scheduler._vllm_sinks_hashes_kept = 0, (2, 8)
    request = Request("s", [rng.randrange(257, 50_000) for _ in range(50)], SamplingParams(max_tokens=8),
                      None, block_hasher=get_request_block_hasher(B, sha256), resumable=True)  # fmt: skip
    for _ in range(turns):
        for _ in range(rng.randrange(1, 40)):  # the reply, one or several ids per step
            request.append_output_token_ids(rng.randrange(257, 50_000))
        request.num_computed_tokens = request.num_tokens - 1
        message = [rng.randrange(257, 50_000) for _ in range(rng.randrange(1, 300))]
        update = StreamingUpdate(mm_features=None, prompt_token_ids=message,
                                 max_tokens=rng.randrange(1, 64), arrival_time=time.time(),
                                 sampling_params=request.sampling_params)  # fmt: skip
        Scheduler._update_request_as_session(scheduler, request, update)
        yield request, update


def test_session_token_ids_are_int32_and_behave_as_vllms_lists():
    """Under SINKS a live session's Request stores its prompt and token ids as int32 TokenIds (one store):
    through vLLM's own turn updates they stay equal to the stock Request's lists, with max_tokens; its block
    hashes equal the stock ones at the head and near the end, the others read as keys of its own (bounded
    memory); the worker gets int32 views of the prompt, and a view handed out earlier is not changed by
    later turns."""
    import numpy as np
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import init_none_hash

    from vllm_sinks.sessions.tokens import SessionBlockHashes, TokenIds, prompt_for_worker

    init_none_hash(sha256)  # one root hash for both requests (it is random unless PYTHONHASHSEED is set)
    views = []
    for (stock, _), (tracked, update) in zip(_session_turns(False), _session_turns(True), strict=True):
        assert isinstance(tracked.prompt_token_ids, TokenIds) and isinstance(tracked._all_token_ids, TokenIds)
        assert type(stock.prompt_token_ids) is list
        assert tracked.prompt_token_ids == stock.prompt_token_ids
        assert list(tracked.all_token_ids) == list(stock.all_token_ids) == tracked._all_token_ids.copy()
        hashes, want = tracked.block_hashes, stock.block_hashes
        assert isinstance(hashes, SessionBlockHashes) and len(hashes) == len(want) and hashes.num_kept() <= 18
        kept = {i for i in range(len(want)) if hashes[i] == want[i]}
        assert set(range(min(2, len(want)))) | set(range(max(0, len(want) - 8), len(want))) <= kept
        forgotten = [hashes[i] for i in range(len(want)) if i not in kept]
        assert all(h.startswith(b"vllm_sinks/forgotten/s/") for h in forgotten)
        assert len(set(forgotten)) == len(forgotten) and hashes[-1] == want[-1] and hashes[:] == list(hashes)
        assert tracked.num_prompt_tokens == stock.num_prompt_tokens == len(stock.prompt_token_ids)
        assert tracked.max_tokens == update.max_tokens  # the turn's own limit (vllm-project/vllm#37842)
        view = prompt_for_worker(tracked)
        assert view.dtype == np.int32 and view.tolist() == stock.prompt_token_ids
        assert prompt_for_worker(stock) is stock.prompt_token_ids
        views.append((view, list(stock.prompt_token_ids)))
    assert all(v.tolist() == ids for v, ids in views)


def test_token_ids_list_operations_and_refusals():
    """TokenIds answers as the list would for indexing, slicing (a list), truncation, iteration and
    pickling (as a list); a write that would make the prompt stop being a prefix of all ids is refused."""
    import pickle

    from vllm_sinks.sessions.tokens import TokenIds, TokenStore

    ids = list(range(300, 3300))
    store = TokenStore(ids)
    all_ids, prompt = TokenIds(store, len(ids)), TokenIds(store, 1000)
    assert all_ids[-1] == 3299 and all_ids[5:8] == [305, 306, 307] and prompt[-2:] == [1298, 1299]
    assert 1299 in prompt and 1300 not in prompt and prompt.index(1000) == 700
    with pytest.raises(IndexError):
        prompt[1000]
    assert pickle.loads(pickle.dumps(prompt)) == ids[:1000]
    del all_ids[2000:]
    all_ids.extend([7, 8])
    assert len(all_ids) == 2002 and all_ids[-3:] == [2299, 7, 8]
    prompt.extend(range(1300, 2300))  # what all ids already hold there: accepted
    with pytest.raises(RuntimeError, match="diverged"):
        prompt.extend([9])  # all ids hold 7 there
    with pytest.raises(TypeError, match="truncation"):
        del all_ids[3]
    assert list(iter(prompt)) == ids[:2000] and not TokenIds.of([])


def test_session_view_goes_to_model_runner_v2_only_at_a_turns_start():
    """Model runner V2 takes a new request's every token id (`prefill_token_ids`): a tracked session gets the
    prompt's int32 view there when those ids are its prompt (a turn's start), an int32 copy otherwise (output
    ids too, e.g. preempted mid-reply); an untracked request always gets vLLM's list."""
    import numpy as np

    from vllm_sinks.sessions.tokens import TokenIds, TokenStore, prefill_for_worker, prompt_for_worker

    store = TokenStore(range(100))
    request = SimpleNamespace(prompt_token_ids=TokenIds(store, 100), _all_token_ids=TokenIds(store, 100))
    view = prompt_for_worker(request)
    assert prefill_for_worker(request, request._all_token_ids, view) is view
    request._all_token_ids.append(7)  # an output id
    mid_reply = prefill_for_worker(request, request._all_token_ids, view)
    assert isinstance(mid_reply, np.ndarray) and mid_reply.tolist() == list(range(100)) + [7]
    assert not np.shares_memory(mid_reply, store.array)
    stock = list(range(100))
    assert prefill_for_worker(SimpleNamespace(), stock, stock) is stock


def test_session_block_hashes_keep_head_and_tail():
    """SessionBlockHashes reads as the full list of hashes: the head and the recent tail as given, a
    forgotten index as a key unique to the session and index; its memory stays bounded."""
    from vllm_sinks.sessions.tokens import SessionBlockHashes, block_hashes_to_keep

    hashes = [bytes([i % 256]) * 32 for i in range(1000)]
    kept = SessionBlockHashes(hashes[:3], keep_head=2, keep_tail=10, tag=b"t/")
    kept.extend(hashes[3:])
    assert len(kept) == 1000 and kept.num_kept() <= 2 + 20
    assert kept[:2] == hashes[:2] and kept[-1] == hashes[-1] and kept[990] == hashes[990]
    assert kept[500] == b"t/" + (500).to_bytes(8, "little") != kept[501]
    assert kept[-3:] == hashes[-3:] and len(kept[::100]) == 10
    with pytest.raises(IndexError):
        kept[1000]
    # An engine's keep: the sink blocks + 1; the window's blocks, two steps' worth of new blocks and 8.
    assert block_hashes_to_keep(4, 4092, 8192, 16) == (2, 256 + 1024 + 8)


class _AsyncDevice:
    """A stand-in for a CUDA stream for RowStaging: a copy runs only when an event recorded after it is
    synchronized (or at flush), reading its source buffer then, as a real non-blocking copy would."""

    def __init__(self, n: int) -> None:
        import numpy as np

        self.table = np.zeros(n, dtype=np.int32)
        self.queued: list[tuple[int, torch.Tensor]] = []
        self.done = 0

    def run(self, upto: int) -> None:
        for start, source in self.queued[self.done : upto]:
            self.table[start : start + len(source)] = source.numpy()
        self.done = max(self.done, upto)

    def row(self) -> _AsyncRow:
        return _AsyncRow(self, 0)


class _AsyncRow:
    def __init__(self, device: _AsyncDevice, start: int) -> None:
        self.device, self.start = device, start

    def __getitem__(self, item: slice) -> _AsyncRow:
        return _AsyncRow(self.device, self.start + item.start)

    def copy_(self, source: torch.Tensor, non_blocking: bool = False) -> None:
        assert non_blocking
        self.device.queued.append((self.start, source))  # a view of the pinned buffer, read when it runs


class _AsyncEvent:
    def __init__(self, device: _AsyncDevice) -> None:
        self.device, self.mark = device, None

    def record(self) -> None:
        self.mark = len(self.device.queued)

    def synchronize(self) -> None:
        if self.mark is not None:
            self.device.run(self.mark)


def test_row_staging_keeps_its_buffers_and_never_overwrites_one_in_flight():
    """RowStaging (model runner V2's token rows of a live session) copies any row length through a fixed
    set of buffers: every id lands where it belongs although copies run late, and the buffers stay the same
    (number and size) however long the rows grow."""
    import numpy as np

    from vllm_sinks.sessions.tokens import RowStaging

    device = _AsyncDevice(1000)
    staging = RowStaging(
        chunk=16,
        num_buffers=2,
        new_buffer=lambda n: torch.empty(n, dtype=torch.int32),
        new_event=lambda: _AsyncEvent(device),
    )
    rng = np.random.default_rng(0)
    for length in (5, 16, 40, 333, 1000):  # one chunk, exactly one, several, many (each a turn's row)
        tokens = rng.integers(0, 50_000, length, dtype=np.int32)
        staging.write(device.row(), tokens)
        device.run(len(device.queued))
        assert np.array_equal(device.table[:length], tokens)
        assert len(staging._slots) <= 2 and staging.pinned_bytes() <= 2 * 16 * 4
    with pytest.raises(ValueError, match="chunk"):
        RowStaging(chunk=0)
