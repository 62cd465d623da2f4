"""GPU weight-sync paths: CUDA IPC between colocated processes and NCCL between GPUs.

They need CUDA (and the `vllm` GPU build for the end-to-end cases), so on CPU machines they skip
with the reason; the CPU checks at the top run everywhere.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.cuda_ipc import export_bucket, open_bucket
from rlhf_ray.weight_sync import layer_checksums

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
