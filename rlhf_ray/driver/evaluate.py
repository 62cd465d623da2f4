"""`rlhf-ray eval`: generate from a checkpoint on held-out prompts under several templates and score them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
from transformers import AutoTokenizer

from actors import RewardActor, RolloutPool
from rlhf_ray.config import RunConfig
from rlhf_ray.data import load_dataset
from rlhf_ray.ray_utils import get_with_timeout, init_ray
from rlhf_ray.sizing import resource_requests

TEMPLATES = ("zero_shot", "few_shot", "cot")


def generate_texts(cfg: RunConfig, model_path: str, prompt_ids: list[list[int]], tokenizer: Any, n: int = 1) -> list[str]:
    """Responses (decoded, special tokens dropped) of `model_path` for each prompt, n per prompt, in order."""
    model_cfg = cfg.model.model_copy(update={"policy_path": model_path})
    pool = RolloutPool(model_cfg, cfg.rollout)
    try:
        result = pool.generate(prompt_ids, n=n)
    finally:
        pool.shutdown()
    return tokenizer.batch_decode([s.response_ids for s in result.samples], skip_special_tokens=True)


def score_texts(cfg: RunConfig, prompt_ids: list[list[int]], prompts: list[str], responses: list[str],
                rows: list[dict], tokenizer: Any) -> dict[str, float]:
    """Over (prompt, response) pairs: eval/reward_mean (the combined reward), eval/<source>_mean of the
    reward model (`model`) and each rule function, eval/masked_rows and eval/response_len_mean (tokens)."""
    request = next(r for r in resource_requests(cfg) if r.name == "reward")
    handle = ray.remote(RewardActor).options(**request.ray_options()).remote(cfg.model, cfg.reward)
    try:
        response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
        seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
        out = get_with_timeout([handle.score.remote(seqs, prompts, responses, rows)], ["reward"], "eval scoring",
                               cfg.reward.timeout_s * 10)[0]
    finally:
        ray.kill(handle)
    metrics = {
        "eval/reward_mean": float(out.pop("scores").mean()),
        "eval/masked_rows": float((~out.pop("valid")).sum()),
        "eval/response_len_mean": sum(map(len, response_ids)) / max(len(response_ids), 1),
        "eval/num_prompts": float(len(prompts)),
    }
    return metrics | {f"eval/{k}_mean": float(v.float().mean()) for k, v in out.items()}


def evaluate(cfg: RunConfig, model_path: str, templates: tuple[str, ...] = TEMPLATES) -> dict[str, dict[str, float]]:
    """Score `model_path` on `data.eval` under each template; returns {template: metrics}."""
    init_ray(cfg.cluster)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    max_prompt = cfg.model.max_model_len - cfg.rollout.sampling.max_new_tokens
    results: dict[str, dict[str, float]] = {}
    for template in templates:
        data_cfg = cfg.data.eval.model_copy(update={"template": template})
        ds = load_dataset(data_cfg, "prompt", tokenizer, max_prompt, 1, cfg.data.seed)
        responses = generate_texts(cfg, model_path, ds.prompt_ids, tokenizer)
        results[template] = score_texts(cfg, ds.prompt_ids, ds.prompts, responses, ds.rows, tokenizer)
    return results


def eval_main(cfg: RunConfig, model_path: str, out: str | None) -> None:
    results = evaluate(cfg, model_path or cfg.model.policy_path)
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text)
