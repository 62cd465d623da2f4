"""The rollout pool: N vLLM rollout actors behind one `generate(prompts)` call.

The pool places the actors (pinned CPU cores, or a placement group of tensor-parallel GPU
bundles), splits a batch across them balanced by expected tokens, gathers the samples back in
prompt order, and grows or shrinks between calls. Weights reach the actors through the
weight-broadcast layer (`rlhf_ray.driver.broadcaster`), which loads them into every actor of `pool.actors`
and then sets `pool.version`; an actor joining later loads the current weights (from
`pool.current_weights`, the learners' export) before it serves, and joins the weight-sync group
at the next broadcast.

Failures. The pool is the one owner of rollout-actor death: its members, their replacements and
the count against `rollout.max_replacements`. An actor that dies during a generate call loses no
sample: `collect` gives its requests to the surviving actors (same per-prompt seeds, so the same
samples), then `replace_dead` starts one in its place at the current weights and version. An actor
the weight broadcast finds dead is replaced through the same `replace_dead`. A hung actor is
named by the per-call timeout.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import ray
import torch
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.rollout_actor import Request, RolloutActor, check_requests
from rlhf_ray.config import ModelConfig, RolloutConfig, SamplingConfig
from rlhf_ray.protocol import ActorFailure, RolloutResult, Sample
from rlhf_ray.ray_utils import ActorCallError, get_with_timeout
from rlhf_ray.sizing import ray_options, rollout_bundles
from actors.placement import free_bundle, tensor_parallel_env

log = logging.getLogger(__name__)


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
class Member:
    """One rollout actor of the pool and what it occupies."""

    actor: ActorHandle
    name: str
    core: int | None  # CPU core its engine is pinned to
    placement_group: PlacementGroup | None  # GPU bundles it owns
    bundle: int | None = None  # colocated: its bundle in the shared placement group (a learner rank's)
    node_id: str = ""
    node_ip: str = ""


@dataclass
class PendingRollout:
    """A batch in flight: what `submit` returns and `collect` turns into a `RolloutResult`."""

    refs: list[ray.ObjectRef]
    members: list[Member]
    requests: list[list[Request]]  # what each member was given, to re-dispatch if it dies
    sampling: SamplingConfig
    step: int
    start: float
    expected: set[tuple[int, int]] = field(default_factory=set)  # every (prompt_id, sample_idx) of the batch


class RolloutPool:
    """`num_actors` RolloutActors; `generate` fans a batch out and gathers it back in prompt order."""

    def __init__(
        self, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, colocate_in: PlacementGroup | None = None
    ):
        if not model_cfg.policy_path:
            raise ValueError(
                "model.policy_path is empty; set it to the policy's folder (`rlhf-ray make-tiny` makes one)"
            )
        self.model_cfg, self.cfg = model_cfg, rollout_cfg
        # rollout.colocate: actor i goes into bundle i of this group, whose learner rank i shares its GPU.
        self.colocate_in = colocate_in
        self.members: list[Member] = []
        self.version = 0  # policy version every actor serves; set by the weight-broadcast layer
        self._next_index = 0  # names are never reused, so logs stay unambiguous
        self.step = 0  # generate calls so far; enters the per-prompt seeds (a resumed run restores it)
        # The learners' current weights (HF-named tensors of `version`), for actors that join later;
        # without it a new actor can only start from the checkpoint, which is right only at version 0.
        self.current_weights: Callable[[], list[tuple[str, torch.Tensor]]] | None = None
        self.replacements = 0  # dead actors replaced so far, against rollout.max_replacements
        self._in_flight: set[str] = set()  # actors with a submitted batch not yet collected
        self._retiring: list[Member] = []  # removed while busy: stopped once their batch is collected
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

    def _actor_options(self, core: int | None, bundle: int | None = None) -> tuple[dict, PlacementGroup | None]:
        """Ray options for one actor, and the placement group it owns (GPU only; none when colocated in `bundle`)."""
        cfg = self.cfg
        bundles = rollout_bundles(cfg)
        if bundle is not None:
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.colocate_in, placement_group_bundle_index=bundle)
            return ray_options(bundles[0]) | {"scheduling_strategy": strategy}, None
        if cfg.num_gpus_per_actor == 0:
            env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            if core is not None:
                # Unpinned, every engine binds its OpenMP threads to the same cores.
                env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
            return ray_options(bundles[0]) | {"runtime_env": {"env_vars": env}}, None
        pg = placement_group(bundles, strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=cfg.call_timeout_s)
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
        if cfg.tensor_parallel_size == 1:
            return ray_options(bundles[0]) | {"scheduling_strategy": strategy}, pg
        # tp > 1: the actor only drives the engine; vLLM's Ray workers take the bundles' GPUs.
        env = {"env_vars": tensor_parallel_env(cfg.num_gpus_per_actor)}
        return {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": strategy, "runtime_env": env}, pg

    def _launch(self, k: int) -> list[Member]:
        """Start k actors and wait until every engine has loaded; they are not yet in the pool."""
        remote_cls = ray.remote(RolloutActor)
        on_cpu = self.cfg.num_gpus_per_actor == 0
        taken = [m.core for m in self.members]
        new: list[Member] = []
        used = {m.bundle for m in self.members}
        for _ in range(k):
            core = self._free_core(taken) if on_cpu and self.cfg.pin_cpu_cores else None
            taken.append(core)
            bundle = None if self.colocate_in is None else free_bundle(self.colocate_in.bundle_count, used)
            used.add(bundle)
            options, pg = self._actor_options(core, bundle)
            name = f"rollout-{self._next_index}"
            self._next_index += 1
            actor = remote_cls.options(**options).remote(self.model_cfg, self.cfg, name)
            new.append(Member(actor, name, core, pg, bundle))
        places = self._call(new, [m.actor.where.remote() for m in new], "starting rollout actors")
        for m, place in zip(new, places):
            m.node_id, m.node_ip = place["node_id"], place["node_ip"]
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
        `pool.version`, or else those of `pool.current_weights()`. New actors load them before they
        join, so none serves stale weights.
        """
        if k < 1:
            raise ValueError(f"add_actors(k={k}): k must be at least 1")
        version = self.version if version is None else version
        if version != self.version:
            raise ValueError(f"weights of version {version} cannot join a pool serving version {self.version}")
        if weights is None and self.version > 0:
            if self.current_weights is None:
                raise ValueError(
                    f"the pool serves policy version {self.version}, but new actors would start from the checkpoint "
                    "(version 0); pass the current weights: add_actors(k, weights=..., version=pool.version), "
                    "or set pool.current_weights (e.g. to the policy learner group's export_weights)"
                )
            weights = self.current_weights()
        new = self._launch(k)
        if weights is not None:
            refs = [m.actor.update_weights.remote(weights, version) for m in new]
            self._call(new, refs, f"loading weights v{version} into new actors")
        self.members += new
        return [m.name for m in new]

    def remove_actors(self, k: int) -> list[str]:
        """Stop the k most recently added actors; returns their names. One must remain.

        An actor still generating a submitted batch takes no new work and stops once `collect` has its samples.
        """
        if not 1 <= k < self.num_actors:
            raise ValueError(f"remove_actors(k={k}): k must be between 1 and num_actors - 1 = {self.num_actors - 1}")
        removed, self.members = self.members[-k:], self.members[:-k]
        self._retiring += [m for m in removed if m.name in self._in_flight]
        self._stop([m for m in removed if m.name not in self._in_flight])
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
        pending = self._dispatch(requests, sampling, self.step)
        pending.expected = {(pid, i) for pid, _ in requests for i in range(sampling.n)}
        self.step += 1
        return pending

    def _dispatch(self, requests: list[Request], sampling: SamplingConfig, step: int) -> PendingRollout:
        """Split requests across the members by expected tokens and start one generate call per busy member."""
        costs = [len(ids) + sampling.n * sampling.max_new_tokens for _, ids in requests]
        refs, members, parts = [], [], []
        for member, items in zip(self.members, balance(costs, self.num_actors)):
            if items:
                part = [requests[i] for i in items]
                refs.append(member.actor.generate.remote(part, sampling, step))
                members.append(member)
                parts.append(part)
        self._in_flight |= {m.name for m in members}
        return PendingRollout(refs, members, parts, sampling, step, time.perf_counter())

    def collect(self, pending: PendingRollout) -> RolloutResult:
        """Wait for a submitted batch: samples sorted by (prompt_id, sample_idx), each actor's tokens/s
        over its own generation time, and `seconds` from submit until everything was gathered.

        Requests of an actor that died are generated again by the others, then the dead actor is
        replaced (see the module docstring); `failures` records each death and its recovery.
        """
        samples: list[Sample] = []
        tokens: dict[str, int] = {}
        busy: dict[str, float] = {}
        dead: list[tuple[Member, int]] = []  # (member, samples it lost)
        replaced: list[str] = []
        detected, round_ = 0.0, pending
        while lost := self._gather(round_, samples, tokens, busy):
            detected = detected or time.perf_counter()
            dead += self._forget(lost, pending, len(dead))
            if not self.members:  # nobody left to re-dispatch to: replace first
                replaced += self._add_replacements(len(dead) - len(replaced))
            requests = sorted((r for _, part in lost for r in part), key=lambda r: r[0])
            round_ = self._dispatch(requests, pending.sampling, pending.step)
        self._settle_in_flight()
        regenerated = time.perf_counter() - detected
        if len(dead) > len(replaced):
            replaced += self._add_replacements(len(dead) - len(replaced))
        recovered = time.perf_counter() - detected
        failures = [
            ActorFailure(m.name, m.node_id, m.node_ip, pending.step, n_lost, new, regenerated, recovered)
            for (m, n_lost), new in zip(dead, replaced)
        ]
        for f in failures:
            log.warning(
                "rollout step %d: %s (node %s) replaced by %s at policy version %d; its %d samples were regenerated "
                "%.1fs and the replacement served %.1fs after its death was noticed (%d of %d replacements used)",
                f.step, f.name, f.node_ip, f.replaced_by, self.version, f.lost_samples, f.regenerated_s,
                f.recovery_s, self.replacements, self.cfg.max_replacements,
            )
        samples.sort(key=lambda s: s.key)
        keys = [s.key for s in samples]
        if len(keys) != len(set(keys)) or set(keys) != pending.expected:
            missing = sorted(pending.expected - set(keys))[:5]
            raise RuntimeError(
                f"rollout step {pending.step}: gathered {len(keys)} samples ({len(set(keys))} distinct) for "
                f"{len(pending.expected)} expected; missing e.g. {missing}"
            )
        tokens_per_s = {name: tokens[name] / max(busy[name], 1e-9) for name in tokens}
        return RolloutResult(samples, tokens_per_s, time.perf_counter() - pending.start, failures)

    def _gather(
        self, pending: PendingRollout, samples: list[Sample], tokens: dict[str, int], busy: dict[str, float]
    ) -> list[tuple[Member, list[Request]]]:
        """Add the samples, tokens and busy seconds of every live member; return the dead ones with their requests.

        A member that does not answer within `rollout.call_timeout_s` is hung, not dead: that raises,
        naming it, since its requests may still complete and could not be told apart from a retry.
        """
        timeout = self.cfg.call_timeout_s
        _, late = ray.wait(pending.refs, num_returns=len(pending.refs), timeout=timeout)
        if late:
            hung = [m.name for r, m in zip(pending.refs, pending.members) if r in set(late)]
            raise ActorCallError(f"rollout generate failed: no answer within {timeout:.0f}s from {', '.join(hung)}", hung)
        lost, alive = [], []
        for ref, member, requests in zip(pending.refs, pending.members, pending.requests):
            try:
                part: list[Sample] = ray.get(ref)
            except ray.exceptions.RayActorError:
                lost.append((member, requests))
                continue
            samples += part
            tokens[member.name] = tokens.get(member.name, 0) + sum(len(s.response_ids) for s in part)
            alive.append(member)
        seconds = get_with_timeout(
            [m.actor.last_call_seconds.remote() for m in alive], [m.name for m in alive], "rollout timing", timeout
        )
        for m, sec in zip(alive, seconds):
            busy[m.name] = busy.get(m.name, 0.0) + sec
        return lost

    def _forget(
        self, lost: list[tuple[Member, list[Request]]], pending: PendingRollout, already_dead: int
    ) -> list[tuple[Member, int]]:
        """Drop dead members (logging who, where and what they lost); raise once replacements run out."""
        names = [m.name for m, _ in lost]
        self.members = [m for m in self.members if m.name not in names]
        self._retiring = [m for m in self._retiring if m.name not in names]
        self._in_flight -= set(names)
        self._stop([m for m, _ in lost])
        where = ", ".join(f"{m.name} on node {m.node_ip} ({m.node_id[:12]})" for m, _ in lost)
        self._check_budget(f"rollout step {pending.step}: {where}", names, already_dead)
        n = pending.sampling.n
        log.warning(
            "rollout step %d: %s died; re-dispatching its %d sample(s) to %s", pending.step, where,
            sum(len(part) for _, part in lost) * n, ", ".join(self.actor_names) or "a replacement",
        )
        return [(m, len(part) * n) for m, part in lost]

    def replace_dead(self, names: list[str]) -> list[str]:
        """Stop the named actors (found dead outside a generate call, e.g. by the weight broadcast) and
        start as many in their place at the current weights and version; returns the new names.

        Raises ActorCallError, naming them, when that would exceed `rollout.max_replacements`.
        """
        self._check_budget(", ".join(names), names)
        self.discard(names)
        return self._add_replacements(len(names))

    def _check_budget(self, who: str, names: list[str], already_dead: int = 0) -> None:
        """Raise ActorCallError when replacing `names` (after `already_dead` more) exceeds rollout.max_replacements."""
        made, limit = self.replacements + already_dead, self.cfg.max_replacements
        if made + len(names) > limit:
            raise ActorCallError(
                f"{who} died and rollout.max_replacements={limit} replacements are used up ({made} made). Raise "
                "rollout.max_replacements, or look for the cause in the actor's log in the Ray session's logs folder",
                names, names,
            )

    def _add_replacements(self, k: int) -> list[str]:
        """Start k actors in place of dead ones (already dropped), at the current weights and version; counts them."""
        new = self.add_actors(k)
        self.replacements += k
        return new

    def _settle_in_flight(self) -> None:
        """After a batch is gathered: stop the actors removed while they were generating it."""
        self._stop(self._retiring)
        self._retiring = []
        self._in_flight.clear()

    def generate(
        self, prompts: list[list[int]], n: int | None = None, sampling: SamplingConfig | None = None
    ) -> RolloutResult:
        """n samples (default `sampling.n`) for each prompt, a list of token ids; prompt_id = its index.

        `sampling` defaults to the pool's `rollout.sampling`. The batch is split across actors by
        expected tokens (prompt length + n × max_new_tokens). Returns all samples in prompt order,
        each prompt's n samples contiguous, with each actor's generated tokens/s.
        """
        return self.collect(self.submit(prompts, n, sampling))
