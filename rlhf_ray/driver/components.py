"""Building the actors of an RL run, and saving/restoring its complete state.

`build_components` places everything the driver loop calls: the rollout pool, the policy
(and critic) learner groups, the reference and reward actors, the weight broadcaster, the
tracker and the prompt sampler. `save_checkpoint`/`restore_checkpoint` keep a run resumable
with the same data order, RNG, KL controller, optimizer and step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from transformers import AutoTokenizer

from actors import RewardActor, ReferenceActor, RolloutPool
from learners import LearnerGroup
from rlhf_ray.algorithms import AdaptiveKLController, FixedKLController
from rlhf_ray.driver.broadcaster import WeightBroadcaster
from rlhf_ray.checkpoint import CheckpointWriter, capture_rng, latest_complete, load_state, restore_rng, save_state
from rlhf_ray.config import RunConfig, save_resolved
from rlhf_ray.data import PromptSampler, load_dataset
from rlhf_ray.driver.plan import weight_sync_backend
from rlhf_ray.hardware import compute_runtime_env
from rlhf_ray.driver.preflight import check_cluster, preflight
from rlhf_ray.ray_utils import get_with_timeout, init_ray
from rlhf_ray.rewards import RewardNormalizer
from rlhf_ray.driver.step_guard import StepGuard
from rlhf_ray.sizing import (
    ResourceRequest, batch_math, policy_bundles, resource_requests, shares_policy_placement,
)
from rlhf_ray.driver.storage import check_shared_run_folder
from rlhf_ray.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class RunComponents:
    cfg: RunConfig
    run_dir: Path
    tokenizer: Any
    prompts: PromptSampler  # the RL prompt dataset, drawn in resumable batches
    pool: RolloutPool
    policy: LearnerGroup
    critic: LearnerGroup | None
    reference: Any  # `RemoteCall` of the ReferenceActor, or `LearnerHeldReference` (reference.placement=learner)
    reward: Any
    broadcaster: WeightBroadcaster
    tracker: Tracker
    checkpoints: CheckpointWriter
    reward_normalizer: RewardNormalizer
    closers: list = field(default_factory=list)
    failed_scale_request: float | None = None  # `requested_at` of a scale request that could not be met

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception as err:  # keep closing the rest; the run's own error matters more
                log.warning("while shutting down: %s", err)


class RemoteCall:
    """Calls methods of one Ray actor synchronously, with the timeout naming the actor."""

    def __init__(self, handle: Any, name: str, timeout_s: float):
        self.handle, self.name, self.timeout_s = handle, name, timeout_s

    def __getattr__(self, method: str):
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.start(method, *args, **kwargs)()

        return call

    def start(self, method: str, *args: Any, **kwargs: Any) -> Callable[[], Any]:
        """Submit the call now; the returned function waits for its answer (the same timeout and errors)."""
        ref = getattr(self.handle, method).remote(*args, **kwargs)
        return lambda: get_with_timeout([ref], [self.name], f"{self.name}.{method}", self.timeout_s)[0]


class LearnerHeldReference:
    """The reference held by the policy learner ranks (reference.placement=learner), called like the ReferenceActor."""

    def __init__(self, policy: LearnerGroup):
        self.policy = policy

    def start(self, method: str, batch: Any, temperature: float = 1.0) -> Callable[[], Any]:
        if method != "compute_logprobs":
            raise AttributeError(f"the learner-held reference has no method {method!r}")
        return self.policy.start_ref_logprobs(batch, temperature)

    def ping(self) -> bool:
        return True


def policy_placement(cfg: RunConfig) -> PlacementGroup | None:
    """The policy learner group's placement group when something shares its GPUs (rollout.colocate,
    reference.colocate, reward.colocate): one bundle per rank, `sizing.policy_bundles`; None otherwise (the
    group then makes its own). The caller removes it."""
    if not shares_policy_placement(cfg):
        return None
    bundles = policy_bundles(cfg)
    pg = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=cfg.rollout.call_timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(f"the policy learners' {len(bundles)} bundles {bundles} (with what shares their GPUs) "
                           f"could not be placed within {cfg.rollout.call_timeout_s:.0f}s")
    return pg


def helper_options(request: ResourceRequest, shared: PlacementGroup | None) -> dict[str, Any]:
    """Ray options of the reference or reward actor: its request, in its policy learner bundle when colocated."""
    options = request.ray_options()
    if request.bundle is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(shared, request.bundle)
    return options


def build_components(cfg: RunConfig, run_dir: Path) -> RunComponents:
    """Start Ray and every actor of an RL run; writes the resolved config into `run_dir`."""
    preflight(cfg, run_dir)
    save_resolved(cfg, run_dir / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy_path, trust_remote_code=cfg.model.trust_remote_code)
    max_prompt = cfg.model.max_model_len - cfg.rollout.sampling.max_new_tokens
    dataset = load_dataset(cfg.data.prompts, "prompt", tokenizer, max_prompt, cfg.train.prompts_per_step, cfg.data.seed)
    prompts = PromptSampler(dataset, cfg.train.prompts_per_step, cfg.data.seed, cfg.data.shuffle)

    init_ray(cfg.cluster)
    check_cluster(cfg, ray.cluster_resources(), ray.nodes())
    closers: list = []
    try:
        shared = policy_placement(cfg)  # one bundle per policy rank, with what shares its GPU
        if shared is not None:
            closers.append(lambda: remove_placement_group(shared))
        pool = RolloutPool(cfg.model, cfg.rollout, colocate_in=shared if cfg.rollout.colocate else None)
        closers.append(pool.shutdown)
        total_updates = batch_math(cfg).optimizer_steps_per_run
        in_learner = cfg.reference.placement == "learner"
        policy = LearnerGroup(
            "policy", cfg.model.policy_path, cfg.learner, cfg.model, cfg.algorithm, total_updates, shared, in_learner
        )
        closers.append(policy.shutdown)
        critic = None
        if cfg.algorithm.uses_critic:
            critic_start = cfg.model.reward_path or cfg.model.policy_path
            critic_cfg = cfg.learner.model_copy(update={"lr": cfg.learner.critic_lr})
            critic = LearnerGroup("critic", critic_start, critic_cfg, cfg.model, cfg.algorithm, total_updates)
            closers.append(critic.shutdown)
        check_shared_run_folder(run_dir, [policy] + ([critic] if critic else []))
        timeout = cfg.rollout.call_timeout_s
        requests = {r.name: helper_options(r, shared) for r in resource_requests(cfg)}  # what `rlhf-ray plan` shows
        if in_learner:
            reference: Any = LearnerHeldReference(policy)
        else:
            reference_handle = start_reference(cfg, requests["reference"])
            closers.append(lambda: ray.kill(reference_handle))
            reference = RemoteCall(reference_handle, "reference", timeout)
        reward_handle = start_reward(cfg, requests["reward"])
        closers.append(lambda: ray.kill(reward_handle))
        reward = RemoteCall(reward_handle, "reward", cfg.reward.timeout_s * 10)
        reference.ping()
        reward.ping()
        wait_s = cfg.rollout.call_timeout_s if cfg.train.async_mode else 0.0  # sends may start mid-generation
        broadcaster = WeightBroadcaster(policy, pool, cfg.weight_sync, weight_sync_backend(cfg), wait_s)
        pool.current_weights = policy.export_weights  # what actors joining later load before they serve
        helpers = {"reward": reward_handle} | ({} if in_learner else {"reference": reference_handle})
        write_placement(run_dir / "placement.json", pool, [policy] + ([critic] if critic else []), helpers)
        tracker = Tracker(cfg.tracking, run_dir, cfg.train.run_name or run_dir.name, cfg.model_dump(mode="json"))
        closers.append(tracker.finish)
    except BaseException:
        for close in reversed(closers):
            close()
        raise
    return RunComponents(
        cfg, run_dir, tokenizer, prompts, pool, policy, critic, reference, reward, broadcaster, tracker,
        CheckpointWriter.for_run(run_dir, cfg.checkpoint), RewardNormalizer(cfg.reward.normalize), closers,
    )


def start_reference(cfg: RunConfig, ray_options: dict[str, Any]) -> Any:
    """The ReferenceActor's Ray handle, started like a learner rank: nice 0, dense-compute OpenMP policy.

    On CPU the reference runs between the learners' stages, so it may use as many threads as it has CPUs.
    """
    return ray.remote(ReferenceActor).options(**ray_options, runtime_env=compute_runtime_env()).remote(
        cfg.model.policy_path, cfg.model, cfg.learner.micro_batch_size, max(1, int(ray_options["num_cpus"]))
    )


def start_reward(cfg: RunConfig, ray_options: dict[str, Any]) -> Any:
    """The RewardActor's Ray handle; its vLLM engine (if any) runs in the actor's own process."""
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "0"}}
    return ray.remote(RewardActor).options(**ray_options, runtime_env=env).remote(cfg.model, cfg.reward)


def node_of_actor(_actor: Any) -> dict[str, str]:
    """Run inside any actor (`handle.__ray_call__`): the Ray node it runs on, {"node_id", "node_ip"}."""
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def write_placement(
    path: Path, pool: RolloutPool, groups: list[LearnerGroup], helpers: dict[str, Any] | None = None
) -> None:
    """Record the Ray node (id, address and custom resources) each rollout actor, learner rank and helper
    actor (name -> Ray handle: the reward actor, a reference actor) started on."""
    nodes = {n["NodeID"]: n for n in ray.nodes()}

    def entry(node_id: str, node_ip: str) -> dict[str, Any]:
        node = nodes.get(node_id, {})
        custom = {k: v for k, v in node.get("Resources", {}).items()
                  if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")}
        # The node's Ray address; the host's own address (what a worker sees) can differ from it.
        return {"node_id": node_id, "node_ip": node.get("NodeManagerAddress", node_ip), "node_resources": custom}

    placement = {m.name: entry(m.node_id, m.node_ip) for m in pool.members}
    for group in groups:
        placement |= {name: entry(w["node_id"], w["node_ip"]) for name, w in group.where().items()}
    names = list(helpers or {})
    calls = [helpers[n].__ray_call__.remote(node_of_actor) for n in names]
    found = get_with_timeout(calls, names, "where", 60.0) if names else []
    placement |= {name: entry(w["node_id"], w["node_ip"]) for name, w in zip(names, found)}
    path.write_text(json.dumps(placement, indent=2))
    log.info("placement: %s", ", ".join(f"{k} on {v['node_ip']}" for k, v in placement.items()))


def save_checkpoint(
    c: RunComponents, step: int, kl_ctl: FixedKLController | AdaptiveKLController, guard: StepGuard,
    pending_batches: int = 0,
) -> None:
    """Atomically write the run's state after `step` completed RL steps.

    pending_batches: prompt batches drawn ahead (async mode) that no update has used yet;
    the saved sampler position excludes them, so a resumed run draws them again.
    """
    c.tracker.commit()  # W&B's file then holds every step this checkpoint covers, as metrics.jsonl does
    sampler = c.prompts.state_dict()
    if pending_batches:
        sampler = rewind_sampler(c.prompts, pending_batches)
    with c.checkpoints.begin(step) as tmp:
        c.policy.save(str(tmp / "policy"))
        if c.critic is not None:
            c.critic.save(str(tmp / "critic"))
        tensors, rng_meta = capture_rng()
        meta = {
            "step": step,
            "policy_version": c.pool.version,
            "pool_step": c.pool.step - pending_batches,
            "sampler": sampler,
            "kl_controller": kl_ctl.state_dict(),
            "reward_normalizer": c.reward_normalizer.state_dict(),
            "step_guard": guard.state_dict(),
            "rng": rng_meta,
        }
        save_state(tmp / "driver", tensors, meta)


def rewind_sampler(sampler: PromptSampler, batches: int) -> dict[str, int]:
    """The sampler state from `batches` draws ago (the sampler itself is left as it is)."""
    state = sampler.state_dict()
    per_epoch = len(sampler.dataset) // sampler.batch_size
    drawn = state["epoch"] * per_epoch + state["position"] // sampler.batch_size - batches
    return dict(state, epoch=drawn // per_epoch, position=(drawn % per_epoch) * sampler.batch_size)


def restore_checkpoint(c: RunComponents, kl_ctl: FixedKLController | AdaptiveKLController, guard: StepGuard) -> int:
    """Load the newest complete checkpoint of the run (if any); returns the step to continue from."""
    path = latest_complete(c.checkpoints.root)
    if path is None:
        log.warning("--resume: no complete checkpoint under %s; starting at step 0", c.checkpoints.root)
        c.tracker.rewind(0)
        return 0
    tensors, meta = load_state(path / "driver")
    c.policy.load(str(path / "policy"))
    if c.critic is not None:
        c.critic.load(str(path / "critic"))
    c.prompts.load_state_dict(meta["sampler"])
    kl_ctl.load_state_dict(meta["kl_controller"])
    c.reward_normalizer.load_state_dict(meta["reward_normalizer"])
    guard.load_state_dict(meta.get("step_guard", {"consecutive": 0, "applied": True}))  # absent before 2026-11-29
    restore_rng(tensors, meta["rng"])
    c.pool.step = int(meta["pool_step"])
    c.broadcaster.broadcast(version=int(meta["policy_version"]))
    dropped = c.tracker.rewind(int(meta["step"]))  # steps logged after this checkpoint are run again
    log.info("resumed from %s (step %d, policy version %d; %d later metric lines dropped)", path, meta["step"],
             meta["policy_version"], dropped)
    print(json.dumps({"resumed_from": str(path), "step": meta["step"]}), flush=True)
    return int(meta["step"])
