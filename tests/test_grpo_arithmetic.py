"""GRPO on a verifiable reward, end to end with real Ray, vLLM and DeepSpeed: SFT on tiny addition, then
GRPO scored by `rlhf_ray.rewards:exact_answer` raises the fraction of exact answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_ray.recipes.arithmetic import run_arithmetic
from rlhf_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grpo_raises_the_exact_answer_reward(tiny_model_dir: Path, tmp_path: Path, ray_cluster: None):
    cfg = load_config(ROOT / "configs" / "grpo-arithmetic.yaml", [
        f"model.policy_path={tiny_model_dir / 'policy'}", "tracking.backend=none",
        f"train.output_dir={tmp_path}",
    ])
    results = run_arithmetic(cfg, tmp_path / "arithmetic")
    before, after = results["reward_before_grpo"], results["reward_last_quarter"]
    assert 0.05 < before < 0.7, results["reward_per_step"]  # right some of the time: GRPO groups have a signal
    assert after > before + 0.08, results["reward_per_step"]
    assert max(results["kl_per_step"]) < 5.0
