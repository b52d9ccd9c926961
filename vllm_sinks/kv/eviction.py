"""Eviction order of the prefix cache under SINKS: dead blocks go before any resumable state.

vLLM keeps free blocks in one LRU queue (`FreeKVCacheBlockQueue`): allocation pops the least recently freed
block and evicts its cached content. Under SINKS that order is wrong. A long stream frees its middle blocks
as its window moves on; they are dead (no later request can use them without the blocks after them, which
it also frees), yet they are younger than the resumable state (sink blocks + last W tokens) of a chat that
finished a moment earlier, so LRU evicts that state first and its next turn re-prefills the whole history.

`TieredFreeBlockQueue` is vLLM's queue with a boundary node that splits it in two segments:

    head -> [never used, and dead blocks: LRU] -> boundary -> [resumable blocks: LRU] -> tail

Allocation pops from the head (blocks without a hash are prepended there by vLLM), so every dead block is
reused before any resumable block, and among resumable blocks the least recently freed goes first. A block
goes to the dead segment when the block policy marked it dead right before freeing it (`mark_dead`);
otherwise (a finished, aborted or preempted request's blocks, anything freed by vLLM itself) it is
resumable. A mark applies to the next time the block enters the queue only.

Invariants: the boundary is always linked between the head and the tail and never returned or counted;
`num_free_blocks` counts real blocks only; iteration (`iter_blocks_after`, `get_all_free_blocks`) yields
real blocks in eviction order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock


class TieredFreeBlockQueue(FreeKVCacheBlockQueue):
    """vLLM's free-block queue with a dead segment in front of the resumable one (see module docstring)."""

    def __init__(self, queue: FreeKVCacheBlockQueue, num_blocks: int) -> None:
        """Adopts `queue`'s linked list as is; the blocks already in it (never used ones, at start-up)
        form the dead segment, so they are used before anything cached."""
        # No super().__init__: the list exists already.
        self.fake_free_list_head = queue.fake_free_list_head
        self.fake_free_list_tail = queue.fake_free_list_tail
        self.num_free_blocks = queue.num_free_blocks
        self.boundary = KVCacheBlock(block_id=-2, is_null=True)
        self._link_before(self.fake_free_list_tail, [self.boundary])
        self._dead_mark = bytearray(num_blocks)

    # -- marks --------------------------------------------------------------------------------------------
    def mark_dead(self, blocks: Iterable[KVCacheBlock]) -> None:
        """The next time these blocks enter the queue they go to the dead segment."""
        for block in blocks:
            self._dead_mark[block.block_id] = 1

    def is_marked_dead(self, block: KVCacheBlock) -> bool:
        return bool(self._dead_mark[block.block_id])

    @property
    def num_dead_blocks(self) -> int:
        """Blocks in front of the boundary (never used, unhashed and dead ones). O(dead): for tests."""
        n, curr = 0, self.fake_free_list_head.next_free_block
        while curr is not self.boundary:
            n += 1
            curr = curr.next_free_block
        return n

    # -- linking helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _link_before(node: KVCacheBlock, blocks: list[KVCacheBlock]) -> None:
        prev = node.prev_free_block
        assert prev is not None
        for block in blocks:
            prev.next_free_block = block
            block.prev_free_block = prev
            prev = block
        prev.next_free_block = node
        node.prev_free_block = prev

    # -- FreeKVCacheBlockQueue ------------------------------------------------------------------------------
    def popleft(self) -> KVCacheBlock:
        if self.num_free_blocks == 0:
            raise ValueError("No free blocks available")
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        if n == 0:
            return []
        assert self.num_free_blocks >= n
        self.num_free_blocks -= n
        boundary, marks = self.boundary, self._dead_mark
        curr = self.fake_free_list_head.next_free_block
        passed_boundary = False
        ret = []
        while len(ret) < n:
            assert curr is not None
            if curr is boundary:
                passed_boundary = True
                curr = curr.next_free_block
                continue
            ret.append(curr)
            marks[curr.block_id] = 0
            nxt = curr.next_free_block
            curr.prev_free_block = curr.next_free_block = None
            curr = nxt
        assert curr is not None
        first = self.fake_free_list_head
        if passed_boundary:
            first.next_free_block = boundary
            boundary.prev_free_block = first
            first = boundary
        first.next_free_block = curr
        curr.prev_free_block = first
        return ret

    def remove(self, block: KVCacheBlock) -> None:
        super().remove(block)
        self._dead_mark[block.block_id] = 0

    def append(self, block: KVCacheBlock) -> None:
        self.append_n([block])

    def append_n(self, blocks: list[KVCacheBlock]) -> None:
        """Dead-marked blocks to the end of the dead segment, the others to the end of the queue; each run
        keeps its order."""
        if not blocks:
            return
        marks = self._dead_mark
        dead = [b for b in blocks if marks[b.block_id]]
        if not dead:
            super().append_n(blocks)
            return
        live = [b for b in blocks if not marks[b.block_id]]
        for b in dead:
            marks[b.block_id] = 0
        self._link_before(self.boundary, dead)
        self.num_free_blocks += len(dead)
        super().append_n(live)

    def prepend_n(self, blocks: list[KVCacheBlock]) -> None:
        for b in blocks:
            self._dead_mark[b.block_id] = 0
        super().prepend_n(blocks)

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        return [b for b in super().get_all_free_blocks() if b is not self.boundary]

    def iter_blocks_after(self, cursor: KVCacheBlock | None) -> Iterator[KVCacheBlock]:
        for block in super().iter_blocks_after(cursor):
            if block is not self.boundary:
                yield block
