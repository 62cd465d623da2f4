"""Progress a person reads: flat-reward detection and its warning/stop, the ETA on the step line."""

import logging
import random
import statistics

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.tracking import FlatRewardWatch, console_line, flat_reward, format_duration


def flat_by_stdev(scores, valid, n):
    """Reference: every group's population std of its valid rewards is 0."""
    size = n if n > 1 else len(scores)
    groups = [[s for s, v in zip(scores[i:i + size], valid[i:i + size]) if v] for i in range(0, len(scores), size)]
    return all(len(g) < 2 or statistics.pstdev(g) == 0.0 for g in groups)


def test_flat_reward_by_hand():
    assert flat_reward([1, 1, 0, 0], [True] * 4, n=2)  # each prompt's pair agrees: advantages all 0
    assert not flat_reward([1, 0, 0, 0], [True] * 4, n=2)
    assert flat_reward([1, 0, 0, 0], [True, False, True, True], n=2)  # the differing one is masked
    assert not flat_reward([1, 1, 0, 0], [True] * 4, n=1)  # one group: the batch
    assert flat_reward([0.5] * 3, [True] * 3, n=1)


def test_flat_reward_matches_a_stdev_reference():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.choice([1, 2, 4])
        scores = [float(rng.choice([0, 0, 1])) for _ in range(n * rng.randint(1, 4))]
        valid = [rng.random() > 0.2 for _ in scores]
        assert flat_reward(scores, valid, n) == flat_by_stdev(scores, valid, n)


def test_watch_warns_once_and_stops(caplog):
    watch = FlatRewardWatch(warn_after=2, stop_after=3)
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.tracking"):
        assert [watch.update(s, True) for s in range(2)] == [False, False]
        assert "zero variance within every prompt's samples for 2 steps in a row" in caplog.text
        assert watch.update(2, False) is False and watch.run == 0  # a step with signal resets the count
        assert [watch.update(s, True) for s in range(3, 6)] == [False, False, True]
    assert caplog.text.count("zero variance") == 2
    assert not any(FlatRewardWatch(1, 0).update(s, True) for s in range(10))  # 0 never stops


def test_console_line_eta():
    assert console_line(0, 5, {}, eta_s=125.4) == "step 1/5 | eta 2m05s"
    assert [format_duration(s) for s in (0, 59.6, 3600 * 2 + 7 * 60)] == ["0s", "1m00s", "2h07m"]


def test_config_fields():
    cfg = load_config(None, ["train.flat_reward_stop_steps=4"])
    assert (cfg.train.flat_reward_warn_steps, cfg.train.flat_reward_stop_steps) == (5, 4)
    with pytest.raises(Exception, match="flat_reward_warn_steps"):
        load_config(None, ["train.flat_reward_warn_steps=0"])


def test_epoch_progress_lines():
    from rlhf_ray.progress import EpochProgress

    p = EpochProgress("sft", epochs=3, steps_per_epoch=4)
    metrics = {"train/sft_loss": 1.23456, "train/lr": 1e-3}
    assert [p.line(s, metrics, 10.0) for s in (0, 1, 2)] == [None, None, None]
    assert p.line(3, metrics, 10.0) == "sft epoch 1/3 | sft_loss 1.235 | 10s | eta 20s"
    assert p.line(11, {"train/rm_accuracy": 0.75}, 30.0) == "sft epoch 3/3 | rm_accuracy 0.75 | 30s | eta 0s"


def test_worker_output_goes_to_the_file_and_errors_to_the_console(tmp_path, capsys):
    from rlhf_ray import console

    path = tmp_path / "run" / console.WORKER_LOG
    console.set_worker_output(path, verbose=False)
    try:
        assert console.routed_worker_output()
        path.parent.mkdir(parents=True)
        with open(path, "a") as f:
            console._write(f, False, {"pid": 7, "actor_name": "RolloutActor", "is_err": True,
                                      "lines": ["INFO vLLM engine started", "ERROR engine died"]})
        text = path.read_text()
        assert "(RolloutActor pid=7) INFO vLLM engine started" in text and "ERROR engine died" in text
        err = capsys.readouterr().err
        assert "engine died" in err and "engine started" not in err
    finally:
        console.set_worker_output(None)
    assert not console.routed_worker_output()


def test_make_tiny_arch_flag(tmp_path, capsys):
    import json as json_

    from rlhf_ray.cli import main

    assert main(["make-tiny", str(tmp_path), "--arch", "llama", "--hidden-size", "64", "--num-layers", "1"]) == 0
    paths = json_.loads(capsys.readouterr().out)
    config = json_.loads((tmp_path / "policy" / "config.json").read_text())
    assert paths["policy"] == str(tmp_path / "policy") and config["model_type"] == "llama"


def test_demo_config_is_found():
    from rlhf_ray.recipes.demo import DEMO_CONFIG

    assert DEMO_CONFIG.is_file() and DEMO_CONFIG.name == "demo.yaml"


# ---------------------------------------------------------------- in place on a terminal, lines elsewhere


def _terminal():
    """(text stream on a pty's terminal side, function reading what reached the other side)."""
    import os
    import pty

    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8")

    def read() -> str:
        stream.flush()
        os.set_blocking(master, False)
        chunks = []
        try:
            while chunk := os.read(master, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        return b"".join(chunks).decode()

    return stream, read


def test_bar_by_hand():
    from rlhf_ray.progress import bar

    assert bar(0, 4, width=8) == "[--------]" and bar(1, 4, width=8) == "[##------]"
    assert bar(3, 4, width=8) == "[######--]" and bar(4, 4, width=8) == "[########]" and bar(9, 4, 8) == "[########]"


def test_live_line_rewrites_in_place_on_a_terminal(monkeypatch):
    from rlhf_ray.progress import ERASE_LINE, LiveLine

    monkeypatch.setenv("TERM", "xterm")
    stream, read = _terminal()
    live = LiveLine(stream)
    assert live.tty
    live.status("sft epoch 1/2 [#---] 1/4")
    live.status("sft epoch 1/2 [##--] 2/4")
    live.line("sft epoch 1/2 | sft_loss 1.5")
    live.status("sft epoch 2/2 [#---] 1/4")
    live.close()
    assert read() == (ERASE_LINE + "sft epoch 1/2 [#---] 1/4" + ERASE_LINE + "sft epoch 1/2 [##--] 2/4" + ERASE_LINE
                      + "sft epoch 1/2 | sft_loss 1.5\r\n" + ERASE_LINE + "sft epoch 2/2 [#---] 1/4" + ERASE_LINE)
    monkeypatch.setenv("TERM", "dumb")  # a terminal that cannot erase: plain lines
    assert not LiveLine(stream).tty


def test_live_line_prints_only_lines_elsewhere():
    import io

    from rlhf_ray.progress import LiveLine

    out = io.StringIO()
    live = LiveLine(out)
    live.status("step 1/3 [----] generate...")
    live.line("step 1/3 | reward 0.5")
    live.close()
    assert out.getvalue() == "step 1/3 | reward 0.5\n"


def test_epoch_progress_on_a_terminal_and_in_a_log(monkeypatch):
    import io

    from rlhf_ray.progress import EpochProgress, LiveLine

    monkeypatch.setenv("TERM", "xterm")
    stream, read = _terminal()
    logged = io.StringIO()
    for live in (LiveLine(stream), LiveLine(logged)):
        p = EpochProgress("rm", epochs=2, steps_per_epoch=3, live=live)
        for step in range(6):
            p.step(step, {"train/rm_loss": 0.5, "train/lr": 1e-3})
    on_terminal = read()
    assert on_terminal.count("rm epoch 1/2 [") == 2 and on_terminal.count("rm epoch 2/2 [") == 2  # steps 1-2 of each
    assert "rm epoch 1/2 [################--------] 2/3 | rm_loss 0.5 | eta " in on_terminal
    assert on_terminal.count("\r\n") == 2 and "\r\x1b[Krm epoch 2/2 | rm_loss 0.5 | " in on_terminal
    lines = logged.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["rm epoch 1/2", "rm epoch 2/2"] and "\r" not in logged.getvalue()


def test_train_stages_show_in_place(monkeypatch):
    import time

    from rlhf_ray.progress import LiveLine, stage_status
    from rlhf_ray.tracking import StageTimer

    monkeypatch.setenv("TERM", "xterm")
    stream, read = _terminal()
    live = LiveLine(stream)
    timer = StageTimer(on_start=stage_status(live, 2, 4, time.perf_counter()))
    for stage in ("generate", "update"):
        with timer(stage):
            pass
    live.line("step 3/4 | reward 0.41")
    text = read()
    assert "step 3/4 [############------------] generate... | 0s" in text and "update... | 0s" in text
    assert text.endswith("\r\x1b[Kstep 3/4 | reward 0.41\r\n") and set(timer.seconds) == {"generate", "update"}
