"""Engine teardown for tests: an LLM's engine core and its worker processes end when the test is done with it.

`del llm` is not enough: vLLM's EngineCore calls gc.freeze() when it starts, so a dropped in-process engine is
never collected; its MultiprocExecutor workers (about 2 GB each on CPU) and ZeroMQ sockets stay until the
interpreter exits, where a ZeroMQ context's term() can block forever (conftest.shut_down_live_engines)."""

from __future__ import annotations

import gc
from typing import Any


def shut_down(llm: Any) -> None:
    """Shuts down the engine core of an `LLM` (or `LLMEngine`): its workers exit now."""
    engine = getattr(llm, "llm_engine", llm)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown()
    gc.collect()
