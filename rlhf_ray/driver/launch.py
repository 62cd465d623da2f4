"""`rlhf-ray submit`: run a config on a Ray cluster through the Jobs API, as `ray job submit` does.

The job receives the project folder as its working_dir, gets the project's dependencies and its
`gpu` extra installed with pip or uv (nothing with --no-install, for clusters whose image has them),
and the environment variables named in `cluster.env_passthrough`, forwarded by name: their values
go only into the runtime_env sent to the cluster, never to the terminal or a log.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path
from typing import Any, Literal, Mapping

from packaging.requirements import Requirement

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.redaction import REDACTED, environment_secrets, mask, redact

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".git/", ".venv/", "runs/", "wandb/", "__pycache__/", ".pytest_cache/", "*.egg-info/"]
Installer = Literal["pip", "uv", "none"]


class SubmitError(ValueError):
    """A submission that cannot work; the message says why and what to do."""


@dataclass(frozen=True)
class Submission:
    """What goes to the Jobs API. `runtime_env` holds secret values, so it is kept out of repr."""

    entrypoint: str
    runtime_env: dict[str, Any] = field(repr=False)
    packages: tuple[str, ...]  # installed into the job's environment
    env_names: tuple[str, ...]  # forwarded variables, by name only


def project_requirements(extra: str = "gpu") -> list[str]:
    """The installed project's dependencies plus `extra`, as pip requirement strings, without Ray.

    The cluster's own Ray must run the job: a second Ray in the job's environment would not match it.
    """
    try:
        declared = requires("rlhf_ray") or []
    except PackageNotFoundError:
        raise SubmitError(
            "rlhf_ray is not installed here (pip install -e .), so its requirements are unknown; "
            "install it, or submit with --no-install to a cluster whose image has them"
        ) from None
    out = []
    for text in declared:
        req = Requirement(text)
        if req.name.lower() == "ray" or (req.marker and not req.marker.evaluate({"extra": extra})):
            continue
        req.marker = None
        out.append(str(req))
    return out


def resolve_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """`address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else the local dashboard on 127.0.0.1."""
    from_env = environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    # Ray's JobSubmissionClient silently prefers these variables over its address argument.
    if address and from_env and address != from_env:
        raise SubmitError(
            f"--address {address} conflicts with RAY_ADDRESS/RAY_API_SERVER_ADDRESS={from_env}, "
            "which Ray's job client would use instead; unset the variable or drop --address"
        )
    return address or from_env or DEFAULT_ADDRESS


def build_submission(
    config_path: str,
    overrides: list[str],
    install: Installer = "pip",
    extra_pip: list[str] | None = None,
    project_root: Path = PROJECT_ROOT,
    environ: Mapping[str, str] = os.environ,
) -> Submission:
    """Validate the config locally, then build the entrypoint and runtime_env of the job. Contacts nothing."""
    cfg = load_config(config_path, overrides)  # a bad config fails here, before any upload
    root = project_root.resolve()
    try:
        rel = Path(config_path).resolve().relative_to(root)
    except ValueError:
        raise SubmitError(
            f"config {config_path} is outside {root}, the folder the job receives; put it under {root / 'configs'}"
        ) from None
    if rel.parts[0] in {e.strip("/") for e in EXCLUDES}:
        raise SubmitError(f"config {rel} is in {rel.parts[0]}/, which is not uploaded; move it to configs/")

    env_vars = {name: environ[name] for name in cfg.cluster.env_passthrough if environ.get(name)}
    entrypoint = shlex.join(["python", "-m", "rlhf_ray.cli", "train", rel.as_posix(), *overrides])
    secrets = {v for v in env_vars.values() if len(v) >= 6} | environment_secrets()
    if any(s in entrypoint for s in secrets):
        raise SubmitError(
            "an override carries the value of a secret environment variable; secrets travel only as "
            "environment variables named in cluster.env_passthrough, never on the command line"
        )

    packages = [] if install == "none" else project_requirements() + list(extra_pip or [])
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    if packages:
        runtime_env[install] = packages
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return Submission(entrypoint, runtime_env, tuple(packages), tuple(env_vars))


def hide_url_credentials(text: str) -> str:
    """`scheme://user:token@host` -> `scheme://***@host`: a package URL may carry a token."""
    return re.sub(r"(?<=://)[^/@\s]+@", f"{REDACTED}@", text)


def describe(sub: Submission, address: str) -> str:
    """What is about to be submitted, with forwarded variables by name only and no credentials of URLs."""
    installer = next((k for k in ("pip", "uv") if k in sub.runtime_env), None)
    return mask(hide_url_credentials("\n".join([
        f"submitting to {address}",
        f"  entrypoint   {sub.entrypoint}",
        f"  working_dir  {sub.runtime_env['working_dir']} (without {', '.join(EXCLUDES)})",
        f"  {installer or 'install':<12} {', '.join(sub.packages) if installer else 'nothing (--no-install)'}",
        f"  env vars     {', '.join(sub.env_names) + ' (values not shown)' if sub.env_names else 'none'}",
    ])), environment_secrets())


def _follow(client: Any, job_id: str, secrets: set[str]) -> str:
    """Stream the job's logs until it ends (secret values masked); returns its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(redact(lines, secrets), end="", flush=True)

    asyncio.run(tail())
    return client.get_job_status(job_id).value


def submit_main(
    config_path: str,
    overrides: list[str],
    address: str | None = None,
    extra_pip: list[str] | None = None,
    installer: Literal["pip", "uv"] = "pip",
    no_install: bool = False,
    wait: bool = False,
) -> int:
    """Submit `rlhf-ray train CONFIG OVERRIDES` as a Ray job; print the job id and how to follow it.

    Returns 0 once submitted (with `wait`: once the job succeeded), 1 if the cluster or the job
    failed, 2 for a bad config or submission.
    """
    from ray.exceptions import RayError
    from ray.job_submission import JobSubmissionClient

    try:
        url = resolve_address(address)
        sub = build_submission(config_path, overrides, "none" if no_install else installer, extra_pip)
    except (ConfigError, SubmitError) as err:
        print(f"rlhf-ray submit: {err}", file=sys.stderr)
        return 2
    secrets = set(sub.runtime_env.get("env_vars", {}).values())
    print(describe(sub, url), flush=True)
    try:
        client = JobSubmissionClient(url)
        job_id = client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env)
    except (ConnectionError, RuntimeError, RayError) as err:
        # A server's error may quote the runtime_env back, so mask the forwarded values.
        print(f"rlhf-ray submit: could not submit to {url}: {redact(str(err), secrets)}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}")
    for what, cmd in (("follow logs", "logs --follow"), ("status", "status"), ("stop", "stop")):
        print(f"  {what + ':':<13}ray job {cmd} {job_id} --address {url}")
    if not wait:
        return 0
    try:
        status = _follow(client, job_id, secrets)
    except (ConnectionError, RuntimeError) as err:
        print(f"rlhf-ray submit: lost the logs of {job_id}: {redact(str(err), secrets)}", file=sys.stderr)
        return 1
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
