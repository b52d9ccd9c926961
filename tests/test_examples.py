"""The examples run on CPU with a tiny local model (smoke runs; what they print is checked, not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def test_offline_streaming_grows_past_trained_context_with_flat_kv(monkeypatch, tmp_path):
    import offline_streaming

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    rows = offline_streaming.main(["--rounds", "18", "--window-tokens", "60", "--max-tokens", "96"])
    assert rows[-1]["past_trained_context"], rows[-1]  # the tiny model is trained to 2048 positions
    held = [r["kv_blocks_held_max"] for r in rows[3:]]
    # Flat: each round holds the sink block, the window and the round's new tokens, whatever the history.
    assert max(held) - min(held) <= 2 and max(held) <= 1 + -(-(60 + 130) // 16) + 1, held


def test_endless_chat_computes_only_new_tokens_per_turn(model_dir, tmp_path):
    import endless_chat
    from serving import vllm_server

    path = model_dir()
    args = [
        "--attention-backend", "SINKS", "--enforce-eager", "--block-size", "16", "--dtype", "float32",
        "--gpu-memory-utilization", "0.3", "--max-num-seqs", "4", "--enable-prompt-tokens-details",
        "--additional-config", '{"sinks": {"sink_tokens": 4, "window_tokens": 60}}',
    ]  # fmt: skip
    with vllm_server(path, args, str(tmp_path / "server.log")) as srv:
        rows = endless_chat.main(["--base-url", srv.base_url + "/v1", "--model", path, "--turns", "12"])
    assert rows[-1]["prompt_tokens"] > 5 * 64
    # From the second turn on, the server computes the new text only (plus at most a partial block or two
    # where re-tokenized history differs from the generated tokens), however long the conversation.
    computed = [r["computed_prompt_tokens"] for r in rows[2:]]
    assert max(computed) < 0.5 * rows[-1]["prompt_tokens"], rows
    # The server's KV blocks for the conversation (from /metrics, mid-reply, decode only): one sink block and
    # the blocks of the 60-token window, a handful, while the conversation grows past 80 blocks: flat.
    blocks = [r["server_kv_blocks"] for r in rows]
    assert all(b is not None and 0 < b <= 8 for b in blocks), blocks
    assert rows[-1]["prompt_tokens"] // 16 > 80


def test_multi_tenant_with_disconnects_leaves_no_kv_in_use(model_dir, tmp_path):
    import multi_tenant
    from serving import vllm_server

    path = model_dir()
    args = [
        "--attention-backend", "SINKS", "--enforce-eager", "--block-size", "16", "--dtype", "float32",
        "--gpu-memory-utilization", "0.3", "--max-num-seqs", "8",
        "--additional-config", '{"sinks": {"sink_tokens": 4, "window_tokens": 60}}',
    ]  # fmt: skip
    with vllm_server(path, args, str(tmp_path / "server.log")) as srv:
        stats = multi_tenant.main(
            ["--base-url", srv.base_url, "--model", path, "--tenants", "8", "--turns", "3", "--drop", "0.4"]
        )
        assert srv.proc.poll() is None
    assert stats["dropped"] > 0 and stats["turns"] == 8 * 3
    assert stats["kv_cache_usage_peak"] > 0.0  # the metric moves while tenants talk ...
    assert stats["kv_cache_usage_after"] == 0.0  # ... and every block is back once they are gone


@pytest.mark.slow
def test_streaming_demo_runs_the_three_experiments(tmp_path):
    """attention_sinks' demo on SmolLM2-135M-Instruct (real replies), briefly: SINKS and windowed keep one
    stream going, dense stops at its context (here a --max-model-len below the stream). Each experiment in
    its own process, as a user runs it."""

    def run_demo(*args: str) -> dict:
        out = tmp_path / f"demo_{len(list(tmp_path.iterdir()))}.json"
        script = os.path.join(os.path.dirname(__file__), "..", "examples", "streaming_demo.py")
        proc = subprocess.run([sys.executable, script, *args, "--out", str(out)], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text())

    common = ["--window-tokens", "60", "--max-new-tokens", "24", "--dtype", "float32"]
    sinks = run_demo("--experiment", "sinks", "--prompts", "4", *common)
    assert len(sinks["turns"]) == 4 and sinks["turns"][-1]["stream_tokens"] > 64
    assert all(t["reply_tokens"] > 0 and t["fresh_context_ppl"] > 1 for t in sinks["turns"])
    # Each turn resends the stream; the prefix cache serves its full blocks (128 tokens on CPU).
    assert sinks["turns"][-1]["cached_tokens"] >= 128
    windowed = run_demo("--experiment", "windowed", "--prompts", "2", *common)
    assert len(windowed["turns"]) == 2
    dense = run_demo("--experiment", "dense", "--prompts", "6", "--max-model-len", "192", *common)
    assert 0 < len(dense["turns"]) < 6 and dense["turns"][-1]["stream_tokens"] <= 192
