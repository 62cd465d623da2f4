"""The model each learner role trains, and the critic's per-token forward pass."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from rlhf_ray.config import ModelConfig

Role = Literal["policy", "critic", "reward"]
ROLES: tuple[Role, ...] = ("policy", "critic", "reward")


class ScalarHeadModel(torch.nn.Module):
    """A one-label sequence-classification model whose `score` head runs at every position.

    forward(input_ids, attention_mask, position_ids [B, T]) -> scores [B, T] fp32. HF's own forward
    pools to one score per row, while the critic needs every position; and backbone and head must
    run inside the root forward, which the DeepSpeed engine wraps (calling them one by one from
    outside bypasses the engine's micro-step bookkeeping, and ZeRO-3 then drops gradients).
    """

    def __init__(self, hf: PreTrainedModel):
        super().__init__()
        self.hf = hf

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        backbone = getattr(self.hf, self.hf.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.hf.score(hidden).squeeze(-1).float()


def unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The HF model inside (what is saved and exported, with HF parameter names)."""
    return model.hf if isinstance(model, ScalarHeadModel) else model


def load_model(role: Role, path: str, model_cfg: ModelConfig, gradient_checkpointing: bool) -> torch.nn.Module:
    """The model of `role` from HF folder `path`, in fp32 with every dropout probability set to 0.

    policy: the causal LM itself. critic and reward: a one-label sequence-classification model in a
    `ScalarHeadModel`; a critic started from a causal-LM folder gets a freshly initialised head
    (seed the RNG identically on every rank before calling this).
    Dropout is off because PPO ratios, the 1-vs-N-rank equivalence and the reference log-probs all
    assume the forward pass is a deterministic function of the weights.
    """
    if role not in ROLES:
        raise ValueError(f"learner role must be one of {ROLES}, got {role!r}")
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    kwargs = dict(
        config=config, dtype=torch.float32, trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True
    )
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
    return model if role == "policy" else ScalarHeadModel(model)


def token_values(model: ScalarHeadModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Critic values of the response tokens: [N, R] fp32, 0 on padding.

    values[:, t] = score(hidden state at column P-1+t), the value of the state just before response
    token t is generated, read from the same columns as the policy's logits.
    """
    P = int(batch["prompt_len"])
    R = batch["response_mask"].shape[1]
    scores = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    return scores[:, P - 1 : P + R - 1] * batch["response_mask"]


def sequence_scores(model: ScalarHeadModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Score at each row's last real token: [N] fp32, rows left- or right-padded.

    The same token vLLM's pooling runner scores for the unpadded sequence.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    scores = model(input_ids, attention_mask, position_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask.bool() * positions).argmax(dim=-1)
    return scores[torch.arange(scores.shape[0], device=scores.device), last]
