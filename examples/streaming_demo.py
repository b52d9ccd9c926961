"""attention_sinks' streaming demo with vLLM: one conversation, prompt after prompt, in one growing stream.

As in attention_sinks' demo/streaming.py: the first prompt goes through the model's chat template, each later
prompt is appended to the same token stream (the reply before it stays in the stream), greedy decoding, up to
--max-new-tokens per prompt. The stream is one cache: each turn's request resends the stream and the prefix
cache serves everything but the new tokens. Three experiments, as there:
  sinks     SINKS with S sink tokens and a window of W (attention_sinks' 4 + 1020);
  windowed  the same cache size without sinks (S = 0, W = S + W): a plain sliding window;
  dense     vLLM's own attention: the stream stops where it reaches the model's trained context.
For each reply it prints its perplexity in a fresh context (the reply after its own prompt alone, scored by
the same engine, where SINKS is plain attention: how fluent the text is) and the share of distinct word
pairs (1.0: no repetition). Past the trained context dense has stopped, windowed degrades, SINKS stays fluent.

    python examples/streaming_demo.py --experiment sinks                 # SmolLM2-135M-Instruct (setup.sh)
    python examples/streaming_demo.py --model MODEL --experiment windowed --prompts 60 --max-new-tokens 1000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What is the difference between a list and a tuple in Python? Give an example of each.",
    "Explain how a bicycle stays upright while it moves.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Describe the water cycle for a ten-year-old.",
    "What are three good habits for writing readable code?",
    "Continue the lighthouse story: a storm arrives that night.",
    "How does a hash table work, and why are lookups fast?",
    "Give me a recipe for a simple vegetable soup.",
    "Write a haiku about autumn leaves.",
    "Explain recursion with a small example in Python.",
    "What causes the seasons on Earth?",
    "Summarize the lighthouse story so far in three sentences.",
    "Write a function that returns the n-th Fibonacci number iteratively.",
    "What should someone pack for a three-day hiking trip?",
    "Explain what a unit test is and why it is useful.",
]


def distinct_pairs(words: list[str]) -> float:
    pairs = list(zip(words, words[1:], strict=False))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model dir; default: SmolLM2-135M-Instruct (setup.sh)")
    p.add_argument("--experiment", choices=["sinks", "windowed", "dense"], default="sinks")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=1020)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="prompts to feed (the list repeats)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="stream limit (default: 2**20 under SINKS, dense: trained context)")  # fmt: skip
    p.add_argument("--stop-after-tokens", type=int, default=None,
                   help="end once the stream is this long (e.g. just past the trained context)")  # fmt: skip
    p.add_argument("--dtype", default=None, help="default: vLLM's (float32 on CPU)")
    p.add_argument("--enforce-eager", action="store_true", help="no compile, no CUDA graphs (faster start)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step (default: vLLM's; smaller starts faster on CPU)")  # fmt: skip
    p.add_argument("--out", default=None, help="JSON transcript")
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    model = a.model
    if model is None:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quality"))
        import prepare

        model = prepare.smollm2_dir()
    kw: dict = dict(model=model, enable_prefix_caching=True, max_logprobs=1)
    if a.dtype:
        kw["dtype"] = a.dtype
    if a.enforce_eager:
        kw["enforce_eager"] = True
    if a.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = a.max_num_batched_tokens
    if a.experiment == "dense":  # vLLM's own attention; the stream limit is the trained context
        if a.max_model_len:
            kw["max_model_len"] = a.max_model_len
    else:
        S, W = a.sink_tokens, a.window_tokens
        if a.experiment == "windowed":
            S, W = 0, S + W
        kw.update(attention_backend="SINKS", max_model_len=a.max_model_len or 1 << 20,
                  additional_config={"sinks": {"sink_tokens": S, "window_tokens": W}})  # fmt: skip
    llm = LLM(**kw)
    try:
        result = converse(llm, a, model, argv)
    finally:
        llm.llm_engine.engine_core.shutdown()  # the engine's processes end before the interpreter does
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def converse(llm, a: argparse.Namespace, model: str, argv) -> dict:
    """The experiment's conversation on `llm`: one stream over the prompts, a reply per prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sinks.sessions.chat_turns import chat_pieces, user_turn

    tok = llm.get_tokenizer()
    limit = llm.llm_engine.vllm_config.model_config.max_model_len
    trained = getattr(llm.llm_engine.vllm_config.model_config.hf_text_config, "max_position_embeddings", None)
    pieces = chat_pieces(tok)
    if pieces is None:
        raise SystemExit(f"{model} has no chat template: the demo needs a chat model")
    greedy = SamplingParams(temperature=0.0, max_tokens=a.max_new_tokens)
    score = SamplingParams(max_tokens=1, prompt_logprobs=0)
    stream: list[int] = []
    turns = []
    print(f"experiment {a.experiment}: {model}, trained context {trained}, stream limit {limit}")
    for i in range(a.prompts):
        prompt = PROMPTS[i % len(PROMPTS)]
        new = user_turn(tok, prompt, pieces if stream else None)
        if a.stop_after_tokens and len(stream) >= a.stop_after_tokens:
            print(f"--- stopped before prompt {i}: the stream ({len(stream)} tokens) reached its stop")
            break
        if len(stream) + len(new) + a.max_new_tokens > limit:
            print(f"--- stopped before prompt {i}: the stream ({len(stream)} tokens) would pass {limit}")
            break
        stream += new
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=stream)], greedy, use_tqdm=False)[0]
        seconds = time.perf_counter() - t0
        reply = [t for t in out.outputs[0].token_ids if t != tok.eos_token_id]
        stream += reply
        # The reply after its own prompt alone: a fresh, short context (plain attention under SINKS too).
        fresh = user_turn(tok, prompt)
        scored = llm.generate([TokensPrompt(prompt_token_ids=fresh + reply)], score, use_tqdm=False)[0]
        lps = [scored.prompt_logprobs[j][t].logprob for j, t in enumerate(reply, start=len(fresh)) if j > 0]
        ppl = math.exp(-sum(lps) / len(lps)) if lps else float("nan")
        text = out.outputs[0].text
        past = bool(trained and len(stream) > trained)
        distinct = round(distinct_pairs(text.split()), 3)
        turn = dict(prompt_index=i, prompt=prompt, reply=text, reply_tokens=len(reply),
                    stream_tokens=len(stream), past_trained_context=past, fresh_context_ppl=round(ppl, 3),
                    distinct_word_pairs=distinct, seconds=round(seconds, 2),
                    cached_tokens=out.num_cached_tokens)  # fmt: skip
        turns.append(turn)
        where = ", past the trained context" if past else ""
        print(f"\n### prompt {i} (stream {len(stream)} tokens{where})\nUSER: {prompt}\nASSISTANT: "
              f"{text.strip()[:600]}\n[{len(reply)} tokens, fresh-context perplexity {ppl:.2f}, distinct "
              f"word pairs {distinct:.2f}, {seconds:.1f} s, {out.num_cached_tokens} prompt tokens cached]",
              flush=True)  # fmt: skip
    print(f"\n{'prompt':>6} {'stream':>8} {'ppl':>8} {'distinct':>8}")
    for t in turns:
        print(f"{t['prompt_index']:>6} {t['stream_tokens']:>8} {t['fresh_context_ppl']:>8.2f} "
              f"{t['distinct_word_pairs']:>8.2f}")  # fmt: skip
    result = dict(experiment=a.experiment, model=model, trained_context=trained, stream_limit=limit,
                  sink_tokens=a.sink_tokens, window_tokens=a.window_tokens, max_new_tokens=a.max_new_tokens,
                  command="python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
                  turns=turns)  # fmt: skip
    return result


if __name__ == "__main__":
    main()
