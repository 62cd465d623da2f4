"""The run's arithmetic, in one place: the batch sizes of an RL step and the Ray resources each actor asks for.

The plan (`rlhf_ray.driver.plan`), the driver, the step guard, the rollout pool and the learner group
all take their numbers from here, so what `rlhf-ray plan` shows is what the run does.

Assumptions, stated once:
- A rollout actor holds all GPUs of its tensor-parallel group (num_gpus_per_actor × tensor_parallel_size)
  on one node, its CPUs (num_cpus_per_actor) and `rollout.resources` once (in the first bundle of its group).
- On GPU learners, the reference actor takes one learner-sized slot (the CPUs, GPUs and custom resources
  of a learner rank), and a reward model on GPU takes the learner pool's custom resources in proportion
  to its GPUs: models with a fixed size live in the learner pool, so the rollout pool scales on its own.
  On CPU learners the reference asks for 0.5 CPU: it runs between other stages of the synchronous loop.
- Shared GPUs: the policy learner group's placement group has one bundle per rank. With rollout.colocate,
  bundle i also holds rollout actor i; with reference.colocate, bundle 0 also holds the reference
  (reference.num_cpus, reference.num_gpus); with reward.colocate, the last bundle also holds the reward
  actor (reward.num_cpus, reward.num_gpus). Ray gives every actor of a bundle the bundle's GPU, so these
  fractions are shares of one physical GPU; the bundle's custom resources are the learner rank's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf_ray.config import LearnerConfig, RolloutConfig, RunConfig

REFERENCE_CPUS_ON_CPU = 0.5
BUILTIN = ("CPU", "GPU")


# ---------------------------------------------------------------------------- batch arithmetic


def optimizer_steps(rows: int, minibatch_size: int, epochs: int) -> int:
    """Optimizer steps of one update: `epochs` passes over `rows`, one step per `minibatch_size` rows."""
    return epochs * (rows // minibatch_size)


def grad_accum_steps(minibatch_size: int, num_ranks: int, micro_batch_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step (at least 1)."""
    return max(1, minibatch_size // (num_ranks * micro_batch_size))


@dataclass(frozen=True)
class BatchMath:
    """The sizes of one RL step, all in sequences."""

    prompts_per_step: int  # B
    samples_per_step: int  # B × n
    minibatch_size: int  # per optimizer step, all ranks together
    micro_batch_per_rank: int  # per forward/backward on one rank
    grad_accum_steps: int  # micro-batches per rank per optimizer step
    minibatches_per_epoch: int
    optimizer_steps_per_rl_step: int  # ppo_epochs × samples / minibatch
    optimizer_steps_per_run: int  # train.steps × optimizer_steps_per_rl_step: what the lr schedule decays over


def batch_math(cfg: RunConfig) -> BatchMath:
    """The step sizes of `cfg` (divisibility is checked by RunConfig)."""
    le = cfg.learner
    samples = cfg.train.prompts_per_step * cfg.rollout.sampling.n
    per_step = optimizer_steps(samples, le.minibatch_size, le.ppo_epochs)
    return BatchMath(
        prompts_per_step=cfg.train.prompts_per_step,
        samples_per_step=samples,
        minibatch_size=le.minibatch_size,
        micro_batch_per_rank=le.micro_batch_size,
        grad_accum_steps=grad_accum_steps(le.minibatch_size, le.num_ranks, le.micro_batch_size),
        minibatches_per_epoch=samples // le.minibatch_size,
        optimizer_steps_per_rl_step=per_step,
        optimizer_steps_per_run=cfg.train.steps * per_step,
    )


# ---------------------------------------------------------------------------- Ray resource requests


@dataclass(frozen=True)
class ResourceRequest:
    """What one actor asks Ray for: `resources` maps Ray resource names (CPU, GPU, custom) to amounts."""

    name: str  # e.g. "rollout-0", "policy-learner-1", "critic-learner-0", "reward", "reference"
    kind: str  # "rollout", "learner", "reward" or "reference"
    resources: dict[str, float]
    bundle: int | None = None  # placed in this bundle of the policy learner group (sharing rank `bundle`'s GPU)

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments for `ActorClass.options(**request.ray_options())`."""
        return ray_options(self.resources)


def ray_options(resources: dict[str, float]) -> dict[str, Any]:
    """num_cpus, num_gpus and custom `resources` for `ActorClass.options(...)` from one request."""
    return {
        "num_cpus": resources.get("CPU", 0.0),
        "num_gpus": resources.get("GPU", 0.0),
        "resources": {k: v for k, v in resources.items() if k not in BUILTIN},
    }


def _request(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    out = {"CPU": float(cpus)}
    if gpus > 0:
        out["GPU"] = float(gpus)
    return out | {k: float(v) for k, v in custom.items() if v > 0}


def rollout_bundles(ro: RolloutConfig) -> list[dict[str, float]]:
    """A GPU rollout actor's placement-group bundles, one per tensor-parallel worker: the first also holds
    the actor's CPUs and custom resources. On CPU: one bundle, the actor's own request."""
    if ro.num_gpus_per_actor == 0:
        return [_request(ro.num_cpus_per_actor, 0, ro.resources)]
    first = _request(ro.num_cpus_per_actor, ro.num_gpus_per_actor, ro.resources)
    return [first] + [{"GPU": float(ro.num_gpus_per_actor)}] * (ro.tensor_parallel_size - 1)


def rollout_actor_request(ro: RolloutConfig) -> dict[str, float]:
    """Everything one rollout actor holds: the sum of its bundles."""
    total: dict[str, float] = {}
    for bundle in rollout_bundles(ro):
        for k, v in bundle.items():
            total[k] = total.get(k, 0.0) + v
    return total


def learner_rank_request(le: LearnerConfig) -> dict[str, float]:
    """One learner rank's bundle of the learner group's placement group."""
    return _request(le.num_cpus_per_rank, le.num_gpus_per_rank, le.resources)


def colocated_bundle(cfg: RunConfig) -> dict[str, float]:
    """rollout.colocate: one placement-group bundle holding a learner rank and its rollout actor (summed requests;
    colocation requires tensor_parallel_size 1, so the actor has one bundle)."""
    out = learner_rank_request(cfg.learner)
    for k, v in rollout_bundles(cfg.rollout)[0].items():
        out[k] = out.get(k, 0.0) + v
    return out


def reference_shared_request(cfg: RunConfig) -> dict[str, float]:
    """reference.colocate: what the reference adds to policy learner rank 0's bundle (no custom resources: the
    bundle holds the rank's)."""
    return _request(cfg.reference.num_cpus, cfg.reference.num_gpus, {})


def reward_request(cfg: RunConfig) -> dict[str, float]:
    """The reward actor's request: its CPUs and GPUs; a GPU reward model in its own slot also takes the learner
    pool's custom resources in proportion to its GPUs (colocated, the bundle holds them already)."""
    rw, le = cfg.reward, cfg.learner
    custom: dict[str, float] = {}
    if rw.num_gpus > 0 and le.num_gpus_per_rank > 0 and not rw.colocate:
        custom = {k: v * rw.num_gpus / le.num_gpus_per_rank for k, v in le.resources.items()}
    return _request(rw.num_cpus, rw.num_gpus, custom)


def shared_bundle_index(cfg: RunConfig) -> dict[str, int]:
    """The policy learner bundle each colocated helper goes into: {"reference": 0, "reward": last rank}."""
    out = {}
    if cfg.reference.colocate:
        out["reference"] = 0
    if cfg.reward.colocate:
        out["reward"] = cfg.learner.num_ranks - 1
    return out


def bundle_members(cfg: RunConfig) -> list[list[tuple[str, float]]]:
    """Per policy learner bundle, (actor name, GPU share) of everything placed in it, the rank first."""
    le = cfg.learner
    members = [[(f"policy-learner-{i}", le.num_gpus_per_rank)] for i in range(le.num_ranks)]
    if cfg.rollout.colocate:
        for i in range(min(le.num_ranks, cfg.rollout.num_actors)):
            members[i].append((f"rollout-{i}", cfg.rollout.num_gpus_per_actor))
    shares = {"reference": cfg.reference.num_gpus, "reward": cfg.reward.num_gpus}
    for name, index in shared_bundle_index(cfg).items():
        members[index].append((name, shares[name]))
    return members


def policy_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """The policy learner group's placement-group bundles: rank i's request plus what shares its GPU
    (rollout actor i with rollout.colocate, the reference in bundle 0, the reward in the last)."""
    base = colocated_bundle(cfg) if cfg.rollout.colocate else learner_rank_request(cfg.learner)
    bundles = [dict(base) for _ in range(cfg.learner.num_ranks)]
    extra = {"reference": reference_shared_request(cfg), "reward": reward_request(cfg)}
    for name, index in shared_bundle_index(cfg).items():
        for k, v in extra[name].items():
            bundles[index][k] = bundles[index].get(k, 0.0) + v
    return bundles


def shares_policy_placement(cfg: RunConfig) -> bool:
    """Whether anything shares the policy learners' bundles (the driver then creates their placement group)."""
    return cfg.rollout.colocate or cfg.reference.colocate or cfg.reward.colocate


def resource_requests(cfg: RunConfig) -> list[ResourceRequest]:
    """One request per actor of the run: rollout actors, policy (and PPO critic) learner ranks, the reward and
    the reference actor (none with reference.placement=learner); names as the run gives them."""
    ro, le = cfg.rollout, cfg.learner
    rollout, learner = rollout_actor_request(ro), learner_rank_request(le)
    reqs = [ResourceRequest(f"rollout-{i}", "rollout", dict(rollout), i if ro.colocate else None)
            for i in range(ro.num_actors)]
    roles = ("policy", "critic") if cfg.algorithm.uses_critic else ("policy",)
    reqs += [ResourceRequest(f"{role}-learner-{i}", "learner", dict(learner)) for role in roles for i in range(le.num_ranks)]

    shared = shared_bundle_index(cfg)
    reqs.append(ResourceRequest("reward", "reward", reward_request(cfg), shared.get("reward")))
    if cfg.reference.placement == "actor":  # else the policy learner ranks hold it: nothing of its own
        if cfg.reference.colocate:
            reference = reference_shared_request(cfg)
        else:
            reference = dict(learner) if le.num_gpus_per_rank > 0 else {"CPU": REFERENCE_CPUS_ON_CPU}
        reqs.append(ResourceRequest("reference", "reference", reference, shared.get("reference")))
    return reqs
