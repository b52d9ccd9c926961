"""End to end: `vllm serve MODEL --attention-backend SINKS` as a subprocess on 127.0.0.1, driven through the
`openai` client: a streamed chat reply, OpenAI-style 4xx for bad requests while the server keeps serving,
and SINKS named in the server log."""

from __future__ import annotations

import pytest
from serving import vllm_server

SINKS_ARGS = [
    "--attention-backend", "SINKS", "--enforce-eager", "--block-size", "16", "--dtype", "float32",
    "--gpu-memory-utilization", "0.3", "--max-num-seqs", "8",
    "--additional-config", '{"sinks": {"sink_tokens": 4, "window_tokens": 60}}',
]  # fmt: skip


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    path = model_dir()
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    with vllm_server(path, SINKS_ARGS, log_path) as srv:
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
