"""Prompt templates: turn one dataset row into the text the policy is asked to continue.

Each dataset picks its template (`DatasetConfig.template`):

    chat       the tokenizer's chat template over the row's messages (or its prompt as one user
               turn), an optional system prompt first, ending with the assistant generation prompt
    plain      the prompt text as is
    zero_shot  "Question: {q}\\nAnswer:"
    few_shot   k solved examples from a pool, then the question in the zero_shot form
    cot        like few_shot, but every answer starts with "Let's think step by step."; pool rows
               with a `rationale` field show it before their answer (k=0 is zero-shot CoT)

Everything here is a pure function of its arguments; the few-shot draw depends only on the `rng`
passed in, so `example_rng(seed, question)` makes a prompt a function of (seed, row).
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from rlhf_ray.config import DatasetConfig

ROLES = ("system", "user", "assistant")
COT_CUE = "Let's think step by step."


class RowError(ValueError):
    """One row that cannot be used; names the field, what is wrong and the fix.

    `reason` is a short key (e.g. "unknown_role") under which skipped rows are counted.
    """

    def __init__(self, field: str, message: str, fix: str, reason: str) -> None:
        self.field, self.message, self.fix, self.reason = field, message, fix, reason
        where = f"field '{field}': " if field else ""
        super().__init__(f"{where}{message} (fix: {fix})")


class TemplateError(ValueError):
    """A template that cannot work with this tokenizer or config, whatever the rows hold."""


def check_template(cfg: DatasetConfig, tokenizer: Any) -> None:
    """Fail before reading any row if `cfg.template` cannot be applied with `tokenizer`."""
    if cfg.template == "chat" and getattr(tokenizer, "chat_template", None) is None:
        what = "no tokenizer was given" if tokenizer is None else f"this {type(tokenizer).__name__} has none"
        raise TemplateError(
            f"template 'chat' needs a tokenizer with a chat template, and {what} "
            "(fix: set `template: plain` (or zero_shot/few_shot/cot) for this dataset, or set "
            "`chat_template` in the tokenizer's tokenizer_config.json)"
        )


def check_messages(messages: Any, field: str, last_role: str | None = None) -> list[dict[str, str]]:
    """Validate chat turns [{role, content}]; returns them unchanged or raises `RowError`.

    `last_role` ("user" for prompts, "assistant" for SFT targets) is the role the final turn must have.
    """
    if not isinstance(messages, list):
        raise RowError(field, f"expected a list of {{role, content}}, got {type(messages).__name__}",
                       "write the chat as a JSON list of {\"role\": ..., \"content\": ...}", "wrong_type")
    if not messages:
        raise RowError(field, "empty list of messages", "give at least one user message", "empty_text")
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f"expected an object {{role, content}}, got {type(m).__name__}",
                           "write each message as {\"role\": ..., \"content\": ...}", "wrong_type")
        for key in ("role", "content"):
            if key not in m:
                raise RowError(f"{where}.{key}", "missing", f"give every message a '{key}'", "missing_field")
            if not isinstance(m[key], str):
                raise RowError(f"{where}.{key}", f"expected a string, got {type(m[key]).__name__}",
                               f"make '{key}' a string", "wrong_type")
        if m["role"] not in ROLES:
            raise RowError(f"{where}.role", f"unknown role {m['role']!r}", f"use one of {', '.join(ROLES)}",
                           "unknown_role")
        if m["role"] != "system" and not m["content"].strip():
            raise RowError(f"{where}.content", "empty or whitespace-only", "remove the turn or give it text",
                           "empty_text")
    if last_role is not None and messages[-1]["role"] != last_role:
        raise RowError(f"{field}[{len(messages) - 1}].role",
                       f"the last message is from {messages[-1]['role']!r}, expected {last_role!r}",
                       f"end the conversation with the {last_role} turn", "bad_messages")
    return messages


def chat_prompt(messages: list[dict[str, str]], tokenizer: Any, system_prompt: str = "") -> str:
    """The tokenizer's chat template over `messages`, ending with the assistant generation prompt."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def zero_shot(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def solved_example(example: dict[str, Any], cfg: DatasetConfig, cot: bool) -> str:
    """One pool row written out with its answer (and its rationale under CoT)."""
    answer = str(example[cfg.answer_field]).strip()
    rationale = example.get("rationale")
    if cot and isinstance(rationale, str) and rationale.strip():
        return f"{zero_shot(example[cfg.prompt_field])} {COT_CUE} {rationale.strip()} The answer is {answer}."
    return f"{zero_shot(example[cfg.prompt_field])} {answer}"


def draw_examples(
    question: str, pool: Sequence[dict[str, Any]], k: int, cfg: DatasetConfig, rng: random.Random
) -> list[dict[str, Any]]:
    """k pool rows drawn with `rng`, never the question itself."""
    if k == 0:
        return []
    eligible = [p for p in pool if str(p[cfg.prompt_field]).strip() != question.strip()]
    if len(eligible) < k:
        raise RowError(cfg.prompt_field,
                       f"few_shot_k={k} but the pool has only {len(eligible)} other solved examples",
                       "lower few_shot_k or add rows with an answer to few_shot_path", "small_pool")
    return rng.sample(eligible, k)


def few_shot(question: str, examples: list[dict[str, Any]], cfg: DatasetConfig, cot: bool) -> str:
    shots = [solved_example(e, cfg, cot) for e in examples]
    ask = f"{zero_shot(question)} {COT_CUE}" if cot else zero_shot(question)
    return "\n\n".join([*shots, ask])


def example_rng(seed: int, question: str) -> random.Random:
    """The rng of one question's few-shot draw: a function of (seed, question), not of call order."""
    # str seeds are hashed with SHA-512, so the draw is the same in every process.
    return random.Random(f"{seed}\n{question}")


def format_prompt(
    row: dict[str, Any],
    cfg: DatasetConfig,
    tokenizer: Any = None,
    pool: Sequence[dict[str, Any]] = (),
    rng: random.Random | None = None,
) -> str:
    """The prompt text of one row under `cfg.template`.

    A row holds either `cfg.messages_field` (chat turns, ending with the user's) or
    `cfg.prompt_field` (text). Raises `RowError` for a row that cannot be formatted and
    `TemplateError` for a template the tokenizer cannot serve.
    """
    if row.get(cfg.messages_field) is not None:
        messages = check_messages(row[cfg.messages_field], cfg.messages_field, last_role="user")
        if cfg.template != "chat":
            raise RowError(cfg.messages_field, f"chat messages cannot be written with template {cfg.template!r}",
                           f"set `template: chat`, or give the row a '{cfg.prompt_field}' text instead",
                           "wrong_type")
    else:
        question = row.get(cfg.prompt_field)
        if not isinstance(question, str):
            raise RowError(cfg.prompt_field, f"expected a string, got {type(question).__name__}",
                           f"make '{cfg.prompt_field}' a string", "wrong_type")
        messages = [{"role": "user", "content": question}]

    if cfg.template == "chat":
        check_template(cfg, tokenizer)
        return chat_prompt(messages, tokenizer, cfg.system_prompt)
    if cfg.template == "plain":
        return question
    if cfg.template == "zero_shot":
        return zero_shot(question)
    cot = cfg.template == "cot"
    examples = draw_examples(question, pool, cfg.few_shot_k, cfg, rng or example_rng(0, question))
    return few_shot(question, examples, cfg, cot)


def encode_prompt(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a formatted prompt, with the tokenizer's special tokens (e.g. BOS) added once."""
    # A chat template may already have written BOS; adding it again would give the model two.
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
