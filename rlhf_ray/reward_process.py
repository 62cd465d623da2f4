"""Rule reward functions run in a child process: per-row timeout, memory cap, minimal environment.

A reward function is user code. Imported in the driver or an actor it would see every secret of
the environment, could hang the run, exhaust its memory, or end it with `sys.exit` at import. Here
each configured function lives in its own `python -m rlhf_ray.reward_worker` process started with:
- an environment holding only PATH, locale, TMPDIR, the parent's import path (PYTHONPATH), the
  session token of `rlhf_ray.session_reaper` and the variables named in `reward.env_passthrough` (no secret unless named there);
- an address-space cap of `reward.memory_mb` MiB (`RLIMIT_AS`);
- a time limit per row, `reward.row_timeout_s`: a row that takes longer is masked, the child is
  killed and a fresh one serves the next rows.
The protocol is one JSON object per line over the child's stdin and a private copy of its stdout
(the function's own prints go to stderr). Import failures of any kind, `SystemExit` included, come
back as `RewardFunctionError` naming the function.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import selectors
import subprocess
import sys
import time
from typing import Any

from rlhf_ray.config import RewardConfig
from rlhf_ray.rewards import _PATH_RE, RewardFunctionError, RuleScores, _as_finite_float
from rlhf_ray.safe_yaml import shorten
from rlhf_ray.session_reaper import TOKEN_VAR

log = logging.getLogger(__name__)

# TOKEN_VAR marks the child as a process of this Ray session, so that it ends with the driver.
BASE_ENV = ("PATH", "LANG", "LC_ALL", "TMPDIR", "OMP_NUM_THREADS", TOKEN_VAR)


def child_environment(passthrough: list[str]) -> dict[str, str]:
    """The environment a reward child starts with: BASE_ENV, the parent's import path, `passthrough` names."""
    env = {k: os.environ[k] for k in (*BASE_ENV, *passthrough) if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _limit_memory(mb: int) -> None:
    if mb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (mb * 2**20, mb * 2**20))


class RewardProcess:
    """One reward function in a child process; `score` calls it row by row with the limits above."""

    def __init__(self, path: str, cfg: RewardConfig) -> None:
        self.path, self.cfg = path, cfg
        self.proc: subprocess.Popen | None = None
        self._buffer = b""
        self.timeouts = 0  # rows masked for taking longer than reward.row_timeout_s, over this object's life
        self.start()

    def start(self) -> None:
        """Start the child and wait until it has imported the function (at most reward.timeout_s)."""
        if not _PATH_RE.match(self.path):
            raise RewardFunctionError(
                f"reward function {shorten(self.path)} is not a dotted path of the form 'package.module:function'")
        self.close()
        self._buffer = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf_ray.reward_worker", self.path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_environment(self.cfg.env_passthrough),
            preexec_fn=lambda: _limit_memory(self.cfg.memory_mb), close_fds=True,
        )
        reply = self._read(self.cfg.timeout_s)
        if reply is None or "ready" not in reply:
            message = reply.get("error") if reply else f"reward function {self.path!r}: " + (
                f"importing it took longer than reward.timeout_s={self.cfg.timeout_s:g}s"
                if self.proc.poll() is None else
                f"its process ended with code {self.proc.returncode} while importing (over the memory cap "
                f"reward.memory_mb={self.cfg.memory_mb}?)")
            self.close()
            raise RewardFunctionError(str(message))

    def _read(self, timeout_s: float) -> dict[str, Any] | None:
        """One JSON line from the child, or None when it times out or exits first."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def call(self, prompt: str, response: str, row: dict[str, Any]) -> dict[str, Any] | None:
        """The child's reply for one row ({value}, {unsupported} or {error}); None on timeout or death."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        message = json.dumps({"prompt": prompt, "response": response, "row": row}, default=str) + "\n"
        try:
            self.proc.stdin.write(message.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        return self._read(self.cfg.row_timeout_s)

    def score(self, prompts: list[str], responses: list[str], rows: list[dict]) -> RuleScores:
        """Score each row with up to reward.retries retries of a raised error or a bad value; a timeout or a
        crash is not retried. Failed rows get score 0 and valid False, never NaN."""
        scores, valid, errors = [], [], []
        for i, (p, r, row) in enumerate(zip(prompts, responses, rows, strict=True)):
            value, last = None, ""
            for _ in range(self.cfg.retries + 1):
                value, last, retry = self._try_row(i, p, r, row)
                if value is not None or not retry:
                    break
            scores.append(0.0 if value is None else value)
            valid.append(value is not None)
            if value is None:
                errors.append(last)
                log.warning(last)
        return RuleScores(scores, valid, errors)

    def _try_row(self, i: int, prompt: str, response: str, row: dict) -> tuple[float | None, str, bool]:
        """(score or None, the error, whether a retry may help) of one call."""
        reply = self.call(prompt, response, row)
        if reply is None:
            timed_out = self.proc is not None and self.proc.poll() is None
            self.close()  # a fresh child serves the next call
            if timed_out:
                self.timeouts += 1
                return None, (f"reward function {self.path!r} took longer than reward.row_timeout_s="
                              f"{self.cfg.row_timeout_s:g}s on row {i}"), False
            return None, (f"reward function {self.path!r} ended its process on row {i} (over the memory cap "
                          f"reward.memory_mb={self.cfg.memory_mb}, or sys.exit)"), False
        if "error" in reply:
            return None, f"reward function {self.path!r} raised {reply['error']} on row {i}", True
        if "unsupported" in reply:
            return None, (f"reward function {self.path!r} returned {shorten(reply['unsupported'], 40)} for row {i}; "
                          "it must return a finite float"), True
        try:
            return _as_finite_float(reply.get("value"), self.path, i), "", False
        except RewardFunctionError as err:
            return None, str(err), True

    def close(self) -> None:
        """Stop the child (killed: it may be stuck in the user's code)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self.proc = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to report to
            pass


def check_reward_import(path: str, cfg: RewardConfig) -> None:
    """Import `path` in a child process exactly as a run would; raises RewardFunctionError on any failure."""
    RewardProcess(path, cfg).close()
