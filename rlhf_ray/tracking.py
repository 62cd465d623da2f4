"""Run tracking: Weights & Biases (offline by default), a local metrics.jsonl, console lines, secret masking.

Every metric a run logs is named and documented, with its unit, in
`rlhf_ray.metric_table.METRICS` (the README renders it with `metrics_markdown()`). `metrics.jsonl` in
the run folder gets one JSON line per step whatever the backend, so a run can
be read without W&B. Secrets never reach a run's files: the config is
redacted before W&B sees it, W&B does not capture the console, and
`SecretFilter` masks environment secrets in every log record.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import wandb

from rlhf_ray.config import TrackingConfig
from rlhf_ray.redaction import environment_secrets, mask, redact, secret_values_in


log = logging.getLogger(__name__)


class StageTimer:
    """Wall-clock seconds per named stage (summed when a stage repeats); `metrics()` names them `timing/<stage>_s`.

    With a `title`, the stage is announced with a banner and its duration printed when it ends (the demo's stages).
    """

    def __init__(self, on_start: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.on_start = on_start  # called with the stage's name as it starts (the console's in-place line)

    @contextmanager
    def __call__(self, stage: str, title: str | None = None) -> Iterator[None]:
        if title:
            print(f"\n=== {title} ===", flush=True)
        if self.on_start is not None:
            self.on_start(stage)
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        if title:
            print(f"({stage}: {self.seconds[stage]:.1f} s)", flush=True)

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}_s": v for k, v in self.seconds.items()}


# Shown on the console, in this order, when present: (metric, label, format).
CONSOLE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("reward/mean", "reward", ".4g"),
    ("kl/mean", "kl", ".4g"),
    ("train/policy_loss", "pg_loss", ".4g"),
    ("train/value_loss", "vf_loss", ".4g"),
    ("train/clipfrac", "clip", ".3f"),
    ("train/lr", "lr", ".2e"),
    ("rollout/response_len_mean", "len", ".1f"),
    ("rollout/tokens_per_s", "tok/s", ".0f"),
    ("timing/step_s", "step_s", ".2f"),
)


def format_duration(seconds: float) -> str:
    """A duration for people: '42s', '3m05s', '2h07m'."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def console_line(step: int, total_steps: int, metrics: Mapping[str, float], eta_s: float | None = None) -> str:
    """One line per step, e.g. `step 3/10 | reward 0.41 | kl 0.02 | ... | eta 1m05s`; step is 0-based, shown
    1-based. eta_s: seconds left for the run, shown when given."""
    parts = [f"step {step + 1}/{total_steps}"]
    parts += [f"{label} {float(metrics[key]):{fmt}}" for key, label, fmt in CONSOLE_FIELDS if key in metrics]
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def flat_reward(scores: Sequence[float], valid: Sequence[bool], n: int) -> bool:
    """True when no group of `n` consecutive samples (one prompt's) holds two different valid rewards, so every
    group-relative advantage is 0; with n == 1 the whole batch is one group. scores, valid: [B*n]."""
    size = n if n > 1 else len(scores)
    for start in range(0, len(scores), size):
        kept = {s for s, v in zip(scores[start:start + size], valid[start:start + size]) if v}
        if len(kept) > 1:
            return False
    return True


class FlatRewardWatch:
    """Counts RL steps in a row whose rewards were flat (`flat_reward`); warns once at `warn_after` and asks the
    loop to stop at `stop_after` (0 never)."""

    def __init__(self, warn_after: int, stop_after: int = 0) -> None:
        self.warn_after, self.stop_after, self.run = warn_after, stop_after, 0

    def update(self, step: int, flat: bool) -> bool:
        """Record one step; returns True when the run should stop."""
        self.run = self.run + 1 if flat else 0
        if self.run == self.warn_after:
            log.warning(
                "step %d: rewards have had zero variance within every prompt's samples for %d steps in a row, so "
                "every advantage is 0 and the policy is not learning; check that the reward function can score "
                "the responses (template, answer format, the ground-truth field) (train.flat_reward_stop_steps "
                "stops such a run)", step, self.run,
            )
        return bool(self.stop_after) and self.run >= self.stop_after


class SecretFilter(logging.Filter):
    """Masks secret values (environment secrets plus `extra`) in a log record's message and traceback."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        super().__init__()
        self.extra = {s for s in extra if len(s) >= 6}

    def mask(self, text: str) -> str:
        return mask(text, environment_secrets() | self.extra)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call; the handler reports it, the filter must not raise into user code
            return True
        record.msg, record.args = self.mask(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True


def install_secret_filter(extra: Iterable[str] = ()) -> SecretFilter:
    """Put one `SecretFilter` on the root logger, its handlers and the last-resort handler.

    A logger's filters see only records logged on that logger, not those propagated from
    `logging.getLogger(__name__)` children, so the handlers need the filter too.
    """
    root = logging.getLogger()
    found = [f for f in root.filters if isinstance(f, SecretFilter)]
    secret_filter = found[0] if found else SecretFilter()
    secret_filter.extra |= {s for s in extra if len(s) >= 6}
    for target in [root, *root.handlers, logging.lastResort]:
        if target is not None and secret_filter not in target.filters:
            target.addFilter(secret_filter)
    return secret_filter


WANDB_ID_FILE = "wandb_run_id"
WANDB_FLUSH_S = 0.2  # seconds between W&B's writes of its run file (W&B's default: 15); under a checkpoint's write time


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", -1))
    except (ValueError, AttributeError, TypeError):
        return -1  # a line cut by a kill mid-write


class Tracker:
    """Logs a run's metrics to `run_dir/metrics.jsonl` and, with backend wandb, to a W&B run in `run_dir`.

    A run folder that already has a W&B run id is being continued (`--resume`, or a restart after a
    learner rank died): its W&B run starts in `rewind(step)`, once the step the run continues from is
    known, so that the W&B run is the same one and holds the steps run again (`tracking.resume`).
    """

    console_line = staticmethod(console_line)

    def __init__(
        self, cfg: TrackingConfig, run_dir: str | os.PathLike, run_name: str, config_dict: dict[str, Any]
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.secret_filter = install_secret_filter(secret_values_in(config_dict))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")  # append: a resumed run continues the file
        self.run = None
        self._wandb_args: dict[str, Any] | None = None  # set while the W&B run waits for `rewind` or `log`
        if cfg.backend == "wandb":
            secrets = environment_secrets() | self.secret_filter.extra
            continued = (self.run_dir / WANDB_ID_FILE).is_file()
            self._wandb_args = dict(
                project=redact(cfg.project, secrets),
                entity=redact(cfg.entity, secrets) or None,
                name=redact(run_name, secrets),
                dir=str(self.run_dir),
                mode=cfg.mode,
                config=redact(config_dict, secrets),
                # Console capture would copy anything printed (secrets included) into the run's files, and
                # the metadata holds the raw command line (an override may carry a secret). W&B writes its
                # run file every WANDB_FLUSH_S instead of every 15 s: a killed driver loses less.
                settings=wandb.Settings(console="off", silent=True, x_disable_meta=True, disable_git=True,
                                        x_transaction_log_flush_interval=WANDB_FLUSH_S),
            )
            if not continued:
                self._start_wandb(id=self.wandb_run_id(), resume="allow")

    def _start_wandb(self, **resume: Any) -> None:
        assert self._wandb_args is not None
        self.run = wandb.init(**self._wandb_args, **resume)
        self._wandb_args = None

    def wandb_run_id(self) -> str:
        """The W&B run id kept in `run_dir/wandb_run_id` (created on first use), so a resume continues that run."""
        path = self.run_dir / WANDB_ID_FILE
        if path.is_file():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)
        path.write_text(run_id + "\n")
        return run_id

    def rewind(self, step: int) -> int:
        """Drop metrics.jsonl lines of steps >= `step` (logged after the checkpoint a run resumes from), so
        each step appears once; the file is replaced atomically. Returns the number of lines dropped.

        A continued W&B run starts here: with `tracking.resume=rewind` it is rewound to `step - 1`
        (W&B's `resume_from`), so the steps from `step` on replace the ones the killed run logged.
        """
        path = self.run_dir / "metrics.jsonl"
        self._jsonl.close()
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        kept = [line for line in lines if 0 <= _step_of(line) < step]  # a half-written line goes too
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self._jsonl = open(path, "a")
        if self._wandb_args is not None:
            run_id = self.wandb_run_id()
            if self.cfg.resume == "rewind":
                try:
                    self._start_wandb(resume_from=f"{run_id}?_step={step - 1}")
                except wandb.errors.Error as err:  # a server without run rewind: resume it plainly instead
                    log.warning(
                        "W&B could not rewind run %s to step %d (%s); continuing it as tracking.resume=append, "
                        "so W&B keeps the killed run's values of steps %d and later", run_id, step - 1,
                        str(err)[:200], step,
                    )
                    self._start_wandb(id=run_id, resume="allow")
            else:
                self._start_wandb(id=run_id, resume="allow")
        return len(lines) - len(kept)

    def commit(self) -> None:
        """Close the current step's W&B row, so it reaches W&B's run file within WANDB_FLUSH_S (W&B holds a
        row open until a later step is logged); called before each checkpoint is written."""
        if self.run is not None:
            self.run.log({}, commit=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record one step's metrics (names from `metric_table.METRICS`) as a metrics.jsonl line and in W&B."""
        values = {k: float(v) for k, v in metrics.items()}
        if self._wandb_args is not None:  # a continued run that logs without a rewind first
            self._start_wandb(id=self.wandb_run_id(), resume="allow")
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self.run.log(values, step=step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """Log a table (e.g. sample generations) to W&B; without W&B it is not recorded."""
        if self.run is None:
            return
        secrets = environment_secrets() | self.secret_filter.extra
        self.run.log({name: wandb.Table(columns=list(columns), data=redact(list(rows), secrets))}, step=step)

    def log_samples(
        self, step: int, prompts: Sequence[str], responses: Sequence[str], rewards: Sequence[float]
    ) -> None:
        """The first `cfg.log_samples` generations of a step as the W&B table `samples`."""
        k = self.cfg.log_samples
        if k:
            rows = [[p, r, float(s)] for p, r, s in zip(prompts[:k], responses[:k], rewards[:k])]
            self.log_table("samples", ["prompt", "response", "reward"], rows, step)

    def finish(self) -> None:
        """Close metrics.jsonl and end the W&B run (flushing it to `run_dir/wandb`)."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self.run is not None:
            self.run.finish()
            # finish() returns before wandb-core has closed the run file; teardown waits for it, so the
            # run folder is complete (ready for `wandb sync`) when this returns.
            wandb.teardown()
            self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

