"""The run plan: where every actor goes, how weights travel, where the KL goes, and the batch arithmetic.

`resource_requests(cfg)` (from `rlhf_ray.sizing`) turns a config into Ray resource requests, one per
actor; the driver, the rollout pool and the learner group place their actors with the same requests, so the
plan and the run cannot diverge.
`make_plan` checks those requests against a cluster's resources and raises `PlanError` naming the
missing resource, how much is needed, how much the cluster has, and the fix. `plan_main` prints the
plan for a live cluster (or a local head on 127.0.0.1) before anything heavy starts.

The arithmetic itself (batch sizes, Ray resource requests and their assumptions) is in `rlhf_ray.sizing`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from rlhf_ray.config import RunConfig
from rlhf_ray.sizing import (
    BUILTIN, BatchMath, ResourceRequest, batch_math, bundle_members, policy_bundles, resource_requests,
    shares_policy_placement,
)
from rlhf_ray.hardware import COMPUTE_PROCESS_ENV, auto_dtype

# The config fields that set each kind's count and per-actor amounts, named in every error's fix.
COUNT_FIELD = {"rollout": "rollout.num_actors", "learner": "learner.num_ranks"}
AMOUNT_FIELD = {
    "rollout": {
        "CPU": "rollout.num_cpus_per_actor",
        "GPU": "rollout.num_gpus_per_actor × rollout.tensor_parallel_size",
        "custom": "rollout.resources",
    },
    "learner": {"CPU": "learner.num_cpus_per_rank", "GPU": "learner.num_gpus_per_rank", "custom": "learner.resources"},
    "reward": {"CPU": "reward.num_cpus", "GPU": "reward.num_gpus", "custom": "reward.num_gpus"},
}


class PlanError(ValueError):
    """The cluster cannot hold the run; the message names the resource, the need, the supply and the fix."""


def weight_sync_backend(cfg: RunConfig) -> str:
    """The weight-sync transport: the configured one, or for "auto" CUDA IPC when each rollout actor shares its
    learner rank's GPU (`rollout.colocate`: NCCL refuses two ranks on one GPU), NCCL between GPUs, gloo on CPU."""
    if cfg.weight_sync.backend != "auto":
        return cfg.weight_sync.backend
    if cfg.rollout.colocate:
        return "cuda_ipc"
    return "nccl" if cfg.learner.num_gpus_per_rank > 0 else "gloo"


@dataclass
class Plan:
    """Everything `rlhf-ray plan` prints; `render()` is the text."""

    cfg: RunConfig
    requests: list[ResourceRequest]
    needed: dict[str, float]  # totals over all requests
    cluster: dict[str, float]
    num_nodes: int  # alive nodes seen; 0 when nodes were not given
    hosts: dict[str, list[str]]  # request name -> alive nodes that could hold it alone ([] when nodes unknown)
    transport: str
    batch: BatchMath
    warnings: list[str] = field(default_factory=list)

    def render(self) -> str:
        cfg, b = self.cfg, self.batch
        on = f" on {self.num_nodes} alive node(s)" if self.num_nodes else ""
        lines = [f"rlhf-ray plan: {cfg.algorithm.name}, {len(self.requests)} actors{on}", ""]
        lines.append("placement (the Ray request of each actor)")
        for names, req in _groups(self.requests):
            label = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)}×)"
            lines.append(f"  {label:<28} {_fmt_res(req.resources):<34} -> {self._where(req)}")
        lines.append(f"  {'total':<28} {_fmt_res(self.needed)}")
        lines.append(f"  {'cluster has':<28} {_fmt_res({k: self.cluster.get(k, 0.0) for k in self.needed})}")
        if shares_policy_placement(cfg):
            lines += ["", "shared GPUs (the policy learners' placement group: one bundle per rank, one GPU each)"]
            lines += ["  " + line for line in describe_bundles(cfg)]
        lines += ["", "weight sync", "  " + _describe_transport(cfg, self.transport)]
        lines += ["", "KL penalty", "  " + _describe_kl(cfg)]
        lines += [
            "",
            "batch per RL step",
            f"  prompts B = {b.prompts_per_step}; samples B×n = {b.prompts_per_step}×{cfg.rollout.sampling.n}"
            f" = {b.samples_per_step} (about {math.ceil(b.prompts_per_step / cfg.rollout.num_actors)} prompts"
            " per rollout actor)",
            f"  minibatch {b.minibatch_size} = {cfg.learner.num_ranks} rank(s) × micro-batch {b.micro_batch_per_rank}"
            f" × {b.grad_accum_steps} gradient-accumulation steps",
            f"  optimizer steps per RL step = ppo_epochs × samples/minibatch = {cfg.learner.ppo_epochs}"
            f" × {b.samples_per_step}/{b.minibatch_size} = {b.optimizer_steps_per_rl_step}",
            "  old log-probs: " + ("the update's own (one on-policy optimizer step; no separate learner forward)"
                                   if cfg.skips_old_logprobs else "a learner forward before the update"),
        ]
        lines += ["", "learner compute", *("  " + line for line in _describe_compute(cfg))]
        if self.warnings:
            lines += ["", "warnings"] + [f"  ! {w}" for w in self.warnings]
        return "\n".join(lines)

    def _where(self, req: ResourceRequest) -> str:
        if req.bundle is not None:
            rank = "policy-learner-i's bundle (same i)" if req.kind == "rollout" else f"policy-learner-{req.bundle}'s bundle"
            return f"in {rank}, sharing its GPU"
        custom = [k for k in req.resources if k not in BUILTIN]
        pool = f"nodes offering {', '.join(custom)}" if custom else "any node with the CPU/GPU free"
        hosts = self.hosts.get(req.name)
        if not hosts:
            return pool
        shown = ", ".join(hosts[:4]) + (f", +{len(hosts) - 4}" if len(hosts) > 4 else "")
        return f"{pool} ({shown})"


def _groups(requests: list[ResourceRequest]) -> list[tuple[list[str], ResourceRequest]]:
    """Consecutive requests of the same kind and size, as (names, first request)."""
    groups: list[tuple[list[str], ResourceRequest]] = []
    for r in requests:
        if groups and groups[-1][1].kind == r.kind and groups[-1][1].resources == r.resources:
            groups[-1][0].append(r.name)
        else:
            groups.append(([r.name], r))
    return groups


def describe_bundles(cfg: RunConfig) -> list[str]:
    """One line per run of equal policy learner bundles: its Ray request and the GPU shares of what it holds."""
    lines: list[tuple[list[int], str]] = []
    for i, (bundle, members) in enumerate(zip(policy_bundles(cfg), bundle_members(cfg))):
        kinds = " + ".join(f"{name.rsplit('-', 1)[0] if name[-1].isdigit() else name} {share:g}" for name, share in members)
        text = f"{_fmt_res(bundle)}: {kinds} of one GPU"
        if lines and lines[-1][1] == text:
            lines[-1][0].append(i)
        else:
            lines.append(([i], text))
    return [f"{'bundle ' + (str(r[0]) if len(r) == 1 else f'{r[0]}-{r[-1]}'):<14} {text}" for r, text in lines]


def _fmt_res(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def _describe_transport(cfg: RunConfig, backend: str) -> str:
    ws, ro = cfg.weight_sync, cfg.rollout
    why = {
        "gloo": "CPU tensors over TCP",
        "nccl": "GPU to GPU",
        "cuda_ipc": "GPU memory handles; learner rank 0 and the rollout actors share a node",
    }[backend]
    chosen = f"auto -> {backend}" if ws.backend == "auto" else backend
    if ro.colocate:
        le = cfg.learner
        return (
            f"{chosen} (colocated: rollout actor i shares learner rank i's GPU, one bundle each): per GPU learner "
            f"{le.num_gpus_per_rank:g} + rollout {ro.num_gpus_per_actor:g} of a GPU, vLLM holding up to "
            f"{ro.gpu_memory_utilization:g} of its memory while awake"
            + (", asleep (weights offloaded, KV cache freed) while the learners train" if ro.enable_sleep_mode else "")
            + f"; {ws.bucket_mb:g} MiB buckets, each freed once loaded"
        )
    receivers = ro.num_actors * ro.tensor_parallel_size
    return (
        f"{chosen} ({why}): learner-0 -> {receivers} vLLM workers, group of {1 + receivers} ranks, "
        f"rendezvous on {_rendezvous_address(ws)}, {ws.bucket_mb:g} MiB buckets, timeout {ws.timeout_s:g}s"
        + (", checksums verified" if ws.verify else "")
    )


def _describe_compute(cfg: RunConfig) -> list[str]:
    """ZeRO stage, precision and process settings of the learners, each with why."""
    le = cfg.learner
    bf16 = cfg.model.dtype == "bfloat16"
    stage = le.zero_stage_used(bf16)
    auto_why = ("one rank, nothing to partition" if stage == 0 else f"{le.num_ranks} ranks" if le.num_ranks > 1
                else "bf16 on one rank: stage 0 not yet timed against ZeRO-2")
    why = f"auto: {auto_why}" if le.zero_stage == "auto" else "learner.zero_stage"
    dtype, reason = auto_dtype()
    dtype_note = f"what model.dtype=auto picks here too ({reason})" if dtype == cfg.model.dtype else (
        f"model.dtype=auto would pick {dtype} here: {reason}")
    master = "; fp32 master weights and optimizer state" if cfg.model.dtype == "bfloat16" else ""
    env = " ".join(f"{k}={v}" for k, v in COMPUTE_PROCESS_ENV.items())
    if cfg.reference.placement == "learner":
        held = f"sharded over the {le.num_ranks} ranks like the policy" if stage == 3 else "a whole copy on each rank"
        reference = (f"reference held by the policy learner ranks ({held}), each computing its own rows' log-probs; "
                     "no reference actor (reference.placement=learner)")
    else:
        reference = "reference in a ReferenceActor of its own, sent each batch (reference.placement=actor)"
    return [
        f"ZeRO stage {stage} ({why})",
        f"dtype {cfg.model.dtype} for learners, reference and vLLM{master}; {dtype_note}",
        reference,
        f"learner ranks and reference start with {env}; rollout actors keep Ray's nice 15 and their core pinning",
    ]


def _rendezvous_address(ws) -> str:
    if ws.master_addr:
        return ws.master_addr
    if ws.interface:
        return f"{ws.interface}'s address on learner rank 0's node"
    return "learner rank 0's node address"


def _describe_kl(cfg: RunConfig) -> str:
    kl = cfg.algorithm.kl
    where = {
        "reward": "in the reward: a per-token penalty -β·KL added before advantages",
        "loss": "in the loss: β·KL added to the policy loss",
    }[kl.placement]
    if kl.adaptive:
        beta = f"β adaptive from {kl.coef:g} toward {kl.target:g} nats/sequence over a horizon of {kl.horizon}"
    else:
        beta = f"β = {kl.coef:g} fixed"
        if kl.coef == 0:
            beta += " (KL off; the reference still runs for the kl/ metrics)"
    return f"{where}; estimator {kl.estimator}; {beta}"


def _knobs(kinds: list[str], resources: list[str], per_actor: bool = False) -> str:
    """The config fields that lower `resources` for these kinds of actor (only per-actor amounts if `per_actor`)."""
    fields = []
    for kind in kinds:
        if kind == "reference":  # a learner rank's request, or with reference.colocate a share of its own
            fields += [{"CPU": "reference.num_cpus", "GPU": "reference.num_gpus"}.get(k, "") for k in resources]
            kind = "learner"
        if not per_actor:
            fields.append(COUNT_FIELD.get(kind, ""))
        fields += [AMOUNT_FIELD[kind][k if k in BUILTIN else "custom"] for k in resources]
    return ", ".join(dict.fromkeys(f for f in fields if f))


def _shortage(resource: str, need: float, have: float, by_kind: dict[str, list[float]]) -> str:
    parts = ", ".join(
        f"{kind} {len(amounts)}×{amounts[0]:g}" if len(amounts) > 1 else f"{kind} {amounts[0]:g}"
        for kind, amounts in by_kind.items()
    )
    knobs = _knobs(list(by_kind), [resource])
    if resource in BUILTIN:
        fix = f"add nodes with more {resource}s, or lower {knobs}"
        if resource == "CPU":
            fix += " (a local head offers cluster.num_cpus logical CPUs, by default one per core)"
    else:
        fix = (
            f"start nodes that offer it (`ray start --resources='{{\"{resource}\": N}}'`, or the node pools in "
            f"cluster/), or lower {knobs}"
        )
    missing = " (no node offers it)" if have == 0 else ""
    return f"{resource}: need {need:g} ({parts}), the cluster has {have:g}{missing}; fix: {fix}"


def make_plan(cfg: RunConfig, cluster_resources: dict[str, float], nodes: list[dict] | None = None) -> Plan:
    """Check the run's requests against `cluster_resources` (totals, as `ray.cluster_resources()`) and
    `nodes` (as `ray.nodes()`, optional: then every actor must also fit on one alive node).

    Raises PlanError listing every shortfall; returns the Plan otherwise.
    """
    reqs = resource_requests(cfg)
    by_kind: dict[str, dict[str, list[float]]] = {}  # resource -> kind -> one amount per actor
    for r in reqs:
        for k, v in r.resources.items():
            by_kind.setdefault(k, {}).setdefault(r.kind, []).append(v)
    needed = {k: sum(sum(a) for a in kinds.values()) for k, kinds in by_kind.items()}
    short = [k for k, need in needed.items() if need > cluster_resources.get(k, 0.0) + 1e-9]
    errors = [_shortage(k, needed[k], cluster_resources.get(k, 0.0), by_kind[k]) for k in short]

    # Totals can suffice while no single node holds one actor (e.g. tensor parallelism across nodes).
    alive = [n for n in nodes or [] if n.get("Alive", False)]
    hosts: dict[str, list[str]] = {}
    for names, r in _groups(reqs):
        fitting = [n["NodeManagerAddress"] for n in alive if _fits(r.resources, n["Resources"])]
        hosts |= {name: fitting for name in names}
        if alive and not fitting and not set(r.resources) & set(short):
            offers = "; ".join(_fmt_res(_relevant(n["Resources"], r.resources)) for n in alive)
            lacking = [k for k, v in r.resources.items() if not any(n["Resources"].get(k, 0.0) >= v for n in alive)]
            errors.append(
                f"{r.name} needs {_fmt_res(r.resources)} on one node, but no alive node offers that much "
                f"(nodes: {offers}); fix: use bigger nodes, or lower "
                f"{_knobs([r.kind], lacking or list(r.resources), per_actor=True)}"
            )
    if shares_policy_placement(cfg):  # a bundle is placed whole, on one node: the rank with what shares its GPU
        bundles = policy_bundles(cfg)
        for r in reqs:
            if r.bundle is not None:
                hosts[r.name] = hosts.get(f"policy-learner-{r.bundle}", [])
        for i, bundle in enumerate(bundles):
            if alive and not any(_fits(bundle, n["Resources"]) for n in alive):
                errors.append(
                    f"policy learner bundle {i} needs {_fmt_res(bundle)} on one node (rank {i} and what shares its "
                    "GPU), but no alive node offers that much; fix: use bigger nodes, or set rollout.colocate, "
                    "reference.colocate or reward.colocate to false"
                )

    transport = weight_sync_backend(cfg)
    if transport in ("nccl", "cuda_ipc") and cfg.rollout.num_gpus_per_actor == 0:
        errors.append(
            f"weight_sync: {transport} needs GPUs on both ends, but rollout.num_gpus_per_actor=0; "
            "fix: set weight_sync.backend=gloo or give rollout actors GPUs"
        )
    if errors:
        raise PlanError("the cluster cannot hold this run:\n  - " + "\n  - ".join(errors))

    warnings = []
    if len(alive) > 1 and cfg.weight_sync.master_addr in ("127.0.0.1", "localhost", "::1"):
        warnings.append(
            f"weight_sync.master_addr={cfg.weight_sync.master_addr} is loopback but the cluster has {len(alive)} "
            "nodes: rollout actors on other nodes cannot reach it; leave it empty (learner rank 0's node address) "
            "or name learner rank 0's address on the network the rollout nodes share"
        )
    return Plan(cfg, reqs, needed, dict(cluster_resources), len(alive), hosts, transport, batch_math(cfg), warnings)


def _fits(request: dict[str, float], offer: dict[str, float]) -> bool:
    return all(offer.get(k, 0.0) + 1e-9 >= v for k, v in request.items())


def _relevant(offer: dict[str, float], request: dict[str, float]) -> dict[str, float]:
    return {k: offer.get(k, 0.0) for k in request}


def plan_main(cfg: RunConfig, address: str | None = None) -> int:
    """Connect to Ray (`address`, else `cfg.cluster.address`, else a local head on `cfg.cluster.host`),
    print the plan and return 0, or print the PlanError and return 1. Starts no actor.
    """
    import ray

    from rlhf_ray.ray_utils import init_ray

    cluster = cfg.cluster.model_copy(update={"address": address}) if address else cfg.cluster
    started_here = not ray.is_initialized()
    try:
        init_ray(cluster)
    except ConnectionError as err:
        print(f"rlhf-ray plan: cannot reach Ray at {cluster.address or 'a local head'}: {err}", file=sys.stderr)
        return 1
    try:
        plan = make_plan(cfg, ray.cluster_resources(), ray.nodes())
    except PlanError as err:
        print(f"rlhf-ray plan: {err}", file=sys.stderr)
        return 1
    finally:
        if started_here:
            ray.shutdown()
    print(plan.render())
    return 0
