"""What reaches the console: the driver's progress lines; Ray workers' output goes to the run folder.

vLLM, DeepSpeed and Ray start-up logs and actor prints are written by Ray workers; Ray's driver relays
them to the console. `route_worker_output(path, verbose)` sends them to `path` (the run folder's
`workers.log`) instead, and to the console as well when `verbose` (`--verbose` on the command line).
Lines that report an error (ERROR, CRITICAL, a traceback) always reach the console too.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

WORKER_LOG = "workers.log"
_ALWAYS_SHOWN = re.compile(r"\b(ERROR|CRITICAL|Traceback)\b|Error: ")
_RAY_HANDLER = "ray_print_logs"  # the name Ray gives its console handler of worker output
_lock = threading.Lock()
_target: tuple[Path, bool] | None = None


def set_worker_output(path: Path | None, verbose: bool = False) -> None:
    """Route worker output to `path` (None: Ray's default, the console) from the next `init_ray` on."""
    global _target
    _target = None if path is None else (Path(path), verbose)


def routed_worker_output() -> bool:
    """True when worker output is kept off the console (a target is set, without verbose)."""
    return _target is not None and not _target[1]


def worker_line(data: dict[str, Any], line: str) -> str:
    """One relayed line as Ray prints it: `(<actor or task> pid=<pid>) <line>`."""
    who = data.get("actor_name") or data.get("task_name") or ""
    return f"({who + ' ' if who else ''}pid={data.get('pid')}) {line}"


def _write(file: TextIO, console: bool, data: dict[str, Any]) -> None:
    lines = data.get("lines") or []
    with _lock:
        for line in lines:
            text = worker_line(data, line)
            file.write(text + "\n")
            if console or _ALWAYS_SHOWN.search(line):
                print(text, file=sys.stderr if data.get("is_err") else sys.stdout)
        file.flush()


def apply_worker_output() -> Path | None:
    """After `ray.init`: replace Ray's console relay of worker output by the routing set with `set_worker_output`.

    Returns the log file, or None when nothing is routed (no target, or this Ray has no relay to replace).
    """
    if _target is None:
        return None
    path, verbose = _target
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray version: leave its relay alone rather than lose the output
        logging.getLogger(__name__).warning("worker output stays on the console: this Ray has no stream dispatcher")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("a", encoding="utf-8")
    dispatcher.remove_handler(_RAY_HANDLER)
    dispatcher.add_handler(_RAY_HANDLER, lambda data: _write(file, verbose, data))
    print(f"worker logs (vLLM, DeepSpeed, Ray): {path}" + ("" if verbose else "  (--verbose shows them here)"),
          flush=True)
    return path
