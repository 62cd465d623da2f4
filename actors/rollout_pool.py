"""The rollout pool: N vLLM rollout actors behind one `generate(prompts)` call.

The pool places the actors (pinned CPU cores, or a placement group of tensor-parallel GPU
bundles), splits a batch across them balanced by expected tokens, gathers the samples back in
prompt order, and grows or shrinks between calls. Weights reach the actors through the
weight-broadcast layer (`rlhf_ray.broadcast`), which loads them into every actor of `pool.actors`
and then sets `pool.version`; an actor joining later is brought to that version by
`add_actors(k, weights=...)` before it serves.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import ray
import torch
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.rollout_actor import RolloutActor, check_requests
from rlhf_ray.config import ModelConfig, RolloutConfig, SamplingConfig
from rlhf_ray.protocol import RolloutResult, Sample
from rlhf_ray.ray_utils import get_with_timeout


def balance(costs: list[int], num_bins: int) -> list[list[int]]:
    """Greedy longest-first assignment of items to bins; returns the item indices of each bin.

    Each item goes to the currently lightest bin (LPT scheduling), so the heaviest bin exceeds the
    best possible by at most one item. Ties keep index order, so the split is deterministic.
    """
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        lightest = min(range(num_bins), key=lambda b: (loads[b], b))
        bins[lightest].append(i)
        loads[lightest] += costs[i]
    return bins


@dataclass
class PendingRollout:
    """A batch in flight: what `submit` returns and `collect` turns into a `RolloutResult`."""

    refs: list[ray.ObjectRef]
    actors: list[ActorHandle]
    names: list[str]
    start: float


@dataclass
class Member:
    """One rollout actor of the pool and what it occupies."""

    actor: ActorHandle
    name: str
    core: int | None  # CPU core its engine is pinned to
    placement_group: PlacementGroup | None  # GPU bundles


class RolloutPool:
    """`num_actors` RolloutActors; `generate` fans a batch out and gathers it back in prompt order."""

    def __init__(self, model_cfg: ModelConfig, rollout_cfg: RolloutConfig):
        if not model_cfg.policy_path:
            raise ValueError(
                "model.policy_path is empty; set it to the policy's folder (`rlhf-ray make-tiny` makes one)"
            )
        self.model_cfg, self.cfg = model_cfg, rollout_cfg
        self.members: list[Member] = []
        self.version = 0  # policy version every actor serves; set by the weight-broadcast layer
        self._next_index = 0  # names are never reused, so logs stay unambiguous
        self.step = 0  # generate calls so far; enters the per-prompt seeds (a resumed run restores it)
        self.members = self._launch(rollout_cfg.num_actors)

    @property
    def actors(self) -> list[ActorHandle]:
        return [m.actor for m in self.members]

    @property
    def actor_names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def num_actors(self) -> int:
        return len(self.members)

    @property
    def workers_per_actor(self) -> int:
        """vLLM workers behind each actor (its tensor-parallel size); each joins the weight-sync group."""
        return self.cfg.tensor_parallel_size

    # ------------------------------------------------------------------ placement

    def _free_core(self, taken: list[int | None]) -> int:
        """The core with the fewest engines pinned to it (lowest id on ties)."""
        return min(range(os.cpu_count() or 1), key=lambda c: (taken.count(c), c))

    def _actor_options(self, core: int | None) -> tuple[dict, PlacementGroup | None]:
        """Ray options for one actor, and the placement group it occupies (GPU only)."""
        cfg = self.cfg
        if cfg.num_gpus_per_actor == 0:
            env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            if core is not None:
                # Unpinned, every engine binds its OpenMP threads to the same cores.
                env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
            options = {"num_cpus": cfg.num_cpus_per_actor, "resources": dict(cfg.resources)}
            return options | {"runtime_env": {"env_vars": env}}, None
        bundle = {"CPU": cfg.num_cpus_per_actor, "GPU": cfg.num_gpus_per_actor, **cfg.resources}
        pg = placement_group([bundle] * cfg.tensor_parallel_size, strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=cfg.call_timeout_s)
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
        if cfg.tensor_parallel_size == 1:
            options = {"num_cpus": cfg.num_cpus_per_actor, "num_gpus": cfg.num_gpus_per_actor}
            return options | {"resources": dict(cfg.resources), "scheduling_strategy": strategy}, pg
        # tp > 1: the actor only drives the engine; vLLM's Ray workers take the bundles' GPUs.
        return {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": strategy}, pg

    def _launch(self, k: int) -> list[Member]:
        """Start k actors and wait until every engine has loaded; they are not yet in the pool."""
        remote_cls = ray.remote(RolloutActor)
        on_cpu = self.cfg.num_gpus_per_actor == 0
        taken = [m.core for m in self.members]
        new: list[Member] = []
        for _ in range(k):
            core = self._free_core(taken) if on_cpu and self.cfg.pin_cpu_cores else None
            taken.append(core)
            options, pg = self._actor_options(core)
            name = f"rollout-{self._next_index}"
            self._next_index += 1
            new.append(Member(remote_cls.options(**options).remote(self.model_cfg, self.cfg, name), name, core, pg))
        self._call(new, [m.actor.ping.remote() for m in new], "starting rollout actors")
        return new

    def _call(self, members: list[Member], refs: list[ray.ObjectRef], what: str) -> list:
        """Gather calls on members that are not yet in the pool; on any failure stop them all and raise."""
        try:
            return get_with_timeout(refs, [m.name for m in members], what, self.cfg.call_timeout_s)
        except Exception:
            self._stop(members)
            raise

    @staticmethod
    def _stop(members: list[Member]) -> None:
        for m in members:
            ray.kill(m.actor)
            if m.placement_group is not None:
                remove_placement_group(m.placement_group)

    def add_actors(
        self, k: int, weights: list[tuple[str, torch.Tensor]] | None = None, version: int | None = None
    ) -> list[str]:
        """Start k more actors between calls; returns their names.

        Once the pool serves a version above 0 (weights changed since the checkpoint), the current
        weights must come along: `weights` (HF-named tensors) of `version`, which must equal
        `pool.version`. New actors load them before they join, so none serves stale weights.
        """
        if k < 1:
            raise ValueError(f"add_actors(k={k}): k must be at least 1")
        version = self.version if version is None else version
        if version != self.version:
            raise ValueError(f"weights of version {version} cannot join a pool serving version {self.version}")
        if weights is None and self.version > 0:
            raise ValueError(
                f"the pool serves policy version {self.version}, but new actors would start from the checkpoint "
                "(version 0); pass the current weights: add_actors(k, weights=..., version=pool.version)"
            )
        new = self._launch(k)
        if weights is not None:
            refs = [m.actor.update_weights.remote(weights, version) for m in new]
            self._call(new, refs, f"loading weights v{version} into new actors")
        self.members += new
        return [m.name for m in new]

    def remove_actors(self, k: int) -> list[str]:
        """Stop the k most recently added actors between calls; returns their names. One must remain."""
        if not 1 <= k < self.num_actors:
            raise ValueError(f"remove_actors(k={k}): k must be between 1 and num_actors - 1 = {self.num_actors - 1}")
        removed, self.members = self.members[-k:], self.members[:-k]
        self._stop(removed)
        return [m.name for m in removed]

    def discard(self, names: list[str]) -> None:
        """Stop and forget the named actors (e.g. ones that died); the rest keep serving."""
        gone = [m for m in self.members if m.name in set(names)]
        self.members = [m for m in self.members if m.name not in set(names)]
        self._stop(gone)

    def shutdown(self) -> None:
        """Stop every actor and release its placement group."""
        self._stop(self.members)
        self.members = []

    # ------------------------------------------------------------------ generation

    def submit(
        self, prompts: list[list[int]], n: int | None = None, sampling: SamplingConfig | None = None
    ) -> PendingRollout:
        """Start generating n samples for each prompt (token ids) without waiting; see `generate`.

        The whole batch is validated first, so bad input raises before any actor starts.
        """
        sampling = sampling or self.cfg.sampling
        if n is not None:
            sampling = sampling.model_copy(update={"n": n})
        requests = check_requests(
            list(enumerate(prompts)), sampling.max_new_tokens, self.model_cfg.max_model_len, self.cfg.truncate_prompts
        )
        costs = [len(ids) + sampling.n * sampling.max_new_tokens for _, ids in requests]
        refs, actors, names = [], [], []
        for actor, name, items in zip(self.actors, self.actor_names, balance(costs, self.num_actors)):
            if items:
                refs.append(actor.generate.remote([requests[i] for i in items], sampling, self.step))
                actors.append(actor)
                names.append(name)
        self.step += 1
        return PendingRollout(refs, actors, names, time.perf_counter())

    def collect(self, pending: PendingRollout) -> RolloutResult:
        """Wait for a submitted batch: samples sorted by (prompt_id, sample_idx), each actor's tokens/s
        over its own generation time, and `seconds` from submit until everything was gathered."""
        timeout = self.cfg.call_timeout_s
        per_actor: list[list[Sample]] = get_with_timeout(pending.refs, pending.names, "rollout generate", timeout)
        seconds = time.perf_counter() - pending.start
        busy = get_with_timeout(
            [a.last_call_seconds.remote() for a in pending.actors], pending.names, "rollout timing", timeout
        )
        tokens_per_s = {
            name: sum(len(s.response_ids) for s in samples) / max(sec, 1e-9)
            for name, samples, sec in zip(pending.names, per_actor, busy)
        }
        samples = sorted((s for part in per_actor for s in part), key=lambda s: s.key)
        return RolloutResult(samples=samples, tokens_per_s=tokens_per_s, seconds=seconds)

    def generate(
        self, prompts: list[list[int]], n: int | None = None, sampling: SamplingConfig | None = None
    ) -> RolloutResult:
        """n samples (default `sampling.n`) for each prompt, a list of token ids; prompt_id = its index.

        `sampling` defaults to the pool's `rollout.sampling`. The batch is split across actors by
        expected tokens (prompt length + n × max_new_tokens). Returns all samples in prompt order,
        each prompt's n samples contiguous, with each actor's generated tokens/s.
        """
        return self.collect(self.submit(prompts, n, sampling))
