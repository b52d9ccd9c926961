"""Load test (CPU, tiny model, loopback): 100 concurrent streaming chats for 5 minutes, 20% of replies dropped
by the client mid-stream, against `vllm serve --attention-backend SINKS`. Zero 5xx and no transport errors;
afterwards no KV block is held (SINKS metrics and vLLM's KV usage); the resident memory of the server's
process tree after warm-up stays flat. VLLM_SINKS_LOAD_SECONDS shortens the run for local iterations."""

from __future__ import annotations

import os
import sys

import pytest
from serving import vllm_server

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

pytestmark = pytest.mark.slow

ARGS = [
    "--attention-backend", "SINKS", "--enforce-eager", "--block-size", "16", "--dtype", "float32",
    "--gpu-memory-utilization", "0.3", "--max-num-seqs", "128",
    "--additional-config", '{"sinks": {"sink_tokens": 4, "window_tokens": 124}}',
]  # fmt: skip


def test_100_chats_five_minutes(model_dir, tmp_path):
    import bench_serve

    duration = float(os.environ.get("VLLM_SINKS_LOAD_SECONDS", "300"))
    path = model_dir()
    with vllm_server(path, ARGS, str(tmp_path / "server.log")) as srv:
        r = bench_serve.main(["--base-url", srv.base_url, "--model", path, "--chats", "100",
                              "--duration", str(duration), "--disconnect-rate", "0.2", "--max-tokens", "24",
                              "--server-pid", str(srv.proc.pid), "--warmup-s", str(min(60.0, duration / 3)),
                              "--out", str(tmp_path / "load.json")])  # fmt: skip
        assert srv.proc.poll() is None, "the server must survive the load"
    assert r["status"].get("5xx", 0) == 0 and r["status"].get("4xx", 0) == 0, r["status"]
    assert r["errors"] == 0, r["error_examples"]
    assert r["turns_completed"] >= 100 and r["client_disconnects"] > 0
    final = r["final_metrics"]
    assert final["vllm:num_requests_running"] == 0
    assert final["vllm_sinks:held_blocks"] == 0 and final["vllm:kv_cache_usage_perc"] == 0, final
    assert 0 < final["vllm_sinks:request_held_blocks_peak"] <= final["vllm_sinks:request_blocks_bound"]
    rss = r["server_rss_mib"]
    assert rss["max_after_warmup"] <= 1.10 * rss["first_after_warmup"], rss
