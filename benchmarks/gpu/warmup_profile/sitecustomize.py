"""Diagnosis of engine start-up, in whichever process runs the engine (the spawned engine core too):
- cProfile of vLLM's kernel warm-up (vllm.v1.worker.gpu_worker.warmup_kernels, the step that ran 8 s with
  SINKS against 1 s with stock FLASH_ATTN on an H100) and of FlashInfer's autotune pass
  (vllm.model_executor.warmup.kernel_warmup.flashinfer_autotune), top entries to stderr;
- one `[triton]` line per Triton compilation (kernel, disk-cache hit or not, seconds, cache directory) and per
  kernel load (`_init_handles`: launcher build or load, module load), from the worker's import on.
    PYTHONPATH=benchmarks/gpu/warmup_profile:$PYTHONPATH python3 benchmarks/bench_startup.py ...
WARMUP_PROFILE=triton keeps the `[triton]` lines only (no cProfile, for timings that are reported).
"""

import importlib.abc
import importlib.util
import sys

_TARGETS = {
    "vllm.v1.worker.gpu_worker": ("warmup_kernels",),
    "vllm.model_executor.warmup.kernel_warmup": ("flashinfer_autotune",),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _profiled(name: str, original):
    import cProfile
    import io
    import pstats
    import time

    def wrapper(*args, **kwargs):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        try:
            return prof.runcall(original, *args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            s = io.StringIO()
            stats = pstats.Stats(prof, stream=s)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(15)
            _log(f"[warmup_profile] {name} took {dt:.2f} s\n{s.getvalue()}")

    return wrapper


def _hook_triton() -> None:
    import os
    import time

    import triton
    from triton.compiler import compiler

    def listener(src, metadata, metadata_group, times, cache_hit):
        _log(
            f"[triton] t={time.time():.3f} compile {getattr(src, 'name', src)} hit={cache_hit} "
            f"dir={os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')} times={times}"
        )

    triton.knobs.compilation.listener = listener
    init_handles = compiler.CompiledKernel._init_handles

    def timed_init_handles(self):
        first = self.module is None
        t0 = time.perf_counter()
        init_handles(self)
        if first:
            _log(f"[triton] t={time.time():.3f} load {self.name} {time.perf_counter() - t0:.3f} s")

    compiler.CompiledKernel._init_handles = timed_init_handles


def _wrap(module) -> None:
    import os

    if os.environ.get("WARMUP_PROFILE") != "triton":
        for fn in _TARGETS[module.__name__]:
            setattr(module, fn, _profiled(fn, getattr(module, fn)))
    if module.__name__ == "vllm.v1.worker.gpu_worker":
        _hook_triton()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _TARGETS or getattr(self, "_busy", False):
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        loader = spec.loader
        exec_module = loader.exec_module

        def patched(module):
            exec_module(module)
            _wrap(module)

        loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _Finder())
