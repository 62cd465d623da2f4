"""reference.placement=learner: the policy learner ranks hold the frozen reference and compute its log-probs.

They must give what the ReferenceActor gives on the same batch (real Ray, real DeepSpeed, transformers),
at the sampling temperature, in the run's dtype: an untied head on one bf16 rank without ZeRO, and a tied
head sharded by ZeRO-3 over two fp32 ranks; the run plan and memory estimate show where the reference lives.
The GRPO run with it is `test_pipeline.py::test_sampling_temperature_reaches_learner_and_reference[auto-learner]`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from learners import LearnerGroup
from rlhf_ray.config import LearnerConfig, ModelConfig, load_config
from rlhf_ray.driver.components import start_reference
from rlhf_ray.driver.memory_estimate import Assumptions, learner_bytes, load_shape, step_seconds
from rlhf_ray.driver.plan import make_plan, resource_requests
from rlhf_ray.protocol import Sample, collate
from rlhf_ray.recipes.tiny import make_tiny

TEMPERATURE = 0.7
FP32_NOISE = 1e-5  # nats: the same fp32 forward on other row groupings (one rank's rows vs the whole batch)
GRPO = Path(__file__).resolve().parents[1] / "configs" / "qwen2.5-1.5b-grpo.yaml"


def random_batch(vocab: int, rows: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    samples = []
    for i in range(rows):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        samples.append(Sample(i, 0, prompt, response, [0.0] * len(response), "stop", 0))
    return collate(samples, pad_id=0)


@pytest.mark.parametrize("tied, ranks, zero_stage, dtype", [
    (False, 1, 0, "bfloat16"), (True, 2, 3, "float32"),
], ids=["untied-1rank-zero0-bf16", "tied-2ranks-zero3-fp32"])
def test_learner_held_reference_equals_the_reference_actor(
    ray_cluster: None, tiny_model_dir: Path, tmp_path: Path, tied: bool, ranks: int, zero_stage: int, dtype: str
) -> None:
    path = str(make_tiny(tmp_path, arch="llama", tie=True, reward_model=False)["policy"]) if tied else str(
        tiny_model_dir / "policy")
    cfg = load_config(None, [f"model.policy_path={path}", "learner.micro_batch_size=2", f"model.dtype={dtype}",
                              "reference.placement=actor"])
    reference = start_reference(cfg, {r.name: r.ray_options() for r in resource_requests(cfg)}["reference"])
    learner_cfg = LearnerConfig(num_ranks=ranks, num_cpus_per_rank=0.5, zero_stage=zero_stage, micro_batch_size=2,
                                minibatch_size=2 * ranks, lr=1e-2)
    group = LearnerGroup("policy", path, learner_cfg, cfg.model, hold_reference=True)
    try:
        batch = random_batch(int(cfg_vocab(path)))
        expected = ray.get(reference.compute_logprobs.remote(batch, TEMPERATURE))
        held = group.start_ref_logprobs(batch, TEMPERATURE)()
        assert held.shape == expected.shape and held.dtype == torch.float32
        if ranks == 1:  # the same micro-batches through the same bf16 weights and fp32 buffers: bit for bit
            assert torch.equal(held, expected)
        assert float((held - expected).abs().max()) < FP32_NOISE
        assert torch.equal(held * batch["response_mask"], held)  # 0 on padding
        # At temperature 1 the numbers differ: the temperature reached the ranks.
        assert float((group.start_ref_logprobs(batch)() - held).abs().max()) > 1e-3
        if zero_stage == 3:  # each rank holds a shard of the reference, not a copy
            local, full = zip(*ray.get([w.__ray_call__.remote(lambda w: (
                sum(p.ds_tensor.numel() for p in w.reference.module.parameters()),
                sum(p.ds_numel for p in w.reference.module.parameters()),
            )) for w in group.workers]))  # fmt: skip
            assert all(abs(n - f / ranks) < 64 for n, f in zip(local, full)), (local, full)  # up to padding

        # An update moves the policy, never the reference.
        ids = torch.randint(5, 400, (2 * ranks, 10), generator=torch.Generator().manual_seed(1))
        policy_before = group.compute_logprobs(batch, TEMPERATURE)
        group.sft_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)})
        assert float((group.compute_logprobs(batch, TEMPERATURE) - policy_before).abs().max()) > 1e-3
        assert torch.equal(group.start_ref_logprobs(batch, TEMPERATURE)(), held)
    finally:
        ray.kill(reference)
        group.shutdown()


def cfg_vocab(path: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).vocab_size


def test_only_a_policy_group_holds_the_reference(tiny_model_dir: Path) -> None:
    path = str(tiny_model_dir / "policy")
    with pytest.raises(ValueError, match="only a policy learner group can hold the reference, not a critic group"):
        LearnerGroup("critic", path, LearnerConfig(), ModelConfig(policy_path=path), hold_reference=True)


def test_plan_and_memory_estimate_show_the_reference_in_the_learner() -> None:
    # The recipe shares GPU 0 with a colocated reference actor; held by the learners, it needs no share.
    actor = load_config(GRPO, ["reference.colocate=false"])
    held = load_config(GRPO, ["reference.placement=learner", "reference.colocate=false"])
    ranks = held.learner.num_ranks
    assert "reference" in {r.name for r in resource_requests(actor)}
    assert "reference" not in {r.name for r in resource_requests(held)}  # no actor, no CPUs or GPU of its own
    text = make_plan(held, {"CPU": 1000.0, "GPU": 100.0, "learner": 100.0, "rollout": 100.0}).render()
    assert f"reference held by the policy learner ranks (sharded over the {ranks} ranks like the policy)" in text
    assert "reference in a ReferenceActor of its own" in make_plan(actor, {"CPU": 1000.0, "GPU": 100.0,
                                                                           "learner": 100.0, "rollout": 100.0}).render()
    shape = load_shape(str(Path(__file__).resolve().parents[1] / "configs/models/qwen2.5-1.5b.json"))
    with_ref = learner_bytes(shape, held, ranks=3, assume=Assumptions())
    assert "reference" not in learner_bytes(shape, actor, ranks=3, assume=Assumptions())
    assert with_ref["reference"] == pytest.approx(2 * 1_543_714_304 / 3)  # bf16 weights, ZeRO-3 over 3 ranks
    t_actor, t_held = (step_seconds(shape, c, 362, 362, Assumptions()) for c in (actor, held))
    assert t_held["reference"] == pytest.approx(t_actor["reference"] / ranks)  # the forward split over the ranks
