"""Checkpoints that cannot be half-written, and training state without pickle.

A run folder holds `checkpoints/step_000012/`. Each checkpoint is filled in a
hidden temporary folder, then a `manifest.json` listing every file's size and
sha256 is written, everything is fsynced, and only then is the folder renamed
to `step_000012`. So a `step_*` folder is complete unless something outside
this module damaged it, which `latest_complete` detects (and skips, with a
warning naming the file). Old checkpoints are rotated out only after the new
one is in place.

    writer = CheckpointWriter(run_dir / "checkpoints", keep_last=2)
    with writer.begin(step) as tmp:          # learner ranks and the driver fill tmp
        policy.save_pretrained(tmp / "policy")
        save_state(tmp / "driver", tensors, meta)
    resume_from = latest_complete(run_dir / "checkpoints")

Training state is safetensors (tensors) plus JSON (everything else): nothing in
this module unpickles, so a crafted checkpoint cannot run code when loaded.

One writer per checkpoint root. Ranks on other nodes can write into the
temporary folder only when the root is on a shared filesystem.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlhf_ray.config import CheckpointConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^\.(tmp|trash)_.+_(\d+)$")  # .tmp_step_000012_<pid>, .trash_step_000010_<pid>

Verify = Literal["full", "size"]


class CheckpointError(RuntimeError):
    """A checkpoint or training state that cannot be written or read; the message names the file."""


class CheckpointSpaceError(OSError):
    """The disk filled up (or a quota was hit) while a checkpoint was written; the earlier ones are intact."""


def _is_out_of_space(err: BaseException) -> bool:
    # An OSError raised inside a Ray actor reaches the driver re-wrapped: match its text as well.
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: str | os.PathLike) -> int:
    """The step number of a `step_000012` folder."""
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step_000012)")
    return int(match.group(1))


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Every `step_*` folder under root, oldest step first, complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


# ---------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path, sync: bool = False) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file; with sync, also flush it to disk in the same pass."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, sha.hexdigest()


def write_manifest(folder: Path, step: int) -> dict[str, Any]:
    """Hash and fsync every file under folder (and every folder), then write and fsync `manifest.json`."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = here / name
            rel = path.relative_to(folder).as_posix()
            # A link would make the checkpoint depend on (or leak) files outside it.
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise CheckpointError(f"{path}: checkpoints may hold only regular files and folders")
            if rel == MANIFEST:
                raise CheckpointError(f"{path}: {MANIFEST} is written by the checkpoint writer itself")
            if path.is_file():
                size, sha256 = _digest(path, sync=True)
                files.append({"path": rel, "size": size, "sha256": sha256})
        _fsync(here)
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(folder)
    return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointWriter:
    """Writes `root/step_XXXXXX` checkpoints atomically and keeps the newest `keep_last` complete ones."""

    def __init__(self, root: str | os.PathLike, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: at least one complete checkpoint must be kept")
        self.root = Path(root)
        self.keep_last = keep_last

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike, cfg: CheckpointConfig) -> "CheckpointWriter":
        """The writer of a run folder: `run_dir/checkpoints`, keeping `cfg.keep_last`."""
        return cls(Path(run_dir) / "checkpoints", cfg.keep_last)

    @contextmanager
    def begin(self, step: int) -> Iterator[Path]:
        """Yield an empty temporary folder to fill; on a clean exit it becomes `root/step_XXXXXX`.

        If the block (or sealing the checkpoint) raises, the temporary folder is removed,
        the exception propagates and the existing checkpoints are untouched.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_leftovers()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{final.name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            write_manifest(tmp, step)
            if final.exists():
                # Re-saving a step (e.g. over a damaged one); a directory cannot be renamed onto a non-empty one.
                self._discard(final)
            os.rename(tmp, final)
            _fsync(self.root)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, Exception) and _is_out_of_space(err):
                newest = latest_complete(self.root)
                raise CheckpointSpaceError(
                    errno.ENOSPC,
                    f"no space left on the device while saving checkpoint step {step} under {self.root} (the "
                    f"partial folder is removed; the newest complete checkpoint, {newest or 'none'}, is intact); "
                    "fix: free space there or move train.output_dir, lower checkpoint.keep_last, then resume "
                    "with --resume",
                ) from None
            raise
        log.info("checkpoint %s complete", final)
        self._rotate(keep=final)

    def _rotate(self, keep: Path) -> None:
        # Rotation only trusts the presence of a manifest (cheap); hashing every old checkpoint here would
        # cost minutes on real models. The checkpoint just written is never a victim.
        complete = [p for p in list_checkpoints(self.root) if (p / MANIFEST).is_file()]
        survivors = set(complete[-self.keep_last :]) | {keep}
        for path in complete:
            if path not in survivors:
                self._discard(path)
        self.clean_leftovers()

    def _discard(self, path: Path) -> None:
        # Rename first: a crash during rmtree then leaves a hidden leftover, never a half-deleted step_*.
        trash = self.root / f".trash_{path.name}_{os.getpid()}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        _fsync(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("checkpoint %s removed (keep_last=%d)", path, self.keep_last)

    def clean_leftovers(self) -> None:
        """Remove temporary and half-deleted folders left by crashed writers (this process's or dead ones')."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            match = _LEFTOVER.match(path.name)
            if match is None:
                continue
            pid = int(match.group(2))
            if pid == os.getpid() or not _pid_alive(pid):
                log.warning("removing %s left by an interrupted checkpoint save", path)
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- finding and verifying


def check_checkpoint(path: str | os.PathLike, verify: Verify = "full") -> str | None:
    """None if the checkpoint at path is complete and intact, else what is wrong (naming the file).

    verify="full" compares every file's size and sha256 with the manifest; "size" only sizes.
    """
    if verify not in ("full", "size"):
        raise ValueError(f"verify={verify!r}: use 'full' (sizes and sha256) or 'size'")
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{MANIFEST} missing (an incomplete save)"
    try:
        manifest = json.loads(manifest_path.read_text())
        version, entries = manifest["format_version"], manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} unreadable: {err!r}"
    if version != FORMAT_VERSION:
        return f"{MANIFEST} has format_version {version!r}; this code reads {FORMAT_VERSION}"
    for entry in entries:
        rel = str(entry.get("path", ""))
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{MANIFEST} names a file outside the checkpoint: {rel!r}"
        file = path / rel
        if not file.is_file():
            return f"file {rel} missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"file {rel} has {size} bytes, the manifest says {entry['size']}"
        if verify == "full" and _digest(file)[1] != entry["sha256"]:
            return f"file {rel} does not match its sha256 in the manifest"
    return None


def latest_complete(root: str | os.PathLike, verify: Verify = "full") -> Path | None:
    """The newest checkpoint under root that verifies; damaged or partial ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        problem = check_checkpoint(path, verify)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


# ---------------------------------------------------------------- training state


def save_state(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write `state.safetensors` (tensors) and `state.json` (meta, JSON-serialisable) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
    (folder / STATE_META).write_text(json.dumps(meta, indent=1))


def load_state(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what `save_state` wrote. Only these two formats are ever parsed; anything else is refused."""
    folder = Path(folder)
    tensors_path, meta_path = folder / STATE_TENSORS, folder / STATE_META
    for path in (tensors_path, meta_path):
        if not path.is_file():
            raise CheckpointError(f"{path} missing: training state is {STATE_TENSORS} + {STATE_META}")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{tensors_path} is not a valid safetensors file: {err}") from None
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{meta_path} is not valid JSON: {err}") from None
    return tensors, meta


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG state of this process: torch (and CUDA) as uint8 tensors, Python and numpy as JSON.

    Returns (tensors, meta) to merge into `save_state`'s arguments; `restore_rng` takes them back.
    """
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, py_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached},
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Set every RNG back to what `capture_rng` returned (tensors may hold other keys too)."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = meta["numpy"]
    keys = np.array(n["keys"], dtype=np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
