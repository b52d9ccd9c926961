"""Where a live session's host memory goes, for diagnosis only (not part of the plugin).

Put this folder on PYTHONPATH and set VLLM_SINKS_MEMORY_PROBE=FILE: the engine core appends one JSON line
to FILE.<pid> at a session input each time the session has grown by VLLM_SINKS_MEMORY_PROBE_EVERY tokens
(default 262144) since the last line: the session's length, the process's /proc/self/smaps_rollup (Rss,
Anonymous, ...), resident kB by kind of mapping ([heap], anonymous, /dev/shm, files, the NVIDIA driver's
device files), glibc's mallinfo2 (arena: the malloc heap; uordblks / fordblks: in use / free in it; hblkhd:
mmapped chunks), torch's pinned host allocator (torch.cuda.host_memory_stats, bytes) and the pinned bytes of
session_tokens.RowStaging. It hooks session_tokens.forget_old_block_hashes, which compat calls once per
session input in the scheduler.
"""

from __future__ import annotations

import ctypes
import json
import os
import time

_PATH = os.environ.get("VLLM_SINKS_MEMORY_PROBE")
_EVERY = int(os.environ.get("VLLM_SINKS_MEMORY_PROBE_EVERY", "262144"))


_MALLINFO2 = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2]


def _mallinfo2() -> dict:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {name: getattr(info, name) >> 10 for name, _ in _MallInfo2._fields_}  # kB


def _kind(name: str) -> str:
    if not name:
        return "anonymous"
    if name.startswith("[heap]"):
        return "heap"
    if name.startswith("/dev/shm"):
        return "shm"
    if name.startswith("/dev/nvidia"):
        return "nvidia"
    if name.startswith("/"):
        return "files"
    return "other"


def _mappings() -> dict:
    """Resident kB by kind of mapping (/proc/self/smaps)."""
    out: dict[str, int] = {}
    kind = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if head and "-" in head[0] and not head[0].endswith(":"):
                kind = _kind(head[5].strip() if len(head) > 5 else "")
            elif line.startswith("Rss:") and kind is not None:
                out[kind] = out.get(kind, 0) + int(line.split()[1])
    return out


def _rollup() -> dict:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def _pinned() -> dict:
    try:
        import torch

        if not torch.cuda.is_initialized():
            return {}
        stats = torch.cuda.host_memory_stats()
    except Exception:  # noqa: BLE001 - diagnosis only
        return {}
    return {k: v for k, v in stats.items() if "bytes" in k and k.endswith((".current", ".peak"))}


def _install() -> None:
    from vllm_sinks.sessions import tokens as session_tokens

    original = session_tokens.forget_old_block_hashes
    state = {"next": 0}

    def forget_old_block_hashes(request, keep_head, keep_tail):
        original(request, keep_head, keep_tail)
        n = len(request.all_token_ids)
        if n < state["next"]:
            return
        state["next"] = n + _EVERY
        staging = session_tokens._ROW_STAGING if hasattr(session_tokens, "_ROW_STAGING") else None
        row = {
            "pid": os.getpid(),
            "time": round(time.time(), 1),
            "session_tokens": n,
            "smaps_rollup_kb": _rollup(),
            "resident_kb_by_mapping": _mappings(),
            "mallinfo2_kb": _mallinfo2(),
            "pinned_host_allocator": _pinned(),
            "row_staging_pinned_bytes": staging.pinned_bytes() if staging is not None else None,
        }
        with open(f"{_PATH}.{os.getpid()}", "a") as f:
            f.write(json.dumps(row) + "\n")

    session_tokens.forget_old_block_hashes = forget_old_block_hashes


if _PATH:
    try:
        _install()
    except ImportError:  # vllm_sinks not importable in this interpreter
        pass
