"""A 10-turn chat through the OpenAI chat API against `vllm serve --attention-backend SINKS`:
with prefix caching, turn k computes only its new tokens (per-request cached-token counts), and every reply
equals the same conversation served with prefix caching off. The conversation grows far past S + W, so the
hits consist of sink blocks plus the window blocks before the new text, with the middle blocks freed."""

from __future__ import annotations

import pytest
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


def _converse(server) -> tuple[list[list[int]], list[dict]]:
    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    messages: list[dict] = []
    replies, turns = [], []
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
        previous = prompt_ids + out_ids
        messages.append({"role": "assistant", "content": choice.message.content})
    return replies, turns


@pytest.fixture(scope="module")
def conversations(model_dir, tmp_path_factory):
    path = model_dir()
    logs = tmp_path_factory.mktemp("prefix")
    with vllm_server(path, COMMON, str(logs / "on.log")) as on:
        with_cache = _converse(on)
    with vllm_server(path, [*COMMON, "--no-enable-prefix-caching"], str(logs / "off.log")) as off:
        without_cache = _converse(off)
    return with_cache, without_cache


def test_turns_compute_only_new_tokens(conversations):
    (_, turns), _ = conversations
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
    (on, _), (off, _) = conversations
    assert on == off
