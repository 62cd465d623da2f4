"""A Ray cluster of several "nodes" on one machine: one Linux network namespace per node.

Each node is a namespace with its own loopback and one veth pair to a bridge in the root
namespace; the addresses are 10.213.0.0/24, created here and used by nothing else. Every node runs
`ray start` inside its namespace, so a socket bound on one node's 127.0.0.1 is unreachable from
the others, exactly as on separate hosts. The root namespace gets no address on the bridge:
drivers and commands run inside the head namespace (`NetnsCluster.run`), so nothing reaches a
node except over its veth link.

Everything the test bed creates carries the prefix `rlmn`: namespaces `rlmn-head`, `rlmn-node1`..,
the bridge `rlmn-br`, root-side veth ends `rlmn-v-<node>`. `cleanup_leftovers()` removes all of
them (a crashed earlier run included); the processes ended are exactly those inside the
namespaces (`ip netns pids`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Overridable so that two checkouts can each run a test bed at once (e.g. an old commit for comparison).
PREFIX = os.environ.get("RLMN_PREFIX", "rlmn")
BRIDGE = f"{PREFIX}-br"
SUBNET = os.environ.get("RLMN_SUBNET", "10.213.0")
WORKER_PORTS = (10002, 19999)  # Ray's default range for its workers' own gRPC servers, pinned to tell them apart
GCS_PORT = 6379  # each namespace has its own port space: Ray's default ports collide with nothing
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Node:
    """One namespace: `name` ("head", "node1", ...), its address on the bridge, and what Ray offers there."""

    name: str
    ip: str
    num_cpus: float
    resources: dict[str, float] = field(default_factory=dict)
    private_dir: str = ""  # if set, this node sees its own empty tmpfs at this path (no shared run folder)

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def veth(self) -> str:
        return f"{PREFIX}-v-{self.name}"[:15]  # interface names are at most 15 characters


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out


def netns_unavailable() -> str:
    """Why this machine cannot host the test bed ("" if it can): `ip netns` needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` is not permitted here ({made.stderr.strip()}); run as root to test across nodes"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def namespace_pids(netns: str) -> list[int]:
    out = sh("ip", "netns", "pids", netns, check=False)
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def kill_namespace_processes(netns: str, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process inside `netns` (and only those)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = namespace_pids(netns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while namespace_pids(netns) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not namespace_pids(netns):
            return


def cleanup_leftovers() -> None:
    """Remove every namespace and link named with the prefix, ending the processes inside first. Idempotent."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(f"{PREFIX}-"):
            kill_namespace_processes(name)
            sh("ip", "netns", "del", name, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        if dev.startswith(PREFIX):
            sh("ip", "link", "del", dev, check=False)


class NetnsCluster:
    """A head namespace (driver only, 0 CPUs for actors unless told) and worker namespaces, one Ray node each."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.head = nodes[0]
        self.address = f"{self.head.ip}:{GCS_PORT}"
        self.temp_root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}_", dir="/tmp"))
        token = self.temp_root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), self.env.get("PYTHONPATH")]))
        self.env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self.ray_bin = str(Path(sys.executable).parent / "ray")
        self.start_s = 0.0

    def start(self) -> None:
        t0 = time.perf_counter()
        cleanup_leftovers()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        for node in self.nodes.values():
            self._add_namespace(node)
        for node in self.nodes.values():
            self._start_ray(node)
        self.start_s = time.perf_counter() - t0

    def _add_namespace(self, node: Node) -> None:
        sh("ip", "netns", "add", node.netns)
        sh("ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        sh("ip", "link", "set", node.veth, "master", BRIDGE)
        sh("ip", "link", "set", node.veth, "up")
        sh("ip", "-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        sh("ip", "-n", node.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", node.netns, "link", "set", "lo", "up")

    def _start_ray(self, node: Node) -> None:
        temp_dir = self.temp_root / node.name
        temp_dir.mkdir()
        args = ["--node-ip-address", node.ip, "--num-cpus", f"{node.num_cpus:g}", "--temp-dir", str(temp_dir),
                "--object-store-memory", str(150 * 2**20), "--disable-usage-stats",
                "--min-worker-port", str(WORKER_PORTS[0]), "--max-worker-port", str(WORKER_PORTS[1])]
        if node.resources:
            args += ["--resources", json.dumps(node.resources)]
        if node is self.head:
            args = ["--head", "--port", str(GCS_PORT), "--include-dashboard=false", *args]
        else:
            args = ["--address", self.address, *args]
        cmd = [self.ray_bin, "start", *args]
        if node.private_dir:
            # A mount namespace of its own: this node's processes see an empty tmpfs at private_dir.
            script = f"mkdir -p {node.private_dir} && mount -t tmpfs -o size=64m tmpfs {node.private_dir} && exec \"$@\""
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
        # Ray's memory monitor kills workers when the *host* passes 95% memory: every "node" here sees the whole
        # machine's memory, shared with whatever else runs on it, so it would kill this cluster's actors for that.
        env = self.env | {"RAY_memory_monitor_refresh_ms": "0"}
        if node is self.head:
            # The GCS declares a silent node dead after about 3 s instead of Ray's default of about 30 s: a cut
            # node's actors then fail fast enough for a test (a real cluster keeps the default).
            env |= {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}
        out = self.run(node.name, cmd, timeout=180, env=env)
        if out.returncode:
            raise RuntimeError(f"ray start on {node.name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")

    def add_node(self, node: Node) -> None:
        """Start one more node in the running cluster (e.g. a spare rollout slot, after the pool is placed)."""
        self.nodes[node.name] = node
        self._add_namespace(node)
        self._start_ray(node)

    def run(self, node: str, cmd: list[str], timeout: float = 600, env: dict[str, str] | None = None,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
        """Run `cmd` inside `node`'s namespace with the cluster's environment (token, PYTHONPATH)."""
        return subprocess.run(["ip", "netns", "exec", self.nodes[node].netns, *cmd], env=env or self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=cwd)

    def popen(self, node: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.nodes[node].netns, *cmd], env=env or self.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)

    def python(self, node: str, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(node, [sys.executable, *args], timeout=timeout)

    def listeners(self, node: str) -> list[tuple[str, int, str]]:
        """(local address:port, pid, process name) of every TCP socket listening inside `node`'s namespace."""
        out = self.run(node, ["ss", "-ltnpH"], timeout=30).stdout
        rows = []
        for line in out.splitlines():
            parts = line.split(maxsplit=5)
            for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', parts[5] if len(parts) > 5 else ""):
                rows.append((parts[3], int(pid), name))
        return rows

    def cut(self, node: str) -> None:
        """Take `node`'s link down: from now on no packet reaches it or leaves it."""
        sh("ip", "link", "set", self.nodes[node].veth, "down")

    def reconnect(self, node: str) -> None:
        sh("ip", "link", "set", self.nodes[node].veth, "up")

    def stop(self) -> float:
        """End every process in the namespaces, delete namespaces and links; returns the seconds it took."""
        t0 = time.perf_counter()
        cleanup_leftovers()
        shutil.rmtree(self.temp_root, ignore_errors=True)
        return time.perf_counter() - t0


def default_nodes() -> list[Node]:
    """The layout of the multi-node tests: head (driver only), node1 learners, node2 rollout, node3 a private /tmp/rlmn-private."""
    return [
        Node("head", f"{SUBNET}.10", num_cpus=0),
        Node("node1", f"{SUBNET}.11", num_cpus=4, resources={"learner": 2}),
        Node("node2", f"{SUBNET}.12", num_cpus=3, resources={"rollout": 2}),
        Node("node3", f"{SUBNET}.13", num_cpus=2, resources={"private_learner": 1},
             private_dir=f"/tmp/{PREFIX}-private"),
    ]


if __name__ == "__main__":  # python tests/netns_cluster.py: start, print the nodes, stop (a timing check)
    cluster = NetnsCluster(default_nodes())
    try:
        cluster.start()
        print(f"started in {cluster.start_s:.1f}s")
        print(cluster.python("head", ["-c", "import ray; ray.init(address=\"10.213.0.10:6379\"); print([(n['NodeManagerAddress'], n['Resources']) "
                                      "for n in ray.nodes()])"]).stdout)
    finally:
        print(f"stopped in {cluster.stop():.1f}s")
