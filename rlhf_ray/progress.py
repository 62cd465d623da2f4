"""Progress on the console: a bar rewritten in place where a terminal is attached, plain lines elsewhere.

On a terminal (stdout is a TTY and TERM is not "dumb") `LiveLine.status` rewrites one line in place
(carriage return, erase to the end of the line), so `sft`, `rm` and `train` show a bar that moves with
every optimizer step or stage. In a log file or CI, where a carriage return would leave one long line,
`status` prints nothing, and only the permanent lines (`LiveLine.line`: one per epoch or RL step) appear.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Mapping, TextIO

from rlhf_ray.tracking import format_duration

ERASE_LINE = "\r\x1b[K"  # to the start of the line, then erase it


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal that understands the erase sequence."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def bar(done: float, total: float, width: int = 24) -> str:
    """`[#########---------------]`: `done` of `total` as `width` cells (a cell is # once fully done)."""
    filled = int(width * min(max(done / total, 0.0), 1.0)) if total > 0 else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class LiveLine:
    """The console's progress output: `status` (in place, terminals only) and `line` (permanent, everywhere)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = is_terminal(self.stream)
        self.showing = False  # a status line is on screen, without a newline after it

    def status(self, text: str) -> None:
        """Replace the in-place line with `text` (nothing when not on a terminal)."""
        if self.tty:
            self.stream.write(ERASE_LINE + text)
            self.stream.flush()
            self.showing = True

    def line(self, text: str) -> None:
        """Print `text` as a line of its own, over the in-place line if one is showing."""
        self.stream.write((ERASE_LINE if self.showing else "") + text + "\n")
        self.stream.flush()
        self.showing = False

    def close(self) -> None:
        """Erase a status line left on screen, so what is printed next starts on a clean line."""
        if self.showing:
            self.stream.write(ERASE_LINE)
            self.stream.flush()
            self.showing = False


class EpochProgress:
    """A supervised stage's progress: one line per finished epoch, e.g. `sft epoch 2/5 | loss 1.234 | 12s | eta 36s`,
    showing the step's metrics whose names end in loss or accuracy; on a terminal also a bar over the epoch's
    optimizer steps after each one."""

    def __init__(self, name: str, epochs: int, steps_per_epoch: int, live: LiveLine | None = None) -> None:
        self.name, self.epochs, self.per_epoch = name, epochs, max(steps_per_epoch, 1)
        self.live = live or LiveLine()
        self.start = time.perf_counter()

    def _shown(self, metrics: Mapping[str, float]) -> list[str]:
        return [f"{k.split('/')[-1]} {float(v):.4g}" for k, v in metrics.items()
                if k.split("/")[-1].endswith(("loss", "accuracy"))]

    def line(self, step: int, metrics: Mapping[str, float], elapsed_s: float) -> str | None:
        """The line after 0-based optimizer step `step`, or None when it does not end an epoch."""
        if (step + 1) % self.per_epoch:
            return None
        epoch = (step + 1) // self.per_epoch
        eta = elapsed_s / epoch * (self.epochs - epoch)
        return " | ".join([f"{self.name} epoch {epoch}/{self.epochs}", *self._shown(metrics),
                           format_duration(elapsed_s), f"eta {format_duration(eta)}"])

    def bar_text(self, step: int, metrics: Mapping[str, float], elapsed_s: float) -> str:
        """The in-place line after 0-based optimizer step `step`: its epoch, a bar over the epoch's steps, the ETA."""
        done = step + 1
        epoch, within = min(step // self.per_epoch + 1, self.epochs), step % self.per_epoch + 1
        eta = elapsed_s / done * (self.epochs * self.per_epoch - done)
        return " | ".join([f"{self.name} epoch {epoch}/{self.epochs} {bar(within, self.per_epoch)} "
                           f"{within}/{self.per_epoch}", *self._shown(metrics), f"eta {format_duration(eta)}"])

    def step(self, step: int, metrics: Mapping[str, float]) -> None:
        elapsed = time.perf_counter() - self.start
        text = self.line(step, metrics, elapsed)
        if text:
            self.live.line(text)
        else:
            self.live.status(self.bar_text(step, metrics, elapsed))


def stage_status(live: LiveLine, step: int, total_steps: int, run_start: float) -> Callable[[str], None]:
    """For `StageTimer(on_start=...)`: shows RL step `step` (0-based) in place while each stage runs, e.g.
    `step 3/10 [#####-------] update... | 1m05s` (a bar of the steps done, the run's elapsed time)."""

    def show(stage: str) -> None:
        elapsed = format_duration(time.perf_counter() - run_start)
        live.status(f"step {step + 1}/{total_steps} {bar(step, total_steps)} {stage}... | {elapsed}")

    return show
