"""Small placement rules of the rollout pool on GPUs, kept apart so they can be tested without Ray or vLLM."""

from __future__ import annotations


def tensor_parallel_env(gpus_per_worker: float) -> dict[str, str]:
    """Environment of a tensor-parallel engine's driver actor: vLLM's Ray workers ask for
    VLLM_RAY_PER_WORKER_GPUS GPUs each (default 1), so a bundle holding a fraction of a GPU would never take one."""
    return {"VLLM_RAY_PER_WORKER_GPUS": f"{gpus_per_worker:g}"}


def free_bundle(count: int, used: set[int | None]) -> int:
    """The lowest of `count` shared bundles without a rollout actor (rollout.colocate: one per learner rank)."""
    free = [i for i in range(count) if i not in used]
    if not free:
        raise RuntimeError(f"rollout.colocate=true: all {count} learner bundles hold a rollout actor already")
    return free[0]
