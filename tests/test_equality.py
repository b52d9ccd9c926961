"""vLLM + SINKS (CPU, float32) equals the independent StreamingLLM reference (tests/reference.py).

For each configuration one engine serves several prompts at once, so chunked prefills and decodes share
batches; prompts are several times longer than S + W. Checked: every returned prompt log-probability
(|error| <= 1e-3) and greedy continuations (identical, except at a genuine tie of the reference).
"""

from __future__ import annotations

import pytest
import torch
from engines import shut_down

MODELS = {
    # name: TinyLlamaSpec fields
    "hd64-gqa": dict(head_dim=64, num_heads=4, num_kv_heads=2),
    "hd128-mqa-llama3": dict(
        head_dim=128,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=4096,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
    "hd64-partial-rotary": dict(head_dim=64, num_heads=4, num_kv_heads=4, partial_rotary_factor=0.5),
    # Mistral: every layer has its own 4096-token window, replaced by SINKS' cache (as attention_sinks does)
    "mistral-sw4096": dict(
        head_dim=64, num_heads=4, num_kv_heads=2, sliding_window=4096, max_position_embeddings=8192
    ),  # fmt: skip
}
# (S, W, model, prompt lengths)
CONFIGS = [
    (4, 60, "hd64-gqa", [400, 150, 37]),
    (4, 1020, "hd128-mqa-llama3", [3200, 300]),
    (1, 31, "hd64-partial-rotary", [300, 90]),
    (0, 64, "hd64-gqa", [400, 200]),
    (16, 48, "hd128-mqa-llama3", [400, 129]),
    (4, 60, "gptj", [350, 64]),  # GPT-J-style (interleaved) partial rotary: rotary_dim 32 of head_dim 64
    (4, 252, "mistral-sw4096", [700, 90]),  # configured with attention_sinks' names, see run()
    (2, 12, "hd64-gqa", [200, 45]),  # a window smaller than one KV block
]
GEN = 48


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"S{c[0]}-W{c[1]}-{c[2]}")
def run(request, model_dir, tmp_path_factory):
    """Serves the configuration's prompts once; returns (path, S, W, prompts, outputs)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    S, W, model, lengths = request.param
    if model == "gptj":
        from vllm_sinks_testing.tiny_model import build_tiny_gptj

        path = build_tiny_gptj(str(tmp_path_factory.mktemp("gptj")))
    else:
        path = model_dir(model, **MODELS[model])
    # One process: the engine core and its worker run in the test process (no spawned processes to start,
    # and vLLM's compiled sampler is compiled once for all configurations). vLLM reads the variable when
    # the engine is built.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = LLM(
            model=path,
            attention_backend="SINKS",
            dtype="float32",
            enforce_eager=True,
            block_size=16,
            max_num_seqs=8,
            max_logprobs=-1,
            max_num_batched_tokens=96,  # small chunks: many chunk boundaries, prefill mixed with decode
            enable_prefix_caching=False,
            gpu_memory_utilization=0.3,
            distributed_executor_backend="uni",
            additional_config={"sinks": {"attention_sink_size": S, "attention_sink_window_size": W}}
            if model.startswith("mistral")
            else {"sinks": {"sink_tokens": S, "window_tokens": W}},
        )
    g = torch.Generator().manual_seed(S * 7919 + W)
    prompts = [torch.randint(3, 380, (n,), generator=g).tolist() for n in lengths]
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True, prompt_logprobs=8),
    )
    shut_down(llm)
    del llm
    return path, S, W, prompts, outs


def test_prompt_logprobs_equal_reference(run):
    from reference import StreamingLlama

    path, S, W, prompts, outs = run
    ref = StreamingLlama(path, S, W)
    worst = 0.0
    for prompt, out in zip(prompts, outs, strict=True):
        lp = ref.logprobs(prompt)
        assert out.prompt_logprobs[0] is None
        for i in range(1, len(prompt)):
            for tid, v in out.prompt_logprobs[i].items():
                worst = max(worst, abs(v.logprob - lp[i - 1, tid].item()))
    print(f"S={S} W={W} {path}: max |prompt logprob error| = {worst:.2e}")
    assert worst <= 1e-3


def test_greedy_continuation_equals_reference(run):
    from reference import StreamingLlama

    path, S, W, prompts, outs = run
    ref = StreamingLlama(path, S, W)
    for prompt, out in zip(prompts, outs, strict=True):
        ref.greedy_mismatch(prompt, list(out.outputs[0].token_ids))
