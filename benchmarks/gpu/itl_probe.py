"""One stream's inter-token latency on the 8B shape (dummy weights): SINKS or a stock backend, with vLLM's
async scheduling on or off. One --prompt-len prompt (2,048), --gen tokens generated (256); the time per
generated token after the first, three repeats.

    python benchmarks/gpu/itl_probe.py --backend SINKS --async-scheduling 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="SINKS")
    p.add_argument("--async-scheduling", type=int, default=1)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=2048)
    a = p.parse_args()
    from model_shapes import model_dir
    from vllm import LLM, SamplingParams

    kw = dict(model=model_dir("/tmp/vllm_sinks_models", a.shape), load_format="dummy", dtype="bfloat16",
              attention_backend=a.backend, max_model_len=a.prompt_len + a.gen + 64, max_num_seqs=4,
              gpu_memory_utilization=0.85, async_scheduling=bool(a.async_scheduling))  # fmt: skip
    if a.backend == "SINKS":
        kw["additional_config"] = {"sinks": {"sink_tokens": 4, "window_tokens": 4092}}
    llm = LLM(**kw)
    prompt = {"prompt_token_ids": [3 + i % 370 for i in range(a.prompt_len)]}
    params = SamplingParams(max_tokens=a.gen, ignore_eos=True, temperature=0.0)
    first = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    rows = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate([prompt], first, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        t2 = time.perf_counter()
        rows.append(((t2 - t1) - (t1 - t0)) / (a.gen - 1) * 1e3)
    row = {"backend": a.backend, "async_scheduling": bool(a.async_scheduling), "prompt": a.prompt_len}
    print(json.dumps({**row, "itl_ms": [round(r, 2) for r in rows]}), flush=True)


if __name__ == "__main__":
    main()
