"""Where a SINKS layer's KV cache puts a block's keys and values in memory."""

from __future__ import annotations

import os

LAYOUT_ENV = "VLLM_SINKS_KV_LAYOUT"


def block_major_kv_pages() -> bool:
    """True when each block's K and V must be one contiguous page (block-major): when a KV connector moves
    pages (vLLM's offloading worker copies page_size_bytes at block_id x page_size_bytes), or when
    VLLM_SINKS_KV_LAYOUT=block_major asks for it (tests, A/B). Otherwise K of every block, then V of every
    block, the layout SINKS' kernels were measured with."""
    choice = os.environ.get(LAYOUT_ENV, "").strip()
    if choice not in ("", "block_major", "split"):
        raise ValueError(f"{LAYOUT_ENV}={choice!r}: expected 'block_major' or 'split'")
    if choice:
        return choice == "block_major"
    from vllm.config import get_current_vllm_config_or_none
    from vllm.distributed.kv_transfer import has_kv_transfer_group

    if has_kv_transfer_group():
        return True
    config = get_current_vllm_config_or_none()
    return config is not None and config.kv_transfer_config is not None
