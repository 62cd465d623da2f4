"""Process hygiene and precision: nice 0 and the OpenMP policy on the running compute actors, ZeRO and dtype auto.

The live checks read /proc/<pid>/stat and /proc/<pid>/environ of the actors' own processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

from learners import LearnerGroup
from learners.optim import deepspeed_config
from rlhf_ray.config import LearnerConfig, ModelConfig, load_config
from rlhf_ray.driver.components import start_reference
from rlhf_ray.driver.plan import make_plan, resource_requests
from rlhf_ray.hardware import (
    COMPUTE_PROCESS_ENV,
    auto_dtype,
    cpu_flags,
    process_environment,
    process_niceness,
)

RAY_DEFAULT_NICENESS = 15  # Ray's `worker_niceness`


def pid_of(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


# ---------------------------------------------------------------- pure


def test_auto_dtype_is_bf16_only_where_the_hardware_multiplies_it() -> None:
    assert auto_dtype(frozenset({"avx512f", "avx512_bf16"}), cuda_bf16=False)[0] == "bfloat16"
    assert auto_dtype(frozenset({"amx_bf16", "amx_tile"}), cuda_bf16=False)[0] == "bfloat16"
    dtype, reason = auto_dtype(frozenset({"avx512f", "avx2"}), cuda_bf16=False)
    assert dtype == "float32" and "AVX512-BF16" in reason
    assert auto_dtype(frozenset(), cuda_bf16=True) == ("bfloat16", "the GPU supports bf16")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == frozenset({"fpu", "avx512f", "avx512_bf16"})
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_dtype_auto_resolves_when_the_config_is_loaded() -> None:
    cfg = load_config(None, ["model.dtype=auto"])
    assert cfg.model.dtype == auto_dtype()[0]  # actors never see "auto"
    assert load_config(None, []).model.dtype == "float32"  # the default does not change


def test_zero_stage_auto_is_0_on_one_rank_and_overridable() -> None:
    assert LearnerConfig().zero_stage_used(bf16=False) == 0
    assert LearnerConfig().zero_stage_used(bf16=True) == 2  # bf16 stage 0 not yet timed against ZeRO-2
    assert LearnerConfig(num_ranks=2, minibatch_size=8).zero_stage_used(bf16=False) == 2
    assert LearnerConfig(zero_stage=2).zero_stage_used(bf16=False) == 2
    assert LearnerConfig(zero_stage=0).zero_stage_used(bf16=True) == 0
    assert deepspeed_config(LearnerConfig(), 1, bf16=False)["zero_optimization"] == {"stage": 0}
    assert deepspeed_config(LearnerConfig(zero_stage=3), 1, bf16=False)["zero_optimization"] == {"stage": 3}


def test_plan_prints_zero_stage_dtype_and_process_settings() -> None:
    assert "ZeRO stage 0 (auto: one rank, nothing to partition)" in make_plan(load_config(), {"CPU": 8.0}).render()
    text = make_plan(load_config(None, ["model.dtype=bfloat16"]), {"CPU": 8.0}).render()
    assert "ZeRO stage 2 (auto: bf16 on one rank: stage 0 not yet timed against ZeRO-2)" in text
    assert "dtype bfloat16 for learners, reference and vLLM; fp32 master weights" in text
    assert "RAY_worker_niceness=0" in text and "OMP_WAIT_POLICY=ACTIVE" in text
    two = load_config(None, ["learner.num_ranks=2", "learner.zero_stage=3"])
    assert "ZeRO stage 3 (learner.zero_stage)" in make_plan(two, {"CPU": 8.0}).render()


# ---------------------------------------------------------------- live actors


def assert_compute_process(pid: int) -> None:
    assert process_niceness(pid) == 0
    env = process_environment(pid)
    assert {k: env.get(k) for k in COMPUTE_PROCESS_ENV} == COMPUTE_PROCESS_ENV


def test_learner_ranks_and_reference_run_at_nice_0_with_the_compute_openmp_policy(
    ray_cluster: None, tiny_model_dir: Path
) -> None:
    policy = str(tiny_model_dir / "policy")
    with LearnerGroup("policy", policy, LearnerConfig(num_cpus_per_rank=0.5), ModelConfig()) as group:
        assert_compute_process(pid_of(group.workers[0]))
        assert ray.get(group.workers[0].__ray_call__.remote(lambda w: w.engine.zero_optimization_stage())) == 0
    cfg = load_config(None, [f"model.policy_path={policy}", "reference.placement=actor"])
    requests = {r.name: r.ray_options() for r in resource_requests(cfg)}
    reference = start_reference(cfg, requests["reference"])
    try:
        assert_compute_process(pid_of(reference))
    finally:
        ray.kill(reference)
    # Any other actor keeps Ray's default: the check above can fail.
    other = ray.remote(num_cpus=0)(type("Plain", (), {})).remote()
    try:
        assert process_niceness(pid_of(other)) == RAY_DEFAULT_NICENESS
    finally:
        ray.kill(other)
