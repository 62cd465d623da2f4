"""Across real node boundaries: a Ray cluster of network namespaces (tests/netns_cluster.py).

Each node has its own network stack and loopback, so an address chosen on the wrong host or a
socket bound on one node's 127.0.0.1 fails here as it fails on a real cluster. The driver runs
inside the head namespace, learner ranks on node1, rollout actors on node2; node3 sees a private
run folder. The tests share one test bed (the session fixture `netns_cluster`). The one that cuts
node1 (the learner node) off adds node5 as the fresh learner node; the one that cuts node2 off runs last.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from netns_cluster import SUBNET, WORKER_PORTS, NetnsCluster, Node, namespace_pids
from rlhf_ray.recipes.synthetic import prompt_rows


def grpo_args(model_dir: Path, out: Path, run_name: str, address: str, *extra: str) -> list[str]:
    """A tiny GRPO run: 4 prompts × 2 samples, 2 learner ranks on the `learner` nodes, 2 rollout actors on `rollout`."""
    prompts = out / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(16, seed=0)))
    return [
        f"model.policy_path={model_dir / 'policy'}", "model.max_model_len=64", "algorithm.name=grpo",
        "algorithm.kl.placement=loss", "reward.use_model=false", "reward.functions=[{path: 'rlhf_ray.rewards:brevity'}]",
        "reward.num_cpus=0.5", f"data.prompts.path={prompts}", "rollout.kv_cache_space_gib=0.25",
        "rollout.num_actors=2", "rollout.resources={rollout: 1}", "rollout.sampling.n=2",
        "rollout.sampling.max_new_tokens=8", "learner.num_ranks=2", "learner.resources={learner: 1}",
        "learner.micro_batch_size=2", "learner.minibatch_size=8", "train.prompts_per_step=4",
        f"train.output_dir={out}", f"train.run_name={run_name}", "tracking.backend=none",
        f"cluster.address={address}", *extra,
    ]


class ListenerWatch:
    """Polls `ss -ltnp` in every namespace while a run goes: {node: {(local address, pid, process name)}}.

    Each listener's command line is read while its process lives (`cmdlines`): after the run the driver is gone.
    """

    def __init__(self, cluster: NetnsCluster) -> None:
        self.cluster = cluster
        self.seen: dict[str, set[tuple[str, int, str]]] = {n: set() for n in cluster.nodes}
        self.cmdlines: dict[int, str] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.is_set():
            for node in self.cluster.nodes:
                rows = set(self.cluster.listeners(node))
                self.seen[node] |= rows
                self.cmdlines |= {pid: cmdline(pid) for _, pid, _ in rows if not self.cmdlines.get(pid)}
            time.sleep(0.5)

    def stop(self) -> dict[str, set[tuple[str, int, str]]]:
        self.done.set()
        self.thread.join()
        return self.seen


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_across_nodes_syncs_weights_from_the_learner_node_to_the_rollout_node(
    netns_cluster: NetnsCluster, tiny_model_dir: Path, tmp_path: Path
):
    cluster = netns_cluster
    args = grpo_args(tiny_model_dir, tmp_path, "cross", cluster.address, "train.steps=3")
    watch = ListenerWatch(cluster)
    start = time.perf_counter()
    out = cluster.python("head", ["-m", "rlhf_ray.cli", "train", *args], timeout=600)
    seen = watch.stop()
    print(f"\ncross-node GRPO: 3 steps in {time.perf_counter() - start:.0f}s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]

    run_dir = tmp_path / "cross"
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    # weight_sync.verify is on: every broadcast compared vLLM's checksums with the learner's, or the run failed.
    assert [r["rollout/policy_version"] for r in rows] == [0, 1, 2]
    gaps = [r["rollout/logprob_diff_max"] for r in rows]
    print(f"vLLM vs learner log-prob gap per step (max, nats): {gaps}; sync GB/s per step: "
          f"{[round(r['perf/sync_gb_per_s'], 3) for r in rows]}")
    assert all(g < 1e-4 for g in gaps[1:]), gaps  # after every sync vLLM samples from the learner's weights

    ips = {name: n.ip for name, n in cluster.nodes.items()}
    placement = json.loads((run_dir / "placement.json").read_text())
    assert {placement[f"policy-learner-{i}"]["node_ip"] for i in range(2)} == {ips["node1"]}
    assert {placement[f"rollout-{i}"]["node_ip"] for i in range(2)} == {ips["node2"]}
    # Placed by custom resource: learner ranks on a node offering `learner` only, rollout actors `rollout` only.
    offers = {name: set(entry["node_resources"]) & {"learner", "rollout"} for name, entry in placement.items()}
    assert {offers[f"policy-learner-{i}"] == {"learner"} for i in range(2)} == {True}, offers
    assert {offers[f"rollout-{i}"] == {"rollout"} for i in range(2)} == {True}, offers

    # Every socket the project's processes listen on is bound to its own node's address or loopback, never
    # 0.0.0.0 / * and never another node's. Project processes: the driver and the actors. Each of them also
    # runs Ray's own worker gRPC server (a port in WORKER_PORTS, on every interface): that one is Ray's, listed
    # apart with Ray's daemons (GCS, raylet, agents).
    actors = ("ray::LearnerWor", "ray::RolloutAct", "ray::RewardActo", "ray::ReferenceA")
    actor_of = {pid: name for rows_ in seen.values() for _, pid, name in rows_ if name in actors}  # pid -> actor
    ours, rays = set(), set()
    for node, rows_ in seen.items():
        for local, pid, name in rows_:
            port = int(local.rsplit(":", 1)[1])
            project = pid in actor_of or "rlhf_ray.cli" in watch.cmdlines.get(pid, "")
            ray_worker_port = WORKER_PORTS[0] <= port <= WORKER_PORTS[1]
            row = (node, local, actor_of.get(pid, name))  # an actor's process was "ray::IDLE" at first
            (ours if project and not ray_worker_port else rays).add(row)
    print("project listening sockets (node, address, process):\n  " + "\n  ".join(map(str, sorted(ours))))
    print("Ray's own listeners:\n  " + "\n  ".join(map(str, sorted(rays))))
    assert any(node == "node1" and local.startswith(ips["node1"] + ":") and name == "ray::LearnerWor"
               for node, local, name in ours), f"learner rank 0's stores on node1's address: {sorted(ours)}"
    assert any(node == "node2" and local.startswith(ips["node2"] + ":") and name == "ray::RolloutAct"
               for node, local, name in ours), f"the vLLM workers' gloo sockets on node2's address: {sorted(ours)}"
    wild = [row for row in ours if row[1].rsplit(":", 1)[0].removeprefix("[::ffff:").rstrip("]")
            not in (ips[row[0]], "127.0.0.1", "[::1]")]
    assert not wild, f"project sockets listening beyond their node's own address: {wild}"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_plan_against_the_test_bed_shows_the_real_nodes_and_names_a_missing_resource(
    netns_cluster: NetnsCluster, tiny_model_dir: Path, tmp_path: Path
):
    cluster, ips = netns_cluster, {name: n.ip for name, n in netns_cluster.nodes.items()}
    args = grpo_args(tiny_model_dir, tmp_path, "plan", cluster.address)
    out = cluster.python("head", ["-m", "rlhf_ray.cli", "plan", *args, "--address", cluster.address], timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    print("\n" + out.stdout)
    lines = out.stdout.splitlines()
    assert "on 4 alive node(s)" in lines[0]
    [learners] = [line for line in lines if line.lstrip().startswith("policy-learner-0")]
    [rollout] = [line for line in lines if line.lstrip().startswith("rollout-0")]
    assert f"nodes offering learner ({ips['node1']})" in learners
    assert f"nodes offering rollout ({ips['node2']})" in rollout
    assert "rendezvous on learner rank 0's node address" in out.stdout
    assert "warnings" not in out.stdout

    # Three rollout actors ask for 3 `rollout` units; node2 offers 2. A loopback rendezvous is flagged too.
    bad = cluster.python("head", ["-m", "rlhf_ray.cli", "plan", *args, "rollout.num_actors=3", "learner.num_ranks=1",
                                  "learner.minibatch_size=8", "--address", cluster.address], timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "rollout: need 3 (rollout 3×1), the cluster has 2; fix: start nodes that offer it" in bad.stderr
    loop = cluster.python("head", ["-m", "rlhf_ray.cli", "plan", *args, "weight_sync.master_addr=127.0.0.1",
                                   "--address", cluster.address], timeout=120)
    assert loop.returncode == 0 and "weight_sync.master_addr=127.0.0.1 is loopback but the cluster has 4 nodes" in loop.stdout


def test_a_learner_node_without_the_shared_run_folder_is_refused_before_the_first_step(
    netns_cluster: NetnsCluster, tiny_model_dir: Path
):
    # node3 sees an empty tmpfs of its own at /tmp/rlmn-private: what the driver writes there it never sees.
    private = Path(netns_cluster.nodes["node3"].private_dir)
    out_dir = private / f"run-{time.time_ns()}"
    args = grpo_args(tiny_model_dir, out_dir, "private", netns_cluster.address, "train.steps=1",
                     "rollout.num_actors=1", "learner.num_ranks=1", "learner.resources={private_learner: 1}",
                     "learner.micro_batch_size=4")
    out = netns_cluster.python("head", ["-m", "rlhf_ray.cli", "train", *args], timeout=400)
    print("\n" + out.stderr.strip().splitlines()[-1])
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    node3 = netns_cluster.nodes["node3"].ip
    assert f"the run folder {out_dir / 'private'} is not shared with every learner node" in out.stderr
    assert f"policy-learner-0 on node {node3} finds no file there" in out.stderr
    assert not (out_dir / "private" / "checkpoints").exists()


def learner_pids(cluster: NetnsCluster, node: str) -> list[int]:
    """Processes of LearnerWorker actors inside `node`'s namespace (Ray titles them ray::LearnerWorker...)."""
    return [pid for pid in namespace_pids(cluster.nodes[node].netns) if cmdline(pid).startswith("ray::LearnerWorker")]


def test_learner_node_lost_mid_update_stops_the_run_naming_it_and_resume_continues_on_a_fresh_node(
    netns_cluster: NetnsCluster, tiny_model_dir: Path, tmp_path: Path
):
    """node1 (the learner node) is cut off during step 3's update and stays cut (later tests use node5).

    train.max_learner_restarts=0: the run must stop with the error, then `--resume` continues on node5. (The
    in-process restart after a rank death is tested on one node: test_elastic.py::test_killed_learner_rank_...)
    """
    cluster = netns_cluster
    # Checkpoints after steps 1 and 3 (step_000002, step_000004); step 2 is logged but not checkpointed, so the
    # resume runs it again and must drop its first line. One micro-batch a sample: an update of several seconds.
    args = grpo_args(tiny_model_dir, tmp_path, "lost", cluster.address, "train.steps=4", "checkpoint.every=2",
                     "train.max_learner_restarts=0", "learner.num_ranks=1", "learner.micro_batch_size=1",
                     "rollout.num_actors=1")
    run_dir = tmp_path / "lost"
    cut_at: list[float] = []

    def cut_during_step_3_update() -> None:
        deadline = time.monotonic() + 500
        while len(metric_rows_if_any(run_dir)) < 3 and time.monotonic() < deadline:  # steps 0-2 logged
            time.sleep(0.05)
        pids = learner_pids(cluster, "node1")
        while time.monotonic() < deadline:  # while the rank runs a task, Ray titles it ray::LearnerWorker.<method>
            if any("LearnerWorker.ppo_update" in cmdline(pid) for pid in pids):
                cluster.cut("node1")
                cut_at.append(time.time())
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=cut_during_step_3_update, daemon=True)
    watcher.start()
    out = cluster.python("head", ["-m", "rlhf_ray.cli", "train", *args], timeout=600)
    stopped = time.time()
    watcher.join(timeout=1)
    assert cut_at, "node1 was never cut: " + out.stdout[-2000:] + out.stderr[-3000:]
    node1, node5 = cluster.nodes["node1"].ip, f"{SUBNET}.15"
    message = next((line for line in out.stderr.splitlines() if line.startswith("rlhf-ray: ")), out.stderr[-3000:])
    print(f"\nlearner node cut {stopped - cut_at[0]:.1f}s before the run stopped, exit {out.returncode}: {message}")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert message.startswith(f"rlhf-ray: learner rank policy-learner-0 on node {node1} died at step 3 and "
                              "train.max_learner_restarts=0 restarts are used up; the last complete checkpoint "
                              f"is step 2 in {run_dir / 'checkpoints'}"), message
    assert "policy learner ppo_update failed: policy-learner-0 died" in message  # the cut landed mid-update
    [event] = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert (event["event"], event["nodes"], event["step"], event["resume_from_step"]) == (
        "learner_failure", {"policy-learner-0": node1}, 3, 2)
    first = metric_rows(run_dir)
    assert [r["step"] for r in first] == [0, 1, 2]

    # A fresh learner node joins; the run folder (checkpoints included) is on the filesystem every node shares.
    cluster.add_node(Node("node5", node5, num_cpus=3, resources={"learner": 1}))
    resumed = cluster.python("head", ["-m", "rlhf_ray.cli", "train", *args, "--resume"], timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert json.dumps({"resumed_from": str(run_dir / "checkpoints" / "step_000002"), "step": 2}) in resumed.stdout
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # step 2's first line was dropped, not duplicated
    assert [r["rollout/policy_version"] for r in rows] == [0, 1, 2, 3]
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows[1:])  # vLLM on node2 got node5's weights
    # The restored weights, prompt sampler and pool step make step 2 again exactly what it was before the cut.
    for key in ("reward/mean", "rollout/response_len_mean"):
        assert rows[2][key] == first[2][key], (key, rows[2][key], first[2][key])
    assert json.loads((run_dir / "placement.json").read_text())["policy-learner-0"]["node_ip"] == node5
    final = run_dir / "checkpoints" / "step_000004" / "policy"
    loaded = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "policy")
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(loaded.parameters(), base.parameters()))  # it was trained


def metric_rows_if_any(run_dir: Path) -> list[dict]:
    return metric_rows(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def test_rollout_node_cut_off_mid_generation_is_replaced_on_a_spare_node_without_losing_a_sample(
    netns_cluster: NetnsCluster, tiny_model_dir: Path
):
    """Runs last: node2 stays cut off (Ray marks it dead; the fixture's teardown ends its processes)."""
    cluster = netns_cluster
    driver = cluster.popen("head", [sys.executable, str(Path(__file__).parent / "multinode_cut_driver.py"),
                                    cluster.address, str(tiny_model_dir)])
    lines: list[dict] = []

    def next_message() -> dict:
        for line in driver.stdout:
            lines.append(line)
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError("the driver ended early:\n" + "".join(map(str, lines[-60:])))

    try:
        ready = next_message()
        assert ready["ready"] == {"rollout-0": cluster.nodes["node2"].ip} and ready["version"] == 1
        cluster.add_node(Node("node4", f"{SUBNET}.14", num_cpus=2, resources={"rollout": 1}))
        driver.stdin.write("go\n")
        driver.stdin.flush()
        submitted = next_message()["submitted"]
        time.sleep(0.2)  # the call has reached the actor; 64 prompts × 4 samples take it seconds
        cut_at = time.time()
        cluster.cut("node2")
        result = next_message()["result"]
    finally:
        driver.kill()
        driver.wait()
    print(f"\nnode2 cut {cut_at - submitted:.1f}s after submit; batch complete {result['done'] - cut_at:.1f}s after "
          f"the cut; samples lost {256 - len(result['keys'])}; failures {result['failures']}")
    assert result["keys"] == [[p, i] for p in range(64) for i in range(4)]  # every (prompt, sample) exactly once
    [failure] = result["failures"]
    assert failure["name"] == "rollout-0" and failure["node_ip"] == cluster.nodes["node2"].ip
    assert failure["replaced_by"] == result["replacement"]["name"]
    assert result["replacement"]["node_ip"] == cluster.nodes["node4"].ip
    assert result["versions"] == [1] and result["replacement"]["version"] == result["version"] == 1
    assert result["actors"] == [result["replacement"]["name"]]  # the cut actor's partial work was not kept
    assert result["broadcast_after"] == 2
