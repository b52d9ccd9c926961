"""Live sessions over HTTP in `vllm serve`: vLLM's endpoint plugin `sinks` (entry point group
`vllm.endpoint_plugins`, loaded when `VLLM_PLUGINS` names it, e.g. `VLLM_PLUGINS=sinks`).

    POST   /v1/sessions                 {"max_tokens"?, "temperature"?, "seed"?, ...}  -> {"id", ...}
    POST   /v1/sessions/{id}/messages   {"content": str} (a user message, chat template) or
                                        {"prompt": str} (raw text appended as is), "max_tokens"?
                                        -> text/event-stream of chat.completion.chunk objects, then [DONE]
    DELETE /v1/sessions/{id}                                                          -> {"id", "deleted"}
    GET    /v1/sessions                                                               -> {"data": [...]}

Each session is one `vllm_sinks.sessions.Session` (one streaming-input request that stays alive): a message
sends and computes only its new tokens. Errors are OpenAI-style bodies: 400 bad body, 404 unknown or closed
session, 409 a message while the previous reply still streams, 413 a message over the token limit, 429 over
the live-session cap. A client that disconnects mid-reply ends its session (it is aborted and returns every
KV block; later messages get 404). Idle sessions are closed after the idle timeout.

Settings (environment of `vllm serve`): VLLM_SINKS_MAX_SESSIONS (default 64; each live session holds up to
its block bound), VLLM_SINKS_SESSION_IDLE_S (default 600), VLLM_SINKS_MAX_MESSAGE_TOKENS (default 8192).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse
from vllm import SamplingParams

from vllm_sinks.sessions import Session, SessionBusyError, SessionClosedError
from vllm_sinks.sessions.chat_turns import chat_pieces, user_turn

_SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "allowed_token_ids",
)


@dataclass(frozen=True)
class SessionLimits:
    """Server-wide limits, read from the environment once.

    Invariant: max_sessions < the engine's max_num_seqs. A live session waiting for its next message keeps
    one of the engine's request slots (vLLM's scheduler counts sessions waiting for streaming input against
    max_num_seqs, and model runner V2 keeps their state), so sessions as many as max_num_seqs would stall
    every other request for good. The default is half the slots, at most 64."""

    max_sessions: int = 64
    idle_timeout_s: float = 600.0
    max_message_tokens: int = 8192

    @classmethod
    def from_env(
        cls, environ: dict[str, str] | None = None, max_num_seqs: int | None = None
    ) -> SessionLimits:
        env = os.environ if environ is None else environ
        raw = env.get("VLLM_SINKS_MAX_SESSIONS")
        if raw is None:
            max_sessions = cls.max_sessions
            if max_num_seqs is not None:
                max_sessions = min(max_sessions, max_num_seqs // 2)
        else:
            max_sessions = int(raw)
            if max_num_seqs is not None and not 0 <= max_sessions < max_num_seqs:
                raise ValueError(
                    f"VLLM_SINKS_MAX_SESSIONS={raw}: each live session waiting for its next message holds "
                    f"one of the engine's --max-num-seqs {max_num_seqs} request slots, so that many sessions "
                    f"would stall every other request; choose 0 to {max_num_seqs - 1} or raise --max-num-seqs"
                )
        return cls(
            max_sessions=max_sessions,
            idle_timeout_s=float(env.get("VLLM_SINKS_SESSION_IDLE_S", cls.idle_timeout_s)),
            max_message_tokens=int(env.get("VLLM_SINKS_MAX_MESSAGE_TOKENS", cls.max_message_tokens)),
        )


class HTTPError(Exception):
    """An error answered with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code}}


@dataclass
class LiveSession:
    """A registry entry: the Session, its defaults and when it was last used."""

    session: Session
    max_tokens: int
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)

    def info(self) -> dict:
        s = self.session
        return {"id": s.session_id, "object": "session", "created": int(self.created), "messages": s.messages,
                "tokens": s.tokens_sent, "streaming": s.busy}  # fmt: skip


class SessionRegistry:
    """The live sessions of one API server. Invariant: at most `limits.max_sessions` entries; an entry is
    removed when its session closes, aborts or idles out, and then holds no KV block."""

    def __init__(self, engine: Any, limits: SessionLimits, model_name: str) -> None:
        self.engine, self.limits, self.model_name = engine, limits, model_name
        self.sessions: dict[str, LiveSession] = {}
        self._reaper: asyncio.Task | None = None
        self._pieces: tuple[str, str] | None | bool = False  # False: not read yet

    def _tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    def create(self, body: dict) -> LiveSession:
        if self.limits.max_sessions == 0:
            raise HTTPError(429, "live sessions are off on this server: VLLM_SINKS_MAX_SESSIONS=0, or "
                            "--max-num-seqs below 2 (a waiting session holds a request slot); raise "
                            "--max-num-seqs", "too_many_sessions")  # fmt: skip
        if len(self.sessions) >= self.limits.max_sessions:
            raise HTTPError(429, f"{len(self.sessions)} live sessions, the cap (VLLM_SINKS_MAX_SESSIONS="
                            f"{self.limits.max_sessions}); close one (DELETE /v1/sessions/ID) or wait for an "
                            "idle one to time out", "too_many_sessions")  # fmt: skip
        sampling = {k: body[k] for k in _SAMPLING_KEYS if k in body}
        max_tokens = _positive_int(body, "max_tokens", 256)
        unknown = sorted(set(body) - set(_SAMPLING_KEYS) - {"max_tokens", "model"})
        if unknown:
            allowed = ", ".join(("max_tokens", *_SAMPLING_KEYS))
            raise HTTPError(400, f"unknown field(s) {unknown}; allowed: {allowed}", "invalid_body")
        try:  # vLLM's own checks of the values, at creation rather than at the first message
            SamplingParams(max_tokens=max_tokens, **sampling)
        except (TypeError, ValueError) as e:
            raise HTTPError(400, f"invalid sampling settings: {e}", "invalid_body") from None
        sid = f"sess-{uuid.uuid4().hex}"
        live = LiveSession(Session(self.engine, sid, **sampling), max_tokens)
        self.sessions[sid] = live
        self._ensure_reaper()
        return live

    def get(self, sid: str) -> LiveSession:
        live = self.sessions.get(sid)
        if live is None:
            raise HTTPError(404, f"no live session {sid!r} (never created, closed, idle for longer than "
                            f"{self.limits.idle_timeout_s:.0f} s, or ended by a disconnect); create one with "
                            "POST /v1/sessions", "session_not_found")  # fmt: skip
        return live

    def message_tokens(self, live: LiveSession, body: dict) -> list[int]:
        """The token ids a message appends: a user turn through the chat template ("content") or raw text
        ("prompt")."""
        tok = self._tokenizer()
        if ("content" in body) == ("prompt" in body):
            raise HTTPError(400, 'give exactly one of "content" (a user message) or "prompt" (raw text)',
                            "invalid_body")  # fmt: skip
        key = "content" if "content" in body else "prompt"
        if not isinstance(body[key], str) or not body[key]:
            raise HTTPError(400, f'"{key}" must be a non-empty string', "invalid_body")
        first = live.session.messages == 0
        if key == "prompt":
            return tok.encode(body[key], add_special_tokens=first)
        if self._pieces is False:
            self._pieces = chat_pieces(tok)
        if self._pieces is None:
            msg = 'this model has no chat template; send raw text as "prompt"'
            raise HTTPError(400, msg, "no_chat_template")
        return user_turn(tok, body[key], None if first else self._pieces)

    async def close(self, sid: str) -> None:
        live = self.sessions.pop(sid, None)
        if live is None:
            return
        if live.session.busy:
            await live.session.abort()
        else:
            await live.session.close()

    def forget(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Closes sessions idle past the timeout (never one that is streaming)."""
        while self.sessions:
            await asyncio.sleep(min(5.0, self.limits.idle_timeout_s / 4))
            now = time.monotonic()
            for sid, live in list(self.sessions.items()):
                if not live.session.busy and now - live.last_used > self.limits.idle_timeout_s:
                    await self.close(sid)


def _positive_int(body: dict, key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HTTPError(400, f'"{key}" must be a positive integer, got {value!r}', "invalid_body")
    return value


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise HTTPError(400, "the body must be a JSON object", "invalid_body") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object", "invalid_body")
    return body


def build_router() -> APIRouter:
    router = APIRouter()

    def registry(request: Request) -> SessionRegistry:
        reg = getattr(request.app.state, "sinks_sessions", None)
        if reg is None:
            raise HTTPError(503, "sessions need an engine (this server has none)", "no_engine")
        return reg

    def answer(err: HTTPError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @router.post("/v1/sessions")
    async def create_session(request: Request):
        try:
            live = registry(request).create(await _json_body(request))
        except HTTPError as e:
            return answer(e)
        return JSONResponse(live.info())

    @router.get("/v1/sessions")
    async def list_sessions(request: Request):
        try:
            reg = registry(request)
        except HTTPError as e:
            return answer(e)
        return JSONResponse({"object": "list", "data": [s.info() for s in reg.sessions.values()],
                             "max_sessions": reg.limits.max_sessions})  # fmt: skip

    @router.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str, request: Request):
        try:
            reg = registry(request)
            reg.get(sid)
        except HTTPError as e:
            return answer(e)
        await reg.close(sid)
        return JSONResponse({"id": sid, "object": "session.deleted", "deleted": True})

    @router.post("/v1/sessions/{sid}/messages")
    async def send_message(sid: str, request: Request):
        try:
            reg = registry(request)
            live = reg.get(sid)
            body = await _json_body(request)
            if live.session.busy:
                raise HTTPError(409, f"session {sid} is still streaming its previous reply; wait for its "
                                "[DONE] before sending the next message", "session_busy")  # fmt: skip
            max_tokens = _positive_int(body, "max_tokens", live.max_tokens)
            ids = reg.message_tokens(live, body)
            if len(ids) > reg.limits.max_message_tokens:
                limit = reg.limits.max_message_tokens
                raise HTTPError(413, f"the message is {len(ids)} tokens, over the limit of {limit} "
                                "(VLLM_SINKS_MAX_MESSAGE_TOKENS); split it into several messages",
                                "message_too_long")  # fmt: skip
        except HTTPError as e:
            return answer(e)
        live.last_used = time.monotonic()
        replies = live.session.send(ids, max_tokens=max_tokens)
        try:  # the first piece before the response starts: a refusal still gets its status code
            first = await replies.__anext__()
        except SessionBusyError as e:
            return answer(HTTPError(409, str(e), "session_busy"))
        except SessionClosedError as e:
            reg.forget(sid)
            return answer(HTTPError(404, str(e), "session_not_found"))
        except StopAsyncIteration:
            first = None
        except Exception as e:  # the engine refused the input (e.g. the stream limit): the session is aborted
            reg.forget(sid)
            return answer(HTTPError(400, f"the engine refused the message ({e}); the session was closed",
                                    "engine_refused"))  # fmt: skip

        created = int(time.time())

        def chunk(delta: dict, finish: str | None) -> str:
            obj = {"id": f"{sid}-{live.session.messages}", "object": "chat.completion.chunk",
                   "created": created, "model": reg.model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            sent, done = 0, False
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                pieces = [first] if first is not None else []
                for reply in pieces:
                    yield chunk({"content": reply.text[sent:]}, reply.finish_reason)
                    sent = len(reply.text)
                async for reply in replies:  # runs send() to its end, so the session is free afterwards
                    if len(reply.text) > sent or reply.finish_reason:
                        yield chunk({"content": reply.text[sent:]}, reply.finish_reason)
                        sent = len(reply.text)
                yield "data: [DONE]\n\n"
                done = True
            except Exception as e:  # the engine failed mid-reply: send() aborted the session; say so
                err = HTTPError(500, f"the reply failed ({e}); the session was closed", "engine_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                live.last_used = time.monotonic()
                if not done:  # the client went away mid-reply: send() aborts the session (its blocks return)
                    await replies.aclose()
                    reg.forget(sid)

        return StreamingResponse(events(), media_type="text/event-stream")

    return router


_GAUGE: list = []


def _live_sessions_gauge(registry: SessionRegistry) -> None:
    """`vllm_sinks:live_sessions` on the API server's /metrics, read from the registry when scraped."""
    from prometheus_client import Gauge

    if not _GAUGE:
        _GAUGE.append(Gauge("vllm_sinks:live_sessions", "Live sessions (POST /v1/sessions) on this server"))
        _GAUGE.append(Gauge("vllm_sinks:max_sessions", "The live-session cap (VLLM_SINKS_MAX_SESSIONS)"))
    _GAUGE[0].set_function(lambda: len(registry.sessions))
    _GAUGE[1].set(registry.limits.max_sessions)


class SinksSessionsPlugin:
    """vLLM endpoint plugin (vllm.plugins.endpoint_plugins.interface.EndpointPlugin) serving /v1/sessions."""

    name = "sinks"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        app.include_router(build_router())

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return
        names = getattr(args, "served_model_name", None) or [getattr(args, "model", "model")]
        max_num_seqs = engine_client.vllm_config.scheduler_config.max_num_seqs
        limits = SessionLimits.from_env(max_num_seqs=max_num_seqs)
        state.sinks_sessions = SessionRegistry(engine_client, limits, names[0])
        _live_sessions_gauge(state.sinks_sessions)
