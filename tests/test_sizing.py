"""`rlhf-ray plan --cluster`: parameter counts, memory per GPU against hand arithmetic, fits / does not fit."""

import re

import pytest

from rlhf_ray.cli import main
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.driver.cluster_plan import load_cluster_spec
from rlhf_ray.driver.memory_estimate import (
    GIB, Assumptions, inference_bytes, learner_bytes, load_shape, reward_model_bytes, rollout_memory, shared_gpu_bytes,
    step_seconds,
)

RECIPE = "configs/qwen2.5-1.5b-grpo.yaml"
QWEN_1_5B = "configs/models/qwen2.5-1.5b.json"


@pytest.mark.parametrize("name, published", [
    ("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304),
    ("qwen2.5-7b", 7_615_616_512), ("llama-3.1-70b", 70_553_706_496),
])
def test_parameters_equal_the_published_counts(name, published):
    assert load_shape(f"configs/models/{name}.json").parameters == published


def test_learner_memory_of_the_grpo_recipe_by_hand():
    # Qwen2.5-1.5B, bf16, ZeRO-3 over 3 ranks, gradient checkpointing, micro-batch 4, sequence 2048.
    cfg = load_config(RECIPE, [])
    got = learner_bytes(load_shape(QWEN_1_5B), cfg, ranks=3, assume=Assumptions())
    psi = 1_543_714_304
    assert got["weights"] == pytest.approx(2 * psi / 3) and got["gradients"] == pytest.approx(2 * psi / 3)
    assert got["optimizer"] == 6_174_857_216  # 12 bytes × Ψ / 3
    assert got["activations"] == 1_132_462_080  # (28 layers × 2 bytes + 34) × 2048 × 4 × 1536
    assert got["logits"] == 9_957_277_696  # 8 bytes × 4 × 2048 × 151936
    assert got["overhead"] == 2 * GIB
    assert sum(got.values()) / GIB == pytest.approx(19.99584, abs=1e-5)  # 21,470,366,378.7 bytes


def test_shared_gpu_memory_by_hand():
    """The GRPO recipe's GPU 0 holds learner rank 0 (ZeRO-3 over 4) and the reference: their peaks add up."""
    cfg, shape = load_config(RECIPE, []), load_shape(QWEN_1_5B)
    psi, logits, overhead = 1_543_714_304, 9_957_277_696, 2 * GIB
    rank = 2 * psi / 4 + 2 * psi / 4 + 12 * psi / 4 + 1_132_462_080 + logits + overhead
    reference = 2 * psi + logits + overhead  # bf16 weights, one micro-batch's fp32 logits and log-softmax
    parts = {"learner": learner_bytes(shape, cfg, 4, Assumptions()), "reference": inference_bytes(shape, cfg, Assumptions())}
    assert shared_gpu_bytes(parts) == pytest.approx(rank + reference)
    assert (rank + reference) / GIB == pytest.approx(32.23, abs=0.01)  # of the L40S's 44.5 GiB


def test_reward_model_takes_its_vllm_budget():
    cfg = load_config("configs/qwen2.5-1.5b-ppo.yaml", [])
    got = reward_model_bytes(load_shape(QWEN_1_5B), cfg, 44.5, Assumptions())
    assert sum(got.values()) == pytest.approx(0.25 * 44.5 * GIB)  # reward.gpu_memory_utilization of the GPU
    assert got["weights"] == 2 * 1_543_714_304 and got["KV cache"] == pytest.approx(0.25 * 44.5 * GIB - 2 * 1_543_714_304 - 2 * GIB)
    tiny = reward_model_bytes(load_shape(QWEN_1_5B), cfg.model_copy(update={"reward": cfg.reward.model_copy(
        update={"gpu_memory_utilization": 0.05})}), 44.5, Assumptions())
    assert tiny["KV cache"] < 0  # 2.2 GiB cannot hold 2.9 GiB of weights: the plan says DOES NOT FIT


@pytest.mark.parametrize("stage, expected_bytes_per_param", [(0, 16), (1, 4 + 12 / 4), (2, 2 + 14 / 4), (3, 16 / 4)])
def test_zero_stages_partition_what_they_should(stage, expected_bytes_per_param):
    cfg = load_config(RECIPE, [f"learner.zero_stage={stage}"])
    got = learner_bytes(load_shape(QWEN_1_5B), cfg, ranks=4, assume=Assumptions())
    states = got["weights"] + got["gradients"] + got["optimizer"]
    assert states == pytest.approx(expected_bytes_per_param * 1_543_714_304)


def test_fp32_has_no_separate_master_copy():
    cfg = load_config(RECIPE, ["learner.zero_stage=0", "model.dtype=float32"])
    got = learner_bytes(load_shape(QWEN_1_5B), cfg, ranks=1, assume=Assumptions())
    assert got["weights"] + got["gradients"] + got["optimizer"] == 16 * 1_543_714_304  # 4 + 4 + Adam 8


def test_rollout_kv_cache_by_hand():
    cfg = load_config(RECIPE, [])
    m = rollout_memory(load_shape(QWEN_1_5B), cfg, gpu_memory_gib=80, assume=Assumptions())
    assert m.kv_bytes_per_token == 28_672  # 2 (K, V) × 28 layers × 2 KV heads × 128 × 2 bytes
    budget = 0.85 * 80 * GIB
    assert m.budget == budget and m.weights == 2 * 1_543_714_304
    assert m.kv_tokens == int((budget - 3_087_428_608 - 2 * GIB) // 28_672)
    tp2 = rollout_memory(load_shape(QWEN_1_5B), load_config(RECIPE, ["rollout.tensor_parallel_size=2"]), 80, Assumptions())
    assert tp2.kv_bytes_per_token == 14_336 and tp2.weights == 1_543_714_304


def test_step_time_by_hand():
    cfg = load_config(RECIPE, [])
    t = step_seconds(load_shape(QWEN_1_5B), cfg, 362, 362, Assumptions())
    psi, samples, response = 1_543_714_304, 48 * 8, 512
    assert t["generate"] == pytest.approx(2 * psi * samples * response / (4 * 362e12 * 0.1))
    tokens = samples * (256 + response)
    assert t["update"] == pytest.approx(8 * psi * tokens / (4 * 362e12 * 0.3))  # checkpointing: 8Ψ per token
    assert t["sync"] == pytest.approx(2 * psi / 10e9)


def plan_exit_code(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(["plan", RECIPE, *args])
    return exit_.value.code


def test_plan_cluster_command(capsys):
    assert plan_exit_code("--cluster", "cluster/pools.yaml", "--model-config", QWEN_1_5B) == 0
    out = capsys.readouterr().out
    assert "learner rank (4 in ZeRO)" in out and "= 18.1 GiB -> fits" in out
    # the reference shares rank 0's GPU: both peaks on one 44.5 GiB L40S
    assert "shared GPU, rank 0         on learner (44.5 GiB): learner 18.1 + reference 14.1 = 32.2 GiB" in out
    assert "602 sequences of 2048" in out and "step time estimate:" in out


def test_plan_cluster_reports_what_does_not_fit(tmp_path, capsys):
    spec = tmp_path / "small.yaml"
    spec.write_text("pools:\n"
                    "  learner: {count: 1, cpus: 48, gpus: 4, gpu_memory_gib: 16, gpu_tflops: 65, resources: {learner: 4}}\n"
                    "  rollout: {count: 4, cpus: 8, gpus: 1, gpu_memory_gib: 16, gpu_tflops: 65, resources: {rollout: 1}}\n")
    assert plan_exit_code("--cluster", str(spec), "--model-config", QWEN_1_5B) == 1
    assert "18.1 GiB -> DOES NOT FIT" in capsys.readouterr().out
    spec.write_text(spec.read_text().replace("count: 4", "count: 2"))  # too few rollout nodes: a placement error
    assert plan_exit_code("--cluster", str(spec), "--model-config", QWEN_1_5B) == 1
    assert "rollout: need 4" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("pools: {g: {count: 1, cpus: 8, gpus: 2}}", r"pools.g has gpus=2 but gpu_memory_gib=0.*\(fix: give both"),
    ("pools: {g: {count: 0, cpus: 8}}", r"pools.g.count\s+Input should be greater than or equal to 1"),
    ("pools: {g: {count: 1, cpus: 8}}\nassumptions: {mfu: 0.5}", r"unknown assumptions \['mfu'\]"),
])
def test_bad_specs_name_the_field(tmp_path, text, message):
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_cluster_spec(str(spec))


def test_missing_model_config_names_the_flag(capsys):
    assert main(["plan", RECIPE, "--cluster", "cluster/pools.yaml"]) == 2
    assert "pass --model-config" in capsys.readouterr().err


def test_async_recipe_overlaps_generation(capsys):
    assert plan_exit_code("--cluster", "cluster/pools.yaml", "--model-config", QWEN_1_5B) == 0
    sync_total = int(re.search(r"step time estimate: (\d+) s", capsys.readouterr().out).group(1))
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "configs/qwen2.5-1.5b-grpo-async.yaml", "--cluster", "cluster/pools.yaml",
              "--model-config", QWEN_1_5B])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    async_total = int(re.search(r"step time estimate: (\d+) s per RL step = max\(generate, the rest\)", out).group(1))
    assert async_total == 19 and sync_total == 23  # 8.4 + 2.1 + 8.4 + 0.3 = 19.2 vs + generate 4.2
