"""Rule-based reward functions: loading by dotted path, calling with guards, combining with model scores.

A reward function has the signature `fn(prompt: str, response: str, row: dict) -> float` and
is named in the config as `package.module:function`. Nothing else is ever imported.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RewardFn = Callable[[str, str, dict], float]
_PATH_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class RewardFunctionError(RuntimeError):
    """A reward function is misnamed, or raised/returned garbage; the message names it and the row."""


def load_reward_fn(path: str) -> RewardFn:
    """Import `package.module:function`; errors name the path and what is wrong."""
    if not _PATH_RE.match(path):
        raise RewardFunctionError(
            f"reward function {path!r} is not a dotted path of the form 'package.module:function'"
        )
    module_name, fn_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardFunctionError(f"reward function {path!r}: cannot import module {module_name!r}: {err}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardFunctionError(f"reward function {path!r}: module {module_name!r} has no function {fn_name!r}")
    return fn


def _as_finite_float(value: Any, path: str, row_index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RewardFunctionError(
            f"reward function {path!r} returned {type(value).__name__} {value!r} for row {row_index}; "
            "it must return a finite float"
        )
    value = float(value)
    if not math.isfinite(value) or abs(value) > 1e6:
        raise RewardFunctionError(
            f"reward function {path!r} returned {value!r} for row {row_index}; it must return a finite float "
            "with |value| <= 1e6"
        )
    return value


@dataclass
class RuleScores:
    """Scores of one rule function over a batch; `valid[i]` is False where every try failed."""

    scores: list[float]
    valid: list[bool]
    errors: list[str]


def call_rule(
    fn: RewardFn, path: str, prompts: list[str], responses: list[str], rows: list[dict], retries: int
) -> RuleScores:
    """Call `fn` per row with up to `retries` retries; a row that still fails is marked invalid, never NaN."""
    scores, valid, errors = [], [], []
    for i, (p, r, row) in enumerate(zip(prompts, responses, rows, strict=True)):
        last = ""
        for _ in range(retries + 1):
            try:
                value = fn(p, r, row)
            except Exception as err:  # a user function may raise anything; we name it and the row
                last = f"reward function {path!r} raised {type(err).__name__}: {err} on row {i}"
                continue
            try:
                scores.append(_as_finite_float(value, path, i))
                valid.append(True)
                break
            except RewardFunctionError as err:
                last = str(err)
        else:
            scores.append(0.0)
            valid.append(False)
            errors.append(last)
            log.warning(last)
    return RuleScores(scores, valid, errors)


# ---------------------------------------------------------------- built-in rule rewards


def exact_answer(prompt: str, response: str, row: dict) -> float:
    """1.0 if the first number in the response equals row['answer'], else 0.0."""
    if "answer" not in row:
        raise RewardFunctionError(
            "exact_answer needs the ground truth in field 'answer' of the dataset row; fix: add it, or set "
            "data.prompts.require_answer=true to refuse such rows when the data is loaded"
        )
    m = re.search(r"-?\d+", response)
    return 1.0 if m and m.group(0) == str(row["answer"]).strip() else 0.0


class RewardNormalizer:
    """Optional running mean/std normalisation of sequence rewards (Welford over all rewards seen).

    Disabled, it returns its input unchanged. Its state is plain floats, saved in checkpoints.
    """

    def __init__(self, enabled: bool, eps: float = 1e-6):
        self.enabled, self.eps = enabled, eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, scores: "torch.Tensor", valid: "torch.Tensor | None" = None) -> "torch.Tensor":
        """scores: [N] rewards; returns [N], normalised with statistics that include this batch.

        valid: [N] bool; rows marked False (failed rewards) do not enter the statistics.
        """
        if not self.enabled:
            return scores
        kept = scores if valid is None else scores[valid]
        for x in kept.double().tolist():
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)
        std = math.sqrt(self.m2 / max(self.count - 1, 1))
        return (scores - self.mean) / (std + self.eps)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def brevity(prompt: str, response: str, row: dict) -> float:
    """A length penalty: minus the response's length in hundreds of characters."""
    return -len(response) / 100.0


# ---------------------------------------------------------------- answer extraction (GSM8K, \boxed{}, last number)

_NUMBER_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_GSM8K_RE = re.compile(r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)")


def normalize_number(text: str) -> str:
    """A number as a canonical string: '$1,234.50' -> '1234.5', '72.0' -> '72', '-3' -> '-3'.

    Text that is not a number comes back stripped, unchanged otherwise.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return text.strip()
    if not math.isfinite(value):
        return text.strip()
    return str(int(value)) if value == int(value) else repr(value)


def _ground_truth(row: dict, fn_name: str) -> str:
    """The row's `answer` as a canonical number; a GSM8K solution ("... #### 72") gives the number after ####."""
    if "answer" not in row or row["answer"] is None or str(row["answer"]).strip() == "":
        raise RewardFunctionError(
            f"{fn_name} needs the ground truth in field 'answer' of the dataset row (got row keys "
            f"{sorted(row)}); fix: add it (GSM8K's 'answer' holds the solution ending in '#### N'), or set "
            "data.prompts.require_answer=true to refuse such rows when the data is loaded"
        )
    answer = str(row["answer"])
    m = _GSM8K_RE.search(answer)
    return normalize_number(m.group(1) if m else answer)


def extract_gsm8k(text: str) -> str | None:
    """The number after the last '####' in `text` (GSM8K's final-answer marker), or None."""
    found = _GSM8K_RE.findall(text)
    return normalize_number(found[-1]) if found else None


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return normalize_number(text[i + 1 : j])
    return None  # unclosed: the response was cut off


def extract_last_number(text: str) -> str | None:
    """The last number in `text` (commas, a '$' and decimals allowed), or None."""
    found = _NUMBER_RE.findall(text)
    return normalize_number(found[-1]) if found else None


def gsm8k_answer(prompt: str, response: str, row: dict) -> float:
    """1.0 if the number after the response's last '####' equals the ground truth, else 0.0.

    The ground truth is row['answer']: a number, or a GSM8K solution ending in '#### N'.
    """
    truth = _ground_truth(row, "gsm8k_answer")  # checked first: a missing truth is an error, not a 0
    got = extract_gsm8k(response)
    return 1.0 if got == truth else 0.0


def boxed_answer(prompt: str, response: str, row: dict) -> float:
    """1.0 if the response's last \\boxed{...} equals the ground truth (see `gsm8k_answer`), else 0.0."""
    truth = _ground_truth(row, "boxed_answer")  # checked first: a missing truth is an error, not a 0
    got = extract_boxed(response)
    return 1.0 if got == truth else 0.0


def last_number_answer(prompt: str, response: str, row: dict) -> float:
    """1.0 if the last number in the response equals the ground truth (see `gsm8k_answer`), else 0.0."""
    truth = _ground_truth(row, "last_number_answer")  # checked first: a missing truth is an error, not a 0
    got = extract_last_number(response)
    return 1.0 if got == truth else 0.0


def math_answer(prompt: str, response: str, row: dict) -> float:
    """The answer marked by '####', else by the last \\boxed{}, else the last number; 1.0 if it equals the truth."""
    truth = _ground_truth(row, "math_answer")  # checked first: a missing truth is an error, not a 0
    got = extract_gsm8k(response) or extract_boxed(response) or extract_last_number(response)
    return 1.0 if got == truth else 0.0
