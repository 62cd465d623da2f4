"""Training figures: end-to-end GRPO against TRL, async overlap, and the driver's overhead.

Runs of `train_steps` GRPO steps each, back to back, `train_rounds` times over (see
`run_grpo` for the steps that are not measured):

    e2e     rlhf_ray, synchronous, fp32: 2 rollout actors, a 2-thread learner (both cores for each stage)
    e2e_async, e2e_bf16    the same in async mode, and in bf16 (where the CPU has bf16 matrix units)
    trl     TRL's GRPOTrainer on the same model, prompts, group size, lengths and optimizer settings, under
            the learner's OpenMP environment; trl_bf16 in bf16; trl_native in TRL's own defaults
    sync    rlhf_ray, 1 rollout actor and a 1-thread learner, 2 long responses to one prompt, so that
    async   generating a batch takes about as long as the rest of the step; the same with train.async_mode

The overhead figure and the stage breakdown come from the e2e run's `timing/*` metrics.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from rlhf_ray.bench import trl_baseline
from rlhf_ray.bench.compute import matmul_peak_gflops, update_flops
from rlhf_ray.bench.report import Figure, ratio_of_medians, skipped, spread
from rlhf_ray.bench.workloads import BETAS, KL_COEF, LEARNING_RATE, Workload, grpo_config
from rlhf_ray.config import RunConfig
from rlhf_ray.hardware import COMPUTE_PROCESS_ENV, auto_dtype

STAGES = ("generate", "reward", "reference", "logprobs", "update", "sync")
E2E_TITLE = "End-to-end GRPO tokens/s, sync (rlhf_ray ÷ TRL, fp32)"


def run_grpo(cfg: RunConfig, run_dir: Path) -> list[dict[str, float]]:
    """Run the driver for cfg.train.steps steps; returns the metrics of every step but the first and last.

    The first is the warm-up; in async mode the last has no next batch to generate during its
    update, so neither is a steady-state step (both are dropped in both modes, alike).
    """
    from rlhf_ray.driver.loop import train

    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl is appended to, never truncated
    train(cfg, run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final save is ~370 MB; only metrics matter
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines][1:-1]


def step_throughput(steps: list[dict[str, float]], samples: int) -> tuple[list[float], list[float]]:
    """(samples/s, tokens/s) of each driver step."""
    per_s = [samples / s["timing/step_s"] for s in steps]
    tokens = [samples * s["rollout/response_len_mean"] / s["timing/step_s"] for s in steps]
    return per_s, tokens


def e2e_figure(
    ours: list[dict[str, float]], trl: list[dict[str, float]], samples: int, key: str = "e2e_vs_trl",
    title: str = E2E_TITLE, goal: float = 1.3, note: str = "",
) -> Figure:  # fmt: skip
    """tokens/s of a GRPO step, rlhf_ray ÷ TRL (samples/s in the details)."""
    our_samples, our_tokens = step_throughput(ours, samples)
    trl_samples = [s["samples"] / s["step_s"] for s in trl]
    trl_tokens = [s["tokens"] / s["step_s"] for s in trl]
    details = {"samples_per_s_ratio": ratio_of_medians(our_samples, trl_samples)[0]}
    for name, values in [("rlhf_ray_samples_per_s", our_samples), ("trl_samples_per_s", trl_samples),
                         ("rlhf_ray_tokens_per_s", our_tokens), ("trl_tokens_per_s", trl_tokens)]:  # fmt: skip
        details[f"{name}_median"] = spread(values)["median"]
    return Figure(
        key, title, *ratio_of_medians(our_tokens, trl_tokens), goal=goal, higher_is_better=True, details=details,
        note=note or "TRL generates with transformers `generate` (use_vllm=False); same model, prompts, group size, "
        "lengths, lr, betas, clip and KL (k3, in the loss), precision and OpenMP environment",
    )  # fmt: skip


def peak_share_figure(
    steps: list[dict[str, float]], flops: float, peak_gflops: float, dtype: str
) -> Figure:  # fmt: skip
    """The update's GFLOP/s (one forward + backward of `flops`) ÷ the measured matmul peak of its dtype."""
    gflops = [flops / s["timing/update_s"] / 1e9 for s in steps]
    shares = [g / peak_gflops for g in gflops]
    details = {"update_gflops_per_s_median": spread(gflops)["median"], "matmul_peak_gflops_per_s": peak_gflops,
               "update_gflop": flops / 1e9}  # fmt: skip
    return Figure(
        f"learner_peak_{dtype}", f"Learner update GFLOP/s ÷ {dtype} matmul peak", statistics.median(shares),
        min(shares), max(shares), goal=0.7, higher_is_better=True, details=details,
        note="peak: the best of 20 [1024×1024]² matmuls on the learner's threads, timed by the bench before Ray "
        "starts and again after the training runs (the better of the two); update FLOPs: 6 per linear weight per "
        "token plus attention, over the step's samples",
    )  # fmt: skip


def overhead_figure(steps: list[dict[str, float]]) -> tuple[Figure, dict[str, float]]:
    """1 − (sum of stage times) ÷ step time per step, and the median seconds of each stage."""
    outside = [s["timing/step_s"] - sum(s[f"timing/{k}_s"] for k in STAGES) for s in steps]
    fractions = [o / s["timing/step_s"] for o, s in zip(outside, steps)]
    stages = {k: statistics.median(s[f"timing/{k}_s"] for s in steps) for k in STAGES}
    stages["other"] = statistics.median(outside)
    figure = Figure(
        "overhead", "Driver overhead (step time outside stages)", statistics.median(fractions), min(fractions),
        max(fractions), goal=0.05, higher_is_better=False, unit="%",
        details={f"{k}_s": v for k, v in stages.items()},
    )  # fmt: skip
    return figure, stages


def async_figure(sync_steps: list[dict[str, float]], async_steps: list[dict[str, float]]) -> Figure:
    """Async step time ÷ synchronous step time on the balanced workload."""
    sync_s = [s["timing/step_s"] for s in sync_steps]
    async_s = [s["timing/step_s"] for s in async_steps]
    details = {f"sync_step_s_{k}": v for k, v in spread(sync_s).items()}
    details |= {f"async_step_s_{k}": v for k, v in spread(async_s).items()}
    for stage in ("generate", "update"):
        details[f"sync_{stage}_s"] = statistics.median(s[f"timing/{stage}_s"] for s in sync_steps)
    return Figure(
        "async_overlap", "Async step time ÷ sync step time", *ratio_of_medians(async_s, sync_s),
        goal=0.7, higher_is_better=False, details=details,
    )  # fmt: skip


def trl_steps(
    w: Workload, policy: Path, prompts_file: Path, out_dir: Path, precision: str, env: dict[str, str]
) -> list[dict[str, float]]:  # fmt: skip
    """TRL's per-step timings on the e2e workload (installs TRL's venv on first use)."""
    python = trl_baseline.ensure_trl_python()
    return trl_baseline.run_trl(
        python, policy, prompts_file, out_dir, steps=w.train_steps, prompts_per_step=w.train_prompts,
        group_size=w.group_size, response_len=w.response_len, lr=LEARNING_RATE, betas=BETAS, kl_coef=KL_COEF,
        precision=precision, env=env,
    )  # fmt: skip


# rlhf_ray's e2e runs: name -> (async_mode, dtype); TRL's: name -> precision (see trl_baseline.run_trl)
OUR_E2E = {"e2e": (False, "float32"), "e2e_async": (True, "float32"), "e2e_bf16": (False, "bfloat16")}
TRL_E2E = {"trl": "float32", "trl_bf16": "bfloat16", "trl_native": "native"}
# (figure key, title, goal, ours, TRL's); a figure needing bf16 is skipped on hardware without it
E2E_FIGURES = [
    ("e2e_vs_trl", E2E_TITLE, 1.3, "e2e", "trl"),
    ("e2e_async_vs_trl", "End-to-end, async mode (rlhf_ray ÷ TRL, fp32)", 1.8, "e2e_async", "trl"),
    ("e2e_bf16_vs_trl", "End-to-end, bf16 (rlhf_ray ÷ TRL, bf16)", 1.3, "e2e_bf16", "trl_bf16"),
    ("e2e_vs_trl_native", "End-to-end, bf16 (rlhf_ray ÷ TRL in its own defaults)", 1.3, "e2e_bf16", "trl_native"),
]
NATIVE_NOTE = "TRL in its own defaults (bf16, gradient checkpointing, the bench's OpenMP environment) against rlhf_ray in bf16"


def training_figures(
    w: Workload, policy: Path, prompts_file: Path, runs: Path, peaks: dict[str, float] | None = None
) -> tuple[list[Figure], dict[str, float]]:
    """The e2e (sync, async, bf16, TRL native), learner peak-share, async and overhead figures, and the e2e
    runs' median stage seconds.

    The runs go round `w.train_rounds` times, so that a stretch of load from elsewhere on the machine
    falls on both sides of each ratio rather than on one run; steps of all rounds are pooled.
    peaks: measured matmul GFLOP/s per dtype (`compute.matmul_peak_gflops`), timed again after the runs (the
    better timing is the peak); None skips the peak figures.
    """
    bf16 = auto_dtype()[0] == "bfloat16"
    e2e = dict(prompts_per_step=w.train_prompts, response_len=w.response_len, rollout_actors=2, learner_threads=2)
    # Async mode always recomputes the old log-probs (samples from the previous policy); so does sync here,
    # so that the async figure measures the overlap alone.
    balanced = dict(
        prompts_per_step=w.async_prompts, response_len=w.async_response_len, rollout_actors=1, learner_threads=1,
        old_logprobs="recompute", group_size=w.async_group_size,
    )
    matched_env = {k: v for k, v in COMPUTE_PROCESS_ENV.items() if k.startswith(("OMP_", "GOMP_"))}
    runs_of: dict[str, list[dict[str, float]]] = {k: [] for k in [*OUR_E2E, *TRL_E2E, "sync", "async"]}
    trl_error: trl_baseline.TRLUnavailable | None = None
    for _ in range(w.train_rounds):
        for name, (async_mode, dtype) in OUR_E2E.items():
            if dtype == "float32" or bf16:
                cfg = grpo_config(w, policy, prompts_file, runs, async_mode=async_mode, dtype=dtype, **e2e)
                runs_of[name] += run_grpo(cfg, runs / name)
        for name, precision in TRL_E2E.items():
            if trl_error is None and (precision == "float32" or bf16):
                try:
                    env = {} if precision == "native" else matched_env
                    runs_of[name] += trl_steps(w, policy, prompts_file, runs / name, precision, env)
                except trl_baseline.TRLUnavailable as err:
                    print(f"bench: skipping the TRL comparison: {err}", flush=True)
                    trl_error = err
        for mode in ("sync", "async"):
            cfg = grpo_config(w, policy, prompts_file, runs, async_mode=mode == "async", **balanced)
            runs_of[mode] += run_grpo(cfg, runs / mode)

    samples = w.train_prompts * w.group_size
    figures = []
    for key, title, goal, ours, trl in E2E_FIGURES:
        if trl_error is not None:
            figures.append(skipped(key, title, goal, True, note=f"TRL could not run: {trl_error.reason}"))
        elif not runs_of[ours] or not runs_of[trl]:
            figures.append(skipped(key, title, goal, True, note="this machine has no bf16 matrix unit"))
        else:
            note = NATIVE_NOTE if trl == "trl_native" else ""
            figures.append(e2e_figure(runs_of[ours], runs_of[trl], samples, key, title, goal, note))
    flops = update_flops(str(policy), samples, w.prompt_len + w.response_len)
    if peaks:  # timed again once every run has ended: a process busy on one core during a timing halves it
        peaks = {dtype: max(gflops, matmul_peak_gflops(dtype, threads=2)) for dtype, gflops in peaks.items()}
    for dtype, run in (("float32", "e2e"), ("bfloat16", "e2e_bf16")):
        if peaks and dtype in peaks and runs_of[run]:
            figures.append(peak_share_figure(runs_of[run], flops, peaks[dtype], dtype))
        else:
            title = f"Learner update GFLOP/s ÷ {dtype} matmul peak"
            figures.append(skipped(f"learner_peak_{dtype}", title, 0.7, True, note="not measured on this machine"))
    overhead, stages = overhead_figure(runs_of["e2e"])
    return [*figures, async_figure(runs_of["sync"], runs_of["async"]), overhead], stages
