"""Streaming perplexity over one long text, through vLLM's prompt logprobs, per 1,000-token bucket.

The whole text is ONE request (one endless stream): with SINKS every token attends to the S sink tokens and
the W tokens before it, at StreamingLLM's re-encoded positions, exactly as a token-by-token StreamingLLM
loop would; with dense attention every token attends to everything before it (run only as far as the model
can: its trained context, or further with ``dense:N`` to show what happens past it).

    python benchmarks/quality/streaming_ppl.py --tokens 1000765 \
        --configs 4:1020,0:1020,4:256,0:256,dense,dense:16384 --reference-tokens 3000 \
        --out benchmarks/results/quality_h100.json

Each config's ``bucket_ppl[b]`` is exp(mean NLL) of the tokens predicted at positions [b*B, (b+1)*B) (B =
--bucket, token 0 is BOS and is not predicted). ``--reference-tokens K`` also runs the independent float64
reference (tests/reference.py) over the first K tokens for every SINKS config and reports the largest
difference of per-token log-probabilities and of bucket perplexities.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse_configs(spec: str, trained: int) -> list[dict]:
    """'4:1020,0:256,dense,dense:16384' -> [{'label','sink_tokens','window_tokens','max_tokens'}]."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item.startswith("dense"):
            n = int(item.split(":")[1]) if ":" in item else trained
            out.append({"label": f"dense (first {n})", "kind": "dense", "max_tokens": n})
        else:
            s, w = (int(x) for x in item.split(":"))
            out.append({"label": f"SINKS {s}+{w}", "kind": "sinks", "sink_tokens": s, "window_tokens": w})
    return out


def bucket_ppl(logprobs: list[float], bucket: int) -> list[float]:
    """logprobs[i] = log p(token i+1 | tokens <= i); bucket b holds predicted positions [b*B, (b+1)*B)."""
    n = len(logprobs) + 1
    return [mean_ppl(logprobs, max(lo, 1), min(lo + bucket, n)) for lo in range(0, n, bucket) if lo + 1 < n]


def mean_ppl(logprobs: list[float], lo: int, hi: int) -> float:
    """exp(mean NLL) of the tokens predicted at positions [lo, hi) (position p is logprobs[p-1])."""
    chunk = logprobs[max(lo - 1, 0) : hi - 1]
    return math.exp(-sum(chunk) / len(chunk))


def flatness(logprobs: list[float]) -> dict:
    """The issue's criterion: mean PPL of the last 10% of the text vs the mean over tokens 1,024-11,024."""
    n = len(logprobs) + 1
    early = mean_ppl(logprobs, 1024, min(11024, n))
    late = mean_ppl(logprobs, n - n // 10, n)
    return {"early_ppl_1024_11024": early, "last10pct_ppl": late, "ratio": late / early}


RESTART_WARMUP = 2048


def restart_check(llm, tokens: list[int], lps: list[float]) -> dict:
    """Length-controlled flatness: the last 10% of the stream against the same tokens in a FRESH stream that
    starts RESTART_WARMUP tokens earlier (BOS + text slice; positions from 0, a full window of real context
    before the segment). Same text, same window content: a ratio near 1 means the stream's length (hundreds
    of thousands of tokens, far past the trained context) costs nothing."""
    n = len(tokens)
    seg = n - n // 10
    fresh = [tokens[0]] + tokens[seg - RESTART_WARMUP : n]
    fresh_lps = stream_logprobs(llm, fresh, "restart check")
    offset = 1 + RESTART_WARMUP  # position of tokens[seg] in `fresh`
    stream_ppl = mean_ppl(lps, seg, n)
    fresh_ppl = mean_ppl(fresh_lps, offset, len(fresh))
    return {"segment": [seg, n], "stream_ppl": stream_ppl, "fresh_stream_ppl": fresh_ppl,
            "ratio": stream_ppl / fresh_ppl, "warmup_tokens": RESTART_WARMUP}  # fmt: skip


def stream_logprobs(llm, tokens: list[int], label: str) -> list[float]:
    """Feeds `tokens` as one request; returns log p(tokens[i+1] | tokens[:i+1]) for every i (a progress bar
    follows the engine's computed tokens; the engine must run in-process)."""
    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sinks.kv.introspection import scheduler_of

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0)
    stream_logprobs.count = getattr(stream_logprobs, "count", 0) + 1
    engine.add_request(f"stream-{stream_logprobs.count}", TokensPrompt(prompt_token_ids=tokens), params)
    scheduler = scheduler_of(llm)
    final = None
    with tqdm(total=len(tokens), desc=label, unit="tok", mininterval=2.0) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final = out
            done = max((r.num_computed_tokens for r in scheduler.requests.values()), default=len(tokens))
            bar.update(max(0, min(done, len(tokens)) - bar.n))
        bar.update(len(tokens) - bar.n)
    assert final is not None and final.prompt_logprobs is not None
    lps = []
    for i, entry in enumerate(final.prompt_logprobs[1:], start=1):
        lp = entry[tokens[i]].logprob
        lps.append(lp if math.isfinite(lp) else float("nan"))
    return lps


def make_llm(
    model: str,
    config: dict,
    n_tokens: int,
    dtype: str,
    max_batched: int | None,
    gpu_util: float,
    eager: bool = True,
):
    from vllm import LLM

    kw = dict(model=model, dtype=dtype, enable_prefix_caching=False, max_num_seqs=1, seed=0,
              gpu_memory_utilization=gpu_util, max_model_len=n_tokens + 8)  # fmt: skip
    if max_batched:
        kw["max_num_batched_tokens"] = max_batched
    import torch

    kw["enforce_eager"] = eager or not torch.cuda.is_available()
    if config["kind"] == "sinks":
        sinks = {"sink_tokens": config["sink_tokens"], "window_tokens": config["window_tokens"]}
        kw.update(attention_backend="SINKS", additional_config={"sinks": sinks})
    return LLM(**kw)


def reference_logprobs(model: str, tokens: list[int], sink_tokens: int, window_tokens: int) -> list[float]:
    """The independent float64 StreamingLLM (tests/reference.py), token by token."""
    sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
    from reference import StreamingLlama

    return StreamingLlama(model, sink_tokens, window_tokens).token_logprobs(tokens)


def evaluate(config: dict, model: str, tokens: list[int], dtype: str, gpu_util: float, a) -> dict:
    """One config: engine start, the stream, buckets, flatness and (SINKS) the reference slice."""
    n = min(len(tokens), config.get("max_tokens", len(tokens)))
    t0 = time.perf_counter()
    llm = make_llm(model, config, n, dtype, a.max_num_batched_tokens, gpu_util, a.enforce_eager)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    lps = stream_logprobs(llm, tokens[:n], config["label"])
    elapsed = time.perf_counter() - t0
    entry = dict(config, tokens=n, startup_s=round(startup, 1), eval_s=round(elapsed, 1),
                 tokens_per_s=round(n / elapsed, 1), mean_ppl=math.exp(-sum(lps) / len(lps)),
                 bucket_ppl=bucket_ppl(lps, a.bucket))  # fmt: skip
    if n > 11024:
        entry["flatness"] = flatness(lps)
    if config["kind"] == "sinks" and n >= 4 * RESTART_WARMUP:
        entry["restart_check"] = restart_check(llm, tokens[:n], lps)
    if config["kind"] == "sinks" and a.reference_tokens:
        k = min(a.reference_tokens, n)
        ref = reference_logprobs(model, tokens[:k], config["sink_tokens"], config["window_tokens"])
        diffs = [abs(x - y) for x, y in zip(lps[: k - 1], ref, strict=True)]
        entry["reference"] = {"tokens": k, "max_abs_logprob_diff": max(diffs),
                              "mean_abs_logprob_diff": sum(diffs) / len(diffs),
                              "bucket_ppl_vllm": bucket_ppl(lps[: k - 1], a.bucket),
                              "bucket_ppl_reference": bucket_ppl(ref, a.bucket)}  # fmt: skip
    return entry


def _json_safe(x):
    """NaN/inf (dense attention past the model's rotary table) -> None, so the JSON stays standard."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=200_000, help="length of the stream (the text's first N)")
    p.add_argument("--configs", default="4:1020,0:1020,4:256,0:256,dense")
    p.add_argument("--bucket", type=int, default=1000)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--reference-tokens", type=int, default=0)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="prefill-only workload: CUDA graphs do not matter, start-up does")  # fmt: skip
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from prepare.py")
    p.add_argument("--out", default=None)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--single-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # dense:N past the trained context
    import torch
    from prepare import kjv_text, kjv_tokens, smollm2_dir

    cuda = torch.cuda.is_available()
    model = a.model or smollm2_dir()
    with open(os.path.join(model, "config.json")) as f:
        trained = json.load(f)["max_position_embeddings"]
    all_tokens = kjv_tokens(model)
    tokens = all_tokens[: a.tokens]
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    gpu_util = a.gpu_memory_utilization or (0.5 if cuda else 0.3)
    result = {
        "benchmark": "streaming perplexity (prompt logprobs, one request per config)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "CPU",
        "command": " ".join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "model": model, "trained_context": trained, "dtype": dtype, "text": kjv_text(),
        "text_tokens_total": len(all_tokens), "bucket": a.bucket, "configs": {},
    }  # fmt: skip
    if a.single:
        with open(a.single_out, "w") as f:
            json.dump(_json_safe(evaluate(json.loads(a.single), model, tokens, dtype, gpu_util, a)), f)
        return {}
    prov = os.path.join(model, "provenance.json")
    if os.path.exists(prov):
        with open(prov) as f:
            result["model_provenance"] = json.load(f)
    for config in parse_configs(a.configs, trained):
        # One process per config: each engine starts and ends in a clean process.
        with tempfile.NamedTemporaryFile("r", suffix=".json") as tmp:
            cmd = [sys.executable, os.path.abspath(__file__), "--single", json.dumps(config), "--single-out",
                   tmp.name, "--tokens", str(len(tokens)), "--model", model, "--dtype", dtype,
                   "--gpu-memory-utilization", str(gpu_util), "--bucket", str(a.bucket),
                   "--reference-tokens", str(a.reference_tokens),
                   "--enforce-eager" if a.enforce_eager else "--no-enforce-eager"]  # fmt: skip
            if a.max_num_batched_tokens:
                cmd += ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]
            subprocess.run(cmd, check=True)
            entry = json.load(tmp)
        result["configs"][config["label"]] = entry
        print(json.dumps({k: v for k, v in entry.items() if "bucket_ppl" not in k}, default=str), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    run()
