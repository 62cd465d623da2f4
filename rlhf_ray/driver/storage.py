"""The run folder must be one shared filesystem for the driver and every learner node.

The driver creates a checkpoint's folder and marks it complete, while each learner rank writes its
own shards into it from its own node: on a node that sees a different (local) folder at the same
path, a checkpoint marked complete would hold no policy. So before the first step the driver writes
a file with a random token into the run folder and every learner rank reads it back.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Protocol

from rlhf_ray.config import ConfigError
from rlhf_ray.ray_utils import get_with_timeout

MARKER = ".shared-storage-check"


class StorageError(ConfigError):
    """A learner rank does not see the driver's run folder; the message names the rank, its node and the fix.

    A ConfigError: where the run folder lives is the user's setting, so the CLI prints it and exits 2."""


class _Group(Protocol):
    names: list[str]
    workers: list


def check_shared_run_folder(run_dir: Path, groups: list[_Group], timeout_s: float = 60.0) -> None:
    """Raise StorageError unless every learner rank of `groups` reads the driver's token from `run_dir`."""
    token = secrets.token_hex(16)
    run_dir = run_dir.resolve()  # a relative path would be read relative to each rank's own working folder
    marker = run_dir / MARKER
    marker.write_text(token)
    try:
        names = [n for g in groups for n in g.names]
        refs = [w.read_shared_file.remote(str(marker)) for g in groups for w in g.workers]
        seen = get_with_timeout(refs, names, "shared run folder check", timeout_s)
    finally:
        marker.unlink(missing_ok=True)
    wrong = [(name, node_ip, text) for name, (node_ip, text) in zip(names, seen) if text != token]
    if wrong:
        where = "; ".join(
            f"{name} on node {ip} {'finds no file there' if text is None else 'reads a different file'}"
            for name, ip, text in wrong
        )
        raise StorageError(
            f"the run folder {run_dir} is not shared with every learner node: the driver wrote {marker}, but {where}. "
            "Checkpoints are written by the learner ranks on their own nodes into this folder, so it must be the "
            "same filesystem everywhere; fix: mount one shared volume (NFS, a PVC, the cluster's shared home) at "
            f"{run_dir.parent} on the driver's and every learner node (cluster/README.md, 'Storage'), or set "
            "train.output_dir to a folder that is"
        )
