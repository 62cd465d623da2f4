"""The Ray processes a driver starts end with the driver, however the driver ends (SIGKILL included).

Ray ties only the head's own daemons to the driver (PR_SET_PDEATHSIG). Its dashboard and runtime-env
agents outlive a killed driver (measured: still there 30 s later), and anything else the session
started is left to notice on its own. So a driver that starts a local head also starts this reaper,
a child in its own process session. While the driver lives, the reaper records the driver's
descendants (pid and start time: head daemons, agents, workers, vLLM, the reward child, W&B's
service) every SCAN_S; once the driver is gone it SIGKILLs those still alive, their descendants, and
any process whose environment carries the driver's token (`TOKEN_VAR`, set before `ray.init` and
inherited by the session; Ray's workers overwrite theirs with their process title, hence the tree).
Processes of another run or another Ray session are neither descendants nor token holders and are
never touched; a driver connected to an external cluster (`cluster.address`) starts no reaper: Ray
itself ends the actors a dead driver owned (measured: 0.1 s).

Run as `python -m rlhf_ray.session_reaper DRIVER_PID TOKEN`.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

TOKEN_VAR = "RLHF_RAY_SESSION_TOKEN"
POLL_S = 0.1  # how often the reaper checks that the driver is alive
SCAN_S = 0.5  # how often it records the driver's descendants
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


def process_table() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time in clock ticks)} of every live process (zombies left out)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            entry = _stat(int(name))
            if entry is not None:
                table[int(name)] = entry
    return table


def _stat(pid: int) -> tuple[int, int] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """Every live process below `roots` in `table` (roots excluded)."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (parent, _) in table.items():
        children[parent].append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def carries_token(pid: int, token: str) -> bool:
    """Whether process `pid` started with `TOKEN_VAR=token` in its environment."""
    try:
        return f"\0{TOKEN_VAR}={token}\0".encode() in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return False


def session_processes(known: dict[int, int], token: str) -> dict[int, int]:
    """{pid: start time} of the live processes of the session: those in `known` (same start time, so
    not a reused pid), the token holders, and everything below them."""
    table = process_table()
    own = os.getpid()
    roots = {pid for pid, start in known.items() if table.get(pid, (0, -1))[1] == start}
    roots |= {pid for pid in table if pid != own and carries_token(pid, token)}
    found = (roots | descendants(roots, table)) - {own}
    return {pid: table[pid][1] for pid in found if pid in table}


def kill_session(known: dict[int, int], token: str, deadline_s: float = KILL_DEADLINE_S) -> int:
    """SIGKILL the session's processes until none is left (they may start others meanwhile).

    Each is signalled through a pidfd after its start time is checked again, so a pid reused by an
    unrelated process in between is never hit. Returns the number of processes killed.
    """
    killed: set[int] = set()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        alive = session_processes(known, token)
        if not alive:
            break
        known |= alive
        for pid, start in alive.items():
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                entry = _stat(pid)
                if entry is not None and entry[1] == start:
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
    own = os.getpid()
    known: dict[int, int] = {}
    next_scan = 0.0
    while os.getppid() == driver_pid:  # the driver's death reparents this process
        if time.monotonic() >= next_scan:
            table = process_table()
            known |= {pid: table[pid][1] for pid in descendants({driver_pid}, table) if pid != own}
            next_scan = time.monotonic() + SCAN_S
        time.sleep(POLL_S)
    kill_session(known, token)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
