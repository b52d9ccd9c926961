"""Builds tiny, seeded Llama-architecture checkpoints locally (nothing is downloaded): Llama, Mistral (a
Llama with a sliding window in every layer) and GPT-J.

Used by the tests, the examples and the README's quick start:
    python -m vllm_sinks_testing.tiny_model /tmp/tiny-llama            # default shape
    python -m vllm_sinks_testing.tiny_model /tmp/m --head-dim 128 --kv-heads 1 --rope llama3
The tokenizer is a byte-level BPE trained on a built-in text, with a minimal chat template.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

_CORPUS = """
The river ran past the old mill and under the stone bridge, and the children counted the boats.
A stream that never ends still needs a place to begin: the first words anchor what follows.
Attention sinks keep the first tokens of a conversation so that a model can keep talking forever.
One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen.
User: hello there. Assistant: hello, how can I help you today? User: tell me a story about the sea.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass
class TinyLlamaSpec:
    """Shape of a tiny Llama. head_dim * heads need not equal hidden_size (Llama allows it)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 256
    vocab_size: int = 384
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None)
    partial_rotary_factor: float = 1.0
    initializer_range: float = 0.08
    dtype: str = "float32"
    seed: int = 0
    # Set: a Mistral checkpoint (same weights as Llama) whose layers all have this sliding window.
    sliding_window: int | None = None


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=1 << 30
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(out_dir: str, spec: TinyLlamaSpec | None = None) -> str:
    """Writes config, float weights (safetensors) and tokenizer to out_dir; returns out_dir. Idempotent:
    an existing checkpoint with the same spec is kept."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    spec = spec or TinyLlamaSpec()
    stamp = os.path.join(out_dir, "tiny_spec.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == asdict(spec):
                return out_dir
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = _tokenizer(spec.vocab_size)
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope_parameters.update(spec.rope_scaling)
    if spec.partial_rotary_factor != 1.0:
        rope_parameters["partial_rotary_factor"] = spec.partial_rotary_factor
    config_cls, model_cls, extra = LlamaConfig, LlamaForCausalLM, {}
    if spec.sliding_window is not None:
        config_cls, model_cls = MistralConfig, MistralForCausalLM
        extra = {"sliding_window": spec.sliding_window}
    config = config_cls(
        **extra,
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=rope_parameters,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    model = model_cls(config).to(getattr(torch, spec.dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(stamp, "w") as f:
        json.dump(asdict(spec), f)
    return out_dir


def build_tiny_gptj(out_dir: str, rotary_dim: int = 32, seed: int = 0) -> str:
    """A tiny GPT-J (interleaved, GPT-J-style partial rotary; parallel attention and MLP), float32."""
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    spec = {"arch": "gptj", "rotary_dim": rotary_dim, "seed": seed}
    stamp = os.path.join(out_dir, "tiny_spec.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == spec:
                return out_dir
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = _tokenizer(384)
    config = GPTJConfig(
        vocab_size=len(tokenizer),
        n_positions=2048,
        n_embd=256,
        n_layer=2,
        n_head=4,
        rotary_dim=rotary_dim,
        n_inner=512,
        activation_function="gelu_new",
        initializer_range=0.08,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    GPTJForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(stamp, "w") as f:
        json.dump(spec, f)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--rope", choices=["default", "llama3", "linear", "yarn"], default="default")
    p.add_argument("--partial-rotary-factor", type=float, default=1.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    scaling = {
        "default": None,
        "llama3": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        "linear": {"rope_type": "linear", "factor": 2.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    }[a.rope]
    spec = TinyLlamaSpec(
        hidden_size=a.hidden,
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        max_position_embeddings=a.max_position_embeddings,
        rope_scaling=scaling,
        partial_rotary_factor=a.partial_rotary_factor,
        dtype=a.dtype,
        seed=a.seed,
    )
    print(build_tiny_llama(a.out_dir, spec))


if __name__ == "__main__":
    main()
