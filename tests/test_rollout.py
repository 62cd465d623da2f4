"""Rollout actors and pool with real Ray and real vLLM on the tiny checkpoint (CPU-runnable)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.rollout_actor import check_requests
from actors.rollout_pool import RolloutPool, balance
from rlhf_ray.config import ModelConfig, RolloutConfig, SamplingConfig
from rlhf_ray.hardware import process_environment, process_niceness
from rlhf_ray.modeling import response_logprobs
from rlhf_ray.protocol import collate
from rlhf_ray.weight_sync import compare_checksums, layer_checksums, layer_of

MAX_MODEL_LEN = 96
TEXTS = [
    "Describe the river.",
    "What is 3 plus 4?",
    "Tell me about the old harbor and the quiet village by the mountain.",
    "The garden is",
    "What is the library like?",
]


@pytest.fixture(scope="module")
def model_cfg(tiny_model_dir: Path) -> ModelConfig:
    return ModelConfig(policy_path=str(tiny_model_dir / "policy"), max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def pool(model_cfg: ModelConfig, ray_cluster: None) -> Iterator[RolloutPool]:
    cfg = RolloutConfig(num_actors=2, kv_cache_space_gib=0.25, sampling=SamplingConfig(max_new_tokens=8))
    pool = RolloutPool(model_cfg, cfg)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def hf_policy(model_cfg: ModelConfig) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_cfg.policy_path).eval()


@pytest.fixture(scope="module")
def prompts(model_cfg: ModelConfig) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_cfg.policy_path)
    return [tok.encode(t) for t in TEXTS]


def set_weights(pool: RolloutPool, weights: list[tuple[str, torch.Tensor]], version: int) -> None:
    """What the weight-broadcast layer does: every actor loads the tensors, then the pool's version moves."""
    ray.get([a.update_weights.remote(weights, version) for a in pool.actors])
    pool.version = version


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + scale * torch.randn(p.shape, generator=gen)) for n, p in model.named_parameters()]


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


# ---------------------------------------------------------------- pure helpers


def test_balance_longest_first() -> None:
    assert balance([5, 1, 4, 2, 3], 2) == [[0, 3, 1], [2, 4]]  # loads 8 and 7
    assert balance([7], 3) == [[0], [], []]


def test_check_requests_truncates_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        out = check_requests([(0, [1, 2]), (7, list(range(10)))], max_new_tokens=4, max_model_len=10, truncate=True)
    assert out == [(0, [1, 2]), (7, [4, 5, 6, 7, 8, 9])]  # the last 10 - 4 tokens
    assert "7 (10 -> 6)" in caplog.text


# ---------------------------------------------------------------- pool and actors


def test_samples_come_back_grouped_in_prompt_order(pool: RolloutPool, prompts: list[list[int]]) -> None:
    result = pool.generate(prompts, n=3)
    assert [s.key for s in result.samples] == [(p, i) for p in range(len(prompts)) for i in range(3)]
    for s in result.samples:
        assert s.prompt_ids == prompts[s.prompt_id]
        assert 1 <= len(s.response_ids) <= 8 and len(s.logprobs) == len(s.response_ids)
        assert s.finish_reason in ("stop", "length") and s.policy_version == pool.version
    assert {s.actor_name for s in result.samples} == set(pool.actor_names) == set(result.tokens_per_s)
    assert all(tps > 0 for tps in result.tokens_per_s.values())
    print("\n2-actor pool tokens/s:", {k: round(v) for k, v in result.tokens_per_s.items()})


def test_same_seed_same_samples(pool: RolloutPool, prompts: list[list[int]]) -> None:
    fixed = SamplingConfig(n=2, max_new_tokens=8, seed=1234)
    first, second = pool.generate(prompts, sampling=fixed), pool.generate(prompts, sampling=fixed)
    assert [s.response_ids for s in first.samples] == [s.response_ids for s in second.samples]
    # The seed follows the prompt, not the batch or the actor: a smaller batch repeats its samples.
    alone = pool.generate(prompts[:2], sampling=fixed)
    assert [s.response_ids for s in alone.samples] == [s.response_ids for s in first.samples[:4]]
    # Without a fixed seed each call draws fresh samples (the pool's step enters the seed).
    free = SamplingConfig(n=2, max_new_tokens=8)
    a, b = pool.generate(prompts, sampling=free), pool.generate(prompts, sampling=free)
    assert [s.response_ids for s in a.samples] != [s.response_ids for s in b.samples]


def test_ignore_eos_gives_fixed_length_responses(pool: RolloutPool, prompts: list[list[int]]) -> None:
    """With ignore_eos every greedy response runs to max_new_tokens and starts with the EOS-stopped one."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=24)
    free = pool.generate(prompts, sampling=greedy).samples
    fixed = pool.generate(prompts, sampling=greedy.model_copy(update={"ignore_eos": True})).samples
    assert all(len(s.response_ids) == 24 and s.finish_reason == "length" for s in fixed)
    assert [s.response_ids[: len(f.response_ids)] for s, f in zip(fixed, free)] == [f.response_ids for f in free]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_learner(
    pool: RolloutPool, hf_policy: torch.nn.Module, prompts: list[list[int]], temperature: float
) -> None:
    """vLLM's sampled-token log-probs equal the learner's log_softmax(logits / T) on the same weights."""
    sampling = SamplingConfig(n=2, max_new_tokens=8, temperature=temperature, seed=7)
    # Back to the checkpoint's own weights, whatever earlier tests loaded.
    set_weights(pool, [(n, p.detach()) for n, p in hf_policy.named_parameters()], pool.version + 1)
    result = pool.generate(prompts, sampling=sampling)
    batch = collate(result.samples, pad_id=0)
    with torch.no_grad():
        learner = response_logprobs(hf_policy, batch, temperature)
    diff = ((learner - batch["rollout_logprobs"]).abs() * batch["response_mask"]).max()
    assert diff < 1e-4, f"max |vLLM - learner| log-prob = {diff:.2e} nats at T={temperature}"


def test_update_weights_then_greedy_matches_transformers(
    pool: RolloutPool, hf_policy: torch.nn.Module, prompts: list[list[int]]
) -> None:
    new = perturbed(hf_policy, seed=3)
    model = AutoModelForCausalLM.from_pretrained(pool.model_cfg.policy_path).eval()
    model.load_state_dict(dict(new))
    version = pool.version + 1
    set_weights(pool, new, version)

    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10)
    result = pool.generate(prompts, sampling=greedy)
    for s in result.samples:
        assert s.policy_version == version
        want = hf_greedy(model, s.prompt_ids, len(s.response_ids))
        assert s.response_ids == want, f"prompt {s.prompt_id} on {s.actor_name}"
        assert s.finish_reason == "length" or s.response_ids[-1] == model.config.eos_token_id

    expected = layer_checksums(model.named_parameters())
    for name, sums in zip(pool.actor_names, ray.get([a.weight_checksums.remote() for a in pool.actors])):
        per_layer: dict[str, float] = {}
        for param, value in sums.items():
            per_layer[layer_of(param)] = per_layer.get(layer_of(param), 0.0) + value
        compare_checksums(expected, per_layer, who=name)

    with pytest.raises(ValueError, match="older"):
        ray.get(pool.actors[0].update_weights.remote(new, version - 1))
    # q_proj alone would leave the fused qkv_proj half-loaded: refused, naming what is missing.
    with pytest.raises(ValueError, match="self_attn.k_proj.weight"):
        ray.get(pool.actors[0].update_weights.remote(new[1:2], version + 1))
    assert new[1][0] == "model.layers.0.self_attn.q_proj.weight"
    assert ray.get(pool.actors[0].version.remote()) == version


def test_add_and_remove_actors_between_calls(
    pool: RolloutPool, hf_policy: torch.nn.Module, prompts: list[list[int]]
) -> None:
    weights = perturbed(hf_policy, seed=5)
    set_weights(pool, weights, pool.version + 1)
    fixed = SamplingConfig(n=2, max_new_tokens=8, seed=99)
    before = pool.generate(prompts, sampling=fixed)

    with pytest.raises(ValueError, match="pass the current weights"):
        pool.add_actors(1)
    with pytest.raises(ValueError, match="cannot join"):
        pool.add_actors(1, weights=weights, version=pool.version - 1)
    (added,) = pool.add_actors(1, weights=weights, version=pool.version)
    assert pool.num_actors == 3 and pool.actor_names[-1] == added
    grown = pool.generate(prompts, sampling=fixed)
    assert {s.actor_name for s in grown.samples} == set(pool.actor_names)
    assert {s.policy_version for s in grown.samples} == {pool.version}
    # Same seed, same weights: identical samples whichever actor served each prompt.
    assert [s.response_ids for s in grown.samples] == [s.response_ids for s in before.samples]

    assert pool.remove_actors(2) == ["rollout-1", added]
    assert pool.num_actors == 1 and pool.actor_names == ["rollout-0"]
    shrunk = pool.generate(prompts, sampling=fixed)
    assert [s.response_ids for s in shrunk.samples] == [s.response_ids for s in before.samples]
    print("\n1-actor pool tokens/s:", {k: round(v) for k, v in shrunk.tokens_per_s.items()})
    with pytest.raises(ValueError, match="between 1 and"):
        pool.remove_actors(1)


def test_rollout_actors_keep_rays_niceness_and_their_core_pinning(pool: RolloutPool) -> None:
    """Unlike learner ranks (tests/test_hardware.py), vLLM engines keep nice 15 and pin their own threads."""
    for actor in pool.actors:
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        env = process_environment(pid)
        assert process_niceness(pid) == 15
        assert "VLLM_CPU_OMP_THREADS_BIND" in env and env.get("OMP_WAIT_POLICY") != "ACTIVE"


def test_bad_input_raises_before_generating(pool: RolloutPool, prompts: list[list[int]]) -> None:
    before = ray.get([a.tokens_generated.remote() for a in pool.actors])
    with pytest.raises(ValueError, match="empty"):
        pool.generate([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pool.generate([prompts[0], []])
    too_long = list(range(3, 3 + MAX_MODEL_LEN))
    with pytest.raises(ValueError, match=rf"prompt 2 has {MAX_MODEL_LEN} tokens.*max_model_len={MAX_MODEL_LEN}"):
        pool.generate([prompts[0], prompts[1], too_long])
    # Called directly, the actor refuses the same way.
    with pytest.raises(ValueError, match="prompt 5 is empty"):
        ray.get(pool.actors[0].generate.remote([(5, [])], SamplingConfig()))
    assert ray.get([a.tokens_generated.remote() for a in pool.actors]) == before


def test_truncate_mode_keeps_the_last_tokens(
    model_cfg: ModelConfig, ray_cluster: None, prompts: list[list[int]]
) -> None:
    cfg = RolloutConfig(num_actors=1, kv_cache_space_gib=0.25, truncate_prompts=True)
    pool = RolloutPool(model_cfg, cfg)
    try:
        sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
        long = prompts[2] * 20
        result = pool.generate([prompts[0], long], sampling=sampling)
        assert result.samples[0].prompt_ids == prompts[0]
        assert result.samples[1].prompt_ids == long[-(MAX_MODEL_LEN - 8) :]
        assert len(result.samples[1].response_ids) == 8
    finally:
        pool.shutdown()
