"""The model each learner role trains, and the critic's per-token forward pass."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from rlhf_ray.config import ModelConfig

Role = Literal["policy", "critic", "reward"]
ROLES: tuple[Role, ...] = ("policy", "critic", "reward")


def load_model(role: Role, path: str, model_cfg: ModelConfig, gradient_checkpointing: bool) -> PreTrainedModel:
    """The HF model of `role` from folder `path`, in fp32 with every dropout probability set to 0.

    policy: a causal LM. critic and reward: a one-label sequence-classification model whose `score`
    head maps hidden states to scalars; a critic started from a causal-LM folder gets a freshly
    initialised head (seed the RNG identically on every rank before calling this).
    Dropout is off because PPO ratios, the 1-vs-N-rank equivalence and the reference log-probs all
    assume the forward pass is a deterministic function of the weights.
    """
    if role not in ROLES:
        raise ValueError(f"learner role must be one of {ROLES}, got {role!r}")
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    kwargs = dict(config=config, dtype=torch.float32, trust_remote_code=model_cfg.trust_remote_code)
    if role == "policy":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        if not hasattr(model, "score"):
            raise ValueError(f"{type(model).__name__} from {path} has no `score` head; critic and reward need one")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def token_values(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Critic values of the response tokens: [N, R] fp32, 0 on padding.

    values[:, t] = score(hidden state at column P-1+t), the value of the state just before response
    token t is generated, read from the same columns as the policy's logits.
    """
    P = int(batch["prompt_len"])
    R = batch["response_mask"].shape[1]
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state
    values = model.score(hidden[:, P - 1 : P + R - 1]).squeeze(-1).float()
    return values * batch["response_mask"]
