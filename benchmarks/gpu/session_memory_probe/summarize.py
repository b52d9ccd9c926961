"""Summarizes a memory probe (sitecustomize.py): one line per probe point of the engine core, then each
quantity's growth in bytes per session token between the first and the last point, and, given the
benchmark's JSON, each process's resident-memory slope between its first and last checkpoints.

    python benchmarks/gpu/session_memory_probe/summarize.py PROBE.jsonl [BENCH.json]
"""

from __future__ import annotations

import json
import sys


def quantities(row: dict) -> dict[str, float]:
    """kB of each quantity at one probe point."""
    rollup, maps, malloc = row["smaps_rollup_kb"], row["resident_kb_by_mapping"], row["mallinfo2_kb"]
    pinned = row.get("pinned_host_allocator") or {}
    return {
        "rss": rollup.get("Rss", 0),
        "anon": rollup.get("Anonymous", 0),
        "map_heap": maps.get("heap", 0),
        "map_anon": maps.get("anonymous", 0),
        "map_nvidia": maps.get("nvidia", 0),
        "map_shm": maps.get("shm", 0),
        "malloc_used": malloc.get("uordblks", 0),
        "malloc_free": malloc.get("fordblks", 0),
        "malloc_mmapped": malloc.get("hblkhd", 0),
        "pinned_alloc": pinned.get("allocated_bytes.current", 0) / 1024,
        "pinned_active": pinned.get("active_bytes.current", 0) / 1024,
        "row_staging": (row.get("row_staging_pinned_bytes") or 0) / 1024,
    }


def main(argv: list[str]) -> None:
    rows = [json.loads(line) for line in open(argv[0]) if line.strip()]
    if not rows:
        print("no probe points")
        return
    names = list(quantities(rows[0]))
    print("tokens".rjust(9), *(n.rjust(12) for n in names))
    for row in rows:
        q = quantities(row)
        print(str(row["session_tokens"]).rjust(9), *(f"{q[n]:12.0f}" for n in names))
    first, last = rows[0], rows[-1]
    tokens = last["session_tokens"] - first["session_tokens"]
    if tokens > 0:
        q0, q1 = quantities(first), quantities(last)
        print(f"bytes per session token, {first['session_tokens']} -> {last['session_tokens']}:")
        print("  " + ", ".join(f"{n} {(q1[n] - q0[n]) * 1024 / tokens:.1f}" for n in names))
    if len(argv) > 1:
        bench = json.load(open(argv[1]))
        a, b = bench["checkpoints"][0], bench["checkpoints"][-1]
        span = max(1, b["session_tokens"] - a["session_tokens"])
        slopes = {
            k.rsplit(" ", 1)[0]: round((b["rss_mib"][k] - v) * 2**20 / span, 1)
            for k, v in a["rss_mib"].items()
            if k in b["rss_mib"]
        }
        span_text = f"{a['session_tokens']} -> {b['session_tokens']}"
        total = bench.get("rss_bytes_per_session_token")
        print(f"resident memory per session token by process ({span_text}):", slopes, "total", total)


if __name__ == "__main__":
    main(sys.argv[1:])
