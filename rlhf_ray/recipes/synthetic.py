"""Synthetic data for the CPU demo: a tiny language, instructions, and a hidden preference rule.

The demo plays InstructGPT in miniature. Instructions ask to describe a thing;
an answer names three qualities. A hidden rule (the "labelers' taste") prefers
some qualities and dislikes repetition. Labelers compare pairs of the SFT
policy's answers with that rule plus noise; the reward model sees only those
labels, never the rule. The rule also scores the PPO policy at the end.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

THINGS = [
    "weather", "garden", "river", "city", "forest", "kitchen", "song", "market",
    "mountain", "library", "harbor", "village", "desert", "bridge", "school", "train",
]
QUALITIES = [
    "bright", "calm", "warm", "gentle", "clean", "quiet",      # liked by the hidden rule
    "dark", "loud", "cold", "dusty", "crowded", "broken",      # disliked
    "old", "large", "small", "new",                            # neutral
]
LIKED = frozenset(QUALITIES[:6])
DISLIKED = frozenset(QUALITIES[6:12])
INSTRUCTIONS = ["Describe the {t}.", "Tell me about the {t}.", "What is the {t} like?"]
ANSWER_RE = re.compile(r"^The (\w+) is (\w+) , (\w+) and (\w+) \.$")


def make_answer(thing: str, qualities: list[str]) -> str:
    a, b, c = qualities
    return f"The {thing} is {a} , {b} and {c} ."


def make_instruction(thing: str, rng: random.Random) -> str:
    return rng.choice(INSTRUCTIONS).format(t=thing)


def hidden_score(prompt: str, response: str) -> float:
    """The hidden preference rule: +1 per liked quality, -1 per disliked, -1 per repeat; -3 if malformed."""
    m = ANSWER_RE.match(response.strip())
    if not m or m.group(1) not in prompt:
        return -3.0
    qualities = list(m.group(2, 3, 4))
    if any(q not in QUALITIES for q in qualities):
        return -3.0
    score = sum(q in LIKED for q in qualities) - sum(q in DISLIKED for q in qualities)
    return float(score - (len(qualities) - len(set(qualities))))


def hidden_rule(prompt: str, response: str, row: dict) -> float:
    """The hidden preference rule as a verifiable reward function (`hidden_score`; `row` is unused)."""
    return hidden_score(prompt, response)


def pretraining_corpus(num_sentences: int, seed: int) -> list[str]:
    """Plain sentences of the tiny language (no chat markup)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        thing = rng.choice(THINGS)
        if rng.random() < 0.5:
            lines.append(make_answer(thing, rng.choices(QUALITIES, k=3)))
        else:
            lines.append(f"{make_instruction(thing, rng)} {make_answer(thing, rng.choices(QUALITIES, k=3))}")
    return lines


def instruction_rows(num_rows: int, seed: int, things: list[str] | None = None) -> list[dict]:
    """SFT rows {prompt, response}: answers with uniformly random qualities (the policy before RLHF)."""
    rng = random.Random(seed)
    things = things or THINGS
    rows = []
    for _ in range(num_rows):
        thing = rng.choice(things)
        rows.append({"prompt": make_instruction(thing, rng), "response": make_answer(thing, rng.choices(QUALITIES, k=3))})
    return rows


def prompt_rows(num_rows: int, seed: int, things: list[str] | None = None) -> list[dict]:
    """RL / evaluation prompt rows {prompt}."""
    rng = random.Random(seed)
    things = things or THINGS
    return [{"prompt": make_instruction(rng.choice(things), rng)} for _ in range(num_rows)]


def label_pairs(
    pairs: list[tuple[str, str, str]], noise: float, seed: int
) -> list[dict]:
    """Noisy labelers: for (prompt, a, b) prefer the higher hidden score, flipped with probability `noise`.

    Pairs with equal hidden scores are dropped (labelers would be guessing).
    Returns preference rows {prompt, chosen, rejected}.
    """
    rng = random.Random(seed)
    rows = []
    for prompt, a, b in pairs:
        sa, sb = hidden_score(prompt, a), hidden_score(prompt, b)
        if sa == sb or a == b:
            continue
        better, worse = (a, b) if sa > sb else (b, a)
        if rng.random() < noise:
            better, worse = worse, better
        rows.append({"prompt": prompt, "chosen": better, "rejected": worse})
    return rows


def edited_answer(answer: str, rng: random.Random) -> str | None:
    """A labeler's alternative to a well-formed `answer` with one edit: a different subject (40 %),
    one quality turned into a repeat of another (40 %), or one quality replaced by any quality (20 %).
    None if `answer` is not well-formed.

    Paired with the original, it shows labelers two answers that differ in exactly one of the
    behaviours the rule judges, the way annotators write or edit a second answer instead of only
    ranking two samples: without such pairs a wrong subject or a repeat rarely decides a comparison,
    and the reward model leaves both unpunished.
    """
    m = ANSWER_RE.match(answer.strip())
    if not m or any(q not in QUALITIES for q in m.group(2, 3, 4)):
        return None
    thing, qualities = m.group(1), list(m.group(2, 3, 4))
    # Which qualities are liked is learned from any comparison; a wrong subject or a repeat has to be
    # seen deciding many of them, so those edits get the larger shares.
    kind, slot = rng.random(), rng.randrange(3)
    if kind < 0.4:
        thing = rng.choice([t for t in THINGS if t != thing])
    elif kind < 0.8:
        qualities[slot] = qualities[rng.choice([i for i in range(3) if i != slot])]
    else:
        qualities[slot] = rng.choice(QUALITIES)
    return make_answer(thing, qualities)


def win_rate(prompts: list[str], ours: list[str], theirs: list[str]) -> float:
    """Fraction of prompts where `ours` beats `theirs` under the hidden rule (ties count one half)."""
    wins = 0.0
    for p, a, b in zip(prompts, ours, theirs, strict=True):
        sa, sb = hidden_score(p, a), hidden_score(p, b)
        wins += 1.0 if sa > sb else 0.5 if sa == sb else 0.0
    return wins / len(prompts)


def arithmetic_rows(num_rows: int, seed: int) -> list[dict]:
    """Single-digit addition prompts with their ground truth, for a verifiable (rule-based) reward."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": f"What is {a} plus {b}?", "answer": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write `rows` as JSON Lines (one object per line) to `path`; returns `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
