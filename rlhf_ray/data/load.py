"""Load and validate a dataset file: every row checked once, at load time, before any training.

Sources (`sources.read_records`): a `.jsonl` or `.parquet` file, a `datasets` `save_to_disk` folder,
or a hub dataset name with its subset and split. Three kinds of dataset:

    prompt      RL and eval prompts: `prompt` text or `messages` ending with a user turn; every
                other field (e.g. `answer`) is kept, since reward functions receive the whole row
    sft         `prompt` + `response`, or `messages` ending with an assistant turn
    preference  `prompt` (or `messages`) + `chosen` + `rejected`

A bad row raises `DataError("file:line: field 'x': what (fix: how)")` under `on_error: error`, or
is skipped and counted by reason under `on_error: skip`. A file where every row is bad, or where
too many are skipped, or with fewer rows than one batch, is always an error.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from rlhf_ray.config import DatasetConfig
from rlhf_ray.data.sources import DataError, read_records
from rlhf_ray.data.text_guard import guard_row_text, special_token_strings
from rlhf_ray.prompts import (
    RowError,
    TemplateError,
    check_messages,
    check_template,
    encode_prompt,
    example_rng,
    format_prompt,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Kind = Literal["prompt", "sft", "preference"]


@dataclass
class Dataset:
    """The valid rows of one source, with their formatted and tokenized prompts.

    rows: for `prompt`, each row as loaded (all fields, for reward functions); for `sft`,
    {prompt, response}; for `preference`, {prompt, chosen, rejected} — `prompt` there is already
    formatted by the template. `prompts[i]` is row i's formatted prompt, `prompt_ids[i]` its tokens.
    """

    source: str
    kind: Kind
    rows: list[dict[str, Any]]
    prompts: list[str]
    prompt_ids: list[list[int]]
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows skipped

    def __len__(self) -> int:
        return len(self.rows)


# ---------------------------------------------------------------- row checks


def check_strings(value: Any, where: str) -> None:
    """Every string in a row, however nested, must be NUL-free valid UTF-8 (no lone surrogates)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise RowError(where, "contains a NUL character", "remove the NUL characters", "nul_byte")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RowError(where, "invalid UTF-8 (a lone surrogate escape such as \\ud800)",
                           "re-encode the text as valid UTF-8", "invalid_utf8") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_strings(v, f"{where}[{i}]")


def check_text(row: dict[str, Any], name: str, fix_missing: str = "") -> str:
    """row[name] as a non-empty string, or a `RowError` naming the field."""
    if name not in row or row[name] is None:
        raise RowError(name, "missing", fix_missing or f"give every row a '{name}' string", "missing_field")
    value = row[name]
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__} {value!r:.40}",
                       f"make '{name}' a string", "wrong_type")
    if not value.strip():
        raise RowError(name, "empty or whitespace-only", f"give '{name}' some text or remove the row", "empty_text")
    return value


def check_answer(row: dict[str, Any], cfg: DatasetConfig, required: bool) -> None:
    """The ground truth, if present (or required), is a non-empty string or a number."""
    value = row.get(cfg.answer_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError(cfg.answer_field, "missing ground truth, which the rule reward needs",
                           f"give every row an '{cfg.answer_field}', or set require_answer: false",
                           "missing_answer")
        return
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(cfg.answer_field, f"expected a string or number, got {type(value).__name__}",
                       f"make '{cfg.answer_field}' a string or number", "wrong_type")


def check_prompt(row: dict[str, Any], cfg: DatasetConfig) -> None:
    """A row's prompt is its messages (ending with a user turn) or, without messages, its text."""
    if row.get(cfg.messages_field) is not None:
        check_messages(row[cfg.messages_field], cfg.messages_field, last_role="user")
    else:
        check_text(row, cfg.prompt_field, f"give every row a '{cfg.prompt_field}' string or a "
                                          f"'{cfg.messages_field}' list")


def check_solved(row: dict[str, Any], cfg: DatasetConfig) -> None:
    """A few-shot example: a prompt text and its answer."""
    check_strings(row, "")
    check_text(row, cfg.prompt_field)
    check_answer(row, cfg, required=True)


def split_sft(row: dict[str, Any], cfg: DatasetConfig) -> tuple[dict[str, Any], str]:
    """(prompt part, response text) of an SFT row."""
    if row.get(cfg.messages_field) is not None:
        messages = check_messages(row[cfg.messages_field], cfg.messages_field, last_role="assistant")
        if len(messages) < 2:
            raise RowError(cfg.messages_field, "only an assistant turn, no prompt",
                           "put a user turn before the assistant's", "bad_messages")
        check_messages(messages[:-1], cfg.messages_field, last_role="user")
        return {cfg.messages_field: messages[:-1]}, messages[-1]["content"]
    check_prompt(row, cfg)
    return row, check_text(row, cfg.response_field)


def validate_row(row: dict[str, Any], kind: Kind, cfg: DatasetConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """Check one row of `kind`; returns (the part that becomes the prompt, the target texts).

    Targets are {} for prompt rows, {response} for SFT rows and {chosen, rejected} for preference rows.
    """
    check_strings(row, "")
    if kind == "prompt":
        check_answer(row, cfg, cfg.require_answer)
        check_prompt(row, cfg)
        return row, {}
    if kind == "sft":
        source, response = split_sft(row, cfg)
        return source, {"response": response}
    chosen, rejected = check_text(row, cfg.chosen_field), check_text(row, cfg.rejected_field)
    if chosen.strip() == rejected.strip():
        raise RowError(cfg.rejected_field, f"equal to '{cfg.chosen_field}', so the pair carries no preference",
                       "remove the row or give it a different rejected response", "chosen_equals_rejected")
    check_prompt(row, cfg)
    return row, {"chosen": chosen, "rejected": rejected}


# ---------------------------------------------------------------- loading


def load_pool(cfg: DatasetConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Solved examples for few-shot templates: `few_shot_path` if set (every row must be valid),
    else the dataset's own rows that carry a prompt text and an answer."""
    if cfg.template not in ("few_shot", "cot") or cfg.few_shot_k == 0:
        return []
    if not cfg.few_shot_path:
        return [r for r in rows if _is_solved(r, cfg)]
    pool = []
    for where, row in read_records(cfg.few_shot_path, cfg.split, cfg.subset):
        try:
            if isinstance(row, RowError):
                raise row
            check_solved(row, cfg)
        except RowError as err:
            raise DataError(f"{where}: {err}") from None
        pool.append(row)
    return pool


def _is_solved(row: dict[str, Any], cfg: DatasetConfig) -> bool:
    try:
        check_solved(row, cfg)
    except RowError:
        return False
    return True


def load_dataset(
    cfg: DatasetConfig,
    kind: Kind,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int | None = None,
    min_rows: int = 1,
    seed: int = 0,
) -> Dataset:
    """Read, validate, format and tokenize every row of `cfg.path`.

    max_prompt_tokens: a formatted prompt of more tokens is a bad row (exactly this many is kept);
    None disables the check. min_rows: fewer valid rows is an error (pass the batch size).
    seed: seeds each question's few-shot draw (see `prompts.example_rng`).
    """
    try:
        check_template(cfg, tokenizer)
    except TemplateError as err:
        raise DataError(f"{cfg.path}: {err}") from None
    records = list(read_records(cfg.path, cfg.split, cfg.subset))
    if not records:
        raise DataError(f"{cfg.path}: no rows (fix: point `path` to a file with at least {min_rows} rows)")
    pool = load_pool(cfg, [r for _, r in records if isinstance(r, dict)])

    specials = special_token_strings(tokenizer)
    rows, prompts, prompt_ids = [], [], []
    skipped: Counter[str] = Counter()
    first_error = ""
    for where, row in records:
        try:
            if isinstance(row, RowError):
                raise row
            if isinstance(row, dict):  # length and special tokens, before any tokenising
                row = guard_row_text(row, cfg, specials)
            source, targets = validate_row(row, kind, cfg)
            question = str(source.get(cfg.prompt_field, ""))
            text = format_prompt(source, cfg, tokenizer, pool, example_rng(seed, question))
            ids = encode_prompt(text, tokenizer)
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                raise RowError(cfg.messages_field if row.get(cfg.messages_field) is not None else cfg.prompt_field,
                               f"the formatted prompt has {len(ids)} tokens, over the limit of {max_prompt_tokens}",
                               "shorten the prompt, or raise model.max_model_len / lower max_new_tokens",
                               "prompt_too_long")
        except RowError as err:
            if cfg.on_error == "error":
                raise DataError(f"{where}: {err}") from None
            skipped[err.reason] += 1
            first_error = first_error or f"{where}: {err}"
            continue
        rows.append(row if kind == "prompt" else {"prompt": text, **targets})
        prompts.append(text)
        prompt_ids.append(ids)

    total = len(records)
    counts = ", ".join(f"{reason}={n}" for reason, n in skipped.most_common())
    if not rows:
        raise DataError(f"{cfg.path}: every one of its {total} rows is bad ({counts}); first: {first_error}")
    # Division, not fraction × total: 29/100 rounds to the same float as 0.29, 0.29 × 100 does not.
    if sum(skipped.values()) / total > cfg.max_skip_fraction:
        raise DataError(
            f"{cfg.path}: skipped {sum(skipped.values())} of {total} rows ({counts}), more than "
            f"max_skip_fraction={cfg.max_skip_fraction}; first: {first_error} "
            "(fix: repair the rows, or raise max_skip_fraction)"
        )
    if len(rows) < min_rows:
        raise DataError(
            f"{cfg.path}: {len(rows)} valid rows, fewer than one batch of {min_rows} "
            "(fix: add rows or lower the batch size, e.g. train.prompts_per_step)"
        )
    if skipped:
        log.warning("%s: skipped %d of %d rows (%s)", cfg.path, sum(skipped.values()), total, counts)
    return Dataset(cfg.path, kind, rows, prompts, prompt_ids, skipped)
