"""The run folder: one process at a time (a lock naming its holder), and resuming only what exists.

The lock is an `fcntl.flock` on `RUN_DIR/.lock`, so the kernel releases it when the holder dies,
however it dies: a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO

from rlhf_ray.config import ConfigError, RunConfig

LOCK_FILE = ".lock"


def run_dir_for(cfg: RunConfig) -> Path:
    """`train.output_dir/train.run_name` (a time stamp and the pid when run_name is empty)."""
    name = cfg.train.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    return Path(cfg.train.output_dir) / name


class RunLock:
    """Exclusive use of a run folder for the life of this object (a context manager)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._file: IO[str] | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise ConfigError naming the pid that holds it."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.run_dir / LOCK_FILE, "a+")
        except OSError as err:
            raise ConfigError(
                f"train.output_dir / run_name: cannot write the run folder {str(self.run_dir)!r} "
                f"({err.strerror or err}); fix: set train.output_dir to a writable folder"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()[:20] or "unknown"
            handle.close()
            raise ConfigError(
                f"run folder {str(self.run_dir)!r} is in use by another rlhf-ray process (pid {holder}); "
                "fix: wait for it to end, or choose another train.run_name"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_resumable(run_dir: Path) -> None:
    """`--resume` needs an existing run folder; a misspelt run name must not silently start from step 0."""
    if not run_dir.is_dir():
        siblings = sorted(p.name for p in run_dir.parent.iterdir() if p.is_dir())[:10] if run_dir.parent.is_dir() else []
        found = f"runs there: {', '.join(siblings)}" if siblings else "no runs there"
        raise ConfigError(
            f"--resume: train.run_name={run_dir.name!r} has no run folder {str(run_dir)!r} ({found}); "
            "fix: name an existing run, or drop --resume to start a new one"
        )
