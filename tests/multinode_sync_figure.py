"""The weight-sync figure across a real link: the broadcaster against raw gloo, node1 → node2 of the test bed.

Usage, as root and under the heavy lock (it starts its own test bed, so no other may run):

    python tests/multinode_sync_figure.py [--hidden 384] [--layers 8] [--repeats 4]

It starts head, node1 (`learner`) and node2 (`rollout`) of tests/netns_cluster.py and builds a random
Qwen2 policy of tens of MB. Then, from the head namespace, it alternates two timings, one after the other
on the same veth link:
- `WeightBroadcaster.broadcast` from a one-rank learner group on node1 to a one-actor vLLM pool on
  node2 (what `perf/sync_gb_per_s` of a run measures: bucketing, the transfer and vLLM's reload);
- a raw gloo broadcast of the same number of bytes, one flat buffer, between two bare Ray actors on
  the same two nodes (the bench's `GlooPeer`, bound on node1's address).
It prints one JSON line (GB/s of each per repeat, medians, the paired ratio) and asserts nothing:
the figure is noisy on a shared machine, which is why the two alternate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def driver(address: str, policy_path: str, repeats: int) -> dict:
    """Inside the head namespace: both timings, alternately; the first of each builds its group and is dropped."""
    import ray

    from actors.rollout_pool import RolloutPool
    from learners import LearnerGroup
    from rlhf_ray.bench.report import paired_ratio, spread
    from rlhf_ray.bench.sync import GlooPeer, raw_broadcast_seconds
    from rlhf_ray.config import LearnerConfig, ModelConfig, RolloutConfig, WeightSyncConfig
    from rlhf_ray.driver.broadcaster import WeightBroadcaster
    from rlhf_ray.net import bind_listener
    from rlhf_ray.weight_sync import SyncGroupSpec

    class NodeGlooPeer(GlooPeer):
        def listen(self) -> int:  # on this node's address, as learner rank 0 binds the weight-sync store
            self.listen_fd, port = bind_listener(ray.util.get_node_ip_address())
            return port

    ray.init(address=address, log_to_driver=False)
    nodes = {n["NodeManagerAddress"]: n for n in ray.nodes() if n["Alive"]}
    learner_ip = next(ip for ip, n in nodes.items() if "learner" in n["Resources"])
    rollout_ip = next(ip for ip, n in nodes.items() if "rollout" in n["Resources"])
    model_cfg = ModelConfig(policy_path=policy_path, max_model_len=64)
    pool = RolloutPool(model_cfg, RolloutConfig(num_actors=1, kv_cache_space_gib=0.25, resources={"rollout": 1}))
    learner = LearnerGroup("policy", policy_path, LearnerConfig(num_ranks=1, resources={"learner": 1}), model_cfg)
    peers = []
    try:
        broadcaster = WeightBroadcaster(learner, pool, WeightSyncConfig(), backend="gloo")
        nbytes = broadcaster.total_bytes
        peers = [ray.remote(num_cpus=0, resources={f"node:{ip}": 0.01})(NodeGlooPeer).remote()
                 for ip in (learner_ip, rollout_ip)]
        spec = SyncGroupSpec(learner_ip, ray.get(peers[0].listen.remote()), world_size=2, backend="gloo",
                             timeout_s=300, generation=0)
        ray.get([p.join.remote(spec, rank, nbytes // 4) for rank, p in enumerate(peers)])
        ours, raw, reload, in_flight = [], [], [], []
        for i in range(1 + repeats):
            stats = broadcaster.broadcast()
            raw_s = raw_broadcast_seconds(peers)
            if i > 0:
                ours.append(stats.gb_per_s)
                raw.append(nbytes / raw_s / 1e9)
                reload.append(stats.reload_seconds)
                in_flight.append(nbytes / (stats.seconds - stats.reload_seconds) / 1e9)
        where = {"learner": learner.where()["policy-learner-0"]["node_ip"], "rollout": pool.members[0].node_ip}
    finally:
        for p in peers:
            ray.kill(p)
        learner.shutdown()
        pool.shutdown()
    ratio, low, high = paired_ratio(ours, raw)
    return {
        "megabytes": nbytes / 1e6, "placement": where, "raw_peers": [learner_ip, rollout_ip],
        "broadcaster_gb_per_s": ours, "raw_gloo_gb_per_s": raw, "vllm_reload_s": reload,
        "broadcaster_gb_per_s_median": spread(ours)["median"], "raw_gloo_gb_per_s_median": spread(raw)["median"],
        "ratio": ratio, "ratio_low": low, "ratio_high": high,
        "ratio_without_vllm_reload": paired_ratio(in_flight, raw)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=384, help="hidden size of the policy (heads of 64)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4, help="timed broadcasts of each kind, after one warm-up")
    parser.add_argument("--driver", nargs=2, metavar=("ADDRESS", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        print(json.dumps(driver(*args.driver, args.repeats)), flush=True)
        return

    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from netns_cluster import NetnsCluster, default_nodes, netns_unavailable
    from rlhf_ray.bench.workloads import FULL, build_policy

    why = netns_unavailable()
    if why:
        sys.exit(f"no test bed: {why}")
    shape = dataclasses.replace(FULL, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                                num_kv_heads=2)
    model_dir = Path(tempfile.mkdtemp(prefix="rlmn_sync_model_"))
    policy = build_policy(shape, model_dir)
    cluster = NetnsCluster(default_nodes()[:3])  # head, node1 (learner), node2 (rollout)
    try:
        cluster.start()
        print(f"test bed up in {cluster.start_s:.1f}s", file=sys.stderr)
        start = time.perf_counter()
        out = cluster.python("head", [__file__, "--repeats", str(args.repeats), "--driver", cluster.address,
                                      str(policy)], timeout=900)
        if out.returncode:
            sys.exit(f"the driver failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["driver_s"] = time.perf_counter() - start
        print(json.dumps(result))
    finally:
        print(f"test bed down in {cluster.stop():.1f}s", file=sys.stderr)
        shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
