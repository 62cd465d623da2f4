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


nan_calls = [0]


def nan_every_other_call(prompt, response, row):
    """NaN on every second call: with n=2 samples per prompt, one sample of each group."""
    nan_calls[0] += 1
    return float("nan") if nan_calls[0] % 2 else 1.0


def brevity_on_odd_rows(prompt, response, row):
    """The same score for every sample of an even row (a group without signal), brevity for odd rows."""
    return 0.0 if row["i"] % 2 == 0 else -len(response) / 100.0


def slow_on_row_1(prompt, response, row):
    """Hangs (60 s) on the row with i == 1: the per-row timeout must mask it, not end the run."""
    import time

    if row["i"] == 1:
        time.sleep(60)
    return 1.0


def hogs_memory(prompt, response, row):
    """Asks for 2 GiB at once: over a memory cap it raises MemoryError in its own process."""
    return float(len(bytearray(2 << 30)))


def secret_length(prompt, response, row):
    """The length of WANDB_API_KEY as the function sees it (0: not inherited)."""
    import os

    return float(len(os.environ.get("WANDB_API_KEY", "")))
