"""Per-step trace of vLLM's engine core, for diagnosis only (not part of the plugin).

Put this folder on PYTHONPATH and set VLLM_SINKS_STEP_TRACE=FILE: every process that imports vLLM's
scheduler or GPU model runner appends one JSON line per call of Scheduler.schedule,
Scheduler.update_from_output, GPUModelRunner.execute_model / sample_tokens and
Scheduler._update_request_as_session to FILE.<pid>, with its start time (time.monotonic) and duration.
schedule() rows list each scheduled request's tokens and its counters (computed, prompt, max_tokens,
output placeholders); execute_model rows the CUDA graph mode chosen (V1 runner). Summarize with summarize.py.

VLLM_SINKS_STEP_SAMPLE_MS=N also samples every thread's Python stack every N ms (sys._current_frames) and
writes the most frequent stacks per thread to FILE.<pid>.stacks.txt: in the engine core, those of the last
complete session input (rewritten at each new input); elsewhere, everything so far (rewritten every 10 s).
VLLM_SINKS_STEP_PROFILE=1 runs Scheduler.update_from_output under cProfile; FILE.<pid>.update.txt holds the
last complete session input's profile.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys
import threading
import time

_PATH = os.environ.get("VLLM_SINKS_STEP_TRACE")
_TARGETS = {
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu.model_runner",
}


class _Log:
    def __init__(self, path: str) -> None:
        self.path, self.rows = f"{path}.{os.getpid()}", []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= 256 or row["k"] == "session_update":
            self.flush()
        if row["k"] == "session_update":
            if _SAMPLER is not None:
                _SAMPLER.dump(reset=True)
            if _PROFILE is not None:
                _dump_profile()

    def flush(self) -> None:
        if self.rows:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
            self.rows = []


def _timed(log: _Log, kind: str, fn, describe=None):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        t0 = time.monotonic()
        out = fn(self, *args, **kwargs)
        row = {"k": kind, "t": t0, "dt": time.monotonic() - t0}
        if describe is not None:
            try:
                row.update(describe(self, args, kwargs, out))
            except Exception as e:  # noqa: BLE001 - a trace must not break the engine
                row["describe_error"] = repr(e)
        log.add(row)
        return out

    return wrapper


class _Sampler(threading.Thread):
    """Counts each thread's innermost Python frames every `period` seconds."""

    def __init__(self, path: str, period: float) -> None:
        super().__init__(daemon=True, name="step-trace-sampler")
        self.path, self.period = f"{path}.{os.getpid()}.stacks.txt", period
        self.counts: dict[str, dict[tuple, int]] = {}
        self.samples, self.engine = 0, False
        self.started_at = time.monotonic()

    def run(self) -> None:
        last_dump = time.monotonic()
        me = threading.get_ident()
        while True:
            time.sleep(self.period)
            names = {t.ident: t.name for t in threading.enumerate()}
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                key, f = [], frame
                while f is not None and len(key) < 14:
                    c = f.f_code
                    key.append(f"{c.co_name} ({os.path.basename(c.co_filename)}:{f.f_lineno})")
                    f = f.f_back
                per = self.counts.setdefault(names.get(ident, str(ident)), {})
                k = tuple(key)
                per[k] = per.get(k, 0) + 1
            if not self.engine and time.monotonic() - last_dump > 10:
                self.dump(reset=False)
                last_dump = time.monotonic()

    def dump(self, reset: bool) -> None:
        counts, samples = self.counts, max(1, self.samples)
        span = time.monotonic() - self.started_at
        lines = [f"{samples} samples every {self.period * 1e3:.1f} ms over {span:.2f} s"]
        for thread, per in sorted(counts.items(), key=lambda kv: -sum(kv[1].values())):
            total = sum(per.values())
            inner: dict[str, int] = {}
            for k, n in per.items():
                inner[k[0]] = inner.get(k[0], 0) + n
            lines.append(f"\n=== thread {thread}: {total} samples; innermost frames:")
            lines += [
                f"  {n:6d} {n / samples:6.1%}  {f}"
                for f, n in sorted(inner.items(), key=lambda x: -x[1])[:15]
            ]
            lines.append("  stacks:")
            for k, n in sorted(per.items(), key=lambda x: -x[1])[:8]:
                lines.append(f"  {n:6d} {n / samples:6.1%}  " + "  <-  ".join(k))
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")
        if reset:
            self.counts, self.samples, self.started_at = {}, 0, time.monotonic()


_SAMPLER: _Sampler | None = None
_PROFILE = None


def _dump_profile() -> None:
    import io
    import pstats

    global _PROFILE
    out = io.StringIO()
    pstats.Stats(_PROFILE, stream=out).sort_stats("cumulative").print_stats(45)
    with open(f"{_PATH}.{os.getpid()}.update.txt", "w") as f:
        f.write(out.getvalue())
    import cProfile

    _PROFILE = cProfile.Profile()


def _profiled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _PROFILE is None:
            return fn(*args, **kwargs)
        _PROFILE.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            _PROFILE.disable()

    return wrapper


def _describe_schedule(sched, args, kwargs, out) -> dict:
    reqs = {}
    for rid, n in list(out.num_scheduled_tokens.items())[:8]:
        r = sched.requests.get(rid)
        reqs[rid[-8:]] = (
            [
                n,
                r.num_computed_tokens,
                r.num_prompt_tokens,
                r.max_tokens,
                r.num_output_placeholders,
                r.num_output_tokens,
            ]
            if r is not None
            else [n]
        )
    return {
        "tokens": out.total_num_scheduled_tokens,
        "reqs": reqs,
        "running": len(sched.running),
        "waiting": len(sched.waiting),
        "new": len(out.scheduled_new_reqs),
    }


def _patch_scheduler(mod, log: _Log) -> None:
    S = mod.Scheduler
    S.schedule = _timed(log, "schedule", S.schedule, _describe_schedule)
    S.update_from_output = _timed(log, "update", _profiled(S.update_from_output))
    if _SAMPLER is not None:
        _SAMPLER.engine = True
    S._update_request_as_session = _timed(
        log,
        "session_update",
        S._update_request_as_session,
        lambda s, a, k, o: {
            "prompt": a[0].num_prompt_tokens,
            "computed": a[0].num_computed_tokens,
            "max_tokens": a[0].max_tokens,
        },
    )


def _patch_runner(mod, log: _Log) -> None:
    """Model runner V1 (gpu_model_runner) also reports the CUDA graph mode it chose; V2 has no such hook."""
    R = mod.GPUModelRunner
    last: dict = {}
    if hasattr(R, "_determine_batch_execution_and_padding"):
        original = R._determine_batch_execution_and_padding

        @functools.wraps(original)
        def determine(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            last["mode"], last["desc"] = str(out[0]), str(out[1])
            return out

        R._determine_batch_execution_and_padding = determine

    def describe(s, a, k, o) -> dict:
        return {"tokens": a[0].total_num_scheduled_tokens, "mode": last.pop("mode", None),
                "desc": last.pop("desc", None)}  # fmt: skip

    R.execute_model = _timed(log, "execute", R.execute_model, describe)
    R.sample_tokens = _timed(log, "sample", R.sample_tokens)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, log: _Log) -> None:
        self.log = log

    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module, log = spec.loader.exec_module, self.log

        def exec_and_patch(module):
            exec_module(module)
            (_patch_scheduler if name.endswith(".scheduler") else _patch_runner)(module, log)

        spec.loader.exec_module = exec_and_patch
        return spec


if _PATH:
    import atexit

    _log = _Log(_PATH)
    atexit.register(_log.flush)
    if os.environ.get("VLLM_SINKS_STEP_SAMPLE_MS"):
        _SAMPLER = _Sampler(_PATH, float(os.environ["VLLM_SINKS_STEP_SAMPLE_MS"]) / 1e3)
        _SAMPLER.start()
    if os.environ.get("VLLM_SINKS_STEP_PROFILE") == "1":
        import cProfile

        _PROFILE = cProfile.Profile()
    sys.meta_path.insert(0, _Finder(_log))
