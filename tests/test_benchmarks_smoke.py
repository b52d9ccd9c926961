"""CPU-sized runs of the benchmark scripts, so they cannot rot. Figures are not asserted (timings belong in
benchmarks/results/), only that each script runs end to end and writes a well-formed result."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_bench_decode_smoke(tmp_path):
    import bench_decode

    out = tmp_path / "decode.json"
    res = bench_decode.main(
        ["--mode", "sinks", "--shape", "tiny", "--streams", "2", "--prompt-len", "96", "--gen", "24",
         "--short-gen", "8", "--window-tokens", "40", "--model-root", str(tmp_path), "--out", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["mode"] == "sinks" and saved["decode_tok_s"] > 0 and saved == res
    assert saved["engine_kwargs"]["attention_backend"] == "SINKS"


def test_plot_scripts_render_the_committed_results(tmp_path):
    """The plot scripts draw the committed JSON results (what the PNGs in benchmarks/results/ come from)."""
    import os
    import sys

    here = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    sys.path.insert(0, here)
    sys.path.insert(0, os.path.join(here, "quality"))
    import plot_ppl
    import plot_results

    plot_results.main(["--out", str(tmp_path / "tm.png")])
    quality = os.path.join(here, "results", "quality_smollm2_kjv_h200_2026-11-23.json")
    plot_ppl.main([quality, "--out", str(tmp_path / "q.png")])
    assert (tmp_path / "tm.png").stat().st_size > 10_000 and (tmp_path / "q.png").stat().st_size > 10_000
