"""Model-level error of SINKS on the GPU (bf16) against the float64 StreamingLLM reference, next to stock
dense attention's error on the same weights: the bf16 noise floor.

A seeded random Llama as in the exactness issue (2 layers, hidden 1024, 8 query / 2 KV heads of 128, q/k
weights sharpened x3 so attention is peaked, trained context 2048), a 3,000-token random prompt, 512-token
prefill chunks, prompt logprobs of the actual tokens. The reference (tests/reference.py) runs token by token
in float64; for positions below S + W it is plain causal attention, so stock dense (FLASH_ATTN) is compared
there. Reported per engine: mean, p99 and max absolute logprob error.
    python3 benchmarks/gpu/model_error.py --out model_error.json          # on a GPU host, ~2 min
Real weights (`--model DIR`, a float32 checkpoint such as prepare.py's dequantized Qwen2.5-Coder-1.5B) take
the KJV text's first tokens as the prompt (`--text kjv`); the reference then runs on the GPU in float64.
    python3 benchmarks/gpu/model_error.py --model DIR --text kjv --out model_error_qwen.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))


def build_model(root: str, trained_context: int = 2048) -> str:
    """The random model, q/k projections x3, saved in float32. `trained_context` (max_position_embeddings)
    changes no weight; at 4096 the 3,000-token prompt lies inside it: dense is compared at every position."""
    from safetensors.torch import load_file, save_file

    from vllm_sinks_testing.tiny_model import TinyLlamaSpec, build_tiny_llama

    suffix = "" if trained_context == 2048 else f"_{trained_context}"
    path = os.path.join(root, "model_error_llama" + suffix)
    spec = TinyLlamaSpec(
        hidden_size=1024,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        head_dim=128,
        intermediate_size=2816,
        max_position_embeddings=trained_context,
        initializer_range=0.02,
        seed=7,
    )
    build_tiny_llama(path, spec)  # fmt: skip
    mark = os.path.join(path, "sharpened")
    if not os.path.exists(mark):
        w = load_file(os.path.join(path, "model.safetensors"))
        for k in w:
            if k.endswith(("q_proj.weight", "k_proj.weight")):
                w[k] = w[k] * 3.0
        save_file(w, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        open(mark, "w").close()
    return path


def logprobs(
    path: str, prompts: list[list[int]], backend: str, S: int = 4, W: int = 1020
) -> list[list[float]]:
    """vLLM's prompt logprob of each actual token of each prompt (position i: token i given tokens < i), bf16,
    one engine for all prompts."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=path, dtype="bfloat16", enforce_eager=True, max_num_batched_tokens=512, max_logprobs=0,
              max_model_len=max(map(len, prompts)) + 8, gpu_memory_utilization=0.3,
              enable_prefix_caching=False)  # fmt: skip
    if backend == "SINKS":
        sinks = {"sink_tokens": S, "window_tokens": W}
        kw.update(attention_backend="SINKS", additional_config={"sinks": sinks})
        kw["long_prefill_token_threshold"] = 512  # whole 512-token chunks, as for dense
    else:
        kw.update(attention_backend=backend)
    if backend != "SINKS" and not torch.cuda.is_available():
        kw.pop("attention_backend")  # a CPU check of this script: vLLM's CPU attention stands in for dense
    llm = LLM(**kw)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    lps = [
        [o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))]
        for o, p in zip(outs, prompts, strict=True)
    ]
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return lps


def stats(err: torch.Tensor) -> dict:
    return {"mean": round(err.mean().item(), 5), "p99": round(torch.quantile(err, 0.99).item(), 5),
            "max": round(err.max().item(), 5), "n": err.numel()}  # fmt: skip


def largest(err: torch.Tensor, k: int = 5, seeds: list[int] | None = None) -> list[list]:
    """The k largest errors as [position of the predicted token, error], largest first (err[i] is position
    i + 1's), or [seed, position, error] for errors pooled over the prompts of `seeds` (equal lengths, one
    after another): whether two engines' tails sit at the same positions tells the function's sensitivity
    from a kernel's."""
    vals, idx = torch.topk(err, min(k, err.numel()))
    if not seeds or len(seeds) == 1:
        return [[int(i) + 1, round(float(v), 5)] for v, i in zip(vals, idx, strict=True)]
    per = err.numel() // len(seeds)
    return [
        [seeds[int(i) // per], int(i) % per + 1, round(float(v), 5)] for v, i in zip(vals, idx, strict=True)
    ]


def make_prompts(path: str, kjv: bool, seeds: list[int], tokens: int) -> list[list[int]]:
    """One prompt of `tokens` ids per seed: the KJV text's seed-th run of tokens (seed 0: its start) in the
    model's tokenizer, or seeded random ids (seed 11: the prompt of the runs before 2026-12-05)."""
    if kjv:
        sys.path.insert(0, os.path.join(HERE, "..", "quality"))
        from prepare import kjv_tokens

        text = kjv_tokens(path)
        return [text[s * tokens : (s + 1) * tokens] for s in seeds]
    return [
        torch.randint(3, 380, (tokens,), generator=torch.Generator().manual_seed(s)).tolist() for s in seeds
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--windows", default="1020,1023", help="SINKS windows W (S=4)")
    p.add_argument("--seeds", default=None,
                   help="prompts, pooled: random ids of these seeds (default 11) or, with kjv, these runs of "
                   "--tokens tokens of the text (default 0). The largest error of one prompt is one "
                   "extreme of a noisy sample (model_error_floor.py); several prompts pool it")  # fmt: skip
    p.add_argument("--root", default="/tmp/vllm_sinks_models")
    p.add_argument("--model", default=None, help="a checkpoint dir instead of the random model")
    p.add_argument("--trained-context", type=int, default=2048,
                   help="the random model's trained context (4096: dense at every position)")  # fmt: skip
    p.add_argument("--text", choices=["random", "kjv"], default=None,
                   help="default: random; kjv with --model")  # fmt: skip
    p.add_argument("--reference-device", default=None, help="default: cuda for --model, else cpu")
    p.add_argument(
        "--save-errors",
        action="store_true",
        help="also write each position's absolute error per engine (prompts one after another)",
    )
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # dense past the trained context (unused)
    from reference import StreamingLlama
    from run_record import emit, provenance

    path = a.model or build_model(a.root, a.trained_context)
    kjv = (a.text or ("kjv" if a.model else "random")) == "kjv"
    seeds = [int(x) for x in (a.seeds or ("0" if kjv else "11")).split(",")]
    prompts = make_prompts(path, kjv, seeds, a.tokens)
    ref_device = a.reference_device or ("cuda" if a.model else "cpu")
    result: dict = {
        "benchmark": "model-level logprob error vs float64 reference",
        "model": a.model or "seeded random Llama (build_model)",
        "tokens": a.tokens,
        "seeds": seeds,
        "reference_device": ref_device,
        **provenance(__file__, argv),
    }
    windows = [int(x) for x in a.windows.split(",")]
    with open(os.path.join(path, "config.json")) as f:
        trained = json.load(f).get("max_position_embeddings", 0)
    # Every vLLM engine first, then the float64 reference (a real model's float64 weights fill a GPU's share).
    dense = [torch.tensor(x, dtype=torch.float64) for x in logprobs(path, prompts, "FLASH_ATTN")]
    sinks = {W: [torch.tensor(x, dtype=torch.float64) for x in logprobs(path, prompts, "SINKS", 4, W)]
             for W in windows}  # fmt: skip

    def reference(W: int | None) -> list[torch.Tensor]:
        ref = StreamingLlama(path, 4, W, device=ref_device)
        out = [torch.tensor(ref.token_logprobs(p), dtype=torch.float64) for p in prompts]
        del ref
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out

    per_prompt: dict[str, dict] = {str(s): {} for s in seeds}

    def record(name: str, errs: list[torch.Tensor]) -> torch.Tensor:
        """Per-prompt stats under per_prompt, the pooled errors returned."""
        for s, e in zip(seeds, errs, strict=True):
            per_prompt[str(s)][name] = stats(e)
        pooled = torch.cat(errs)
        if a.save_errors:
            result.setdefault("errors", {})[name] = [round(x, 5) for x in pooled.tolist()]
        return pooled

    if trained >= a.tokens:
        # The whole prompt lies inside the model's context: dense against full attention at every position,
        # the like-for-like floor (same positions, same count) for SINKS' "all".
        dense_err = record("dense_all", [(d - r).abs() for d, r in zip(dense, reference(None), strict=True)])
        result["dense_all"] = stats(dense_err)
        result["dense_all"]["largest"] = largest(dense_err, seeds=seeds)
    for W in windows:
        want = reference(W)
        errs = [(x - r).abs() for x, r in zip(sinks[W], want, strict=True)]
        err = record(f"sinks_4+{W}", errs)
        inside = torch.cat([torch.arange(1, len(p)) <= 4 + W for p in prompts])  # plain attention there
        result[f"sinks_4+{W}"] = {"all": stats(err), "inside_window": stats(err[inside]),
                                  "past_window": stats(err[~inside])}  # fmt: skip
        result[f"sinks_4+{W}"]["all"]["largest"] = largest(err, seeds=seeds)
        if "dense_inside_window" not in result:
            dense_inside = torch.cat([(d - r).abs() for d, r in zip(dense, want, strict=True)])[inside]
            result["dense_inside_window"] = stats(dense_inside)
            result["dense_inside_window"]["positions"] = f"< {4 + W + 1}"
        d = result.get("dense_all", result["dense_inside_window"])
        s = result[f"sinks_4+{W}"]["all"]
        result[f"sinks_4+{W}"]["ratio_to_dense"] = {"p99": round(s["p99"] / d["p99"], 3),
                                                    "max": round(s["max"] / d["max"], 3)}  # fmt: skip
        if "dense_all" in result and len(seeds) > 1:
            result[f"sinks_4+{W}"]["max_ratio_per_prompt"] = [
                round(per_prompt[str(x)][f"sinks_4+{W}"]["max"] / per_prompt[str(x)]["dense_all"]["max"], 3)
                for x in seeds
            ]
        print(json.dumps({k: v for k, v in result.items() if k.startswith(("sinks", "dense"))}), flush=True)
    if len(seeds) > 1:
        result["per_prompt"] = per_prompt
    return emit(result, a.out)


if __name__ == "__main__":
    main()
