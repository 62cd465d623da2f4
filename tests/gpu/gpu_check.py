"""The prepared GPU check (`make gpu-check`): the GPU path end to end on one GPU, no network, one JSON line of figures.

Builds two random-init models locally (a Qwen2-shaped ~0.45B one in bf16 and a tiny one), then on the GPU:
1. vLLM generation (tokens/s);
2. one bf16 DeepSpeed learner step (seconds);
3. the colocated hybrid engine: learner rank and vLLM actor in one placement-group bundle, vLLM asleep while
   the learner steps, weights by CUDA IPC; GPU memory awake/asleep, broadcast GB/s, then vLLM's greedy tokens
   against the learner's own greedy decoding and the log-prob gap (bf16);
4. 3 colocated GRPO steps through the real driver loop (seconds per step);
5. tests/test_gpu_weight_sync.py (the two-GPU NCCL test skips on one GPU, with its reason).
`--dry-run` does the non-GPU parts (arguments, model building, what would be skipped) on any machine.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# hidden 1152 = 18 heads of 64, 2 KV heads, 24 layers, MLP 4x: about 0.45B parameters with the tiny vocabulary.
BIG = {"hidden_size": 1152, "num_layers": 24, "num_heads": 18, "num_kv_heads": 2, "max_position": 2048}
TINY = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}
# Shares of the one GPU: learner rank + rollout actor in one bundle; the learner rank also holds the reference
# (the default reference.placement=learner) in the GRPO run.
LEARNER_GPU, ROLLOUT_GPU = 0.3, 0.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/rlhf_ray_gpu_check"), help="models and runs go here")
    p.add_argument("--dry-run", action="store_true", help="only the non-GPU parts: arguments, models, skips")
    p.add_argument("--grpo-steps", type=int, default=3)
    p.add_argument("--gen-prompts", type=int, default=64, help="prompts for the generation figure (4 samples each)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens per sample for the generation figure")
    return p.parse_args(argv)


def build_models(out: Path) -> dict[str, object]:
    """The ~0.45B Qwen2-shaped model and the tiny one, random init, saved locally; returns paths and sizes."""
    from safetensors import safe_open

    from rlhf_ray.recipes.tiny import make_tiny

    figures: dict[str, object] = {}
    for name, shape in (("big", BIG), ("tiny", TINY)):
        start = time.perf_counter()
        folder = out / name / "policy"
        if not (folder / "config.json").is_file():
            make_tiny(out / name, reward_model=False, **shape)
        params = 0
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                params += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        figures[f"{name}_path"] = str(folder)
        figures[f"{name}_params_m"] = round(params / 1e6, 1)
        figures[f"{name}_build_s"] = round(time.perf_counter() - start, 1)
    return figures


def gpu_memory_used_mib() -> float:
    """GPU 0's used memory as nvidia-smi reports it (every process on the GPU), in MiB."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[0])


def check_generation(path: str, prompts: int, tokens: int) -> dict[str, float]:
    from actors.rollout_pool import RolloutPool
    from rlhf_ray.config import ModelConfig, RolloutConfig, SamplingConfig

    pool = RolloutPool(ModelConfig(policy_path=path, dtype="bfloat16", max_model_len=1024),
                       RolloutConfig(num_gpus_per_actor=0.5, gpu_memory_utilization=0.4))
    try:
        ids = [[5 + (i * 7 + j) % 300 for j in range(32)] for i in range(prompts)]
        sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=tokens, ignore_eos=True, seed=0)
        start = time.perf_counter()
        result = pool.generate(ids, n=4, sampling=sampling)
        seconds = time.perf_counter() - start
        generated = sum(len(s.response_ids) for s in result.samples)
        return {"gen_tokens_per_s": round(generated / seconds, 1), "gen_seconds": round(seconds, 2)}
    finally:
        pool.shutdown()


def _greedy_in_learner(worker, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Runs inside learner rank 0 (`__ray_call__`): HF greedy decoding with the learner's own weights."""
    import torch

    model = worker.engine.module
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=worker.engine.device)
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                               pad_token_id=0)
            out.append(y[0, len(ids):].tolist())
    return out


def check_colocated(path: str) -> dict[str, float]:
    """Learner + sleeping vLLM in one bundle: memory, one SFT step, CUDA IPC broadcast, greedy and log-prob checks."""
    import ray
    import torch

    from actors.rollout_pool import RolloutPool
    from learners import LearnerGroup
    from rlhf_ray.config import SamplingConfig, load_config
    from rlhf_ray.driver.broadcaster import WeightBroadcaster
    from rlhf_ray.driver.components import policy_placement
    from rlhf_ray.protocol import collate

    cfg = load_config(None, [
        f"model.policy_path={path}", "model.dtype=bfloat16", "model.max_model_len=512",
        f"learner.num_gpus_per_rank={LEARNER_GPU}", f"rollout.num_gpus_per_actor={ROLLOUT_GPU}",
        "rollout.gpu_memory_utilization=0.25", "rollout.colocate=true", "rollout.enable_sleep_mode=true",
        "learner.micro_batch_size=4", "learner.minibatch_size=8", "learner.lr=1e-4", "weight_sync.bucket_mb=256",
    ])
    figures: dict[str, float] = {"mem_before_mib": gpu_memory_used_mib()}
    shared = policy_placement(cfg)
    pool = policy = None
    try:
        pool = RolloutPool(cfg.model, cfg.rollout, colocate_in=shared)  # asleep after its warm-up
        actor = pool.actors[0]
        figures["mem_vllm_asleep_mib"] = gpu_memory_used_mib()
        ray.get(actor.__ray_call__.remote(lambda a: a._wake("weights", "kv_cache")))
        figures["mem_vllm_awake_mib"] = gpu_memory_used_mib()
        ray.get(actor.__ray_call__.remote(lambda a: a._sleep()))
        figures["mem_vllm_asleep_again_mib"] = gpu_memory_used_mib()
        policy = LearnerGroup("policy", path, cfg.learner, cfg.model, placement=shared)
        sync = WeightBroadcaster(policy, pool, cfg.weight_sync, "cuda_ipc")  # pairs the actor with rank 0 by GPU UUID
        ids = torch.randint(5, 400, (8, 64), generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        policy.sft_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)})
        figures["learner_step_s"] = round(time.perf_counter() - start, 2)
        figures["mem_peak_with_learner_mib"] = gpu_memory_used_mib()
        stats = sync.broadcast()  # wakes the weights, loads every bucket, wakes the KV cache; checksums verified
        figures |= {"sync_gb_per_s": round(stats.gb_per_s, 2), "sync_s": round(stats.seconds, 3),
                    "sync_reload_s": round(stats.reload_seconds, 3)}
        prompts = [[5 + (i * 11 + j) % 300 for j in range(8 + i)] for i in range(8)]
        greedy = pool.generate(prompts, n=1, sampling=SamplingConfig(temperature=0.0, max_new_tokens=16, seed=0))
        ours = ray.get(policy.workers[0].__ray_call__.remote(_greedy_in_learner, prompts, 16))
        vllm_tokens = [s.response_ids for s in sorted(greedy.samples, key=lambda s: s.prompt_id)]
        figures["greedy_equal_fraction"] = sum(a == b for a, b in zip(vllm_tokens, ours)) / len(ours)
        figures["greedy_first_token_equal_fraction"] = sum(a[:1] == b[:1] for a, b in zip(vllm_tokens, ours)) / len(ours)
        batch = collate(greedy.samples, pad_id=0)
        gap = (policy.compute_logprobs(batch) - batch["rollout_logprobs"]).abs() * batch["response_mask"]
        figures["logprob_gap_max"] = round(float(gap.max()), 4)
        figures["logprob_gap_mean"] = round(float(gap.sum() / batch["response_mask"].sum()), 5)
        return figures
    finally:
        for part in (pool, policy):
            if part is not None:
                part.shutdown()
        if shared is not None:
            ray.util.remove_placement_group(shared)


def check_grpo(path: str, out: Path, steps: int) -> dict[str, float]:
    from rlhf_ray.config import load_config
    from rlhf_ray.driver.loop import train
    from rlhf_ray.recipes.synthetic import arithmetic_rows

    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(64, 1)))
    cfg = load_config(ROOT / "configs" / "grpo-arithmetic.yaml", [
        f"model.policy_path={path}", "model.dtype=bfloat16", "model.max_model_len=256",
        f"data.prompts.path={prompts}", f"train.steps={steps}", "train.prompts_per_step=16",
        "rollout.sampling.max_new_tokens=16", "learner.micro_batch_size=16", "learner.minibatch_size=128",
        f"learner.num_gpus_per_rank={LEARNER_GPU}", f"rollout.num_gpus_per_actor={ROLLOUT_GPU}",
        "rollout.gpu_memory_utilization=0.25", "rollout.colocate=true", "rollout.enable_sleep_mode=true",
        "tracking.mode=disabled", "cluster.num_cpus=16",
    ])
    train(cfg, out / "grpo")
    rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    return {"grpo_steps": len(rows), "grpo_step_s": round(sum(r["timing/step_s"] for r in rows[1:]) / max(1, len(rows) - 1), 2),
            "grpo_sync_gb_per_s": round(rows[-1]["perf/sync_gb_per_s"], 2)}


def run_gpu_tests() -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", str(ROOT / "tests" / "test_gpu_weight_sync.py")],
                          capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    return {"gpu_tests": lines[-1] if lines else f"pytest exit {proc.returncode}",
            "gpu_tests_skipped": "; ".join(line for line in lines if line.startswith("SKIPPED"))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    figures: dict[str, object] = {"cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
    figures |= build_models(args.out)
    if not torch.cuda.is_available() or args.dry_run:
        figures["skipped"] = ("--dry-run" if args.dry_run else "no CUDA GPU") + ": generation, learner step, colocated "\
            "broadcast with sleep mode, GRPO steps and tests/test_gpu_weight_sync.py not run"
        print(json.dumps(figures))
        return 0 if args.dry_run else 2
    import ray

    from rlhf_ray.config import ClusterConfig
    from rlhf_ray.ray_utils import init_ray

    init_ray(ClusterConfig(num_cpus=16))
    figures |= {"gpu_name": torch.cuda.get_device_name(0)}
    try:
        figures |= check_generation(figures["big_path"], args.gen_prompts, args.gen_tokens)
        figures |= check_colocated(figures["big_path"])
        figures |= check_grpo(figures["big_path"], args.out, args.grpo_steps)
    finally:
        ray.shutdown()
    figures |= run_gpu_tests()
    figures["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(figures))
    ok = figures["logprob_gap_mean"] < 0.05 and figures["greedy_first_token_equal_fraction"] >= 0.75
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
