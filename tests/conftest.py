"""Shared fixtures: tiny local checkpoints (built once per session) and the GPU marker."""

from __future__ import annotations

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
