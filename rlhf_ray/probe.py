"""The log-prob probe of a weight broadcast: does vLLM now compute what the learner computes?

Per-layer checksums prove that the tensors sent arrived; they cannot see a module vLLM derives
from them and does not refresh (a tied LM head packed at an earlier load kept vLLM sampling from
old weights while every checksum passed). The probe compares what matters instead: after a
broadcast, every rollout actor scores a fixed batch of token sequences (vLLM prompt log-probs,
temperature 1) and the learner scores the same tokens; the two must agree within a tolerance.
"""

from __future__ import annotations

import torch

from rlhf_ray.protocol import Sample, collate

# Mean |vLLM - learner| log-prob (nats/token) tolerated on the probe when weight_sync.probe_tol is unset:
# fp32 engines agree to about 1e-6; bf16/fp16 kernels differ by rounding, about 1e-2 on small models.
DEFAULT_PROBE_TOL = {"float32": 1e-3}
DEFAULT_PROBE_TOL_LOW_PRECISION = 5e-2


def probe_tolerance(dtype: str, configured: float | None) -> float:
    """The probe's tolerance (nats/token): `configured`, or the default for the weights' `dtype` (e.g. "bfloat16")."""
    if configured is not None:
        return configured
    return DEFAULT_PROBE_TOL.get(dtype, DEFAULT_PROBE_TOL_LOW_PRECISION)


def probe_token_ids(vocab_size: int, rows: int, length: int, seed: int) -> list[list[int]]:
    """`rows` sequences of `length` token ids drawn uniformly from [0, vocab_size), the same for a given seed."""
    if vocab_size < 1 or rows < 1 or length < 2:
        raise ValueError(
            f"probe needs vocab_size >= 1, rows >= 1 and length >= 2 tokens; got vocab_size={vocab_size}, "
            f"rows={rows}, length={length} (set weight_sync.probe_tokens >= 2)"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (rows, length), generator=generator).tolist()


def probe_batch(sequences: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The learner's view of the probe: token 0 of each sequence is the prompt, tokens 1.. the response.

    Returns the `collate` layout (input_ids [N, L], response_mask [N, L-1], ...), so the learner's
    `compute_logprobs` gives log p(token t | tokens < t) for t = 1..L-1, as vLLM's prompt log-probs do.
    """
    samples = [Sample(i, 0, seq[:1], seq[1:], [0.0] * (len(seq) - 1), "length", 0) for i, seq in enumerate(sequences)]
    return collate(samples, pad_id)


def probe_gap(learner_logprobs: torch.Tensor, actor_logprobs: list[list[float]]) -> tuple[float, float]:
    """(mean, max) of |learner - actor| over every probed token, nats/token and nats.

    learner_logprobs: [N, L-1] from `compute_logprobs(probe_batch(...))`; actor_logprobs: N lists of L-1.
    """
    actor = torch.tensor(actor_logprobs, dtype=torch.float32)
    if actor.shape != learner_logprobs.shape:
        raise ValueError(f"probe shapes differ: learner {tuple(learner_logprobs.shape)}, actor {tuple(actor.shape)}")
    gap = (learner_logprobs.float() - actor).abs()
    return float(gap.mean()), float(gap.max())
