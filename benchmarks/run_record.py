"""What the offline engine benchmarks share: the device and mode part of their engine arguments, and the
provenance (device, date, exact command) and output of their result JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any


def device() -> str:
    """The CUDA device's name, or the CPU's."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    return f"cpu ({platform.processor() or platform.machine()})"


def device_and_mode_kwargs(mode: str, on_gpu: bool, a: Any) -> dict[str, Any]:
    """LLM(...) arguments for the host (bf16 on a GPU; float32, eager, 1 GiB of KV cache on a CPU) and for
    the mode: SINKS with (a.sink_tokens, a.window_tokens), or stock FLASH_ATTN on a GPU."""
    if on_gpu:
        kw: dict[str, Any] = dict(dtype="bfloat16", gpu_memory_utilization=a.gpu_memory_utilization)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kw = dict(dtype="float32", block_size=16, gpu_memory_utilization=0.3, enforce_eager=True)
    if mode == "sinks":
        sinks = {"sink_tokens": a.sink_tokens, "window_tokens": a.window_tokens}
        kw.update(attention_backend="SINKS", additional_config={"sinks": sinks})
    elif on_gpu:
        kw.update(attention_backend="FLASH_ATTN")
    return kw


def provenance(script: str, argv: list[str] | None) -> dict[str, str]:
    """device, date and the command that reruns the benchmark (script relative to the working folder)."""
    args = argv if argv is not None else sys.argv[1:]
    return {
        "device": device(),
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([os.path.relpath(script), *args]),
    }


def emit(result: dict, out: str | None) -> dict:
    """Prints the result and writes it to `out` (if given); returns it."""
    print(json.dumps(result, indent=1))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result
