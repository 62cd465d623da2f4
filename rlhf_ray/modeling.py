"""Forward passes shared by every holder of a transformers model (learners, reference actor)."""

from __future__ import annotations

import torch

from rlhf_ray.algorithms import logprobs_from_logits


def response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits that predict each response token: [N, R, V] from a batch in the `protocol.collate` layout."""
    P = int(batch["prompt_len"])
    R = batch["response_mask"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    return out.logits[:, P - 1 : P + R - 1].float()


def response_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at the sampled response tokens: [N, R], nats; 0 on padding."""
    P = int(batch["prompt_len"])
    R = batch["response_mask"].shape[1]
    logits = response_logits(model, batch)
    if temperature != 1.0:
        logits = logits / temperature
    logp = logprobs_from_logits(logits, batch["input_ids"][:, P : P + R])
    return logp * batch["response_mask"]


def last_token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar head of a sequence-classification model at each row's last real token: [N].

    Rows may be left- or right-padded; the last position where attention_mask is 1 is used, which
    is the token vLLM's pooling runner scores for the same unpadded sequence.
    """
    backbone = getattr(model, model.base_model_prefix)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask.bool() * positions).argmax(dim=-1)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.score(picked).squeeze(-1).float()
