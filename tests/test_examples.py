"""The examples run on CPU with a tiny local model (smoke runs; what they print is checked, not timed). The
examples that talk to a server (endless_chat, multi_tenant, session_chat) run in tests/test_server.py against
its server."""

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


@pytest.mark.slow
def test_streaming_demo_runs_the_three_experiments(tmp_path):
    """attention_sinks' demo on SmolLM2-135M-Instruct (real replies), briefly: SINKS and windowed keep one
    stream going, dense stops at its context (here a --max-model-len below the stream). Each experiment in
    its own process, as a user runs it."""

    def run_demo(*args: str) -> dict:
        out = tmp_path / f"demo_{len(list(tmp_path.iterdir()))}.json"
        script = os.path.join(os.path.dirname(__file__), "..", "examples", "streaming_demo.py")
        # faulthandler: an abort at exit (seen once in CI, 2026-12-07) prints every Python thread's stack
        proc = subprocess.run([sys.executable, "-X", "faulthandler", script, *args, "--out", str(out)],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-6000:]
        return json.loads(out.read_text())

    common = ["--window-tokens", "60", "--max-new-tokens", "24", "--dtype", "float32", "--enforce-eager",
              "--max-num-batched-tokens", "512"]  # fmt: skip
    sinks = run_demo("--experiment", "sinks", "--prompts", "4", *common)
    assert len(sinks["turns"]) == 4 and sinks["turns"][-1]["stream_tokens"] > 64
    assert all(t["reply_tokens"] > 0 and t["fresh_context_ppl"] > 1 for t in sinks["turns"])
    # Each turn resends the stream; the prefix cache serves its full blocks (128 tokens on CPU).
    assert sinks["turns"][-1]["cached_tokens"] >= 128
    windowed = run_demo("--experiment", "windowed", "--prompts", "2", *common)
    assert len(windowed["turns"]) == 2
    dense = run_demo("--experiment", "dense", "--prompts", "6", "--max-model-len", "192", *common)
    assert 0 < len(dense["turns"]) < 6 and dense["turns"][-1]["stream_tokens"] <= 192
