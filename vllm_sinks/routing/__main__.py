"""python -m vllm_sinks.routing --replica http://host1:8000 --replica http://host2:8000 [--port 9000]"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from vllm_sinks.routing.proxy import POLICIES, Router, build_app

    p = argparse.ArgumentParser(prog="python -m vllm_sinks.routing", description=__doc__)
    p.add_argument("--replica", action="append", required=True, help="base URL of a vllm serve replica")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--policy", choices=POLICIES, default="affinity",
                   help="affinity (default), or power-of-two: stock routing, for comparisons")  # fmt: skip
    p.add_argument("--max-load", type=int, default=64,
                   help="in-flight requests at which a replica takes no new chats")  # fmt: skip
    p.add_argument("--balance", type=float, default=1.0,
                   help="a new chat skips replicas holding this many times the mean number of chats (>= 1; "
                        "a large value: hashing alone)")  # fmt: skip
    p.add_argument("--health-interval", type=float, default=5.0, help="seconds between replica checks")
    a = p.parse_args(argv)
    router = Router(
        a.replica,
        policy=a.policy,
        max_load=a.max_load,
        health_interval_s=a.health_interval,
        balance=a.balance,
    )
    uvicorn.run(build_app(router), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
