"""A 10-turn chat through the OpenAI chat API against `vllm serve --attention-backend SINKS`:
with prefix caching, turn k computes only its new tokens (per-request cached-token counts), and every reply
equals what an engine with prefix caching off answers to the same prompt (the token ids the server saw).
The conversation grows far past S + W, so the hits consist of sink blocks plus the window blocks before the
new text, with the middle blocks freed."""

from __future__ import annotations

import pytest
from engines import shut_down
from serving import vllm_server

S, W, B = 4, 60, 16
TURNS = 10
COMMON = [
    "--attention-backend", "SINKS", "--enforce-eager", "--block-size", str(B), "--dtype", "float32",
    "--gpu-memory-utilization", "0.3", "--max-num-seqs", "4", "--enable-prompt-tokens-details",
    "--additional-config", f'{{"sinks": {{"sink_tokens": {S}, "window_tokens": {W}}}}}',
]  # fmt: skip
QUESTIONS = [
    "hello there, tell me a story about the sea",
    "what happened to the boats under the stone bridge",
    "and the children, what did they count",
    "tell me more about the old mill",
    "one two three four five six seven eight",
    "the quick brown fox jumps over the lazy dog",
    "why do the first words anchor what follows",
    "what does the cat do in the warm afternoon sun",
    "how can a stream never end",
    "thank you, please finish the story",
]


def _converse(server) -> tuple[list[list[int]], list[dict], list[list[int]]]:
    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    messages: list[dict] = []
    replies, turns, prompts = [], [], []
    previous: list[int] = []
    for k in range(TURNS):
        messages.append({"role": "user", "content": QUESTIONS[k]})
        r = client.chat.completions.create(
            model=server.model,
            messages=messages,
            max_tokens=40,
            temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        choice = r.choices[0]
        prompt_ids = list(r.prompt_token_ids)
        out_ids = list(choice.token_ids)
        common = 0
        for a, b in zip(prompt_ids, previous, strict=False):
            if a != b:
                break
            common += 1
        cached = r.usage.prompt_tokens_details.cached_tokens if r.usage.prompt_tokens_details else 0
        turns.append({"turn": k, "prompt_tokens": len(prompt_ids), "reusable": common, "cached": cached or 0})
        replies.append(out_ids)
        prompts.append(prompt_ids)
        previous = prompt_ids + out_ids
        messages.append({"role": "assistant", "content": choice.message.content})
    return replies, turns, prompts


def _answer_without_cache(path: str, prompts: list[list[int]]) -> list[list[int]]:
    """Each turn's prompt, one at a time as the server got them, through an in-process engine with the
    server's settings and prefix caching off."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with pytest.MonkeyPatch.context() as env:  # vLLM reads it when the engine is built
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = LLM(model=path, attention_backend="SINKS", enforce_eager=True, block_size=B, dtype="float32",
                  gpu_memory_utilization=0.3, max_num_seqs=4, enable_prefix_caching=False,
                  distributed_executor_backend="uni",
                  additional_config={"sinks": {"sink_tokens": S, "window_tokens": W}})  # fmt: skip
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    replies = [list(llm.generate([TokensPrompt(prompt_token_ids=p)], params)[0].outputs[0].token_ids)
               for p in prompts]  # fmt: skip
    shut_down(llm)
    return replies


@pytest.fixture(scope="module")
def conversations(model_dir, tmp_path_factory):
    path = model_dir()
    logs = tmp_path_factory.mktemp("prefix")
    with vllm_server(path, COMMON, str(logs / "on.log")) as on:
        with_cache = _converse(on)
    without_cache = _answer_without_cache(path, with_cache[2])
    return with_cache, without_cache


def test_turns_compute_only_new_tokens(conversations):
    (_, turns, _), _ = conversations
    for t in turns:
        print(t)
    assert turns[-1]["prompt_tokens"] > 5 * (S + W), "the conversation must grow far past S + W"
    for t in turns[1:]:
        # Everything reusable is hit, but for the partial last block (hits are whole blocks, and the last
        # prompt token is always recomputed).
        assert t["cached"] >= (t["reusable"] // B) * B - B
        new_tokens = t["prompt_tokens"] - t["reusable"]
        assert t["prompt_tokens"] - t["cached"] <= new_tokens + 2 * B


def test_replies_equal_with_caching_off(conversations):
    (on, _, _), off = conversations
    assert on == off
