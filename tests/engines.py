"""Engine teardown for tests: an LLM's engine core and its worker processes end when the test is done with it.

`del llm` is not enough: vLLM's EngineCore calls gc.freeze() when it starts, so a dropped in-process engine is
never collected; its MultiprocExecutor workers (about 2 GB each on CPU) and ZeroMQ sockets stay until the
interpreter exits, where a ZeroMQ context's term() can block forever (conftest.shut_down_live_engines)."""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Any


def shut_down(llm: Any) -> None:
    """Shuts down the engine core of an `LLM` (or `LLMEngine`): its workers exit now."""
    engine = getattr(llm, "llm_engine", llm)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown()
    gc.collect()


def _mapped_or_open_shm() -> set[str]:
    """Names under /dev/shm that a live process maps or holds open."""
    names: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/maps") as f:
                names.update(line.rsplit("/dev/shm/", 1)[1].split()[0] for line in f if "/dev/shm/" in line)
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/"):
                        names.add(target[len("/dev/shm/") :].split()[0])
    return names


def remove_orphaned_shm(since: float) -> list[str]:
    """Removes the shared-memory files (/dev/shm: vLLM's message-queue ring buffers psm_*, multiprocessing's
    semaphores sem.mp-*) made since `since` (a time.time()) that no live process maps or holds open. An engine
    process that ends without its shutdown (a Ray Serve replica killed, or stopped by Ray at serve.shutdown)
    never unlinks its ring buffers. Returns the names removed."""
    if not os.path.isdir("/dev/shm"):
        return []
    in_use = _mapped_or_open_shm()
    removed = []
    for name in os.listdir("/dev/shm"):
        if not name.startswith(("psm_", "sem.mp-")) or name in in_use:
            continue
        path = os.path.join("/dev/shm", name)
        with contextlib.suppress(OSError):
            if os.stat(path).st_mtime >= since:
                os.unlink(path)
                removed.append(name)
    return removed
