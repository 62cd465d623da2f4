"""The metric table (metric_table.METRICS, rendered in the README) against what the code really logs.

Names are collected from a short real PPO run (every RL stage: rollout, reward model and a rule function,
reference, policy and critic updates, broadcast), from the shared DAPO run (dynamic sampling, overlong
shaping; `dapo_run_metrics` in conftest.py), from the supervised stages (pretrain, SFT with held-out
rows, reward model with held-out groups) and from `rlhf-ray eval`'s scoring, each run for real on the tiny
model. Every name logged must have an entry, and every entry must be logged by one of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from rlhf_ray.config import load_config
from rlhf_ray.driver.evaluate import eval_metrics, score_texts
from rlhf_ray.driver.loop import train
from rlhf_ray.driver.stages import run_pretrain, run_rm, run_sft
from rlhf_ray.recipes.synthetic import instruction_rows, make_answer, prompt_rows, write_jsonl
from rlhf_ray.metric_table import METRICS, documented_entries, metrics_markdown, undocumented

ROOT = Path(__file__).resolve().parents[1]
BREVITY = "rlhf_ray.rewards:brevity"


def test_the_readme_shows_the_documented_table():
    assert metrics_markdown() in (ROOT / "README.md").read_text()


def test_placeholders_match_one_varying_part_only():
    assert undocumented(["rollout/tokens_per_s/rollout-3", "reward/my.module:fn_mean", "step", "time"]) == []
    assert undocumented(["reward/_mean", "rollout/tokens_per_s/", "train/made_up"]) == [
        "reward/_mean", "rollout/tokens_per_s/", "train/made_up"
    ]
    assert documented_entries(["eval/rm_accuracy_edited", "kl/mean"]) == {"eval/rm_accuracy_<kind>", "kl/mean"}


def _ppo_run(tiny_model_dir: Path, tmp: Path) -> set[str]:
    """Metric names of a 2-step PPO run with a reward model and a rule function."""
    prompts = write_jsonl(tmp / "prompts.jsonl", prompt_rows(16, seed=0))
    cfg = load_config(None, [
        f"model.policy_path={tiny_model_dir / 'policy'}", f"model.reward_path={tiny_model_dir / 'reward'}",
        "model.max_model_len=64", "algorithm.name=ppo",
        f"reward.functions=[{{path: '{BREVITY}'}}]", "reward.kv_cache_space_gib=0.25",
        f"data.prompts.path={prompts}", "rollout.kv_cache_space_gib=0.25", "rollout.sampling.n=2",
        "rollout.sampling.max_new_tokens=8", "learner.micro_batch_size=4", "learner.minibatch_size=8",
        "train.steps=2", "train.prompts_per_step=4", f"train.output_dir={tmp}", "train.run_name=ppo",
        "tracking.backend=none", "cluster.num_cpus=8",
    ])
    train(cfg, tmp / "ppo")
    rows = [json.loads(line) for line in (tmp / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return {name for row in rows for name in row}


def _stages(tiny_model_dir: Path, tmp: Path) -> set[str]:
    """Metric names the supervised stages log, and those of `rlhf-ray eval`'s scoring."""
    logged: set[str] = set()

    def logger(metrics: dict[str, float], step: int) -> None:
        logged.update(metrics)

    policy = str(tiny_model_dir / "policy")
    cfg = load_config(None, [
        f"model.policy_path={policy}", "model.max_model_len=64", "rollout.sampling.max_new_tokens=16", "cluster.num_cpus=8",
        *(f"{stage}.{k}" for stage in ("pretrain", "sft", "rm") for k in ("batch_size=4", "max_len=48")),
        "reward.use_model=false", f"reward.functions=[{{path: '{BREVITY}'}}]",
    ])
    tokenizer = AutoTokenizer.from_pretrained(policy)
    sft_rows = instruction_rows(6, seed=0)
    run_pretrain(cfg, [r["prompt"] + " " + r["response"] for r in sft_rows[:4]], tokenizer, tmp / "pretrain", logger)
    run_sft(cfg, sft_rows[:4], tokenizer, policy, tmp / "sft", logger, eval_rows=sft_rows[4:])
    pairs = [dict(r, chosen=r["response"], rejected=make_answer("river", ["cold"] * 3)) for r in sft_rows]
    run_rm(cfg, pairs[:4], pairs[4:], tokenizer, policy, tmp / "rm", logger, eval_groups={"edited": pairs[4:]})
    prompt_ids = [tokenizer(r["prompt"])["input_ids"] for r in sft_rows[:2]]
    scores = score_texts(cfg, prompt_ids, [r["prompt"] for r in sft_rows[:2]], [r["response"] for r in sft_rows[:2]],
                         sft_rows[:2], tokenizer)
    logged |= eval_metrics(scores, [len(tokenizer(r["response"])["input_ids"]) for r in sft_rows[:2]]).keys()
    return logged


def test_every_logged_metric_is_documented_and_every_documented_one_is_logged(
    tiny_model_dir: Path, tmp_path: Path, ray_cluster: None, dapo_run_metrics: list[dict]
):
    ppo = _ppo_run(tiny_model_dir, tmp_path) | {name for row in dapo_run_metrics for name in row}
    assert {"train/value_loss", "train/critic_grad_norm", f"reward/{BREVITY}_mean", "reward/model_mean"} <= ppo
    stages = _stages(tiny_model_dir, tmp_path)
    logged = ppo | stages
    assert undocumented(logged) == [], "logged but missing from metric_table.METRICS (and the README table)"
    assert sorted(METRICS.keys() - documented_entries(logged)) == [], "documented but logged by no stage"
