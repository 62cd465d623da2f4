"""The benchmark: its statistics, its workloads, and its quick mode end to end (CPU-runnable).

No timing is asserted (the machines are shared): the runs must only produce well-formed reports
whose ratios are positive and finite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlhf_ray.bench.compute import matmul_peak_gflops, update_flops
from rlhf_ray.bench.main import run_bench
from rlhf_ray.bench.report import Figure, paired_ratio, ratio_of_medians, skipped, write_report
from rlhf_ray.bench.reward import letter_fraction
from rlhf_ray.bench.sync import line_fit
from rlhf_ray.bench.training import e2e_figure, overhead_figure, peak_share_figure
from rlhf_ray.bench.workloads import QUICK, prompt_texts

FIGURE_KEYS = {
    "e2e_vs_trl", "e2e_async_vs_trl", "e2e_bf16_vs_trl", "e2e_vs_trl_native", "learner_peak_float32",
    "learner_peak_bfloat16", "rollout_efficiency", "weight_sync", "rollout_scaling", "async_overlap", "overhead",
}
MAY_BE_SKIPPED = {"e2e_vs_trl", "e2e_async_vs_trl", "e2e_bf16_vs_trl", "e2e_vs_trl_native", "learner_peak_bfloat16"}


def check_report(out: Path, expected_keys: set[str]) -> dict:
    """results.json/md/png exist; every expected figure has a positive finite value within its min–max."""
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["workload"]["name"] == "quick"
    figures = {f["key"]: f for f in data["figures"]}
    assert set(figures) == expected_keys
    for f in figures.values():
        if f["value"] is None:  # only TRL (offline machine) and bf16 (no bf16 unit) comparisons may be skipped
            assert f["key"] in MAY_BE_SKIPPED and f["note"]
            continue
        assert math.isfinite(f["value"])
        assert f["value"] >= 0 if f["key"] == "overhead" else f["value"] > 0
        assert f["low"] <= f["value"] <= f["high"]
        assert f["met"] in (True, False)
    table = (out / "results.md").read_text()
    assert "| figure | measured | min–max | goal | met |" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return figures


# ---------------------------------------------------------------- pure helpers


def test_paired_ratio_takes_the_median_of_pairs() -> None:
    assert paired_ratio([2.0, 3.0, 8.0], [1.0, 1.0, 2.0]) == (3.0, 2.0, 4.0)


def test_ratio_of_medians_bounds_every_pairing() -> None:
    value, low, high = ratio_of_medians([4.0, 6.0, 5.0], [1.0, 2.0, 4.0])
    assert (value, low, high) == (2.5, 1.0, 6.0)


def test_figure_goal_direction() -> None:
    faster = Figure("x", "x", 3.2, 3.0, 3.5, goal=3.0, higher_is_better=True)
    slower = Figure("y", "y", 0.8, 0.7, 0.9, goal=0.7, higher_is_better=False)
    assert faster.met is True and slower.met is False
    assert skipped("z", "z", 1.0, True, note="offline").met is None


def test_report_files_from_given_figures(tmp_path: Path) -> None:
    figures = [
        Figure("rollout_efficiency", "eff", 0.95, 0.9, 1.0, goal=0.9, higher_is_better=True, details={"a": 1.0}),
        Figure("overhead", "overhead", 0.03, 0.02, 0.04, goal=0.05, higher_is_better=False, unit="%"),
        skipped("e2e_vs_trl", "e2e", 3.0, True, note="TRL could not run"),
    ]
    meta = {"workload": {"name": "quick"}, "machine": "test", "date": "today", "seconds": 1.0, "load_average": [0, 0]}
    text = write_report(tmp_path, figures, meta, {"generate": 1.0, "update": 3.0})
    assert "3.00%" in text and "| update | 3.000 | 75.0% |" in text and "TRL could not run" in text
    check_report(tmp_path, {"rollout_efficiency", "overhead", "e2e_vs_trl"})


def test_line_fit_recovers_a_line() -> None:
    assert line_fit([1.0, 2.0, 4.0], [2.5, 3.0, 4.0]) == pytest.approx((2.0, 0.5))


def test_overhead_is_the_step_time_outside_the_stages() -> None:
    stages = {"generate": 1.8, "reward": 0.1, "reference": 0.5, "logprobs": 0.5, "update": 1.5, "sync": 0.4}
    step = {f"timing/{k}_s": v for k, v in stages.items()} | {"timing/step_s": 5.0, "rollout/response_len_mean": 60.0}
    figure, breakdown = overhead_figure([step, step])
    assert figure.value == pytest.approx(0.04) and figure.met is True
    assert breakdown["other"] == pytest.approx(0.2)
    faster = e2e_figure([step], [{"step_s": 10.0, "samples": 16, "tokens": 16 * 60.0}], samples=16)
    assert faster.value == pytest.approx(2.0) and faster.details["samples_per_s_ratio"] == pytest.approx(2.0)


def test_prompts_have_exactly_the_workload_length(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "policy")
    texts = prompt_texts(tokenizer, QUICK.prompt_len, 16)
    assert len(set(texts)) == 16
    assert {len(tokenizer(t)["input_ids"]) for t in texts} == {QUICK.prompt_len}
    with pytest.raises(ValueError, match="encode to 1 tokens"):
        prompt_texts(tokenizer, 1, 4)


def test_reward_varies_between_responses() -> None:
    assert letter_fraction("p", "ab12", {}) == 0.5
    assert letter_fraction("p", "", {}) == 0.0


# ---------------------------------------------------------------- real runs


def test_quick_sync_figure(tmp_path: Path, ray_cluster: None) -> None:
    """A real pool, a real learner and real broadcasts on the tiny model, reported (every figure: bench marker)."""
    run_bench(tmp_path, quick=True, figures=("sync",))
    figures = check_report(tmp_path, {"weight_sync"})
    details = figures["weight_sync"]["details"]
    assert details["megabytes"] > 0 and details["without_reload_ratio_median"] > 0
    assert details["size_0_mb"] < details["size_1_mb"] and all(details[f"size_{i}_s"] > 0 for i in (0, 1))
    assert math.isfinite(details["size_fit_fixed_s"]) and math.isfinite(details["size_fit_s_per_gb"])


@pytest.mark.bench
def test_bench_quick_runs_every_figure(tmp_path: Path) -> None:
    """`python -m rlhf_ray.bench --quick`: every figure, GRPO runs and the TRL baseline included.

    Its own process, so it starts its own Ray head, sized for the training runs. TRL's venv is
    installed on first use; offline, the TRL figure is reported as skipped.
    """
    done = subprocess.run([sys.executable, "-m", "rlhf_ray.bench", "--quick", "--out", str(tmp_path)], timeout=900)
    assert done.returncode == 0
    figures = check_report(tmp_path, FIGURE_KEYS)
    assert set(figures["overhead"]["details"]) >= {f"{s}_s" for s in ("generate", "update", "sync")}


def test_update_flops_counts_every_linear_weight_and_attention(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(tiny_model_dir / "policy")
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * c.intermediate_size  # q, o; k, v; gate, up, down
    linear = c.num_hidden_layers * per_layer + h * c.vocab_size  # + lm_head
    samples, seq = 3, 10
    forward = 2 * linear * samples * seq + 4 * seq * seq * h * c.num_hidden_layers * samples
    assert update_flops(str(tiny_model_dir / "policy"), samples, seq) == 3 * forward


def test_peak_share_is_update_gflops_over_the_peak() -> None:
    steps = [{"timing/update_s": 2.0}, {"timing/update_s": 4.0}, {"timing/update_s": 1.0}]
    figure = peak_share_figure(steps, flops=8e9, peak_gflops=10.0, dtype="float32")
    assert (figure.value, figure.low, figure.high) == pytest.approx((0.4, 0.2, 0.8))
    assert figure.key == "learner_peak_float32" and figure.met is False  # goal 0.7
    assert matmul_peak_gflops("float32", threads=1, size=128, repeats=2) > 0
