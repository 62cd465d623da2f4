"""Tracking: metrics.jsonl, an offline W&B run, documented metric names, and no secret in any run file or log."""

import json
import logging

from rlhf_ray.config import TrackingConfig
from rlhf_ray.metric_table import METRICS, NAMESPACES, metrics_markdown
from rlhf_ray.tracking import SecretFilter, Tracker, console_line

SECRET = "planted-secret-123456"
CONFIG_SECRET = "config-only-secret-7890"

STEPS = [
    {"reward/mean": 0.41, "kl/mean": 0.02, "train/policy_loss": -0.13, "train/lr": 1e-5, "timing/step_s": 1.5},
    {"reward/mean": 0.52, "kl/mean": 0.03, "train/policy_loss": -0.11, "train/lr": 1e-5, "timing/step_s": 1.4},
]


def _files(root):
    return [p for p in root.rglob("*") if p.is_file()]


def test_metrics_jsonl_is_written_without_a_backend(tmp_path):
    with Tracker(TrackingConfig(backend="none"), tmp_path, "run", {"train": {"steps": 2}}) as tracker:
        for step, metrics in enumerate(STEPS):
            tracker.log(metrics, step=step)
        tracker.log_samples(0, ["p"], ["r"], [1.0])  # no backend: nothing to do, no error
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    assert all(line.items() >= metrics.items() for line, metrics in zip(lines, STEPS))
    assert not (tmp_path / "wandb").exists()

    with Tracker(TrackingConfig(backend="none"), tmp_path, "run", {}) as tracker:  # a resumed run appends
        tracker.log(STEPS[0], step=2)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_offline_wandb_run_holds_the_metrics_and_no_secret(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    file_handler = logging.FileHandler(run_dir / "driver.log")
    logging.getLogger().addHandler(file_handler)
    caplog.set_level(logging.INFO)
    config = {"tracking": {"api_key": SECRET, "project": "p"}, "hub": {"token": CONFIG_SECRET}, "note": f"key={SECRET}"}
    try:
        tracker = Tracker(TrackingConfig(mode="offline"), run_dir, "tiny-ppo", config)
        for step, metrics in enumerate(STEPS):
            tracker.log(metrics, step=step)
        tracker.log_samples(1, ["Describe the river."], [f"it is calm {SECRET}"], [0.5])
        logging.getLogger("rlhf_ray.driver.loop").warning("connecting with key %s", SECRET)
        logging.getLogger().info("hub token %s", CONFIG_SECRET)
        try:
            raise ValueError(f"bad key {SECRET}")
        except ValueError:
            logging.getLogger("rlhf_ray.cli").exception("startup failed")
        tracker.finish()
    finally:
        logging.getLogger().removeHandler(file_handler)
        file_handler.close()

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record_file = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"reward/mean" in record_file and b"tiny-ppo" in record_file
    assert list(runs[0].rglob("samples_1_*.table.json"))

    files = _files(run_dir)
    assert run_dir / "driver.log" in files and run_dir / "metrics.jsonl" in files
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data and CONFIG_SECRET.encode() not in data, path
    assert "connecting with key ***" in (run_dir / "driver.log").read_text()
    assert SECRET not in caplog.text and CONFIG_SECRET not in caplog.text
    assert "bad key ***" in caplog.text and "hub token ***" in caplog.text


def test_secret_filter_masks_message_arguments_and_tracebacks(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "token=%s extra=%s", (SECRET, "other-secret"), None)
    try:
        raise RuntimeError(SECRET)
    except RuntimeError as err:
        record.exc_info = (type(err), err, err.__traceback__)
    assert SecretFilter(extra=["other-secret"]).filter(record)
    text = logging.Formatter().format(record)
    assert SECRET not in text and "other-secret" not in text and text.startswith("token=*** extra=***")


def test_console_line():
    line = console_line(2, 10, {**STEPS[0], "rollout/response_len_mean": 17.25, "perf/samples_per_s": 3.0})
    assert line == "step 3/10 | reward 0.41 | kl 0.02 | pg_loss -0.13 | lr 1.00e-05 | len 17.2 | step_s 1.50"
    assert console_line(0, 5, {}) == "step 1/5"


REQUIRED = """rollout/tokens_per_s rollout/response_len_mean rollout/logprob_diff_mean rollout/logprob_diff_max
reward/mean reward/std reward/model_mean reward/masked_rows train/policy_loss train/value_loss train/clipfrac
train/approx_kl train/entropy train/grad_norm train/lr train/skipped_steps kl/mean kl/coef timing/generate_s
timing/reward_s timing/reference_s timing/logprobs_s timing/update_s timing/sync_s timing/step_s
perf/sync_gb_per_s perf/samples_per_s""".split()


def test_every_metric_is_documented_with_a_unit_in_a_known_namespace():
    assert set(REQUIRED) <= METRICS.keys()
    assert any(name.startswith("eval/") for name in METRICS)
    for name, text in METRICS.items():
        assert name.split("/")[0] in NAMESPACES, name
        assert text.endswith(")."), f"{name}: description must end with its unit in parentheses"
    assert "nats/sequence" in METRICS["kl/mean"]
    table = metrics_markdown()
    assert table.count("\n") == len(METRICS) + 1 and "| `kl/mean` |" in table


def test_disabled_wandb_still_writes_metrics_jsonl(tmp_path):
    with Tracker(TrackingConfig(mode="disabled"), tmp_path, "run", {}) as tracker:
        tracker.log(STEPS[0], step=0)
        tracker.log_table("samples", ["prompt"], [["p"]], step=0)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
