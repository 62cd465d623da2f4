"""Live scaling of the rollout pool, replacement of actors lost during a broadcast, and the record of failures.

`rlhf-ray scale RUN_DIR --rollout N` writes `RUN_DIR/control.json`; the driver calls
`apply_scaling(c, step)` between steps, which grows the pool (new actors get the current weights
and join the weight-sync group before they serve) or shrinks it to N actors. The file stays in
place, so a resumed run comes back at the requested size.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_ray.driver.broadcaster import BroadcastStats
from rlhf_ray.config import ConfigError
from rlhf_ray.protocol import ActorFailure, RolloutResult
from rlhf_ray.ray_utils import ActorCallError, LearnerRankError

if TYPE_CHECKING:
    from rlhf_ray.driver.components import RunComponents
    from rlhf_ray.tracking import Tracker

log = logging.getLogger(__name__)

CONTROL_FILE = "control.json"


@dataclass(frozen=True)
class ScaleRequest:
    num_actors: int
    requested_at: float  # tells a new request from one already tried


def write_scale_request(run_dir: str | os.PathLike, rollout: int) -> Path:
    """Ask the run in `run_dir` for `rollout` actors; the file is replaced atomically, so the driver
    never reads half of it. Returns the control file's path."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{str(run_dir)!r} is not a run folder (no config.yaml there); pass the folder of a running "
            "`rlhf-ray train`, i.e. train.output_dir/train.run_name"
        )
    if rollout < 1:
        raise ConfigError(f"--rollout {rollout}: a run needs at least 1 rollout actor; pass --rollout 1 or more")
    request = {"rollout": {"num_actors": rollout}, "requested_at": time.time()}
    fd, tmp = tempfile.mkstemp(prefix=".control.", dir=run_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(request, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / CONTROL_FILE)
    return run_dir / CONTROL_FILE


def read_scale_request(run_dir: str | os.PathLike) -> ScaleRequest | None:
    """The requested number of rollout actors, or None without a (valid) control file.

    A malformed file is logged and ignored: a typo must not stop a running job.
    """
    path = Path(run_dir) / CONTROL_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        n, requested_at = data["rollout"]["num_actors"], float(data.get("requested_at", 0.0))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.error("ignoring %s: expected {\"rollout\": {\"num_actors\": N}} (%s); rewrite it with `rlhf-ray scale`", path, err)
        return None
    if not isinstance(n, int) or n < 1:
        log.error("ignoring %s: rollout.num_actors=%r must be an integer >= 1; rewrite it with `rlhf-ray scale`", path, n)
        return None
    return ScaleRequest(n, requested_at)


def apply_scaling(c: RunComponents, step: int) -> dict[str, float]:
    """Bring the rollout pool to the size requested in the control file (if any) before `step`.

    Actors that cannot start (e.g. no node offers their resources within `rollout.call_timeout_s`)
    are logged and the run goes on with the pool it has; that request is not tried again, a new
    `rlhf-ray scale` is. Returns `rollout/num_actors`, the pool size the step runs with.
    """
    request = read_scale_request(c.run_dir)
    have = c.pool.num_actors
    if request is None or request.num_actors == have or request.requested_at == c.failed_scale_request:
        return {"rollout/num_actors": float(have)}
    start, target = time.perf_counter(), request.num_actors
    try:
        if target > have:
            names, verb = c.pool.add_actors(target - have), "added"
        else:
            names, verb = c.pool.remove_actors(have - target), "removed"
    except ActorCallError as err:
        c.failed_scale_request = request.requested_at
        log.error(
            "step %d: could not scale the rollout pool %d -> %d actors (%s); going on with %d. "
            "Free or add capacity, then run `rlhf-ray scale` again", step, have, target, err, c.pool.num_actors,
        )
        return {"rollout/num_actors": float(c.pool.num_actors)}
    log.warning(
        "step %d: rollout pool scaled %d -> %d actors (%s %s at policy version %d) in %.1fs",
        step, have, target, verb, ", ".join(names), c.pool.version, time.perf_counter() - start,
    )
    return {"rollout/num_actors": float(c.pool.num_actors)}


def broadcast_replacing_dead(c: RunComponents, step: int) -> tuple[BroadcastStats, list[ActorFailure]]:
    """`c.broadcaster.broadcast()`, surviving rollout actors that die during it.

    The broadcaster names the actors it found dead and leaves the pool alone; the pool replaces them
    (`pool.replace_dead`: same budget, `rollout.max_replacements`, and count as deaths during
    generation), then the same version is sent again to every actor, since survivors may hold a mix
    of old and new layers. Anything else — a learner rank, the resend failing, replacements used up —
    raises. Returns the broadcast's stats (seconds include the recovery) and one ActorFailure per
    replaced actor.
    """
    members = {m.name: m for m in c.pool.members}
    version, start = c.pool.version + 1, time.perf_counter()
    try:
        return c.broadcaster.broadcast(), []
    except LearnerRankError:
        raise
    except ActorCallError as err:
        lost = [name for name in err.dead if name in members]
        if not lost or len(lost) == len(members):
            raise
        log.warning("step %d: weight broadcast lost %s (%s); replacing them", step, ", ".join(lost), err)
    detected = time.perf_counter()
    new = c.pool.replace_dead(lost)
    stats = c.broadcaster.broadcast(version=version)
    recovered = time.perf_counter() - detected
    failures = [
        ActorFailure(name, members[name].node_id, members[name].node_ip, step, 0, replaced_by, 0.0, recovered)
        for name, replaced_by in zip(lost, new)
    ]
    for f in failures:
        log.warning(
            "step %d: %s (node %s) died during the weight broadcast; %s serves policy version %d %.1fs later "
            "(%d of %d replacements used)", step, f.name, f.node_ip, f.replaced_by, version, recovered,
            c.pool.replacements, c.cfg.rollout.max_replacements,
        )
    return BroadcastStats(version, stats.bytes, time.perf_counter() - start, stats.reload_seconds), failures


def failure_metrics(rollout: RolloutResult) -> dict[str, float]:
    """Rollout-actor deaths of one step, their replacements and the recovery time, plus each actor's tokens/s."""
    metrics = {
        "rollout/actor_failures": float(len(rollout.failures)),
        "rollout/actor_restarts": float(sum(bool(f.replaced_by) for f in rollout.failures)),
        "rollout/recovery_s": max((f.recovery_s for f in rollout.failures), default=0.0),
    }
    return metrics | {f"rollout/tokens_per_s/{name}": v for name, v in rollout.tokens_per_s.items()}


def log_failures(tracker: Tracker, step: int, rollout: RolloutResult) -> None:
    """Each rollout-actor death of the step, with its node and replacement, as the W&B table `rollout/failures`."""
    if not rollout.failures:
        return
    columns = ["step", "actor", "node_ip", "node_id", "lost_samples", "replaced_by", "regenerated_s", "recovery_s"]
    rows: list[list[Any]] = [
        [step, f.name, f.node_ip, f.node_id, f.lost_samples, f.replaced_by, f.regenerated_s, f.recovery_s]
        for f in rollout.failures
    ]
    tracker.log_table("rollout/failures", columns, rows, step)
