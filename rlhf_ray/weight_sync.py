"""The weight-sync protocol shared by the sending learner and the receiving rollout actors.

A standalone process group (gloo on CPU, NCCL on GPU) joins learner rank 0
(rank 0 of the group) and every vLLM worker (ranks 1..W). It is created over
its own TCP store, so it touches neither the learners' training group nor
vLLM's groups. Parameters travel in buckets: each bucket is one flat buffer
per dtype, broadcast from rank 0, then cut back into named tensors.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorMeta:
    """Name (HF naming), shape and dtype of one parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @staticmethod
    def of(name: str, tensor: torch.Tensor) -> "TensorMeta":
        return TensorMeta(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))


@dataclass(frozen=True)
class SyncGroupSpec:
    """Everything a participant needs to join the weight-sync group (sent over Ray)."""

    master_addr: str
    master_port: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    timeout_s: float
    generation: int  # bumped each time the group is rebuilt (actors joined or left)


def plan_buckets(metas: Iterable[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Group parameters, in order, into buckets of at most `bucket_bytes`, never splitting a layer.

    vLLM fuses q/k/v and gate/up projections: reloading part of a fused module corrupts it, so
    every tensor of one layer (see `layer_of`) travels in the same bucket. A layer larger than
    `bucket_bytes` gets a bucket of its own.
    """
    layers: list[list[TensorMeta]] = []
    for meta in metas:
        if layers and layer_of(layers[-1][0].name) == layer_of(meta.name):
            layers[-1].append(meta)
        else:
            layers.append([meta])
    buckets: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    size = 0
    for layer in layers:
        nbytes = sum(m.nbytes for m in layer)
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current += layer
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def _listening_socket(host: str, port: int) -> int:
    """A TCP socket listening on host:port only; the caller (the store) owns the returned descriptor."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock.detach()


def join_sync_group(spec: SyncGroupSpec, rank: int) -> dist.ProcessGroup:
    """Create this process's member of the standalone group; blocks until all ranks joined (or timeout)."""
    timeout = timedelta(seconds=spec.timeout_s)
    # TCPStore's own server listens on every interface; rank 0 hands it a socket bound to master_addr only.
    listen_fd = _listening_socket(spec.master_addr, spec.master_port) if rank == 0 else None
    store = dist.TCPStore(
        spec.master_addr, spec.master_port, spec.world_size, is_master=(rank == 0), timeout=timeout,
        master_listen_fd=listen_fd,
    )
    prefixed = dist.PrefixStore(f"weight_sync/{spec.generation}", store)
    if spec.backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, opts)


def _flat_by_dtype(metas: list[TensorMeta]) -> dict[str, list[TensorMeta]]:
    groups: dict[str, list[TensorMeta]] = {}
    for m in metas:
        groups.setdefault(m.dtype, []).append(m)
    return groups


def send_bucket(pg: dist.ProcessGroup, named: list[tuple[str, torch.Tensor]], device: str = "cpu") -> int:
    """Broadcast one bucket from rank 0; returns the bytes sent."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for _, t in named:
        by_dtype.setdefault(t.dtype, []).append(t.detach().reshape(-1))
    sent = 0
    for dtype in sorted(by_dtype, key=str):
        flat = torch.cat(by_dtype[dtype]).to(device)
        pg.broadcast(flat, 0).wait()
        sent += flat.numel() * flat.element_size()
    return sent


def receive_bucket(pg: dist.ProcessGroup, metas: list[TensorMeta], device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """Receive one bucket broadcast by `send_bucket`; returns (name, tensor) in the order of `metas`."""
    out: dict[str, torch.Tensor] = {}
    groups = _flat_by_dtype(metas)
    for dtype in sorted(groups, key=lambda d: str(getattr(torch, d))):
        members = groups[dtype]
        flat = torch.empty(sum(m.numel for m in members), dtype=members[0].torch_dtype, device=device)
        pg.broadcast(flat, 0).wait()
        offset = 0
        for m in members:
            out[m.name] = flat[offset : offset + m.numel].view(m.shape)
            offset += m.numel
    return [(m.name, out[m.name]) for m in metas]


def checksum(tensor: torch.Tensor) -> float:
    """A cheap fingerprint of a tensor: the float64 sum of its elements."""
    return float(tensor.detach().to(torch.float64).sum())


def layer_of(name: str) -> str:
    """The module prefix a parameter belongs to, e.g. 'model.layers.3' or 'model.embed_tokens'.

    vLLM fuses q/k/v and gate/up projections, so per-parameter names differ between
    the learner and the engine; the set of elements per layer does not.
    """
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[: i + 2])
    return ".".join(parts[:-1]) or name


def layer_checksums(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """Sum of `checksum` per layer (see `layer_of`)."""
    return sum_by_layer((name, checksum(t)) for name, t in named)


def sum_by_layer(named_sums: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Per-parameter sums added up per layer (see `layer_of`)."""
    sums: dict[str, float] = {}
    for name, value in named_sums:
        key = layer_of(name)
        sums[key] = sums.get(key, 0.0) + value
    return sums


def compare_checksums(expected: dict[str, float], actual: dict[str, float], who: str, rtol: float = 1e-6) -> None:
    """Raise naming `who` and the first layer whose checksum differs (or is missing)."""
    for key, want in expected.items():
        got = actual.get(key)
        if got is None or not math.isclose(got, want, rel_tol=rtol, abs_tol=1e-6 * max(1.0, abs(want))):
            raise RuntimeError(
                f"weight checksum mismatch on {who}: layer {key!r} expected {want!r}, got {got!r}"
            )

