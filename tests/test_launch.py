"""`rlhf-ray submit` (runtime_env, entrypoint, secrets never shown) and the launch files in cluster/.

Nothing here contacts a Ray server: the builder is pure, and `submit_main` is pointed at a closed
loopback port to exercise everything it prints before and after a failed connection.
"""

import contextlib
import json
import shlex
import socket
import subprocess
import tomllib
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from ray.runtime_env import RuntimeEnv

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.driver.launch import PROJECT_ROOT, SubmitError, build_submission, describe, resolve_address, submit_main

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
PPO = "configs/qwen2.5-1.5b-ppo.yaml"
SECRET = "planted-secret-xyz123"


@pytest.fixture(autouse=True)
def in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "WANDB_API_KEY", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)



@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused, and no other process can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]

def test_submission_runtime_env_and_entrypoint():
    overrides = ["train.steps=5", "data.prompts.path=/data/my prompts.jsonl"]
    sub = build_submission(PPO, overrides, environ={"WANDB_API_KEY": SECRET, "PATH": "/bin"})
    assert sub.entrypoint == (
        "python -m rlhf_ray.cli train configs/qwen2.5-1.5b-ppo.yaml "
        "train.steps=5 'data.prompts.path=/data/my prompts.jsonl'"
    )
    assert shlex.split(sub.entrypoint)[-1] == "data.prompts.path=/data/my prompts.jsonl"
    env = sub.runtime_env
    assert env["working_dir"] == str(PROJECT_ROOT)
    assert {".venv/", "runs/", "wandb/", ".git/"} <= set(env["excludes"])
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert set(gpu_extra) <= set(env["pip"]) and "deepspeed>=0.17" in env["pip"]  # the GPU extra's pinned vLLM
    assert not any(p.split(">")[0].split("=")[0] == "ray" for p in env["pip"])  # the cluster's Ray runs the job
    assert env["env_vars"] == {"WANDB_API_KEY": SECRET}  # only names listed in cluster.env_passthrough
    assert sub.env_names == ("WANDB_API_KEY",)
    RuntimeEnv(**env)  # Ray's own validation of the runtime_env


def test_no_install_uv_and_extra_packages():
    none = build_submission(PPO, [], install="none", environ={})
    assert set(none.runtime_env) == {"working_dir", "excludes"} and none.packages == ()
    uv = build_submission(PPO, [], install="uv", extra_pip=["flash-attn"], environ={})
    assert "pip" not in uv.runtime_env and uv.runtime_env["uv"][-1] == "flash-attn"
    RuntimeEnv(**uv.runtime_env)


def test_secret_values_are_never_shown(monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    sub = build_submission(PPO, [])
    assert sub.runtime_env["env_vars"]["WANDB_API_KEY"] == SECRET  # it does travel to the cluster ...
    assert SECRET not in repr(sub) and SECRET not in describe(sub, "http://127.0.0.1:8265")  # ... and nowhere else

    with closed_port() as port:
        closed = f"http://127.0.0.1:{port}"
        assert submit_main(PPO, ["train.steps=5"], address=closed) == 1
    out, err = capfd.readouterr()
    assert "WANDB_API_KEY (values not shown)" in out
    assert f"could not submit to {closed}" in err
    assert SECRET not in out + err


def test_an_override_carrying_a_secret_is_refused(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    with pytest.raises(SubmitError, match="secrets travel only as environment variables"):
        build_submission(PPO, [f"tracking.entity={SECRET}"])


def test_bad_config_fails_before_submission(capfd):
    with closed_port() as port:
        closed = f"http://127.0.0.1:{port}"
        assert submit_main(PPO, ["rollout.num_actor=2"], address=closed) == 2
    out, err = capfd.readouterr()
    assert "did you mean 'rollout.num_actors'?" in err and "submitting" not in out
    with pytest.raises(ConfigError):
        build_submission(PPO, ["rollout.num_actor=2"], environ={})


def test_config_must_travel_with_the_project(tmp_path):
    outside = tmp_path / "run.yaml"
    outside.write_text((ROOT / PPO).read_text())
    with pytest.raises(SubmitError, match="outside .* the folder the job receives"):
        build_submission(str(outside), [], environ={})


def test_address_resolution():
    assert resolve_address(None, {}) == "http://127.0.0.1:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://10.0.0.1:8265"}) == "http://10.0.0.1:8265"
    assert resolve_address("http://10.0.0.2:8265", {}) == "http://10.0.0.2:8265"
    with pytest.raises(SubmitError, match="conflicts with RAY_ADDRESS"):
        resolve_address("http://10.0.0.2:8265", {"RAY_ADDRESS": "http://10.0.0.1:8265"})


# ---------------------------------------------------------------- cluster/ files


def test_ray_up_config_passes_rays_schema_and_keeps_the_dashboard_private():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (CLUSTER / "ray-cluster.aws.yaml").read_text()
    cfg = yaml.safe_load(text)
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert types["learner"]["resources"] == {"learner": 4}
    assert types["rollout"]["resources"] == {"rollout": 1}
    assert types["rollout"]["min_workers"] < types["rollout"]["max_workers"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "0.0.0.0" not in text


def test_kuberay_rayjob_has_independent_pools_and_token_auth():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    spec = job["spec"]
    assert job["kind"] == "RayJob" and spec["entrypoint"] == f"rlhf-ray train {PPO} train.output_dir=/runs"
    assert (ROOT / PPO).is_file()
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert json.loads(json.loads(groups["rollout"]["rayStartParams"]["resources"])) == {"rollout": 1}
    assert json.loads(json.loads(groups["learner"]["rayStartParams"]["resources"])) == {"learner": 4}
    assert groups["rollout"]["minReplicas"] < groups["rollout"]["maxReplicas"]
    assert "serviceType" not in cluster["headGroupSpec"]  # ClusterIP: never a public LoadBalancer

    # One shared run folder for the driver (head) and the learner ranks, which write checkpoint shards into it.
    def mounts(template: dict) -> dict[str, str]:
        [container] = template["spec"]["containers"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        return {m["mountPath"]: claims.get(m["name"], "") for m in container["volumeMounts"]}

    head = mounts(cluster["headGroupSpec"]["template"])
    assert head["/runs"] == mounts(groups["learner"]["template"])["/runs"] == "runs"
    assert head["/data"] == "data" and head["/models"] == "models"
    assert "/models" in mounts(groups["rollout"]["template"])
    ppo = yaml.safe_load((ROOT / PPO).read_text())
    assert ppo["data"]["prompts"]["path"].startswith("/data/") and ppo["model"]["policy_path"].startswith("/models/")


def test_slurm_script_parses_and_starts_a_private_authenticated_head():
    path = CLUSTER / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "--dashboard-host=127.0.0.1" in text and "export RAY_AUTH_MODE=token" in text
    assert "srun" in text and "rlhf-ray submit" in text and "--wait" in text
    assert 'rlhf-ray submit "$CONFIG" "train.output_dir=$PWD/runs"' in text  # the shared filesystem
