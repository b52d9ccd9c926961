"""The history of a live session as one growing int32 array, so that a turn costs its new tokens only.

vLLM resumes a streaming-input request by extending its prompt (Scheduler._update_request_as_session) and
handing it to the worker again as a new request with its whole history: NewRequestData carries
`request.prompt_token_ids` (a Python list), pickled to the worker under a multiprocess executor, and the
worker's InputBatch.add_request converts it element by element into its token row. Every turn of a session
that has seen n tokens therefore costs O(n) Python work however short the message is (1.42x turn time from
100k to 1M tokens, measured on CPU). SessionTokens mirrors the prompt in an int32 array that each turn
extends by the ids appended since the last one; the worker receives a view of it, which it copies (or
unpickles) with one memcpy.

vLLM's model runner V2 (the default on CUDA for most models) takes the history as NewRequestData's
`prefill_token_ids` (the request's every token id) and stages it through a Python list into its token table:
O(n) per turn again (325 ms at 4M tokens on an H100 host). At the start of a turn those ids are the prompt,
so the same view goes there, and `write_row` copies it into the runner's table with one pinned host-to-device
copy.

Invariant: `array[:n] == request.prompt_token_ids[:n]` for the n ids mirrored so far. It holds because vLLM
only ever appends to a session's prompt; `view` checks the length and the last mirrored id, and refuses
anything else rather than hand the worker a wrong history.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_ATTR = "_vllm_sinks_session_tokens"


class SessionTokens:
    """An append-only int32 mirror of one request's prompt token ids (amortised O(1) per appended id)."""

    __slots__ = ("_array", "_length")

    def __init__(self) -> None:
        self._array = np.empty(0, dtype=np.int32)
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def view(self, prompt_token_ids: list[int]) -> np.ndarray:
        """Mirrors the ids appended to `prompt_token_ids` since the last call; returns the whole prompt as a
        read-only int32 view (valid as long as the caller holds it: later growth never writes inside it)."""
        n, mirrored = len(prompt_token_ids), self._length
        if n < mirrored or (mirrored and prompt_token_ids[mirrored - 1] != self._array[mirrored - 1]):
            raise RuntimeError(
                f"vllm_sinks: a session's prompt was rewritten ({mirrored} ids mirrored, {n} now); vLLM is "
                "expected to only append to a streaming-input request's prompt"
            )
        if n > self._array.shape[0]:
            grown = np.empty(max(n, 2 * self._array.shape[0], 1024), dtype=np.int32)
            grown[:mirrored] = self._array[:mirrored]
            self._array = grown
        self._array[mirrored:n] = prompt_token_ids[mirrored:]
        self._length = n
        out = self._array[:n]
        out.flags.writeable = False
        return out


def track(request: Any) -> None:
    """Marks a resumed streaming session: from now on the worker gets its prompt as an int32 view."""
    if getattr(request, _ATTR, None) is None:
        setattr(request, _ATTR, SessionTokens())


def prefill_for_worker(request: Any, prefill_token_ids: Any, prompt: Any) -> Any:
    """Model runner V2's `prefill_token_ids` for `request`: `prompt` (the view prompt_for_worker returned)
    when the request is a tracked session at the start of a turn (its token ids are then exactly its prompt),
    the ids vLLM passed otherwise (e.g. a session preempted mid-reply also has output ids)."""
    if (
        isinstance(prompt, np.ndarray)
        and prefill_token_ids is getattr(request, "_all_token_ids", None)
        and len(prefill_token_ids) == len(prompt)
    ):
        return prompt
    return prefill_token_ids


class UnstagedTokens:
    """Stands in for a token row that `write_row` writes directly instead of vLLM's staged writes: it has the
    row's length, and StagedWriteTensor.stage_write sees it as empty (`if not x: return`)."""

    __slots__ = ("_length",)

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return False

    def __iter__(self):
        return iter(())


def write_row(staged: Any, row: int, tokens: np.ndarray) -> None:
    """Writes `tokens` to row `row` of a model-runner-V2 StagedWriteTensor (`.gpu`: a device or UVA tensor)
    with one copy into pinned memory and one non-blocking host-to-device copy on the current stream, so it is
    ordered after the work already queued there, as vLLM's own staged writes are."""
    import torch

    pinned = torch.empty(len(tokens), dtype=torch.int32, pin_memory=True)
    pinned.numpy()[:] = tokens
    staged.gpu[row, : len(tokens)].copy_(pinned, non_blocking=True)


def prompt_for_worker(request: Any) -> Any:
    """The prompt token ids to hand the worker for `request`: an int32 view for a tracked session, the
    request's own list otherwise."""
    tokens: SessionTokens | None = getattr(request, _ATTR, None)
    if tokens is None or request.prompt_token_ids is None:
        return request.prompt_token_ids
    return tokens.view(request.prompt_token_ids)
