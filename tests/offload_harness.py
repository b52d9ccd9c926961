"""vLLM's real Scheduler with vLLM's real OffloadingConnector (scheduler side, its CPU store and LRU) under
SINKS, driven on the CPU, with the worker side simulated: GPU blocks and host chunks hold the block hash of
what was written into them, so a block's content can be checked against the request it serves.

The simulated worker does what vLLM's OffloadingConnectorWorker does with the connector's metadata, in its
order: a step's store jobs are submitted at the start of the next step (flushed ones before the forward),
loads before the forward, and every job completes within the step it is submitted in. The forward writes,
for each scheduled request, the block hash of every block it completes into that block's GPU slot. At every
step, every real block a scheduled request's row holds before its computed tokens must hold that request's
hash for the position (`check_rows`): a sink block never loaded, a window block loaded from the wrong chunk
or a chunk stored from the wrong block all fail it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Chat:
    tokens: list[int]
    turns: list[dict] = field(default_factory=list)


class OffloadHarness:
    def __init__(
        self,
        model_path: str,
        sinks: tuple[int, int],
        num_gpu_blocks: int,
        host_chunks: int,
        max_num_seqs: int = 4,
        max_num_batched_tokens: int = 256,
        block_size: int = 16,
        extra_config: dict | None = None,
    ) -> None:
        import torch
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import EngineArgs
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_kv_cache_configs, get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        from vllm_sinks.kv.manager import SinkWindowSpec

        S, W = sinks
        self.block_size = block_size
        layers = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
        spec = SinkWindowSpec(
            block_size=block_size,
            num_kv_heads=2,
            head_size=16,
            dtype=torch.float32,
            sliding_window=W + 1,
            sink_tokens=S,
            prefill_chunk_tokens=max_num_batched_tokens,
        )
        bytes_per_block = spec.page_size_bytes * len(layers)
        extra = {"cpu_bytes_to_use": host_chunks * bytes_per_block} | (extra_config or {})
        args = EngineArgs(
            model=model_path,
            attention_backend="SINKS",
            additional_config={"sinks": {"sink_tokens": S, "window_tokens": W}},
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=65536,
            enable_prefix_caching=True,
            async_scheduling=False,  # the simulated worker runs one step at a time
            num_gpu_blocks_override=num_gpu_blocks,
            kv_transfer_config=KVTransferConfig(
                kv_connector="OffloadingConnector", kv_role="kv_both", kv_connector_extra_config=extra
            ),
        )
        self.vllm_config = args.create_engine_config()
        (kv_cache_config,) = get_kv_cache_configs(
            self.vllm_config, [dict.fromkeys(layers, spec)], [10 * 2**30]
        )
        self.vllm_config.cache_config.num_gpu_blocks = kv_cache_config.num_blocks
        self.kv_cache_config = kv_cache_config
        self.scheduler = Scheduler(
            vllm_config=self.vllm_config,
            kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(self.vllm_config),
            block_size=block_size,
            log_stats=True,
        )
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(block_size, sha256)
        self.policy = self.scheduler.connector.connector_scheduler
        self.gpu: dict[int, Any] = {}  # GPU block id -> block hash written into it
        # host chunk id -> block hash stored into it; under a tiered spec, the bytes of vLLM's CPU tier itself
        # (what its disk tier writes and promotes)
        primary = getattr(self.policy.manager, "primary_tier", None)
        self.host: Any = PrimaryTierHashes(primary.get_kv_memoryview()) if primary is not None else {}
        self.pending_stores: dict[int, Any] = {}
        self.requests: dict[str, Any] = {}
        self.outputs: dict[str, list[int]] = {}
        self.num_cached: dict[str, int] = {}  # tokens a request found computed (GPU or host) when scheduled
        self.num_computed_tokens_scheduled: dict[str, int] = {}
        self.step_count = 0
        self.checked_blocks = 0

    # -- requests -------------------------------------------------------------------------------------------
    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        from vllm import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        params.update_from_generation_config({}, None)
        request = Request(request_id, list(prompt), params, None, block_hasher=self.hasher)
        self.requests[request_id] = request
        self.outputs[request_id] = []
        self.scheduler.add_request(request)

    def reply_token(self, request_id: str, n: int) -> int:
        """A deterministic 'sampled' token: a function of the stream so far (as a model's would be)."""
        req = self.requests[request_id]
        return 3 + (sum(req.all_token_ids[-8:]) * 31 + n) % 400

    def run(self, max_steps: int = 100_000) -> None:
        """Steps until every request finished and every transfer completed."""
        for _ in range(max_steps):
            if not self.scheduler.has_requests() and not self.pending_stores and not self.policy._jobs:
                return
            self.step()
        raise AssertionError("requests did not finish")

    # -- one engine step -----------------------------------------------------------------------------------
    def step(self) -> None:
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import OffloadingWorkerMetadata
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        self.step_count += 1
        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        completed: dict[int, int] = {}
        # The previous step's stores (and this step's flushed ones) run before this step's forward.
        flushed = {j: meta.store_jobs.pop(j) for j in list(meta.jobs_to_flush) if j in meta.store_jobs}
        for job_id, job in {**self.pending_stores, **flushed}.items():
            for gpu_id, host_id in zip(job.src_spec.block_ids, job.dst_spec.block_ids, strict=True):
                self.host[int(host_id)] = self.gpu.get(int(gpu_id))
            completed[job_id] = 1
        self.pending_stores = dict(meta.store_jobs)
        finished_recving = set()
        for job_id, job in meta.load_jobs.items():
            for host_id, gpu_id in zip(job.src_spec.block_ids, job.dst_spec.block_ids, strict=True):
                self.gpu[int(gpu_id)] = self.host[int(host_id)]
            completed[job_id] = 1
            finished_recving.add(job.req_id)
        # The forward: every block a scheduled request completes holds that request's hash for it.
        req_ids = list(out.num_scheduled_tokens)
        sampled: list[list[int]] = []
        for rid in req_ids:
            req = self.requests[rid]
            # schedule() already counted this step's tokens as computed
            end = req.num_computed_tokens
            start = end - out.num_scheduled_tokens[rid]
            self.num_computed_tokens_scheduled.setdefault(rid, start)
            row = self._row(rid)
            self.check_rows(rid, row, start)
            for i in range(start // self.block_size, end // self.block_size):
                assert not row[i].is_null, f"{rid}: the forward writes block {i}, a null block"
                self.gpu[row[i].block_id] = req.block_hashes[i]
            done_prompt = end >= req.num_tokens
            sampled.append([self.reply_token(rid, len(self.outputs[rid]))] if done_prompt else [])
        worker_meta = OffloadingWorkerMetadata()
        for job_id in completed:
            worker_meta.mark_completed(job_id)
        output = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
            sampled_token_ids=sampled,
            kv_connector_output=KVConnectorOutput(
                finished_recving=finished_recving or None, kv_connector_worker_meta=worker_meta
            ),
        )
        for rid, toks in zip(req_ids, sampled, strict=True):
            self.outputs[rid].extend(toks)
        self.scheduler.update_from_output(out, output)

    def _row(self, request_id: str) -> list[Any]:
        (group,) = self.scheduler.kv_cache_manager.coordinator.single_type_managers
        return group.req_to_blocks[request_id]

    def check_rows(self, request_id: str, row: list[Any], num_computed: int) -> None:
        req = self.requests[request_id]
        for i in range(min(num_computed // self.block_size, len(row))):
            if row[i].is_null:
                continue
            assert self.gpu.get(row[i].block_id) == req.block_hashes[i], (
                f"{request_id}: block {i} of its row (GPU block {row[i].block_id}) does not hold its KV"
            )
            self.checked_blocks += 1

    def shutdown(self) -> None:
        self.scheduler.shutdown()

    # -- views ----------------------------------------------------------------------------------------------
    def manager(self) -> Any:
        (group,) = self.scheduler.kv_cache_manager.coordinator.single_type_managers
        return group


class PrimaryTierHashes:
    """A host store of block hashes kept in the bytes of vLLM's CPU tier (TieringOffloadingSpec's shared
    region), so that the tier's disk writes and promotions move them: chunk b holds its hash in the first
    bytes of row b, after a marker byte (1 = written)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view.cast("B")
        self.row = view.strides[0]

    def __setitem__(self, chunk: int, block_hash: Any) -> None:
        raw = bytes(block_hash) if block_hash is not None else b""
        self.view[chunk * self.row : chunk * self.row + 1 + len(raw) + 1] = bytes([1, len(raw)]) + raw

    def __getitem__(self, chunk: int) -> Any:
        from vllm.v1.core.kv_cache_utils import BlockHash

        at = chunk * self.row
        if self.view[at] != 1:
            return None
        n = self.view[at + 1]
        return BlockHash(bytes(self.view[at + 2 : at + 2 + n])) if n else None


def corrupt_sink_stores(monkeypatch: Any) -> None:
    """Makes kv.offload's policy store each request's sink chunk from another of its blocks (the last real
    one it holds): what a test that sees the sinks must catch."""
    from vllm_sinks.kv.offload import SinkOffloadingScheduler

    original = SinkOffloadingScheduler._build_store_jobs

    def store_sinks_from_the_wrong_block(self, scheduler_output):
        jobs = original(self, scheduler_output)
        for job_id, job in jobs.items():
            status = self._jobs[job_id]
            group = self._req_status[status.req_id].group_states[0]
            if group.offload_keys[0] in status.keys:  # the sink chunk is the job's first
                job.src_spec.block_ids[0] = next(b for b in reversed(group.block_ids) if b)
        return jobs

    monkeypatch.setattr(SinkOffloadingScheduler, "_build_store_jobs", store_sinks_from_the_wrong_block)
