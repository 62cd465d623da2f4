"""Full parameters out of a (possibly ZeRO-3 partitioned) model, bucket by bucket.

Under ZeRO-3 each rank holds a slice of every parameter; `deepspeed.zero.GatheredParameters`
assembles the full tensors on every rank, which is a collective: all ranks must walk the same
buckets in the same order, even those that throw the tensors away. Under ZeRO 0-2 every rank
already holds full parameters and the gather is a no-op.
"""

from __future__ import annotations

from typing import Any, Iterator

import deepspeed
import torch

from rlhf_ray.cuda_ipc import SharedBucket, export_bucket
from rlhf_ray.weight_sync import ParamSums, TensorMeta, checksum, param_sums, send_bucket, wait_all

Named = list[tuple[str, torch.Tensor]]


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def plan_param_buckets(model: torch.nn.Module, bucket_bytes: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """named_parameters() in order, grouped into buckets of at most `bucket_bytes` of full tensors."""
    buckets: list[list[tuple[str, torch.nn.Parameter]]] = []
    current: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for name, p in model.named_parameters():
        nbytes = full_numel(p) * p.element_size()
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, p))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def iter_gathered(model: torch.nn.Module, bucket_bytes: int) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """Buckets of (name, parameter) whose full data every rank can read until the next bucket.

    Collective under ZeRO-3: consume the iterator to the end on every rank.
    """
    for bucket in plan_param_buckets(model, bucket_bytes):
        with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
            yield bucket


def iter_weight_buckets(model: torch.nn.Module, bucket_bytes: int, rank: int) -> Iterator[Named]:
    """HF-named full parameters in buckets of at most `bucket_bytes`; only rank 0 gets tensors.

    Every rank must run it to the end (collective under ZeRO-3); other ranks get empty buckets.
    On rank 0 the tensors are copies under ZeRO-3 and views of the live parameters otherwise,
    so use them before the next optimizer step.
    """
    for bucket in iter_gathered(model, bucket_bytes):
        if rank != 0:
            yield []
        else:
            yield [(name, p.detach().clone() if is_partitioned(p) else p.detach()) for name, p in bucket]


def param_checksums(model: torch.nn.Module, bucket_bytes: int) -> dict[str, float]:
    """float64 sum of every full parameter as this rank sees it (collective under ZeRO-3)."""
    return {name: checksum(p) for bucket in iter_gathered(model, bucket_bytes) for name, p in bucket}


def persistent_buffers(model: torch.nn.Module) -> Named:
    """Buffers that belong in a state dict (not partitioned by ZeRO-3)."""
    out = []
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.append((f"{module_name}.{name}" if module_name else name, buf.detach()))
    return out


def weight_metas(model: torch.nn.Module) -> list[TensorMeta]:
    """Name, full shape and dtype of every parameter, in named_parameters() order."""
    return [
        TensorMeta(name, full_shape(p), str(p.dtype).removeprefix("torch.")) for name, p in model.named_parameters()
    ]


def send_weights(
    model: torch.nn.Module, plan: list[list[TensorMeta]], pg: Any, rank: int, version: int, columns: int,
    host_timeout_s: float | None = None,
) -> ParamSums:
    """Broadcast the parameters bucket by bucket from rank 0 through the weight-sync group `pg`.

    Collective under ZeRO-3 (every rank gathers each bucket; only one bucket of full parameters
    exists at a time); only rank 0 holds `pg` and sends. Returns rank 0's `param_sums` of what it
    sent for policy `version`, `columns` sampled per 2-D weight ({} on other ranks). `host_timeout_s`
    (NCCL) bounds each bucket on the host and aborts `pg` past it (`weight_sync.wait_all`).
    """
    params = dict(model.named_parameters())
    sums: ParamSums = {}
    failed: Exception | None = None
    for bucket in plan:
        group = [params[m.name] for m in bucket]
        with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
            if rank == 0 and failed is None:
                named = [(m.name, p.detach()) for m, p in zip(bucket, group)]
                try:
                    works = send_bucket(pg, named, device=str(group[0].device))
                    sums.update(param_sums(named, version, columns))  # while the bytes travel
                    wait_all(works, host_timeout_s, pg)  # before ZeRO-3 releases the gathered tensors
                except Exception as err:  # noqa: BLE001 - re-raised below, once the other ranks' gathers are done
                    failed = err
    if failed is not None:  # rank 0 kept gathering with the others, so no rank waits in a gather it left
        raise failed
    return sums


def share_bucket(
    model: torch.nn.Module, bucket: list[TensorMeta], rank: int, version: int, columns: int, export: bool
) -> tuple[SharedBucket | None, list[torch.Tensor], ParamSums]:
    """Export one bucket through CUDA IPC for the rollout actors colocated on this rank's GPU: handles, buffers to
    keep until they have loaded it, and (rank 0 only) `param_sums`.

    Collective under ZeRO-3 (every rank gathers the bucket); ranks with `export` false get (None, [], sums).
    The buffers are copies, so the gathered parameters can be released at once.
    """
    params = dict(model.named_parameters())
    group = [params[m.name] for m in bucket]
    with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
        named = [(m.name, p.detach()) for m, p in zip(bucket, group)]
        sums = param_sums(named, version, columns) if rank == 0 else {}
        if not export:
            return None, [], sums
        shared, buffers = export_bucket(named)
        return shared, buffers, sums
