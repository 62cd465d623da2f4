"""`rlhf-ray`: the command line. Each subcommand takes a YAML config plus dotted `key=value` overrides."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from rlhf_ray.config import ConfigError, RunConfig, load_config


def _config(args: argparse.Namespace) -> RunConfig:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # no config file given, only overrides
    return load_config(config, overrides)


def _route_worker_output(args: argparse.Namespace, run_dir: Path) -> None:
    """vLLM, DeepSpeed and Ray worker logs to run_dir/workers.log (and the console with --verbose)."""
    from rlhf_ray.console import WORKER_LOG, set_worker_output

    set_worker_output(run_dir / WORKER_LOG, verbose=args.verbose)


def cmd_config(args: argparse.Namespace) -> None:
    """Print the resolved config (secrets redacted)."""
    import yaml

    from rlhf_ray.config import redact

    print(yaml.safe_dump(redact(_config(args).model_dump(mode="json")), sort_keys=False))


def cmd_make_tiny(args: argparse.Namespace) -> None:
    from rlhf_ray.recipes.tiny import make_tiny

    if args.hidden_size < 64 or args.hidden_size % 32:
        raise ConfigError(f"--hidden-size={args.hidden_size}: must be a multiple of 32 and at least 64 (two heads "
                          "of at least 32 dimensions, as vLLM's CPU attention needs); fix: e.g. --hidden-size 64")
    if args.num_layers < 1:
        raise ConfigError(f"--num-layers={args.num_layers}: must be at least 1; fix: e.g. --num-layers 2")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"make-tiny OUT={args.out[:200]!r} is a file, not a folder; fix: name a new or empty folder")
    paths = make_tiny(
        args.out, arch=args.arch, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed, tie=args.tie
    )
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    from rlhf_ray.driver.run_folder import RunLock, check_resumable, run_dir_for
    from rlhf_ray.driver.supervisor import RunFailedError, train_supervised

    cfg = _config(args)
    if args.resume and not cfg.train.run_name:
        raise ConfigError("--resume needs train.run_name: the run folder to continue (runs/<run_name>)")
    run_dir = run_dir_for(cfg)
    _route_worker_output(args, run_dir)
    if args.resume:
        check_resumable(run_dir)
    with RunLock(run_dir):
        try:
            train_supervised(cfg, run_dir, resume=args.resume)
        except RunFailedError as err:  # not the user's input: exit 1, with the message alone (the cause is logged)
            from rlhf_ray.redaction import argv_secrets, environment_secrets, mask

            print(f"rlhf-ray: {mask(str(err), environment_secrets() | argv_secrets(sys.argv))}", file=sys.stderr)
            sys.exit(1)


def cmd_scale(args: argparse.Namespace) -> None:
    """Ask a running `rlhf-ray train` for N rollout actors; it applies the request between steps."""
    from rlhf_ray.driver.recovery import write_scale_request

    path = write_scale_request(args.run_dir, args.rollout)
    print(json.dumps({"control_file": str(path), "rollout": {"num_actors": args.rollout}}))


def _stage(kind: str, args: argparse.Namespace) -> None:
    from rlhf_ray.driver.run_folder import RunLock, run_dir_for
    from rlhf_ray.driver.stages import stage_main

    cfg = _config(args)
    run_dir = run_dir_for(cfg)
    _route_worker_output(args, run_dir)
    with RunLock(run_dir):
        metrics = stage_main(cfg, kind, run_dir)
    print(json.dumps(metrics, indent=2))
    print(f"model: {run_dir / 'checkpoint'}")  # again, after the metrics, as the last line


def cmd_sft(args: argparse.Namespace) -> None:
    """Instruction finetuning of model.policy_path on data.sft."""
    _stage("sft", args)


def cmd_rm(args: argparse.Namespace) -> None:
    """Reward model (Bradley-Terry) from model.policy_path on the pairs of data.preferences."""
    _stage("rm", args)


def cmd_demo(args: argparse.Namespace) -> None:
    from rlhf_ray.driver.run_folder import RunLock, run_dir_for

    cfg = load_config(args.config or Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", args.overrides)
    run_dir = run_dir_for(cfg)
    _route_worker_output(args, run_dir)
    with RunLock(run_dir):
        from rlhf_ray.recipes.demo import SIZES, run_demo

        if args.task == "arithmetic":
            from rlhf_ray.recipes.arithmetic import run_arithmetic

            results = run_arithmetic(cfg, run_dir)
        else:
            results = run_demo(cfg, run_dir, SIZES)
    print(json.dumps({k: v for k, v in results.items() if k != "examples"}, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from rlhf_ray.driver.preflight import check_model_folder

    cfg = _config(args)
    check_model_folder(args.model or cfg.model.policy_path, "--model" if args.model else "model.policy_path",
                       cfg.model.max_model_len, tokenizer=True)
    from rlhf_ray.driver.evaluate import eval_main

    _route_worker_output(args, Path(args.out).parent if args.out else Path(cfg.train.output_dir) / (cfg.train.run_name or "eval"))
    eval_main(cfg, args.model, args.out, args.templates)


def cmd_plan(args: argparse.Namespace) -> None:
    if args.cluster:  # a cluster described in a file: no Ray needed
        from rlhf_ray.driver.cluster_plan import cluster_plan_main

        sys.exit(cluster_plan_main(_config(args), args.cluster, args.model_config))
    from rlhf_ray.driver.plan import plan_main

    sys.exit(plan_main(_config(args), args.address))


def cmd_submit(args: argparse.Namespace) -> None:
    from rlhf_ray.driver.launch import submit_main

    sys.exit(submit_main(args.config, args.overrides, args.address, extra_pip=args.extra_pip,
                         installer=args.installer, no_install=args.no_install, wait=args.wait))



def cmd_bench(args: argparse.Namespace) -> None:
    from rlhf_ray.bench.main import bench_main

    sys.exit(bench_main(args.out, quick=args.quick, only=args.only))


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("config", nargs="?", default=None, help="YAML run config (default: built-in defaults)")
    else:
        p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.num_actors=2")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "config": (cmd_config, "print the resolved config (secrets redacted)"),
    "sft": (cmd_sft, "supervised finetuning on data.sft; writes an HF checkpoint and metrics"),
    "rm": (cmd_rm, "reward model on the pairs of data.preferences; writes an HF checkpoint and metrics"),
    "train": (cmd_train, "RL training (PPO, GRPO, RLOO, REINFORCE++) with rollout actors and learners"),
    "demo": (cmd_demo, "InstructGPT in miniature on a CPU: pretrain, SFT, reward model, PPO"),
    "eval": (cmd_eval, "score a checkpoint on data.eval under its chat template and zero-shot, few-shot, CoT"),
    "plan": (cmd_plan, "print where every actor goes, the transport, KL placement and batch arithmetic"),
    "submit": (cmd_submit, "submit `train` to a Ray cluster with `ray job submit`"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p, optional=True)
        p.set_defaults(fn=fn)
        if name in ("train", "sft", "rm", "demo", "eval"):
            p.add_argument("-v", "--verbose", action="store_true",
                           help="show vLLM, DeepSpeed and Ray worker logs here too (always in <run folder>/workers.log)")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        if name == "demo":
            p.add_argument("--task", choices=["instruct", "arithmetic"], default="instruct",
                           help="instruct: pretrain, SFT, RM, PPO (default); arithmetic: SFT then GRPO on exact answers")
        if name == "eval":
            p.add_argument("--model", default="", help="model folder (default: model.policy_path)")
            p.add_argument("--out", default=None, help="the results JSON (default: runs/<run_name or eval>/eval.json); "
                           "samples go to eval_samples.jsonl beside it")
            p.add_argument("--templates", default="", help="comma-separated, of chat, zero_shot, few_shot, cot "
                           "(default: all four on a chat model, the last three otherwise)")
        if name in ("plan", "submit"):
            p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local head)")
        if name == "plan":
            p.add_argument("--cluster", default="", help="YAML of node pools (see cluster/pools.yaml): plan and size "
                           "for that cluster without connecting to one")
            p.add_argument("--model-config", default="", help="the model's config.json for --cluster (default: "
                           "model.policy_path/config.json; shapes of common models in configs/models/)")
        if name == "submit":
            p.add_argument("--extra-pip", action="append", default=[], help="extra pip package (repeatable)")
            p.add_argument("--installer", choices=["pip", "uv"], default="pip")
            p.add_argument("--no-install", action="store_true", help="the cluster image already has rlhf_ray")
            p.add_argument("--wait", action="store_true", help="follow the job until it ends")

    p = sub.add_parser("bench", help="throughput ratios side by side (vs TRL, bare vLLM, raw gloo); writes bench/")
    p.add_argument("--out", default="bench", help="results folder (default: bench)")
    p.add_argument("--quick", action="store_true", help="the tiny model, a few steps: checks the pipeline only")
    p.add_argument("--only", action="append", choices=["rollout", "sync", "training"], default=None,
                   help="run only this group of figures (repeatable; default: all)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("scale", help="grow or shrink the rollout pool of a running `train` between steps")
    p.add_argument("run_dir", help="the run folder (train.output_dir/train.run_name)")
    p.add_argument("--rollout", type=int, required=True, help="number of rollout actors wanted")
    p.set_defaults(fn=cmd_scale)

    p = sub.add_parser("make-tiny", help="build a tiny LM, tokenizer and reward model into OUT")
    p.add_argument("out")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2", help="model family of policy and reward model")
    p.add_argument("--tie", action="store_true", help="tie the LM head to the input embedding (tie_word_embeddings)")
    p.set_defaults(fn=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a user error (config, data, model folder, reward import) prints one message, exit 2."""
    from rlhf_ray.checkpoint import CheckpointSpaceError
    from rlhf_ray.data import DataError
    from rlhf_ray.redaction import argv_secrets, environment_secrets, mask

    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, DataError, CheckpointSpaceError) as err:
        print(f"rlhf-ray: {mask(str(err), environment_secrets() | argv_secrets(argv if argv is not None else sys.argv))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
