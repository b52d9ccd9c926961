"""KV-cache spec and block manager for sink + window layers.

A stream's logical blocks are [sink blocks][freed middle: null blocks][window blocks][chunk]. Invariants:

* the first `ceil(S / B)` blocks of a request are never freed while it runs (they hold the sink tokens);
* a block is returned to the pool as soon as every one of its tokens lies outside both the sinks and the
  window of the next token to compute; its slot in the block table becomes the null block;
* so a running request holds at most `ceil(S/B) + ceil((W + in-flight tokens)/B) + 1` blocks, whatever its
  length, and that same bound sizes the pool (`max_memory_usage_bytes`) and caps admission (capacity.py).

Prefix caching: a prompt hits the cache when its sink blocks and the `ceil(W / B)` blocks before the hit
point are cached; middle blocks need not be (they are nulls in the returned hit). What a later request can
hit is a stream's resumable state: its sink blocks and the blocks of its last W tokens when it ends (next
turn), or of the W tokens before its prompt's end (a regenerate). A block that leaves the window outside
both is dead and is marked so before it is freed: the pool reuses dead blocks before any resumable state
(eviction.TieredFreeBlockQueue).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHashList, KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager, resolve_block_hashes
from vllm.v1.kv_cache_interface import KVCacheSpec, SlidingWindowSpec

from vllm_sinks.kv.eviction import TieredFreeBlockQueue


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """Sliding window of W + 1 tokens (vLLM counts the query itself) plus `sink_tokens` pinned tokens.
    `in_flight_batches`: steps scheduled but not yet computed (vLLM's max_concurrent_batches);
    `prefill_chunk_tokens`: the most prompt tokens one step gives one request (0: vLLM's token budget)."""

    sink_tokens: int
    in_flight_batches: int = 1
    prefill_chunk_tokens: int = 0

    @property
    def window_tokens(self) -> int:
        return self.sliding_window - 1

    @property
    def num_sink_blocks(self) -> int:
        return cdiv(self.sink_tokens, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        """What a prefilling stream holds at most: ceil(S/B) + ceil((W + its tokens in flight)/B) + 1, never
        more than max_model_len needs. vLLM sizes the pool by it and admits a prompt while it is free."""
        if self.prefill_chunk_tokens:
            own = self.in_flight_batches * self.prefill_chunk_tokens
            max_in_flight_tokens = min(max_in_flight_tokens, own)
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(self.num_sink_blocks + window, cdiv(max_model_len, self.block_size) + 1)

    def decode_blocks(self) -> int:
        """What a decoding stream holds at most: ceil(S/B) + ceil((W + tokens in flight)/B) + 1."""
        return self.num_sink_blocks + cdiv(self.window_tokens + self.in_flight_batches, self.block_size) + 1

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(spec, SinkWindowSpec)
            and spec.sliding_window == self.sliding_window
            and spec.sink_tokens == self.sink_tokens
            for spec in kv_cache_specs.values()
        )


class SinkWindowManager(SlidingWindowManager):
    """SlidingWindowManager that keeps the sink blocks of every request."""

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.num_sink_blocks = kv_cache_spec.num_sink_blocks
        # Introspection, kept incrementally (O(1) per step): real blocks each request holds now, the most
        # any request has held since start-up, and blocks the window has returned to the pool.
        self.held_blocks: dict[str, int] = {}
        self.max_held_blocks = 0
        self.num_window_freed_blocks = 0
        self.num_sink_block_hits = 0
        # Admission reserves what running streams may still grow to (see _outstanding_growth).
        self.prefilling: set[str] = set()
        # request id -> (first sink position, count) a KV connector loads (add_local_computed_blocks).
        self.external_sinks: dict[str, tuple[int, int]] = {}
        self._decode_bound = kv_cache_spec.decode_blocks()

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _count(self, request_id: str, delta: int) -> None:
        held = self.held_blocks.get(request_id, 0) + delta
        self.held_blocks[request_id] = held
        if held > self.max_held_blocks:
            self.max_held_blocks = held

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        new_blocks = super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        self._count(request_id, len(new_blocks))
        return new_blocks

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        self.held_blocks.pop(request_id, None)
        self.prefilling.discard(request_id)
        self.external_sinks.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def _outstanding_growth(self) -> int:
        """Blocks the running streams may still take: each up to its bound (prefill bound while its prompt
        is not computed, decode bound after). Admission keeps them free, so no admitted stream ever
        needs a preemption to grow. O(running streams)."""
        prefill_bound = self._max_admission_blocks_per_request or self._decode_bound
        growth = 0
        for request_id, held in self.held_blocks.items():
            bound = prefill_bound if request_id in self.prefilling else self._decode_bound
            if held < bound:
                growth += bound - held
        return growth

    def _num_freeable_blocks(self, num_computed_tokens: int) -> int:
        """Blocks [0, n) lie wholly before the window of the next token; of those, [sinks, n) are freeable."""
        return self.get_num_skipped_tokens(num_computed_tokens) // self.block_size

    def regenerate_blocks(self, num_prompt_tokens: int | None) -> range:
        """Indices of the blocks a resend of this prompt hits besides the sinks: the ceil(W/B) blocks before
        the longest block-aligned hit vLLM looks for (the last prompt token is always recomputed)."""
        if num_prompt_tokens is None:
            return range(0)
        end = (num_prompt_tokens - 1) // self.block_size
        return range(max(0, end - cdiv(self.sliding_window - 1, self.block_size)), end)

    # -- allocation --------------------------------------------------------------------------------------
    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
    ) -> int:
        num = super().get_num_blocks_to_allocate(
            request_id,
            num_tokens,
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            num_tokens_main_model,
            apply_admission_cap,
        )
        if request_id in self.num_cached_block:
            return num
        if apply_admission_cap:  # vLLM's admission gate for a new request
            num += self._outstanding_growth()
        skipped = self._num_freeable_blocks(total_computed_tokens)
        sinks = min(self.num_sink_blocks, skipped)
        if total_computed_tokens > num_local_computed_tokens:
            # A KV connector loads the sink blocks the local hit does not cover: new blocks.
            num += sinks - min(sinks, len(new_computed_blocks))
        if not new_computed_blocks:
            return num
        # The base class treats every block before the window as skipped; the sink blocks among them are
        # touched too, so the evictable ones count against free capacity.
        return num + self._get_num_evictable_blocks(new_computed_blocks[:sinks])

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[KVCacheBlock],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        """[local sink hits][null run][local window hits]. Sink positions that external (KV connector)
        tokens cover but the local hit does not stay null here; allocate_external_computed_blocks gives them
        new blocks after every group touched its hits (vLLM's order)."""
        req_blocks = self.req_to_blocks[request_id]
        assert len(req_blocks) == 0
        skipped = self._num_freeable_blocks(num_local_computed_tokens + num_external_computed_tokens)
        sinks = min(self.num_sink_blocks, skipped, len(new_computed_blocks))
        kept_head = list(new_computed_blocks[:sinks])
        num_nulls = max(skipped - sinks, 0)
        kept_tail = list(new_computed_blocks[max(skipped, sinks) :])
        if num_external_computed_tokens > 0 and sinks < min(self.num_sink_blocks, skipped):
            self.external_sinks[request_id] = (sinks, min(self.num_sink_blocks, skipped) - sinks)
        if self.enable_caching:
            self.block_pool.touch(kept_head + kept_tail)
        else:
            assert not any(new_computed_blocks), "computed blocks must be empty without prefix caching"
        req_blocks.extend(kept_head)
        req_blocks.extend([self._null_block] * num_nulls)
        req_blocks.extend(kept_tail)
        # Blocks still to cache start at the first sink a connector loads (cache_full_blocks skips nulls).
        pending = self.external_sinks.get(request_id)
        self.num_cached_block[request_id] = pending[0] if pending else len(req_blocks)
        self.num_sink_block_hits += len(kept_head)
        self._count(request_id, len(kept_head) + len(kept_tail))

    def allocate_external_computed_blocks(
        self, request_id: str, num_local_computed_tokens: int, num_external_computed_tokens: int
    ) -> None:
        """New blocks for the tokens a KV connector loads: the sink positions add_local_computed_blocks left
        null, then (vLLM's) the window blocks after the local ones. The middle stays null."""
        req_blocks = self.req_to_blocks[request_id]
        start, missing = self.external_sinks.pop(request_id, (0, 0))
        if missing:
            new_blocks = self.block_pool.get_new_blocks(missing)
            req_blocks[start : start + missing] = new_blocks
            if self._record_new_block_ids:
                self.new_block_ids.extend(b.block_id for b in new_blocks)
            self._count(request_id, missing)
        before = len(req_blocks)
        super().allocate_external_computed_blocks(
            request_id, num_local_computed_tokens, num_external_computed_tokens
        )
        self._count(request_id, len(req_blocks) - before)

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        """Frees blocks [sink blocks, first window block) and puts null blocks in their place."""
        if num_prompt_tokens is not None:
            if processed_computed_tokens < num_prompt_tokens:
                self.prefilling.add(request_id)
            else:
                self.prefilling.discard(request_id)
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        last = min(self._num_freeable_blocks(processed_computed_tokens), len(blocks))
        first = self.num_sink_blocks
        if last <= first or blocks[last - 1].is_null:
            return
        freed = 0
        for i in range(last - 1, first - 1, -1):
            if blocks[i].is_null:
                break
            freed += 1
        queue = self.block_pool.free_block_queue
        if self.enable_caching and isinstance(queue, TieredFreeBlockQueue):
            # Dead: outside the regenerate state, and released by this free (no other request holds it).
            keep = self.regenerate_blocks(num_prompt_tokens)
            queue.mark_dead(
                blocks[i] for i in range(last - freed, last) if blocks[i].ref_cnt == 1 and i not in keep
            )
        self._remove_blocks_in_range(request_id, first, last)
        self.num_window_freed_blocks += freed
        self._count(request_id, -freed)

    # -- prefix caching ----------------------------------------------------------------------------------
    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: BlockHashList,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool: BlockPool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        """Longest hit = cached sink blocks + a run of cached blocks covering the W tokens before it."""
        assert isinstance(kv_cache_spec, SinkWindowSpec)
        assert dcp_world_size == 1 and pcp_world_size == 1, "SINKS does not support context parallelism"
        block_size = kv_cache_spec.block_size
        assert alignment_tokens % block_size == 0, "SINKS needs block-aligned prefix-cache hits"
        block_hashes = resolve_block_hashes(
            block_hashes,
            block_pool.hash_block_size,
            block_size,
            supports_fine_grained_hash_lookup=cls.supports_fine_grained_hash_lookup,
            alignment_tokens=alignment_tokens,
        )
        num_groups = len(kv_cache_group_ids)
        empty: tuple[list[KVCacheBlock], ...] = tuple([] for _ in range(num_groups))
        max_blocks = min(max_length // block_size, len(block_hashes))
        sink_blocks = min(kv_cache_spec.num_sink_blocks, max_blocks)
        run_needed = cls._contiguous_blocks_for_hit(
            kv_cache_spec.sliding_window, block_size, drop_eagle_block
        )
        align_blocks = alignment_tokens // block_size

        def cached(i: int) -> list[KVCacheBlock] | None:
            return block_pool.get_cached_block(block_hashes[i], kv_cache_group_ids)

        sinks: list[list[KVCacheBlock]] = []
        for i in range(sink_blocks):
            hit = cached(i)
            if hit is None:
                break
            sinks.append(hit)
        num_sinks = len(sinks)
        # A hit of n blocks is valid if blocks [0, min(num_sink_blocks, n)) are cached and blocks
        # [max(0, n - run_needed), n) are cached. Search n from the right.
        best_n, run = 0, []
        # Scan right to left keeping the current contiguous run of cached blocks.
        run_blocks: list[list[KVCacheBlock]] = []
        run_end = max_blocks
        for i in range(max_blocks - 1, -1, -1):
            hit = cached(i) if i >= num_sinks else sinks[i]
            if hit is None:
                run_blocks, run_end = [], i
                continue
            run_blocks.append(hit)
            covers_window = len(run_blocks) >= run_needed or i == 0
            sinks_ok = num_sinks >= min(kv_cache_spec.num_sink_blocks, i)
            if covers_window and sinks_ok and run_end % align_blocks == 0:
                best_n, run = run_end, run_blocks[::-1]
                break
        if best_n == 0:
            # Prefix of contiguously cached blocks from 0 (shorter than a full window).
            prefix: list[list[KVCacheBlock]] = []
            for i in range(max_blocks):
                hit = cached(i) if i >= num_sinks else sinks[i]
                if hit is None:
                    break
                prefix.append(hit)
            n = len(prefix) - len(prefix) % align_blocks
            if n == 0:
                return empty, 0
            best_n, run = n, prefix[:n]
        if drop_eagle_block:
            best_n -= 1
            run = run[:-1]
            if best_n <= 0:
                return empty, 0
        run_start = best_n - len(run)
        computed = tuple([] for _ in range(num_groups))
        for g in range(num_groups):
            head = [sinks[i][g] for i in range(min(num_sinks, run_start))]
            nulls = [block_pool.null_block] * (run_start - len(head))
            computed[g].extend(head + nulls + [blk[g] for blk in run])
        return computed, best_n * block_size

    @classmethod
    def reachable_block_mask(cls, *args, **kwargs) -> list[bool] | None:
        """Cache every full block: sink blocks and window blocks are both hit candidates."""
        return None
