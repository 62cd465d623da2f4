"""Driver of the node cut-off test (tests/test_multinode.py), run inside the head namespace.

Usage: python multinode_cut_driver.py RAY_ADDRESS MODEL_DIR. It places one learner rank (node
`learner`) and one rollout actor (node `rollout`), trains once and broadcasts (version 1), then
talks to the test on stdin/stdout, one JSON object a line: it prints {"ready": placement} and waits
for a line (the test adds the spare node), prints {"submitted": t} once a batch is in flight (the
test cuts the rollout node off), and finally {"result": ...}: every sample's key, version and actor,
the failures, and the replacement's node and weight checksums next to the learner's.
"""

from __future__ import annotations

import json
import sys
import time

import ray
import torch

from rlhf_ray.config import LearnerConfig, ModelConfig, RolloutConfig, SamplingConfig
from synced_pool import synced_pool


def say(**msg: object) -> None:
    print(json.dumps(msg), flush=True)


def main(address: str, model_dir: str) -> None:
    ray.init(address=address, log_to_driver=False)
    model_cfg = ModelConfig(policy_path=f"{model_dir}/policy", max_model_len=64)
    learner_cfg = LearnerConfig(lr=5e-3, micro_batch_size=4, minibatch_size=4, resources={"learner": 1})
    rollout_cfg = RolloutConfig(num_actors=1, resources={"rollout": 1}, kv_cache_space_gib=0.25, max_replacements=1,
                                call_timeout_s=300, sampling=SamplingConfig(n=2, max_new_tokens=8))
    pool, policy, sync = synced_pool(model_cfg, learner_cfg, rollout_cfg)
    say(ready={m.name: m.node_ip for m in pool.members}, version=pool.version)
    sys.stdin.readline()

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 400, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(64)]
    pending = pool.submit(prompts, sampling=SamplingConfig(n=4, max_new_tokens=48))  # seconds: cut mid-way
    say(submitted=time.time())
    result = pool.collect(pending)
    done = time.time()
    [new] = pool.members
    say(result={
        "done": done,
        "keys": [list(s.key) for s in result.samples],
        "versions": sorted({s.policy_version for s in result.samples}),
        "actors": sorted({s.actor_name for s in result.samples}),
        "failures": [{"name": f.name, "node_ip": f.node_ip, "lost": f.lost_samples, "replaced_by": f.replaced_by}
                     for f in result.failures],
        "replacement": {"name": new.name, "node_ip": new.node_ip, "version": ray.get(new.actor.version.remote())},
        "version": pool.version,
        "broadcast_after": sync.broadcast().version,  # the replacement is in the weight-sync group; checksums verified
    })


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
