"""Driver side of the weight broadcast: learner rank 0 ══ weight-sync group ══▶ every vLLM worker.

The driver owns the group's life cycle: it asks learner rank 0 to listen (on its own node), (re)builds the group
when rollout actors join or leave, triggers each broadcast on both sides at once, and checks
afterwards that every actor reports the new version and the learner's per-layer checksums, and (every
`weight_sync.probe_every` broadcasts) that every actor's log-probs on a fixed probe batch equal the learner's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray

from rlhf_ray.config import WeightSyncConfig
from rlhf_ray.probe import probe_batch, probe_gap, probe_tolerance
from rlhf_ray.ray_utils import ActorCallError, LearnerRankError, get_with_timeout
from rlhf_ray.weight_sync import ParamSums, SyncGroupSpec, compare_checksums, expected_layer_sums, plan_buckets

log = logging.getLogger(__name__)


@dataclass
class BroadcastStats:
    version: int
    bytes: int
    seconds: float  # from the driver's call until every actor has loaded the weights
    reload_seconds: float = 0.0  # of those, the slowest actor's time inside vLLM's reload
    probe_diff_mean: float = float("nan")  # worst actor's mean |vLLM - learner| probe log-prob, nats/token
    probe_diff_max: float = float("nan")  # and the largest single gap, nats (NaN: not probed this time)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


class WeightBroadcaster:
    """Keeps a weight-sync group between a learner group and a rollout pool, and broadcasts through it.

    `learners` must offer `workers` (Ray handles, rank 0 first) and their `names`, with `weight_metas()`,
    `join_weight_sync(spec)` and `send_weights(plan, version, columns)`; `pool` must offer `actors`, `actor_names`,
    `workers_per_actor` (vLLM workers per actor, each a member of the group) and `version`, its
    actors `join_weight_sync(spec, rank)`, `receive_weights(plan, version)` and `weight_report(columns)`.
    With backend "cuda_ipc" (learner rank 0 and the actors on one GPU) no group is built: the
    workers' `share_bucket(bucket, version, columns)`/`release_shared()` and the actors' `receive_shared(shared,
    version)` carry the buckets instead.

    `generation_wait_s` (async mode: `rollout.call_timeout_s`) is added to every timeout of a broadcast:
    learner rank 0 then starts sending while the actors may still be generating, and they join the
    collective only once their generation ends.
    """

    def __init__(
        self, learners: Any, pool: Any, cfg: WeightSyncConfig, backend: str = "gloo", generation_wait_s: float = 0.0
    ):
        self.learners, self.pool, self.cfg, self.backend = learners, pool, cfg, backend
        self.timeout_s = cfg.timeout_s + generation_wait_s
        self.learner_names: list[str] = list(learners.names)
        metas = ray.get(learners.workers[0].weight_metas.remote())
        self.plan = plan_buckets(metas, int(cfg.bucket_mb * 2**20))
        self.total_bytes = sum(m.nbytes for m in metas)
        self.dtype = metas[0].dtype
        self.generation = 0
        self.members: list[str] = []
        self.owners: list[int] = []  # cuda_ipc: per rollout actor, the learner rank that shares its GPU
        if backend == "cuda_ipc":
            self._ensure_group()  # the UUID pairing fails now, not at the first broadcast

    def _call(self, refs: list, names: list[str], what: str) -> list:
        """Gather the calls; a dead learner rank raises LearnerRankError (nothing on the rollout side can fix that)."""
        try:
            return get_with_timeout(refs, names, what, self.timeout_s)
        except ActorCallError as err:
            ranks = [n for n in err.dead if n in self.learner_names]
            if ranks:
                raise LearnerRankError(str(err), ranks, ranks) from None
            raise

    def _ensure_group(self) -> None:
        """(Re)build the group when the pool's membership changed since the last broadcast (cuda_ipc: re-pair
        each actor with the learner rank on its GPU)."""
        if self.members == list(self.pool.actor_names):
            return
        if self.backend == "cuda_ipc":
            self.owners = self._pair_by_gpu()
            self.members = list(self.pool.actor_names)
            return
        self.generation += 1
        open_ref = self.learners.workers[0].open_weight_sync.remote(self.cfg.master_addr, self.cfg.interface)
        address, port = self._call([open_ref], self.learner_names[:1], "opening the weight-sync rendezvous")[0]
        spec = SyncGroupSpec(
            master_addr=address,
            master_port=port,
            world_size=1 + len(self.pool.actors) * self.pool.workers_per_actor,
            backend=self.backend,
            timeout_s=self.timeout_s,
            generation=self.generation,
        )
        refs = [w.join_weight_sync.remote(spec) for w in self.learners.workers]
        per_actor = self.pool.workers_per_actor
        refs += [a.join_weight_sync.remote(spec, 1 + i * per_actor) for i, a in enumerate(self.pool.actors)]
        names = self.learner_names + list(self.pool.actor_names)
        try:
            self._call(refs, names, "joining the weight-sync group")
        except LearnerRankError:
            raise
        except ActorCallError as err:
            raise self._name_dead(err) from err
        self.members = list(self.pool.actor_names)
        log.info("weight-sync group generation %d: %s + %s", self.generation, self.learner_names[0], ", ".join(self.members))

    def broadcast(self, version: int | None = None) -> BroadcastStats:
        """Send the learners' current weights to every rollout actor.

        The policy version goes up by one, or becomes `version` (a resumed run restores its own; a
        resend after a failure repeats the failed one). A rollout actor that died raises
        ActorCallError with its name in `dead`; the pool is not changed here.
        """
        version = self.pool.version + 1 if version is None else version
        self._ensure_group()
        start = time.perf_counter()
        try:
            send_sums, reload_s = (self._share if self.backend == "cuda_ipc" else self._send)(version)
        except LearnerRankError:
            raise
        except ActorCallError as err:
            raise self._name_dead(err) from err
        seconds = time.perf_counter() - start
        self.pool.version = version
        if self.cfg.verify:
            self.verify(send_sums)
        stats = BroadcastStats(version, self.total_bytes, seconds, reload_s)
        if self.cfg.probe_every and version % self.cfg.probe_every == 0:
            stats.probe_diff_mean, stats.probe_diff_max = self.probe(version)
        return stats

    def _send(self, version: int) -> tuple[ParamSums, float]:
        """Through the weight-sync group: learner rank 0 sends every bucket while each actor receives and loads.

        Returns the learner's `ParamSums` and the slowest actor's reload seconds.
        """
        workers, names = self.learners.workers, self.learner_names + list(self.pool.actor_names)
        send = [w.send_weights.remote(self.plan, version, self.cfg.verify_columns) for w in workers]
        recv = [a.receive_weights.remote(self.plan, version) for a in self.pool.actors]
        results = self._call(send + recv, names, f"weight broadcast v{version}")
        return results[0], max(results[len(send) :], default=0.0)

    def _share(self, version: int) -> tuple[ParamSums, float]:
        """Colocated GPUs: per bucket, learner rank 0 exports CUDA IPC handles, every actor loads from them, and
        rank 0 frees the bucket's buffers before exporting the next."""
        workers, sums, reload_s = self.learners.workers, {}, 0.0
        exporters = set(self.owners)
        try:
            for k, bucket in enumerate(self.plan):
                refs = [w.share_bucket.remote(bucket, version, self.cfg.verify_columns, i in exporters)
                        for i, w in enumerate(workers)]
                exported = self._call(refs, self.learner_names, f"exporting bucket {k} of v{version}")
                sums |= exported[0][1]
                last = version if k == len(self.plan) - 1 else None
                refs = [a.receive_shared.remote(exported[rank][0], last) for a, rank in zip(self.pool.actors, self.owners)]
                reload_s += max(self._call(refs, list(self.pool.actor_names), f"loading bucket {k} of v{version}"))
                # Freed at once: on a shared GPU a second copy of the whole model would not fit beside vLLM.
                self._call([w.release_shared.remote() for w in workers], self.learner_names, "releasing a bucket")
        finally:
            self._call([w.release_shared.remote() for w in workers], self.learner_names, "releasing shared buffers")
        return sums, reload_s

    def _pair_by_gpu(self) -> list[int]:
        """For each rollout actor, the learner rank on its GPU (by UUID), checked when the run is built and
        whenever the pool changes: CUDA IPC handles open only on the GPU that exported them."""
        ranks = self._call([w.gpu_uuid.remote() for w in self.learners.workers], self.learner_names, "learner GPU UUIDs")
        actors = self._call([a.gpu_uuid.remote() for a in self.pool.actors], list(self.pool.actor_names), "actor GPU UUIDs")
        return pair_by_gpu(ranks, actors, list(self.pool.actor_names))

    def _name_dead(self, err: ActorCallError) -> ActorCallError:
        """After a failed join or broadcast: ping every rollout actor; the error to raise names the dead ones.

        The group is dropped (a peer failed mid-collective: it must be rebuilt before reuse). The pool
        is left as it is: replacing the dead and resending the weights to everyone is the pool's and
        the driver's (`rlhf_ray.driver.recovery.broadcast_replacing_dead`); survivors may hold a mix of
        old and new layers until that resend.
        """
        self.members = []
        dead = []
        for actor, name in zip(list(self.pool.actors), list(self.pool.actor_names)):
            try:
                ray.get(actor.ping.remote(), timeout=min(self.cfg.timeout_s, 30.0))
            except Exception:
                dead.append(name)
        if dead:
            log.error("weight broadcast failed (%s); dead rollout actors: %s", err, ", ".join(dead))
        return ActorCallError(str(err), err.failed, dead)

    def verify(self, sent: ParamSums) -> None:
        """Every actor reports the pool's version and the per-layer checksums of what the learner sent, or we raise.

        sent: the learner's `param_sums` for this version and `weight_sync.verify_columns`.
        """
        refs = [a.weight_report.remote(self.cfg.verify_columns) for a in self.pool.actors]
        reports = self._call(refs, list(self.pool.actor_names), "weight checksum report")
        for name, (version, sums, column_sampled) in zip(self.pool.actor_names, reports):
            if version != self.pool.version:
                raise RuntimeError(f"{name} reports policy version {version}, expected {self.pool.version}")
            compare_checksums(expected_layer_sums(sent, column_sampled), sums, who=name)

    def probe(self, version: int) -> tuple[float, float]:
        """Every actor's log-probs on a fixed probe batch must equal the learner's (`rlhf_ray.probe`), or we raise.

        Returns the worst actor's (mean, max) gap, nats/token and nats.
        """
        refs = [a.probe_logprobs.remote(2, self.cfg.probe_tokens, version) for a in self.pool.actors]
        results = self._call(refs, list(self.pool.actor_names), "log-prob probe")
        ids = results[0][0]
        learner_logp = self.learners.compute_logprobs(probe_batch(ids))
        tol = probe_tolerance(self.dtype, self.cfg.probe_tol)
        worst = (0.0, 0.0)
        for name, (actor_ids, actor_logp) in zip(self.pool.actor_names, results):
            if actor_ids != ids:
                raise RuntimeError(f"{name} probed other token ids than {self.pool.actor_names[0]}: vocabularies differ")
            mean, top = probe_gap(learner_logp, actor_logp)
            if mean > tol:
                raise RuntimeError(
                    f"{name} at policy version {version}: log-probs on the probe batch differ from the learner's by "
                    f"{mean:.4g} nats/token on average (max {top:.4g}), above weight_sync.probe_tol={tol:g}. vLLM "
                    "is not computing with the weights the learner sent (a module it derives and did not refresh?); "
                    "raise probe_tol only for a known precision gap"
                )
            worst = max(worst, (mean, top))
        return worst


def pair_by_gpu(learner_uuids: list[str], actor_uuids: list[str], actor_names: list[str]) -> list[int]:
    """Index of the learner rank whose GPU UUID equals each actor's; raises naming an actor without one."""
    rank_of = {uuid: i for i, uuid in reversed(list(enumerate(learner_uuids)))}  # the lowest rank per GPU
    missing = [f"{name} (GPU {uuid})" for name, uuid in zip(actor_names, actor_uuids) if uuid not in rank_of]
    if missing:
        raise RuntimeError(
            f"weight_sync.backend=cuda_ipc: no learner rank shares the GPU of {', '.join(missing)}; learner GPUs: "
            f"{', '.join(learner_uuids)}. Set rollout.colocate=true (each actor in its learner rank's bundle) or use "
            "weight_sync.backend=nccl"
        )
    return [rank_of[uuid] for uuid in actor_uuids]
