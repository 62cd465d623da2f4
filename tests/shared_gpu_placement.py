"""Where the reference and the reward actor land when they share the policy learners' GPUs (run as a script).

Starts its own Ray head with 2 logical GPUs (Ray hands GPU ids out per placement-group bundle on a machine
without GPUs too), places a 2-rank policy learner group, the reference and the reward actor exactly as
`build_components` does, and prints one JSON line: each actor's Ray GPU ids and placement group.
Usage: python tests/shared_gpu_placement.py POLICY_FOLDER
"""

from __future__ import annotations

import json
import sys

import ray

from learners import LearnerGroup
from rlhf_ray.config import load_config
from rlhf_ray.driver.components import helper_options, policy_placement, start_reference, start_reward
from rlhf_ray.sizing import resource_requests

SHARED = [
    "learner.num_ranks=2", "learner.num_gpus_per_rank=0.7", "learner.resources={learner: 1}",
    "learner.minibatch_size=8", "reference.placement=actor", "reference.colocate=true", "reference.num_gpus=0.3",
    "reference.num_cpus=1",
    "reward.colocate=true", "reward.num_gpus=0.3", "reward.use_model=false",
    "reward.functions=[{path: 'rlhf_ray.rewards:gsm8k_answer'}]", "weight_sync.backend=gloo",
]


def where(handle) -> dict:
    """The GPU ids Ray gave an actor and its placement group."""
    return ray.get(handle.__ray_call__.remote(lambda _: {
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "placement_group": ray.get_runtime_context().get_placement_group_id(),
    }))


def main(policy_path: str) -> None:
    cfg = load_config(None, [f"model.policy_path={policy_path}", "model.max_model_len=128", *SHARED])
    ray.init(address="local", num_cpus=8, num_gpus=2, resources={"learner": 2}, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    shared = policy_placement(cfg)
    policy = LearnerGroup("policy", policy_path, cfg.learner, cfg.model, cfg.algorithm, placement=shared)
    requests = {r.name: helper_options(r, shared) for r in resource_requests(cfg)}
    reference, reward = start_reference(cfg, requests["reference"]), start_reward(cfg, requests["reward"])
    ray.get([reference.ping.remote(), reward.ping.remote()])
    out = {name: where(w) for name, w in zip(policy.names, policy.workers)}
    out |= {"reference": where(reference), "reward": where(reward), "cluster_gpus": ray.cluster_resources()["GPU"]}
    out["shared_pg"] = shared.id.hex()
    policy.shutdown()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
