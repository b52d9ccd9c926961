"""The prefix cache's eviction order under SINKS (no engine): dead blocks are reused before any resumable
state, resumable states least recently freed first, and the block policy marks as dead exactly the blocks
that left the window outside the regenerate state.

Paused chats end to end (an engine, CPU): test_many_chats.py::test_paused_chats_resume_from_the_cache."""

from __future__ import annotations

import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

from vllm_sinks.kv.eviction import TieredFreeBlockQueue
from vllm_sinks.kv.manager import SinkWindowManager, SinkWindowSpec

B = 4


def _pool(num_blocks: int = 32) -> tuple[BlockPool, TieredFreeBlockQueue]:
    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=B)
    queue = TieredFreeBlockQueue(pool.free_block_queue, num_blocks)
    pool.free_block_queue = queue
    return pool, queue


def _cache(pool: BlockPool, blocks) -> None:
    for b in blocks:
        pool._insert_block_hash(make_block_hash_with_group_id(BlockHash(b"h%d" % b.block_id), 0), b, B)


def test_dead_blocks_are_reused_before_resumable_ones():
    pool, queue = _pool()
    a = pool.get_new_blocks(4)  # 1..4: a chat's state, freed first (oldest)
    d = pool.get_new_blocks(4)  # 5..8: middle blocks of another stream, freed later
    c = pool.get_new_blocks(4)  # 9..12: a second state, freed last
    _cache(pool, a + d + c)
    u = pool.get_new_blocks(2)  # 13, 14: never cached
    never_used = pool.get_num_free_blocks()
    pool.free_blocks(a)
    queue.mark_dead(d)
    pool.free_blocks(d)
    pool.free_blocks(c)
    pool.free_blocks(u)
    order = [b.block_id for b in queue.get_all_free_blocks()]
    # unhashed first (vLLM prepends them), then the never-used blocks, then dead, then states by age
    assert order[:2] == [13, 14]
    assert order[2 + never_used :] == [5, 6, 7, 8, 1, 2, 3, 4, 9, 10, 11, 12]
    assert queue.num_free_blocks == len(order) == pool.num_gpu_blocks - 1  # all but the null block
    assert queue.num_dead_blocks == 2 + never_used + 4
    # Allocation follows that order and evicts the hashes of what it reuses.
    taken = pool.get_new_blocks(2 + never_used + 5)
    assert [b.block_id for b in taken[-5:]] == [5, 6, 7, 8, 1]
    assert pool.get_cached_block(BlockHash(b"h5"), [0]) is None
    assert pool.get_cached_block(BlockHash(b"h2"), [0]) is not None
    assert [b.block_id for b in queue.get_all_free_blocks()] == [2, 3, 4, 9, 10, 11, 12]
    # A mark applies once: reused blocks carry none.
    assert not any(queue.is_marked_dead(b) for b in taken)


def test_touch_and_iteration_skip_the_boundary():
    pool, queue = _pool(8)
    blocks = pool.get_new_blocks(7)
    _cache(pool, blocks)
    queue.mark_dead(blocks[:3])
    pool.free_blocks(blocks)
    assert [b.block_id for b in queue.iter_blocks_after(None)] == [1, 2, 3, 4, 5, 6, 7]
    pool.touch([blocks[0], blocks[4]])  # a prefix-cache hit removes them from the queue
    assert [b.block_id for b in queue.get_all_free_blocks()] == [2, 3, 4, 6, 7]
    assert queue.num_free_blocks == 5 and queue.num_dead_blocks == 2
    assert [b.block_id for b in pool.get_new_blocks(5)] == [2, 3, 4, 6, 7]
    assert queue.num_free_blocks == 0 and queue.get_all_free_blocks() == []


def _manager(pool: BlockPool, S: int, W: int) -> SinkWindowManager:
    spec = SinkWindowSpec(
        block_size=B, num_kv_heads=1, head_size=8, dtype=torch.float32, sliding_window=W + 1, sink_tokens=S
    )
    return SinkWindowManager(
        spec, block_pool=pool, enable_caching=True, kv_cache_group_id=0, scheduler_block_size=B
    )


def test_policy_marks_dead_only_outside_the_regenerate_state():
    S, W = 2, 8  # 1 sink block; a hit needs the 2 blocks before it
    pool, queue = _pool(64)
    manager = _manager(pool, S, W)
    prompt = 40  # 10 blocks; a resend hits at block 9 (token 39 is recomputed): blocks 7, 8 are its state
    assert list(manager.regenerate_blocks(prompt)) == [7, 8]
    manager.allocate_new_blocks("r", prompt + 12, prompt + 12)  # prompt and 12 generated tokens: 13 blocks
    blocks = list(manager.req_to_blocks["r"])
    _cache(pool, blocks)
    manager.remove_skipped_blocks("r", prompt + 12, num_prompt_tokens=prompt)  # window: tokens 44..52
    freed = [b.block_id for b in queue.get_all_free_blocks() if b.block_hash is not None]
    dead = [b.block_id for b in blocks[1:11] if b.block_hash is not None and queue_position_is_dead(queue, b)]
    assert sorted(freed) == [b.block_id for b in blocks[1:11]]  # blocks 1..10 left the window
    assert dead == [b.block_id for b in blocks[1:7] + blocks[9:11]]  # all but the regenerate state 7, 8
    # What the request still holds (sink block + window) is resumable when it ends.
    manager.free("r")
    tail = [b.block_id for b in queue.get_all_free_blocks()][-5:]
    assert sorted(tail) == sorted(b.block_id for b in [blocks[0], *blocks[11:13], blocks[7], blocks[8]])


def queue_position_is_dead(queue: TieredFreeBlockQueue, block) -> bool:
    curr = queue.fake_free_list_head.next_free_block
    while curr is not queue.boundary:
        if curr is block:
            return True
        curr = curr.next_free_block
    return False


def test_a_block_another_request_holds_is_not_marked():
    S, W = 2, 8
    pool, queue = _pool(64)
    manager = _manager(pool, S, W)
    manager.allocate_new_blocks("r", 60, 60)
    blocks = list(manager.req_to_blocks["r"])
    _cache(pool, blocks)
    pool.touch([blocks[3]])  # a second request holds block 3 (e.g. a shared prefix)
    manager.remove_skipped_blocks("r", 60, num_prompt_tokens=60)
    assert blocks[3].ref_cnt == 1 and not queue.is_marked_dead(blocks[3])
