"""The reference itself: with a window longer than the sequence it must equal the plain transformers model."""

from __future__ import annotations

import pytest
import torch
from test_equality import MODELS

# Partial rotary is checked against transformers through GPT-J, whose partial rotary transformers implements
# the way vLLM does (the first rotary_dim dims). transformers' Llama reads partial_rotary_factor only to size
# its frequencies, so a partial-rotary Llama is compared with vLLM (test_equality), not with transformers.
HF_COMPARABLE = [m for m in MODELS if "partial" not in m] + ["gptj"]


@pytest.mark.parametrize("model", HF_COMPARABLE)
def test_reference_equals_transformers_without_eviction(model, model_dir, tmp_path_factory):
    from reference import StreamingLlama
    from transformers import AutoModelForCausalLM

    from vllm_sinks_testing.tiny_model import build_tiny_gptj

    if model == "gptj":
        path = build_tiny_gptj(str(tmp_path_factory.mktemp("gptj")))
    else:
        path = model_dir(model, **MODELS[model])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    tokens = torch.randint(3, 380, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.log_softmax(hf(tokens).logits[0], dim=-1)
    got = StreamingLlama(path, sink_tokens=4, window_tokens=None).logprobs(tokens[0].tolist())
    assert (got - want).abs().max().item() < 1e-4
    # With a window shorter than the sequence the reference evicts: it differs after S + W tokens only.
    windowed = StreamingLlama(path, sink_tokens=4, window_tokens=30).logprobs(tokens[0].tolist())
    assert (windowed[:35] - want[:35]).abs().max().item() < 1e-4
    assert (windowed[40:] - want[40:]).abs().max().item() > 1e-3
