"""Live sessions: one conversation as one vLLM streaming-input request that stays alive between messages.

vLLM 0.26's AsyncLLM accepts an async generator of `StreamingInput` as a prompt: the request is resumable, and
after each input it generates up to that input's max_tokens, then waits for the next input with its KV blocks
held. Under SINKS it holds exactly its resumable state (sink blocks + the blocks of its last W tokens): a
message sends and computes only its new tokens, with nothing to resend, re-hash or evict. The stream the model
sees is every input followed by its reply, except the reply's last sampled token (vLLM keeps the tokens it
computed; the last sampled one was never fed back).

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=M, attention_backend="SINKS", ...))
    session = Session(engine)
    async for text in session.send(token_ids_or_text, max_tokens=256):   # streams the reply
        print(text, end="")
    await session.close()                                               # returns every block

Invariants: at most one message is in flight per session (a second `send` while a reply streams raises
SessionBusyError); after `close()` or `abort()` the session holds no KV block and refuses messages.

Between messages a session also holds one of the engine's max_num_seqs request slots (vLLM counts sessions
waiting for input against it): keep open sessions below max_num_seqs, or every other request waits until
one closes. The HTTP server enforces that (sessions.server.SessionLimits).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count()


class SessionError(RuntimeError):
    """A session misuse; the message says what to change."""


class SessionBusyError(SessionError):
    """A message was sent while the previous reply was still streaming."""


class SessionClosedError(SessionError):
    """The session was closed or aborted."""


@dataclass
class Reply:
    """One message's reply: the text and token ids streamed so far, and why it stopped (None: streaming)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Session:
    """One live conversation on an AsyncLLM (see module docstring)."""

    def __init__(self, engine: Any, session_id: str | None = None, **sampling: Any) -> None:
        """`sampling`: SamplingParams fields used for every message (e.g. temperature=0); max_tokens is per
        message."""
        from vllm import SamplingParams

        self.engine = engine
        self.session_id = session_id or f"session-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        self._sampling = dict(sampling)
        self._inputs: asyncio.Queue = asyncio.Queue()
        self._outputs: AsyncIterator | None = None
        self._busy = False
        self._closed = False
        self.messages = 0
        self.tokens_sent = 0
        self._params = SamplingParams  # the class, for per-message params

    @property
    def busy(self) -> bool:
        """A reply is streaming (a message now would raise SessionBusyError)."""
        return self._busy

    async def _input_stream(self):
        from vllm.engine.protocol import StreamingInput

        while True:
            item = await self._inputs.get()
            if item is None:
                return
            yield item if isinstance(item, StreamingInput) else StreamingInput(**item)

    def _message_params(self, max_tokens: int):
        from vllm.sampling_params import RequestOutputKind

        return self._params(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA, **self._sampling)

    async def send(self, message: str | list[int], max_tokens: int = 256) -> AsyncIterator[Reply]:
        """Appends `message` (text, or token ids) to the session and streams the reply: yields the Reply
        after each new piece (its text and token_ids accumulate; finish_reason set on the last)."""
        from vllm.inputs import TextPrompt, TokensPrompt

        if self._closed:
            raise SessionClosedError(f"session {self.session_id} is closed; open a new one")
        if self._busy:
            raise SessionBusyError(
                f"session {self.session_id} is still streaming its previous reply; wait for it (or abort)"
            )
        self._busy = True
        try:
            prompt = TokensPrompt(prompt_token_ids=list(message)) if not isinstance(message, str) \
                else TextPrompt(prompt=message)  # fmt: skip
            params = self._message_params(max_tokens)
            await self._inputs.put({"prompt": prompt, "sampling_params": params})
            if self._outputs is None:
                self._outputs = self.engine.generate(
                    self._input_stream(), params, self.session_id
                ).__aiter__()
            self.messages += 1
            reply = Reply()
            while reply.finish_reason is None:
                out = await self._outputs.__anext__()
                piece = out.outputs[0]
                reply.text += piece.text
                reply.token_ids.extend(piece.token_ids)
                reply.finish_reason = piece.finish_reason
                if out.finished and reply.finish_reason is None:
                    reply.finish_reason = "session_finished"
                yield reply
            self.tokens_sent += len(prompt.get("prompt_token_ids", ())) + len(reply.token_ids)
        except BaseException:
            # A reply abandoned mid-stream (client gone, task cancelled): the session cannot be resumed
            # consistently, so it is aborted and returns its blocks.
            await self.abort()
            raise
        finally:
            self._busy = False

    async def close(self) -> None:
        """Ends the session: the request finishes and every KV block it held returns to the pool."""
        if self._closed:
            return
        self._closed = True
        await self._inputs.put(None)
        if self._outputs is not None:
            async for _ in self._outputs:  # drain to the final output
                pass
            self._outputs = None

    async def abort(self) -> None:
        """Ends the session at once (e.g. the client went away mid-reply); its blocks return to the pool."""
        if self._closed and self._outputs is None:
            return
        self._closed = True
        await self.engine.abort(self.session_id)
        if self._outputs is not None:
            try:
                await self._outputs.aclose()
            except Exception:
                pass
            self._outputs = None
