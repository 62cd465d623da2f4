"""`bench_main`: build the workload's model, run every figure, write and print the report.

    rlhf-ray bench                 # FULL workload (~15 min on 2 cores) -> bench/results.{json,md,png}
    python -m rlhf_ray.bench --quick --out /tmp/bench
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_ray.bench.report import Figure

if TYPE_CHECKING:
    from rlhf_ray.bench.workloads import Workload

FIGURES = ("rollout", "sync", "training")


def run_bench(out_dir: Path, quick: bool, figures: tuple[str, ...] = FIGURES) -> list[Figure]:
    """Run the named groups of figures; writes the report into out_dir and returns the figures.

    Models, prompt files and run folders go to out_dir/out (ignored by git).
    """
    # No OpenMP policy for everyone here: the learner ranks get theirs from rlhf_ray.hardware, the matched
    # TRL runs the same one, TRL's native run the bench's own environment (see `conditions`).
    import ray
    from transformers import AutoTokenizer

    from rlhf_ray.bench import report, rollout, sync, training, workloads
    from rlhf_ray.config import ClusterConfig
    from rlhf_ray.ray_utils import init_ray

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    w = workloads.QUICK if quick else workloads.FULL
    work = (out_dir / "out").resolve()  # Ray actors and the TRL subprocess get absolute paths
    policy = workloads.build_policy(w, work / "models")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    texts = workloads.prompt_texts(tokenizer, w.prompt_len, 64)
    prompt_ids = [tokenizer(t)["input_ids"] for t in texts[: w.rollout_prompts]]

    peaks = None
    if "training" in figures:  # before Ray starts: nothing else of ours runs while the peak is timed
        from rlhf_ray.bench.compute import matmul_peak_gflops

        peaks = {dtype: matmul_peak_gflops(dtype, threads=2) for dtype in ("float32", "bfloat16")}
    owns_ray = not ray.is_initialized()  # under pytest the session's cluster is shared: leave it up
    init_ray(ClusterConfig(num_cpus=workloads.CLUSTER_CPUS))
    results: list[Figure] = []
    stages: dict[str, float] | None = None
    seconds: dict[str, float] = {}
    try:
        if "rollout" in figures or "sync" in figures:
            pool1 = rollout.start_pool(str(policy), w, actors=1)
            try:
                if "rollout" in figures:
                    pool2 = rollout.start_pool(str(policy), w, actors=2)
                    try:
                        results += rollout.rollout_figures(rollout.measure(pool1, pool2, prompt_ids, w), w)
                    finally:
                        pool2.shutdown()  # frees its Ray CPUs for the learner (the test cluster has only 4)
                    _lap("rollout", start, seconds)
                if "sync" in figures:
                    results.append(sync.weight_sync_figure(str(policy), pool1, w, work / "models"))
                    _lap("sync", start, seconds)
            finally:
                pool1.shutdown()
        if "training" in figures:
            prompts_file = workloads.write_prompts(work / "prompts.jsonl", texts)
            train_figures, stages = training.training_figures(w, policy, prompts_file, work / "runs", peaks)
            results += train_figures
            _lap("training", start, seconds)
    finally:
        if owns_ray:
            ray.shutdown()

    order = ["e2e_vs_trl", "e2e_async_vs_trl", "e2e_bf16_vs_trl", "e2e_vs_trl_native", "learner_peak_float32",
             "learner_peak_bfloat16", "rollout_efficiency", "weight_sync", "rollout_scaling", "async_overlap",
             "overhead"]
    results.sort(key=lambda f: order.index(f.key))
    meta = run_meta(w, time.perf_counter() - start, load_before) | {"seconds_per_group": seconds}
    print(report.write_report(out_dir, results, meta, stages), flush=True)
    return results


def _lap(name: str, start: float, laps: dict[str, float]) -> None:
    """Record, and print as progress, the seconds since `start` not yet given to earlier groups."""
    laps[name] = time.perf_counter() - start - sum(laps.values())
    print(f"bench: {name} figures done in {laps[name]:.0f} s", flush=True)


def run_meta(w: Workload, seconds: float, load_before: float) -> dict[str, Any]:
    """What results.json records about the run: workload, machine, versions, duration, load.

    The 1-minute load average before and after tells how busy the machine was: above the core
    count, other processes were competing for it.
    """
    import torch
    import vllm

    from rlhf_ray.bench.workloads import describe

    return {
        "workload": describe(w),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, vllm {vllm.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": seconds,
        "load_average": [load_before, os.getloadavg()[0]],
        "conditions": conditions(),
    }


def conditions() -> str:
    """The process settings both sides of every end-to-end ratio ran under, in one sentence."""
    from rlhf_ray.hardware import COMPUTE_PROCESS_ENV, auto_dtype

    omp = " ".join(f"{k}={v}" for k, v in COMPUTE_PROCESS_ENV.items() if k != "RAY_worker_niceness")
    bench_omp = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    return (
        f"rlhf_ray's learner ranks and reference: nice 0, {omp}, 2 threads (1 in the async-overlap runs); "
        f"vLLM engines: Ray's nice 15, one pinned core each. TRL matched runs: the same {omp}, nice {os.nice(0)} "
        f"(the bench's), 2 threads, the same precision as the rlhf_ray run they are compared with (fp32, or "
        f"bf16 mixed precision). TRL native: its defaults (bf16, gradient checkpointing) under the bench's "
        f"environment ({bench_omp or 'no OpenMP variables: libgomp defaults'}). bf16 on this machine: "
        f"{auto_dtype()[1]}."
    )


def bench_main(out_dir: str = "bench", quick: bool = False, only: list[str] | None = None) -> int:
    """Entry point of `rlhf-ray bench`: every figure on the FULL (or QUICK) workload; returns an exit code.

    Writes out_dir/results.json, results.md and results.png and prints the table. The exit code
    is 0 even when a goal is missed: a benchmark reports, it does not gate.
    """
    run_bench(Path(out_dir), quick, tuple(only) if only else FIGURES)
    return 0
