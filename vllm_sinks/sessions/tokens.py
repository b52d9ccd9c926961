"""The token ids of a live session in int32 arrays, so that a turn costs its new tokens only and the ids cost
4 bytes each, not a Python list's 8 (plus an int object of 32 bytes for every id above 256).

vLLM keeps a request's ids as Python lists: the engine core's Request has `prompt_token_ids` and
`_all_token_ids` (prompt + outputs), the front end's RequestState has `prompt_token_ids` (every input so far).
A streaming-input request (a live session) grows them forever: 72.5 bytes of host memory per session token on
an H100 host (front end + engine core). Once a request is a session under SINKS, `track` stores the engine
core's two lists as two TokenIds over one int32 TokenStore (the prompt is always a prefix of all the ids),
and `compact_front_end` the front end's as one TokenIds. TokenIds behaves as the list for everything vLLM
does with these (len, index, slices as lists, append, extend, truncation with `del ids[n:]`, copy, iterate).

vLLM also hands a resumed session to the worker as a new request with its whole history (NewRequestData's
`prompt_token_ids`, and for model runner V2 `prefill_token_ids`): Python lists converted or staged element by
element, O(history) per turn (1.42x turn time from 100k to 1M tokens on CPU; 325 ms per turn at 4M tokens on
an H100 host). `prompt_for_worker` / `prefill_for_worker` hand it int32 views instead, which it copies
(or unpickles) with one memcpy; `write_row` copies one into model runner V2's token table through a fixed
pinned staging (RowStaging), so the pinned memory does not grow with the longest session.

A session's block hashes (one per full block) likewise grow with its history; `forget_old_block_hashes`
keeps those of the sink blocks and of the blocks near the end only (SessionBlockHashes).

Invariants: the prompt's ids are a prefix of all the ids (a write into the part of the store that the other
TokenIds covers must agree with it, or it raises rather than corrupt the history); ids below the prompt's
length are never rewritten, so a view of the prompt stays valid while anyone holds it (growth allocates a new
array and leaves the old one to its holders).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

_TRACKED = "_vllm_sinks_session"


class TokenStore:
    """One growable int32 array and the lengths of the TokenIds that are prefixes of it (amortised O(1) per
    appended id). It holds no reference to its TokenIds, so a session's ids are freed with its Request."""

    __slots__ = ("array", "lengths")

    def __init__(self, ids: Iterable[int] = ()) -> None:
        self.array = np.array(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int32)
        self.lengths: list[int] = []

    def write(self, slot: int, ids: np.ndarray) -> None:
        """Appends `ids` to the TokenIds in `slot`; where another one already covers those positions they
        must hold the same ids."""
        start = self.lengths[slot]
        end = start + len(ids)
        covered = max((n for i, n in enumerate(self.lengths) if i != slot), default=0)
        agree = max(0, min(end, covered) - start)
        if agree and not np.array_equal(self.array[start : start + agree], ids[:agree]):
            raise RuntimeError(
                f"vllm_sinks: a session's prompt and token ids diverged at {start} (the prompt is expected "
                "to stay a prefix of all token ids, as vLLM's Scheduler._update_request_as_session keeps it)"
            )
        if end > self.array.shape[0]:
            grown = np.empty(max(end, self.array.shape[0] * 3 // 2, 1024), dtype=np.int32)
            grown[: self.array.shape[0]] = self.array
            self.array = grown
        self.array[start + agree : end] = ids[agree:]
        self.lengths[slot] = end


class TokenIds(Sequence):
    """A list of token ids stored as the first `len(self)` entries of a TokenStore (see module docstring).
    Slices are returned as Python lists, as the list's own would be."""

    __slots__ = ("_store", "_slot")

    def __init__(self, store: TokenStore, length: int) -> None:
        self._store = store
        self._slot = len(store.lengths)
        store.lengths.append(length)

    @property
    def _length(self) -> int:
        return self._store.lengths[self._slot]

    @classmethod
    def of(cls, ids: Iterable[int]) -> TokenIds:
        """A TokenIds with a store of its own."""
        store = TokenStore(ids)
        return cls(store, store.array.shape[0])

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self._store.array[: self._length][item].tolist()
        n = self._length
        if not -n <= item < n:
            raise IndexError("token id index out of range")
        return int(self._store.array[item % n])

    def __iter__(self) -> Iterator[int]:
        return iter(self.view().tolist())

    def __contains__(self, value: object) -> bool:
        return bool(np.any(self.view() == value)) if isinstance(value, int) else False

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenIds):
            return np.array_equal(self.view(), other.view())
        if isinstance(other, (list, tuple)):
            return len(other) == self._length and self.view().tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        n = self._length
        return f"TokenIds({self.view().tolist()!r})" if n <= 32 else f"TokenIds(<{n} ids>)"

    def __reduce__(self):  # pickles as the list it stands for
        return (list, (self.view().tolist(),))

    def view(self) -> np.ndarray:
        """The ids as a read-only int32 array (no copy)."""
        out = self._store.array[: self._length]
        out.flags.writeable = False
        return out

    def copy(self) -> list[int]:
        return self.view().tolist()

    def append(self, token_id: int) -> None:
        store, slot = self._store, self._slot
        end = store.lengths[slot]
        if end >= max(store.lengths) and end < store.array.shape[0]:  # no other view covers it; room left
            store.array[end] = token_id
            store.lengths[slot] = end + 1
        else:
            self.extend((token_id,))

    def extend(self, ids: Iterable[int]) -> None:
        values = np.asarray(ids if isinstance(ids, (list, tuple, np.ndarray)) else list(ids), dtype=np.int32)
        if len(values):
            self._store.write(self._slot, values)

    def __delitem__(self, item) -> None:
        """Only truncation (`del ids[n:]`), the one deletion vLLM makes."""
        if not isinstance(item, slice) or item.step not in (None, 1) or item.stop is not None:
            raise TypeError("TokenIds supports only truncation: del ids[n:]")
        n = self._length
        start = 0 if item.start is None else item.start
        self._store.lengths[self._slot] = max(0, min(n, start if start >= 0 else n + start))

    def clear(self) -> None:
        self._store.lengths[self._slot] = 0


class SessionBlockHashes(Sequence):
    """A live session's block hashes (vLLM's Request.block_hashes: one per full block of hash_block_size
    tokens, chained over the whole prefix) keeping only the first `keep_head` (the sink blocks) and the
    last `keep_tail` to `2 * keep_tail` (the window and the blocks a step can fill); vLLM's own list keeps
    every one, ~73 bytes per block for the session's whole history.

    Invariant: every index below len() reads as a hash; a forgotten one (between the head and the tail)
    reads as a key unique to this session and index, which no cache holds, so a prefix-cache lookup there
    misses (under SINKS those blocks left the window and were freed) and a block cached under it could never
    be found by another request. vLLM reads only recent indices while the session runs (the hasher's parent,
    newly full blocks); SINKS' own cache lookup (kv_cache.SinkWindowManager) reads the head and the run of
    blocks before the end, both kept."""

    __slots__ = ("_head", "_tail", "_offset", "_keep_head", "_keep_tail", "_tag")

    def __init__(self, hashes: Sequence[bytes], keep_head: int, keep_tail: int, tag: bytes) -> None:
        if keep_tail < 1:
            raise ValueError("keep_tail must be at least 1")
        self._head: list[bytes] = []
        self._tail: list[bytes] = []
        self._offset = 0  # index of _tail[0]
        self._keep_head, self._keep_tail, self._tag = keep_head, keep_tail, tag
        self.extend(hashes)

    def __len__(self) -> int:
        return self._offset + len(self._tail)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        n = len(self)
        if not -n <= item < n:
            raise IndexError("block hash index out of range")
        i = item % n
        if i < len(self._head):
            return self._head[i]
        if i >= self._offset:
            return self._tail[i - self._offset]
        return self._tag + i.to_bytes(8, "little")

    def append(self, block_hash: bytes) -> None:
        if not self._tail and len(self._head) < self._keep_head:
            self._head.append(block_hash)
            self._offset = len(self._head)
            return
        self._tail.append(block_hash)
        if len(self._tail) > 2 * self._keep_tail:
            drop = len(self._tail) - self._keep_tail
            del self._tail[:drop]
            self._offset += drop

    def extend(self, hashes: Iterable[bytes]) -> None:
        for block_hash in hashes:
            self.append(block_hash)

    def num_kept(self) -> int:
        return len(self._head) + len(self._tail)


def stock_handoff() -> bool:
    """VLLM_SINKS_STOCK_SESSION_HANDOFF=1 leaves vLLM's own token lists, block-id lists and hand-off of a
    session in place (for A/B benchmarks); read when the patches are installed, in each process."""
    return os.environ.get("VLLM_SINKS_STOCK_SESSION_HANDOFF") == "1"


def block_hashes_to_keep(
    sink_tokens: int, window_tokens: int, max_step_tokens: int, hash_block_size: int
) -> tuple[int, int]:
    """(keep_head, keep_tail) of SessionBlockHashes: the sink blocks (+1); the window's blocks, twice the
    blocks one step can fill (a block may be cached a step after it fills under async scheduling) and 8
    more. At most 2 * keep_tail + keep_head hashes stay per session, whatever its length."""
    from vllm.utils.math_utils import cdiv

    head = cdiv(sink_tokens, hash_block_size) + 1
    tail = cdiv(window_tokens + 1, hash_block_size) + 2 * cdiv(max_step_tokens, hash_block_size) + 8
    return head, tail


def forget_old_block_hashes(request: Any, keep_head: int, keep_tail: int) -> None:
    """Replaces a tracked session's Request.block_hashes with a SessionBlockHashes (once)."""
    hashes = request.block_hashes
    if isinstance(hashes, SessionBlockHashes):
        return
    tag = b"vllm_sinks/forgotten/" + str(request.request_id).encode() + b"/"
    request.block_hashes = SessionBlockHashes(hashes, keep_head, keep_tail, tag)


def track(request: Any) -> None:
    """Marks a resumed streaming session and stores its prompt and all-token lists as TokenIds over one int32
    store (once; O(history) then, O(new ids) per turn after). vLLM's read-only `all_token_ids` wraps the new
    storage too."""
    if getattr(request, _TRACKED, False) or request.prompt_token_ids is None:
        return
    from vllm.v1.utils import ConstantList

    all_ids, prompt = request._all_token_ids, request.prompt_token_ids
    if len(prompt) > len(all_ids) or list(all_ids[: len(prompt)]) != list(prompt):
        raise RuntimeError("vllm_sinks: a session's prompt is not a prefix of its token ids")
    store = TokenStore(all_ids)
    request._all_token_ids = TokenIds(store, len(all_ids))
    request.prompt_token_ids = TokenIds(store, len(prompt))
    request.all_token_ids = ConstantList(request._all_token_ids)
    setattr(request, _TRACKED, True)


def compact_front_end(state: Any) -> None:
    """Stores a front-end RequestState's prompt token ids (every input of a live session) as TokenIds."""
    ids = getattr(state, "prompt_token_ids", None)
    if ids is not None and not isinstance(ids, TokenIds):
        state.prompt_token_ids = TokenIds.of(ids)


def prompt_for_worker(request: Any) -> Any:
    """The prompt token ids to hand the worker for `request`: an int32 view for a tracked session, the
    request's own list otherwise."""
    ids = request.prompt_token_ids
    return ids.view() if isinstance(ids, TokenIds) else ids


def prefill_for_worker(request: Any, prefill_token_ids: Any, prompt: Any) -> Any:
    """Model runner V2's `prefill_token_ids` (the request's every token id) for `request`: for a tracked
    session the prompt's view (`prompt`, from prompt_for_worker) when the ids are exactly the prompt (a turn's
    start), else a copy of them as int32 (e.g. a session preempted mid-reply: its output ids may be rewritten
    at the next turn, so no view of them leaves the scheduler); the ids vLLM passed for any other request."""
    if not isinstance(prefill_token_ids, TokenIds):
        return prefill_token_ids
    if isinstance(prompt, np.ndarray) and len(prompt) == len(prefill_token_ids):
        return prompt
    return prefill_token_ids.view().copy()


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


class RowStaging:
    """Copies int32 token rows from host arrays into a device (or UVA) table through `num_buffers` pinned
    buffers of `chunk` ids each, reused round robin, so that the pinned memory a process holds for sessions
    stays num_buffers * chunk * 4 bytes however long they grow. (A fresh pinned tensor per row, as vLLM's
    staged writes use for their small ones, lands in torch's caching host allocator, which keeps one block
    per power-of-two size ever asked for: ~2x the longest session's ids, kept for the life of the process.)

    Invariant: a buffer is rewritten only after the copy that last read it has run (its event), and each
    copy is queued on the current stream, so it is ordered after the work already queued there, as vLLM's
    own staged writes are. A row of at most num_buffers * chunk ids never waits; a longer one waits once
    per write for the device to reach its first chunks."""

    def __init__(self, chunk: int = 1 << 20, num_buffers: int = 2, new_buffer: Any = None,
                 new_event: Any = None) -> None:  # fmt: skip
        if chunk < 1 or num_buffers < 1:
            raise ValueError("RowStaging needs chunk >= 1 and num_buffers >= 1")
        self.chunk, self.num_buffers = chunk, num_buffers
        self._new_buffer = new_buffer or _pinned_int32
        self._new_event = new_event or _cuda_event
        self._slots: list[tuple[Any, Any]] = []
        self._next = 0

    def _slot(self) -> tuple[Any, Any]:
        if len(self._slots) < self.num_buffers:
            self._slots.append((self._new_buffer(self.chunk), self._new_event()))
        slot = self._slots[self._next]
        self._next = (self._next + 1) % self.num_buffers
        return slot

    def write(self, dst: Any, tokens: np.ndarray) -> None:
        """dst[: len(tokens)] = tokens (dst: a 1-D int32 device tensor), chunk by chunk."""
        for start in range(0, len(tokens), self.chunk):
            part = tokens[start : start + self.chunk]
            buffer, event = self._slot()
            event.synchronize()  # the device has read what this buffer held (at once if never recorded)
            buffer.numpy()[: len(part)] = part
            dst[start : start + len(part)].copy_(buffer[: len(part)], non_blocking=True)
            event.record()

    def pinned_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer, _ in self._slots)


def _pinned_int32(n: int) -> Any:
    import torch

    return torch.empty(n, dtype=torch.int32, pin_memory=True)


def _cuda_event() -> Any:
    import torch

    return torch.cuda.Event()


_ROW_STAGING: RowStaging | None = None


def write_row(staged: Any, row: int, tokens: np.ndarray) -> None:
    """Writes `tokens` to row `row` of a model-runner-V2 StagedWriteTensor (`.gpu`: a device or UVA tensor)
    through the process's RowStaging (see there): bounded pinned memory, copies ordered on the current
    stream after the work already queued there."""
    global _ROW_STAGING
    if _ROW_STAGING is None:
        _ROW_STAGING = RowStaging()
    _ROW_STAGING.write(staged.gpu[row], tokens)
