"""End to end: `vllm serve MODEL --attention-backend SINKS` as a subprocess on 127.0.0.1, driven through the
`openai` client: a streamed chat reply, OpenAI-style 4xx for bad requests while the server keeps serving,
and SINKS named in the server log. The server loads the plugin's endpoints (VLLM_PLUGINS=sinks): live
sessions over HTTP (/v1/sessions), their errors, a client that disconnects mid-reply, the idle timeout, and
no KV block left held afterwards. The examples that talk to a server run against it too.

Prefix caching: a 10-turn chat through the OpenAI chat API, where turn k computes only its new tokens
(per-request cached-token counts) and every reply equals what an engine with prefix caching off answers to
the same prompt (the token ids the server saw). The chat grows far past S + W, so the hits consist of sink
blocks plus the window blocks before the new text, with the middle blocks freed."""

from __future__ import annotations

import os
import sys

import pytest
from engines import shut_down
from serving import vllm_server

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

SINKS_ARGS = [
    "--attention-backend", "SINKS", "--enforce-eager", "--block-size", "16", "--dtype", "float32",
    "--gpu-memory-utilization", "0.3", "--max-num-seqs", "8", "--enable-prompt-tokens-details",
    "--additional-config", '{"sinks": {"sink_tokens": 4, "window_tokens": 60}}',
]  # fmt: skip


S, W, B = 4, 60, 16  # as in SINKS_ARGS
SESSION_ENV = {"VLLM_PLUGINS": "sinks", "VLLM_SINKS_MAX_SESSIONS": "3", "VLLM_SINKS_SESSION_IDLE_S": "8",
               "VLLM_SINKS_MAX_MESSAGE_TOKENS": "300"}  # fmt: skip


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    path = model_dir()
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    with vllm_server(path, SINKS_ARGS, log_path, env=SESSION_ENV) as srv:
        yield srv.base_url, path, srv.proc, srv


def test_streamed_chat_reply(server):
    import openai

    base, path, _, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=path,
        messages=[{"role": "user", "content": "tell me a story about the sea"}],
        max_tokens=100,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},  # a random tiny model may emit EOS at once
    )
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(chunks) > 10 and "".join(chunks)


def test_log_names_sinks_backend(server):
    text = server[3].log()
    assert "SINKS attention backend: sink_tokens=4, window_tokens=60" in text
    assert "re-encoding rotary positions" in text


def test_bad_requests_get_4xx_and_server_keeps_serving(server):
    import openai

    base, path, proc, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=path, prompt="hi", max_tokens=-5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=path, prompt="hi", max_tokens=10, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=5)
    ok = client.completions.create(model=path, prompt="hello there", max_tokens=20, temperature=0)
    assert ok.choices[0].text and proc.poll() is None


def test_metrics_endpoint_exports_sinks_metrics(server):
    """/metrics carries the SINKS block-policy metrics next to vLLM's own, and they move with traffic."""
    import urllib.request

    import openai

    base, path, _, srv = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    # A prompt longer than S + W so that the window frees blocks while it is computed.
    client.completions.create(model=path, prompt="word " * 300, max_tokens=40, temperature=0,
                              extra_body={"ignore_eos": True})  # fmt: skip
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("vllm_sinks:"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
            if name.startswith("vllm_sinks:config_info"):
                assert 'sink_tokens="4"' in name and 'window_tokens="60"' in name
    assert "vllm:kv_cache_usage_perc" in text  # vLLM's own metrics still there
    assert values["vllm_sinks:config_info"] == 1
    bound = values["vllm_sinks:request_blocks_bound"]
    assert 0 < values["vllm_sinks:request_held_blocks_peak"] <= bound
    assert values["vllm_sinks:window_freed_blocks_total"] > 0
    decode = values["vllm_sinks:decode_blocks_bound"]
    assert 0 < decode <= bound
    # The stated capacity, on /metrics and in the start-up log (test_many_chats.py checks it is enforced).
    streams = values["vllm_sinks:max_concurrent_streams"]
    assert streams >= values["vllm_sinks:max_concurrent_streams_cold"] >= 1
    assert values["vllm_sinks:max_concurrent_prefills"] >= 1
    assert values["vllm_sinks:held_blocks"] == 0 and values["vllm_sinks:streams"] == 0  # all finished
    assert f"up to {int(streams)} streams decode at once" in srv.log()
    assert f"a stream holds <= {int(decode)} KV blocks decoding, <= {int(bound)} prefilling" in srv.log()


def test_endless_chat_example_computes_only_new_tokens_per_turn(server):
    """examples/endless_chat.py: one chat resent whole every turn."""
    import endless_chat

    base, path, _, _ = server
    rows = endless_chat.main(["--base-url", base + "/v1", "--model", path, "--turns", "14"])
    assert rows[-1]["prompt_tokens"] > 5 * 64
    # From the second turn on, the server computes the new text only (plus at most a partial block or two
    # where re-tokenized history differs from the generated tokens), however long the conversation.
    computed = [r["computed_prompt_tokens"] for r in rows[2:]]
    assert max(computed) < 0.5 * rows[-1]["prompt_tokens"], rows
    # The server's KV blocks for the conversation (from /metrics, mid-reply, decode only): one sink block and
    # the blocks of the 60-token window, a handful, while the conversation grows past 80 blocks: flat.
    # A reply the random model ends at once (EOS, temperature 0.7) has no sample; one such turn is allowed.
    blocks = [r["server_kv_blocks"] for r in rows]
    sampled = [b for b in blocks if b is not None]
    assert len(sampled) >= len(rows) - 1 and all(0 < b <= 8 for b in sampled), blocks
    assert rows[-1]["prompt_tokens"] // 16 > 80


def test_multi_tenant_example_with_disconnects_leaves_no_kv_in_use(server):
    """examples/multi_tenant.py: 8 tenants, 40% of replies dropped mid-stream."""
    import multi_tenant

    base, path, proc, _ = server
    args = ["--base-url", base, "--model", path, "--tenants", "8", "--turns", "3", "--drop", "0.4"]
    stats = multi_tenant.main(args)
    assert proc.poll() is None
    assert stats["dropped"] > 0 and stats["turns"] == 8 * 3
    assert stats["kv_cache_usage_peak"] > 0.0  # the metric moves while tenants talk ...
    assert stats["kv_cache_usage_after"] == 0.0  # ... and every block is back once they are gone


def _sse(resp, lines=None) -> tuple[str, list[dict]]:
    """(reply text, chunks) of a /v1/sessions/ID/messages event stream read to its [DONE] (`lines`: the
    response's line iterator when some lines were already read)."""
    import json

    chunks = []
    for line in lines if lines is not None else resp.iter_lines():
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks), chunks
            chunks.append(json.loads(line[6:]))
    raise AssertionError("the stream ended without [DONE]")


def _held_blocks_after_a_step(base: str, path: str) -> dict:
    """The plugin's block metrics after one more engine step (they are recorded per step)."""
    import urllib.request

    import openai

    openai.OpenAI(base_url=base + "/v1", api_key="unused").completions.create(
        model=path, prompt="hi", max_tokens=2, temperature=0)  # fmt: skip
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0].split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("vllm_sinks:")}  # fmt: skip


def test_session_over_http(server):
    """Create, two messages (chat template on the first, the second appended), list, close; then 404."""
    import httpx

    base, path, _, _ = server
    with httpx.Client(base_url=base, timeout=60) as c:
        sid = c.post("/v1/sessions", json={"max_tokens": 24, "temperature": 0}).json()["id"]
        for msg in ("tell me about the sea", "and about the mountains"):
            with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"content": msg}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                text, chunks = _sse(r)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        info = {s["id"]: s for s in c.get("/v1/sessions").json()["data"]}[sid]
        assert info["messages"] == 2 and info["tokens"] > 0 and not info["streaming"]
        assert c.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "hello?"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    m = _held_blocks_after_a_step(base, path)
    assert m["vllm_sinks:live_sessions"] == 0 and m["vllm_sinks:held_blocks"] == 0


def test_session_errors_are_4xx_and_nothing_is_lost(server):
    """Bad bodies 400, oversized 413, a second message while a reply streams 409 (the session stays
    usable), over the cap 429; a client gone mid-reply ends its session and frees its blocks."""
    import time

    import httpx

    base, path, proc, _ = server
    with httpx.Client(base_url=base, timeout=60) as c:
        sid = c.post("/v1/sessions", json={"ignore_eos": True}).json()["id"]  # a random model's EOS
        assert c.post("/v1/sessions", json={"max_tokens": -1}).status_code == 400
        assert c.post("/v1/sessions", json={"colour": "red"}).status_code == 400
        assert c.post(f"/v1/sessions/{sid}/messages", content=b"not json").status_code == 400
        assert c.post(f"/v1/sessions/{sid}/messages", json={}).status_code == 400
        r = c.post(f"/v1/sessions/{sid}/messages", json={"prompt": "word " * 400})
        assert r.status_code == 413 and "VLLM_SINKS_MAX_MESSAGE_TOKENS" in r.json()["error"]["message"]
        # A second message while the reply streams: 409, and the session answers afterwards.
        body = {"prompt": "once upon a time", "max_tokens": 600}
        with c.stream("POST", f"/v1/sessions/{sid}/messages", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            busy = c.post(f"/v1/sessions/{sid}/messages", json={"prompt": "again"})
            assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
            _sse(r, lines)
        short = {"prompt": " and then", "max_tokens": 8}
        with c.stream("POST", f"/v1/sessions/{sid}/messages", json=short) as r:
            assert r.status_code == 200 and _sse(r)[1]
        # The cap (3): two more fit, the fourth is refused.
        others = [c.post("/v1/sessions", json={"ignore_eos": True}).json()["id"] for _ in range(2)]
        r = c.post("/v1/sessions", json={})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sessions"
        # A client that disconnects mid-reply: the session ends (404 afterwards) and returns its blocks.
        with c.stream("POST", f"/v1/sessions/{others[0]}/messages", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break
        deadline = time.time() + 30
        while others[0] in {s["id"] for s in c.get("/v1/sessions").json()["data"]}:
            assert time.time() < deadline, "the disconnected session is still listed"
            time.sleep(0.5)
        assert c.post(f"/v1/sessions/{others[0]}/messages", json={"prompt": "x"}).status_code == 404
        for s in (sid, others[1]):
            assert c.delete(f"/v1/sessions/{s}").status_code == 200
    m = _held_blocks_after_a_step(base, path)
    assert m["vllm_sinks:live_sessions"] == 0 and m["vllm_sinks:held_blocks"] == 0 and proc.poll() is None


def test_idle_session_times_out(server):
    """VLLM_SINKS_SESSION_IDLE_S=8 here: an unused session is closed (and its blocks returned)."""
    import time

    import httpx

    base, path, _, _ = server
    with httpx.Client(base_url=base, timeout=60) as c:
        sid = c.post("/v1/sessions", json={"max_tokens": 4}).json()["id"]
        with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"prompt": "hello"}) as r:
            _sse(r)
        deadline = time.time() + 30
        while sid in {s["id"] for s in c.get("/v1/sessions").json()["data"]}:  # listing does not touch it
            assert time.time() < deadline, "the idle session was not closed"
            time.sleep(2)
        assert c.post(f"/v1/sessions/{sid}/messages", json={"prompt": "x"}).status_code == 404
    assert _held_blocks_after_a_step(base, path)["vllm_sinks:held_blocks"] == 0


def test_session_chat_example(server):
    """examples/session_chat.py: the streaming demo's prompts as one live session over HTTP."""
    import session_chat

    base, path, _, _ = server
    turns = session_chat.converse(base, prompts=3, max_tokens=12, quiet=True)
    assert len(turns) == 3
    tokens = [t["session_tokens"] for t in turns]
    assert tokens[0] > 0 and tokens[0] < tokens[1] < tokens[2]  # one growing session
    assert _held_blocks_after_a_step(base, path)["vllm_sinks:live_sessions"] == 0  # closed at the end


# --- prefix caching through the server ---

TURNS = 10
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
def conversations(server):
    """The 10-turn chat through this module's server (prefix caching on, vLLM's default), and each turn's
    prompt answered again by an in-process engine with caching off. Other tests' prompts in the cache can
    only add hits; the checks bound the tokens computed from above."""
    _, path, _, srv = server
    with_cache = _converse(srv)
    return with_cache, _answer_without_cache(path, with_cache[2])


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
