"""The run plan: per-actor resource requests, cluster checks that name what is missing, transport, KL,
batch arithmetic; the shipped recipes against the shipped cluster files; `plan_main` on a real local Ray."""

import json
from pathlib import Path

import subprocess
import sys

import pytest
import ray
import yaml

from rlhf_ray.config import load_config
from rlhf_ray.driver.plan import PlanError, make_plan, resource_requests, weight_sync_backend
from rlhf_ray.driver.step_guard import StepGuard
from rlhf_ray.sizing import learner_rank_request, ray_options, rollout_bundles

ROOT = Path(__file__).resolve().parents[1]
PPO = ROOT / "configs" / "qwen2.5-1.5b-ppo.yaml"
GRPO = ROOT / "configs" / "qwen2.5-1.5b-grpo.yaml"


def node(ip: str, **resources: float) -> dict:
    """One entry of `ray.nodes()`."""
    return {"NodeID": ip, "Alive": True, "NodeManagerAddress": ip, "Resources": resources}


def totals(nodes: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in nodes:
        for k, v in n["Resources"].items():
            out[k] = out.get(k, 0.0) + v
    return out


# A head that runs only the driver, a 4-GPU learner node and four 1-GPU rollout nodes.
GPU_NODES = [node("10.0.0.1", CPU=0), node("10.0.1.1", CPU=48, GPU=4, learner=4)] + [
    node(f"10.0.2.{i}", CPU=8, GPU=1, rollout=1) for i in range(4)
]


def test_cpu_defaults_fit_five_cpus():
    cfg = load_config()  # PPO: a critic learner group beside the policy's; the policy ranks hold the reference
    plan = make_plan(cfg, {"CPU": 5.0})
    assert [(r.name, r.resources) for r in plan.requests] == [
        ("rollout-0", {"CPU": 1.0}),
        ("policy-learner-0", {"CPU": 1.0}),
        ("critic-learner-0", {"CPU": 1.0}),
        ("reward", {"CPU": 1.0}),
    ]
    assert plan.needed == {"CPU": 4.0}
    assert plan.transport == "gloo"
    text = plan.render()
    assert "auto -> gloo" in text and "rollout-0" in text and "reference held by the policy learner ranks" in text
    with_actor = make_plan(load_config(None, ["reference.placement=actor"]), {"CPU": 5.0})
    assert ("reference", {"CPU": 0.5}) in [(r.name, r.resources) for r in with_actor.requests]
    assert with_actor.needed == {"CPU": 4.5}


def test_gpu_recipe_places_each_actor_in_its_pool():
    plan = make_plan(load_config(PPO), totals(GPU_NODES), GPU_NODES)
    by_name = {r.name: r.resources for r in plan.requests}
    assert by_name["rollout-3"] == {"CPU": 4.0, "GPU": 1.0, "rollout": 1.0}
    assert by_name["policy-learner-0"] == by_name["critic-learner-1"] == {"CPU": 8.0, "GPU": 0.7, "learner": 1.0}
    # reference.colocate and reward.colocate: shares of policy ranks 0 and 1's GPUs, inside their bundles
    assert by_name["reference"] == {"CPU": 2.0, "GPU": 0.3} and by_name["reward"] == {"CPU": 4.0, "GPU": 0.3}
    assert {r.name: r.bundle for r in plan.requests if r.bundle is not None} == {"reference": 0, "reward": 1}
    assert plan.needed["GPU"] == pytest.approx(7.4) and plan.needed["learner"] == 4 and plan.needed["rollout"] == 4
    assert plan.hosts["rollout-0"] == [f"10.0.2.{i}" for i in range(4)]
    assert plan.hosts["policy-learner-0"] == plan.hosts["critic-learner-0"] == plan.hosts["reference"] == ["10.0.1.1"]
    assert plan.hosts["reward"] == ["10.0.1.1"]
    text = plan.render()
    assert "rollout-0 … rollout-3 (4×)" in text and "nodes offering rollout" in text
    assert "nccl (GPU to GPU)" in text
    assert "rendezvous on learner rank 0's node address" in text and not plan.warnings
    assert "bundle 0       {CPU: 10, GPU: 1, learner: 1}: policy-learner 0.7 + reference 0.3 of one GPU" in text
    assert "-> in policy-learner-1's bundle, sharing its GPU" in text
    pinned = load_config(PPO, ["weight_sync.master_addr=127.0.0.1"])
    warnings = make_plan(pinned, totals(GPU_NODES), GPU_NODES).warnings
    assert any("master_addr=127.0.0.1 is loopback" in w for w in warnings)


def test_reference_and_reward_in_slots_of_their_own_take_the_learner_pool():
    """Without colocation: the reference is one learner-sized slot, a GPU reward model takes the learner pool's
    custom resources in proportion to its GPUs."""
    own = ["reference.colocate=false", "reward.colocate=false", "reward.num_gpus=1", "learner.num_gpus_per_rank=1",
           "learner.num_ranks=1"]  # the recipe before the GPUs were shared
    plan = make_plan(load_config(PPO, own), totals(GPU_NODES), GPU_NODES)
    by_name = {r.name: r.resources for r in plan.requests}
    assert by_name["reward"] == {"CPU": 4.0, "GPU": 1.0, "learner": 1.0}
    assert by_name["reference"] == by_name["policy-learner-0"] == {"CPU": 8.0, "GPU": 1.0, "learner": 1.0}
    assert all(r.bundle is None for r in plan.requests) and "shared GPUs" not in plan.render()


def test_a_shared_bundle_that_fits_no_node_is_named():
    nodes = [node("10.0.1.1", CPU=9, GPU=4, learner=4)] + [node(f"10.0.2.{i}", CPU=8, GPU=1, rollout=1) for i in range(4)]
    with pytest.raises(PlanError, match=r"policy learner bundle 0 needs \{CPU: 10, GPU: 1, learner: 1\} on one node"):
        make_plan(load_config(GRPO), totals(nodes) | {"CPU": 100.0}, nodes)  # each actor alone fits on 9 CPUs


def test_ray_options_are_accepted_by_ray():
    req = next(r for r in resource_requests(load_config(PPO)) if r.kind == "rollout")
    assert req.ray_options() == {"num_cpus": 4.0, "num_gpus": 1.0, "resources": {"rollout": 1.0}}

    @ray.remote
    class Probe:
        pass

    Probe.options(**req.ray_options())  # Ray validates the options here, without a cluster


def test_missing_rollout_resource_is_named_with_counts():
    nodes = GPU_NODES[:2]  # no rollout nodes
    with pytest.raises(PlanError) as err:
        make_plan(load_config(PPO), totals(nodes) | {"GPU": 8.0}, None)
    msg = str(err.value)
    assert "rollout: need 4 (rollout 4×1), the cluster has 0 (no node offers it)" in msg
    assert """ray start --resources='{"rollout": N}'""" in msg and "rollout.num_actors" in msg


def test_too_few_gpus_is_named_with_counts_and_fix():
    with pytest.raises(PlanError) as err:
        make_plan(load_config(PPO), {"CPU": 100.0, "GPU": 4.0, "learner": 4.0, "rollout": 4.0})
    msg = str(err.value)
    assert "GPU: need 7.4 (rollout 4×1, learner 4×0.7, reward 0.3, reference 0.3), the cluster has 4" in msg
    assert "add nodes with more GPUs, or lower rollout.num_actors" in msg and "learner.num_gpus_per_rank" in msg
    assert "rollout:" not in msg  # only what is short


def test_too_few_cpus_names_the_local_head_fix():
    with pytest.raises(PlanError, match=r"CPU: need 4 .*the cluster has 2;.*cluster.num_cpus"):
        make_plan(load_config(), {"CPU": 2.0})


def test_each_actor_must_fit_on_one_node():
    cfg = load_config(PPO, ["rollout.tensor_parallel_size=2", "rollout.num_actors=2"])
    with pytest.raises(PlanError, match=r"rollout-0 needs \{CPU: 4, GPU: 2, rollout: 1\} on one node") as err:
        make_plan(cfg, totals(GPU_NODES), GPU_NODES)  # 4 one-GPU rollout nodes: enough GPUs in total
    assert "rollout.num_gpus_per_actor × rollout.tensor_parallel_size" in str(err.value)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], "gloo"),
        (["learner.num_gpus_per_rank=1", "rollout.num_gpus_per_actor=1"], "nccl"),
        (["weight_sync.backend=gloo", "learner.num_gpus_per_rank=1", "rollout.num_gpus_per_actor=1"], "gloo"),
        (["weight_sync.backend=cuda_ipc", "learner.num_gpus_per_rank=1", "rollout.num_gpus_per_actor=1"], "cuda_ipc"),
    ],
)
def test_transport_is_derived_from_the_config(overrides, expected):
    cfg = load_config(None, overrides)
    assert weight_sync_backend(cfg) == expected
    assert make_plan(cfg, {"CPU": 8.0, "GPU": 8.0}).transport == expected


def test_nccl_to_cpu_rollout_actors_is_refused():
    cfg = load_config(None, ["learner.num_gpus_per_rank=1"])  # auto -> nccl, but vLLM runs on CPU
    with pytest.raises(PlanError, match=r"nccl needs GPUs on both ends.*weight_sync.backend=gloo"):
        make_plan(cfg, {"CPU": 8.0, "GPU": 8.0})


@pytest.mark.parametrize(
    "path, overrides, expected",
    [
        (PPO, [], "in the reward: a per-token penalty -β·KL added before advantages; estimator k1; β = 0.02 fixed"),
        (GRPO, [], "in the loss: β·KL added to the policy loss; estimator k3; β = 0.001 fixed"),
        (None, ["algorithm.kl.adaptive=true"], "β adaptive from 0.05 toward 6 nats/sequence over a horizon of 10000"),
        (None, ["algorithm.kl.coef=0"], "β = 0 fixed (KL off"),
    ],
)
def test_kl_placement_is_described(path, overrides, expected):
    cfg = load_config(path, overrides)
    text = make_plan(cfg, {"CPU": 100.0, "GPU": 100.0, "learner": 100.0, "rollout": 100.0}).render()
    assert expected in text


def test_batch_arithmetic():
    cfg = load_config(None, [
        "train.prompts_per_step=16", "rollout.sampling.n=4", "learner.num_ranks=2",
        "learner.micro_batch_size=2", "learner.minibatch_size=16", "learner.ppo_epochs=3",
    ])
    plan = make_plan(cfg, {"CPU": 8.0})
    b = plan.batch
    assert (b.prompts_per_step, b.samples_per_step, b.minibatch_size) == (16, 64, 16)
    assert (b.micro_batch_per_rank, b.grad_accum_steps, b.minibatches_per_epoch) == (2, 4, 4)
    assert b.optimizer_steps_per_rl_step == 12
    assert b.optimizer_steps_per_run == 10 * 12  # train.steps defaults to 10
    assert StepGuard.for_run(cfg, None).updates_per_step == 12  # the guard counts with the same figure
    text = plan.render()
    assert "samples B×n = 16×4 = 64" in text
    assert "minibatch 16 = 2 rank(s) × micro-batch 2 × 4 gradient-accumulation steps" in text
    assert "ppo_epochs × samples/minibatch = 3 × 64/16 = 12" in text


# ---------------------------------------------------------------- the recipes fit the shipped cluster files


def kuberay_nodes() -> list[dict]:
    """The nodes the RayJob creates: CPUs and GPUs from pod limits, custom resources from rayStartParams."""
    spec = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    nodes = [node("head", CPU=float(head["rayStartParams"]["num-cpus"]))]
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        custom = json.loads(json.loads(group["rayStartParams"]["resources"]))
        for i in range(group["minReplicas"]):
            res = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])} | custom
            nodes.append(node(f"{group['groupName']}-{i}", **res))
    return nodes


# vCPUs and GPUs of the instance types in ray-cluster.aws.yaml (Ray detects them on AWS).
AWS_INSTANCES = {"m6i.2xlarge": (8, 0), "g6e.12xlarge": (48, 4), "g6e.2xlarge": (8, 1)}


def aws_nodes() -> list[dict]:
    """The nodes `ray up` starts at min_workers, with resources as Ray would detect them."""
    cfg = yaml.safe_load((ROOT / "cluster" / "ray-cluster.aws.yaml").read_text())
    nodes = []
    for name, t in cfg["available_node_types"].items():
        cpus, gpus = AWS_INSTANCES[t["node_config"]["InstanceType"]]
        count = 1 if name == cfg["head_node_type"] else t["min_workers"]
        for i in range(count):
            nodes.append(node(f"{name}-{i}", **({"CPU": cpus, "GPU": gpus} | t["resources"])))
    return nodes


@pytest.mark.parametrize("recipe", [PPO, GRPO], ids=lambda p: p.name)
@pytest.mark.parametrize("nodes", [kuberay_nodes, aws_nodes], ids=["kuberay", "aws"])
def test_recipes_fit_the_shipped_clusters(recipe, nodes):
    ns = nodes()
    plan = make_plan(load_config(recipe), totals(ns), ns)
    assert plan.transport == "nccl"
    assert all(not h.startswith("head") for hosts in plan.hosts.values() for h in hosts)  # driver-only head


# ---------------------------------------------------------------- plan_main on a real local Ray


def _plan_cli(*overrides: str) -> subprocess.CompletedProcess:
    """`rlhf-ray plan` in its own process, so its local Ray head is independent of the test session's."""
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "plan", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_plan_main_starts_its_own_local_head():
    proc = _plan_cli("cluster.num_cpus=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "placement" in proc.stdout and "auto -> gloo" in proc.stdout
    assert "optimizer steps per RL step" in proc.stdout


def test_plan_main_on_2_cpus_refuses_the_default_config():
    proc = _plan_cli("cluster.num_cpus=2")
    assert proc.returncode == 1
    assert "CPU: need 4 (rollout 1, learner 2×1, reward 1), the cluster has 2" in proc.stderr


def test_plan_main_on_2_cpus_accepts_a_config_that_fits():
    proc = _plan_cli("cluster.num_cpus=2", "rollout.num_cpus_per_actor=0.5", "learner.num_cpus_per_rank=0.25",
                     "reward.num_cpus=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "{CPU: 2}" in proc.stdout and "on 1 alive node(s)" in proc.stdout


def test_pool_and_learner_group_place_what_the_plan_requests():
    """The rollout pool's placement-group bundles and the learner group's bundle are the plan's requests:
    for tensor parallelism 2, the actor's CPUs and custom resources once (first bundle), one GPU per worker."""
    cfg = load_config(PPO, ["rollout.tensor_parallel_size=2", "rollout.num_actors=2"])
    assert rollout_bundles(cfg.rollout) == [{"CPU": 4.0, "GPU": 1.0, "rollout": 1.0}, {"GPU": 1.0}]
    requests = {r.name: r.resources for r in resource_requests(cfg)}
    assert requests["rollout-1"] == {"CPU": 4.0, "GPU": 2.0, "rollout": 1.0}
    assert requests["policy-learner-0"] == learner_rank_request(cfg.learner) == {"CPU": 8.0, "GPU": 0.7, "learner": 1.0}
    cpu = load_config(None, ["rollout.num_cpus_per_actor=1.5"])
    assert rollout_bundles(cpu.rollout) == [{"CPU": 1.5}]
    assert ray_options(rollout_bundles(cpu.rollout)[0]) == {"num_cpus": 1.5, "num_gpus": 0.0, "resources": {}}
