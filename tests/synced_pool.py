"""A rollout pool serving policy version 1: weights one learner step changed, broadcast and verified.

Shared by the elasticity tests (one node) and the node cut-off driver (tests/multinode_cut_driver.py).
Replacements of dead actors load the learner's current weights before they serve.
"""

from __future__ import annotations

import torch

from actors.rollout_pool import RolloutPool
from learners import LearnerGroup
from rlhf_ray.config import LearnerConfig, ModelConfig, RolloutConfig, WeightSyncConfig
from rlhf_ray.driver.broadcaster import WeightBroadcaster


def synced_pool(
    model_cfg: ModelConfig, learner_cfg: LearnerConfig, rollout_cfg: RolloutConfig
) -> tuple[RolloutPool, LearnerGroup, WeightBroadcaster]:
    """(pool, policy learner group, broadcaster) after one SFT step on fixed ids and one broadcast."""
    policy = LearnerGroup("policy", model_cfg.policy_path, learner_cfg, model_cfg)
    pool = RolloutPool(model_cfg, rollout_cfg)
    sync = WeightBroadcaster(policy, pool, WeightSyncConfig(bucket_mb=0.05, timeout_s=60))
    pool.current_weights = policy.export_weights
    ids = torch.randint(5, 400, (4, 12), generator=torch.Generator().manual_seed(0))
    policy.sft_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)})
    sync.broadcast()
    return pool, policy, sync
