"""CPU-sized runs of the benchmark scripts, so they cannot rot. No timing is asserted against a target
(timings belong in benchmarks/results/); each script must run end to end, write the result it returns, and
report figures consistent with the raw measurements they are derived from."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


# bench_decode starts vLLM's engine core in its own process (as a server does); its smoke runs it in process:
# the script's code is the same, and the second process importing torch and vLLM was 18 of its 46 s on a
# 2-core host.
IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"


def test_bench_decode_smoke(tmp_path, monkeypatch):
    import bench_decode
    from vllm import envs

    monkeypatch.setenv(IN_PROCESS, "0")
    envs.disable_envs_cache()  # an earlier in-process engine core froze vLLM's env reads

    out = tmp_path / "decode.json"
    res = bench_decode.main(
        ["--mode", "sinks", "--shape", "tiny", "--streams", "2", "--prompt-len", "96", "--gen", "24",
         "--short-gen", "8", "--window-tokens", "40", "--model-root", str(tmp_path), "--out", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["mode"] == "sinks" and saved == res
    assert saved["engine_kwargs"]["attention_backend"] == "SINKS"
    # The rate is the decoded tokens between the short and the long run over their time difference.
    tokens = 2 * (24 - 8)
    assert saved["t_long_s"] > saved["t_short_s"] > 0
    window = saved["t_long_s"] - saved["t_short_s"]  # each saved rounded to 1 ms
    assert saved["decode_tok_s"] == pytest.approx(tokens / window, rel=0.0011 / window + 0.001)


def test_bench_endless_smoke(tmp_path):
    """Workload B's harness on CPU: two lengths in one engine; blocks per stream while decoding stay at the
    window's bound at both lengths (the figure the GPU run reports)."""
    import bench_endless

    out = tmp_path / "endless.json"
    res = bench_endless.main(
        ["--mode", "sinks", "--shape", "tiny", "--streams", "2", "--lengths", "200,400", "--gen", "12",
         "--short-gen", "4", "--window-tokens", "40", "--model-root", str(tmp_path), "--out", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved == res and [r["length"] for r in saved["rows"]] == [200, 400]
    for row in saved["rows"]:
        assert row["decode_tokens_timed"] > 0 and row["decode_window_s"] > 0
        # The rate is the tokens decoded in the timed window over its length (saved rounded to 1 ms).
        rate = row["decode_tokens_timed"] / row["decode_window_s"]
        assert row["decode_tok_s"] == pytest.approx(rate, rel=0.0006 / row["decode_window_s"] + 0.001)
        assert row["max_streams_running_at_once"] == 2 and row["streams_decoding_when_timed"] == 2
        assert row["all_streams_decoded_together"] and row["decode_steps_timed"] > 0
        assert 0 < row["kv_blocks_per_stream_near_end"] <= 1 + 3 + 1
        # S=4, W=40, blocks of 16: one sink block + ceil(41 / 16) + 1 window blocks at most.
        assert 0 < row["kv_blocks_per_stream_decode"] <= 1 + 3 + 1
    assert saved["rows"][0]["kv_blocks_per_stream_decode"] == saved["rows"][1]["kv_blocks_per_stream_decode"]


def test_bench_endless_dense_smoke(tmp_path):
    """The stock side of Workload B: blocks per stream grow with the stream (counted in vLLM's tables)."""
    import bench_endless

    res = bench_endless.main(
        ["--mode", "dense", "--shape", "tiny", "--streams", "2", "--lengths", "200,400", "--gen", "12",
         "--short-gen", "4", "--model-root", str(tmp_path)]
    )  # fmt: skip
    short, long = res["rows"]
    assert short["kv_blocks_per_stream_near_end"] == -(-(200 + 12 - 2) // 16)
    assert long["kv_blocks_per_stream_near_end"] == -(-(400 + 12 - 2) // 16)


def test_bench_startup_smoke(tmp_path):
    import bench_startup

    out = tmp_path / "startup.json"
    res = bench_startup.main(
        ["--modes", "dense,sinks", "--shape", "tiny", "--rounds", "1", "--warmup-rounds", "0",
         "--enforce-eager", "--streams", "2", "--prompt-len", "64", "--window-tokens", "40",
         "--model-root", str(tmp_path),
         "--out", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved == res and [s["mode"] for s in saved["starts"]] == ["dense", "sinks"]
    median = saved["median_startup_s"]
    assert median == {m: round(s["startup_s"], 2) for s in saved["starts"] for m in [s["mode"]]}
    assert saved["ratio_to_dense"] == {"dense": 1.0, "sinks": round(median["sinks"] / median["dense"], 3)}


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


def test_bench_serve_user_messages_follow_user_words():
    """The serving load's user turns have --user-words words, with or without --allowed-token-ids (the
    2026-11-24 loads drew 3..380 words: the allowed-id range overwrote the word range)."""
    import random

    import bench_serve

    for words, lo, hi in (("12", 12, 12), ("280:1100", 280, 1100)):
        load = bench_serve.Load(bench_serve.parse(["--base-url", "u", "--model", "m", "--user-words", words,
                                                   "--allowed-token-ids", "3:380"]))  # fmt: skip
        rng = random.Random(0)
        counts = [len(load.user_message(rng, 7).split()) - 2 for _ in range(200)]  # minus "chat 7:"
        assert lo <= min(counts) and max(counts) <= hi
        assert load.allowed_token_ids == list(range(3, 380))


def test_bench_block_rows_smoke(tmp_path):
    import bench_block_rows

    out = tmp_path / "rows.json"
    res = bench_block_rows.main(["--tokens", "8192,65536", "--repeats", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == res and [r["block_ids"] for r in saved["rows"]] == [512, 4096]
    assert [r["session_tokens"] for r in saved["rows"]] == [8192, 65536]
    for r in saved["rows"]:  # each hand-off was timed (the script checks that both give the same table)
        assert all(r[k] > 0 for k in ("lists_v1_ms", "sparse_v1_ms", "lists_v2_ms", "sparse_v2_ms"))


def test_model_error_floor_exact_forward_is_the_reference(model_dir):
    """model_error_floor.py's batched float64 forward (its reference for models too large to run token by
    token here) gives tests/reference.py's logprobs, full attention and StreamingLLM past the window; and in
    bf16 a window longer than the prompt computes what dense attention computes, rounding for rounding."""
    import model_error_floor as floor
    import torch
    from reference import StreamingLlama

    path = model_dir()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 380, (150,), generator=g).tolist()
    exact = floor.EmulatedLlama(path, exact=True)
    for W, attend in ((None, floor.dense("fp32")), (60, floor.sinks(4, 60, split=False))):
        want = torch.tensor(StreamingLlama(path, 4, W).token_logprobs(prompt), dtype=torch.float64)
        got = exact.token_logprobs(prompt, attend, rows=64)
        assert (got - want).abs().max() < 1e-9, W
    bf16 = floor.EmulatedLlama(path)
    same = bf16.token_logprobs(prompt, floor.sinks(4, 500, split=False))
    assert torch.equal(same, bf16.token_logprobs(prompt, floor.dense("fp32")))
    split = bf16.token_logprobs(prompt, floor.sinks(4, 60, split=True))
    assert not torch.equal(split, same) and (split - want).abs().max() < 0.1


@pytest.mark.slow
def test_model_error_floor_smoke(tmp_path):
    """The script end to end on its random model (1024 wide: ~30 s here, so in the slow suite)."""
    import model_error_floor as floor

    out = tmp_path / "floor.json"
    res = floor.main(["--tokens", "140", "--windows", "100", "--root", str(tmp_path), "--save-errors",
                      "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved == res and set(saved["seeds"]["11"]) == {
        "dense", "dense_fp32rope", "sinks_split_4+100", "sinks_single_4+100"
    }  # fmt: skip
    # A GPU run's errors stand-in: the emulation's own, perturbed position by position, so that the script's
    # correlations must match ones computed here independently (statistics.correlation, ranks by sorting).
    import math
    import statistics

    errors = saved["errors"]
    gpu_errors = {
        "dense_all": [e * (1 + 0.5 * math.sin(i)) for i, e in enumerate(errors["dense"])],
        "sinks_4+100": [e + 0.02 * math.cos(3 * i) for i, e in enumerate(errors["sinks_split_4+100"])],
    }
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"errors": gpu_errors}))
    corr = floor.main(["--compare", str(gpu), str(out)])

    def ranks(x):
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0.0] * len(x)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    for g, e in (("dense_all", "dense"), ("sinks_4+100", "sinks_split_4+100")):
        x, y = gpu_errors[g], errors[e]
        want = {"pearson": round(statistics.correlation(x, y), 3),
                "spearman": round(statistics.correlation(ranks(x), ranks(y)), 3)}  # fmt: skip
        assert corr[f"gpu {g} ~ emulated {e}"] == want and want["pearson"] < 1.0
