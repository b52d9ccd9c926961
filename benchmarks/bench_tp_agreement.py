"""Multi-GPU agreement: SINKS with tensor / pipeline parallelism on Ray gives the outputs of one GPU.

Dummy weights are drawn per shard (they differ between TP sizes), so a seeded random checkpoint is saved
once with transformers and every run loads it. Per parallel layout (one engine each, in its own process):
  * teacher-forced: 32 streams of P random prompt tokens, the top-1 token at every prompt position
    (prompt_logprobs=1): the greedy choice given the same prefix;
  * free-running: the greedy continuation of G tokens after each prompt.
Agreement with TP=1 = share of positions whose token is identical (free-running: position by position, so
one early divergence counts every later position as different).

    python benchmarks/bench_tp_agreement.py --layouts tp1,tp2,pp2 --out benchmarks/results/tp_agreement.json
(tpN/ppN with N > 1 use --distributed-executor-backend ray; start a local head first: `ray start --head`.)
CPU smoke (CI): --layouts tp1 --shape tiny --streams 2 --prompt-len 96 --gen 16 --window-tokens 60
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# A ~0.7B Llama with head dim 128 and 8 KV heads (TP up to 8 shards heads evenly).
SHAPES = {
    "llama-0.7b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=32000,
    ),  # fmt: skip
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=384,
    ),  # fmt: skip
}


def make_checkpoint(path: str, shape: str, seed: int, dtype: str, lm_head_scale: float = 5.0) -> str:
    """Saves a seeded random Llama (lm_head scaled so that top-1 choices are decisive, not near-ties)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_sinks_testing.tiny_model import _tokenizer

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=0,
                      eos_token_id=1, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    _tokenizer(384).save_pretrained(path)
    return path


def run_layout(a, layout: str, out_path: str) -> None:
    """One engine in this process: teacher-forced top-1 and greedy continuations -> JSON."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tp = int(layout[2:]) if layout.startswith("tp") else 1
    pp = int(layout[2:]) if layout.startswith("pp") else 1
    sinks = {"sink_tokens": a.sink_tokens, "window_tokens": a.window_tokens}
    kw = dict(model=a.checkpoint, dtype=a.dtype, enforce_eager=a.enforce_eager, seed=0,
              max_num_seqs=a.streams, max_model_len=a.prompt_len + a.gen + 16, enable_prefix_caching=False,
              tensor_parallel_size=tp, pipeline_parallel_size=pp, attention_backend="SINKS",
              additional_config={"sinks": sinks})  # fmt: skip
    if tp * pp > 1:
        kw["distributed_executor_backend"] = a.executor
    if a.gpu_memory_utilization:
        kw["gpu_memory_utilization"] = a.gpu_memory_utilization
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    rng = random.Random(1234)
    prompts = [[rng.randrange(3, 380) for _ in range(a.prompt_len)] for _ in range(a.streams)]
    sp_tf = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False, temperature=0)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp_tf, use_tqdm=True)
    top1 = []
    for o in outs:
        row = []
        for entry in o.prompt_logprobs[1:]:
            row.append(min(entry, key=lambda t, e=entry: e[t].rank))
        top1.append(row)
    sp = SamplingParams(max_tokens=a.gen, temperature=0, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=True)
    greedy = [list(o.outputs[0].token_ids) for o in outs]
    with open(out_path, "w") as f:
        run_s = round(time.perf_counter() - t0, 1)
        json.dump({"layout": layout, "tp": tp, "pp": pp, "startup_s": round(startup, 1), "run_s": run_s,
                   "top1": top1, "greedy": greedy}, f)  # fmt: skip


def agreement(x: list[list[int]], y: list[list[int]]) -> float:
    same = total = 0
    for a, b in zip(x, y, strict=True):
        same += sum(int(p == q) for p, q in zip(a, b, strict=True))
        total += len(a)
    return same / total


def first_divergence(x: list[list[int]], y: list[list[int]]) -> list[int | None]:
    out = []
    for a, b in zip(x, y, strict=True):
        out.append(next((i for i, (p, q) in enumerate(zip(a, b, strict=True)) if p != q), None))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="tp1,tp2,pp2")
    p.add_argument("--shape", default="llama-0.7b", choices=sorted(SHAPES))
    p.add_argument("--checkpoint", default=None, help="default: $TMPDIR/vllm_sinks_models/<shape>-seed0")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=3072)
    p.add_argument("--gen", type=int, default=1024)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=1020)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--executor", default="ray", help="distributed executor for N > 1 (ray or mp)")
    p.add_argument("--lm-head-scale", type=float, default=5.0, help="x initializer std of lm_head")
    p.add_argument("--runs-dir", default=None, help="keep each layout's raw outputs here; reuse ones found")
    p.add_argument("--out", default=None)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--single-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    root = os.environ.get("TMPDIR", "/tmp") + "/vllm_sinks_models"
    name = f"{a.shape}-seed0-{a.dtype}" + (f"-head{a.lm_head_scale:g}" if a.lm_head_scale != 5.0 else "")
    a.checkpoint = a.checkpoint or os.path.join(root, name)
    if a.single:
        run_layout(a, a.single, a.single_out)
        return {}
    make_checkpoint(a.checkpoint, a.shape, 0, a.dtype, a.lm_head_scale)
    runs = {}
    for layout in a.layouts.split(","):
        if a.runs_dir and os.path.exists(os.path.join(a.runs_dir, layout + ".json")):
            with open(os.path.join(a.runs_dir, layout + ".json")) as f:
                runs[layout] = json.load(f)
            continue
        with tempfile.NamedTemporaryFile("r", suffix=".json") as tmp:
            cmd = [sys.executable, os.path.abspath(__file__), "--single", layout, "--single-out", tmp.name,
                   "--checkpoint", a.checkpoint, "--shape", a.shape, "--streams", str(a.streams),
                   "--prompt-len", str(a.prompt_len), "--gen", str(a.gen), "--dtype", a.dtype,
                   "--sink-tokens", str(a.sink_tokens), "--window-tokens", str(a.window_tokens),
                   "--executor", a.executor, "--lm-head-scale", str(a.lm_head_scale),
                   "--enforce-eager" if a.enforce_eager else "--no-enforce-eager"]  # fmt: skip
            if a.gpu_memory_utilization:
                cmd += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
            subprocess.run(cmd, check=True)
            runs[layout] = json.load(tmp)
        if a.runs_dir:
            os.makedirs(a.runs_dir, exist_ok=True)
            with open(os.path.join(a.runs_dir, layout + ".json"), "w") as f:
                json.dump(runs[layout], f)
    base = runs[a.layouts.split(",")[0]]
    result = {
        "benchmark": "multi-GPU agreement (SINKS, Ray executor for N > 1)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if cuda else "CPU",
        "command": " ".join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "shape": a.shape, "dtype": a.dtype, "streams": a.streams, "prompt_len": a.prompt_len, "gen": a.gen,
        "sink_tokens": a.sink_tokens, "window_tokens": a.window_tokens, "enforce_eager": a.enforce_eager,
        "lm_head_scale": a.lm_head_scale, "executor": a.executor,
        "baseline": base["layout"], "layouts": {},
    }  # fmt: skip
    for layout, r in runs.items():
        div = first_divergence(base["greedy"], r["greedy"])
        result["layouts"][layout] = {
            "tp": r["tp"], "pp": r["pp"], "startup_s": r["startup_s"], "run_s": r["run_s"],
            "teacher_forced_top1_agreement": agreement(base["top1"], r["top1"]),
            "greedy_position_agreement": agreement(base["greedy"], r["greedy"]),
            "greedy_streams_identical": sum(d is None for d in div),
            "greedy_first_divergence": div,
        }  # fmt: skip
        print(layout, {k: v for k, v in result["layouts"][layout].items() if k != "greedy_first_divergence"})
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
