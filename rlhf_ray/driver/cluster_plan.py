"""`rlhf-ray plan CONFIG --cluster SPEC`: the plan for a cluster described in a file, no Ray needed.

SPEC is a small YAML of node pools (the shape of cluster/'s pools) and, optionally, the throughput
assumptions of the step-time estimate:

    pools:
      learner: {count: 1, cpus: 48, gpus: 4, gpu_memory_gib: 48, gpu_tflops: 362, resources: {learner: 4}}
      rollout: {count: 4, cpus: 8, gpus: 1, gpu_memory_gib: 48, gpu_tflops: 362, resources: {rollout: 1}}
    assumptions: {train_mfu: 0.3, generate_mfu: 0.1}     # see sizing.Assumptions

gpu_tflops is the GPU's dense bf16 peak in TFLOP/s. The placement is `plan.make_plan` on the pools' nodes;
the memory per device and the step time come from `sizing`.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf_ray.config import ConfigError, RunConfig
from rlhf_ray.driver.plan import Plan, PlanError, make_plan
from rlhf_ray.driver.memory_estimate import (
    GIB,
    Assumptions,
    ModelShape,
    inference_bytes,
    learner_bytes,
    load_shape,
    reward_model_bytes,
    rollout_memory,
    shared_gpu_bytes,
    step_seconds,
)
from rlhf_ray.sizing import bundle_members, shares_policy_placement


class NodePool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(..., ge=1, description="Nodes in the pool.")
    cpus: float = Field(..., gt=0)
    gpus: int = Field(0, ge=0)
    gpu_memory_gib: float = Field(0.0, ge=0, description="Memory of one GPU (GiB).")
    gpu_tflops: float = Field(0.0, ge=0, description="Dense bf16 peak of one GPU (TFLOP/s).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per node.")


class ClusterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pools: dict[str, NodePool]
    assumptions: dict[str, float] = Field(default_factory=dict)


def load_cluster_spec(path: str) -> tuple[ClusterSpec, Assumptions]:
    """The spec in `path` and its assumptions over the defaults; errors name the field and the fix."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--cluster {path}: no such file (fix: write a YAML of node pools; see cluster/pools.yaml)")
    try:
        spec = ClusterSpec.model_validate(yaml.safe_load(p.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as err:
        raise ConfigError(f"--cluster {path}: {err} (fix: see cluster/pools.yaml for the fields)") from None
    known = {f.name for f in fields(Assumptions)}
    unknown = sorted(set(spec.assumptions) - known)
    if unknown:
        raise ConfigError(f"--cluster {path}: unknown assumptions {unknown} (fix: use {sorted(known)})")
    for name, pool in spec.pools.items():
        if pool.gpus and not (pool.gpu_memory_gib and pool.gpu_tflops):
            raise ConfigError(f"--cluster {path}: pools.{name} has gpus={pool.gpus} but gpu_memory_gib="
                              f"{pool.gpu_memory_gib:g}, gpu_tflops={pool.gpu_tflops:g} (fix: give both, e.g. "
                              "80 and 989 for an H100 SXM)")
    return spec, Assumptions(**{k: type(getattr(Assumptions, k))(v) for k, v in spec.assumptions.items()})


def spec_nodes(spec: ClusterSpec) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(cluster totals, one `ray.nodes()`-like entry per node, named `<pool>-<i>`)."""
    nodes, totals = [], {}
    for name, pool in spec.pools.items():
        res = {"CPU": pool.cpus, **({"GPU": float(pool.gpus)} if pool.gpus else {}), **pool.resources}
        for i in range(pool.count):
            nodes.append({"Alive": True, "NodeManagerAddress": f"{name}-{i}", "Resources": res})
            for k, v in res.items():
                totals[k] = totals.get(k, 0.0) + v
    return totals, nodes


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _device_line(label: str, pool: str, gpu_gib: float, parts: dict[str, float]) -> tuple[str, bool]:
    total = sum(parts.values())
    fits = total <= gpu_gib * GIB
    shown = " + ".join(f"{k} {_gib(v)}" for k, v in parts.items())
    return (f"  {label:<26} on {pool} ({gpu_gib:g} GiB): {shown} = {_gib(total)} GiB -> "
            f"{'fits' if fits else 'DOES NOT FIT'}"), fits


def sizing_lines(plan: Plan, spec: ClusterSpec, shape: ModelShape, assume: Assumptions) -> tuple[list[str], bool]:
    """Memory per device kind (GiB) and the step-time estimate; False when a device does not fit."""
    cfg = plan.cfg
    pool_of = {r.name: (plan.hosts.get(r.name) or ["?-0"])[0].rsplit("-", 1)[0] for r in plan.requests}
    lines = [f"memory per GPU (GiB; model {shape.parameters / 1e9:.2f}B parameters, {cfg.model.dtype}, "
             f"ZeRO-{cfg.learner.zero_stage}, gradient checkpointing {'on' if cfg.learner.gradient_checkpointing else 'off'}, "
             f"sequence {cfg.model.max_model_len}, micro-batch {cfg.learner.micro_batch_size})"]
    ok, seen = True, set()
    for r in plan.requests:
        gpus = r.resources.get("GPU", 0.0)
        if gpus == 0 or r.kind in seen or (r.bundle is not None and r.kind != "rollout"):
            continue  # what shares a learner's GPU is counted on that GPU's line below
        seen.add(r.kind)
        pool = spec.pools[pool_of[r.name]]
        if r.kind == "rollout":
            m = rollout_memory(shape, cfg, pool.gpu_memory_gib, assume)
            fits = m.fits and m.kv_tokens >= cfg.model.max_model_len
            lines.append(
                f"  {'rollout (vLLM, per TP rank)':<26} on {pool_of[r.name]} ({pool.gpu_memory_gib:g} GiB): "
                f"budget {_gib(m.budget)} (gpu_memory_utilization {cfg.rollout.gpu_memory_utilization:g}) = weights "
                f"{_gib(m.weights)} + overhead {_gib(m.overhead)} + KV cache {m.kv_tokens:,} tokens "
                f"({m.kv_bytes_per_token / 1024:.0f} KiB/token, {m.kv_tokens // cfg.model.max_model_len} sequences of "
                f"{cfg.model.max_model_len}) -> {'fits' if fits else 'DOES NOT FIT'}")
        else:
            parts = _member_bytes(r.kind, shape, cfg, pool.gpu_memory_gib, assume)
            label = {"learner": f"learner rank ({cfg.learner.num_ranks} in ZeRO)", "reference": "reference",
                     "reward": "reward model (vLLM)" if cfg.reward.use_model else "reward"}[r.kind]
            share = 1.0 if shares_policy_placement(cfg) else min(gpus, 1.0)  # shared: the whole GPU, lines below
            line, fits = _device_line(label, pool_of[r.name], pool.gpu_memory_gib * share, parts)
            lines.append(line)
        ok = ok and fits
    if shares_policy_placement(cfg):
        shared, fits = shared_gpu_lines(cfg, spec.pools[pool_of["policy-learner-0"]], pool_of["policy-learner-0"],
                                        shape, assume)
        lines += shared
        ok = ok and fits
    rollout_pool = spec.pools[pool_of["rollout-0"]]
    learner_pool = spec.pools[pool_of[next(r.name for r in plan.requests if r.kind == "learner")]]
    if rollout_pool.gpu_tflops and learner_pool.gpu_tflops:
        t = step_seconds(shape, cfg, rollout_pool.gpu_tflops, learner_pool.gpu_tflops, assume)
        a = assume
        rest = sum(v for k, v in t.items() if k != "generate")
        if cfg.train.async_mode:  # the next batch is generated while this one is scored and trained on
            total, how = max(t["generate"], rest), "max(generate, the rest) in async mode: "
        else:
            total, how = t["generate"] + rest, ""
        lines += ["", f"step time estimate: {total:.0f} s per RL step = {how}"
                  + " + ".join(f"{k} {v:.1f}" for k, v in t.items()),
                  f"  assuming train MFU {a.train_mfu:g}, generation MFU {a.generate_mfu:g}, prompts of "
                  f"{a.prompt_tokens} tokens, responses {a.response_fill:g} × max_new_tokens, weight sync at "
                  f"{a.sync_gb_per_s:g} GB/s; stages run one after another"]
    return lines, ok


def _kind_of(name: str) -> str:
    """The actor kind of a name in `sizing.bundle_members`: policy-learner-0 -> learner, rollout-3 -> rollout."""
    return "learner" if "learner" in name else name.split("-")[0]


def _member_bytes(kind: str, shape: ModelShape, cfg: RunConfig, gpu_gib: float, assume: Assumptions) -> dict[str, float]:
    """Peak bytes by part of one actor of `kind` on a GPU of `gpu_gib` GiB."""
    if kind == "learner":
        return learner_bytes(shape, cfg, cfg.learner.num_ranks, assume)
    if kind == "rollout":
        return {"vLLM budget": cfg.rollout.gpu_memory_utilization * gpu_gib * GIB}
    if kind == "reward":
        return reward_model_bytes(shape, cfg, gpu_gib, assume) if cfg.reward.use_model else {}
    return inference_bytes(shape, cfg, assume)


def shared_gpu_lines(cfg: RunConfig, pool: NodePool, pool_name: str, shape: ModelShape,
                     assume: Assumptions) -> tuple[list[str], bool]:
    """One line per distinct policy learner bundle: the peaks of everything on its GPU, summed
    (`shared_gpu_bytes`), against the GPU's memory; False when one does not fit."""
    lines, ok, done = [], True, set()
    kinds_per_bundle = [tuple(_kind_of(name) for name, _ in members) for members in bundle_members(cfg)]
    for kinds in kinds_per_bundle:
        if kinds in done or len(kinds) == 1:  # a rank alone: its line is above
            continue
        done.add(kinds)
        parts = {k: _member_bytes(k, shape, cfg, pool.gpu_memory_gib, assume) for k in kinds}
        reward_short = "reward" in parts and parts["reward"].get("KV cache", 0.0) < 0
        total = shared_gpu_bytes(parts)
        fits = total <= pool.gpu_memory_gib * GIB and not reward_short
        ok = ok and fits
        shown = " + ".join(f"{k} {_gib(sum(v.values()))}" for k, v in parts.items())
        ranks = [j for j, k in enumerate(kinds_per_bundle) if k == kinds]
        which = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        lines.append(f"  {'shared GPU, ' + which:<26} on {pool_name} ({pool.gpu_memory_gib:g} GiB): {shown} = "
                     f"{_gib(total)} GiB (peaks summed) -> {'fits' if fits else 'DOES NOT FIT'}"
                     + (" (the reward model's weights exceed reward.gpu_memory_utilization)" if reward_short else ""))
    return lines, ok


def cluster_plan_main(cfg: RunConfig, spec_path: str, model_config: str = "") -> int:
    """Print the plan and sizing of `cfg` on the cluster in `spec_path`; 0 when everything fits, else 1."""
    spec, assume = load_cluster_spec(spec_path)
    shape = load_shape(model_config or cfg.model.policy_path)
    totals, nodes = spec_nodes(spec)
    try:
        plan = make_plan(cfg, totals, nodes)
    except PlanError as err:
        print(f"rlhf-ray plan: {err}", file=sys.stderr)
        return 1
    lines, ok = sizing_lines(plan, spec, shape, assume)
    pools = ", ".join(f"{n} {p.count}×({p.cpus:g} CPU, {p.gpus} GPU)" for n, p in spec.pools.items())
    print(f"cluster spec {spec_path}: {pools}\n")
    print(plan.render())
    print("\n" + "\n".join(lines))
    return 0 if ok else 1
