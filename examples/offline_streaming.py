"""One endless stream with the offline `LLM` API, like the StreamingLLM demo: every prompt of a list is
appended to the same conversation, the model answers, and the conversation grows far past the model's
trained context while the KV blocks it holds stay flat.

    python examples/offline_streaming.py                       # a tiny local Llama on CPU (built on the fly)
    python examples/offline_streaming.py --model MODEL --window-tokens 1020 --rounds 40   # any HF model, GPU
"""

from __future__ import annotations

import argparse
import os
import time

PROMPTS = [
    "Tell me about the river that runs past the old mill.",
    "What did the children count on the stone bridge?",
    "Describe the boats one by one.",
    "What happens to the mill when winter comes?",
    "Why do the first words of a story matter so much?",
    "Continue the story with a storm at sea.",
    "Who keeps the lighthouse, and what does she see?",
    "Tell me how the story ends, and then begin a new one.",
]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model path; default: build a tiny local Llama")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=252)
    p.add_argument("--rounds", type=int, default=24, help="prompts to feed (the list repeats)")
    p.add_argument("--max-tokens", type=int, default=96)
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: KV blocks are readable
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sinks.kv.introspection import sink_managers

    model = a.model
    extra: dict = {}
    if model is None:
        from vllm_sinks_testing.tiny_model import build_tiny_llama

        model = build_tiny_llama(os.path.join(os.environ.get("TMPDIR", "/tmp"), "vllm_sinks_tiny_llama"))
        extra = dict(dtype="float32", enforce_eager=True, block_size=16, gpu_memory_utilization=0.3)
    llm = LLM(
        model=model,
        attention_backend="SINKS",
        additional_config={"sinks": {"sink_tokens": a.sink_tokens, "window_tokens": a.window_tokens}},
        max_model_len=1 << 20,
        **extra,
    )
    tokenizer = llm.get_tokenizer()
    (manager,) = sink_managers(llm)
    trained = llm.llm_engine.vllm_config.model_config.hf_text_config.max_position_embeddings
    history: list[int] = []
    rows = []
    for i in range(a.rounds):
        user = f"\nUser: {PROMPTS[i % len(PROMPTS)]}\nAssistant:"
        history += tokenizer.encode(user, add_special_tokens=not history)
        manager.max_held_blocks = 0
        t0 = time.perf_counter()
        out = llm.generate(
            [TokensPrompt(prompt_token_ids=history)],
            SamplingParams(max_tokens=a.max_tokens, temperature=0.8, seed=i, ignore_eos=True),
            use_tqdm=False,
        )[0]
        dt = time.perf_counter() - t0
        reply = list(out.outputs[0].token_ids)
        history += reply
        row = {
            "round": i,
            "stream_tokens": len(history),
            "past_trained_context": len(history) > trained,
            "kv_blocks_held_max": manager.max_held_blocks,
            "seconds": round(dt, 2),
        }
        rows.append(row)
        text = out.outputs[0].text.replace("\n", " ")[:60]
        print(
            f"round {i:3d}: stream {len(history):7d} tokens (trained context {trained}), "
            f"KV blocks held <= {manager.max_held_blocks:4d}, {dt:5.2f} s | {text}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
