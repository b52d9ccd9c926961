"""The plugin in Ray: a local Ray head on 127.0.0.1 starts a worker process, and vLLM's plugin loading there
registers SINKS and its KV-cache spec exactly as in the driver (what `--distributed-executor-backend ray`
relies on: every Ray worker loads the general plugins before it builds its model)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_head():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_sinks_registers_in_a_ray_worker(ray_head):
    ray = ray_head

    @ray.remote
    def probe():
        import os

        import torch
        from vllm.plugins import load_general_plugins

        load_general_plugins()
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

        from vllm_sinks.kv.manager import SinkWindowManager, SinkWindowSpec

        spec = SinkWindowSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32,
                              sliding_window=61, sink_tokens=4)  # fmt: skip
        return (
            os.getpid(),
            AttentionBackendEnum["SINKS"].get_path(),
            KVCacheSpecRegistry.get_manager_class(spec) is SinkWindowManager,
        )

    import os

    pid, path, manager_ok = ray.get(probe.remote())
    assert pid != os.getpid()
    assert path == "vllm_sinks.attention.backend.SinksAttentionBackend"
    assert manager_ok
