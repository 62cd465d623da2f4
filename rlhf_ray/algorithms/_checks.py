"""Argument validation shared by the algorithm functions."""

import torch


def _check_same_shape(**named: torch.Tensor | torch.Size | tuple[int, ...]) -> None:
    """Raise ValueError unless every named tensor (or shape) has the same shape.

    The message names the first mismatching pair, e.g.
    "logp has shape (2, 3) but mask has shape (2, 4)".
    """
    items = [
        (name, tuple(x.shape if isinstance(x, torch.Tensor) else x)) for name, x in named.items()
    ]
    first_name, first_shape = items[0]
    for name, shape in items[1:]:
        if shape != first_shape:
            raise ValueError(f"{first_name} has shape {first_shape} but {name} has shape {shape}")
