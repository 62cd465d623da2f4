"""Forward passes shared by every holder of a transformers model (learners, reference actor)."""

from __future__ import annotations

import torch

from rlhf_ray.algorithms import logprobs_from_logits
from rlhf_ray.config import ModelConfig


def load_frozen_policy(path: str, model_cfg: ModelConfig) -> torch.nn.Module:
    """The causal LM in `path` in `model_cfg.dtype`, eval mode, no gradients: the reference, wherever it runs.

    Loaded by transformers in the target dtype, which keeps fp32 buffers (rotary `inv_freq`) in fp32, as
    DeepSpeed's bf16 cast of the learner does; casting the whole module would round them and move the
    log-probs by ~2e-3 nats in bf16.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, model_cfg.dtype), trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,
    )
    return model.eval().requires_grad_(False)


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
