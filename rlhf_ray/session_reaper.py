"""The Ray processes a driver starts end with the driver, however the driver ends (SIGKILL included).

Ray ties only the head's own daemons to the driver (PR_SET_PDEATHSIG); workers, agents, vLLM
engines and their children are left to notice on their own, and some never do. So a driver that
starts a local head also starts this reaper: before `ray.init` it puts a fresh token in its
environment (`TOKEN_VAR`), which every process of that Ray session inherits (head daemons, agents,
workers, vLLM, the reward child, W&B's service). The reaper, a child of the driver in its own
process session, waits for the driver to end, then kills every process that carries the token.
Another run, another Ray session or an external cluster carries another token or none, and is
never touched; a driver connected to an external cluster (`cluster.address`) starts no reaper:
Ray itself ends the actors a dead driver owned.

Run as `python -m rlhf_ray.session_reaper DRIVER_PID TOKEN`.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

TOKEN_VAR = "RLHF_RAY_SESSION_TOKEN"
POLL_S = 0.1  # how often the reaper checks that the driver is alive
KILL_DEADLINE_S = 30.0  # the reaper gives up after this long (a process stuck in the kernel ignores SIGKILL)

_reaper: subprocess.Popen | None = None


def start_reaper() -> str:
    """Mark this process's future children with a fresh token and start the reaper; returns the token.

    Idempotent while the reaper lives: a second `ray.init` in the same driver keeps the same token.
    """
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return os.environ[TOKEN_VAR]
    token = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}  # the reaper must not match itself
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.session_reaper", str(os.getpid()), token],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the driver's process group (Ctrl-C, kill -9 -PGID) spares it
    )
    os.environ[TOKEN_VAR] = token
    return token


def _marker(token: str) -> bytes:
    return b"\0" + f"{TOKEN_VAR}={token}".encode() + b"\0"


def _carries(pid: int, marker: bytes) -> bool:
    """Whether process `pid` started with the variable `marker` (NUL-delimited) in its environment."""
    try:
        return marker in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return False


def marked_processes(token: str) -> list[int]:
    """Pids of the live processes whose environment holds `TOKEN_VAR=token` (this process excluded)."""
    marker = _marker(token)
    own = os.getpid()
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != own and _carries(int(d), marker)]


def kill_marked(token: str, deadline_s: float = KILL_DEADLINE_S) -> int:
    """SIGKILL every process marked with `token` until none is left (they may start others meanwhile).

    Each process is checked and signalled through a pidfd, so a pid reused by an unrelated process in
    between is never hit. Returns the number of processes killed.
    """
    marker = _marker(token)
    killed: set[int] = set()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        alive = marked_processes(token)
        if not alive:
            break
        for pid in alive:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if _carries(pid, marker):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    killed.add(pid)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.05)
    return len(killed)


def main(argv: list[str]) -> int:
    driver_pid, token = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's Ctrl-C is for the driver
    while os.getppid() == driver_pid:  # the driver's death reparents this process
        time.sleep(POLL_S)
    kill_marked(token)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
