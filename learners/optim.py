"""The learners' optimizer, its learning-rate schedule, and the DeepSpeed config that wraps it."""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_ray.config import LearnerConfig
from rlhf_ray.sizing import grad_accum_steps


class VetoableAdamW(torch.optim.AdamW):
    """torch AdamW whose next step can be vetoed, the hook for the learners' numerical guard.

    DeepSpeed's ZeRO optimizers call `step()` of this inner optimizer on their fp32 partitions and
    then copy those partitions back into the model; a vetoed step leaves partitions and moments
    untouched, so the weights stay bitwise the same. The same torch AdamW runs for any number of
    ranks and ZeRO stage (DeepSpeed's fused Adam has no CPU kernel), so updates agree across layouts.
    """

    veto: bool = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not self.veto:
            return super().step(closure)
        self.init_state()
        return None

    def init_state(self) -> None:
        """Create zero moments for the parameters not stepped yet, as AdamW's first step would.

        Called once after `deepspeed.initialize` and by every vetoed step: ZeRO-1/2 link views on
        the moments of all groups after their first inner step, and would link an empty state for
        good if a group had none by then.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p].update(
                        step=torch.tensor(0.0),
                        exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                        exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                    )


def build_optimizer(model: torch.nn.Module, cfg: LearnerConfig, lr: float) -> VetoableAdamW:
    """AdamW with weight decay on matrices only (biases and norm scales are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return VetoableAdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(cfg.betas), eps=1e-8)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """Fraction of the peak learning rate at optimizer step `step` (0-based, applied steps only).

    Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` at `total_steps`;
    with `total_steps=None` the rate stays at the peak after warm-up.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: LearnerConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """DeepSpeed config for one engine.

    Gradient accumulation is driven by the learner itself (it marks the last micro-batch of each
    minibatch as the boundary), so `gradient_accumulation_steps` only has to be self-consistent.
    """
    gas = grad_accum_steps(cfg.minibatch_size, world_size, cfg.micro_batch_size)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": cfg.micro_batch_size * gas * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage_used(bf16)},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
