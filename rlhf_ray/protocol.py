"""Types that cross Ray boundaries between the driver, the rollout side and the learners.

Token layout of a training batch (left-padded prompts, right-padded responses),
so that every response starts in the same column `prompt_len`:

    input_ids      [N, P + R]   pad.. prompt | response ..pad
    attention_mask [N, P + R]   0 on padding, 1 elsewhere
    response_mask  [N, R]       1 on response tokens (a prefix of each row)

Per-token quantities of the response (log-probs, values, advantages) are
`[N, R]`; the learner reads them from logits[:, P-1 : P+R-1]. `RolloutBatch`
(what `collate` returns) and `Experience` (what the learners train on) are the
one definition of these fields; `PER_TOKEN_FIELDS` is derived from them.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, NotRequired, TypedDict

import torch

TensorBatch = dict[str, Any]  # row tensors [N, ...] plus 0-d tensors every row shares (prompt_len, kl_coef)
Tokens = Annotated[torch.Tensor, "[N, P+R]"]  # int64, one column per token of prompt and response
PerToken = Annotated[torch.Tensor, "[N, R]"]  # float32, one column per response token, 0 on padding
Scalar = Annotated[torch.Tensor, "[]"]  # 0-d, shared by every row


class RolloutBatch(TypedDict):
    """Sampled responses in the training layout (`collate`)."""

    input_ids: Tokens
    attention_mask: Tokens  # 0 on padding, 1 elsewhere
    position_ids: Tokens  # 0, 1, ... over the real tokens of each row
    response_mask: PerToken  # 1 on response tokens (a prefix of each row)
    rollout_logprobs: PerToken  # nats: the rollout engine's log-prob of each sampled token
    prompt_len: Scalar  # int64: P, the column where every response starts


class Experience(RolloutBatch):
    """What the policy (and critic) update trains on: a rollout batch, scored (`rlhf_ray.experience.make_experience`)."""

    old_logprobs: PerToken | None  # nats, the learner's before the update; None: the update's own, detached (one step only)
    ref_logprobs: PerToken  # nats, the reference policy's
    advantages: PerToken  # 0 on padding and on rows whose reward failed
    kl_coef: Scalar  # float32: weight of KL(pi || ref) in the policy loss; 0 when the KL is in the reward
    returns: NotRequired[PerToken]  # PPO: the critic's targets
    old_values: NotRequired[PerToken]  # PPO: the critic's values before the update


def _fields_shaped(cls: type, shape: object) -> tuple[str, ...]:
    def shaped(hint: object) -> bool:
        return hint == shape or any(shaped(arg) for arg in typing.get_args(hint))

    return tuple(k for k, hint in typing.get_type_hints(cls, include_extras=True).items() if shaped(hint))


PER_TOKEN_FIELDS = _fields_shaped(Experience, PerToken)  # every [N, R] field, response_mask first
LAYOUT_FIELDS = ("input_ids", "attention_mask", "position_ids", "response_mask", "prompt_len")
EXPERIENCE_REQUIRED = tuple(  # (TypedDict's own __required_keys__ misses NotRequired under string annotations)
    k for k, hint in typing.get_type_hints(Experience, include_extras=True).items()
    if typing.get_origin(hint) is not NotRequired
)


def missing_experience_fields(exp: TensorBatch) -> list[str]:
    """Required `Experience` keys that `exp` lacks (old_logprobs must be there, possibly None)."""
    return [k for k in EXPERIENCE_REQUIRED if k not in exp]


@dataclass
class Sample:
    """One generated response: a row of a rollout batch."""

    prompt_id: int
    sample_idx: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # nats, log p(response_ids[t] | prefix) under the rollout engine
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    policy_version: int
    actor_name: str = ""

    @property
    def key(self) -> tuple[int, int]:
        return (self.prompt_id, self.sample_idx)


@dataclass
class ActorFailure:
    """A rollout actor that died during a generate call or a weight broadcast, and how the run recovered."""

    name: str
    node_id: str
    node_ip: str
    step: int  # the step it died in
    lost_samples: int  # samples it had been given; all were generated again by other actors
    replaced_by: str  # name of the actor started in its place
    regenerated_s: float  # from noticing the death until its samples were generated again
    recovery_s: float  # from noticing the death until the replacement served the current weights


@dataclass
class RolloutResult:
    """What `RolloutPool.generate` returns: samples grouped by prompt, in prompt order."""

    samples: list[Sample]
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # per actor, generated tokens/s
    seconds: float = 0.0
    failures: list[ActorFailure] = field(default_factory=list)  # actors that died and were replaced

    @property
    def num_tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples)


def collate(samples: list[Sample], pad_id: int) -> RolloutBatch:
    """Pad samples into the training layout described in the module docstring.

    Returns input_ids, attention_mask, position_ids [N, P+R] (int64), response_mask [N, R]
    (float32), rollout_logprobs [N, R] (float32, nats) and prompt_len (a 0-d int64 tensor = P).
    """
    if not samples:
        raise ValueError("collate got no samples")
    P = max(len(s.prompt_ids) for s in samples)
    R = max(1, max(len(s.response_ids) for s in samples))
    N = len(samples)
    input_ids = torch.full((N, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((N, P + R), dtype=torch.long)
    response_mask = torch.zeros((N, R), dtype=torch.float32)
    rollout_logprobs = torch.zeros((N, R), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        input_ids[i, P - p : P] = torch.tensor(s.prompt_ids)
        input_ids[i, P : P + r] = torch.tensor(s.response_ids, dtype=torch.long)
        attention_mask[i, P - p : P + r] = 1
        response_mask[i, :r] = 1.0
        rollout_logprobs[i, :r] = torch.tensor(s.logprobs, dtype=torch.float32)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        response_mask=response_mask,
        rollout_logprobs=rollout_logprobs,
        prompt_len=torch.tensor(P),
    )

