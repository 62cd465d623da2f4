"""`rlhf-ray sft` and `rlhf-ray rm` in their own processes on a tiny model: run folder, metrics, HF checkpoint."""

from __future__ import annotations

import json
import os
import pty
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_ray.recipes.synthetic import DISLIKED, LIKED, THINGS, instruction_rows, make_answer

COMMON = ["model.max_model_len=64", "rollout.sampling.max_new_tokens=16", "tracking.backend=none", "cluster.num_cpus=8", "data.seed=0"]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process, so its local Ray head is independent of the test session's."""
    return subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *args], capture_output=True, text=True, timeout=600)


def _cli_on_a_terminal(*args: str) -> tuple[int, str, str]:
    """The CLI in its own process with stdout on a pseudo-terminal, as when a person runs it: (rc, what the
    terminal received, stderr)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TERM="xterm"))
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # the terminal's buffer is small: read while the CLI writes
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: no process holds the terminal side any more
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    _, err = proc.communicate(timeout=600)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace"), err


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_cli_writes_config_metrics_and_a_loadable_checkpoint(tiny_model_dir: Path, tmp_path: Path):
    data = _write_jsonl(tmp_path / "sft.jsonl", instruction_rows(96, seed=0))
    proc = _cli("sft", *COMMON, f"model.policy_path={tiny_model_dir / 'policy'}", f"data.sft.path={data}",
                "sft.epochs=3", "sft.batch_size=16", "sft.lr=3e-3", "sft.max_len=48",
                f"train.output_dir={tmp_path}", "train.run_name=sft")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout is a pipe, as in a log or CI: one line per epoch, no in-place bar
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("sft epoch")]
    assert [line.split(" | ")[0] for line in epochs] == ["sft epoch 1/3", "sft epoch 2/3", "sft epoch 3/3"], proc.stdout
    assert "\r" not in proc.stdout and "[#" not in proc.stdout
    run = tmp_path / "sft"
    assert "policy_path" in (run / "config.yaml").read_text()
    losses = [m["sft/sft_loss"] for m in _metrics(run) if "sft/sft_loss" in m]
    assert len(losses) == 3 * ((96 - 9) // 16)  # sft.eval_fraction 0.1 holds out 9 rows
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # it learned from data.sft
    results = json.loads((run / "results.json").read_text())
    assert results["data/sft_rows"] == 96 and results["sft/cut_responses"] == 0  # max_len 48 cuts none
    assert results["eval/sft_loss"] < losses[0], (results["eval/sft_loss"], losses[0])  # held-out rows learned too
    last = _metrics(run)[-1]
    assert (last["step"], last["eval/sft_loss"]) == (len(losses), results["eval/sft_loss"])

    tok = AutoTokenizer.from_pretrained(run / "checkpoint")
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoint")
    ids = tok("Describe the river.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def _pairs(n: int, seed: int) -> list[dict]:
    """Pairs whose chosen answer names three liked qualities and whose rejected one names three disliked."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(THINGS)
        good, bad = rng.sample(sorted(LIKED), 3), rng.sample(sorted(DISLIKED), 3)
        rows.append({"prompt": f"Describe the {thing}.", "chosen": make_answer(thing, good),
                     "rejected": make_answer(thing, bad)})
    return rows


@pytest.mark.slow
def test_rm_cli_writes_heldout_accuracy_and_a_loadable_reward_model(tiny_model_dir: Path, tmp_path: Path):
    data = _write_jsonl(tmp_path / "prefs.jsonl", _pairs(128, seed=0))
    rc, terminal, err = _cli_on_a_terminal(
        "rm", *COMMON, f"model.policy_path={tiny_model_dir / 'policy'}", f"data.preferences.path={data}",
        "rm.epochs=3", "rm.batch_size=16", "rm.lr=1e-3", "rm.max_len=48", "rm.eval_fraction=0.25",
        f"train.output_dir={tmp_path}", "train.run_name=rm")
    assert rc == 0, err[-3000:]
    # on a terminal: a bar rewritten in place after each of the epoch's 6 steps (96 rows / 16), a line per epoch
    for epoch in (1, 2, 3):
        assert re.search(rf"\r\x1b\[Krm epoch {epoch}/3 \[#+-+\] 5/6 \|[^\r]* rm_loss \S+ \| eta ", terminal), terminal
        assert re.search(rf"\r\x1b\[Krm epoch {epoch}/3 \|[^\r]* rm_loss \S+ \| \S+ \| eta \S+\r\n", terminal)
    assert terminal.count("\r\x1b[Krm epoch 1/3 [") == 5 and "] 6/6" not in terminal  # the 6th step prints the line
    run = tmp_path / "rm"
    assert (run / "config.yaml").is_file()
    rows = _metrics(run)
    assert any("rm/rm_loss" in r for r in rows)
    accuracy = [r["eval/rm_accuracy"] for r in rows if "eval/rm_accuracy" in r]
    assert len(accuracy) == 1 and accuracy[0] > 0.8, accuracy  # liked vs disliked qualities is an easy rule
    assert json.loads((run / "results.json").read_text())["eval/rm_accuracy"] == accuracy[0]

    tok = AutoTokenizer.from_pretrained(run / "checkpoint")
    rm = AutoModelForSequenceClassification.from_pretrained(run / "checkpoint")
    assert rm.config.num_labels == 1
    scores = rm(**tok(["The river is calm , warm and bright ."], return_tensors="pt")).logits
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()
