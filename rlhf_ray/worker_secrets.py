"""Secrets for Ray workers without Ray's runtime-env variables.

Ray writes a job's runtime env, `env_vars` included, in plain text to its own logs
(`runtime_env_agent.log`, the GCS) and shows it in the dashboard. So the driver writes the values
of `cluster.env_passthrough` to a 0600 file in a 0700 folder of its own, and only that file's path
travels in the runtime env; `load_into_environ`, Ray's `worker_process_setup_hook`, puts the values
into each worker's environment when the worker starts. The file is removed when the driver exits.

This needs the workers to see the driver's filesystem: true for a local head, and for a cluster on
one machine. On a remote cluster the file is absent and workers get no secrets from the driver:
give them to the cluster's own environment (a Kubernetes secret, the SLURM job's environment).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

PATH_VARIABLE = "RLHF_RAY_SECRETS_FILE"
SETUP_HOOK = "rlhf_ray.worker_secrets.load_into_environ"


def write_secrets_file(names: list[str], environ: dict[str, str] | None = None) -> Path | None:
    """Write the named variables that are set to a private file; returns its path (None when none is set)."""
    env = os.environ if environ is None else environ
    values = {name: env[name] for name in names if env.get(name)}
    if not values:
        return None
    folder = Path(tempfile.mkdtemp(prefix="rlhf_ray_secrets_"))  # mode 0700
    path = folder / "env.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    atexit.register(shutil.rmtree, folder, True)
    return path


def load_into_environ() -> None:
    """Ray worker setup hook: copy the secrets file's values into `os.environ` (missing file: nothing)."""
    path = os.environ.get(PATH_VARIABLE)
    if not path:
        return
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError):
        return  # a remote node: the driver's file is not there (see the module docstring)
    os.environ.update({str(k): str(v) for k, v in values.items()})


def secrets_runtime_env(names: list[str]) -> dict:
    """The runtime-env entries that hand `names` to every worker through a file, or {} when none is set."""
    path = write_secrets_file(names)
    if path is None:
        return {}
    return {"env_vars": {PATH_VARIABLE: str(path)}, "worker_process_setup_hook": SETUP_HOOK}
