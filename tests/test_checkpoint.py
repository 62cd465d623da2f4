"""Checkpoints: atomic saves under SIGKILL (F5), verification, rotation, pickle-free training state."""

import errno
import hashlib
import json
import multiprocessing as mp
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import rlhf_ray.checkpoint as checkpoint
from rlhf_ray.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointWriter,
    capture_rng,
    check_checkpoint,
    latest_complete,
    list_checkpoints,
    load_state,
    restore_rng,
    save_state,
    step_of,
)

SHARD_BYTES = 1 << 20


def _fill(tmp: Path, step: int) -> None:
    """What a learner rank and the driver put in a checkpoint: a model folder, JSON and training state."""
    (tmp / "policy").mkdir()
    for i in range(3):
        (tmp / "policy" / f"shard_{i}.bin").write_bytes(bytes([step % 256, i]) * (SHARD_BYTES // 2))
    (tmp / "policy" / "config.json").write_text(json.dumps({"step": step}))
    save_state(tmp / "driver", {"step": torch.tensor([step]), "w": torch.full((64, 64), float(step))}, {"step": step})


def _assert_loads(path: Path) -> None:
    step = step_of(path)
    tensors, meta = load_state(path / "driver")
    assert meta == {"step": step} and int(tensors["step"]) == step
    assert torch.equal(tensors["w"], torch.full((64, 64), float(step)))
    assert (path / "policy" / "shard_2.bin").read_bytes()[:2] == bytes([step % 256, 2])


def _save_forever(root: str, step: int, keep_last: int, conn) -> None:
    """Child process: save step+1, step+2, ... until killed; report each completed save."""
    writer = CheckpointWriter(root, keep_last)
    conn.send("ready")
    while True:
        step += 1
        with writer.begin(step) as tmp:
            _fill(tmp, step)
        conn.send(step)


def test_sigkill_at_random_points_never_loses_the_last_complete_checkpoint(tmp_path):
    """F5: 20 SIGKILLs at random moments of back-to-back saves with keep_last=1."""
    root = tmp_path / "checkpoints"
    with CheckpointWriter(root, keep_last=1).begin(0) as tmp:
        _fill(tmp, 0)
    # A forkserver that has already imported torch starts each child in milliseconds, not seconds.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["rlhf_ray.checkpoint", "pytest"])
    rng = random.Random(0)
    newest, killed_mid_save = 0, 0
    for trial in range(20):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_save_forever, args=(str(root), newest, 1, send))
        proc.start()
        assert recv.poll(60) and recv.recv() == "ready", f"trial {trial}: child did not start"
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.join()
        reported = [newest]
        while recv.poll():
            reported.append(recv.recv())
        recv.close()
        send.close()
        killed_mid_save += any(p.name.startswith(".tmp_") for p in root.iterdir())

        # Every step_* folder is complete: a partial save never carries a checkpoint's name.
        for path in list_checkpoints(root):
            assert check_checkpoint(path) is None, f"trial {trial}: {path}: {check_checkpoint(path)}"
        latest = latest_complete(root)
        assert latest is not None, f"trial {trial}: retention deleted the last complete checkpoint"
        assert step_of(latest) >= max(reported), f"trial {trial}: resume would go back to {latest}"
        _assert_loads(latest)
        newest = step_of(latest)
    assert newest > 20 and killed_mid_save > 0

    # The next save by a live writer cleans the crashed writers' leftovers.
    with CheckpointWriter(root, keep_last=1).begin(newest + 1) as tmp:
        _fill(tmp, newest + 1)
    assert sorted(p.name for p in root.iterdir()) == [f"step_{newest + 1:06d}"]


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    with CheckpointWriter(tmp_path, keep_last=2).begin(12) as tmp:
        _fill(tmp, 12)
    path = tmp_path / "step_000012"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 12 and manifest["format_version"] == checkpoint.FORMAT_VERSION and manifest["time"]
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert [f["path"] for f in manifest["files"]] == on_disk
    for f in manifest["files"]:
        data = (path / f["path"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert latest_complete(tmp_path) == path and [p.name for p in tmp_path.iterdir()] == ["step_000012"]


def _fail_by_raising(tmp: Path) -> None:
    raise RuntimeError("learner rank 1 died")


def _fail_with_disk_full(tmp: Path) -> None:
    # /dev/full answers every write with ENOSPC: a real disk-full error from the kernel.
    (tmp / "policy").mkdir()
    (tmp / "policy" / "model.safetensors").symlink_to("/dev/full")
    with open(tmp / "policy" / "model.safetensors", "wb") as f:
        f.write(bytes(SHARD_BYTES))


def _fail_while_sealing(tmp: Path) -> None:
    # The block succeeds; writing the manifest refuses the link (the failure comes after the block).
    _fill(tmp, 2)
    (tmp / "policy" / "outside.bin").symlink_to("/etc/hostname")


@pytest.mark.parametrize(
    "fail, error",
    [(_fail_by_raising, RuntimeError), (_fail_with_disk_full, OSError), (_fail_while_sealing, CheckpointError)],
)
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, fail, error):
    writer = CheckpointWriter(tmp_path, keep_last=1)
    with writer.begin(1) as tmp:
        _fill(tmp, 1)
    before = {p: p.read_bytes() for p in (tmp_path / "step_000001").rglob("*") if p.is_file()}
    with pytest.raises(error) as info:
        with writer.begin(2) as tmp:
            fail(tmp)
    if fail is _fail_with_disk_full:
        assert info.value.errno == errno.ENOSPC
        assert "no space left on the device while saving checkpoint step 2" in str(info.value)
        assert f"the newest complete checkpoint, {tmp_path / 'step_000001'}, is intact" in str(info.value)
        assert "fix: free space there or move train.output_dir" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]
    assert {p: p.read_bytes() for p in (tmp_path / "step_000001").rglob("*") if p.is_file()} == before
    assert latest_complete(tmp_path) == tmp_path / "step_000001"


def test_rotation_keeps_the_newest_and_removes_leftovers(tmp_path):
    writer = CheckpointWriter(tmp_path, keep_last=2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".tmp_step_000009_{dead.pid}").mkdir()  # a crashed writer's half-written save
    (tmp_path / f".trash_step_000001_{dead.pid}").mkdir()  # a crashed writer's half-done deletion
    (tmp_path / ".tmp_step_000009_1").mkdir()  # pid 1 is alive: another writer's save, left alone
    for step in range(1, 6):
        with writer.begin(step) as tmp:
            _fill(tmp, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp_step_000009_1", "step_000004", "step_000005"]
    assert step_of(latest_complete(tmp_path)) == 5


def test_the_checkpoint_just_written_survives_rotation(tmp_path):
    writer = CheckpointWriter(tmp_path, keep_last=1)
    for step in (10, 5):  # e.g. resumed from step 4 while a step_000010 of an earlier attempt exists
        with writer.begin(step) as tmp:
            _fill(tmp, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000005", "step_000010"]
    with writer.begin(5) as tmp:  # saving a step again replaces it
        _fill(tmp, 5)
        (tmp / "extra.json").write_text("{}")
    assert (tmp_path / "step_000005" / "extra.json").exists() and check_checkpoint(tmp_path / "step_000005") is None


def test_damaged_checkpoints_are_skipped_with_a_warning_naming_the_file(tmp_path, caplog):
    writer = CheckpointWriter(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        with writer.begin(step) as tmp:
            _fill(tmp, step)
    shard = tmp_path / "step_000003" / "policy" / "shard_1.bin"
    data = bytearray(shard.read_bytes())
    data[12345] ^= 0x01  # one flipped bit, same size
    shard.write_bytes(bytes(data))

    assert latest_complete(tmp_path, verify="size") == tmp_path / "step_000003"  # the cheap check misses it
    assert latest_complete(tmp_path) == tmp_path / "step_000002"
    assert "step_000003" in caplog.text and "policy/shard_1.bin" in caplog.text and "sha256" in caplog.text

    (tmp_path / "step_000002" / "driver" / "state.json").write_text("{}")  # truncated
    (tmp_path / "step_000001" / MANIFEST).unlink()
    caplog.clear()
    assert latest_complete(tmp_path) is None
    assert "step_000002" in caplog.text and "driver/state.json has 2 bytes" in caplog.text
    assert "step_000001" in caplog.text and "manifest.json missing" in caplog.text


def test_manifest_naming_files_outside_the_checkpoint_is_rejected(tmp_path):
    with CheckpointWriter(tmp_path, keep_last=1).begin(1) as tmp:
        _fill(tmp, 1)
    manifest_path = tmp_path / "step_000001" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append({"path": "../../etc/hostname", "size": 1, "sha256": "0"})
    manifest_path.write_text(json.dumps(manifest))
    assert "outside the checkpoint" in check_checkpoint(tmp_path / "step_000001")


def test_state_round_trip(tmp_path):
    tensors = {
        "policy/w": torch.randn(3, 5),
        "policy/b": torch.randn(5).to(torch.bfloat16),
        "optim/step": torch.tensor([7], dtype=torch.int64),
        "mask": torch.tensor([1, 0, 1], dtype=torch.uint8),
        "view": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
    }
    meta = {"step": 7, "kl": {"value": 0.05}, "prompt_order": [3, 1, 2], "note": "ü"}
    save_state(tmp_path, tensors, meta)
    loaded, loaded_meta = load_state(tmp_path)
    assert loaded_meta == meta and loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_rng_restore_reproduces_the_draws_after_capture(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    tensors, meta = capture_rng()
    save_state(tmp_path, {"policy/w": torch.ones(2), **tensors}, {"rng": meta})

    def draw() -> tuple:
        torch_draws = torch.rand(4).tolist(), torch.randn(2).tolist()
        return torch_draws, random.random(), random.gauss(0, 1), np.random.rand(3).tolist()

    expected = draw()
    draw()
    loaded, loaded_meta = load_state(tmp_path)
    assert loaded["rng/torch"].dtype == torch.uint8
    restore_rng(loaded, loaded_meta["rng"])
    assert draw() == expected


class _Exploit:
    """Unpickling this creates a marker file: the proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    (crafted / "state.safetensors").write_bytes(payload)  # a pickle under a checkpoint file's name
    (crafted / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="state.safetensors is not a valid safetensors file"):
        load_state(crafted)

    only_pickles = tmp_path / "only_pickles"
    only_pickles.mkdir()
    for name in ("state.pt", "training_state.bin", "optimizer.pkl"):
        (only_pickles / name).write_bytes(payload)
    with pytest.raises(CheckpointError, match="state.safetensors missing"):
        load_state(only_pickles)

    save_state(tmp_path / "mixed", {"w": torch.ones(2)}, {"step": 1})
    (tmp_path / "mixed" / "optimizer.pt").write_bytes(payload)
    assert load_state(tmp_path / "mixed")[1] == {"step": 1}
    assert not marker.exists()

    source = Path(checkpoint.__file__).read_text()
    assert "import pickle" not in source and "pickle.load" not in source and "torch.load" not in source
