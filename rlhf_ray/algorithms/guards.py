"""Checks for non-finite values, so the learner can skip a step instead of corrupting weights."""

import torch


def all_finite(*tensors: torch.Tensor) -> bool:
    """True if no tensor contains NaN or inf. Tensors may have any shapes."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def first_nonfinite(named: dict[str, torch.Tensor]) -> str | None:
    """Describe the first tensor holding NaN or inf, or return None if all are finite.

    named: tensors of any shape keyed by a name used in the message,
    e.g. "loss: 1 NaN, 0 inf out of 1 values".
    """
    for name, t in named.items():
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        if n_nan or n_inf:
            return f"{name}: {n_nan} NaN, {n_inf} inf out of {t.numel()} values"
    return None
