"""Datasets for RLHF: load and validate (`load`), tokenize into batches (`tokenize`), sample prompts (`sampler`).

    ds = load_dataset(cfg.data.prompts, "prompt", tokenizer, max_prompt_tokens, min_rows=B, seed=cfg.data.seed)
    sampler = PromptSampler(ds, B, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    rows, prompt_ids = sampler.next_batch()
"""

from rlhf_ray.data.load import DataError, Dataset, Kind, load_dataset, read_records
from rlhf_ray.data.sampler import PromptSampler
from rlhf_ray.data.tokenize import tokenize_preferences, tokenize_prompts, tokenize_sft

__all__ = [
    "DataError",
    "Dataset",
    "Kind",
    "PromptSampler",
    "load_dataset",
    "read_records",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
]
