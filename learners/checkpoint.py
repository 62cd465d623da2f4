"""Learner checkpoints in safetensors + JSON only (no pickle, so loading one runs no code).

    path/                         a Hugging Face model folder, nothing else: config.json,
                                  model*.safetensors, tokenizer files copied from the folder training
                                  started from (what a user uploads to a hub)
    state = path/../learner_state/<name of path>/   the training state, beside the model folder:
    state/state.json              counters: optimizer steps (the lr schedule is a function of them),
                                  skipped steps, Adam's step, role, layout, caller's extra fields
    state/optimizer.json          index: tensor name -> shard file
    state/optimizer-00001.safetensors ...
                                  full, unpartitioned tensors named "<state>/<HF parameter name>":
                                  exp_avg, exp_avg_sq, and master (fp32 weights, bf16 runs only)
    state/rng-rank<r>.safetensors + .json   torch / python / numpy RNG state of each rank

Optimizer state is stored per parameter with HF names, not as DeepSpeed's flat per-rank
partitions, so a checkpoint is independent of the number of ranks and the ZeRO stage.
Saving and loading are collective: every rank calls them (rank 0 writes the shared files).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import deepspeed
import numpy as np
import torch
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors import safe_open
from safetensors.torch import save_file

from .models import unwrap
from .optim import VetoableAdamW
from .training import StepLoop
from .weights import full_shape, iter_weight_buckets, persistent_buffers

FORMAT = "rlhf_ray.learner/1"
SHARD_BYTES = 2**30
MOMENTS = ("exp_avg", "exp_avg_sq")
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "chat_template*")


def _unfused_masters(engine: Any) -> dict[int, torch.Tensor]:
    """id(bf16 parameter) -> its fp32 master, for bf16 without ZeRO; {} otherwise.

    There DeepSpeed wraps the optimizer in FP16_UnfusedOptimizer (bf16 gradients accumulate in bf16,
    so it is not its BF16_Optimizer): one separate fp32 copy per parameter in `fp32_groups`, which
    the inner AdamW steps. The moments are keyed by those copies, and no `_hp_mapping` links them
    to the parameters, so DeepSpeed's `safe_get_full_*` helpers return None for them.
    """
    opt = engine.optimizer
    if not isinstance(opt, FP16_UnfusedOptimizer):
        return {}
    return {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}


def _optimizer_tensors(
    model: torch.nn.Module, adam: VetoableAdamW, bf16: bool, masters: dict[int, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor) of every optimizer state; collective (DeepSpeed all-reduces fragments)."""
    for name, p in model.named_parameters():
        master = masters.get(id(p))
        for key in MOMENTS:
            full = safe_get_full_optimizer_state(p, key)
            if full is None:  # without ZeRO our AdamW steps the parameters (fp32) or their masters (bf16) directly
                # (adam.state is a defaultdict: only look up tensors it holds, or it grows empty entries)
                full = adam.state[p if master is None else master][key]
            yield f"{key}/{name}", full.reshape(full_shape(p))
        if bf16:
            yield f"master/{name}", (safe_get_full_fp32_param(p) if master is None else master).reshape(full_shape(p))


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, write: bool) -> dict[str, str]:
    """Consume `tensors` (on every rank: it is collective) and, if `write`, store them as fp32 in
    safetensors files of about SHARD_BYTES each; returns the name -> file map."""
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        file = f"optimizer-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / file))
        weight_map.update({name: file for name in shard})
        shard.clear()

    for name, t in tensors:
        if not write:
            continue
        if shard and 4 * (sum(x.numel() for x in shard.values()) + t.numel()) > SHARD_BYTES:
            flush()
        shard[name] = t.detach().float().cpu().clone()
    if shard:
        flush()
    return weight_map


def _adam_step(adam: VetoableAdamW) -> float:
    return float(next(iter(adam.state.values()))["step"])


def state_dir_of(path: str | Path) -> Path:
    """The training-state folder of the model folder `path`: `<parent>/learner_state/<name>`."""
    return Path(path).parent / "learner_state" / Path(path).name


def save(
    path: str, engine: Any, adam: VetoableAdamW, loop: StepLoop, rank: int, role: str, source_dir: str,
    extra: dict[str, Any],
) -> None:
    """Write the checkpoint described in the module docstring (collective)."""
    root, state_dir = Path(path), state_dir_of(path)
    state_dir.mkdir(parents=True, exist_ok=True)
    model, bf16 = unwrap(engine.module), engine.bfloat16_enabled()

    # Every rank takes part in the gathers below; rank 0 keeps and writes what they return.
    weights = {name: t.cpu().clone() for bucket in iter_weight_buckets(model, SHARD_BYTES, rank) for name, t in bucket}
    tensors = _optimizer_tensors(model, adam, bf16, _unfused_masters(engine))
    weight_map = _write_shards(tensors, state_dir, write=rank == 0)
    _save_rng(state_dir, rank)
    if rank != 0:
        return

    weights.update({name: b.cpu().clone() for name, b in persistent_buffers(model)})
    model.save_pretrained(root, state_dict=weights)
    source = Path(source_dir)
    if source.resolve() != root.resolve():
        for pattern in TOKENIZER_FILES:
            for f in source.glob(pattern):
                shutil.copy2(f, root / f.name)
    (state_dir / "optimizer.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    state = {
        "format": FORMAT,
        "world_size": loop.world_size,
        "zero_stage": engine.zero_optimization_stage(),
        "bf16": bf16,
        "role": role,
        "optimizer_steps": loop.optimizer_steps,
        "skipped_steps": loop.skipped_steps,
        "adam_step": _adam_step(adam),
        **extra,
    }
    (state_dir / "state.json").write_text(json.dumps(state, indent=1))


def _save_rng(state_dir: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, str(state_dir / f"rng-rank{rank}.safetensors"))
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (state_dir / f"rng-rank{rank}.json").write_text(json.dumps({
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }))


def _load_rng(state_dir: Path, rank: int) -> None:
    file = state_dir / f"rng-rank{rank}.safetensors"
    if not file.exists():  # resumed on more ranks than were saved: keep the fresh seed
        return
    with safe_open(str(file), "pt") as f:
        torch.set_rng_state(f.get_tensor("torch"))
        if torch.cuda.is_available() and "cuda0" in f.keys():
            torch.cuda.set_rng_state_all([f.get_tensor(f"cuda{i}") for i in range(torch.cuda.device_count())])
    saved = json.loads((state_dir / f"rng-rank{rank}.json").read_text())
    version, mt, gauss = saved["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


class _TensorDir:
    """Lazy reader of the tensors in a folder of safetensors files given a name -> file map."""

    def __init__(self, folder: Path, weight_map: dict[str, str]):
        self.folder, self.weight_map = folder, weight_map
        self._open: dict[str, Any] = {}

    @staticmethod
    def hf_weights(folder: Path) -> "_TensorDir":
        index = folder / "model.safetensors.index.json"
        if index.exists():
            return _TensorDir(folder, json.loads(index.read_text())["weight_map"])
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return _TensorDir(folder, {k: "model.safetensors" for k in f.keys()})

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{name!r} is not in the checkpoint at {self.folder}")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.folder / file), "pt")
        return self._open[file].get_tensor(name)


def load(path: str, engine: Any, adam: VetoableAdamW, loop: StepLoop, rank: int, role: str) -> dict[str, Any]:
    """Restore weights, fp32 masters, optimizer moments, counters and RNG; returns state.json (collective)."""
    root, state_dir = Path(path), state_dir_of(path)
    state = json.loads((state_dir / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{state_dir / 'state.json'} has format {state.get('format')!r}, expected {FORMAT!r}")
    if state["role"] != role:
        raise ValueError(f"checkpoint at {path} holds a {state['role']} learner, this learner is a {role}")
    model, bf16 = unwrap(engine.module), engine.bfloat16_enabled()
    if state["bf16"] != bf16:
        raise ValueError(f"checkpoint at {path} was saved with bf16={state['bf16']}, this learner runs bf16={bf16}")
    weights = _TensorDir.hf_weights(root)
    optim = _TensorDir(state_dir, json.loads((state_dir / "optimizer.json").read_text())["weight_map"])
    device, masters = engine.device, _unfused_masters(engine)
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = weights.get(name).to(device)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.reshape(p.shape))
            master = optim.get(f"master/{name}") if bf16 else value
            unfused = masters.get(id(p))
            if unfused is None:
                safe_set_full_fp32_param(p, master.float().to(device))
            else:
                unfused.copy_(master.reshape(unfused.shape))
            for key in MOMENTS:
                moment = optim.get(f"{key}/{name}").to(device)
                if unfused is not None:
                    adam.state[unfused][key].copy_(moment.reshape(unfused.shape))
                elif hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                    safe_set_full_optimizer_state(p, moment, key)
                else:
                    adam.state[p][key].copy_(moment)
    for s in adam.state.values():
        s["step"].fill_(state["adam_step"])
    loop.optimizer_steps, loop.skipped_steps = state["optimizer_steps"], state["skipped_steps"]
    _load_rng(state_dir, rank)
    return state
