"""Ray Serve LLM request routers over two SINKS replicas (CPU, tiny model): the replica-routing tests' chats
(16 chats x 6 turns, 4 at a time, tests/chat_turns.py) through one app per router, one after another, each
with a deadline. Per router: turns answered, later turns whose history was found in the prefix cache, the
share of reusable tokens found cached, and the time the chats took.

    python benchmarks/bench_ray_serve_routers.py --out OUT.json            # ~10 min on 2 cores

Routers (`--routers`, class paths): vllm_sinks' ChatAffinityRouter; Ray Serve LLM's PrefixCacheAffinityRouter
as shipped; the same with Ray Serve's FIFOMixin in front (`FIFOPrefixCacheAffinityRouter` below: Ray's own
power-of-two router has it, PrefixCacheAffinityRouter does not); Ray Serve's default (power of two choices).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

try:  # importable by Ray's workers through PYTHONPATH (set in main)
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter
    from ray.serve.request_router import FIFOMixin

    class FIFOPrefixCacheAffinityRouter(FIFOMixin, PrefixCacheAffinityRouter):
        """PrefixCacheAffinityRouter with FIFOMixin in front: a routing task whose request was taken over
        hands the replica it chose to the oldest waiting request (as Ray's power-of-two router does)."""

except ImportError:  # Ray Serve not installed: main() says so
    pass

ROUTERS = {
    "chat_affinity": "vllm_sinks.routing.ray_serve:ChatAffinityRouter",
    "prefix_cache_affinity": "ray.serve.llm.request_router:PrefixCacheAffinityRouter",
    "prefix_cache_affinity_fifo": "bench_ray_serve_routers:FIFOPrefixCacheAffinityRouter",
    "power_of_two": None,
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", default=",".join(ROUTERS), help=f"some of {', '.join(ROUTERS)}")
    p.add_argument("--deadline", type=float, default=180.0, help="seconds the chats may take per router")
    p.add_argument("--model-root", default=os.environ.get("TMPDIR", "/tmp") + "/vllm_sinks_models")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_router(name: str, path: str, deadline: float) -> dict:
    from chat_turns import CHATS, TURNS, Chat, summarize, take_turns
    from ray import serve
    from ray.serve.llm import build_openai_app

    from vllm_sinks.routing.ray_serve import sinks_llm_config

    engine = dict(enforce_eager=True, block_size=16, dtype="float32", max_num_seqs=8,
                  kv_cache_memory_bytes=64 << 20, enable_prompt_tokens_details=True)  # fmt: skip
    deployment: dict = {"max_ongoing_requests": 8}
    if ROUTERS[name] is not None:
        deployment["request_router_config"] = {"request_router_class": ROUTERS[name]}
    config = sinks_llm_config(name, path, sink_tokens=4, window_tokens=60, num_replicas=2, affinity=False,
                              engine_kwargs=engine, placement_group_config={"bundles": [{"CPU": 1}]},
                              deployment_config=deployment)  # fmt: skip
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.time()
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    started = time.time() - t0
    chats = [Chat(f"http://127.0.0.1:{port}", name, c) for c in range(CHATS)]
    errors: list[str] = []

    def talk() -> None:
        try:
            take_turns(chats, TURNS)
        except Exception as e:  # the app is shut down at the deadline: its requests fail
            errors.append(repr(e)[:200])

    worker = threading.Thread(target=talk, daemon=True)
    t0 = time.time()
    worker.start()
    worker.join(deadline)
    elapsed = time.time() - t0
    timed_out = worker.is_alive()
    answered = sum(chat.k for chat in chats)
    later = [t for chat in chats for t in chat.turns]
    serve.shutdown()
    worker.join(60)
    return {
        "router": ROUTERS[name] or "Ray Serve's default (power of two choices)",
        "app_start_s": round(started, 1),
        "turns_answered": answered,
        "of_turns": CHATS * TURNS,
        "timed_out_after_s": round(deadline) if timed_out else None,
        "chats_s": round(elapsed, 1),
        **({"later_turns": summarize(later)} if later else {}),
        "errors": errors if not timed_out else [],
    }


def main(argv=None) -> dict:
    a = parse(argv)
    try:
        import ray
    except ImportError:
        sys.exit("Ray Serve LLM is not installed: bash scripts/setup.sh installs ray[serve]")
    from run_record import emit, provenance

    from vllm_sinks_testing.tiny_model import TinyLlamaSpec, build_tiny_llama

    names = a.routers.split(",")
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        sys.exit(f"unknown routers {unknown}: choose from {', '.join(ROUTERS)}")
    path = build_tiny_llama(os.path.join(a.model_root, "tiny-llama"), TinyLlamaSpec())  # the tests' model
    # Ray's workers import the FIFO router from this folder; four engines' probes need a longer deadline on
    # 2 cores (as tests/test_ray_serve.py sets).
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "2")
    os.environ.setdefault("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "10")
    ray.init(num_cpus=16, include_dashboard=False)
    results = {}
    try:
        for name in names:
            results[name] = run_router(name, path, a.deadline)
            print(name, results[name], flush=True)
    finally:
        ray.shutdown()
    result = {
        "benchmark": "Ray Serve LLM request routers over two SINKS replicas (16 chats x 6 turns)",
        "ray": ray.__version__,
        "routers": results,
        **provenance(__file__, argv),
    }
    return emit(result, a.out)


if __name__ == "__main__":
    main()
