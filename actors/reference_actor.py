"""The reference actor: frozen log-probs of the initial (SFT) policy, for the KL penalty."""

from __future__ import annotations

import torch

from rlhf_ray.config import ModelConfig
from rlhf_ray.modeling import load_frozen_policy, response_logprobs


class ReferenceActor:
    """Holds a frozen copy of the initial policy (transformers, eval mode, no grad).

    Runs on the GPU Ray gave it, if any, else on `num_threads` CPU threads. Decorate with
    `ray.remote` at creation (the driver gives it the resources `rlhf-ray plan` shows).
    """

    def __init__(self, model_path: str, model_cfg: ModelConfig, micro_batch_size: int = 16, num_threads: int = 1):
        torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_frozen_policy(model_path, model_cfg).to(self.device)
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def compute_logprobs(self, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """[N, R] log-probs (nats) of the response tokens under the reference policy; 0 on padding."""
        n = batch["input_ids"].shape[0]
        parts = []
        for i in range(0, n, self.micro_batch_size):
            part = {k: (v[i : i + self.micro_batch_size] if v.dim() else v).to(self.device) for k, v in batch.items()}
            parts.append(response_logprobs(self.model, part, temperature).cpu())
        return torch.cat(parts)

    def ping(self) -> bool:
        return True
