"""`make demo`: InstructGPT in miniature on a CPU — pretrain → SFT → comparisons → reward model → PPO.

Everything is built here from nothing: a tokenizer and a tiny LM (`rlhf_ray.recipes.tiny`), a synthetic
language and a hidden preference rule (`rlhf_ray.recipes.synthetic`). Labelers compare pairs of the SFT
policy's answers under that rule with noise; the reward model learns from those labels only;
PPO then optimises the policy against the reward model with a KL penalty to the SFT policy.
At the end the hidden rule judges PPO against SFT on held-out prompts.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from transformers import AutoTokenizer

from rlhf_ray.config import DatasetConfig, RewardFunctionConfig, RunConfig
from rlhf_ray.driver.loop import train
from rlhf_ray.driver.evaluate import generate_texts
from rlhf_ray.prompts import encode_prompt, format_prompt
from rlhf_ray.ray_utils import init_ray
from rlhf_ray.driver.stages import run_pretrain, run_rm, run_sft, split_holdout
from rlhf_ray.recipes.synthetic import (
    THINGS,
    edited_answer,
    hidden_score,
    instruction_rows,
    label_pairs,
    pretraining_corpus,
    prompt_rows,
    win_rate,
)
from rlhf_ray.recipes.tiny import make_tiny
from rlhf_ray.tracking import Tracker

HIDDEN_RULE = "rlhf_ray.recipes.synthetic:hidden_rule"
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
SIZES = {  # the embedded default: finishes in minutes on 2 cores
    "hidden_size": 128, "num_layers": 2, "pretrain_rows": 3000, "sft_rows": 2000, "comparison_prompts": 2000,
    "edited_pairs": 3000, "label_noise_pct": 8, "ppo_prompts": 512, "eval_prompts": 200,
}
CHAT = DatasetConfig(template="chat")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(rows: list[dict], tokenizer: Any) -> list[dict]:
    """Rows with `prompt` replaced by its chat-formatted text (what the policy sees)."""
    return [dict(r, prompt=format_prompt(r, CHAT, tokenizer)) for r in rows]


class StageClock:
    """Prints a banner per demo stage and records its wall-clock seconds (`seconds[name]`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, title: str) -> Iterator[None]:
        print(f"\n=== {title} ===", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"({name}: {self.seconds[name]:.1f} s)", flush=True)


def edited_pairs(prompts: list[str], answers: list[str], k: int, seed: int) -> list[tuple[str, str, str]]:
    """Up to `k` (prompt, answer, one-edit variant of it) comparisons, from the first well-formed answers."""
    rng = random.Random(seed)
    out = []
    for prompt, answer in zip(prompts, answers):
        variant = edited_answer(answer, rng)
        if variant is not None and len(out) < k:
            out.append((prompt, answer, variant))
    return out


def run_demo(cfg: RunConfig, out: Path, sizes: dict[str, int]) -> dict[str, Any]:
    """Run the whole recipe under `out`; returns (and writes to out/demo_results.json) the headline figures."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.train.seed
    # SFT, comparisons and the reward model cover every subject; PPO never trains on these four, and the
    # win rate is measured on prompts about them. (A reward model that never saw them in a right answer
    # learns that naming them is wrong, and PPO learns to name another subject.)
    held_out_things = THINGS[-4:]
    seen_things = THINGS[:-4]
    tracker = Tracker(cfg.tracking.model_copy(update={"backend": "none"}), out / "stages", "stages", {})
    log = tracker.log
    stage = StageClock()

    with stage("build", "1/6 build a tokenizer and a tiny LM"):
        corpus = pretraining_corpus(sizes["pretrain_rows"], seed)
        models = make_tiny(out / "models", hidden_size=sizes["hidden_size"], num_layers=sizes["num_layers"],
                           num_heads=sizes["hidden_size"] // 64, num_kv_heads=1, vocab_size=512, seed=seed, corpus=corpus)
        tokenizer = AutoTokenizer.from_pretrained(models["policy"])
        init_ray(cfg.cluster)
        base_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"policy_path": str(models["policy"])})})

    with stage("pretrain", "2/6 pretrain on the synthetic corpus"):
        m = run_pretrain(base_cfg, corpus, tokenizer, out / "base", log)
        print(f"pretrain loss {m['train/sft_loss']:.3f} nats/token", flush=True)

    with stage("sft", "3/6 instruction finetuning (SFT)"):
        sft_rows = chat_rows(instruction_rows(sizes["sft_rows"], seed + 1), tokenizer)
        m = run_sft(base_cfg, sft_rows, tokenizer, str(out / "base"), out / "sft", log)
        print(f"SFT loss {m['train/sft_loss']:.3f} nats/token", flush=True)
        sft_path = str(out / "sft")

    with stage("compare", "4/6 labelers compare SFT answers, and answers with one edit (hidden rule + noise)"):
        cmp_prompts = chat_rows(prompt_rows(sizes["comparison_prompts"], seed + 2), tokenizer)
        cmp_ids = [encode_prompt(r["prompt"], tokenizer) for r in cmp_prompts]
        answers = generate_texts(cfg, sft_path, cmp_ids, tokenizer, n=2)
        texts = [r["prompt"] for r in cmp_prompts]
        pairs = [(p, answers[2 * i], answers[2 * i + 1]) for i, p in enumerate(texts)]
        noise = sizes["label_noise_pct"] / 100
        sampled = label_pairs(pairs, noise=noise, seed=seed + 3)
        edits = edited_pairs([p for p in texts for _ in range(2)], answers, sizes["edited_pairs"], seed + 6)
        edited = label_pairs(edits, noise=noise, seed=seed + 7)
        sampled_train, sampled_eval = split_holdout(sampled, cfg.rm.eval_fraction, seed)
        edited_train, edited_eval = split_holdout(edited, cfg.rm.eval_fraction, seed)
        rm_train = sampled_train + edited_train
        rm_eval = sampled_eval + edited_eval
        write_jsonl(out / "comparisons.jsonl", [dict(r, split=split, kind=kind) for kind, split, rows in [
            ("sampled", "train", sampled_train), ("edited", "train", edited_train),
            ("sampled", "held_out", sampled_eval), ("edited", "held_out", edited_eval)] for r in rows])
        print(f"{len(sampled)} labeled pairs of two samples, {len(edited)} of a sample and its edit "
              f"({len(rm_train)} train, {len(rm_eval)} held out)", flush=True)

    with stage("rm", "5/6 reward model on the labeled pairs"):
        m = run_rm(cfg, rm_train, rm_eval, tokenizer, sft_path, out / "rm", log,
                   eval_groups={"sampled": sampled_eval, "edited": edited_eval})
        rm_accuracy = m["eval/rm_accuracy"]
        print(f"reward model held-out accuracy {rm_accuracy:.3f} (pairs of two samples "
              f"{m['eval/rm_accuracy_sampled']:.3f}, sample vs edit {m['eval/rm_accuracy_edited']:.3f})", flush=True)

    with stage("ppo", "6/6 PPO against the reward model, KL penalty to the SFT policy"):
        ppo_prompts = write_jsonl(out / "ppo_prompts.jsonl", prompt_rows(sizes["ppo_prompts"], seed + 4, seen_things))
        ppo_cfg = cfg.model_copy(update={
            "model": cfg.model.model_copy(update={"policy_path": sft_path, "reward_path": str(out / "rm")}),
            "reward": cfg.reward.model_copy(update={"functions": [RewardFunctionConfig(path=HIDDEN_RULE, weight=0.0)]}),
            "data": cfg.data.model_copy(update={"prompts": cfg.data.prompts.model_copy(update={"path": str(ppo_prompts)})}),
        })
        tracker.finish()
        final = train(ppo_cfg, out / "ppo")

    with stage("eval", "held-out prompts: PPO policy vs SFT policy under the hidden rule"):
        eval_prompts = chat_rows(prompt_rows(sizes["eval_prompts"], seed + 5, held_out_things), tokenizer)
        eval_ids = [encode_prompt(r["prompt"], tokenizer) for r in eval_prompts]
        ppo_path = str(sorted((out / "ppo" / "checkpoints").glob("step_*"))[-1] / "policy")
        sft_answers = generate_texts(cfg, sft_path, eval_ids, tokenizer)
        ppo_answers = generate_texts(cfg, ppo_path, eval_ids, tokenizer)
        texts = [r["prompt"] for r in eval_prompts]
        write_jsonl(out / "eval_samples.jsonl", [
            {"prompt": p, "sft": s, "ppo": q, "sft_hidden": hidden_score(p, s), "ppo_hidden": hidden_score(p, q)}
            for p, s, q in zip(texts, sft_answers, ppo_answers)])
    kl = [json.loads(line)["kl/mean"] for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    results = {
        "reward_model_heldout_accuracy": rm_accuracy,
        "reward_model_heldout_accuracy_sampled_pairs": m["eval/rm_accuracy_sampled"],
        "reward_model_heldout_accuracy_edited_pairs": m["eval/rm_accuracy_edited"],
        "ppo_vs_sft_hidden_rule_win_rate": win_rate(texts, ppo_answers, sft_answers),
        "sft_hidden_score_mean": sum(map(hidden_score, texts, sft_answers)) / len(texts),
        "ppo_hidden_score_mean": sum(map(hidden_score, texts, ppo_answers)) / len(texts),
        "final_kl_to_sft_nats": final.get("kl/mean"),
        "mean_kl_to_sft_nats": sum(kl) / len(kl),
        "max_kl_to_sft_nats": max(kl),
        "kl_target_nats": cfg.algorithm.kl.target if cfg.algorithm.kl.adaptive else None,
        "final_kl_coef": final.get("kl/coef"),
        "held_out_prompts": len(eval_prompts),
        "examples": [{"prompt": p, "sft": s, "ppo": q} for p, s, q in zip(texts[:5], sft_answers, ppo_answers)],
        "stage_seconds": stage.seconds,
        "seconds": time.perf_counter() - start,
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    plot_ppo(out / "ppo" / "metrics.jsonl", out / "demo_ppo.png")
    return results


def plot_ppo(metrics_path: Path, png: Path) -> None:
    """Reward-model score, hidden-rule score and KL per PPO step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [r["step"] for r in rows]
    panels = [("reward/model_mean", "reward model score"), (f"reward/{HIDDEN_RULE}_mean", "hidden-rule score"),
              ("kl/mean", "KL to SFT (nats/seq)")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
