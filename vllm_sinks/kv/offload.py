"""Paused chats in host memory: SINKS' policy for vLLM's KV offloading (--kv-offloading-size), scheduler side.

vLLM's OffloadingConnector sees a SinkWindowSpec group as a sliding window: it would store every block as it
streams past, look up and keep only the blocks of the last window, and load neither the sinks nor know that
the middle of a hit is null. SinkOffloadingScheduler replaces those four decisions for SINKS groups; the
transfers, the host store (its LRU) and the worker stay vLLM's. One offloaded chunk is one GPU block
(`blocks_per_chunk` 1, checked at start-up). For a stream of P prompt tokens, S sinks, W window, block B:

* store: only chunks a later request can hit, its resumable state: the ceil(S/B) sink chunks, the window
  chunks before the prompt's end (what a regenerate hits) and, once the request finishes, the window chunks
  before its end (what the next turn hits, reply included: under SINKS `offload_prompt_only` defaults to
  false). Chunks still inside the running window are stored only when they leave it or the request ends, so
  middle chunks never leave the GPU: a paused chat costs ceil(S/B) + ceil((W+1)/B) chunks on the host plus
  one per B tokens of its last reply (up to a second window), whatever its length. A block of a state that
  the pool hands out again before its chunk is stored (running streams fill the pool) is stored in that very
  step, flushed before the forward overwrites it (`_update_req_states`).
* lookup: a hit ends at chunk n when chunks [0, ceil(S/B)) and the window run before n are stored, as the GPU
  prefix cache hits (kv.manager.SinkWindowManager.find_longest_cache_hit), or when [0, n) all are.
* load: exactly the chunks whose GPU blocks the KV manager allocated for the hit (sinks and window; the
  middle are null blocks, kv.manager.SinkWindowManager.allocate_external_computed_blocks).
* touch: a hit touches its sink chunks with its window chunks, so the host's LRU evicts a chat's state as a
  whole, least recently used first.
* disk: with TieringOffloadingSpec and vLLM's file-system tier behind the CPU tier, every stored chunk is
  also written to disk (vLLM cascades each store), so the disk holds the same resumable states; a lookup that
  misses the CPU tier promotes the state's chunks from disk first. With a fixed PYTHONHASHSEED the block
  hashes, and so the file names, are the same after a restart: a paused chat resumes from disk. The queued
  writes are drained at shutdown.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import TransferJob
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import (
    OffloadingConnectorScheduler,
    RequestOffloadState,
    TransferJobStatus,
)
from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_offload.base import GPULoadStoreSpec, LookupResult, OffloadKey, OffloadPolicy
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from vllm_sinks.kv.manager import SinkWindowSpec

logger = init_logger(__name__)

# The connectors SINKS serves: vLLM's native offloading (--kv-offloading-size GiB, backend native).
SUPPORTED_CONNECTORS = ("OffloadingConnector",)
# vLLM's offloading specs SINKS serves: the CPU tier, and the CPU tier with secondary tiers behind it.
SUPPORTED_SPECS = ("CPUOffloadingSpec", "TieringOffloadingSpec")
# Secondary tiers tested with SINKS' store and load policy: vLLM's file-system tier (local disk).
SUPPORTED_SECONDARY_TIERS = ("fs",)
# Where TieringOffloadingSpec keeps its CPU tier (vllm.v1.kv_offload.cpu.shared_offload_region).
SHARED_MEMORY_DIR = "/dev/shm"


def check_offloading(vllm_config: Any) -> None:
    """Start-up check of a SINKS engine's KV connector: only vLLM's native OffloadingConnector, with its CPU
    tier alone or with file-system tiers behind it (TieringOffloadingSpec), one GPU block per offloaded chunk,
    no more host memory than the host has available (SINKS pins the CPU tier exactly, kv.host_tier; the
    tiered spec's lives in /dev/shm) and a writable directory for each disk tier. Raises with what to
    change."""
    kv_transfer = getattr(vllm_config, "kv_transfer_config", None)
    connector = getattr(kv_transfer, "kv_connector", None) if kv_transfer is not None else None
    if connector is None:
        return
    if connector not in SUPPORTED_CONNECTORS:
        hint = (
            "unset VLLM_USE_SIMPLE_KV_OFFLOAD (SINKS keeps its state through vLLM's OffloadingConnector)"
            if connector == "SimpleCPUOffloadConnector"
            else "use --kv-offloading-size GiB --kv-offloading-backend native, or serve without SINKS"
        )
        raise ValueError(
            f"--attention-backend SINKS does not support the KV connector {connector!r}: it would store and "
            f"load a SINKS stream's blocks as a plain sliding window (no sinks); {hint}"
        )
    extra = dict(kv_transfer.kv_connector_extra_config or {})
    spec_name = extra.get("spec_name", "CPUOffloadingSpec")
    if spec_name not in SUPPORTED_SPECS:
        raise ValueError(
            f"--attention-backend SINKS keeps its states in vLLM's CPU tier (CPUOffloadingSpec, or "
            f"TieringOffloadingSpec with a file-system tier behind it), not {spec_name!r} (not tested with "
            "SINKS' store and load policy): remove 'spec_name' from --kv-transfer-config's "
            "kv_connector_extra_config, or use --kv-offloading-size GiB"
        )
    if extra.get("block_size") is not None or int(extra.get("blocks_per_chunk", 1)) != 1:
        raise ValueError(
            "SINKS offloads one GPU block per chunk: remove 'block_size' / 'blocks_per_chunk' from "
            "--kv-transfer-config's kv_connector_extra_config"
        )
    if spec_name == "TieringOffloadingSpec":
        check_secondary_tiers(extra.get("secondary_tiers", []))
    cpu_bytes = extra.get("cpu_bytes_to_use")
    if cpu_bytes:
        if spec_name == "TieringOffloadingSpec" and os.path.isdir(SHARED_MEMORY_DIR):
            fs = os.statvfs(SHARED_MEMORY_DIR)
            shm = fs.f_bavail * fs.f_frsize
            if float(cpu_bytes) > shm:
                raise ValueError(
                    f"TieringOffloadingSpec keeps its CPU tier in {SHARED_MEMORY_DIR}, which has "
                    f"{shm / 2**30:.1f} GiB free, less than cpu_bytes_to_use ({float(cpu_bytes) / 2**30:g} "
                    f"GiB): lower cpu_bytes_to_use to {math.floor(shm / 2**30)} GiB or less, or give "
                    f"{SHARED_MEMORY_DIR} more room (docker run --shm-size){leftover_regions_hint()}"
                )
        import psutil

        available = psutil.virtual_memory().available
        if float(cpu_bytes) > available:  # pinned exactly (kv.host_tier), so what is asked is what is pinned
            raise ValueError(
                f"--kv-offloading-size {float(cpu_bytes) / 2**30:g} GiB of pinned host memory is more than "
                f"this host has available ({available / 2**30:.1f} GiB): lower --kv-offloading-size to "
                f"{math.floor(available / 2**30)} GiB or less"
            )


def leftover_regions_hint() -> str:
    """What /dev/shm holds of vLLM's CPU tiers (vllm_offload_<engine id>.mmap). An engine removes its own at
    shutdown; one killed (SIGKILL, the OOM killer) or an in-process engine never shut down leaves it behind,
    as large as its tier."""
    regions = sorted(glob.glob(os.path.join(SHARED_MEMORY_DIR, "vllm_offload_*.mmap")))
    if not regions:
        return ""
    size = sum(os.stat(path).st_size for path in regions if os.path.exists(path))
    return (
        f"; {len(regions)} CPU tier file(s) of earlier vLLM engines hold {size / 2**30:.1f} GiB of it "
        f"({', '.join(os.path.basename(p) for p in regions[:3])}{', ...' if len(regions) > 3 else ''}): "
        "an engine removes its own at shutdown, so if no other vLLM engine runs on this host they were left "
        "by one that was killed, and can be deleted"
    )


def check_secondary_tiers(tiers: Any) -> None:
    """Each secondary tier is vLLM's file-system tier with a writable `root_dir` (created if missing)."""
    if not isinstance(tiers, list):
        raise ValueError("'secondary_tiers' must be a list of tier configurations, e.g. "
                         '[{"type": "fs", "root_dir": "/var/lib/vllm/kv"}]')  # fmt: skip
    for tier in tiers:
        kind = tier.get("type") if isinstance(tier, dict) else None
        if kind not in SUPPORTED_SECONDARY_TIERS:
            raise ValueError(
                f"--attention-backend SINKS serves vLLM's file-system tier behind the CPU tier "
                f"('type': 'fs'), not {kind!r} (not tested with SINKS' store and load policy): change "
                "the tier's 'type' to 'fs' or remove it from 'secondary_tiers'"
            )
        root = tier.get("root_dir")
        if not root:
            raise ValueError("the file-system tier needs a directory: add 'root_dir' to its configuration")
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise ValueError(f"the file-system tier's root_dir {root!r} cannot be created ({e}): "
                             "choose a directory the server can write") from e  # fmt: skip
        if not os.access(root, os.W_OK | os.X_OK):
            raise ValueError(
                f"the file-system tier's root_dir {root!r} is not writable by this server: choose a "
                "directory it can write"
            )
    if tiers and not os.environ.get("PYTHONHASHSEED"):
        logger.warning(
            "SINKS disk tier: PYTHONHASHSEED is not set, so block hashes are seeded at random and the states "
            "on disk will not be found after a restart (they still extend the host tier while this server "
            "runs): set PYTHONHASHSEED to a fixed value for paused chats to survive a restart"
        )


def disk_tiers(manager: Any) -> list[Any]:
    """The file-system tiers behind a TieringOffloadingManager (none for vLLM's plain CPU manager)."""
    return [t for t in getattr(manager, "secondary_tiers", ()) if getattr(t, "tier_type", None) == "fs"]


class SinkOffloadingScheduler(OffloadingConnectorScheduler):
    """OffloadingConnectorScheduler whose SINKS groups store, look up, load and touch resumable states
    (module docstring). Groups of other specs keep vLLM's behaviour."""

    def __init__(self, spec: Any, vllm_config: Any, kv_cache_config: Any) -> None:
        super().__init__(spec, vllm_config, kv_cache_config)
        # group index -> (sink chunks, window chunks)
        self.sink_groups: dict[int, tuple[int, int]] = {}
        for group in self.config.kv_group_configs:
            kv_spec = kv_cache_config.kv_cache_groups[group.group_idx].kv_cache_spec
            if isinstance(kv_spec, SinkWindowSpec):
                assert group.sliding_window_size_in_chunks is not None
                sinks = cdiv(kv_spec.sink_tokens, group.tokens_per_chunk)
                self.sink_groups[group.group_idx] = (sinks, group.sliding_window_size_in_chunks)
        if self.sink_groups and "offload_prompt_only" not in spec.extra_config:
            # A chat's next turn resends its reply: the window before a turn's end is what it hits.
            self.config = self.config._replace(offload_prompt_only=False)
        if self.sink_groups and self.config.blocks_per_chunk != 1:
            raise ValueError(
                f"SINKS offloads one GPU block per chunk, not {self.config.blocks_per_chunk}: "
                "remove 'block_size' / 'blocks_per_chunk' from the connector's extra config"
            )
        # Window tokens of the SINKS groups (one W for all; checked by the spec's construction).
        self._window_tokens = (
            next(
                kv_cache_config.kv_cache_groups[g].kv_cache_spec.sliding_window - 1 for g in self.sink_groups
            )
            if self.sink_groups
            else 0
        )
        # Running requests' resumable positions whose blocks this step allocated again (to store now).
        self._reused_resumable: dict[str, list[tuple[int, int, int]]] = {}
        # Finished requests whose last stores the next step builds (`request_finished`), and whose end the
        # manager learns then.
        self._finishing: dict[str, RequestOffloadState] = {}
        self._manager_finishing: dict[str, Any] = {}
        # Counters for metrics: states' chunks stored, loaded (host -> GPU), evicted from the host tier (its
        # LRU making room for a store), and requests that hit the host.
        self.num_stored_chunks = 0
        self.num_loaded_chunks = 0
        self.num_evicted_chunks = 0
        self.num_host_hits = 0
        self.chunk_bytes = int(getattr(spec, "kv_bytes_per_chunk", 0))
        prepare_store = self.manager.prepare_store

        def counted_prepare_store(keys: Any, req_context: Any) -> Any:
            output = prepare_store(keys, req_context)
            if output is not None:
                self.num_evicted_chunks += len(output.evicted_keys)
            return output

        self.manager.prepare_store = counted_prepare_store  # this scheduler's manager only

    # -- what is stored ------------------------------------------------------------------------------------
    def _update_req_states(self, scheduler_output: SchedulerOutput) -> None:
        """vLLM's update, less its loss of resumable states under a full pool.

        vLLM zeroes a sliding-window group's not-yet-stored positions whose block was allocated again in
        this step (a stale id: a block the window freed), so they are never stored. Under SINKS two kinds of
        such positions are a chat's resumable state, lost from the GPU and the host alike when running
        streams fill the pool and the next allocation takes their blocks at once:
        * a request that just finished: its last window, stored in this very step (its store job is built
          now, from `finished_req_ids`). Its block ids are kept, and `_build_store_jobs` flushes the store.
        * a running request's block that its window freed but that a block-aligned hit at its end (or a
          regenerate) still needs (`_freed_resumable`: the window of a hit at the last block boundary
          reaches up to a block further back than the last token's). Stored now, by its own flushed job.
        Both blocks still hold the chat's KV until this step's forward writes them: a flushed store runs
        before the forward.
        upstream: flush rather than zero such blocks in OffloadingConnectorScheduler._update_req_states, as
        it does for full-attention blocks, with a KV-cache-spec hook saying which positions a hit needs."""
        if not self.sink_groups:
            return super()._update_req_states(scheduler_output)
        finished = set(scheduler_output.finished_req_ids or ())
        preempted = set(scheduler_output.preempted_req_ids or ())
        kept: list[tuple[list[int], list[int]]] = []
        watched: list[tuple[str, int, int, int]] = []  # (request, group, position, block id)
        for req_id, req_status in self._req_status.items():
            for group_idx in self.sink_groups:
                block_ids = req_status.group_states[group_idx].block_ids
                if req_id in finished:
                    kept.append((block_ids, list(block_ids)))
                elif req_id not in preempted and not req_status.req.is_finished():
                    for i in self._freed_resumable(req_status, group_idx, scheduler_output):
                        if block_ids[i]:
                            watched.append((req_id, group_idx, i, block_ids[i]))
        super()._update_req_states(scheduler_output)
        for block_ids, before in kept:
            block_ids[:] = before
        for req_id, group_idx, i, block_id in watched:
            if self._req_status[req_id].group_states[group_idx].block_ids[i] == 0:
                self._reused_resumable.setdefault(req_id, []).append((group_idx, i, block_id))

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's, with two changes of order for the request's last stores.

        * vLLM tells the manager the request finished here, before the next step builds its last store jobs;
          vLLM's tiered manager (TieringOffloadingSpec, the disk tier) then drops the request's state and that
          step's prepare_store raises KeyError, killing the engine (vLLM issue 49635). The manager is told
          once `_build_store_jobs` has built them.
          upstream: vLLM PR 49671 (after 0.26) makes this order vLLM's.
        * vLLM builds a finished request's last store jobs (its end-of-turn window, under SINKS its resumable
          state) in the next step, from `finished_req_ids`; but when an earlier job of the request completes
          in the output where it finished (a store flushed in its last step: `_store_reused`), vLLM's
          update_connector_output deletes the request's state first, and the last window is never stored.
          The state is kept until `_build_store_jobs` has processed it.
          upstream: keep a finished request's RequestOffloadState in update_connector_output until
          _build_store_jobs has processed it."""
        req_status = self._req_status.get(request.request_id)
        if req_status is None:
            return super().request_finished(request)  # untracked: vLLM finalizes it at once
        # vLLM's body for a tracked request, its call of manager.on_request_finished deferred
        self._manager_finishing[request.request_id] = req_status.req_context
        self._maybe_observe_lookup_async_delay(req_status)
        req_status.update_offload_keys()
        for job_id in req_status.transfer_jobs:
            for block_id in self._jobs[job_id].non_sliding_window_block_ids or ():
                self._block_id_to_pending_jobs.setdefault(block_id, set()).add(job_id)
        if self.sink_groups:
            self._finishing[request.request_id] = req_status
        return False, None

    def reset_cache(self) -> None:
        """vLLM's, after telling the manager of the finished requests whose last stores the reset drops."""
        for req_context in self._manager_finishing.values():
            self.manager.on_request_finished(req_context)
        self._manager_finishing.clear()
        self._finishing.clear()
        return super().reset_cache()

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        super().update_connector_output(connector_output)
        for req_id, req_status in self._finishing.items():
            self._req_status.setdefault(req_id, req_status)  # deleted by vLLM when its last job completed

    def _freed_resumable(
        self, req_status: RequestOffloadState, group_idx: int, scheduler_output: SchedulerOutput
    ) -> list[int]:
        """Positions of a running request not stored yet, possibly freed by its window already, that a later
        request can hit: the window before its prompt's end, and any that the window of a hit at a block
        boundary at or after its current end needs (those at or after its last block less the window)."""
        sinks, window = self.sink_groups[group_idx]
        group_state = req_status.group_states[group_idx]
        tokens_per_chunk = self.config.kv_group_configs[group_idx].tokens_per_chunk
        req = req_status.req
        num_tokens = req.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(req.request_id, 0)
        # blocks wholly before the window of the next token (what the window has freed), one of margin
        freed_end = min(
            len(group_state.block_ids),
            len(group_state.offload_keys),
            max(0, num_tokens - self._window_tokens) // tokens_per_chunk + 1,
        )
        start = max(group_state.next_stored_chunk_idx, sinks)
        prompt_end = (req.num_prompt_tokens - 1) // tokens_per_chunk
        turn_end = (req.num_tokens - 1) // tokens_per_chunk
        positions = range(max(start, prompt_end - window), min(prompt_end, freed_end))
        later = range(max(start, turn_end - window, prompt_end), freed_end)
        return [*positions, *later]

    def _calc_num_offloadable_tokens(self, req_status: RequestOffloadState, num_computed_tokens: int) -> int:
        """vLLM's bound, less the running window of an unfinished request: its chunks are stored when they
        leave the window (if a later request can hit them) or when the request ends. A finished request's
        bound is its computed tokens (its last sampled token has no KV)."""
        num = super()._calc_num_offloadable_tokens(req_status, num_computed_tokens)
        if not self.sink_groups:
            return num
        if req_status.req.is_finished():
            return min(num, req_status.req.num_computed_tokens)
        group = self.config.kv_group_configs[next(iter(self.sink_groups))]
        window = self.sink_groups[group.group_idx][1]
        return max(0, (num // group.tokens_per_chunk - window) * group.tokens_per_chunk)

    def is_resumable(
        self, req_status: RequestOffloadState, group_idx: int, chunk: int, num_chunks: int
    ) -> bool:
        """Whether chunk `chunk` of [0, num_chunks) is one a later request can hit: a sink chunk, one of the
        window before the prompt's end or, for a finished request, of the window before its end."""
        sinks, window = self.sink_groups[group_idx]
        if chunk < sinks:
            return True
        tokens_per_chunk = self.config.kv_group_configs[group_idx].tokens_per_chunk
        prompt_end = (req_status.req.num_prompt_tokens - 1) // tokens_per_chunk
        if prompt_end - window <= chunk < prompt_end:
            return True
        return req_status.req.is_finished() and num_chunks - window <= chunk < num_chunks

    def _build_store_jobs(self, scheduler_output: SchedulerOutput) -> dict[int, TransferJob]:
        # vLLM skips a chunk whose block id is 0 (a null or reused block): middle chunks become 0 here, before
        # vLLM's store selection moves past them for good.
        if self.sink_groups:
            for req_id in (
                *scheduler_output.num_scheduled_tokens,
                *(scheduler_output.finished_req_ids or ()),
            ):
                req_status = self._req_status.get(req_id)
                if req_status is not None:
                    self._drop_middle_chunks(req_status, scheduler_output)
        jobs = super()._build_store_jobs(scheduler_output)
        for req_id in scheduler_output.finished_req_ids or ():
            self._finishing.pop(req_id, None)  # its last stores are built (or it had none left)
            req_context = self._manager_finishing.pop(req_id, None)
            if req_context is not None:
                self.manager.on_request_finished(req_context)
        for req_id, reused in self._reused_resumable.items():
            jobs.update(self._store_reused(req_id, reused))
        self._reused_resumable.clear()
        for job_id in jobs:
            status: TransferJobStatus = self._jobs[job_id]
            self.num_stored_chunks += len(status.keys)
            req = self._req_status[status.req_id].req
            # A finished request's blocks are free: one already reused this step is stored before the step
            # writes it (vLLM does this for full-attention blocks only).
            if req.is_finished() and not self._current_batch_allocated_block_ids.isdisjoint(
                status.sliding_window_block_ids or ()
            ):
                self._current_batch_jobs_to_flush.add(job_id)
        return jobs

    def _store_reused(self, req_id: str, reused: list[tuple[int, int, int]]) -> dict[int, TransferJob]:
        """A store job, flushed before this step's forward, of a running request's resumable positions whose
        blocks this step allocated again (`_update_req_states`). vLLM's own job later skips them (id 0)."""
        req_status = self._req_status.get(req_id)
        if req_status is None:
            return {}
        order = {g.group_idx: n for n, g in enumerate(self.config.kv_group_configs)}
        reused = sorted(reused, key=lambda r: (order[r[0]], r[1]))
        keys = [req_status.group_states[g].offload_keys[i] for g, i, _ in reused]
        store_output = self.manager.prepare_store(keys, req_status.req_context)
        if store_output is None or not store_output.keys_to_store:
            return {}
        to_store = set(store_output.keys_to_store)
        src_block_ids: list[int] = []
        group_sizes: list[int] = []
        block_indices: list[int] = []
        for group_config in self.config.kv_group_configs:
            picked = [
                (i, block_id)
                for (g, i, block_id), key in zip(reused, keys, strict=True)
                if g == group_config.group_idx and key in to_store
            ]
            for i, _ in picked:
                key = req_status.group_states[group_config.group_idx].offload_keys[i]
                self._events_tracker.record_store(req_status.req, group_config, i, key)
            group_sizes.append(len(picked))
            block_indices.append(picked[0][0] if picked else 0)
            src_block_ids.extend(block_id for _, block_id in picked)
        self._touch(req_status)
        job_id = self._generate_job_id()
        req_status.transfer_jobs.add(job_id)
        for block_id in src_block_ids:
            self._block_id_to_pending_jobs.setdefault(block_id, set()).add(job_id)
        self._jobs[job_id] = TransferJobStatus(
            req_id=req_id,
            pending_count=self.config.num_workers,
            keys=to_store,
            is_store=True,
            sliding_window_block_ids=src_block_ids,
        )
        self._current_batch_jobs_to_flush.add(job_id)
        src_spec = GPULoadStoreSpec(src_block_ids, group_sizes=group_sizes, block_indices=block_indices)
        return {job_id: TransferJob(req_id=req_id, src_spec=src_spec, dst_spec=store_output.store_spec)}

    def _drop_middle_chunks(self, req_status: RequestOffloadState, scheduler_output: SchedulerOutput) -> None:
        req = req_status.req
        if req.is_finished():
            num_tokens = req.num_tokens
        else:
            num_tokens = req.num_computed_tokens + scheduler_output.num_scheduled_tokens[req.request_id]
        upto = self._calc_num_offloadable_tokens(req_status, num_tokens)
        full = None
        for group_idx in self.sink_groups:
            group_state = req_status.group_states[group_idx]
            tokens_per_chunk = self.config.kv_group_configs[group_idx].tokens_per_chunk
            block_ids = group_state.block_ids
            end = min(upto // tokens_per_chunk, len(block_ids))
            if end <= group_state.next_stored_chunk_idx:
                continue  # most steps: no chunk left the running window
            if full is None:
                full = super()._calc_num_offloadable_tokens(req_status, num_tokens)
            num_chunks = full // tokens_per_chunk
            for i in range(group_state.next_stored_chunk_idx, end):
                if not self.is_resumable(req_status, group_idx, i, num_chunks):
                    block_ids[i] = 0

    # -- what is looked up, touched and loaded ---------------------------------------------------------------
    def _hit_end(
        self, keys: Sequence[OffloadKey], start: int, limit: int, group_idx: int, ctx: Any
    ) -> int | None:
        """End chunk of the longest hit in [start, limit): sinks stored and a window run before it, or every
        chunk from `start` (whose own sinks and window the GPU holds). None: the store asked to retry."""
        sinks, window = self.sink_groups[group_idx]
        hit: list[bool] = []
        deferred = False
        for key in keys[start:limit]:
            result = self.manager.lookup(key, ctx)
            deferred |= result in (LookupResult.RETRY, LookupResult.HIT_PENDING)
            hit.append(result in (LookupResult.HIT, LookupResult.HIT_PENDING))
        if deferred:
            return None
        prefix = next((i for i, h in enumerate(hit) if not h), len(hit))
        sinks_stored = start >= sinks or prefix >= min(sinks, limit) - start
        if sinks_stored:
            run = 0
            for i in range(len(hit) - 1, -1, -1):
                run = run + 1 if hit[i] else 0
                if run == window:
                    return start + i + window
        return start + prefix

    def _lookup(self, req_status: RequestOffloadState) -> int | None:
        if not self.sink_groups:
            return super()._lookup(req_status)
        computed = req_status.num_locally_computed_tokens
        # The last prompt token is always recomputed (its logits); hits are whole chunks.
        max_hit_tokens = req_status.req.num_tokens - 1
        end: int | None = None
        for group_idx in self.sink_groups:
            tokens_per_chunk = self.config.kv_group_configs[group_idx].tokens_per_chunk
            keys = req_status.group_states[group_idx].offload_keys
            limit = min(max_hit_tokens // tokens_per_chunk, len(keys))
            start = computed // tokens_per_chunk
            if limit <= start:
                return 0
            group_end = self._hit_end(keys, start, limit, group_idx, req_status.req_context)
            if group_end is None:
                return None
            end = group_end if end is None else min(end, group_end)
        assert end is not None
        tokens_per_chunk = self.config.kv_group_configs[next(iter(self.sink_groups))].tokens_per_chunk
        num_hit_tokens = end * tokens_per_chunk - computed
        if num_hit_tokens <= 0:
            return 0
        if self._chunks_being_loaded:
            for group_idx in self.sink_groups:
                keys = req_status.group_states[group_idx].offload_keys
                if any(
                    keys[i] in self._chunks_being_loaded
                    for i in self._loaded_chunks(group_idx, computed, end)
                ):
                    return None  # another request is loading a chunk of this hit: wait for it
        return num_hit_tokens

    def _loaded_chunks(self, group_idx: int, computed: int, end: int) -> list[int]:
        """Chunks a hit ending at `end` loads after `computed` local tokens: sinks not local, the window."""
        sinks, window = self.sink_groups[group_idx]
        tokens_per_chunk = self.config.kv_group_configs[group_idx].tokens_per_chunk
        start = computed // tokens_per_chunk
        chunks = set(range(start, min(sinks, end)))
        chunks.update(range(max(start, end - window), end))
        return sorted(chunks)

    def _touch(self, req_status: RequestOffloadState) -> None:
        if not self.sink_groups:
            return super()._touch(req_status)
        groups = zip(self.config.kv_group_configs, req_status.group_states, strict=True)
        for group_config, group_state in groups:
            keys = group_state.offload_keys
            if group_config.group_idx not in self.sink_groups:
                self.manager.touch(keys, req_status.req_context)
                continue
            sinks, window = self.sink_groups[group_config.group_idx]
            first_window = max(sinks, group_state.num_hit_chunks - window)
            self.manager.touch([*keys[:sinks], *keys[first_window:]], req_status.req_context)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Loads the hit's chunks into the blocks the KV manager allocated for them: every non-null block of
        the hit without a hash (local hits have one)."""
        if not self.sink_groups:
            return super().update_state_after_alloc(request, blocks, num_external_tokens)
        if num_external_tokens == 0:
            return
        req_status = self._req_status[request.request_id]
        num_cached_tokens = req_status.num_locally_computed_tokens + num_external_tokens
        keys_to_load: list[OffloadKey] = []
        dst_block_ids: list[int] = []
        group_sizes: list[int] = []
        block_indices: list[int] = []
        for group_config, group_state, group_blocks in zip(
            self.config.kv_group_configs, req_status.group_states, blocks.blocks, strict=True
        ):
            self._current_batch_allocated_block_ids.update(
                b.block_id for b in group_blocks if b.block_id != 0
            )
            num_gpu_blocks = cdiv(num_cached_tokens, group_config.tokens_per_block)
            first: int | None = None
            count = 0
            for i, block in enumerate(group_blocks[:num_gpu_blocks]):
                if block.is_null or block.block_hash is not None:
                    continue
                keys_to_load.append(group_state.offload_keys[i])
                dst_block_ids.append(block.block_id)
                first = i if first is None else first
                count += 1
            group_sizes.append(count)
            block_indices.append(first or 0)
            if req_status.offloading_context.policy == OffloadPolicy.BLOCK_LEVEL:
                group_state.next_stored_chunk_idx = cdiv(num_cached_tokens, group_config.tokens_per_chunk)
        src_spec = self.manager.prepare_load(keys_to_load, req_status.req_context)
        dst_spec = GPULoadStoreSpec(dst_block_ids, group_sizes=group_sizes, block_indices=block_indices)
        job_id = self._generate_job_id()
        self._current_batch_load_jobs[job_id] = TransferJob(
            req_id=request.request_id, src_spec=src_spec, dst_spec=dst_spec
        )
        assert not req_status.transfer_jobs  # a load is issued only when no other job is pending
        req_status.transfer_jobs.add(job_id)
        self._jobs[job_id] = TransferJobStatus(
            req_id=request.request_id,
            pending_count=self.config.num_workers,
            keys=set(keys_to_load),
            is_store=False,
        )
        if self._chunks_being_loaded is not None:
            self._chunks_being_loaded.update(keys_to_load)
        self.num_loaded_chunks += len(keys_to_load)
        self.num_host_hits += 1

    # -- capacity and metrics -------------------------------------------------------------------------------
    def host_chunks(self) -> int:
        """Chunks the host store holds (vLLM's CPU manager, or the CPU tier of its tiered manager; 0 where
        its size is not known)."""
        cpu = getattr(self.manager, "primary_tier", self.manager)
        return int(getattr(cpu, "_num_blocks", 0))

    def state_chunks(self) -> int:
        """Host chunks of one paused chat's resumable state: its sinks, a window, and the chunk by which the
        window before its prompt's end (a regenerate) and before its end (the next turn) differ."""
        return sum(sinks + window + 1 for sinks, window in self.sink_groups.values())

    def describe(self) -> str:
        state = self.state_chunks()
        line = (
            f"host tier: {self.host_chunks()} chunks of one block, {state} per paused chat's state "
            f"(sinks + window): ~{self.host_chunks() // max(state, 1)} paused chats"
        )
        for tier in disk_tiers(self.manager):
            restart = "yes" if os.environ.get("PYTHONHASHSEED") else "no (PYTHONHASHSEED is not set)"
            line += (
                f"; disk tier: {tier.file_mapper.base_path}_r*, every stored chunk written there too, no "
                f"limit on its size (vLLM's file-system tier evicts nothing); states survive a restart: "
                f"{restart}"
            )
        return line

    def stats(self) -> dict[str, float]:
        return {
            "offload_host_chunks": float(self.host_chunks()),
            "offload_state_chunks": float(self.state_chunks()),
            "offload_paused_chats_capacity": float(self.host_chunks() // max(self.state_chunks(), 1)),
            "offload_stored_chunks": float(self.num_stored_chunks),
            "offload_loaded_chunks": float(self.num_loaded_chunks),
            "offload_host_hits": float(self.num_host_hits),
            "offload_evicted_chunks": float(self.num_evicted_chunks),
            "offload_host_bytes": float(self.host_chunks() * self.chunk_bytes),
        }

    def shutdown(self) -> None:
        """vLLM's, after the disk tiers have written what they were given: vLLM's file-system tier drops its
        queued writes at shutdown, and the states of the last chats to pause would not survive a restart.
        upstream: drain (or make draining an option of) FileSystemTierManager.shutdown."""
        for tier in disk_tiers(self.manager):
            tier.drain_jobs()
        super().shutdown()


def sink_offloading_scheduler(scheduler: Any) -> SinkOffloadingScheduler | None:
    """The SINKS offloading policy of a v1 Scheduler's KV connector, if it has one."""
    connector = getattr(scheduler, "connector", None)
    policy = getattr(connector, "connector_scheduler", None)
    if isinstance(policy, SinkOffloadingScheduler) and policy.sink_groups:
        return policy
    return None
