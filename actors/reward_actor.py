"""The reward actor: a reward model served by vLLM's pooling runner, plus rule-based reward functions."""

from __future__ import annotations

import os

import torch

from rlhf_ray.config import ModelConfig, RewardConfig
from rlhf_ray.reward_process import RewardProcess
from rlhf_ray.rewards import RewardFunctionError


def reward_engine_options(num_gpus: float, kv_cache_space_gib: float) -> dict:
    """CPU only: eager mode and a fixed KV cache (`kv_cache_space_gib`); on GPU vLLM sizes its cache from
    gpu_memory_utilization and captures CUDA graphs."""
    if num_gpus > 0:
        return {}
    # Not VLLM_CPU_KVCACHE_SPACE: vLLM parses it as whole GiB.
    return {"enforce_eager": True, "kv_cache_memory_bytes": int(kv_cache_space_gib * 2**30)}


class RewardActor:
    """Scores (prompt, response) pairs: weighted reward-model score + weighted rule functions.

    The reward model (a one-label sequence-classification checkpoint) runs in vLLM with
    `runner="pooling"` and no activation, so `classify` returns the raw scalar head.
    Decorate with `ray.remote` at creation.
    """

    def __init__(self, model_cfg: ModelConfig, reward_cfg: RewardConfig):
        self.cfg = reward_cfg
        # Each rule function runs in its own child process (time and memory limits, no inherited secrets).
        self.functions = [(f, RewardProcess(f.path, reward_cfg)) for f in reward_cfg.functions]
        self.llm = None
        if reward_cfg.use_model:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            from vllm import LLM
            from vllm.config import PoolerConfig

            self.llm = LLM(
                model=model_cfg.reward_path,
                runner="pooling",
                pooler_config=PoolerConfig(use_activation=False),
                dtype=model_cfg.dtype,
                max_model_len=model_cfg.max_model_len,
                trust_remote_code=model_cfg.trust_remote_code,
                load_format="safetensors",  # never a pickle checkpoint
                gpu_memory_utilization=reward_cfg.gpu_memory_utilization,
                **reward_engine_options(reward_cfg.num_gpus, reward_cfg.kv_cache_space_gib),
            )

    def model_scores(self, sequences: list[list[int]]) -> list[float]:
        """Raw reward-model scores of token sequences (prompt + response ids), one float each."""
        outputs = self.llm.classify([{"prompt_token_ids": ids} for ids in sequences], use_tqdm=False)
        return [float(o.outputs.probs[0]) for o in outputs]

    def score(
        self, sequences: list[list[int]], prompts: list[str], responses: list[str], rows: list[dict]
    ) -> dict[str, torch.Tensor]:
        """Score a batch of N samples.

        Returns scores [N] (the weighted sum, clipped if configured), valid [N] (False where a rule
        function failed every retry: the driver masks that sample), model [N] (raw RM scores, or 0)
        and one [N] tensor per rule function, keyed by its path.

        Raises RewardFunctionError (naming the function and the first failing row) when a function
        fails on every row of the batch: that is a broken function, and masking would train on nothing.
        """
        n = len(sequences)
        total = torch.zeros(n, dtype=torch.float64)
        valid = torch.ones(n, dtype=torch.bool)
        out: dict[str, torch.Tensor] = {}
        if self.llm is not None:
            model = torch.tensor(self.model_scores(sequences), dtype=torch.float64)
            out["model"] = model
            total += self.cfg.model_weight * model
        for fcfg, process in self.functions:
            rule = process.score(prompts, responses, rows)
            if n and not any(rule.valid):
                raise RewardFunctionError(f"every one of the {n} rows of the batch failed; the first: {rule.errors[0]}")
            scores = torch.tensor(rule.scores, dtype=torch.float64)
            out[fcfg.path] = scores
            total += fcfg.weight * scores
            valid &= torch.tensor(rule.valid)
        if self.cfg.clip is not None:
            total = total.clamp(-self.cfg.clip, self.cfg.clip)
        out["scores"] = total.masked_fill(~valid, 0.0).float()
        out["valid"] = valid
        return out

    def ping(self) -> bool:
        return True
