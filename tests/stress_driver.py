"""The random traffic of the stress tests (tests/test_stress.py on the CPU, tests/test_gpu_stress.py on a
GPU): bursts of arrivals up to and past max_num_seqs (fresh chats, chats resumed from the cache with their
whole history plus new tokens, regenerates of a finished prompt, live sessions' next turns), aborts of
waiting, prefilling and decoding requests, and forced preemption (every free block taken away for a few
steps), driven through an in-process engine core; arrivals pause while 4 x max_num_seqs + 8 requests are in
flight, so the queue stays bounded and every step schedules a full batch. `Driver.run` checks at every
step, inside the scheduler: no request holds more real blocks than SinksConfig.max_blocks_per_request; with
a V2BlockTableMirror, V2's table holds the scheduler's id wherever the scheduler holds a real block.
`check_alone` serves finished streams alone."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

TIE = 1e-4
CHECKED_REQUESTS = 40  # finished requests (a seeded sample) served alone at the end, besides every session
SESSION_TOKENS = 5000  # a live session this long ends; a new one takes its place


@dataclass
class Tracked:
    """A request the driver added: its stream so far and what to check it against."""

    tokens: list[int]
    max_tokens: int
    session: str | None = None
    out: list[int] = field(default_factory=list)


class Driver:
    """Random traffic against one in-process engine core (see the module docstring)."""

    def __init__(
        self,
        llm: Any,
        rng: random.Random,
        mirror: Any,
        sparse: bool,
        sinks: tuple[int, int],
        max_model_len: int,
    ) -> None:
        from vllm_sinks.config import SinksConfig
        from vllm_sinks.kv.capacity import request_in_flight_tokens
        from vllm_sinks.kv.introspection import scheduler_of, sink_managers
        from vllm_sinks.sessions.server import SessionLimits

        self.llm, self.rng, self.mirror, self.max_model_len = llm, rng, mirror, max_model_len
        self.client = llm.llm_engine.engine_core
        self.tasks = self.client.get_supported_tasks()
        self.scheduler = scheduler_of(llm)
        (self.manager,) = sink_managers(llm)
        self.pool = self.manager.block_pool
        self.max_seqs = self.scheduler.scheduler_config.max_num_seqs
        # Arrivals pause while this many requests are in flight: the traffic outruns the engine (about 0.3
        # arrivals a step), and an unbounded queue (300-400 requests after 2,000 steps) only lengthened the
        # final drain (4,500-9,500 steps of no new traffic) without adding a kind of step.
        self.in_flight_cap = 4 * self.max_seqs + 8
        # Live sessions as the HTTP server caps them: a session waiting for input holds a request slot.
        self.max_sessions = SessionLimits.from_env({}, self.max_seqs).max_sessions
        in_flight = request_in_flight_tokens(self.scheduler.vllm_config)
        block_size = self.scheduler.vllm_config.cache_config.block_size
        self.bound = SinksConfig(*sinks).max_blocks_per_request(block_size, in_flight)
        kv = self.scheduler.kv_cache_manager
        self.heads = kv._vllm_sinks_row_heads
        assert self.heads is not None, "SINKS' sparse rows are not set up in this scheduler"
        kv._vllm_sinks_row_heads = self.heads if sparse else None
        self.live: dict[str, Tracked] = {}
        self.done: list[Tracked] = []  # finished plain requests
        self.sessions: dict[str, list[tuple[list[int], list[int]]]] = {}  # id -> turns (message, reply)
        self.idle_sessions: list[str] = []
        self.ended_sessions: list[str] = []
        self.aborted: set[str] = set()
        self.hogged: list = []
        self.hog_until = -1
        self.n = 0
        names = ("requests", "finished", "aborted_waiting", "aborted_prefill", "aborted_decode", "preempted",
                 "resumed_chats", "regenerates", "session_turns", "sparse_rows", "max_in_flight",
                 "drain_steps")  # fmt: skip
        self.stats = dict.fromkeys(names, 0)
        self.fallbacks = 0
        self._wrap_scheduler()

    # --- the per-step checks, inside the scheduler ---
    def _wrap_scheduler(self) -> None:
        from vllm_sinks.kv import block_rows

        scheduler, original_schedule = self.scheduler, self.scheduler.schedule
        original_preempt = scheduler._preempt_request
        original_stage = block_rows.stage_into_block_tables

        def schedule(*args, **kwargs):
            out = original_schedule(*args, **kwargs)
            for data in out.scheduled_new_reqs:
                self.stats["sparse_rows"] += isinstance(data.block_ids[0], block_rows.SparseBlockRow)
            if self.mirror is not None:
                self.mirror.step(out)
            self._check_rows()
            return out

        def preempt(request, timestamp):
            self.stats["preempted"] += 1
            return original_preempt(request, timestamp)

        def stage(tables, index, rows):
            staged = original_stage(tables, index, rows)
            self.fallbacks += not staged
            return staged

        scheduler.schedule, scheduler._preempt_request = schedule, preempt
        block_rows.stage_into_block_tables = stage
        self._restore = lambda: (
            setattr(scheduler, "schedule", original_schedule),
            setattr(scheduler, "_preempt_request", original_preempt),
            setattr(block_rows, "stage_into_block_tables", original_stage),
        )

    def _check_rows(self) -> None:
        rows = self.mirror.rows() if self.mirror is not None else {}
        for req_id, blocks in self.manager.req_to_blocks.items():
            real = [(i, b.block_id) for i, b in enumerate(blocks) if not b.is_null]
            assert len(real) <= self.bound, f"{req_id} holds {len(real)} blocks (bound {self.bound})"
            if req_id in rows:
                row = rows[req_id]
                assert len(row) == len(blocks), f"{req_id}: V2 row of {len(row)} ids, scheduler {len(blocks)}"
                bad = [(i, row[i], b) for i, b in real if row[i] != b]
                assert not bad, f"{req_id}: V2 table differs at (index, table, scheduler) {bad[:4]}"

    # --- traffic ---
    def _tokens(self, lo: int, hi: int) -> list[int]:
        return [self.rng.randrange(3, 380) for _ in range(self.rng.randrange(lo, hi))]

    def _send(self, req_id: str, tokens: list[int], max_tokens: int, resumable: bool = False) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        request = self.llm.llm_engine.input_processor.process_inputs(
            request_id=req_id, prompt=TokensPrompt(prompt_token_ids=list(tokens)), params=params,
            supported_tasks=self.tasks, resumable=resumable,
        )  # fmt: skip
        self.client.add_request(request)

    def _arrival(self, returning: bool = False) -> None:
        """One new request: a live session's turn, a chat resumed or regenerated from a finished one, or a
        fresh chat; `returning`: a finished chat comes back (a burst of returns is how many clients resume
        after a network blip or a front-end restart)."""
        rng, self.n = self.rng, self.n + 1
        kind = 0.3 if returning else rng.random()
        max_tokens = rng.choice([1, 4, 12, 40, 80])
        room = len(self.sessions) - len(self.ended_sessions) < self.max_sessions
        if kind < 0.2 and (self.idle_sessions or room):
            if self.idle_sessions and (not room or rng.random() < 0.8):
                sid = self.idle_sessions.pop(rng.randrange(len(self.idle_sessions)))
                message = self._tokens(5, 120)
                if sum(len(m) + len(r) for m, r in self.sessions[sid]) > SESSION_TOKENS:
                    self._send(sid, [0], 1)  # the end of its input stream
                    self.ended_sessions.append(sid)
                    return
            else:
                sid, message = f"sess{self.n}", self._tokens(20, 400)
                self.sessions[sid] = []
            self.sessions[sid].append((message, []))
            self.live[sid] = Tracked(message, max_tokens, session=sid)
            self._send(sid, message, max_tokens, resumable=True)
            self.stats["session_turns"] += 1
            return
        req_id = f"r{self.n}"
        if kind < 0.55 and self.done:
            past = rng.choice(self.done)
            if rng.random() < 0.3:  # a regenerate: the same prompt again
                tokens = past.tokens
                self.stats["regenerates"] += 1
            else:  # the chat's next turn: its whole history and a new message
                tokens = past.tokens + past.out + self._tokens(5, 40 if returning else 150)
                self.stats["resumed_chats"] += 1
            if len(tokens) + max_tokens >= self.max_model_len:
                tokens = self._tokens(20, 400)
        else:
            tokens = self._tokens(10, 600)
        self.live[req_id] = Tracked(tokens, max_tokens)
        self._send(req_id, tokens, max_tokens)
        self.stats["requests"] += 1

    def _abort(self) -> None:
        """Aborts a request the scheduler holds: most often a running one (mid-prefill or mid-decode)."""
        running = [r.request_id for r in self.scheduler.running if r.request_id in self.live]
        held = [r for r in self.live if r in self.scheduler.requests]
        if running and self.rng.random() < 0.8:
            held = running
        if not held:
            return
        req_id = self.rng.choice(held)
        request = self.scheduler.requests[req_id]
        if req_id not in running:
            phase = "waiting"
        else:
            phase = "prefill" if request.num_computed_tokens < request.num_prompt_tokens else "decode"
        self.client.abort_requests([req_id])
        tracked = self.live.pop(req_id)
        self.aborted.add(req_id)
        self.stats[f"aborted_{phase}"] += 1
        if tracked.session is not None:  # aborting a session ends it
            self.sessions.pop(tracked.session)

    def _collect(self, outputs) -> None:
        for o in outputs:
            tracked = self.live.get(o.request_id)
            if tracked is None:
                continue
            tracked.out += o.new_token_ids
            if o.finish_reason is None:
                continue
            del self.live[o.request_id]
            self.stats["finished"] += 1
            if tracked.session is not None:
                self.sessions[tracked.session][-1] = (tracked.tokens, tracked.out)
                self.idle_sessions.append(tracked.session)
            else:
                self.done.append(tracked)

    def _pressure(self, step: int) -> None:
        if self.hogged and step >= self.hog_until:
            self.pool.free_blocks(self.hogged)
            self.hogged = []
        elif not self.hogged and self.rng.random() < 0.03:
            self.hogged = self.pool.get_new_blocks(self.pool.get_num_free_blocks())
            self.hog_until = step + self.rng.randrange(2, 16)

    def _drain(self) -> None:
        for _ in range(20_000):
            if not self.live:
                return
            self._collect(self.client.get_output().outputs)
            self.stats["drain_steps"] += 1

    def returning_burst(self, n: int) -> None:
        """n fresh chats of 300-600 tokens run to their end, then all n come back at once, each with its whole
        history and a short message: the step that resumes them hands the worker n sparse rows (the H100
        crash of 5422dd8 with n = max_num_seqs = 32)."""
        for returning in (False, True):
            finished = self.done[-n:] if returning else []
            for i in range(n):
                self.n += 1
                if returning:
                    tokens = finished[i].tokens + finished[i].out + self._tokens(5, 20)
                else:
                    tokens = self._tokens(300, 600)
                self.live[f"r{self.n}"] = Tracked(tokens, 8)
                self._send(f"r{self.n}", tokens, 8)
                self.stats["requests"] += 1
                self.stats["resumed_chats"] += returning
            self._drain()

    def run(self, steps: int) -> dict:
        """One returning burst of max_num_seqs chats, then `steps` steps of random traffic, then a drain."""
        rng = self.rng
        try:
            self.returning_burst(self.max_seqs)
            for step in range(steps):
                if len(self.live) >= self.in_flight_cap:
                    pass  # the queue is full: no arrivals this step
                elif rng.random() < 0.06:  # a burst: up to 1.5 x max_num_seqs arrivals at once
                    returning = rng.random() < 0.5
                    for _ in range(rng.randrange(1, max(2, 3 * self.max_seqs // 2 + 1))):
                        self._arrival(returning)
                elif rng.random() < 0.15:
                    self._arrival()
                if rng.random() < 0.03:
                    self._abort()
                self._pressure(step)
                self._collect(self.client.get_output().outputs)
                self.stats["max_in_flight"] = max(self.stats["max_in_flight"], len(self.live))
            self.pool.free_blocks(self.hogged)
            self.hogged = []
            self._drain()  # every request runs to its end
            statuses = [(r, str(q.status), q.num_computed_tokens) for r, q in self.scheduler.requests.items()]
            assert not self.live, (
                f"requests never finished: {list(self.live)[:5]}; running {len(self.scheduler.running)}, "
                f"free blocks {self.pool.get_num_free_blocks()}, sessions idle {self.idle_sessions}, "
                f"requests (id, status, computed tokens) {statuses[:8]}"
            )
            for sid in list(self.idle_sessions):  # end the input streams
                self._send(sid, [0], 1)
                self.ended_sessions.append(sid)
            for _ in range(5):
                self.client.get_output()
        finally:
            self.pool.free_blocks(self.hogged)
            self._restore()
        return self.stats

    # --- the end-of-run checks ---
    def check_end(self, free_before: int) -> None:
        """After `run`: the scheduler holds no request and no block, every block is back in the pool, and no
        sparse row fell back to a list for want of staging room. Restores the scheduler's sparse rows."""
        self.scheduler.kv_cache_manager._vllm_sinks_row_heads = self.heads
        assert not self.scheduler.requests and not self.manager.req_to_blocks
        assert self.pool.get_num_free_blocks() == free_before
        assert self.fallbacks == 0

    def streams(self) -> list[tuple[list[int], dict[int, int]]]:
        """(stream, {position: token the engine must have chosen given stream[:position]}) for every finished
        request and every session's replies (a session's stream leaves each reply's last token out)."""
        checks = []
        for t in self.rng.sample(self.done, min(len(self.done), CHECKED_REQUESTS)):
            stream = t.tokens + t.out
            checks.append((stream, {len(t.tokens) + i: tok for i, tok in enumerate(t.out)}))
        for turns in self.sessions.values():
            stream: list[int] = []
            expected: dict[int, int] = {}
            complete = [(m, r) for m, r in turns if r]
            for k, (message, reply) in enumerate(complete):
                stream += message
                expected.update({len(stream) + i: tok for i, tok in enumerate(reply)})
                stream += reply if k == len(complete) - 1 else reply[:-1]
            if expected:
                checks.append((stream, expected))
        return checks


def check_alone(
    llm: Any, checks: list[tuple[list[int], dict[int, int]]], tie: float = TIE
) -> tuple[int, int]:
    """Serves each stream alone (teacher-forced, prompt log-probabilities, top 2) and checks every expected
    token is the argmax there or within `tie` of it. Returns (tokens checked, ties)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2, detokenize=False)
    checked = ties = 0
    for stream, expected in checks:
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=stream)], params, use_tqdm=False)
        for pos, tok in expected.items():
            dist = out.prompt_logprobs[pos]
            best = max(dist.values(), key=lambda lp: lp.logprob)
            got = dist.get(tok)
            assert got is not None and best.logprob - got.logprob < tie, (
                f"position {pos} of a {len(stream)}-token stream: the engine chose {tok} under load, "
                f"{ {t: round(lp.logprob, 6) for t, lp in dist.items()} } alone"
            )
            ties += got.rank != 1
            checked += 1
    return checked, ties
