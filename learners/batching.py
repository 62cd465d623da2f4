"""Row bookkeeping for the learner group: checking batches, sharding rows to ranks, micro-batches.

A batch is a dict of tensors in the `rlhf_ray.protocol` layout: row tensors [N, ...] plus 0-d
tensors (prompt_len, kl_coef) and plain values that every shard shares unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_ray.protocol import PER_TOKEN_FIELDS


def num_rows(batch: dict[str, Any]) -> int:
    """N, the leading size shared by every row tensor of `batch`."""
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"batch has no row tensors (keys: {sorted(batch)})")


def select_rows(batch: dict[str, Any], index: torch.Tensor | slice) -> dict[str, Any]:
    """The rows `index` of every row tensor; 0-d tensors and non-tensors are shared unchanged."""
    return {k: v[index] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}


def split_rows(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """Cut the N rows into `parts` equal consecutive shards, one per rank (any row tensors, the
    reward model's (chosen_*, rejected_*) pairs included)."""
    n = num_rows(batch)
    if n % parts:
        raise ValueError(f"a batch of {n} rows cannot be split equally across {parts} ranks")
    k = n // parts
    return [select_rows(batch, slice(i * k, (i + 1) * k)) for i in range(parts)]


def micro_batches(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """Consecutive chunks of `size` rows (the last one may be shorter)."""
    n = num_rows(batch)
    return [select_rows(batch, slice(i, min(i + size, n))) for i in range(0, n, size)]


def pad_rows(batch: dict[str, Any], multiple: int) -> tuple[dict[str, Any], int]:
    """Repeat the last row until N is a multiple of `multiple`; returns (batch, original N).

    Forward-only calls use it so every rank gets the same number of rows (ZeRO-3 gathers
    parameters collectively, so all ranks must run the same number of forward passes).
    """
    n = num_rows(batch)
    extra = -n % multiple
    if not extra:
        return batch, n
    index = torch.cat([torch.arange(n), torch.full((extra,), n - 1)])
    return select_rows(batch, index), n


def check_batch(batch: dict[str, Any], required: tuple[str, ...] = (), per_token: tuple[str, ...] = PER_TOKEN_FIELDS) -> None:
    """Raise ValueError naming the field and shapes unless `batch` is in the training layout.

    input_ids, attention_mask (and position_ids if present) [N, P+R]; response_mask and every
    per-token field present (and not None) [N, R]; prompt_len a 0-d tensor P with 1 <= P and P + R <= P+R columns.
    """
    missing = [k for k in required if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; it has {sorted(batch)}")
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, L], got shape {tuple(ids.shape)}")
    for key in ("attention_mask", "position_ids"):
        if key in batch and tuple(batch[key].shape) != tuple(ids.shape):
            raise ValueError(f"{key} has shape {tuple(batch[key].shape)} but input_ids has {tuple(ids.shape)}")
    if "response_mask" not in batch:
        return
    mask = batch["response_mask"]
    if mask.dim() != 2 or mask.shape[0] != ids.shape[0]:
        raise ValueError(f"response_mask has shape {tuple(mask.shape)}; expected [N={ids.shape[0]}, R]")
    P, R = int(batch["prompt_len"]), mask.shape[1]
    if P < 1 or P + R > ids.shape[1]:
        raise ValueError(
            f"prompt_len={P} and response_mask width R={R} do not fit input_ids of width {ids.shape[1]} "
            "(need 1 <= prompt_len and prompt_len + R <= width)"
        )
    for key in per_token:
        if batch.get(key) is not None and tuple(batch[key].shape) != tuple(mask.shape):
            raise ValueError(
                f"{key} has shape {tuple(batch[key].shape)} but response_mask has shape {tuple(mask.shape)}; "
                "per-token fields must be [N, R]"
            )


def rank_rows(
    n: int, minibatch_size: int, num_ranks: int, epochs: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """The rows each rank trains on, in order: for every epoch a fresh permutation of the n rows,
    cut into minibatches of `minibatch_size`, each minibatch cut into `num_ranks` equal shares.

    A minibatch holds the same rows whatever the number of ranks, which is what makes an update
    on N ranks equal to one on a single rank. Returns one index tensor per rank.
    """
    if n % minibatch_size or minibatch_size % num_ranks:
        raise ValueError(
            f"{n} rows cannot be cut into minibatches of {minibatch_size} rows shared by {num_ranks} ranks; "
            f"make the batch a multiple of learner.minibatch_size and that a multiple of learner.num_ranks"
        )
    share = minibatch_size // num_ranks
    out: list[list[torch.Tensor]] = [[] for _ in range(num_ranks)]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, minibatch_size):
            for r in range(num_ranks):
                out[r].append(perm[start + r * share : start + (r + 1) * share])
    return [torch.cat(chunks) for chunks in out]
