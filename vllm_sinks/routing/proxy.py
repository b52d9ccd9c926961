"""An OpenAI-compatible router in front of N `vllm serve --attention-backend SINKS` replicas that sends every
turn of a chat to the replica holding its state (routing.affinity).

Routes: POST /v1/chat/completions and /v1/completions by chat key; POST /v1/sessions placed by key and the
session remembered with its replica, /v1/sessions/{id}/... sent to that replica (an id the router does not
know, or whose replica died, gets a 404 that says so: never a new session elsewhere); GET /v1/sessions merged
over the replicas; GET /v1/models and other requests to any live replica; GET /health (200 while a replica
is alive); GET /metrics (the router's counters). A replica that refuses connections is marked dead and the
request goes to the chat's next choice (nothing was sent, so nothing is lost); a background check revives
it when /health answers again. `--policy power-of-two` places every request on the less loaded of two random
replicas, as Ray Serve's default router does (stock routing, for side-by-side measurements).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vllm_sinks.routing.affinity import BALANCE, AffinityTable, Replica, chat_key, token_prefix_keys

POLICIES = ("affinity", "power-of-two")
FORWARDED_HEADERS = ("content-type", "authorization", "x-session-id", "x-request-id", "accept")


def _error(status: int, message: str, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


class Router:
    """Owns the affinity table, the sessions' replicas and the HTTP client (one event loop)."""

    def __init__(self, urls: list[str], policy: str = "affinity", max_load: int = 64,
                 health_interval_s: float = 5.0, balance: float = BALANCE) -> None:  # fmt: skip
        if policy not in POLICIES:
            raise ValueError(f"--policy {policy!r}: expected one of {', '.join(POLICIES)}")
        if not balance >= 1.0:
            raise ValueError(f"--balance {balance}: must be 1.0 or more (the bound on chats per replica, as "
                             "a multiple of the mean)")  # fmt: skip
        self.table = AffinityTable.of([u.rstrip("/") for u in urls], max_load=max_load, balance=balance)
        self.policy = policy
        self.sessions: dict[str, str] = {}  # session id -> replica url
        self.health_interval_s = health_interval_s
        self.client: aiohttp.ClientSession | None = None
        self.failovers = 0
        self.keys_by_source = dict.fromkeys(("header", "user", "prefix", "none"), 0)

    # -- placement ------------------------------------------------------------------------------------------
    def choose(self, body: dict, headers: Any) -> tuple[str | None, Replica]:
        key, source = chat_key(body, headers)
        self.keys_by_source[source] += 1
        prompt = body.get("prompt")
        tokens = source == "prefix" and isinstance(prompt, list) and prompt and isinstance(prompt[0], int)
        if self.policy == "power-of-two":
            live = [r for r in self.table.replicas.values() if r.alive]
            if not live:
                raise LookupError("no replica is alive")
            return key, min(random.sample(live, min(2, len(live))), key=lambda r: r.in_flight)
        prefixes = token_prefix_keys(prompt) if tokens else []
        if prefixes:
            return key, self.table.place_tokens(prefixes)
        return key, self.table.place(key)

    # -- forwarding -----------------------------------------------------------------------------------------
    async def forward(self, request: Request, path: str, body: bytes, replica: Replica) -> Response:
        """Sends the request to `replica`; raises aiohttp.ClientConnectionError if it cannot be reached
        before the response starts."""
        assert self.client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        replica.in_flight += 1
        try:
            upstream = await self.client.request(request.method, replica.url + path, data=body or None,
                                                 headers=headers, params=request.query_params)  # fmt: skip
        except BaseException:
            replica.in_flight -= 1
            raise
        content_type = upstream.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            try:
                data = await upstream.read()
            finally:
                upstream.release()
                replica.in_flight -= 1
            return Response(data, status_code=upstream.status, media_type=content_type or None)

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for piece in upstream.content.iter_any():
                    yield piece
            finally:
                upstream.release()
                replica.in_flight -= 1

        return StreamingResponse(stream(), status_code=upstream.status, media_type=content_type)

    async def forward_chat(self, request: Request, path: str) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body or b"{}")
        except json.JSONDecodeError:
            return _error(400, "the body must be JSON", "invalid_body")
        if not isinstance(parsed, dict):
            return _error(400, "the body must be a JSON object", "invalid_body")
        tried: set[str] = set()
        while True:
            try:
                key, replica = self.choose(parsed, request.headers)
            except LookupError:
                return _error(503, "no replica is alive", "no_replica")
            if replica.url in tried:
                return _error(503, "no replica answered", "no_replica")
            tried.add(replica.url)
            try:
                return await self.forward(request, path, body, replica)
            except aiohttp.ClientConnectionError:
                # Nothing reached the replica: mark it dead and place the chat again (its next choice).
                self.table.mark_dead(replica.url)
                self.failovers += 1

    async def create_session(self, request: Request) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body or b"{}")
        except json.JSONDecodeError:
            return _error(400, "the body must be JSON", "invalid_body")
        try:
            _, replica = self.choose(parsed if isinstance(parsed, dict) else {}, request.headers)
        except LookupError:
            return _error(503, "no replica is alive", "no_replica")
        try:
            response = await self.forward(request, "/v1/sessions", body, replica)
        except aiohttp.ClientConnectionError:
            self.table.mark_dead(replica.url)
            return _error(503, f"the replica {replica.url} did not answer; retry", "replica_unreachable")
        if response.status_code == 200:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.sessions[json.loads(response.body)["id"]] = replica.url
        return response

    async def session_request(self, request: Request, sid: str, rest: str) -> Response:
        url = self.sessions.get(sid)
        if url is None:
            return _error(404, f"session {sid} is not known to this router: a live session stays on the "
                          "replica that created it (through this router); create a new one",
                          "session_not_found")  # fmt: skip
        replica = self.table.replicas[url]
        if not replica.alive:
            self.sessions.pop(sid, None)
            return _error(404, f"session {sid} was lost with its replica ({url}); create a new one",
                          "session_not_found")  # fmt: skip
        try:
            response = await self.forward(request, f"/v1/sessions/{sid}{rest}", await request.body(), replica)
        except aiohttp.ClientConnectionError:
            self.table.mark_dead(url)
            self.sessions.pop(sid, None)
            return _error(404, f"session {sid} was lost with its replica ({url}); create a new one",
                          "session_not_found")  # fmt: skip
        if request.method == "DELETE" or response.status_code == 404:
            self.sessions.pop(sid, None)
        return response

    async def list_sessions(self) -> Response:
        assert self.client is not None
        data: list = []
        for replica in self.table.replicas.values():
            if not replica.alive:
                continue
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with self.client.get(replica.url + "/v1/sessions") as r:
                    if r.status == 200:
                        data += [dict(s, replica=replica.url) for s in (await r.json())["data"]]
        return JSONResponse({"object": "list", "data": data})

    async def any_replica(self, request: Request, path: str) -> Response:
        for replica in sorted(self.table.replicas.values(), key=lambda r: (not r.alive, r.in_flight)):
            if not replica.alive:
                break
            try:
                return await self.forward(request, path, await request.body(), replica)
            except aiohttp.ClientConnectionError:
                self.table.mark_dead(replica.url)
        return _error(503, "no replica is alive", "no_replica")

    # -- health and metrics ---------------------------------------------------------------------------------
    async def check_health(self) -> None:
        assert self.client is not None
        for replica in self.table.replicas.values():
            alive = False
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                timeout = aiohttp.ClientTimeout(total=2)
                async with self.client.get(replica.url + "/health", timeout=timeout) as r:
                    alive = r.status == 200
            if alive:
                self.table.mark_alive(replica.url)
            else:
                self.table.mark_dead(replica.url)

    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    def metrics_text(self) -> str:
        lines = []

        def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP vllm_sinks_router:{name} {doc}")
            lines.append(f"# TYPE vllm_sinks_router:{name} {kind}")
            lines.extend(f"vllm_sinks_router:{name}{labels} {value}" for labels, value in samples)

        counts = self.table.counts
        metric("placements_total", "counter", "Requests placed, by kind (returning chat, new chat; of the "
               "new: balanced away from a replica holding too many chats, shed from a full one; moved from a "
               "dead replica, no key)",
               [(f'{{kind="{k}"}}', v) for k, v in counts.items()])  # fmt: skip
        metric("keys_total", "counter", "Chat keys by source (header, user, prefix, none)",
               [(f'{{source="{k}"}}', v) for k, v in self.keys_by_source.items()])  # fmt: skip
        metric("failovers_total", "counter", "Requests re-placed because their replica did not answer",
               [("", self.failovers)])  # fmt: skip
        metric("replica_alive", "gauge", "1 while the replica answers", [
            (f'{{replica="{r.url}"}}', int(r.alive)) for r in self.table.replicas.values()])  # fmt: skip
        metric("replica_in_flight", "gauge", "Requests in flight at the replica", [
            (f'{{replica="{r.url}"}}', r.in_flight) for r in self.table.replicas.values()])  # fmt: skip
        metric("sessions", "gauge", "Live sessions the router knows", [("", len(self.sessions))])
        metric("chats", "gauge", "Chats placed (keys remembered)", [("", len(self.table.placed))])
        chats = self.table.chats
        metric("replica_chats", "gauge", "Chats placed on the replica (keys remembered)",
               [(f'{{replica="{url}"}}', chats.get(url, 0)) for url in self.table.replicas])  # fmt: skip
        return "\n".join(lines) + "\n"


def build_app(router: Router) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        router.client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        task = asyncio.create_task(router.health_loop())
        try:
            yield
        finally:
            task.cancel()
            await router.client.close()

    app = FastAPI(lifespan=lifespan)
    app.state.router = router

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await router.forward_chat(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await router.forward_chat(request, "/v1/completions")

    @app.post("/v1/sessions")
    async def create_session(request: Request):
        return await router.create_session(request)

    @app.get("/v1/sessions")
    async def list_sessions():
        return await router.list_sessions()

    @app.api_route("/v1/sessions/{sid}", methods=["GET", "DELETE"])
    async def session(sid: str, request: Request):
        return await router.session_request(request, sid, "")

    @app.post("/v1/sessions/{sid}/messages")
    async def session_message(sid: str, request: Request):
        return await router.session_request(request, sid, "/messages")

    @app.get("/health")
    async def health():
        alive = any(r.alive for r in router.table.replicas.values())
        return Response(status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(router.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def other(path: str, request: Request):
        return await router.any_replica(request, "/" + path)

    return app
