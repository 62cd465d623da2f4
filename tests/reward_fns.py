"""Misbehaving reward functions for the reward-guard tests (imported by dotted path)."""

calls: dict[int, int] = {}


def constant(prompt, response, row):
    return 1.5


def raises_on_odd(prompt, response, row):
    if row["i"] % 2:
        raise KeyError("boom")
    return 1.0


def returns_bad(prompt, response, row):
    return row["value"]


def flaky_once(prompt, response, row):
    calls[row["i"]] = calls.get(row["i"], 0) + 1
    if calls[row["i"]] == 1:
        raise TimeoutError("first try times out")
    return 2.0


def returns_nan(prompt, response, row):
    return float("nan")
