"""The host tier's memory under SINKS: pinned exactly, so --kv-offloading-size X pins X.

vLLM 0.26's CPU offloading worker (vllm.v1.kv_offload.cpu.gpu_worker.CPUOffloadingWorker) allocates one host
tensor per KV-cache tensor of its worker with `pin_memory=True`, and torch's caching host allocator rounds
every pinned allocation up to a power of two: 96 GiB over the 32 layers of an 8B model is 32 tensors of
3 GiB, pinned as 32 x 4 GiB = 128 GiB, more than a host with 128 GiB of memory has (the kernel kills the
engine). A paused SINKS chat is a fixed number of chunks, so the host tier's size is the number of paused
chats it keeps: SINKS engines allocate the same tensors pageable and page-lock them with cudaHostRegister
(what vLLM does for its own shared-memory region, `pin_mmap_region`), which pins exactly the bytes asked.

Invariants: a registered tensor is unregistered by the worker's shutdown, before its memory is freed; only
the host tensors are allocated this way (the transfers' descriptor buffers, made later, stay torch-pinned);
registration failing is an error at start-up, never a silent fall back to pageable (slow) transfers.
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

logger = init_logger("vllm.sinks")

# cudaHostRegisterPortable | cudaHostRegisterMapped: pinned for every context, and mapped into the device's
# address space (vLLM's Triton load kernel reads host pages directly for small pages).
_REGISTER_FLAGS = 0x01 | 0x02


def register(tensors: list[Any]) -> int:
    """Page-locks each (pageable, contiguous) host tensor in place; returns the bytes pinned. Raises with
    the CUDA error and what to change when the driver refuses (the tensors pinned so far are released)."""
    import torch

    cudart = torch.cuda.cudart()
    done: list[Any] = []
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        err = cudart.cudaHostRegister(t.data_ptr(), nbytes, _REGISTER_FLAGS)
        if int(getattr(err, "value", err)) != 0:
            unregister(done)
            pinned = sum(x.numel() * x.element_size() for x in tensors)
            raise RuntimeError(
                f"SINKS could not pin the host tier ({pinned / 2**30:.1f} GiB, cudaHostRegister error "
                f"{int(getattr(err, 'value', err))}): lower --kv-offloading-size, or raise the memlock limit "
                "(ulimit -l) of the server's user"
            )
        done.append(t)
    return sum(t.numel() * t.element_size() for t in done)


def unregister(tensors: list[Any]) -> None:
    import torch

    cudart = torch.cuda.cudart()
    for t in tensors:
        cudart.cudaHostUnregister(t.data_ptr())


def exactly_pinned_cpu_worker(spec: Any, kv_caches: Any) -> Any:
    """vLLM's CPUOffloadingWorker for `spec` (a CPUOffloadingSpec), its host tensors pinned exactly: built
    with vLLM's pinning switched off, then registered; its shutdown unregisters them."""
    from vllm.v1.kv_offload.cpu import gpu_worker

    if not gpu_worker.PIN_MEMORY:  # a platform where vLLM pins nothing: nothing to make exact
        return gpu_worker.CPUOffloadingWorker(
            kv_caches=kv_caches, blocks_per_chunk=spec.blocks_per_chunk, num_cpu_blocks=spec.num_blocks
        )
    gpu_worker.PIN_MEMORY = False  # read by the constructor's torch.zeros; the buffers made later pin again
    try:
        worker = gpu_worker.CPUOffloadingWorker(
            kv_caches=kv_caches, blocks_per_chunk=spec.blocks_per_chunk, num_cpu_blocks=spec.num_blocks
        )
    finally:
        gpu_worker.PIN_MEMORY = True
    host = list(worker._store_handler.dst_tensors)
    pinned = register(host)
    logger.info(
        "SINKS host tier: %.2f GiB pinned exactly (%d tensors of %d chunks; torch's pinned allocator would "
        "pin %.2f GiB)", pinned / 2**30, len(host), spec.num_blocks, torch_pinned_bytes(host) / 2**30,
    )  # fmt: skip
    original_shutdown = worker.shutdown

    def shutdown() -> None:
        original_shutdown()
        unregister(host)
        host.clear()

    worker.shutdown = shutdown
    return worker


def torch_pinned_bytes(tensors: list[Any]) -> int:
    """What torch's caching host allocator pins for these tensors: each rounded up to a power of two."""
    return sum(1 << (t.numel() * t.element_size() - 1).bit_length() for t in tensors)
