"""SINKS on a CUDA GPU in bf16 (CUDA graphs on for the first configuration) against the float32 reference
(tests/reference.py) on the same weights: prompt log-probabilities and teacher-forced greedy tokens."""

from __future__ import annotations

import pytest
import torch
from engines import shut_down

pytestmark = pytest.mark.gpu

# (S, W, head_dim, kv_heads, enforce_eager)
CONFIGS = [
    (4, 60, 128, 2, False),
    (1, 31, 64, 4, True),
    (0, 64, 128, 1, True),
    (16, 48, 64, 2, True),
    (4, 1020, 128, 2, True),
]
PROMPT_LEN = 1600


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"S{c[0]}-W{c[1]}-hd{c[2]}-kv{c[3]}")
def engine(request, model_dir):
    from vllm import LLM

    S, W, hd, kv, eager = request.param
    path = model_dir(f"hd{hd}-kv{kv}", head_dim=hd, num_kv_heads=kv, num_heads=4)
    llm = LLM(
        model=path,
        attention_backend="SINKS",
        dtype="bfloat16",
        enforce_eager=eager,
        block_size=16,
        max_num_seqs=8,
        max_logprobs=-1,
        max_num_batched_tokens=512,
        gpu_memory_utilization=0.15,  # with a fixed KV size (no profiling): engines may run side by side
        kv_cache_memory_bytes=2 * 2**30,
        additional_config={"sinks": {"sink_tokens": S, "window_tokens": W}},
        enable_prefix_caching=False,
    )
    yield llm, path, S, W
    shut_down(llm)
    del llm
    torch.cuda.empty_cache()


def test_bf16_matches_float32_reference(engine):
    from reference import StreamingLlama
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm, path, S, W = engine
    g = torch.Generator().manual_seed(S * 1000 + W)
    prompt = torch.randint(3, 380, (PROMPT_LEN,), generator=g).tolist()
    out = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt)],
        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5),
    )[0]
    ref = StreamingLlama(path, S, W).logprobs(prompt)
    errs, agree = [], 0
    for i in range(1, PROMPT_LEN):
        d = out.prompt_logprobs[i]
        errs.append(abs(d[prompt[i]].logprob - ref[i - 1, prompt[i]].item()))
        top = next(tid for tid, lp in d.items() if lp.rank == 1)
        agree += int(top == int(ref[i - 1].argmax()))
    errs_t = torch.tensor(errs)
    frac = agree / (PROMPT_LEN - 1)
    print(
        f"S={S} W={W}: logprob abs err mean={errs_t.mean():.3e} max={errs_t.max():.3e}; "
        f"greedy agreement {frac:.4f} over {PROMPT_LEN - 1} positions"
    )
    assert frac >= 0.95
    assert errs_t.mean() < 0.05
