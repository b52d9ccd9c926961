"""Shared fixtures: tiny local checkpoints (built once per session) and the GPU marker."""

from __future__ import annotations

import gc
import os
import sys

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Every engine process compiles vLLM-CPU's sampler with torch inductor, whose first compile in a process
# probes the CPU's vector ISAs by starting a Python interpreter per ISA (~3.5 s of each engine's start on the
# 2-core CI host). The ISAs the CPU reports (cpuid) are trusted instead; nothing SINKS computes changes.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
# Engine cores are spawned, never forked: a forked child cannot use CUDA once the test process touched it.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
sys.path.insert(0, os.path.dirname(__file__))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _has_cuda():
    # vLLM-CPU compiles one sampler helper (topk_topp_sampler.compiled_random_sample) with torch inductor in
    # every engine process; inductor's ISA probes (AVX-512 bf16, VNNI, AMX: a Python interpreter each, which
    # TORCHINDUCTOR_VEC_ISA_OK does not skip) and its C++ build cost ~12 s of each engine start on the 2-core
    # CI host (startup 14.2 s -> 2.0 s without). On CPU hosts the tests run it eagerly; GPU hosts keep
    # torch.compile (their tests cover CUDA graphs and compiled models).
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device host (see benchmarks/results/)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Builds a tiny Llama for a TinyLlamaSpec: model_dir(**spec_fields) -> path."""
    from vllm_sinks_testing.tiny_model import TinyLlamaSpec, build_tiny_llama

    root = tmp_path_factory.mktemp("models")
    built: dict[str, str] = {}

    def make(name: str = "default", **fields) -> str:
        if name not in built:
            built[name] = build_tiny_llama(str(root / name), TinyLlamaSpec(**fields))
        return built[name]

    return make


def shut_down_live_engines() -> None:
    """Shuts down every vLLM engine-core client still alive in this process (in-process engines and the
    clients of engine-core processes) and collects them. vLLM's EngineCore calls gc.freeze() when it starts,
    so an engine a test merely dropped is invisible to the collector: its worker processes and ZeroMQ
    sockets live on, and pytest's final garbage collection then blocks forever in a ZeroMQ context's
    term(). Tests shut their engines down (engines.shut_down); this catches any that were not."""
    gc.unfreeze()
    gc.collect()
    client_mod = sys.modules.get("vllm.v1.engine.core_client")
    if client_mod is not None:
        for obj in gc.get_objects():
            # Module first: an ABC instance check on every object would touch deprecated torch classes.
            if type(obj).__module__ == client_mod.__name__ and isinstance(obj, client_mod.EngineCoreClient):
                try:
                    obj.shutdown()
                except Exception:
                    pass
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _shut_down_engines():
    """vLLM engines a module made go away with the module (while pytest still captures their shutdown logs),
    not at interpreter exit."""
    yield
    shut_down_live_engines()


@pytest.fixture(autouse=True, scope="session")
def _no_engine_outlives_the_session():
    """The same at the end of the session, so shutdown logs go to pytest's capture and the run ends on its
    summary line."""
    yield
    shut_down_live_engines()
