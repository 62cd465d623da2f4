"""Checks on a row's text before it is formatted and tokenised: length, and the tokenizer's special tokens.

Length first, in characters, so a 50 MB line is refused before the tokenizer sees it (tokenising it
would take minutes and gigabytes). Then special tokens: a chat template writes control tokens such as
`<|im_start|>` and `<|im_end|>` around each turn, and the tokenizer turns their text into the control
ids wherever it appears. Data text holding that text would forge turns (a "user" prompt that closes
its turn and writes an assistant answer). `special_tokens: refuse` (the default) makes such a row a bad
row; `escape` puts a zero-width space (U+200B) after the token's first character, so it is tokenised
as the plain characters it shows.
"""

from __future__ import annotations

from typing import Any

from rlhf_ray.config import DatasetConfig
from rlhf_ray.prompts import RowError

ZERO_WIDTH_SPACE = "\u200b"


def special_token_strings(tokenizer: Any) -> list[str]:
    """The texts the tokenizer reads as one control token: its special tokens and special added tokens."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    return sorted((t for t in found if t), key=len, reverse=True)


def escape_special(text: str, specials: list[str]) -> str:
    """`text` with each special token's text broken by a zero-width space (tokenised as plain text)."""
    for token in specials:
        if token in text:
            text = text.replace(token, token[0] + ZERO_WIDTH_SPACE + token[1:])
    return text


def _text_fields(cfg: DatasetConfig) -> tuple[str, ...]:
    return (cfg.prompt_field, cfg.response_field, cfg.chosen_field, cfg.rejected_field)


def guard_row_text(row: dict[str, Any], cfg: DatasetConfig, specials: list[str]) -> dict[str, Any]:
    """The row with its text checked (and escaped, under `special_tokens: escape`); raises RowError.

    Checked: the prompt, response, chosen and rejected fields and each chat message's content.
    """
    out = dict(row)
    for name in _text_fields(cfg):
        if isinstance(out.get(name), str):
            out[name] = _guard(out[name], name, cfg, specials)
    messages = out.get(cfg.messages_field)
    if isinstance(messages, list):
        guarded = []
        for i, message in enumerate(messages):
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message = dict(message, content=_guard(message["content"], f"{cfg.messages_field}[{i}].content",
                                                         cfg, specials))
            guarded.append(message)
        out[cfg.messages_field] = guarded
    return out


def _guard(text: str, field: str, cfg: DatasetConfig, specials: list[str]) -> str:
    if len(text) > cfg.max_chars:
        raise RowError(field, f"{len(text)} characters, over max_chars={cfg.max_chars} (checked before tokenising)",
                       "shorten it, or raise max_chars of this dataset", "text_too_long")
    hits = [t for t in specials if t in text]
    if not hits:
        return text
    hit = min(hits, key=text.find)  # the first in the text
    if cfg.special_tokens == "escape":
        return escape_special(text, specials)
    raise RowError(field, f"holds the text of the special token {hit!r}, which the tokenizer would read as a control "
                   "token (a data row could forge chat turns)",
                   "remove it, or set special_tokens: escape to tokenise it as plain text", "special_token")
