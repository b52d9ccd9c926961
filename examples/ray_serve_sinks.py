"""SINKS on Ray Serve LLM: N replicas of one model behind Ray Serve's OpenAI app, each chat's turns routed to
the replica that holds its state (vllm_sinks.routing.ray_serve.ChatAffinityRouter).

    python examples/ray_serve_sinks.py --model Qwen/Qwen2.5-1.5B-Instruct --replicas 2
    # then any OpenAI client against http://127.0.0.1:8000/v1, model "sinks"; a client that names its
    # conversations sends the X-Session-ID header

The same deployment as a `serve run` config: examples/ray_serve_sinks.yaml. Every node needs vllm_sinks
installed (vLLM loads the plugin in each replica from the package's entry points).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model path or hub id")
    p.add_argument("--model-id", default="sinks", help="the model name clients send")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=1020)
    p.add_argument("--cpu", action="store_true", help="vLLM-CPU replicas (placement bundles of 1 CPU)")
    p.add_argument("--stock-router", action="store_true", help="Ray Serve's default router, for comparison")
    args = p.parse_args()

    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    from vllm_sinks.routing.ray_serve import sinks_llm_config

    extra = {"placement_group_config": {"bundles": [{"CPU": 1}]}} if args.cpu else {}
    config = sinks_llm_config(
        args.model_id, args.model, args.sink_tokens, args.window_tokens, num_replicas=args.replicas,
        engine_kwargs={"enable_prompt_tokens_details": True}, affinity=not args.stock_router, **extra,
    )  # fmt: skip
    ray.init()
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    print(
        f"serving {args.model} as {args.model_id!r} on {args.replicas} SINKS replicas: http://127.0.0.1:8000/v1"
    )
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
