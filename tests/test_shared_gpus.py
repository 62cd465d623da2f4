"""The reference and the reward model sharing the policy learners' GPUs (reference.colocate, reward.colocate):
the config rules, the bundles against hand arithmetic, and where the actors land on a real Ray head."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.sizing import bundle_members, policy_bundles, resource_requests, shared_bundle_index

ROOT = Path(__file__).resolve().parents[1]
GPU_LEARNERS = ["learner.num_gpus_per_rank=0.7", "learner.num_ranks=2", "learner.minibatch_size=8"]


@pytest.mark.parametrize("overrides, message", [
    (["reference.placement=actor", "reference.colocate=true"],
     r"reference.colocate=true shares a policy learner rank's GPU, but "
     r"learner.num_gpus_per_rank=0 \(CPU learners\); fix: set reference.colocate=false"),
    (GPU_LEARNERS + ["reward.colocate=true"], r"reward.colocate=true shares a learner GPU, but reward.num_gpus=0"),
    (GPU_LEARNERS + ["reference.placement=actor", "reference.colocate=true", "reference.num_gpus=0.4"],
     r"policy learner rank 0's GPU would hold policy-learner-0 0.7 \+ reference 0.4 = 1.1 GPUs.*fix: lower "
     r"learner.num_gpus_per_rank"),
    (GPU_LEARNERS + ["learner.num_ranks=1", "reference.placement=actor", "reference.colocate=true",
                     "reference.num_gpus=0.2", "reward.colocate=true", "reward.num_gpus=0.2"],
     r"policy-learner-0 0.7 \+ reference 0.2 \+ reward 0.2 = 1.1 GPUs"),
    (["reference.num_gpus=1.5"], r"reference.num_gpus"),
    (["reward.gpu_memory_utilization=0"], r"reward.gpu_memory_utilization"),
])
def test_shares_that_cannot_work_are_refused_naming_the_field(overrides, message) -> None:
    with pytest.raises(Exception, match=message):
        load_config(None, overrides)


def test_bundles_hold_the_rank_and_what_shares_its_gpu() -> None:
    cfg = load_config(None, GPU_LEARNERS + ["learner.num_cpus_per_rank=4", "learner.resources={learner: 1}",
                                            "reference.placement=actor", "reference.colocate=true",
                                            "reference.num_gpus=0.3", "reference.num_cpus=2",
                                            "reward.colocate=true", "reward.num_gpus=0.25", "reward.num_cpus=3"])
    assert shared_bundle_index(cfg) == {"reference": 0, "reward": 1}
    assert policy_bundles(cfg) == [{"CPU": 6.0, "GPU": 1.0, "learner": 1.0}, {"CPU": 7.0, "GPU": 0.95, "learner": 1.0}]
    assert bundle_members(cfg) == [[("policy-learner-0", 0.7), ("reference", 0.3)],
                                   [("policy-learner-1", 0.7), ("reward", 0.25)]]
    by_name = {r.name: r for r in resource_requests(cfg)}
    # inside a bundle the helper asks for no custom resource: the bundle holds the rank's
    assert by_name["reference"].resources == {"CPU": 2.0, "GPU": 0.3} and by_name["reference"].bundle == 0
    assert by_name["reward"].resources == {"CPU": 3.0, "GPU": 0.25} and by_name["reward"].bundle == 1
    one_rank = load_config(None, GPU_LEARNERS + ["learner.num_ranks=1", "reference.placement=actor",
                                                 "reference.colocate=true", "reference.num_gpus=0.1",
                                                 "reward.colocate=true", "reward.num_gpus=0.2"])
    assert policy_bundles(one_rank) == [{"CPU": 1.0 + 2.0 + 1.0, "GPU": pytest.approx(1.0)}]  # both in rank 0's


def test_reference_and_reward_land_on_their_learner_ranks_gpus(tiny_model_dir: Path) -> None:
    """On a Ray head with 2 (logical) GPUs: 2 policy ranks at 0.7, the reference at 0.3 and the reward at 0.3
    fit only by sharing; Ray gives the reference rank 0's GPU and the reward rank 1's."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "shared_gpu_placement.py"),
                           str(tiny_model_dir / "policy")], capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    where = json.loads(done.stdout.strip().splitlines()[-1])
    rank0, rank1 = where["policy-learner-0"]["gpu_ids"], where["policy-learner-1"]["gpu_ids"]
    assert where["cluster_gpus"] == 2.0 and len(rank0) == len(rank1) == 1 and rank0 != rank1
    assert where["reference"]["gpu_ids"] == rank0 and where["reward"]["gpu_ids"] == rank1
    assert {w["placement_group"] for k, w in where.items() if isinstance(w, dict)} == {where["shared_pg"]}
