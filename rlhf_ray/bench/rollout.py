"""Rollout figures: pool efficiency against the bare vLLM engine, and scaling from 1 to 2 actors.

Three engines stay up together: a 1-actor pool, whose engine is also called directly, and a
2-actor pool. Each round runs the same batch three ways back to back (1-actor pool, the bare
engine, 2-actor pool), so the pairs of every ratio are measured seconds apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from actors.rollout_actor import RolloutActor, request_seed
from actors.rollout_pool import RolloutPool
from rlhf_ray.bench.report import Figure, paired_ratio, spread
from rlhf_ray.bench.workloads import Workload, sampling
from rlhf_ray.config import ModelConfig, RolloutConfig, SamplingConfig

SEED = 1234  # a fixed sampling seed: every round generates the very same tokens


def engine_generate(actor: RolloutActor, prompts: list[list[int]], sampling: SamplingConfig) -> tuple[int, float]:
    """`vllm.LLM.generate` on a rollout actor's own engine, bypassing the actor's code.

    Runs inside the actor (through Ray's `__ray_call__`), with the SamplingParams the actor would
    build for the same batch, so only the pool's own work differs. Returns (tokens, seconds).
    """
    from vllm import SamplingParams

    params = [
        SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, ignore_eos=sampling.ignore_eos, seed=request_seed(sampling.seed, i, 0),
            logprobs=0, detokenize=False,
        )  # fmt: skip
        for i in range(len(prompts))
    ]
    start = time.perf_counter()
    outputs = actor.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for o in outputs for c in o.outputs), seconds


def pool_tokens_per_s(pool: RolloutPool, prompts: list[list[int]], sampling: SamplingConfig) -> float:
    """Generated tokens per wall-clock second of one `pool.generate`, as the driver sees it."""
    start = time.perf_counter()
    result = pool.generate(prompts, sampling=sampling)
    return result.num_tokens / (time.perf_counter() - start)


@dataclass
class RolloutRounds:
    """Tokens/s of each round (warm-up dropped) for the three ways of generating the same batch."""

    one_actor: list[float]
    direct: list[float]
    two_actors: list[float]


def measure(pool1: RolloutPool, pool2: RolloutPool, prompts: list[list[int]], w: Workload) -> RolloutRounds:
    """One warm-up round, then `w.rollout_repeats` measured rounds."""
    params = sampling(w, seed=SEED)
    rounds = RolloutRounds([], [], [])
    for i in range(1 + w.rollout_repeats):
        one = pool_tokens_per_s(pool1, prompts, params)
        tokens, seconds = ray.get(pool1.actors[0].__ray_call__.remote(engine_generate, prompts, params))
        two = pool_tokens_per_s(pool2, prompts, params)
        if i > 0:
            rounds.one_actor.append(one)
            rounds.direct.append(tokens / seconds)
            rounds.two_actors.append(two)
    return rounds


def start_pool(policy_path: str, w: Workload, actors: int) -> RolloutPool:
    """A pool of `actors` actors of the workload's policy, each actor pinned to its own core."""
    model_cfg = ModelConfig(policy_path=policy_path, max_model_len=w.max_model_len)
    return RolloutPool(model_cfg, RolloutConfig(num_actors=actors, kv_cache_space_gib=0.5, seed=SEED))


def rollout_figures(rounds: RolloutRounds, w: Workload) -> list[Figure]:
    """The rollout-efficiency and rollout-scaling figures of measured rounds."""
    batch = {"prompts": w.rollout_prompts, "samples_per_prompt": w.group_size, "max_new_tokens": w.response_len}
    efficiency = Figure(
        "rollout_efficiency", "Rollout efficiency (pool ÷ bare vLLM)", *paired_ratio(rounds.one_actor, rounds.direct),
        goal=0.9, higher_is_better=True,
        details=batch | _named("pool_tokens_per_s", rounds.one_actor) | _named("vllm_tokens_per_s", rounds.direct),
    )  # fmt: skip
    scaling = Figure(
        "rollout_scaling", "Rollout scaling (2 actors ÷ 1)", *paired_ratio(rounds.two_actors, rounds.one_actor),
        goal=1.7, higher_is_better=True,
        details=batch | _named("two_actor_tokens_per_s", rounds.two_actors)
        | _named("one_actor_tokens_per_s", rounds.one_actor),
    )  # fmt: skip
    return [efficiency, scaling]


def _named(prefix: str, values: list[float]) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in spread(values).items()}
