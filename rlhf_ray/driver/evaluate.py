"""`rlhf-ray eval`: generate from a checkpoint on held-out prompts under several templates and score them.

For a chat model (its tokenizer has a chat template) the default templates are `chat` (the row as the user
turn) and zero-shot, few-shot and CoT written inside the user turn of that chat template, since a chat model
prompted with bare text is prompted out of distribution; a model without one gets the bare-text templates.
Each template is scored on its own: one that fails (a bad pool, prompts over the context) is reported with
its error and the others keep their results. Every (template, prompt, response, reward) is written to
`eval_samples.jsonl` next to the results, and a few are printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
from transformers import AutoTokenizer

from actors import RewardActor, RolloutPool
from rlhf_ray.config import ConfigError, RunConfig
from rlhf_ray.data import DataError, load_dataset
from rlhf_ray.prompts import chat_prompt, encode_prompt
from rlhf_ray.ray_utils import get_with_timeout, init_ray
from rlhf_ray.sizing import resource_requests

TEXT_TEMPLATES = ("zero_shot", "few_shot", "cot")
ALL_TEMPLATES = ("chat", *TEXT_TEMPLATES)
SHOWN_SAMPLES = 2  # printed per template


def default_templates(tokenizer: Any) -> tuple[str, ...]:
    """`chat` and the text templates inside it for a chat model; the bare text templates otherwise."""
    return ALL_TEMPLATES if getattr(tokenizer, "chat_template", None) else TEXT_TEMPLATES


def parse_templates(spec: str) -> tuple[str, ...]:
    """'chat,cot' -> ('chat', 'cot'); an unknown name is a ConfigError naming it."""
    names = tuple(t.strip() for t in spec.split(",") if t.strip())
    unknown = [t for t in names if t not in ALL_TEMPLATES]
    if unknown or not names:
        raise ConfigError(f"--templates {spec!r}: unknown template(s) {unknown} (fix: a comma-separated list of "
                          f"{', '.join(ALL_TEMPLATES)})")
    return names


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
                rows: list[dict], tokenizer: Any) -> dict[str, list[float]]:
    """Each reward source's score per (prompt, response) pair: {source: [N] scores}; "scores" is the combined
    reward, "valid" 1.0 where it did not fail."""
    request = next(r for r in resource_requests(cfg) if r.name == "reward")
    handle = ray.remote(RewardActor).options(**request.ray_options()).remote(cfg.model, cfg.reward)
    try:
        seqs = [p + tokenizer(r, add_special_tokens=False)["input_ids"] for p, r in zip(prompt_ids, responses)]
        out = get_with_timeout([handle.score.remote(seqs, prompts, responses, rows)], ["reward"], "eval scoring",
                               cfg.reward.timeout_s * 10)[0]
    finally:
        ray.kill(handle)
    return {k: [float(x) for x in v.float().tolist()] for k, v in out.items()}


def eval_metrics(scores: dict[str, list[float]], response_lens: list[int]) -> dict[str, float]:
    """Over (prompt, response) pairs: eval/reward_mean (the combined reward), eval/<source>_mean of the
    reward model (`model`) and each rule function, eval/masked_rows, eval/response_len_mean (tokens) and
    eval/num_prompts."""
    n = max(len(response_lens), 1)
    metrics = {
        "eval/reward_mean": sum(scores["scores"]) / n,
        "eval/masked_rows": float(sum(1 for v in scores["valid"] if not v)),
        "eval/response_len_mean": sum(response_lens) / n,
        "eval/num_prompts": float(len(response_lens)),
    }
    return metrics | {f"eval/{k}_mean": sum(v) / n for k, v in scores.items() if k not in ("scores", "valid")}


def template_prompts(cfg: RunConfig, template: str, tokenizer: Any, chat_model: bool) -> tuple[Any, list[str], list[list[int]]]:
    """(dataset, prompt texts, prompt ids) of `data.eval` under `template`; on a chat model a text template's
    prompt becomes the user turn of the chat template. Prompts over the context are a DataError."""
    max_prompt = cfg.model.max_model_len - cfg.rollout.sampling.max_new_tokens
    data_cfg = cfg.data.eval.model_copy(update={"template": template})
    ds = load_dataset(data_cfg, "prompt", tokenizer, max_prompt, 1, cfg.data.seed)
    if template == "chat" or not chat_model:
        return ds, ds.prompts, ds.prompt_ids
    texts = [chat_prompt([{"role": "user", "content": p}], tokenizer, cfg.data.eval.system_prompt) for p in ds.prompts]
    ids = [encode_prompt(t, tokenizer) for t in texts]
    longest = max(len(i) for i in ids)
    if longest > max_prompt:
        raise DataError(f"{cfg.data.eval.path}: under {template} in the chat template a prompt has {longest} tokens, "
                        f"over the limit of {max_prompt} (fix: lower data.eval.few_shot_k, raise model.max_model_len "
                        "or lower rollout.sampling.max_new_tokens)")
    return ds, texts, ids


def evaluate(cfg: RunConfig, model_path: str, templates: tuple[str, ...] | None = None,
             samples_path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Score `model_path` on `data.eval` under each template; returns {template: metrics or {"error": why}}."""
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    chat_model = bool(getattr(tokenizer, "chat_template", None))
    templates = templates or default_templates(tokenizer)
    if "chat" in templates and not chat_model:
        raise ConfigError(f"template 'chat': the tokenizer of {model_path} has no chat template (fix: choose "
                          f"--templates {','.join(TEXT_TEMPLATES)})")
    init_ray(cfg.cluster)
    results: dict[str, dict[str, Any]] = {}
    samples: list[dict[str, Any]] = []
    pool = RolloutPool(cfg.model.model_copy(update={"policy_path": model_path}), cfg.rollout)  # one for all templates
    try:
        for template in templates:
            samples += _eval_template(cfg, template, tokenizer, chat_model, pool, results)
    finally:
        pool.shutdown()
    if samples_path is not None:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        samples_path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return results


def _eval_template(cfg: RunConfig, template: str, tokenizer: Any, chat_model: bool, pool: RolloutPool,
                   results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Score one template into `results[template]`; returns its samples."""
    try:
        ds, texts, ids = template_prompts(cfg, template, tokenizer, chat_model)
    except DataError as err:  # this template cannot be written for these rows; the others still run
        results[template] = {"error": str(err)}
        print(f"eval {template}: skipped: {err}", flush=True)
        return []
    result = pool.generate(ids, n=1)
    responses = tokenizer.batch_decode([x.response_ids for x in result.samples], skip_special_tokens=True)
    scores = score_texts(cfg, ids, texts, responses, ds.rows, tokenizer)
    results[template] = eval_metrics(scores, [len(x.response_ids) for x in result.samples])
    shown = "\n".join(f"  [{i}] {texts[i][-80:]!r} -> {responses[i][:120]!r} (reward {scores['scores'][i]:.3g})"
                      for i in range(min(SHOWN_SAMPLES, len(texts))))
    print(f"eval {template}: reward {results[template]['eval/reward_mean']:.4g} over {len(ds)} prompts\n{shown}",
          flush=True)
    return [{"template": template, "prompt": text, "response": response, **{k: v[i] for k, v in scores.items()}}
            for i, (text, response) in enumerate(zip(texts, responses))]


def eval_main(cfg: RunConfig, model_path: str, out: str | None, templates: str = "") -> None:
    """Print (and with `out`, write) the per-template results; samples go to eval_samples.jsonl beside them."""
    out_path = Path(out) if out else Path(cfg.train.output_dir) / (cfg.train.run_name or "eval") / "eval.json"
    samples_path = out_path.with_name("eval_samples.jsonl")
    try:
        results = evaluate(cfg, model_path or cfg.model.policy_path, parse_templates(templates) if templates else None,
                           samples_path)
    except DataError as err:
        raise ConfigError(str(err)) from None
    text = json.dumps(results, indent=2)
    print(text)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"results: {out_path}\nsamples: {samples_path}")
