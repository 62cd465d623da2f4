"""The supervised stages of the recipe on the learner group: pretraining, SFT and reward-model training."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from learners import LearnerGroup
from rlhf_ray.config import RunConfig, SupervisedConfig
from rlhf_ray.data import tokenize_preferences, tokenize_sft
from rlhf_ray.data.tokenize import cut_responses, pad_id, pad_right
from rlhf_ray.progress import EpochProgress

log = logging.getLogger(__name__)
Logger = Callable[[dict[str, float], int], None]


def epoch_batches(num_rows: int, batch_size: int, epochs: int, seed: int) -> Iterator[list[int]]:
    """Row indices of every full batch of every epoch, reshuffled per epoch from (seed, epoch)."""
    for epoch in range(epochs):
        order = list(range(num_rows))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, num_rows - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def split_holdout(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out) rows; the held-out part is a seeded random `fraction` of them."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    k = int(len(rows) * fraction)
    return [rows[i] for i in order[k:]], [rows[i] for i in order[:k]]


def _stage_learner_cfg(cfg: RunConfig, stage: SupervisedConfig):
    micro = min(cfg.learner.micro_batch_size, stage.batch_size // cfg.learner.num_ranks)
    return cfg.learner.model_copy(update={"lr": stage.lr, "minibatch_size": stage.batch_size, "micro_batch_size": micro})


def _check_rows(stage: SupervisedConfig, n: int, what: str) -> None:
    if n < stage.batch_size:
        raise ValueError(f"{what}: {n} training rows, fewer than one batch of {what}.batch_size={stage.batch_size}")


def pretrain_batch(texts: list[str], tokenizer: Any, max_len: int) -> dict[str, torch.Tensor]:
    """Language-model batch: every real token after the first is predicted (loss_mask [N, L])."""
    seqs = []
    for i, t in enumerate(texts):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > max_len:
            raise ValueError(f"pretraining text {i} has {len(ids)} tokens, over max_len={max_len}")
        seqs.append(ids)
    input_ids, attention_mask = pad_right(seqs, pad_id(tokenizer))
    loss_mask = attention_mask.clone()
    loss_mask[:, 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def warn_cut_responses(rows: list[dict], tokenizer: Any, max_len: int, fields: tuple[str, ...], name: str) -> dict[str, float]:
    """Warn how many rows a too-small max_len will cut; returns {`<name>/cut_responses`: count} for the results."""
    cut = cut_responses(rows, tokenizer, max_len, fields)
    if cut:
        log.warning(
            "%s: %d of %d rows are longer than %s.max_len=%d and lose the end of their response (and its EOS), "
            "e.g. rows %s (fix: raise %s.max_len, or shorten those rows)",
            name, len(cut), len(rows), name, max_len, cut[:5], name,
        )
    return {f"{name}/cut_responses": float(len(cut))}


def run_lm_stage(
    cfg: RunConfig, stage: SupervisedConfig, start_path: str, out_path: Path,
    make_batch: Callable[[list[int]], dict[str, torch.Tensor]], num_rows: int, name: str, logger: Logger,
    eval_batch: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train the policy with `sft_step` on batches from `make_batch(row indices)`; save an HF folder.

    eval_batch: held-out rows, scored after training as eval/<name>_loss (nats per predicted token).
    """
    _check_rows(stage, num_rows, name)
    steps = stage.epochs * (num_rows // stage.batch_size)
    metrics: dict[str, float] = {}
    with LearnerGroup("policy", start_path, _stage_learner_cfg(cfg, stage), cfg.model, total_steps=steps) as group:
        progress = EpochProgress(name, stage.epochs, num_rows // stage.batch_size)
        for step, idx in enumerate(epoch_batches(num_rows, stage.batch_size, stage.epochs, cfg.train.seed)):
            metrics = group.sft_step(make_batch(idx))
            logger({f"{name}/{k.split('/')[-1]}": v for k, v in metrics.items()}, step)
            progress.step(step, metrics)
        if eval_batch is not None:
            metrics[f"eval/{name}_loss"] = group.sft_eval_loss(eval_batch)
            logger({f"eval/{name}_loss": metrics[f"eval/{name}_loss"]}, steps)
        group.save(str(out_path))
    print(f"model: {out_path}", flush=True)
    return metrics


def run_pretrain(cfg: RunConfig, texts: list[str], tokenizer: Any, out_path: Path, logger: Logger) -> dict[str, float]:
    """Next-token prediction on plain text (the base model of the recipe)."""
    return run_lm_stage(
        cfg, cfg.pretrain, cfg.model.policy_path, out_path,
        lambda idx: pretrain_batch([texts[i] for i in idx], tokenizer, cfg.pretrain.max_len), len(texts), "pretrain", logger,
    )


def run_sft(
    cfg: RunConfig, rows: list[dict], tokenizer: Any, start_path: str, out_path: Path, logger: Logger,
    eval_rows: list[dict] = (),
) -> dict[str, float]:
    """Instruction finetuning on {prompt (formatted), response} rows; loss on response tokens + EOS.

    eval_rows: held-out rows, scored after training as eval/sft_loss (nats per response token).
    """
    max_len = cfg.sft.max_len
    cut = warn_cut_responses(list(rows) + list(eval_rows), tokenizer, max_len, ("response",), "sft")
    eval_batch = tokenize_sft(eval_rows, tokenizer, max_len) if eval_rows else None
    return cut | run_lm_stage(
        cfg, cfg.sft, start_path, out_path,
        lambda idx: tokenize_sft([rows[i] for i in idx], tokenizer, max_len), len(rows), "sft", logger, eval_batch,
    )


def reward_accuracy(group: LearnerGroup, rows: list[dict], tokenizer: Any, max_len: int) -> float:
    """Fraction of preference rows whose chosen response the reward model scores higher."""
    batch = tokenize_preferences(rows, tokenizer, max_len)
    chosen = group.compute_rewards({"input_ids": batch["chosen_input_ids"], "attention_mask": batch["chosen_attention_mask"]})
    rejected = group.compute_rewards({"input_ids": batch["rejected_input_ids"], "attention_mask": batch["rejected_attention_mask"]})
    return float((chosen > rejected).float().mean())


def run_rm(
    cfg: RunConfig, train_rows: list[dict], eval_rows: list[dict], tokenizer: Any, start_path: str, out_path: Path,
    logger: Logger, eval_groups: dict[str, list[dict]] | None = None,
) -> dict[str, float]:
    """Bradley-Terry reward model on {prompt, chosen, rejected} rows; returns train metrics + eval/rm_accuracy.

    eval_groups: named subsets of held-out rows, each also scored as eval/rm_accuracy_<name>.
    """
    stage = cfg.rm
    _check_rows(stage, len(train_rows), "rm")
    cut = warn_cut_responses(train_rows + eval_rows, tokenizer, stage.max_len, ("chosen", "rejected"), "rm")
    steps = stage.epochs * (len(train_rows) // stage.batch_size)
    metrics: dict[str, float] = {}
    with LearnerGroup("reward", start_path, _stage_learner_cfg(cfg, stage), cfg.model, total_steps=steps) as group:
        progress = EpochProgress("rm", stage.epochs, len(train_rows) // stage.batch_size)
        for step, idx in enumerate(epoch_batches(len(train_rows), stage.batch_size, stage.epochs, cfg.train.seed)):
            metrics = group.rm_step(tokenize_preferences([train_rows[i] for i in idx], tokenizer, stage.max_len))
            logger({f"rm/{k.split('/')[-1]}": v for k, v in metrics.items()}, step)
            progress.step(step, metrics)
        if eval_rows:
            metrics["eval/rm_accuracy"] = reward_accuracy(group, eval_rows, tokenizer, stage.max_len)
            logger({"eval/rm_accuracy": metrics["eval/rm_accuracy"]}, steps)
        for name, rows in (eval_groups or {}).items():
            if rows:
                metrics[f"eval/rm_accuracy_{name}"] = reward_accuracy(group, rows, tokenizer, stage.max_len)
                logger({f"eval/rm_accuracy_{name}": metrics[f"eval/rm_accuracy_{name}"]}, steps)
        group.save(str(out_path))
    print(f"model: {out_path}", flush=True)
    return cut | metrics


# ---------------------------------------------------------------- `rlhf-ray sft` / `rlhf-ray rm`


def stage_main(cfg: RunConfig, kind: str, run_dir: Path) -> dict[str, float]:
    """One supervised stage from the CLI: `kind` is "sft" (data.sft) or "rm" (data.preferences).

    Starts from `model.policy_path` (for "rm", the scalar head is added on top of that LM) and writes
    under `run_dir`: config.yaml (resolved), metrics.jsonl (one line per optimizer step, plus
    eval/sft_loss or eval/rm_accuracy on the `<stage>.eval_fraction` held-out rows), checkpoint/ (an HF model folder with
    its tokenizer, loadable by transformers and vLLM) and results.json (the final metrics).
    """
    from transformers import AutoTokenizer

    from rlhf_ray.config import ConfigError, save_resolved
    from rlhf_ray.data import load_dataset
    from rlhf_ray.ray_utils import init_ray
    from rlhf_ray.driver.preflight import check_model_folder
    from rlhf_ray.tracking import Tracker

    check_model_folder(cfg.model.policy_path, "model.policy_path")
    data_cfg, stage = (cfg.data.sft, cfg.sft) if kind == "sft" else (cfg.data.preferences, cfg.rm)
    if not data_cfg.path:
        field = "data.sft.path" if kind == "sft" else "data.preferences.path"
        raise ConfigError(f"{field} is empty (fix: point it to a JSONL or Parquet file of training rows)")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy_path, trust_remote_code=cfg.model.trust_remote_code)
    ds = load_dataset(data_cfg, "sft" if kind == "sft" else "preference", tokenizer, stage.max_len - 1,
                      stage.batch_size, cfg.data.seed)
    init_ray(cfg.cluster)
    out = run_dir / "checkpoint"
    with Tracker(cfg.tracking, run_dir, cfg.train.run_name or run_dir.name, cfg.model_dump(mode="json")) as tracker:
        train_rows, eval_rows = split_holdout(ds.rows, stage.eval_fraction, cfg.train.seed)
        if kind == "sft":
            metrics = run_sft(cfg, train_rows, tokenizer, cfg.model.policy_path, out, tracker.log, eval_rows)
        else:
            metrics = run_rm(cfg, train_rows, eval_rows, tokenizer, cfg.model.policy_path, out, tracker.log)
    metrics = {**metrics, f"data/{kind}_rows": float(len(ds)), f"data/{kind}_skipped_rows": float(sum(ds.skipped.values()))}
    (run_dir / "results.json").write_text(json.dumps(metrics, indent=2))
    return metrics
