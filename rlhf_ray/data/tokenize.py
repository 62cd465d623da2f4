"""Token ids and padded batches for RL prompts, SFT and reward-model (preference) training.

Prompt and response are tokenized separately and concatenated, so the boundary between them —
the first token that carries SFT loss — is exact. Every response ends with the EOS token, so the
model learns to stop. Batches are right-padded to their longest row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from rlhf_ray.config import DatasetConfig
from rlhf_ray.data.load import DataError
from rlhf_ray.prompts import encode_prompt, example_rng, format_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize_prompts(
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DatasetConfig,
    max_prompt_tokens: int | None = None,
    pool: Sequence[dict[str, Any]] = (),
    seed: int = 0,
) -> list[list[int]]:
    """Format each raw row with `cfg.template` and tokenize it; a prompt over `max_prompt_tokens` raises."""
    out = []
    for i, row in enumerate(rows):
        text = format_prompt(row, cfg, tokenizer, pool, example_rng(seed, str(row.get(cfg.prompt_field, ""))))
        ids = encode_prompt(text, tokenizer)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            field = cfg.messages_field if row.get(cfg.messages_field) is not None else cfg.prompt_field
            raise DataError(
                f"row {i}: field '{field}': the formatted prompt has {len(ids)} tokens, over the "
                f"limit of {max_prompt_tokens} (fix: shorten it, or raise model.max_model_len)"
            )
        out.append(ids)
    return out


def encode_response(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a response followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token (fix: set eos_token in its tokenizer_config.json)")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def join(prompt: list[int], response: list[int], max_len: int, row: int) -> tuple[list[int], int]:
    """(prompt + response cut to max_len, the number of response tokens kept)."""
    if len(prompt) >= max_len:
        raise DataError(
            f"row {row}: field 'prompt': {len(prompt)} tokens leave no room for a response within "
            f"max_len={max_len} (fix: shorten the prompt or raise max_len)"
        )
    seq = (prompt + response)[:max_len]
    return seq, len(seq) - len(prompt)


def cut_responses(
    rows: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_len: int, fields: Sequence[str]
) -> list[int]:
    """Indices of the rows whose prompt + `fields` response (with EOS) is longer than max_len and would be cut."""
    cut = []
    for i, row in enumerate(rows):
        n_prompt = len(encode_prompt(row["prompt"], tokenizer))
        if any(n_prompt + len(encode_response(row[f], tokenizer)) > max_len for f in fields):
            cut.append(i)
    return cut


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, L], attention_mask [N, L]) right-padded to the longest sequence L."""
    if not seqs:
        raise DataError("cannot build a batch from zero rows")
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Padding is masked out everywhere, so EOS serves when a tokenizer has no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize_sft(
    rows: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> dict[str, torch.Tensor]:
    """SFT batch from rows {prompt: formatted text, response: text}.

    Returns input_ids, attention_mask, loss_mask, each [N, L] long, right-padded, L <= max_len.
    loss_mask is 1 exactly on the response tokens and its EOS. A response over max_len is cut.
    """
    seqs, masks = [], []
    for i, row in enumerate(rows):
        prompt = encode_prompt(row["prompt"], tokenizer)
        seq, n_response = join(prompt, encode_response(row["response"], tokenizer), max_len, i)
        seqs.append(seq)
        masks.append([0] * len(prompt) + [1] * n_response)
    input_ids, attention_mask = pad_right(seqs, pad_id(tokenizer))
    loss_mask, _ = pad_right(masks, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def tokenize_preferences(
    rows: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> dict[str, torch.Tensor]:
    """Reward-model batch from rows {prompt: formatted text, chosen: text, rejected: text}.

    Returns chosen_input_ids, chosen_attention_mask, rejected_input_ids, rejected_attention_mask,
    all [N, L] long, right-padded to one common L <= max_len (so both halves stack into one forward).
    """
    chosen, rejected = [], []
    for i, row in enumerate(rows):
        prompt = encode_prompt(row["prompt"], tokenizer)
        chosen.append(join(prompt, encode_response(row["chosen"], tokenizer), max_len, i)[0])
        rejected.append(join(prompt, encode_response(row["rejected"], tokenizer), max_len, i)[0])
    ids, mask = pad_right(chosen + rejected, pad_id(tokenizer))
    n = len(rows)
    return {
        "chosen_input_ids": ids[:n],
        "chosen_attention_mask": mask[:n],
        "rejected_input_ids": ids[n:],
        "rejected_attention_mask": mask[n:],
    }
