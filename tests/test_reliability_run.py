"""A real RL run (Ray, vLLM, DeepSpeed, W&B offline) started from the CLI in a subprocess, under bad rewards
and planted secrets: nothing it leaves on disk (run folder, W&B files, Ray's session folder) holds a secret."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_ray.checkpoint import latest_complete
from rlhf_ray.recipes.synthetic import prompt_rows

WANDB_SECRET = "planted-wandb-key-h8-0123456789abcdef"
HUB_SECRET = "hf_plantedHubTokenH8abcdefghijkl"


@pytest.mark.slow
def test_nan_rewards_are_masked_and_no_secret_is_left_anywhere(tiny_model_dir: Path, tmp_path: Path) -> None:
    """F9 + security: a rule reward returns NaN for half the rows (a function failing on every row is an
    error, tested in test_rewards.py); the secrets sit in the environment, in a config field that ends
    up in prompts, and in an override on the command line (W&B used to keep the raw argv)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(16, seed=0)))
    run_dir = tmp_path / "run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, WANDB_API_KEY=WANDB_SECRET, HF_TOKEN=HUB_SECRET, RAY_TMPDIR=str(ray_tmp),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    argv = [
        f"model.policy_path={tiny_model_dir / 'policy'}", "model.max_model_len=256",
        "algorithm.name=grpo", "algorithm.kl.placement=loss", "algorithm.kl.estimator=k3",
        "reward.use_model=false", "reward.functions=[{path: 'reward_fns:nan_every_other_call'}]", "reward.retries=0",
        f"data.prompts.path={prompts}", f"data.prompts.system_prompt=Use key {WANDB_SECRET} or {HUB_SECRET}.",
        "rollout.kv_cache_space_gib=0.25", "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=8",
        "learner.micro_batch_size=8", "learner.minibatch_size=8", "learner.lr=1e-2",
        "train.steps=2", "train.prompts_per_step=4", f"train.output_dir={tmp_path}", "train.run_name=run",
        "tracking.backend=wandb", "tracking.mode=offline", f"tracking.project=p-{WANDB_SECRET}",
        "checkpoint.every=1", "cluster.num_cpus=8",
    ]
    try:
        proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", *argv], env=env, capture_output=True,
                              text=True, timeout=1500)
        assert proc.returncode == 0, proc.stderr[-3000:]

        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1]
        for r in rows:  # the NaN samples masked and counted; the update ran on finite advantages, nothing skipped
            assert r["reward/masked_rows"] == 4
            assert r["train/skipped_steps"] == 0 and r["train/consecutive_skips"] == 0
            assert all(math.isfinite(v) for k, v in r.items() if k.startswith(("train/", "kl/")))
            assert r["rollout/logprob_diff_max"] < 1e-3  # measured inside the one on-policy update step
        latest = latest_complete(run_dir / "checkpoints")
        assert latest is not None and latest.name == "step_000002"
        for shard in sorted((latest / "policy").rglob("*.safetensors")):
            for name, tensor in load_file(shard).items():
                assert tensor.isfinite().all(), f"{shard.name}:{name}"

        assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "no W&B offline run written"
        assert (run_dir / "wandb_run_id").is_file()
        assert "Use key *** or ***." in (run_dir / "config.yaml").read_text()
        assert "max_new_tokens: 8" in (run_dir / "config.yaml").read_text()  # an ordinary field, not hidden
        sessions = list(ray_tmp.glob("ray/session_*")) or list(ray_tmp.glob("session_*"))
        assert sessions, f"no Ray session folder under {ray_tmp}: {list(ray_tmp.iterdir())}"
        files = [p for root in (run_dir, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_socket()]
        assert len(files) > 30
        for path in files:
            data = path.read_bytes()
            assert WANDB_SECRET.encode() not in data and HUB_SECRET.encode() not in data, path
        assert WANDB_SECRET not in proc.stdout + proc.stderr and HUB_SECRET not in proc.stdout + proc.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
