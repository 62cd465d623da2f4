"""Colocated weight sync: learner rank 0 and a vLLM worker on the same GPU share memory, not bytes.

Per bucket, the learner packs the bucket's tensors into one flat GPU buffer per dtype (a device
copy, fast on a GPU) and exports a CUDA IPC handle for each buffer; the handles (a few hundred
bytes) travel over Ray; the vLLM worker opens them as tensors over the very same GPU memory and
reloads its weights from those views. Nothing crosses PCIe or the network. The learner keeps the
buffers alive until every actor has loaded the bucket, then drops them.

Handles are only valid on the GPU that made them, so the worker checks the GPU's UUID first and
fails with a clear message when the learner and the engine are not on the same device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_ray.weight_sync import TensorMeta

# torch.multiprocessing.reductions.reduce_tensor returns (rebuild_cuda_tensor, args); args[6] is the
# CUDA device index in the exporting process, which differs from ours under CUDA_VISIBLE_DEVICES.
_DEVICE_ARG = 6


@dataclass(frozen=True)
class SharedBucket:
    """One bucket exported from the learner: tensor layout, one IPC handle per dtype, the GPU's UUID."""

    metas: list[TensorMeta]  # in bucket order
    handles: dict[str, tuple]  # dtype name -> rebuild_cuda_tensor arguments of its flat buffer
    gpu_uuid: str


def gpu_uuid(device: torch.device | str | int | None = None) -> str:
    """The UUID of a CUDA device (default: the current one); the same GPU gives the same string in every process."""
    if isinstance(device, int):
        device = torch.device("cuda", device)
    index = None if device is None else torch.device(device).index
    return str(torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).uuid)


def export_bucket(named: list[tuple[str, torch.Tensor]]) -> tuple[SharedBucket, list[torch.Tensor]]:
    """Pack one bucket of CUDA tensors into flat buffers (one per dtype) and export their IPC handles.

    Returns the shareable description and the buffers, which the caller must keep alive (and
    unmodified) until every receiver has loaded the bucket.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    device = named[0][1].device
    if device.type != "cuda":
        raise ValueError(f"weight_sync.backend=cuda_ipc shares GPU memory, but the learner's tensors are on {device}")
    by_dtype: dict[str, list[torch.Tensor]] = {}
    for _, t in named:
        by_dtype.setdefault(str(t.dtype).removeprefix("torch."), []).append(t.detach().reshape(-1))
    buffers = {dtype: torch.cat(parts) for dtype, parts in by_dtype.items()}
    torch.cuda.current_stream(device).synchronize()  # the receiver reads on its own stream
    handles = {dtype: reduce_tensor(flat)[1] for dtype, flat in buffers.items()}
    shared = SharedBucket([TensorMeta.of(n, t) for n, t in named], handles, gpu_uuid(device))
    return shared, list(buffers.values())


def open_bucket(shared: SharedBucket) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors as views over the learner's GPU memory, in bucket order (read them, don't keep them)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    here = torch.cuda.current_device()
    if gpu_uuid(here) != shared.gpu_uuid:
        raise RuntimeError(
            f"weight_sync.backend=cuda_ipc: this vLLM worker is on GPU {gpu_uuid(here)}, the learner's weights on "
            f"{shared.gpu_uuid}; CUDA IPC needs them on the same GPU. Colocate them (fractional GPUs on a "
            "one-GPU node) or use weight_sync.backend=nccl"
        )
    flats = {}
    for dtype, args in shared.handles.items():
        args = list(args)
        args[_DEVICE_ARG] = here
        flats[dtype] = rebuild_cuda_tensor(*args)
    offsets = dict.fromkeys(flats, 0)
    out = []
    for m in shared.metas:
        start = offsets[m.dtype]
        out.append((m.name, flats[m.dtype][start : start + m.numel].view(m.shape)))
        offsets[m.dtype] = start + m.numel
    return out
