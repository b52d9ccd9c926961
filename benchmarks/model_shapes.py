"""Model directories for benchmarks: a real model's shape (config.json) with the tiny local tokenizer,
for `load_format="dummy"` runs; nothing is downloaded."""

from __future__ import annotations

import json
import os

SHAPES = {
    # Llama-3.1-8B: 32 layers, GQA 32/8, head dim 128.
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=384,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}


def model_dir(root: str, shape: str, sliding_window: int | None = None) -> str:
    """A directory with config.json of `shape` (all layers sliding if sliding_window) and a tokenizer."""
    from vllm_sinks_testing.tiny_model import _tokenizer

    name = f"{shape}-sw{sliding_window}" if sliding_window else shape
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    cfg = dict(
        SHAPES[shape],
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        rms_norm_eps=1e-5,
        hidden_act="silu",
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    if sliding_window:
        cfg["sliding_window"] = sliding_window
        cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        _tokenizer(384).save_pretrained(path)
    return path
