"""Faults injected into real processes: a learner rank killed mid-update (F4), a checkpoint save killed
between its files (F5). The 20 random SIGKILLs of F5 and corrupted checksums are in test_checkpoint.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import torch

from learners import LearnerGroup
from rlhf_ray.checkpoint import CheckpointWriter, latest_complete, list_checkpoints, load_state, save_state
from rlhf_ray.config import AlgorithmConfig, LearnerConfig, ModelConfig
from rlhf_ray.protocol import Sample, collate
from rlhf_ray.ray_utils import ActorCallError


def _experience(group: LearnerGroup, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    samples = [Sample(i, 0, torch.randint(3, 60, (4,), generator=g).tolist(),
                      torch.randint(3, 60, (6,), generator=g).tolist(), [0.0] * 6, "stop", 0) for i in range(rows)]
    batch = collate(samples, pad_id=0)
    old = group.compute_logprobs(batch)
    advantages = torch.randn(old.shape, generator=g) * batch["response_mask"]
    return dict(batch, old_logprobs=old, ref_logprobs=old, advantages=advantages, kl_coef=torch.tensor(0.0))


@pytest.mark.slow
def test_learner_rank_killed_mid_update_stops_with_its_name_and_marks_no_checkpoint(
    ray_cluster: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """F4: the update raises naming the dead rank long before the call timeout; the save of the failed
    step raises too and leaves the previous checkpoint the newest complete one."""
    cfg = LearnerConfig(num_ranks=2, num_cpus_per_rank=0.5, zero_stage=2, micro_batch_size=2, minibatch_size=4,
                        ppo_epochs=4, call_timeout_s=120)
    writer = CheckpointWriter(tmp_path / "checkpoints", keep_last=2)
    with LearnerGroup("policy", str(tiny_model_dir / "policy"), cfg, ModelConfig(), AlgorithmConfig()) as group:
        exp = _experience(group, rows=64)  # 64 optimizer steps: seconds of work to be killed in
        with writer.begin(1) as tmp:
            group.save(str(tmp / "policy"))
        start = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            update = pool.submit(group.ppo_update, exp)
            time.sleep(1.0)
            assert not update.done(), "the update ended before the fault: nothing was tested"
            ray.kill(group.workers[1])
            with pytest.raises(ActorCallError, match=r"policy learner ppo_update failed: policy-learner-1 died"):
                update.result(timeout=cfg.call_timeout_s + 30)
        assert time.monotonic() - start < cfg.call_timeout_s / 2

        with pytest.raises(ActorCallError, match="policy-learner-1"):
            with writer.begin(2) as tmp:
                group.save(str(tmp / "policy"))
    assert [p.name for p in list_checkpoints(writer.root)] == ["step_000001"]
    assert latest_complete(writer.root) == writer.root / "step_000001"


CHILD = textwrap.dedent("""
    import sys, time, torch
    from rlhf_ray.checkpoint import CheckpointWriter, save_state
    with CheckpointWriter(sys.argv[1], keep_last=1).begin(2) as tmp:
        save_state(tmp / "driver", {"w": torch.full((4,), 2.0)}, {"step": 2})
        print("between files", flush=True)
        time.sleep(120)  # killed here, before the policy files
        (tmp / "policy").mkdir()
""")


def test_save_killed_between_files_resumes_from_the_previous_checkpoint(tmp_path: Path) -> None:
    """F5, deterministic: SIGKILL after the first file of a save (keep_last=1, so rotation is due)."""
    root = tmp_path / "checkpoints"
    with CheckpointWriter(root, keep_last=1).begin(1) as tmp:
        save_state(tmp / "driver", {"w": torch.full((4,), 1.0)}, {"step": 1})
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "between files"
        assert any(p.name.startswith(".tmp_step_000002_") for p in root.iterdir())
    finally:
        child.kill()
        child.wait()
    latest = latest_complete(root)
    assert latest == root / "step_000001"
    tensors, meta = load_state(latest / "driver")
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.full((4,), 1.0))
    with CheckpointWriter(root, keep_last=1).begin(2) as tmp:  # the retried save completes and cleans up
        save_state(tmp / "driver", {"w": torch.full((4,), 2.0)}, {"step": 2})
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]
