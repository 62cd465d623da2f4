"""The supervisor around `train()`: when a learner rank dies, resume from the last complete checkpoint.

`train()` tears its actors and placement groups down whatever happens (`RunComponents.close`),
so a restart is a fresh `train(cfg, run_dir, resume=True)`: new learner ranks, new rollout pool,
state from the newest complete checkpoint (a checkpoint the failed step was writing is never
complete). After `train.max_learner_restarts` restarts the next failure ends the run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rlhf_ray.checkpoint import CheckpointWriter, latest_complete, step_of
from rlhf_ray.config import RunConfig
from rlhf_ray.driver.loop import train
from rlhf_ray.ray_utils import LearnerRankError

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"


class RunFailedError(RuntimeError):
    """The run stopped for good: learner ranks kept dying after every allowed restart."""


def last_logged_step(run_dir: Path) -> int:
    """The last step with a line in metrics.jsonl, or -1."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return -1
    steps = [json.loads(line).get("step", -1) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=-1)


def record_event(run_dir: Path, event: dict[str, Any]) -> None:
    """Append a failure or recovery event to `run_dir/events.jsonl` (one JSON object per line)."""
    with open(run_dir / EVENTS_FILE, "a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def train_supervised(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """`train()`, resumed from the last complete checkpoint after each learner-rank death, at most
    `cfg.train.max_learner_restarts` times; returns the last step's metrics."""
    limit = cfg.train.max_learner_restarts
    restarts = 0
    while True:
        try:
            return train(cfg, run_dir, resume=resume or restarts > 0)
        except LearnerRankError as err:
            failed_step = last_logged_step(run_dir) + 1
            root = CheckpointWriter.for_run(run_dir, cfg.checkpoint).root
            checkpoint = latest_complete(root)
            resume_step = step_of(checkpoint) if checkpoint is not None else 0
            event = {
                "event": "learner_failure", "ranks": err.failed, "nodes": err.nodes, "step": failed_step,
                "restart": restarts + 1, "max_learner_restarts": limit, "resume_from_step": resume_step,
                "error": str(err)[:500],
            }
            record_event(run_dir, event)
            if restarts >= limit:
                ranks = ", ".join(f"{r} on node {err.nodes[r]}" if r in err.nodes else r for r in err.failed)
                raise RunFailedError(
                    f"learner rank {ranks} died at step {failed_step} and "
                    f"train.max_learner_restarts={limit} restarts are used up; the last complete checkpoint "
                    f"is step {resume_step} in {root}. Fix the cause (see the rank's log in "
                    "the Ray session's logs folder), then `rlhf-ray train ... --resume`, or raise "
                    f"train.max_learner_restarts. Last error: {err}"
                ) from err
            restarts += 1
            log.error(
                "learner rank %s died at step %d (%s); restart %d of %d from the checkpoint at step %d",
                ", ".join(err.failed), failed_step, err, restarts, limit, resume_step,
            )
            print(json.dumps({k: v for k, v in event.items() if k != "error"}), flush=True)
