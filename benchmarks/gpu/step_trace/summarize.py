"""Summarizes a step trace (sitecustomize.py) turn by turn: one line per session input (split at
Scheduler._update_request_as_session), then the raw events of one chosen turn.

    python benchmarks/gpu/step_trace/summarize.py TRACE [--turn N] [--raw 40]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import statistics


def load(prefix: str) -> list[dict]:
    rows = []
    for path in glob.glob(prefix + ".*"):
        pid = path[len(prefix) + 1 :]
        if not pid.isdigit():  # the sampler's and profiler's text files
            continue
        with open(path) as f:
            rows += [dict(json.loads(line), pid=pid) for line in f if line.strip()]
    return sorted(rows, key=lambda r: r["t"])


def turns(rows: list[dict]) -> list[list[dict]]:
    out, cur = [], []
    for r in rows:
        if r["k"] == "session_update" and cur:
            out.append(cur)
            cur = []
        cur.append(r)
    if cur:
        out.append(cur)
    return out


def ms(xs) -> float | None:
    return round(statistics.median(xs) * 1e3, 3) if xs else None


def describe(turn: list[dict]) -> dict:
    sched = [r for r in turn if r["k"] == "schedule"]
    busy = [r for r in sched if r.get("tokens")]
    gaps = [b["t"] - a["t"] for a, b in zip(busy, busy[1:], strict=False)]
    execs = [r for r in turn if r["k"] == "execute"]
    head = turn[0]
    first_sched = busy[0]["t"] - head["t"] if busy and head["k"] == "session_update" else None
    return {
        "prompt": head.get("prompt"),
        "max_tokens": head.get("max_tokens"),
        "steps": len(busy),
        "empty_schedules": len(sched) - len(busy),
        "tokens": collections.Counter(r["tokens"] for r in busy).most_common(3),
        "modes": collections.Counter(r.get("mode") for r in execs).most_common(3),
        "step_gap_ms_median": ms(gaps),
        "schedule_ms": ms([r["dt"] for r in sched]),
        "execute_ms": ms([r["dt"] for r in execs]),
        "sample_ms": ms([r["dt"] for r in turn if r["k"] == "sample"]),
        "update_ms": ms([r["dt"] for r in turn if r["k"] == "update"]),
        "first_step_ms": round(first_sched * 1e3, 2) if first_sched is not None else None,
        "session_update_ms": round(head["dt"] * 1e3, 3) if head["k"] == "session_update" else None,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--turn", type=int, default=-2, help="the turn whose raw events are printed")
    p.add_argument("--raw", type=int, default=40, help="how many raw events to print")
    p.add_argument("--last", type=int, default=12, help="summarize only the last N turns (0: all)")
    a = p.parse_args()
    ts = turns(load(a.trace))
    shown = ts[-a.last :] if a.last else ts
    for i, t in enumerate(shown, len(ts) - len(shown)):
        print(i, json.dumps(describe(t)))
    if ts and a.raw:
        t = ts[a.turn]
        t0 = t[0]["t"]
        for r in t[: a.raw]:
            extra = {k: v for k, v in r.items() if k not in ("k", "t", "dt", "pid")}
            print(f"{(r['t'] - t0) * 1e3:9.3f} ms  {r['k']:15s} {r['dt'] * 1e3:8.3f} ms  {json.dumps(extra)}")


if __name__ == "__main__":
    main()
