"""Weight-sync figure: a WeightBroadcaster broadcast against a raw gloo broadcast of the same bytes.

The broadcast goes from a one-rank learner group to a one-actor rollout pool and includes what a
real step pays: bucketing, the broadcast itself, and vLLM loading the tensors. The raw baseline
is two bare processes (Ray actors) moving one flat buffer of the same size through a gloo group.
Both are timed the same way, by the driver around the calls that start both ends, alternately.
The details add the ratio without vLLM's reload time, and broadcast seconds against model size
(`Workload.sync_sizes`) with a least-squares line: fixed seconds + seconds per GB.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import ray
import torch

from actors.rollout_actor import RolloutActor
from actors.rollout_pool import RolloutPool
from learners import LearnerGroup
from rlhf_ray.bench.report import Figure, paired_ratio, spread
from rlhf_ray.bench.workloads import Workload, build_policy
from rlhf_ray.driver.broadcaster import WeightBroadcaster
from rlhf_ray.config import LearnerConfig, ModelConfig, RolloutConfig, WeightSyncConfig
from rlhf_ray.net import bind_listener
from rlhf_ray.weight_sync import SyncGroupSpec, join_sync_group


class GlooPeer:
    """One end of the raw baseline: a flat float32 buffer in a standalone gloo group."""

    def listen(self) -> int:
        """Rank 0: bind the group's rendezvous socket on loopback; returns its port."""
        self.listen_fd, port = bind_listener("127.0.0.1")
        return port

    def join(self, spec: SyncGroupSpec, rank: int, numel: int) -> None:
        self.pg = join_sync_group(spec, rank, self.listen_fd if rank == 0 else None)
        self.buffer = torch.randn(numel) if rank == 0 else torch.empty(numel)

    def broadcast(self) -> None:
        self.pg.broadcast(self.buffer, 0).wait()


def reload_seconds(actor: RolloutActor, weights: list[tuple[str, torch.Tensor]]) -> float:
    """Seconds for the actor's engine to load tensors it already holds: the vLLM share of a broadcast.

    Runs inside the actor (through Ray's `__ray_call__`), so no bytes move.
    """
    start = time.perf_counter()
    actor.update_weights(weights, actor.version())
    return time.perf_counter() - start


def raw_peers(nbytes: int) -> list:
    """Two GlooPeer actors joined in one group, holding `nbytes` each."""
    peers = [ray.remote(num_cpus=0.5)(GlooPeer).remote() for _ in range(2)]
    port = ray.get(peers[0].listen.remote())
    spec = SyncGroupSpec("127.0.0.1", port, world_size=2, backend="gloo", timeout_s=120, generation=0)
    ray.get([p.join.remote(spec, rank, nbytes // 4) for rank, p in enumerate(peers)])
    return peers


def raw_broadcast_seconds(peers: list) -> float:
    start = time.perf_counter()
    ray.get([p.broadcast.remote() for p in peers])
    return time.perf_counter() - start


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of ys against xs (at least two distinct xs)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def broadcast_seconds(policy_path: str, w: Workload) -> tuple[int, float]:
    """(bytes, median seconds) of `w.sync_repeats` broadcasts of `policy_path` into a fresh 1-actor pool."""
    model_cfg = ModelConfig(policy_path=policy_path, max_model_len=w.max_model_len)
    pool = RolloutPool(model_cfg, RolloutConfig(num_actors=1, kv_cache_space_gib=0.25))
    learner = LearnerGroup("policy", policy_path, LearnerConfig(num_ranks=1), model_cfg)
    try:
        broadcaster = WeightBroadcaster(learner, pool, WeightSyncConfig(), backend="gloo")
        seconds = [broadcaster.broadcast().seconds for _ in range(1 + w.sync_repeats)][1:]
        return broadcaster.total_bytes, statistics.median(seconds)
    finally:
        learner.shutdown()
        pool.shutdown()


def size_sweep(policy_path: str, nbytes: int, seconds: float, w: Workload, cache: Path) -> dict[str, float]:
    """Broadcast seconds of the workload's model and of each `w.sync_sizes` shape, and the line through them."""
    points = [(nbytes, seconds)]
    for hidden, layers in w.sync_sizes:
        shape = dataclasses.replace(w, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64, num_kv_heads=2)
        points.append(broadcast_seconds(str(build_policy(shape, cache)), w))
    points.sort()
    out = {f"size_{i}_mb": b / 1e6 for i, (b, _) in enumerate(points)}
    out |= {f"size_{i}_s": s for i, (_, s) in enumerate(points)}
    if len(points) > 1:
        fixed, per_byte = line_fit([b for b, _ in points], [s for _, s in points])
        out |= {"size_fit_fixed_s": fixed, "size_fit_s_per_gb": per_byte * 1e9}
    return out


def weight_sync_figure(policy_path: str, pool: RolloutPool, w: Workload, cache: Path) -> Figure:
    """Bytes/s of `WeightBroadcaster.broadcast` ÷ bytes/s of the raw broadcast; pool must have 1 actor."""
    model_cfg = ModelConfig(policy_path=policy_path, max_model_len=w.max_model_len)
    learner = LearnerGroup("policy", policy_path, LearnerConfig(num_ranks=1), model_cfg)
    peers: list = []
    try:
        broadcaster = WeightBroadcaster(learner, pool, WeightSyncConfig(), backend="gloo")
        nbytes = broadcaster.total_bytes
        peers = raw_peers(nbytes)
        weights = ray.put(learner.export_weights())
        ours, raw, reload, in_flight, seconds = [], [], [], [], []
        for i in range(1 + w.sync_repeats):  # the first builds the group and is dropped
            stats = broadcaster.broadcast()
            raw_s = raw_broadcast_seconds(peers)
            reload_s = ray.get(pool.actors[0].__ray_call__.remote(reload_seconds, weights))
            if i > 0:
                ours.append(nbytes / stats.seconds / 1e9)
                raw.append(nbytes / raw_s / 1e9)
                reload.append(reload_s)
                in_flight.append(nbytes / (stats.seconds - stats.reload_seconds) / 1e9)
                seconds.append(stats.seconds)
    finally:
        for p in peers:
            ray.kill(p)
        learner.shutdown()
    details = {"megabytes": nbytes / 1e6}
    details |= {f"broadcaster_gb_per_s_{k}": v for k, v in spread(ours).items()}
    details |= {f"raw_gloo_gb_per_s_{k}": v for k, v in spread(raw).items()}
    details |= {f"vllm_reload_s_{k}": v for k, v in spread(reload).items()}
    details["without_reload_ratio_median"] = paired_ratio(in_flight, raw)[0]
    pool.shutdown()  # frees its core for the pools of the size sweep
    details |= size_sweep(policy_path, nbytes, statistics.median(seconds), w, cache)
    return Figure(
        "weight_sync", "Weight sync (broadcaster ÷ raw gloo)", *paired_ratio(ours, raw),
        goal=0.8, higher_is_better=True, details=details,
        note="the broadcaster's time includes vLLM loading the weights (its reload alone: vllm_reload_s; the "
        "ratio over the time outside the reload: without_reload_ratio_median); the raw baseline only moves "
        "bytes; size_*: broadcast seconds against model size, fitted as size_fit_fixed_s + size_fit_s_per_gb × GB",
    )  # fmt: skip
