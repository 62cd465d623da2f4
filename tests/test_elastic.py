"""Elasticity and fault tolerance with real Ray, vLLM and DeepSpeed on a tiny model (CPU).

A rollout actor killed mid-generation loses no sample and is replaced at the current weights;
the pool grows 1 -> 2 actors during a run through `rlhf-ray scale`; a killed learner rank is
survived by resuming from the last checkpoint. (Placement by custom resource across nodes is
tested on the network-namespace test bed: tests/test_multinode.py.)
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import ray
import torch

from actors.rollout_pool import RolloutPool
from learners import LearnerGroup
from rlhf_ray import cli
from rlhf_ray.driver.broadcaster import WeightBroadcaster
from rlhf_ray.config import LearnerConfig, ModelConfig, RolloutConfig, RunConfig, SamplingConfig, load_config
from rlhf_ray.driver.recovery import read_scale_request, write_scale_request
from rlhf_ray.driver import supervisor
from rlhf_ray.ray_utils import ActorCallError, LearnerRankError
from rlhf_ray.driver.supervisor import RunFailedError, train_supervised
from rlhf_ray.recipes.synthetic import prompt_rows
from synced_pool import synced_pool as build_synced_pool

def run_cfg(tiny_model_dir: Path, tmp: Path, run_name: str, *overrides: str) -> RunConfig:
    """A tiny GRPO run with a rule reward: 4 prompts × 2 samples of at most 8 tokens per step."""
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(32, seed=0)))
    return load_config(None, [
        f"model.policy_path={tiny_model_dir / 'policy'}", "model.max_model_len=64",
        "algorithm.name=grpo", "algorithm.kl.placement=loss", "algorithm.kl.estimator=k3",
        "reward.use_model=false", "reward.functions=[{path: 'rlhf_ray.rewards:brevity'}]", "reward.num_cpus=0.5",
        f"data.prompts.path={prompts}", "rollout.kv_cache_space_gib=0.25", "rollout.sampling.n=2",
        "rollout.sampling.max_new_tokens=8", "learner.micro_batch_size=4", "learner.minibatch_size=8",
        "train.prompts_per_step=4", f"train.output_dir={tmp}", f"train.run_name={run_name}",
        "tracking.backend=none", *overrides,
    ])


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def when(condition: Callable[[], bool], action: Callable[[], None], timeout_s: float = 600) -> threading.Thread:
    """Run `action` in a thread as soon as `condition` holds (polled every 50 ms): an operator acting mid-run."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------- a rollout actor dies mid-generation


@pytest.fixture
def synced_pool(tiny_model_dir: Path, ray_cluster: None) -> Iterator[tuple[RolloutPool, LearnerGroup, WeightBroadcaster]]:
    """Two rollout actors serving policy version 1 (weights the learner changed); replacements load the learner's."""
    model_cfg = ModelConfig(policy_path=str(tiny_model_dir / "policy"), max_model_len=64)
    rollout_cfg = RolloutConfig(num_actors=2, kv_cache_space_gib=0.25, max_replacements=1,
                                sampling=SamplingConfig(n=2, max_new_tokens=8))
    pool, policy, sync = build_synced_pool(model_cfg, LearnerConfig(lr=5e-3, micro_batch_size=4, minibatch_size=4), rollout_cfg)
    yield pool, policy, sync
    pool.shutdown()
    policy.shutdown()


def test_killed_rollout_actor_loses_no_sample_and_its_replacement_serves_current_weights(synced_pool):
    pool, policy, sync = synced_pool
    assert pool.version == 1
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 400, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(16)]

    sampling = SamplingConfig(n=2, max_new_tokens=24)  # long enough that the kill lands mid-generation
    pending = pool.submit(prompts, sampling=sampling)
    victim = pending.members[-1]
    ray.kill(victim.actor)  # it has accepted its share of the batch
    start = time.perf_counter()
    result = pool.collect(pending)
    f = result.failures[0]
    print(f"\nkilled {victim.name}: its {f.lost_samples} samples regenerated {f.regenerated_s:.1f}s and replacement "
          f"{f.replaced_by} serving {f.recovery_s:.1f}s after the death was noticed; batch of {len(result.samples)} "
          f"complete {time.perf_counter() - start:.1f}s after the kill; samples lost 0")

    assert [s.key for s in result.samples] == [(p, i) for p in range(16) for i in range(2)]  # each prompt n times, once
    assert {s.policy_version for s in result.samples} == {1}
    assert victim.name not in {s.actor_name for s in result.samples}
    [failure] = result.failures
    assert failure.name == victim.name and failure.step == pending.step and failure.node_id == victim.node_id
    assert failure.lost_samples == 2 * len(pending.requests[-1]) > 0
    assert failure.replaced_by in pool.actor_names and victim.name not in pool.actor_names
    assert pool.num_actors == 2 and pool.replacements == 1

    # The replacement holds the survivor's weights (version 1, not the checkpoint's) and serves them.
    new = next(m for m in pool.members if m.name == failure.replaced_by)
    survivor = next(m for m in pool.members if m.name != failure.replaced_by)
    assert ray.get(new.actor.version.remote()) == 1
    assert ray.get(new.actor.weight_checksums.remote()) == pytest.approx(ray.get(survivor.actor.weight_checksums.remote()))
    pool.step -= 1  # the same step again: per-prompt seeds make every sample the same, whoever serves it
    again = pool.generate(prompts, sampling=sampling)
    assert {s.actor_name for s in again.samples} == {new.name, survivor.name}
    assert {s.policy_version for s in again.samples} == {1}
    assert [s.response_ids for s in again.samples] == [s.response_ids for s in result.samples]
    assert sync.broadcast().version == 2  # it is in the weight-sync group; checksums verified on every actor

    # The replacement budget (rollout.max_replacements=1) is spent: the next death is a clear error.
    pending = pool.submit(prompts)
    ray.kill(pending.members[0].actor)
    with pytest.raises(ActorCallError, match=f"{pending.members[0].name} on node .* rollout.max_replacements=1"):
        pool.collect(pending)


# ---------------------------------------------------------------- scaling 1 -> 2 during a run


@pytest.mark.slow
def test_scale_rollout_pool_from_one_to_two_actors_during_a_run(tiny_model_dir: Path, tmp_path: Path, ray_cluster: None):
    cfg = run_cfg(tiny_model_dir, tmp_path, "scaled", "train.steps=3", "rollout.num_actors=1")
    run_dir = tmp_path / "scaled"
    # After step 0 is logged, an operator asks for 2 actors; the driver applies it before a later step.
    when(lambda: len(metric_rows(run_dir)) >= 1, lambda: cli.main(["scale", str(run_dir), "--rollout", "2"]))
    train_supervised(cfg, run_dir)

    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    actors = [sorted(k.removeprefix("rollout/tokens_per_s/") for k in r if k.startswith("rollout/tokens_per_s/"))
              for r in rows]
    assert rows[0]["rollout/num_actors"] == 1 and actors[0] == ["rollout-0"]
    assert rows[-1]["rollout/num_actors"] == 2 and actors[-1] == ["rollout-0", "rollout-1"]
    assert [r["rollout/policy_version"] for r in rows] == [0, 1, 2]  # the new actor served the current version
    before = [r["rollout/tokens_per_s"] for r, a in zip(rows, actors) if len(a) == 1]
    after = [r["rollout/tokens_per_s"] for r, a in zip(rows, actors) if len(a) == 2]
    per_actor = [{k.rsplit("/", 1)[1]: round(v) for k, v in r.items() if k.startswith("rollout/tokens_per_s/")} for r in rows]
    print(f"\nrollout tokens/s with 1 actor: {[round(x) for x in before]}; with 2 actors: {[round(x) for x in after]}; "
          f"per actor and step: {per_actor}")
    assert json.loads((run_dir / "control.json").read_text())["rollout"]["num_actors"] == 2


def test_scale_command_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert cli.main(["scale", str(tmp_path), "--rollout", "2"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("{}")
    assert cli.main(["scale", str(tmp_path), "--rollout", "0"]) == 2
    assert "--rollout 0" in capsys.readouterr().err
    assert not (tmp_path / "control.json").exists()


def test_control_file_round_trip_and_malformed_files_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    (tmp_path / "config.yaml").write_text("{}")
    write_scale_request(tmp_path, 3)
    request = read_scale_request(tmp_path)
    assert request is not None and request.num_actors == 3 and request.requested_at > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "control.json"]  # no temporary file left
    (tmp_path / "control.json").write_text('{"rollout": {"num_actors": "two"}}')
    assert read_scale_request(tmp_path) is None and "must be an integer" in caplog.text
    (tmp_path / "control.json").write_text('{"rollout": ')
    assert read_scale_request(tmp_path) is None


# ---------------------------------------------------------------- a learner rank dies


def learner_pids(started_after_ms: float) -> list[int]:
    """Processes of live LearnerWorker actors of this session's Ray started after the given time."""
    table = ray._private.state.actors()  # the GCS actor table; the state API would need the dashboard
    return [a["Pid"] for a in table.values() if a["ActorClassName"] == "LearnerWorker"
            and a["State"] == "ALIVE" and a["StartTime"] >= started_after_ms]


@pytest.mark.slow
def test_killed_learner_rank_resumes_from_the_last_checkpoint(tiny_model_dir: Path, tmp_path: Path, ray_cluster: None):
    cfg = run_cfg(tiny_model_dir, tmp_path, "learner-dies", "train.steps=3", "checkpoint.every=1",
                  "learner.num_ranks=2", "learner.micro_batch_size=2", "learner.call_timeout_s=120")
    run_dir = tmp_path / "learner-dies"
    started_ms = time.time() * 1000
    killed: list[int] = []

    def kill_rank() -> None:
        pid = max(learner_pids(started_ms))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    # Right after the step-1 checkpoint is complete, during step 1: SIGKILL one rank's process.
    when(lambda: (run_dir / "checkpoints" / "step_000001").is_dir(), kill_rank)
    metrics = train_supervised(cfg, run_dir)

    assert killed, "the learner rank was never killed"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"], e["resume_from_step"], e["restart"]) for e in events] == [
        ("learner_failure", 1, 1, 1)
    ]
    [rank] = events[0]["ranks"]
    assert rank in ("policy-learner-0", "policy-learner-1") and f"{rank} died" in events[0]["error"]
    assert [r["step"] for r in metric_rows(run_dir)] == [0, 1, 2]
    assert metrics["rollout/policy_version"] == 2
    assert (run_dir / "checkpoints" / "step_000003").is_dir()


def test_learner_failure_with_no_restart_left_names_rank_node_and_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The message a user sees when a learner node is lost and train.max_learner_restarts is spent (exit 1 in the
    CLI; the real loss of a node: test_multinode.py::test_learner_node_lost_mid_update_...)."""
    cfg = run_cfg(tiny_model_dir, tmp_path, "lost", "train.max_learner_restarts=0")
    run_dir = tmp_path / "lost"
    (run_dir / "checkpoints").mkdir(parents=True)
    lost = LearnerRankError("policy learner ppo_update failed: policy-learner-1 died (ActorDiedError: node died)",
                            ["policy-learner-1"], ["policy-learner-1"], {"policy-learner-1": "10.1.2.3"})

    def node_lost(*_: object, **__: object) -> None:
        raise lost

    monkeypatch.setattr(supervisor, "train", node_lost)
    with pytest.raises(RunFailedError) as failed:
        train_supervised(cfg, run_dir)
    assert str(failed.value).startswith(
        "learner rank policy-learner-1 on node 10.1.2.3 died at step 0 and train.max_learner_restarts=0 restarts "
        f"are used up; the last complete checkpoint is step 0 in {run_dir / 'checkpoints'}."
    )
    assert str(failed.value).endswith(f"Last error: {lost}")
    [event] = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert (event["ranks"], event["nodes"], event["restart"]) == (["policy-learner-1"], {"policy-learner-1": "10.1.2.3"}, 1)
