"""What the machine offers, and how the processes that do dense compute are set up on it.

Two decisions live here, so that the driver, `rlhf-ray plan` and the bench make them the same way:

- `auto_dtype()`: the precision `model.dtype=auto` resolves to — bfloat16 where the hardware
  multiplies bf16 natively (a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX-BF16), float32
  elsewhere (emulated bf16 on an older CPU is slower than fp32).
- `COMPUTE_PROCESS_ENV`: the environment of a learner rank or the reference actor, given to Ray as
  the actor's `runtime_env`, so it holds from the moment the worker process starts (OpenMP reads its
  variables when the library loads, before any of our code runs). vLLM actors keep Ray's defaults
  and their own per-core pinning.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

COMPUTE_PROCESS_ENV: dict[str, str] = {
    # Ray starts every worker at nice 15 (its `worker_niceness`), so that the raylet and the driver stay
    # responsive. A learner at nice 15 loses its time slices to anything else runnable on the node, and its
    # OpenMP threads end up stacked on one core (measured: 1.2-1.5 of 2 cores used, update 3.2 s against
    # 2.4 s at nice 0). Ray reads this variable from the actor's runtime_env when it starts the worker
    # process (its job supervisor runs at 0 the same way); no privilege is needed, nothing is reniced later.
    "RAY_worker_niceness": "0",
    # A dense forward/backward is a chain of short OpenMP regions: threads that sleep between them
    # (OMP_WAIT_POLICY=PASSIVE, which may be inherited from the environment) pay a futex wake-up per
    # region. ACTIVE keeps them spinning between regions; the spin is capped (GOMP_SPINCOUNT, about 0.1 ms
    # of spinning) so that an idle learner — during generation, or when the cores are oversubscribed —
    # gives its cores back instead of burning them (uncapped ACTIVE spins for minutes).
    "OMP_WAIT_POLICY": "ACTIVE",
    "GOMP_SPINCOUNT": "10000",
}


def compute_runtime_env(extra: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Ray `runtime_env` for a dense-compute actor (learner rank, reference): COMPUTE_PROCESS_ENV plus `extra`."""
    return {"env_vars": {**COMPUTE_PROCESS_ENV, **(extra or {})}}


@functools.lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU in `cpuinfo` (empty where the file does not exist)."""
    path = Path(cpuinfo)
    if not path.is_file():
        return frozenset()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def auto_dtype(flags: frozenset[str] | None = None, cuda_bf16: bool | None = None) -> tuple[str, str]:
    """(dtype, reason) that `model.dtype=auto` resolves to on this machine.

    flags: CPU feature flags (default: this machine's); cuda_bf16: whether a CUDA GPU with bf16 is
    present (default: asked from torch). bfloat16 where either multiplies bf16 natively, else float32.
    """
    if cuda_bf16 is None:
        import torch

        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cuda_bf16:
        return "bfloat16", "the GPU supports bf16"
    have = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    if have:
        return "bfloat16", f"this CPU has {'/'.join(f.upper().replace('_', '-') for f in have)}"
    return "float32", "no bf16 matrix unit (neither a bf16 GPU nor AVX512-BF16/AMX-BF16): fp32 is faster"


@functools.lru_cache(maxsize=1)
def resolve_auto_dtype() -> str:
    """`auto_dtype()`'s choice, printed once per process (to stderr) with its reason."""
    dtype, reason = auto_dtype()
    print(f"model.dtype=auto -> {dtype} ({reason})", file=sys.stderr, flush=True)
    return dtype


def process_niceness(pid: int) -> int:
    """Nice value of process `pid`'s main thread, read from /proc/<pid>/stat (field 19)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def process_environment(pid: int) -> dict[str, str]:
    """The environment process `pid` started with, from /proc/<pid>/environ."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = [item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item]
    return dict(pairs)
