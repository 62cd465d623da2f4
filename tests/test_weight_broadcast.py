"""Weight broadcast learner → rollout actors with real Ray, vLLM and DeepSpeed (CPU, gloo)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.rollout_pool import RolloutPool
from learners import LearnerGroup
from rlhf_ray.driver.broadcaster import WeightBroadcaster
from rlhf_ray.config import LearnerConfig, ModelConfig, RolloutConfig, SamplingConfig, WeightSyncConfig
from rlhf_ray.driver.recovery import broadcast_replacing_dead
from rlhf_ray.protocol import collate
from rlhf_ray.ray_utils import ActorCallError
from rlhf_ray.weight_sync import compare_checksums, expected_layer_sums, param_sums

MAX_LEN = 64


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def setup(request, tiny_model_dir: Path, ray_cluster: None) -> Iterator[tuple[LearnerGroup, RolloutPool, WeightBroadcaster]]:
    model_cfg = ModelConfig(policy_path=str(tiny_model_dir / "policy"), max_model_len=MAX_LEN)
    learner_cfg = LearnerConfig(num_ranks=2, zero_stage=request.param, lr=5e-3, micro_batch_size=2, minibatch_size=4)
    policy = LearnerGroup("policy", model_cfg.policy_path, learner_cfg, model_cfg)
    pool = RolloutPool(model_cfg, RolloutConfig(num_actors=2, kv_cache_space_gib=0.25,
                                                sampling=SamplingConfig(max_new_tokens=8)))
    sync = WeightBroadcaster(policy, pool, WeightSyncConfig(bucket_mb=0.05, timeout_s=20))
    pool.current_weights = policy.export_weights
    yield policy, pool, sync
    pool.shutdown()
    policy.shutdown()


def sent_sums(policy: LearnerGroup, sync: WeightBroadcaster):
    """What the learner sent for the pool's current version, as `WeightBroadcaster.verify` takes it."""
    return param_sums(policy.export_weights(), sync.pool.version, sync.cfg.verify_columns)


def _train_step(policy: LearnerGroup, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 400, (4, 12), generator=g)
    policy.sft_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)})


def _prompts(k: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(5, 400, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(k)]


def test_broadcast_makes_vllm_match_the_learner(setup, tiny_model_dir: Path):
    policy, pool, sync = setup
    _train_step(policy, seed=0)
    stats = sync.broadcast()
    assert stats.version == pool.version == 1 and stats.bytes > 0 and stats.gb_per_s > 0

    # greedy tokens equal transformers' greedy tokens computed from the learner's exported weights
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "policy", dtype=torch.float32).eval()
    hf.load_state_dict(dict(policy.export_weights()), strict=False)
    hf.tie_weights()
    prompts = _prompts(16)
    greedy = pool.generate(prompts, n=1, sampling=SamplingConfig(temperature=0.0, max_new_tokens=8))
    for p, s in zip(prompts, greedy.samples):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=len(s.response_ids), do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert s.response_ids == want
        assert s.policy_version == 1

    # sampled-token log-probs from vLLM equal the learner's own forward pass
    sampled = pool.generate(prompts, n=2, sampling=SamplingConfig(temperature=1.0, max_new_tokens=8, seed=7))
    batch = collate(sampled.samples, pad_id=0)
    learner_logp = policy.compute_logprobs(batch)
    gap = ((learner_logp - batch["rollout_logprobs"]).abs() * batch["response_mask"]).max()
    assert gap < 1e-4, f"vLLM vs learner log-prob gap {gap:.2e}"

    # The proof reads CPU vLLM's repacked linear weights back through the kernel on the version's sampled
    # columns: it equals the learner's sums over those columns, not over others, and catches stale weights.
    version, sums, column_sampled = ray.get(pool.actors[0].weight_report.remote(sync.cfg.verify_columns))
    assert "model.layers.0.self_attn.q_proj.weight" in column_sampled and "model.embed_tokens.weight" not in column_sampled
    exported, columns = policy.export_weights(), sync.cfg.verify_columns
    compare_checksums(expected_layer_sums(param_sums(exported, version, columns), column_sampled), sums, "actor")
    with pytest.raises(RuntimeError, match="layer 'model.layers.0'"):
        compare_checksums(expected_layer_sums(param_sums(exported, version + 1, columns), column_sampled), sums, "actor")
    _train_step(policy, seed=1)  # the learner moves on without a broadcast
    with pytest.raises(RuntimeError, match=f"weight checksum mismatch on {pool.actor_names[0]}: layer"):
        sync.verify(sent_sums(policy, sync))


def test_versions_and_joining_actor(setup):
    policy, pool, sync = setup
    start = pool.version
    for k in range(2):
        _train_step(policy, seed=10 + k)
        assert sync.broadcast().version == start + k + 1
    names = pool.add_actors(1)
    result = pool.generate(_prompts(6), n=1)
    assert {s.policy_version for s in result.samples} == {pool.version}
    assert any(s.actor_name == names[0] for s in result.samples) or pool.num_actors == 3
    sync.broadcast()  # the group is rebuilt with the new member
    assert ray.get(pool.actors[-1].version.remote()) == pool.version
    pool.remove_actors(1)


def test_dead_actor_is_named_and_a_resend_makes_survivors_consistent(setup, request):
    policy, pool, sync = setup
    if request.node.callspec.id != "zero2":
        pytest.skip("the repair path does not depend on the ZeRO stage; run once, under ZeRO-2")
    victim = pool.actor_names[-1]
    before, members = pool.version, list(pool.actor_names)
    ray.kill(pool.actors[-1])
    _train_step(policy, seed=99)
    with pytest.raises(ActorCallError, match=victim) as failed:
        sync.broadcast()
    # the broadcaster names the dead and leaves the pool (its owner) and its version as they were
    assert failed.value.dead == [victim] and pool.actor_names == members and pool.version == before
    pool.discard([victim])
    assert sync.broadcast(version=before + 1).version == pool.version == before + 1
    # every survivor holds the learner's new weights, labelled with the new version
    sync.verify(sent_sums(policy, sync))


def test_actor_lost_during_a_run_broadcast_is_replaced_and_the_step_goes_on(setup, request):
    policy, pool, sync = setup
    if request.node.callspec.id != "zero2":
        pytest.skip("the replacement path does not depend on the ZeRO stage; run once, under ZeRO-2")
    if pool.num_actors < 2:
        pool.add_actors(2 - pool.num_actors)
    victim, before, used = pool.actor_names[0], pool.version, pool.replacements
    ray.kill(pool.actors[0])
    _train_step(policy, seed=7)
    run = SimpleNamespace(pool=pool, broadcaster=sync, cfg=SimpleNamespace(rollout=RolloutConfig(max_replacements=5)))
    stats, failures = broadcast_replacing_dead(run, step=4)
    assert stats.version == pool.version == before + 1 and pool.num_actors == 2
    assert [(f.name, f.step, f.lost_samples) for f in failures] == [(victim, 4, 0)]
    assert failures[0].replaced_by in pool.actor_names and victim not in pool.actor_names
    assert pool.replacements == used + 1
    sync.verify(sent_sums(policy, sync))  # survivor and replacement: the new weights, new version
    out = pool.generate(_prompts(4), n=1)
    assert {s.policy_version for s in out.samples} == {pool.version}
