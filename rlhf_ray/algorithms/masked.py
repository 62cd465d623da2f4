"""Reductions and normalisation over the entries selected by a 0/1 mask.

Entries outside the mask never influence the result, even if they are NaN or inf.
"""

import torch

from ._checks import _check_same_shape


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x over entries where mask is nonzero.

    x: any shape. mask: same shape as x, 1 for entries to include, 0 otherwise.
    dim: reduce over this dim only; None reduces over everything to a scalar.
    """
    _check_same_shape(x=x, mask=mask)
    kept = x.masked_fill(~mask.bool(), 0.0)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over entries where mask is nonzero.

    x: any shape. mask: same shape as x, 1 for entries to include.
    dim: reduce over this dim only; None reduces over everything to a scalar.
    A slice with no masked-in entries has mean 0.
    """
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance (scalar) of x over all entries where mask is nonzero.

    x: any shape. mask: same shape as x, 1 for entries to include.
    unbiased: apply Bessel's correction n / (n - 1); needs at least 2 entries.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = int(mask.bool().sum())
        if n < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 masked-in entries, got {n}")
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise x to unit variance (and zero mean) using statistics of the masked entries.

    x: any shape. mask: same shape as x, 1 for entries to include.
    shift_mean: if False the original mean is added back, so only the scale changes.
    Returns a tensor shaped like x, 0 outside the mask. With fewer than 2 masked-in entries there
    is no spread to normalise by: the result is 0 everywhere (the masked-in entry is its own mean),
    or x on the mask when shift_mean is False.
    """
    if int(mask.bool().sum()) < 2:
        return x.masked_fill(~mask.bool(), 0.0) if not shift_mean else torch.zeros_like(x)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(~mask.bool(), 0.0)
