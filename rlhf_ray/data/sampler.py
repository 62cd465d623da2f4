"""Deterministic, resumable batches of prompt rows.

Epoch e visits the rows in the order `permutation(seed, e)`, in batches of B; the last
`num_rows % B` rows of that order wait for a later epoch (every batch is full). The whole state is
(epoch, position): the order is recomputed from (seed, epoch), so a run resumed from any
`state_dict()` — one saved exactly at an epoch boundary included — draws the same batches next
as a run that never stopped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhf_ray.data.load import Dataset


class PromptSampler:
    """Batches of B prompt rows from a `Dataset`, shuffled per epoch from (seed, epoch)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if not 1 <= batch_size <= len(dataset):
            raise ValueError(
                f"batch_size={batch_size} must be between 1 and the dataset's {len(dataset)} rows "
                f"({dataset.source})"
            )
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        """Row indices of one epoch: [num_rows]."""
        n = len(self.dataset)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def next_indices(self) -> list[int]:
        """The next batch's row indices: B of them."""
        batch = self.order(self.epoch)[self.position : self.position + self.batch_size].tolist()
        self.position += self.batch_size
        # Roll over now, not at the next call, so a state saved at a boundary already names the new epoch.
        if self.position + self.batch_size > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def next_batch(self) -> tuple[list[dict[str, Any]], list[list[int]]]:
        """(rows, prompt token ids) of the next B prompts; each row also holds its formatted `prompt` text."""
        idx = self.next_indices()
        rows = [dict(self.dataset.rows[i], prompt=self.dataset.prompts[i]) for i in idx]
        return rows, [self.dataset.prompt_ids[i] for i in idx]

    def state_dict(self) -> dict[str, int]:
        """Plain ints only, so it round-trips through `torch.load(weights_only=True)`."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_rows": len(self.dataset),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; a state from another dataset size, batch size, seed or shuffle raises."""
        mine = self.state_dict()
        for key in ("num_rows", "batch_size", "seed", "shuffle"):
            if int(state[key]) != mine[key]:
                raise ValueError(
                    f"prompt sampler state has {key}={state[key]} but this run has {key}={mine[key]}; "
                    "resuming would draw different prompts (fix: resume with the same dataset and data config)"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
