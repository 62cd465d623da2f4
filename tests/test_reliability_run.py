"""A real RL run (Ray, vLLM, DeepSpeed, W&B offline) started from the CLI in a subprocess, killed and resumed,
under bad rewards and planted secrets: no process outlives the killed driver, each step is logged once, and
nothing it leaves on disk (run folder, W&B files, Ray's session folders) holds a secret."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file
from wandb_file import history, run_record

from rlhf_ray.checkpoint import latest_complete
from rlhf_ray.recipes.synthetic import prompt_rows
from rlhf_ray.session_reaper import TOKEN_VAR

WANDB_SECRET = "planted-wandb-key-h8-0123456789abcdef"
HUB_SECRET = "hf_plantedHubTokenH8abcdefghijkl"


def run_processes(driver_pid: int) -> dict[int, psutil.Process]:
    """The driver's descendants: Ray's head daemons, agents and workers, vLLM, the reward child, W&B."""
    return {p.pid: p for p in psutil.Process(driver_pid).children(recursive=True)}


def alive(processes: dict[int, psutil.Process]) -> list[str]:
    out = []
    for p in processes.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


def listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket those processes listen on."""
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                found.append((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
            except psutil.NoSuchProcess:
                continue
    return sorted(found)


def ipv4(ip: str) -> str:
    """An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`, a dual-stack socket bound to it) as IPv4."""
    address = ipaddress.ip_address(ip)
    return str(getattr(address, "ipv4_mapped", None) or address)


@pytest.mark.slow
def test_a_killed_run_leaves_no_process_resumes_once_per_step_and_leaks_no_secret(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A CLI run in a subprocess, SIGKILLed after the checkpoint of step 2 and the log of step 2, then
    `--resume`d to the end:
    - every process of its Ray session (head daemons, agents, workers, vLLM, the reward child, W&B) is
      gone within seconds of the kill (`rlhf_ray.session_reaper`); while it runs, it listens on
      cluster.host (127.0.0.1) only and Ray knows its node by that address;
    - metrics.jsonl then has each step once, the W&B run id is kept, and the resumed W&B run file holds
      the steps run again, with the values of metrics.jsonl, rewound to the checkpoint (tracking.resume);
    - F9: a rule reward returns NaN for half the rows: masked and counted, the update finite;
    - security: secrets planted in the environment, in a config field that ends up in prompts and in an
      override on the command line (W&B used to keep the raw argv) are nowhere on disk: run folder, W&B
      files, the Ray session folders of both processes."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(16, seed=0)))
    run_dir = tmp_path / "run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, WANDB_API_KEY=WANDB_SECRET, HF_TOKEN=HUB_SECRET, RAY_TMPDIR=str(ray_tmp),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    env.pop(TOKEN_VAR, None)  # this test session's own token: the run gets its own
    argv = [
        f"model.policy_path={tiny_model_dir / 'policy'}", "model.max_model_len=256",
        "algorithm.name=grpo", "algorithm.kl.placement=loss", "algorithm.kl.estimator=k3",
        "reward.use_model=false", "reward.functions=[{path: 'reward_fns:nan_every_other_call'}]", "reward.retries=0",
        f"data.prompts.path={prompts}", f"data.prompts.system_prompt=Use key {WANDB_SECRET} or {HUB_SECRET}.",
        "rollout.kv_cache_space_gib=0.25", "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=8",
        "learner.micro_batch_size=8", "learner.minibatch_size=8", "learner.lr=1e-2",
        "train.steps=4", "train.prompts_per_step=4", f"train.output_dir={tmp_path}", "train.run_name=run",
        "tracking.backend=wandb", "tracking.mode=offline", f"tracking.project=p-{WANDB_SECRET}",
        "checkpoint.every=2", "cluster.num_cpus=8", "cluster.host=127.0.0.1",
        "reference.placement=actor",  # a ReferenceActor too, so that its process is among those that must go
    ]
    command = [sys.executable, "-m", "rlhf_ray.cli", "train", *argv]
    outputs = []
    try:
        with open(tmp_path / "first.out", "w+") as out:
            first = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                assert first.poll() is None, out.seek(0) or out.read()[-3000:]
                lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
                if len(lines) >= 3 and latest_complete(run_dir / "checkpoints") is not None:
                    break
                time.sleep(0.2)
            processes = run_processes(first.pid)
            kinds = " ".join(p.name() + " " + " ".join(p.cmdline()) for p in processes.values())
            for kind in ("gcs_server", "raylet", "log_monitor.py", "monitor.py", "DashboardAgent", "RuntimeEnvAgent",
                         "RolloutActor", "LearnerWorker", "ReferenceActor", "RewardActor", "rlhf_ray.reward_worker",
                         "wandb-core", "rlhf_ray.session_reaper"):
                assert kind in kinds, f"no {kind} process among the run's: {kinds[:2000]}"
            bound = listeners(set(processes) | {first.pid})  # checked at the end, once the rest is measured
            print(f"\nlisteners of the run: {bound}")
            placement = json.loads((run_dir / "placement.json").read_text())
            wandb_id = (run_dir / "wandb_run_id").read_text().strip()

            first.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            first.wait()
            while alive(processes) and time.monotonic() - killed_at < 30:
                time.sleep(0.1)
            gone_s = time.monotonic() - killed_at
            print(f"\nkilled run: {len(processes)} processes, all gone {gone_s:.1f} s after the SIGKILL")
            assert not alive(processes), f"alive 30 s after the driver's SIGKILL: {alive(processes)}"
            out.seek(0)
            outputs.append(out.read())
        assert latest_complete(run_dir / "checkpoints").name == "step_000002"

        resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        outputs.append(resumed.stdout + resumed.stderr)

        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        for r in rows:  # the NaN samples masked and counted; the update ran on finite advantages, nothing skipped
            assert r["reward/masked_rows"] == 4
            assert r["train/skipped_steps"] == 0 and r["train/consecutive_skips"] == 0
            assert all(math.isfinite(v) for k, v in r.items() if k.startswith(("train/", "kl/")))
            assert r["rollout/logprob_diff_max"] < 1e-3  # measured inside the one on-policy update step
        latest = latest_complete(run_dir / "checkpoints")
        assert latest is not None and latest.name == "step_000004"
        for shard in sorted((latest / "policy").rglob("*.safetensors")):
            for name, tensor in load_file(shard).items():
                assert tensor.isfinite().all(), f"{shard.name}:{name}"

        assert (run_dir / "wandb_run_id").read_text().strip() == wandb_id
        killed_file, resumed_file = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert run_record(killed_file).run_id == run_record(resumed_file).run_id == wandb_id
        assert {0, 1} <= set(history(killed_file))  # committed before the checkpoint of step 2
        again = history(resumed_file)
        assert sorted(again) == [2, 3]
        for name in ("reward/mean", "train/policy_loss"):  # the values of the steps run again, as in metrics.jsonl
            assert [again[s][name] for s in (2, 3)] == [rows[s][name] for s in (2, 3)]
        branch = run_record(resumed_file).branch_point
        assert (branch.run, branch.value) == (wandb_id, 1.0)  # W&B replaces steps 2-3 with these on sync

        assert "Use key *** or ***." in (run_dir / "config.yaml").read_text()
        assert "max_new_tokens: 8" in (run_dir / "config.yaml").read_text()  # an ordinary field, not hidden
        sessions = list(ray_tmp.glob("ray/session_*")) or list(ray_tmp.glob("session_*"))
        assert len([s for s in sessions if not s.is_symlink()]) == 2, sessions
        files = [p for root in (run_dir, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_socket()]
        assert len(files) > 30
        for path in files:
            data = path.read_bytes()
            assert WANDB_SECRET.encode() not in data and HUB_SECRET.encode() not in data, path
        for text in outputs:
            assert WANDB_SECRET not in text and HUB_SECRET not in text

        # cluster.host=127.0.0.1: Ray's node address and every listener of the session's processes
        assert {p["node_ip"] for p in placement.values()} == {"127.0.0.1"}, placement
        assert {"rollout-0", "policy-learner-0", "reward", "reference"} <= set(placement), placement
        assert bound and {ipv4(ip) for ip, _, _ in bound} == {"127.0.0.1"}, bound
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
