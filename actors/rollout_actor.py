"""The rollout actor: one vLLM engine that generates samples with their log-probs and takes new weights.

Log-probs. The engine runs with `logprobs_mode="processed_logprobs"`: each returned log-prob is
log_softmax(logits / temperature) after top-k/top-p, i.e. the log-probability of the token under
the distribution it was actually drawn from. With top-k and top-p disabled (the default) this
equals the learner's `log_softmax(logits / temperature)` at the same token; with them enabled it
is the truncated, renormalised behaviour distribution that importance weights need. vLLM's
default ("raw_logprobs") would instead report temperature-1 log-probs whatever the temperature.
At temperature 0 (greedy) vLLM reports the temperature-1 log-probs.

Seeds. Every prompt gets its own sampling seed derived from (base seed, step, prompt_id), so a
prompt's samples do not depend on which actor serves it or what else is in the batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import torch

from rlhf_ray.config import ModelConfig, RolloutConfig, SamplingConfig
from rlhf_ray.console import quiet_partial_reload
from rlhf_ray.cuda_ipc import SharedBucket, open_bucket
from rlhf_ray.protocol import Sample
from rlhf_ray.weight_sync import (
    SyncGroupSpec,
    TensorMeta,
    combine_ranks,
    join_sync_group,
    post_receive,
    sample_columns,
    sum_by_layer,
    wait_all,
)

log = logging.getLogger(__name__)


class _PartialReloadFilter(logging.Filter):
    """Drops vLLM's "weights were not loaded" warning: a bucket reloads only its own layers by design,
    and the checksums after every broadcast prove that every layer arrived."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Following weights were not loaded")


# Module level, so it is installed in every process that runs this module's worker functions.
logging.getLogger("vllm.model_executor.model_loader.reload.inplace").addFilter(_PartialReloadFilter())

Request = tuple[int, list[int]]  # (prompt_id, prompt token ids)


def check_requests(
    requests: list[Request], max_new_tokens: int, max_model_len: int, truncate: bool
) -> list[Request]:
    """Validate a batch before anything is generated; returns it, left-truncated where allowed.

    Raises ValueError naming the offending prompt_id for an empty prompt, or for one whose
    length + max_new_tokens exceeds max_model_len (unless `truncate`, which keeps its last tokens).
    """
    if not requests:
        raise ValueError("no prompts to generate from: the request list is empty")
    room = max_model_len - max_new_tokens
    if room < 1:
        raise ValueError(
            f"sampling.max_new_tokens={max_new_tokens} leaves no room for a prompt in "
            f"model.max_model_len={max_model_len}; lower max_new_tokens or raise max_model_len"
        )
    checked, truncated = [], []
    for prompt_id, ids in requests:
        if not ids:
            raise ValueError(f"prompt {prompt_id} is empty (0 tokens)")
        if len(ids) > room:
            if not truncate:
                raise ValueError(
                    f"prompt {prompt_id} has {len(ids)} tokens; with sampling.max_new_tokens={max_new_tokens} "
                    f"that exceeds model.max_model_len={max_model_len} (at most {room} prompt tokens). "
                    "Shorten it, or set rollout.truncate_prompts=true to keep its last tokens"
                )
            truncated.append(f"{prompt_id} ({len(ids)} -> {room})")
            ids = ids[-room:]
        checked.append((prompt_id, list(ids)))
    if truncated:
        log.warning("left-truncated %d prompt(s) to fit max_model_len: %s", len(truncated), ", ".join(truncated))
    return checked


def request_seed(base_seed: int, prompt_id: int, step: int) -> int:
    """The sampling seed of one prompt. vLLM seeds its i-th sample with seed + i, so stay below 2**31 - 2**16."""
    digest = hashlib.blake2b(f"{base_seed}/{step}/{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 2**16)


def _reload_weights(worker, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    quiet_partial_reload()
    worker.model_runner.reload_weights(weights_iterator=iter(named_tensors))


def _join_sync_group(worker, spec: SyncGroupSpec, first_rank: int) -> None:
    """In each vLLM worker: join the weight-sync group as rank first_rank + the worker's own rank."""
    worker.weight_sync_group = join_sync_group(spec, first_rank + worker.rank)
    worker.weight_sync_device = f"cuda:{torch.cuda.current_device()}" if spec.backend == "nccl" else "cpu"


def _receive_and_reload(worker, plan: list[list[TensorMeta]]) -> float:
    """In each vLLM worker: receive every bucket and reload it; returns the seconds spent reloading.

    The next bucket's receives are posted before the current bucket loads, so bytes travel
    while vLLM copies (and on CPU repacks) the previous layers.
    """
    quiet_partial_reload()
    pg, device = worker.weight_sync_group, worker.weight_sync_device
    reload_s = 0.0
    pending = post_receive(pg, plan[0], device)
    for k in range(len(plan)):
        named, works = pending
        wait_all(works)
        if k + 1 < len(plan):
            pending = post_receive(pg, plan[k + 1], device)
        start = time.perf_counter()
        worker.model_runner.reload_weights(weights_iterator=iter(named))
        reload_s += time.perf_counter() - start
    return reload_s


def _reload_shared(worker, shared: SharedBucket) -> None:
    """In each vLLM worker: open the learner's CUDA IPC buffers on this GPU and reload from those views."""
    quiet_partial_reload()
    worker.model_runner.reload_weights(weights_iterator=iter(open_bucket(shared)))
    torch.cuda.current_stream().synchronize()  # done reading before the learner frees the buffers


def _weight_groups(worker) -> dict[str, str]:
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


def _parameter_sums(worker, version: int, columns: int) -> tuple[dict[str, float], set[str]]:
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


class RolloutActor:
    """Owns one `vllm.LLM` (tensor_parallel_size workers) and serves generation for the pool.

    A plain class: `RolloutPool` wraps it with `ray.remote` and its options at creation. Calls
    run one at a time, so a weight update never overlaps a generation.
    """

    def __init__(self, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, name: str = "rollout-0"):
        # In-process engine: collective_rpc then calls our functions on the worker in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM, SamplingParams

        self.name = name
        self.model_cfg, self.cfg = model_cfg, rollout_cfg
        on_cpu = rollout_cfg.num_gpus_per_actor == 0
        extra = {}
        if on_cpu:
            # Not VLLM_CPU_KVCACHE_SPACE: vLLM parses it as whole GiB and it overrides this argument.
            extra["kv_cache_memory_bytes"] = int(rollout_cfg.kv_cache_space_gib * 2**30)
        elif rollout_cfg.tensor_parallel_size > 1:
            extra["distributed_executor_backend"] = "ray"  # workers go into the pool's placement group
        self.llm = LLM(
            model=model_cfg.policy_path,
            dtype=model_cfg.dtype,
            max_model_len=model_cfg.max_model_len,
            trust_remote_code=model_cfg.trust_remote_code,
            load_format="safetensors",  # never a pickle checkpoint
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            enforce_eager=on_cpu,
            seed=rollout_cfg.seed,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # sampling comes from SamplingConfig only, never the checkpoint
            # A prompt split across scheduler steps rewinds its seeded generator, which the CPU build
            # cannot do ("CPU Generator does not use offset"): schedule every prompt whole.
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(8192, model_cfg.max_model_len),
            **extra,
        )
        # One short sampled generation now, so one-off kernel set-up is not billed to the first rollout.
        warmup = SamplingParams(n=2, max_tokens=2, logprobs=0, seed=0, detokenize=False)
        self.llm.generate([{"prompt_token_ids": [0]}], warmup, use_tqdm=False)
        self._weight_groups = self.llm.collective_rpc(_weight_groups)[0]
        self._version = 0
        self._tokens_generated = 0
        self._last_call_seconds = 0.0

    def generate(self, requests: list[Request], sampling: SamplingConfig, step: int = 0) -> list[Sample]:
        """n = sampling.n samples for each (prompt_id, prompt token ids) request.

        Returns len(requests) * n samples, each prompt's samples contiguous with sample_idx 0..n-1;
        `logprobs[t]` is the log-prob (nats) of response token t (see the module docstring).
        `step` enters the seed when sampling.seed is None, so successive batches differ.
        """
        from vllm import SamplingParams

        requests = check_requests(
            requests, sampling.max_new_tokens, self.model_cfg.max_model_len, self.cfg.truncate_prompts
        )
        start = time.perf_counter()
        base_seed, seed_step = (sampling.seed, 0) if sampling.seed is not None else (self.cfg.seed, step)
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                stop=sampling.stop or None,
                ignore_eos=sampling.ignore_eos,
                seed=request_seed(base_seed, prompt_id, seed_step),
                logprobs=0,  # only the sampled token's log-prob
                detokenize=bool(sampling.stop),  # stop strings need text; otherwise ids suffice
            )
            for prompt_id, _ in requests
        ]
        prompts = [{"prompt_token_ids": ids} for _, ids in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)

        samples = []
        for (prompt_id, ids), output in zip(requests, outputs, strict=True):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                samples.append(
                    Sample(
                        prompt_id=prompt_id,
                        sample_idx=completion.index,
                        prompt_ids=ids,
                        response_ids=tokens,
                        logprobs=[step_lp[t].logprob for step_lp, t in zip(completion.logprobs, tokens, strict=True)],
                        finish_reason=completion.finish_reason,
                        policy_version=self._version,
                        actor_name=self.name,
                    )
                )
        self._tokens_generated += sum(len(s.response_ids) for s in samples)
        self._last_call_seconds = time.perf_counter() - start
        return samples

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Load HF-named full tensors into the engine in place, then serve as policy `version`.

        A subset of the parameters may be given, but every vLLM module it touches must be complete
        (q/k/v_proj weights and biases together for the fused qkv_proj): vLLM re-processes a module
        only once all of it has arrived in the same call, and a partial one comes out corrupted.
        The version may not go backwards.
        """
        if version < self._version:
            raise ValueError(f"{self.name}: weights of version {version} are older than the served {self._version}")
        self._reload(named_tensors)
        self._version = version

    def _check_complete(self, names: set[str]) -> None:
        """Raise unless `names` cover every tensor of each vLLM module they touch (fused modules load whole)."""
        touched = {self._weight_groups[n] for n in names if n in self._weight_groups}
        missing = sorted(n for n, module in self._weight_groups.items() if module in touched and n not in names)
        if missing:
            raise ValueError(
                f"{self.name}: update_weights would leave modules half-loaded; also send {', '.join(missing)} "
                "in the same call"
            )

    def _reload(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self._check_complete({name for name, _ in named_tensors})
        self.llm.collective_rpc(_reload_weights, args=(named_tensors,))
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    # ------------------------------------------------------------------ weight broadcast

    def join_weight_sync(self, spec: SyncGroupSpec, rank: int) -> None:
        """Every vLLM worker of this actor joins the weight-sync group (rank 0 is the sending learner).

        The workers take ranks rank .. rank + tensor_parallel_size - 1; a new group replaces any earlier one.
        """
        self.llm.collective_rpc(_join_sync_group, args=(spec, rank))
        self._sync_generation = spec.generation

    def receive_weights(self, plan: list[list[TensorMeta]], version: int) -> float:
        """Every vLLM worker receives each bucket of a broadcast and reloads it in place; then serve `version`.

        Returns the slowest worker's seconds inside vLLM's reload (the rest of the call is waiting
        for bytes). Buckets hold whole layers (`plan_buckets`), so each reload sees complete fused
        modules. Until the last bucket has arrived the actor takes no generate call (Ray runs calls
        one at a time).
        """
        if getattr(self, "_sync_generation", None) is None:
            raise RuntimeError(f"{self.name}: receive_weights before join_weight_sync")
        if version < self._version:
            raise ValueError(f"{self.name}: weights of version {version} are older than the served {self._version}")
        for bucket in plan:
            self._check_complete({m.name for m in bucket})
        reload_s = max(self.llm.collective_rpc(_receive_and_reload, args=(plan,)))
        self.llm.reset_prefix_cache()
        self._version = version
        return reload_s

    def receive_shared(self, shared: SharedBucket, version: int | None) -> float:
        """Load one bucket from the colocated learner's CUDA IPC handles; returns the reload seconds.

        The broadcaster sends the buckets in order and passes `version` with the last one, after
        which the actor serves that version (Ray runs one call at a time, so no generate call
        sees a half-loaded model).
        """
        start = time.perf_counter()
        self._check_complete({m.name for m in shared.metas})
        self.llm.collective_rpc(_reload_shared, args=(shared,))
        self.llm.reset_prefix_cache()
        if version is not None:
            self._version = version
        return time.perf_counter() - start

    def weight_report(self, columns: int = 0) -> tuple[int, dict[str, float], list[str]]:
        """For broadcast verification: (served policy version, per-layer checksums of the loaded weights,
        HF names of the weights summed over `columns` sampled input columns only; see
        `weight_sync.expected_layer_sums`)."""
        sums, column_sampled = self._loaded_sums(columns)
        return self._version, sum_by_layer(sums.items()), column_sampled

    def weight_checksums(self) -> dict[str, float]:
        """float64 sum of every parameter the engine holds, keyed by vLLM's names (fused qkv_proj, gate_up_proj).

        With tensor_parallel_size > 1 the ranks' shards are added up (`weight_sync.combine_ranks`).
        """
        return self._loaded_sums(0)[0]

    def _loaded_sums(self, columns: int) -> tuple[dict[str, float], list[str]]:
        if self.cfg.tensor_parallel_size > 1:
            columns = 0  # a row-parallel shard holds a slice of the input columns: read every one
        per_rank = self.llm.collective_rpc(_parameter_sums, args=(self._version, columns))
        packed = per_rank[0][1] if columns else set()
        column_sampled = [hf for hf, module in self._weight_groups.items() if module in packed and hf.endswith(".weight")]
        return combine_ranks([sums for sums, _ in per_rank]), column_sampled

    def version(self) -> int:
        return self._version

    def tokens_generated(self) -> int:
        """Response tokens generated since the actor started."""
        return self._tokens_generated

    def last_call_seconds(self) -> float:
        """Wall-clock seconds of the last `generate` call inside this actor."""
        return self._last_call_seconds

    def ping(self) -> str:
        return self.name

    def where(self) -> dict[str, str]:
        """The Ray node this actor runs on: {"node_id", "node_ip"}."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
