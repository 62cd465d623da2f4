"""GRPO on a verifiable reward: tiny single-digit addition, SFT first, then GRPO scored by `exact_answer`.

The critic-free path end to end (`rlhf-ray demo --task arithmetic configs/grpo-arithmetic.yaml`):
a short SFT on worked sums gives a policy that is right some of the time, so a group of samples
per prompt mixes right and wrong answers and the group-relative advantage has a signal; GRPO then
raises the fraction of exact answers. Data files are written to the run folder, so the same config
also drives `rlhf-ray sft` and `rlhf-ray train` by hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from rlhf_ray.config import ConfigError, RunConfig
from rlhf_ray.driver.loop import train
from rlhf_ray.prompts import format_prompt
from rlhf_ray.ray_utils import init_ray
from rlhf_ray.driver.stages import run_sft
from rlhf_ray.recipes.synthetic import arithmetic_rows, write_jsonl
from rlhf_ray.recipes.tiny import make_tiny
from rlhf_ray.tracking import Tracker

EXACT_ANSWER = "rlhf_ray.rewards:exact_answer"
ARITHMETIC_SIZES = {"sft_rows": 512, "prompts": 256}


def run_arithmetic(cfg: RunConfig, out: Path, sizes: dict[str, int] = ARITHMETIC_SIZES) -> dict[str, Any]:
    """SFT then GRPO on addition under `out`; returns (and writes to out/arithmetic_results.json) the
    exact-answer reward before GRPO (step 0 samples the SFT policy) and over the last quarter of steps.

    Starts from `model.policy_path`, or from a fresh tiny model when it is empty. The reward must be
    `exact_answer` alone: `cfg.reward` has to name it and leave the reward model off.
    """
    if cfg.reward.use_model or [f.path for f in cfg.reward.functions] != [EXACT_ANSWER]:
        raise ConfigError(f"the arithmetic task scores with reward.functions=[{EXACT_ANSWER}] and reward.use_model=false")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.train.seed
    policy = cfg.model.policy_path or str(make_tiny(out / "models", seed=seed, reward_model=False)["policy"])
    tokenizer = AutoTokenizer.from_pretrained(policy)
    init_ray(cfg.cluster)

    sft_data = write_jsonl(out / "sft.jsonl", [
        {"prompt": r["prompt"], "response": r["answer"]} for r in arithmetic_rows(sizes["sft_rows"], seed)])
    prompt_data = write_jsonl(out / "prompts.jsonl", arithmetic_rows(sizes["prompts"], seed + 1))
    sft_rows = [dict(r, prompt=format_prompt(r, cfg.data.sft, tokenizer))
                for r in map(json.loads, sft_data.read_text().splitlines())]
    with Tracker(cfg.tracking.model_copy(update={"backend": "none"}), out / "sft", "sft", {}) as tracker:
        sft = run_sft(cfg, sft_rows, tokenizer, policy, out / "sft", tracker.log)
    sft_seconds = time.perf_counter() - start

    grpo_cfg = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"policy_path": str(out / "sft")}),
        "data": cfg.data.model_copy(update={"prompts": cfg.data.prompts.model_copy(update={"path": str(prompt_data)})}),
    })
    train(grpo_cfg, out / "grpo")
    rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    k = max(1, len(rows) // 4)
    reward = [r["reward/mean"] for r in rows]
    results = {
        "sft_loss": sft["train/sft_loss"],
        "reward_before_grpo": reward[0],
        "reward_last_quarter": sum(reward[-k:]) / k,
        "reward_per_step": reward,
        "kl_per_step": [r["kl/mean"] for r in rows],
        "dynamic_sampling_rounds_per_step": [r.get("rollout/dynamic_sampling_rounds", 0.0) for r in rows],
        "sft_seconds": sft_seconds,
        "seconds": time.perf_counter() - start,
    }
    (out / "arithmetic_results.json").write_text(json.dumps(results, indent=2))
    return results
