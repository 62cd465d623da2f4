"""The TRL baseline: the same GRPO workload through TRL's `GRPOTrainer`, in its own virtualenv.

TRL's GRPOTrainer generates with transformers' `generate` when `use_vllm=False`, so its venv needs
no vLLM: torch (the same 2.13.0 CPU wheel), the same transformers as rlhf_ray, and TRL.

    python3 -m venv .venv-trl
    .venv-trl/bin/pip install torch==2.13.0 transformers==<rlhf_ray's> trl==1.16.0

`ensure_trl_python` does exactly that once (idempotent), and `run_trl` starts this module's
`main` under that interpreter. There it imports only TRL, torch and `rlhf_ray.bench.reward`
(PYTHONPATH points at the repository; nothing else of rlhf_ray is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TRL_VERSION = "1.16.0"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-trl"


class TRLUnavailable(RuntimeError):
    """TRL's venv could not be made or TRL could not run; `reason` says why in one line."""

    def __init__(self, reason: str, output: str = ""):
        super().__init__(f"{reason}\n{output}" if output else reason)
        self.reason = reason


def trl_requirements() -> list[str]:
    import transformers

    return ["torch==2.13.0", f"transformers=={transformers.__version__}", f"trl=={TRL_VERSION}"]


def ensure_trl_python(venv: Path = DEFAULT_VENV) -> Path:
    """The venv's interpreter, after creating the venv and installing TRL into it if needed."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", f"import trl, sys; sys.exit(trl.__version__ != {TRL_VERSION!r})"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"bench: installing TRL {TRL_VERSION} into {venv} (once; a few minutes)", flush=True)
    install = [str(python), "-m", "pip", "install", "--quiet", *trl_requirements()]
    for cmd in ([sys.executable, "-m", "venv", str(venv)], install):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise TRLUnavailable(f"`{' '.join(cmd)}` failed (exit {done.returncode})", done.stderr[-1500:])
    return python


def run_trl(
    python: Path, policy: Path, prompts_file: Path, out_dir: Path, *, steps: int, prompts_per_step: int,
    group_size: int, response_len: int, lr: float, betas: tuple[float, float], kl_coef: float,
    precision: str = "float32", env: dict[str, str] | None = None,
) -> list[dict[str, float]]:  # fmt: skip
    """Run `steps` GRPO steps in TRL; returns each step's {step_s, samples, tokens}, warm-up step dropped.

    precision: "float32", "bfloat16" (TRL's bf16 mixed precision) or "native" (TRL's own defaults:
    bf16 and gradient checkpointing). env: extra environment of the TRL process (the OpenMP policy);
    it runs at this process's niceness.
    """
    out_dir = out_dir.resolve()  # the run's working directory is out_dir itself
    out_dir.mkdir(parents=True, exist_ok=True)
    policy, prompts_file, result = policy.resolve(), prompts_file.resolve(), out_dir / "trl_steps.json"
    cmd = [
        str(python), "-m", "rlhf_ray.bench.trl_baseline", "--model", str(policy), "--prompts", str(prompts_file),
        "--out", str(result), "--steps", str(steps), "--prompts-per-step", str(prompts_per_step),
        "--group-size", str(group_size), "--response-len", str(response_len), "--lr", str(lr),
        "--beta1", str(betas[0]), "--beta2", str(betas[1]), "--kl-coef", str(kl_coef), "--precision", precision,
    ]  # fmt: skip
    env = os.environ | (env or {}) | {"PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}
    with open(out_dir / "trl.log", "w") as log:
        done = subprocess.run(cmd, env=env, cwd=out_dir, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        log_text = (out_dir / "trl.log").read_text()
        last = ([line for line in log_text.splitlines() if line.strip()] or [""])[-1]
        raise TRLUnavailable(f"the TRL run failed ({last.strip()}); see {out_dir / 'trl.log'}", log_text[-1500:])
    return json.loads(result.read_text())[1:]


# ---------------------------------------------------------------- inside the TRL venv


def main() -> None:
    """Train with GRPOTrainer and write one {step_s, samples, tokens} per optimizer step to --out."""
    p = argparse.ArgumentParser(description=__doc__)
    for name, kind in [("model", str), ("prompts", str), ("out", str), ("steps", int), ("prompts-per-step", int),
                       ("group-size", int), ("response-len", int), ("lr", float), ("beta1", float),
                       ("beta2", float), ("kl-coef", float)]:  # fmt: skip
        p.add_argument(f"--{name}", type=kind, required=True)
    p.add_argument("--precision", choices=["float32", "bfloat16", "native"], default="float32")
    args = p.parse_args()

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_ray.bench.reward import letter_fraction

    def reward(completions: list[str], **_: object) -> list[float]:
        return [letter_fraction("", c, {}) for c in completions]

    class StepTimer(TrainerCallback):
        """Wall-clock seconds of each optimizer step (generation happens inside it) and its completion length."""

        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []

        def on_step_begin(self, *_, **__) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            self.steps.append({"step_s": time.perf_counter() - self.start})

        def on_log(self, _args, _state, _control, logs=None, **__) -> None:
            if logs and "completions/mean_length" in logs and self.steps:
                self.steps[-1]["mean_length"] = float(logs["completions/mean_length"])

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    samples = args.prompts_per_step * args.group_size
    config = GRPOConfig(
        output_dir="trl-out", max_steps=args.steps, per_device_train_batch_size=samples,
        gradient_accumulation_steps=1, num_generations=args.group_size, max_completion_length=args.response_len,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=args.lr, adam_beta1=args.beta1, adam_beta2=args.beta2,
        weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="cosine", beta=args.kl_coef, epsilon=0.2,
        num_iterations=1, loss_type="dapo", scale_rewards="group", use_vllm=False, use_cpu=True,
        # TRL defaults to bf16 and gradient checkpointing ("native"); the matched runs set rlhf_ray's precision.
        **({} if args.precision == "native" else {"bf16": args.precision == "bfloat16", "gradient_checkpointing": False}),
        generation_kwargs={"min_new_tokens": args.response_len},  # fixed length, as rlhf_ray's ignore_eos
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )  # fmt: skip
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=args.model, reward_funcs=reward, args=config,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in rows]), callbacks=[timer],
    )  # fmt: skip
    trainer.train()
    steps = [{"step_s": s["step_s"], "samples": samples, "tokens": samples * s["mean_length"]} for s in timer.steps]
    Path(args.out).write_text(json.dumps(steps))


if __name__ == "__main__":
    main()
