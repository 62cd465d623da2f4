"""Functions that run inside each vLLM worker (through `LLM.collective_rpc`): joining the weight-sync
group, receiving and reloading weights, reading back checksums.

`worker` is vLLM's worker object in the process that runs it (in-process engine: the rollout
actor's own; tensor parallelism: each of vLLM's Ray workers).
"""

from __future__ import annotations

import logging
import time

import torch

from actors.tied_head import retie_lm_head
from rlhf_ray.cuda_ipc import SharedBucket, gpu_uuid, open_bucket
from rlhf_ray.weight_sync import (
    SyncGroupSpec,
    TensorMeta,
    abort_group,
    host_timeout,
    join_sync_group,
    post_receive,
    sample_columns,
    wait_all,
)


class _PartialReloadFilter(logging.Filter):
    """Drops vLLM's "weights were not loaded" warning: a bucket reloads only its own layers by design,
    and the checksums after every broadcast prove that every layer arrived."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Following weights were not loaded")


# Module level, so it is installed in every process that runs this module's worker functions.
logging.getLogger("vllm.model_executor.model_loader.reload.inplace").addFilter(_PartialReloadFilter())


def reload_in_worker(worker, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Through vLLM's worker-level entry point, which sets up the engine's config context around the
    model runner's in-place reload (the model runner's own method skips it)."""
    worker.reload_weights(weights_iterator=iter(named_tensors))
    retie_lm_head(worker)


def join_group_in_worker(worker, spec: SyncGroupSpec, first_rank: int) -> None:
    """In each vLLM worker: join the weight-sync group as rank first_rank + the worker's own rank,
    aborting the group it held before (a rebuilt group replaces it)."""
    abort_group(getattr(worker, "weight_sync_group", None))
    worker.weight_sync_group = None
    worker.weight_sync_host_timeout = host_timeout(spec)
    worker.weight_sync_device = f"cuda:{torch.cuda.current_device()}" if spec.backend == "nccl" else "cpu"
    worker.weight_sync_group = join_sync_group(spec, first_rank + worker.rank)


def received_buckets(worker, plan: list[list[TensorMeta]], waited: list[float]):
    """Yield every (name, tensor) of a broadcast, bucket after bucket, as the bytes arrive.

    The next bucket's receives are posted before the current bucket's tensors are handed out, so
    bytes travel while vLLM copies (and on CPU repacks) the previous layers. Adds the seconds spent
    waiting for bytes to `waited[0]`.
    """
    pg, device = worker.weight_sync_group, worker.weight_sync_device
    pending = post_receive(pg, plan[0], device)
    for k in range(len(plan)):
        named, works = pending
        start = time.perf_counter()
        wait_all(works, worker.weight_sync_host_timeout, pg)
        waited[0] += time.perf_counter() - start
        if k + 1 < len(plan):
            pending = post_receive(pg, plan[k + 1], device)
        yield from named


def receive_and_reload(worker, plan: list[list[TensorMeta]]) -> float:
    """In each vLLM worker: receive every bucket and load them all in one reload call (vLLM's layerwise
    set-up and teardown run once per broadcast, not once per bucket); returns the seconds spent in
    the reload itself, waiting for bytes excluded (on GPU after the device has finished its copies).
    """
    waited = [0.0]
    start = time.perf_counter()
    worker.reload_weights(weights_iterator=received_buckets(worker, plan, waited))
    retie_lm_head(worker)
    if worker.weight_sync_device != "cpu":
        torch.cuda.current_stream().synchronize()
    return time.perf_counter() - start - waited[0]


def reload_shared(worker, shared: SharedBucket) -> None:
    """In each vLLM worker: open the learner's CUDA IPC buffers on this GPU and reload from those views."""
    worker.reload_weights(weights_iterator=iter(open_bucket(shared)))
    retie_lm_head(worker)
    torch.cuda.current_stream().synchronize()  # done reading before the learner frees the buffers


def weight_groups(worker) -> dict[str, str]:
    """HF tensor name -> the vLLM module it loads into (e.g. q_proj.bias -> qkv_proj).

    Covers modules whose names map one-to-one or through the model's packed (fused) modules;
    tensors of models that rename more than that are not listed and go to vLLM unchecked.
    """
    model = worker.model_runner.get_model()
    packed = getattr(model, "packed_modules_mapping", {})
    groups = {}
    for module_name, module in model.named_modules():
        params = [name for name, _ in module.named_parameters(recurse=False)]
        parent, _, leaf = module_name.rpartition(".")
        for source in packed.get(leaf, [leaf]):
            prefix = f"{parent}.{source}" if parent else source
            groups.update({f"{prefix}.{p}": module_name for p in params})
    return groups


def _packed_linear_sum(module: torch.nn.Module, columns: list[int], block: int = 1024) -> float:
    """Sum of a CPU linear layer's weight over the input `columns`, read back through its packed kernel.

    On CPU vLLM repacks linear weights for oneDNN and drops `weight`; multiplying identity rows
    (x = e_i) returns W[:, i] exactly, so this checks the weights the engine really computes with.
    """
    k = module.input_size_per_partition
    total = 0.0
    for start in range(0, len(columns), block):
        cols = torch.tensor(columns[start : start + block])
        eye = torch.zeros(len(cols), k, dtype=module.weight.dtype)
        eye[torch.arange(len(cols)), cols] = 1.0
        total += float(module.cpu_linear(eye, None, None).double().sum())
    return total


def parameter_sums(worker, version: int, columns: int) -> tuple[dict[str, float], set[str]]:
    """float64 sum of every parameter this worker holds, keyed by vLLM's names, and the vLLM modules whose
    weight is summed over `sample_columns(in_features, version, columns)` only: the linear layers CPU
    vLLM repacked, read back through their kernel (other tensors are summed whole)."""
    sums, packed = {}, set()
    for module_name, module in worker.model_runner.get_model().named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if param.numel() == 0 and param_name == "weight" and hasattr(module, "cpu_linear"):
                k = module.input_size_per_partition
                sums[name] = _packed_linear_sum(module, sample_columns(k, version, columns))
                packed.add(module_name)
            else:
                sums[name] = float(param.detach().sum(dtype=torch.float64))
    return sums, packed


def worker_gpu_uuid(worker) -> str:
    """The UUID of this worker's GPU."""
    return gpu_uuid()
