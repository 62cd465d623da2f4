"""A real RL run (Ray, vLLM, DeepSpeed, W&B offline) under bad rewards and planted secrets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_ray.checkpoint import latest_complete
from rlhf_ray.config import load_config
from rlhf_ray.driver.loop import train
from rlhf_ray.recipes.synthetic import prompt_rows

WANDB_SECRET = "planted-wandb-key-h8-0123456789abcdef"
HUB_SECRET = "hf_plantedHubTokenH8abcdefghijkl"


@pytest.mark.slow
def test_nan_rewards_are_masked_and_no_secret_leaves_the_process(
    tiny_model_dir: Path, tmp_path: Path, ray_cluster: None, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """F9 + security: a rule reward returns NaN for half the rows (a function failing on every row is an
    error, tested in test_rewards.py); the secrets sit in the environment and in
    config fields that end up in prompts, the saved config and the W&B run."""
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("HF_TOKEN", HUB_SECRET)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(16, seed=0)))
    run_dir = tmp_path / "run"
    cfg = load_config(None, [
        f"model.policy_path={tiny_model_dir / 'policy'}", "model.max_model_len=256",
        "algorithm.name=grpo", "algorithm.kl.placement=loss", "algorithm.kl.estimator=k3",
        "reward.use_model=false", "reward.functions=[{path: 'reward_fns:nan_every_other_call'}]", "reward.retries=0",
        f"data.prompts.path={prompts}", f"data.prompts.system_prompt=Use key {WANDB_SECRET} or {HUB_SECRET}.",
        "rollout.kv_cache_space_gib=0.25", "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=8",
        "learner.micro_batch_size=8", "learner.minibatch_size=8", "learner.lr=1e-2",
        "train.steps=2", "train.prompts_per_step=4", f"train.output_dir={tmp_path}", "train.run_name=run",
        "tracking.backend=wandb", "tracking.mode=offline", f"tracking.project=p-{WANDB_SECRET}",
        "checkpoint.every=1", "cluster.num_cpus=8",
    ])
    train(cfg, run_dir)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:  # the NaN samples masked and counted; the update ran on finite advantages, nothing skipped
        assert r["reward/masked_rows"] == 4
        assert r["train/skipped_steps"] == 0 and r["train/consecutive_skips"] == 0
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith(("train/", "kl/")))
        assert r["rollout/logprob_diff_max"] < 1e-3  # measured inside the one on-policy update step
    latest = latest_complete(run_dir / "checkpoints")
    assert latest is not None and latest.name == "step_000002"
    shards = sorted((latest / "policy").rglob("*.safetensors"))
    assert shards
    for shard in shards:
        for name, tensor in load_file(shard).items():
            assert tensor.isfinite().all(), f"{shard.name}:{name}"

    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "no W&B offline run written"
    assert "Use key *** or ***." in (run_dir / "config.yaml").read_text()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert WANDB_SECRET.encode() not in data and HUB_SECRET.encode() not in data, path
    captured = capfd.readouterr()
    assert WANDB_SECRET not in captured.out + captured.err and HUB_SECRET not in captured.out + captured.err
