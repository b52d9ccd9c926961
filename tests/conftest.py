"""Shared fixtures: tiny local checkpoints (built once per session) and the GPU marker."""

from __future__ import annotations

import gc
import os
import sys

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Engine cores are spawned, never forked: a forked child cannot use CUDA once the test process touched it.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
sys.path.insert(0, os.path.dirname(__file__))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


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
    from vllm_sinks.tiny_model import TinyLlamaSpec, build_tiny_llama

    root = tmp_path_factory.mktemp("models")
    built: dict[str, str] = {}

    def make(name: str = "default", **fields) -> str:
        if name not in built:
            built[name] = build_tiny_llama(str(root / name), TinyLlamaSpec(**fields))
        return built[name]

    return make


@pytest.fixture(autouse=True, scope="module")
def _shut_down_engines():
    """vLLM engines a module made go away with the module (while pytest still captures their shutdown logs),
    not at interpreter exit."""
    yield
    gc.collect()


@pytest.fixture(autouse=True, scope="session")
def _no_engine_outlives_the_session():
    """Shuts down any vLLM executor still alive at the end (an in-process engine kept by a reference
    cycle), so its shutdown logs go to pytest's capture, not to a closed stream after the summary line."""
    yield
    gc.collect()
    executor_mod = sys.modules.get("vllm.v1.executor.multiproc_executor")
    if executor_mod is None:
        return
    for obj in gc.get_objects():
        if isinstance(obj, executor_mod.MultiprocExecutor):
            try:
                obj.shutdown()
            except Exception:
                pass
