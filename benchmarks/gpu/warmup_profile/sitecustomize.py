"""Diagnosis of engine start-up: profiles vLLM's kernel warm-up (vllm.v1.worker.gpu_worker.warmup_kernels,
the step that ran 8 s with SINKS against 1 s with stock FLASH_ATTN on an H100) with cProfile, in whichever
process runs it (the spawned engine core too), and prints the top entries to stderr.
    PYTHONPATH=benchmarks/gpu/warmup_profile:$PYTHONPATH python3 benchmarks/bench_startup.py ...
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "vllm.v1.worker.gpu_worker"


def _wrap(module) -> None:
    import cProfile
    import io
    import pstats
    import time

    original = module.warmup_kernels

    def warmup_kernels(*args, **kwargs):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        try:
            return prof.runcall(original, *args, **kwargs)
        finally:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
            print(f"[warmup_profile] warmup_kernels took {time.perf_counter() - t0:.2f} s\n{s.getvalue()}",
                  file=sys.stderr, flush=True)  # fmt: skip

    module.warmup_kernels = warmup_kernels


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        exec_module = loader.exec_module

        def patched(module):
            exec_module(module)
            _wrap(module)

        loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _Finder())
