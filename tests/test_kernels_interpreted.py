"""The CUDA path's Triton kernels (rotary_tables, rope_and_cache, sink_attention_merge, band_sink_attention)
checked on the CPU in every CI run, through Triton's interpreter, against the float32 PyTorch oracle. The
GPU version of this test (test_gpu_kernels.py) adds FlashAttention and the compiled kernels; this one
catches indexing, masking, GQA-grouping, rotation and merge errors without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# The interpreter runs each kernel program in Python, on one core: the three runs go side by side.
RUNS = {"float32": ("float32", {}), "float16": ("float16", {}),
        "block_major": ("float32", {"VLLM_SINKS_KV_LAYOUT": "block_major"})}  # fmt: skip


@pytest.fixture(scope="module")
def interpreted() -> dict[str, list[dict]]:
    """Each run's JSON rows (tests/interpreted_kernels.py, TRITON_INTERPRET=1), the runs started at once."""
    procs = {}
    for name, (dtype, extra) in RUNS.items():
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", **extra)
        procs[name] = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "interpreted_kernels.py"), dtype],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
    rows = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}: {err[-4000:]}"
        rows[name] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def test_triton_kernels_match_torch_in_the_interpreter(interpreted):
    # the float32 run's rotary-tables row and band rows with no FA part (each run has them)
    rows = interpreted["float32"]
    rows += [r for r in interpreted["float16"] if r["kernel"] != "tables" and r.get("fa_window") != -1]
    merge = [r for r in rows if r["kernel"] == "merge"]
    band = [r for r in rows if r["kernel"] == "band"]
    tables = [r for r in rows if r["kernel"] == "tables"]
    # rotary_tables: far positions (to 10**7) with mscale != 1, as the float64 PyTorch path to float32
    # rounding; and every case's own tables below.
    assert len(tables) == 1 and tables[0]["table_err"] < 5e-7, tables
    rows = merge + band
    # sink_attention_merge: 4 cases x 2 dtypes, again with a KV head's group of heads per program for the 3
    # GQA cases (and with rope_and_cache split per KV head; per head for the case without GQA), and a batch
    # with no context past W + 1 (merge not launched).
    assert len(merge) == 8 + 6 + 2 + 2, merge
    assert {r["heads_per_program"] for r in merge} == {1, 2, 4, 8}
    assert {r["rope_programs"] for r in merge} == {1, 2, 4}
    assert all(r["merged_tokens"] == 0 for r in merge if r["short"])
    # band_sink_attention: the same 4 cases with FA's part over a window W' < W, by dtype and layout, and
    # 3 with no FA part.
    assert len(band) == 8 + 6 + 3 and {r["fa_window"] for r in band} == {31, 15, 20, 39, -1}, band
    assert {r["heads_per_program"] for r in band} == {1, 2, 4, 8}
    for row in rows:
        print(row)
        fp32 = row["dtype"] == "torch.float32"
        assert row["cache_err"] < (1e-5 if fp32 else 5e-3), row
        assert row["table_err"] < 5e-7, row
        assert row["rel_err"] < (1e-5 if fp32 else 2e-3), row
    # The sink merge was exercised: some tokens lie past S + W with S > 0.
    assert sum(r["merged_tokens"] for r in rows if r["S"] > 0) > 20


def test_merge_layout_default():
    """Decode-sized steps keep one query head per program; prefill-sized steps group the query heads of a KV
    head, as many as the largest power of two dividing the group (<= 8), which the kernel requires."""
    from vllm_sinks.attention.ops_cuda import GROUPED_MIN_TOKENS, merge_heads_per_program

    assert merge_heads_per_program(GROUPED_MIN_TOKENS - 1, 4) == 1
    groups = (1, 2, 4, 6, 7, 8, 16)
    assert [merge_heads_per_program(GROUPED_MIN_TOKENS, g) for g in groups] == [1, 2, 4, 2, 1, 8, 8]


def test_triton_kernels_read_a_block_major_cache(interpreted):
    """The same kernels over the block-major cache a KV connector gets (attention.layout: a block's K and V
    one page), float32: they read and write the cache through its strides."""
    rows = interpreted["block_major"]
    cases = [r for r in rows if r["kernel"] in ("merge", "band")]
    assert len(cases) == 19 and len(rows) == 20, rows  # and the rotary-tables row
    for row in cases:
        assert row["cache_err"] < 1e-5 and row["rel_err"] < 1e-5, row
