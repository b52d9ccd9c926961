"""Two `vllm serve --attention-backend SINKS` replicas of a tiny model behind the chat-affinity router
(vllm_sinks.routing), against the same replicas behind stock routing (power of two choices, Ray Serve's
default), side by side: 16 chats x 6 turns through the OpenAI chat API, each turn of every chat (4 at a
time) before the next turn of any. With affinity every turn
after a chat's first finds its history in its replica's prefix cache (it computes only its new tokens);
with stock routing a turn that lands on the other replica re-prefills. The same for the two engines of
one `vllm serve --data-parallel-size 2` (patch 19 against vLLM's own balancer)."""

import threading
import time
import urllib.request

import pytest
from chat_turns import run_chats as _run
from serving import vllm_servers

S, W, B = 4, 60, 16
CHATS, TURNS = 16, 6
ARGS = [
    "--attention-backend", "SINKS", "--enforce-eager", "--block-size", str(B), "--dtype", "float32",
    "--gpu-memory-utilization", "0.3", "--max-num-seqs", "8", "--enable-prompt-tokens-details",
    "--additional-config", f'{{"sinks": {{"sink_tokens": {S}, "window_tokens": {W}}}}}',
]  # fmt: skip

pytestmark = pytest.mark.slow


def _serve_router(urls: list[str], policy: str):
    import uvicorn

    from vllm_sinks.routing.proxy import Router, build_app

    server = uvicorn.Server(uvicorn.Config(build_app(Router(urls, policy=policy)), host="127.0.0.1", port=0,
                                           log_level="error"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def side_by_side(model_dir, tmp_path_factory):
    path = model_dir()
    logs = tmp_path_factory.mktemp("replicas")
    results = {}
    dev = {"VLLM_SERVER_DEV_MODE": "1"}  # POST /reset_prefix_cache between the two policies
    with vllm_servers([(path, ARGS, str(logs / f"r{i}.log"), dev) for i in range(2)]) as (r0, r1):
        for policy in ("affinity", "power-of-two"):
            server, thread, url = _serve_router([r0.base_url, r1.base_url], policy)
            try:
                results[policy] = _run(url, path)
            finally:
                server.should_exit = True
                thread.join(10)
            for r in (r0, r1):  # the next policy starts from empty caches
                reset = urllib.request.Request(r.base_url + "/reset_prefix_cache", method="POST")
                urllib.request.urlopen(reset, timeout=30)
    print(f"16 chats x 6 turns over two replicas: {results}")
    return results


def test_affinity_turns_compute_only_new_tokens(side_by_side):
    affinity = side_by_side["affinity"]
    assert affinity["turns_hit"] == affinity["turns"] == CHATS * (TURNS - 1)


def test_stock_routing_loses_turns_that_affinity_keeps(side_by_side):
    stock, affinity = side_by_side["power-of-two"], side_by_side["affinity"]
    assert stock["turns_hit"] < affinity["turns_hit"]
    assert stock["cached_over_reusable"] < 0.9 * affinity["cached_over_reusable"]


@pytest.fixture(scope="module")
def data_parallel(model_dir, tmp_path_factory):
    """The same chats against one `vllm serve --data-parallel-size 2` (two engines, vLLM's own front end):
    with patch 19 (chat affinity), then with vLLM's balancer (VLLM_SINKS_DP_AFFINITY=0)."""
    path = model_dir()
    logs = tmp_path_factory.mktemp("dp")
    flags = {"affinity": "1", "vllm": "0"}
    dp = [*ARGS, "--data-parallel-size", "2"]
    specs = [(path, dp, str(logs / f"{n}.log"), {"VLLM_SINKS_DP_AFFINITY": f}) for n, f in flags.items()]
    with vllm_servers(specs) as servers:  # both start at once; the chats run against one at a time
        results = {name: _run(server.base_url, path) for name, server in zip(flags, servers, strict=True)}
    print(f"16 chats x 6 turns, --data-parallel-size 2: {results}")
    return results


def test_data_parallel_engines_keep_each_chat(data_parallel):
    affinity, stock = data_parallel["affinity"], data_parallel["vllm"]
    assert affinity["turns_hit"] == affinity["turns"] == CHATS * (TURNS - 1)
    assert stock["turns_hit"] < affinity["turns_hit"]
