"""Tied and untied LM heads, Qwen2 and Llama: after a broadcast vLLM scores tokens exactly as the learner does.

Real Ray, vLLM and DeepSpeed on CPU; one learner rank and one rollout actor per model family. The
untied Qwen2 case is the session model of the other broadcast tests (test_weight_broadcast.py),
which run the same probe on every broadcast.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from actors.rollout_pool import RolloutPool
from learners import LearnerGroup
from rlhf_ray.config import LearnerConfig, ModelConfig, RolloutConfig, SamplingConfig, WeightSyncConfig
from rlhf_ray.driver.broadcaster import WeightBroadcaster
from rlhf_ray.protocol import collate
from rlhf_ray.recipes.tiny import make_tiny

MODELS = [("qwen2", True), ("llama", True), ("llama", False)]


@pytest.fixture(scope="module", params=MODELS, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in MODELS])
def setup(request, tmp_path_factory, ray_cluster: None) -> Iterator[tuple[LearnerGroup, RolloutPool, WeightBroadcaster]]:
    arch, tie = request.param
    paths = make_tiny(tmp_path_factory.mktemp(f"{arch}{int(tie)}"), arch=arch, tie=tie, reward_model=False)
    model_cfg = ModelConfig(policy_path=str(paths["policy"]), max_model_len=64)
    # lr 0.01, as in the run where the tied head drifted by 0.36 nats/token after one step
    learner_cfg = LearnerConfig(num_ranks=1, zero_stage=2, lr=1e-2, micro_batch_size=4, minibatch_size=4)
    policy = LearnerGroup("policy", model_cfg.policy_path, learner_cfg, model_cfg)
    pool = RolloutPool(model_cfg, RolloutConfig(num_actors=1, kv_cache_space_gib=0.25))
    sync = WeightBroadcaster(policy, pool, WeightSyncConfig(bucket_mb=0.05, timeout_s=30, probe_every=1))
    yield policy, pool, sync
    pool.shutdown()
    policy.shutdown()


def _sft_step(policy: LearnerGroup, seed: int) -> None:
    ids = torch.randint(5, 400, (4, 16), generator=torch.Generator().manual_seed(seed))
    policy.sft_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)})


def test_probe_and_sampled_logprobs_match_after_each_broadcast(setup):
    policy, pool, sync = setup
    for step in range(2):
        _sft_step(policy, seed=step)
        stats = sync.broadcast()  # raises if any actor's probe log-probs differ from the learner's
        assert stats.probe_diff_mean < 1e-4 and stats.probe_diff_max < 1e-3, stats
        # the tokens vLLM actually samples, scored by both sides
        prompts = [[5 + i, 17, 42 + i] for i in range(4)]
        rollout = pool.generate(prompts, n=2, sampling=SamplingConfig(temperature=1.0, max_new_tokens=8, seed=step))
        batch = collate(rollout.samples, pad_id=0)
        gap = ((policy.compute_logprobs(batch) - batch["rollout_logprobs"]).abs() * batch["response_mask"]).max()
        assert gap < 1e-4, f"step {step}: vLLM vs learner log-prob gap {gap:.2e}"


def test_probe_catches_an_engine_that_computes_with_other_weights(setup):
    policy, pool, sync = setup
    weights = policy.export_weights()
    # the actor serves weights the learner does not hold: an embedding off by a little everywhere
    noise = torch.Generator().manual_seed(0)
    skewed = [(n, t + 0.05 * torch.randn(t.shape, generator=noise) if "embed_tokens" in n else t) for n, t in weights]
    embed_module = [(n, t) for n, t in skewed if "embed_tokens" in n]
    import ray

    ray.get(pool.actors[0].update_weights.remote(embed_module, pool.version))
    with pytest.raises(RuntimeError, match="probe batch differ"):
        sync.probe(pool.version)
    ray.get(pool.actors[0].update_weights.remote([(n, t) for n, t in weights if "embed_tokens" in n], pool.version))
    assert sync.probe(pool.version)[0] < 1e-4


def test_probe_batch_scores_every_token_after_the_first(tiny_model_dir):
    """The learner's view of the probe equals a plain next-token loop over each sequence."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.modeling import response_logprobs
    from rlhf_ray.probe import probe_batch, probe_gap, probe_token_ids, probe_tolerance

    ids = probe_token_ids(vocab_size=300, rows=2, length=6, seed=3)
    assert ids == probe_token_ids(300, 2, 6, 3) and ids != probe_token_ids(300, 2, 6, 4)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "policy", dtype=torch.float32).eval()
    with torch.no_grad():
        got = response_logprobs(model, probe_batch(ids))
        want = []
        for seq in ids:
            logits = model(torch.tensor([seq])).logits[0]
            want.append([float(logits[t - 1].log_softmax(-1)[seq[t]]) for t in range(1, len(seq))])
    assert probe_gap(got, want)[1] < 1e-5
    assert probe_tolerance("float32", None) == 1e-3 and probe_tolerance("bfloat16", None) == 5e-2
    assert probe_tolerance("bfloat16", 0.2) == 0.2
    with pytest.raises(ValueError, match="probe_tokens"):
        probe_token_ids(300, 2, 1, 0)


def test_logprob_temperature_is_the_sampling_temperature_and_1_for_greedy():
    from rlhf_ray.config import load_config

    assert load_config(None, ["rollout.sampling.temperature=0.7"]).logprob_temperature == 0.7
    assert load_config(None, ["rollout.sampling.temperature=0"]).logprob_temperature == 1.0
