"""The weight-sync protocol shared by the sending learner and the receiving rollout actors.

A standalone process group (gloo on CPU, NCCL on GPU) joins learner rank 0
(rank 0 of the group) and every vLLM worker (ranks 1..W). It is created over
its own TCP store, so it touches neither the learners' training group nor
vLLM's groups. Parameters travel in buckets of whole layers (the unit vLLM
reloads), one broadcast per tensor, issued asynchronously so transfers overlap
the sender's checksums and the receiver's reload of the previous bucket.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

from rlhf_ray.net import route_source_address


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
    timeout_s: float  # how long one bucket may take, counted on the host (see `wait_all`)
    generation: int  # bumped each time the group is rebuilt (actors joined or left)

    @property
    def group_timeout_s(self) -> float:
        """The process group's own timeout. Under NCCL its watchdog ends the whole process when a collective
        outlives it, so it must fire only after the host-side deadline of `wait_all` has aborted the group."""
        return self.timeout_s if self.backend == "gloo" else self.timeout_s + NCCL_WATCHDOG_MARGIN_S


# Seconds the NCCL watchdog waits beyond the host deadline (see SyncGroupSpec.group_timeout_s).
NCCL_WATCHDOG_MARGIN_S = 60.0


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


def join_sync_group(spec: SyncGroupSpec, rank: int, listen_fd: int | None = None) -> dist.ProcessGroup:
    """Create this process's member of the standalone group; blocks until all ranks joined (or timeout).

    Rank 0 serves the group's store on `listen_fd`, the socket it bound itself with
    `rlhf_ray.net.bind_listener(spec.master_addr)` and whose port the spec carries; the store takes
    ownership of it. (TCPStore's own server would listen on every interface.)
    """
    if (rank == 0) != (listen_fd is not None):
        raise ValueError("rank 0 of the weight-sync group, and only rank 0, passes the socket it listens on")
    store = store_on(spec.master_addr, spec.master_port, spec.world_size, spec.timeout_s, listen_fd)
    timeout = timedelta(seconds=spec.group_timeout_s)
    prefixed = dist.PrefixStore(f"weight_sync/{spec.generation}", store)
    if spec.backend == "gloo":
        # Gloo's default device binds the address the host name resolves to, or 127.0.0.1 when that is not
        # local (a container, a network namespace), and tells the peers that address: across nodes they then
        # dial their own loopback. Bind the address that routes to the group's store instead.
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        local = spec.master_addr if rank == 0 else route_source_address(spec.master_addr)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local)]
        return dist.ProcessGroupGloo(prefixed, rank, spec.world_size, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, opts)


def store_on(host: str, port: int, world_size: int, timeout_s: float, listen_fd: int | None) -> dist.TCPStore:
    """A TCPStore served on `listen_fd` (the server's own bound socket) or, without one, a client of host:port."""
    return dist.TCPStore(
        host, port, world_size, is_master=listen_fd is not None, timeout=timedelta(seconds=timeout_s),
        master_listen_fd=listen_fd,
    )


def send_bucket(pg: dist.ProcessGroup, named: list[tuple[str, torch.Tensor]], device: str = "cpu") -> list:
    """Start broadcasting one bucket from rank 0, one collective per tensor; returns the pending works.

    Each tensor goes as it lies in memory: packing a bucket into one flat buffer first costs a full
    copy, which on CPU took as long as the transfer itself. Keep the tensors alive and unmodified
    until every work has finished (`wait_all`).
    """
    works = []
    for _, t in named:
        works.append(pg.broadcast(t.detach().to(device).contiguous(), 0))
    return works


def post_receive(
    pg: dist.ProcessGroup, metas: list[TensorMeta], device: str = "cpu"
) -> tuple[list[tuple[str, torch.Tensor]], list]:
    """Post the receives of one bucket broadcast by `send_bucket`, without waiting.

    Returns (name, tensor) in the order of `metas` and the pending works; the tensors hold the
    learner's values once `wait_all(works)` returns. Posting the next bucket before loading the
    current one overlaps the transfer with vLLM's reload.
    """
    named = [(m.name, torch.empty(m.shape, dtype=m.torch_dtype, device=device)) for m in metas]
    return named, [pg.broadcast(t, 0) for _, t in named]


def wait_all(works: list, host_timeout_s: float | None = None, pg: dist.ProcessGroup | None = None) -> None:
    """Block the host until every work in `works` has finished.

    Without `host_timeout_s` (gloo): `work.wait()`, which blocks the host and raises once the group's
    timeout passes. With it (NCCL): `work.wait()` on an NCCL work only makes the current CUDA stream
    wait and returns at once, and a collective that outlives the group's timeout makes the NCCL
    watchdog end the process; so poll `is_completed()` on the host instead, and past the deadline
    abort `pg` (its pending collectives end without the watchdog) and raise TimeoutError.
    """
    if host_timeout_s is None:
        for work in works:
            work.wait()
        return
    deadline = time.monotonic() + host_timeout_s
    pause = 1e-4
    for work in works:
        while not work.is_completed():
            if time.monotonic() > deadline:
                if pg is not None:
                    abort_group(pg)
                raise TimeoutError(
                    f"weight-sync collective not finished within weight_sync.timeout_s={host_timeout_s:g}s "
                    "(a peer died or never joined); the group was aborted"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        work.wait()  # finished: raises if it failed (a peer's connection closed); under NCCL orders the stream


def host_timeout(spec: SyncGroupSpec) -> float | None:
    """The `host_timeout_s` that `wait_all` needs for this group: none for gloo (its wait blocks the host)."""
    return None if spec.backend == "gloo" else spec.timeout_s


def abort_group(pg: dist.ProcessGroup | None) -> None:
    """End a weight-sync group being replaced or given up: its pending collectives return with an error
    instead of hanging (NCCL: instead of the watchdog ending the process later). Safe to call twice."""
    if pg is None:
        return
    try:
        pg.abort()
    except RuntimeError:  # already aborted, or a backend without abort
        pass


def checksum(tensor: torch.Tensor) -> float:
    """A cheap fingerprint of a tensor: the sum of its elements, accumulated in float64."""
    return float(tensor.detach().sum(dtype=torch.float64))


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


# Per HF parameter: (float64 sum of all elements, float64 sum over the `sample_columns` of a 2-D weight).
ParamSums = dict[str, tuple[float, float]]


def sample_columns(width: int, version: int, count: int) -> list[int]:
    """`count` input columns of a [out, width] weight, the same on the learner and every actor for a
    policy `version`, fresh for each version; all of them when count is 0 or at least width."""
    if count <= 0 or count >= width:
        return list(range(width))
    return sorted(random.Random(version * 1_000_003 + width).sample(range(width), count))


def param_sums(named: Iterable[tuple[str, torch.Tensor]], version: int, columns: int) -> ParamSums:
    """`ParamSums` of the learner's tensors for the broadcast of `version` (see `expected_layer_sums`)."""
    sums: ParamSums = {}
    for name, t in named:
        full = checksum(t)
        sampled = full
        if t.dim() == 2:
            sampled = float(t.detach()[:, sample_columns(t.shape[1], version, columns)].sum(dtype=torch.float64))
        sums[name] = (full, sampled)
    return sums


def expected_layer_sums(sums: ParamSums, column_sampled: Iterable[str]) -> dict[str, float]:
    """What an actor must report per layer: the column-sampled sum for the HF weights it read back
    through a packed kernel on sampled columns (`column_sampled`), the full sum for all others."""
    sampled = set(column_sampled)
    return sum_by_layer((name, pair[1] if name in sampled else pair[0]) for name, pair in sums.items())


def combine_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One float64 sum per vLLM parameter from each tensor-parallel rank's sums of its own copy.

    A parameter every rank holds whole (a norm weight) reports the same sum on all ranks and counts
    once; a sharded one (each rank holds distinct rows or columns) reports different sums, which add
    up to the full tensor's. A replicated parameter that disagrees across ranks is thus counted
    several times and fails the comparison with the learner, as it should.
    """
    if len(per_rank) == 1:
        return dict(per_rank[0])
    return {
        name: values[0] if len(set(values)) == 1 else math.fsum(values)
        for name in per_rank[0]
        for values in [[sums[name] for sums in per_rank]]
    }


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

