"""Starting Ray with secure defaults, and calling actors with timeouts that name the actor."""

from __future__ import annotations

import ipaddress
import logging
import socket
from contextlib import contextmanager
from typing import Any, Iterator

import ray

from rlhf_ray.config import ClusterConfig
from rlhf_ray.console import apply_worker_output, routed_worker_output
from rlhf_ray.session_reaper import start_reaper
from rlhf_ray.worker_secrets import secrets_runtime_env


class ActorCallError(RuntimeError):
    """A Ray call failed or timed out; the message names the actor and the method.

    `failed` lists the names of the actors that died, raised or did not answer; `dead` those that died.
    """

    def __init__(self, message: str, failed: list[str] | None = None, dead: list[str] | None = None) -> None:
        super().__init__(message)
        self.failed = list(failed or [])
        self.dead = list(dead or [])


class LearnerRankError(ActorCallError):
    """A learner rank died: the step cannot finish, but the run can resume from its last complete checkpoint.

    `nodes` maps each dead rank's name to the address of the node it ran on, where known.
    """

    def __init__(self, message: str, failed: list[str] | None = None, dead: list[str] | None = None,
                 nodes: dict[str, str] | None = None) -> None:
        super().__init__(message, failed, dead)
        self.nodes = dict(nodes or {})


def init_ray(cluster: ClusterConfig | None = None) -> None:
    """Connect to `cluster.address`, or start a local head bound to `cluster.host` (127.0.0.1 by default).

    The dashboard stays off unless `cluster.dashboard` is set, and then listens on `cluster.host` only.
    A local head's processes (workers, agents, vLLM included) end with this process, even on SIGKILL
    (`rlhf_ray.session_reaper`); with `cluster.address` Ray's ownership ends this driver's actors.
    """
    cluster = cluster or ClusterConfig()
    if ray.is_initialized():
        return
    # Never runtime-env variables: Ray logs those in plain text (see rlhf_ray.worker_secrets).
    runtime_env = secrets_runtime_env(cluster.env_passthrough) or None
    quiet = {"logging_level": logging.WARNING} if routed_worker_output() else {}  # Ray's own start-up lines
    if cluster.address:
        ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=True, **quiet)
    else:
        start_reaper()  # before ray.init: every process of the session inherits its token
        with node_address_kept(cluster.host):
            ray.init(
                num_cpus=cluster.num_cpus,
                include_dashboard=cluster.dashboard,
                dashboard_host=cluster.host,
                _node_ip_address=cluster.host,
                runtime_env=runtime_env,
                log_to_driver=True,
                **quiet,
            )
    apply_worker_output()


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


@contextmanager
def node_address_kept(host: str) -> Iterator[None]:
    """Keep a loopback `host` as the local head's node address during `ray.init`.

    Ray swaps a loopback node address for the host's interface address (so that other hosts could join),
    and the node's servers, agents and the autoscaler monitor then listen there or on every interface.
    It keeps loopback when it considers multi-host clusters off, its switch for macOS and Windows
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read once at import into `ray_constants.ENABLE_RAY_CLUSTER`,
    consulted only when a node address is chosen); a local head on 127.0.0.1 is such a single-host cluster.
    """
    if not is_loopback(host):
        yield
        return
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def get_with_timeout(refs: list[ray.ObjectRef], names: list[str], what: str, timeout_s: float) -> list[Any]:
    """`ray.get` a list of calls; on timeout or death raise ActorCallError naming each failed actor.

    A dead actor is named first: its death usually explains why its peers in a collective hang.
    """
    ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    pending = set(not_ready)
    out, errors, failed, dead, raised = [], [], [], [], []
    for ref, name in zip(refs, names):
        if ref in pending:
            continue
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayActorError as err:
            # The last line of Ray's message is the cause, e.g. the exception raised in __init__.
            cause = ([line for line in str(err).splitlines() if line.strip()] or [""])[-1].strip()
            errors.append(f"{name} died ({type(err).__name__}: {cause})")
            failed.append(name)
            dead.append(name)
        except ray.exceptions.RayTaskError as err:
            raised.append(err)
            errors.append(f"{name} raised {str(err.cause)[:200] if err.cause else type(err).__name__}")
            failed.append(name)
    if raised and not dead and not pending:
        # Exceptions raised by our own code inside the actors, none dead or late: keep the first one's type and
        # message. (A dead peer explains the others' errors in a collective, so it is named instead.)
        raise raised[0].as_instanceof_cause() from None
    if pending:
        late = [n for r, n in zip(refs, names) if r in pending]
        errors.append(f"no answer within {timeout_s:.0f}s from {', '.join(late)}")
        failed += late
    if errors:
        raise ActorCallError(f"{what} failed: " + "; ".join(errors), failed, dead)
    return out


def local_gpu_index(gpu_ids: list, visible_devices: str | None) -> int:
    """This process's CUDA index of the first GPU Ray assigned it (`gpu_ids` = `ray.get_gpu_ids()`).

    Ray normally sets CUDA_VISIBLE_DEVICES to the assigned GPUs, which makes it index 0; with
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES every GPU stays visible, and assuming 0 would put
    every process on the node's first GPU.
    """
    if not gpu_ids:
        return 0
    first = str(gpu_ids[0])
    if visible_devices:
        visible = [d.strip() for d in visible_devices.split(",")]
        if first not in visible:
            raise RuntimeError(f"Ray assigned GPU {first}, which CUDA_VISIBLE_DEVICES={visible_devices} hides")
        return visible.index(first)
    return int(first)
