"""One rank of a learner group: a Ray actor holding a DeepSpeed engine for one role.

`LearnerGroup` creates one per rank (the class is wrapped with `ray.remote` at creation), calls
`setup` on all of them at once, then fans every call out to all ranks with each rank's share of
the rows. Every public method is collective: all ranks must take part in it.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import deepspeed
import numpy as np
import ray
import torch
import torch.distributed as dist

from rlhf_ray.config import AlgorithmConfig, LearnerConfig, ModelConfig
from rlhf_ray.cuda_ipc import SharedBucket, gpu_uuid
from rlhf_ray.modeling import load_frozen_policy, response_logprobs
from rlhf_ray.protocol import PER_TOKEN_FIELDS, Experience, TensorBatch
from rlhf_ray.net import bind_listener, interface_of, listen_address, route_source_address
from rlhf_ray.ray_utils import local_gpu_index
from rlhf_ray.weight_sync import (
    ParamSums, SyncGroupSpec, TensorMeta, abort_group, host_timeout, join_sync_group, store_on,
)

from . import checkpoint
from .batching import micro_batches
from .models import Role, load_model, sequence_scores, token_values, unwrap
from .objectives import (
    loss_is_sum,
    next_token_logprobs,
    ppo_objective,
    rm_objective,
    sft_objective,
    sft_targets,
    tokens_or_rows,
    value_objective,
)
from .optim import build_optimizer, deepspeed_config
from .training import Objective, StepLoop
from .weights import iter_weight_buckets, param_checksums, send_weights, share_bucket, weight_metas

CHECKSUM_BUCKET_BYTES = 2**28


@dataclass(frozen=True)
class LearnerSpec:
    """What one rank needs to build its engine: the one argument a LearnerWorker is created with."""

    rank: int
    world_size: int
    role: Role  # "policy", "critic" or "reward"
    model_path: str  # HF folder to start from
    learner: LearnerConfig
    model: ModelConfig
    algorithm: AlgorithmConfig
    total_steps: int | None  # optimizer steps the lr decays over (cosine after warm-up); None keeps the peak lr
    hold_reference: bool = False  # policy only: also hold the frozen initial policy (reference.placement=learner)


class LearnerWorker:
    """A DeepSpeed engine for `spec.role` on rank `spec.rank` of `spec.world_size`."""

    def __init__(self, spec: LearnerSpec):
        self.rank, self.world_size, self.role = spec.rank, spec.world_size, spec.role
        self.model_path, self.cfg, self.model_cfg, self.algo = spec.model_path, spec.learner, spec.model, spec.algorithm
        self.total_steps, self.hold_reference = spec.total_steps, spec.hold_reference
        self.reference: torch.nn.Module | None = None
        self.on_gpu = torch.cuda.is_available() and spec.learner.num_gpus_per_rank > 0
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: listen for the group's torch.distributed store on this node's address; returns (address, port).

        The socket stays bound until `setup` hands it to the store: no other process can take the port.
        """
        self._close_listener()
        address = ray.util.get_node_ip_address()
        self._listen_fd, port = bind_listener(address, self.cfg.master_port)
        return address, port

    def _close_listener(self) -> None:
        fd, self._listen_fd = getattr(self, "_listen_fd", None), None
        if fd is not None:
            os.close(fd)

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """Join the process group and build the engine; returns {"params": count, "device": name}."""
        gpu = local_gpu_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")) if self.on_gpu else 0
        os.environ.update(
            RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(gpu),  # DeepSpeed's device index
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )
        if self.on_gpu:
            torch.cuda.set_device(gpu)
        else:
            torch.set_num_threads(max(1, int(self.cfg.num_cpus_per_rank)))
            # Gloo's default device may bind 127.0.0.1 (see rlhf_ray.weight_sync.join_sync_group), which ranks on
            # other nodes cannot reach; the group is created inside DeepSpeed, so name the interface instead.
            local = master_addr if self.rank == 0 else route_source_address(master_addr)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface_of(local))
        listen_fd, self._listen_fd = getattr(self, "_listen_fd", None), None
        store = store_on(master_addr, master_port, self.world_size, self.cfg.call_timeout_s, listen_fd)
        timeout = timedelta(seconds=self.cfg.call_timeout_s)
        backend = "nccl" if self.on_gpu else "gloo"
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)  # adopts the group above
        # Same seed on every rank: a freshly initialised critic head must be identical everywhere.
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        model = load_model(self.role, self.model_path, self.model_cfg, self.cfg.gradient_checkpointing)
        lr = self.cfg.critic_lr if self.role == "critic" else self.cfg.lr
        adam = build_optimizer(model, self.cfg, lr)
        bf16 = self.model_cfg.dtype == "bfloat16"
        ds_cfg = deepspeed_config(self.cfg, self.world_size, bf16)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=adam, config=ds_cfg, dist_init_required=False)
        if self.hold_reference:
            self.reference = self._load_reference(bf16)
        self.adam = adam
        adam.init_state()
        self.loop = StepLoop(self.engine, adam, self.cfg, lr, self.total_steps)
        self.loop.prime(self._dummy_output)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        return {"params": params, "device": str(self.engine.device)}

    def _load_reference(self, bf16: bool) -> torch.nn.Module:
        """The frozen initial policy in the policy's dtype, eval mode, no gradients.

        Under ZeRO-3 it is sharded across the ranks like the policy (a DeepSpeed engine without an
        optimizer, as DeepSpeed-Chat and OpenRLHF hold their reference), so each rank keeps 1/N of it;
        otherwise every rank holds it whole.
        """
        if self.role != "policy":
            raise ValueError(f"only the policy learner can hold the reference, this learner is a {self.role}")
        model = load_frozen_policy(self.model_path, self.model_cfg)
        if self.cfg.zero_stage_used(bf16) == 3:
            ds_cfg = deepspeed_config(self.cfg, self.world_size, bf16)
            engine, *_ = deepspeed.initialize(model=model, config=ds_cfg, dist_init_required=False)
            engine.eval()  # DeepSpeed's eval() returns None
            return engine
        return model.to(self.engine.device)

    def _dummy_output(self) -> torch.Tensor:
        ids = torch.ones(1, 2, dtype=torch.long, device=self.engine.device)
        if self.role == "policy":
            return self.engine(input_ids=ids, use_cache=False).logits.sum()
        return sequence_scores(self.engine, ids, torch.ones_like(ids)).sum()

    def _to_device(self, batch: TensorBatch) -> TensorBatch:
        return {k: v.to(self.engine.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @torch.no_grad()
    def _forward(
        self, batch: TensorBatch, fn: Callable[[torch.nn.Module, TensorBatch], torch.Tensor],
        model: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """`fn(model, micro-batch)` over micro-batches of this rank's rows; `model` defaults to the engine."""
        model = self.engine if model is None else model
        model.eval()
        outs = [fn(model, m) for m in micro_batches(self._to_device(batch), self.cfg.micro_batch_size)]
        return torch.cat(outs).float().cpu()

    # ------------------------------------------------------------------ forward-only

    def forward_logprobs(self, batch: TensorBatch, temperature: float = 1.0) -> torch.Tensor:
        """log softmax(logits / temperature) at the response tokens: [n, R] fp32 nats, 0 on padding."""
        return self._forward(batch, lambda model, m: response_logprobs(model, m, temperature))

    def forward_ref_logprobs(self, batch: TensorBatch, temperature: float = 1.0) -> torch.Tensor:
        """The reference's log softmax(logits / temperature) at the response tokens: [n, R] fp32 nats, 0 on padding."""
        if self.reference is None:
            raise RuntimeError(f"{self.role} learner rank {self.rank} holds no reference; start the group with "
                               "hold_reference=True (reference.placement=learner)")
        return self._forward(batch, lambda model, m: response_logprobs(model, m, temperature), self.reference)

    def forward_target_logprobs(self, batch: TensorBatch) -> torch.Tensor:
        """log-probs of the tokens marked by loss_mask (input_ids, attention_mask, loss_mask [n, L]): [n, L-1] fp32 nats."""
        return self._forward(batch, next_token_logprobs)

    def forward_values(self, batch: TensorBatch) -> torch.Tensor:
        """Critic values of the response tokens: [n, R] fp32, 0 on padding."""
        return self._forward(batch, token_values)

    def forward_rewards(self, batch: TensorBatch) -> torch.Tensor:
        """Reward-model score at each row's last real token: [n] fp32."""
        return self._forward(batch, lambda model, m: sequence_scores(model, m["input_ids"], m["attention_mask"]))

    # ------------------------------------------------------------------ updates

    def _update(self, batch: TensorBatch, objective: Objective) -> dict[str, float]:
        """Steps of `minibatch_size / world_size` rows each; the experience is checked for NaN/inf."""
        rows_per_step = self.cfg.minibatch_size // self.world_size
        algo = self.algo
        return self.loop.run(
            self._to_device(batch), rows_per_step, objective, tokens_or_rows(algo), PER_TOKEN_FIELDS, loss_is_sum(algo)
        )

    def ppo_update(self, batch: Experience, temperature: float = 1.0) -> dict[str, float]:
        """Policy optimizer steps over this rank's rows, `minibatch_size / world_size` rows per step."""
        algo = self.algo
        objective = lambda model, micro: ppo_objective(model, micro, algo, temperature)  # noqa: E731
        return self._update(batch, objective)

    def value_update(self, batch: TensorBatch) -> dict[str, float]:
        """Critic optimizer steps over this rank's rows, `minibatch_size / world_size` rows per step."""
        algo = self.algo
        objective = lambda model, micro: value_objective(model, micro, algo)  # noqa: E731
        return self._update(batch, objective)

    def sft_step(self, batch: TensorBatch) -> dict[str, float]:
        """One optimizer step on all of this rank's rows (input_ids, attention_mask, loss_mask)."""
        batch = self._to_device(batch)
        rows = batch["input_ids"].shape[0]
        return self.loop.run(batch, rows, sft_objective, lambda micro: float(sft_targets(micro).sum()))

    def rm_step(self, batch: TensorBatch) -> dict[str, float]:
        """One optimizer step on all of this rank's (chosen, rejected) pairs."""
        batch = self._to_device(batch)
        rows = batch["chosen_input_ids"].shape[0]
        return self.loop.run(batch, rows, rm_objective, lambda micro: float(micro["chosen_input_ids"].shape[0]))

    # ------------------------------------------------------------------ weights and state

    def iter_weight_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """HF-named full parameters in buckets; rank 0 gets tensors, other ranks empty lists.

        Collective under ZeRO-3: run it to the end on every rank.
        """
        return iter_weight_buckets(unwrap(self.engine.module), bucket_bytes, self.rank)

    def export_weights(self, bucket_bytes: int) -> list[tuple[str, torch.Tensor]]:
        """All HF-named full parameters on CPU on rank 0, [] on other ranks."""
        return [(n, t.cpu().clone()) for bucket in self.iter_weight_buckets(bucket_bytes) for n, t in bucket]

    def weight_metas(self) -> list[TensorMeta]:
        """Name, full shape and dtype of every parameter (what the weight broadcast will send)."""
        return weight_metas(unwrap(self.engine.module))

    def open_weight_sync(self, address: str, interface: str) -> tuple[str, int]:
        """Rank 0: listen for a new weight-sync group on this node; returns (address, port) for the spec.

        The address is `address`, else `interface`'s, else this node's as Ray knows it (see
        `rlhf_ray.net.listen_address`). The socket stays bound until `join_weight_sync` hands it to the store.
        """
        self._close_sync_listener()
        host = listen_address(address, interface, ray.util.get_node_ip_address())
        self._sync_listen_fd, port = bind_listener(host)
        return host, port

    def _close_sync_listener(self) -> None:
        fd, self._sync_listen_fd = getattr(self, "_sync_listen_fd", None), None
        if fd is not None:
            os.close(fd)

    def join_weight_sync(self, spec: SyncGroupSpec) -> None:
        """Rank 0 joins the weight-sync group as its rank 0; the other ranks only take part in gathers.

        A group this rank held before is aborted first, so none of its collectives lingers (NCCL).
        """
        abort_group(getattr(self, "sync_group", None))
        self.sync_group, self._sync_host_timeout = None, host_timeout(spec)
        if self.rank != 0:
            self.sync_group = None
            return
        listen_fd, self._sync_listen_fd = getattr(self, "_sync_listen_fd", None), None
        if listen_fd is None:
            raise RuntimeError("join_weight_sync on learner rank 0 without open_weight_sync first")
        self.sync_group = join_sync_group(spec, 0, listen_fd)

    def send_weights(self, plan: list[list[TensorMeta]], version: int, columns: int) -> ParamSums:
        """Broadcast every parameter to the rollout actors (collective); rank 0 returns their `param_sums`."""
        model = unwrap(self.engine.module)
        return send_weights(
            model, plan, getattr(self, "sync_group", None), self.rank, version, columns,
            getattr(self, "_sync_host_timeout", None),
        )

    def share_bucket(
        self, bucket: list[TensorMeta], version: int, columns: int, export: bool = True
    ) -> tuple[SharedBucket | None, ParamSums]:
        """CUDA IPC handles of one bucket for the actors colocated on this rank's GPU (if `export`), and its
        `param_sums` (rank 0); collective. The exported buffers live until `release_shared`.
        """
        shared, buffers, sums = share_bucket(unwrap(self.engine.module), bucket, self.rank, version, columns, export)
        self._shared_buffers = getattr(self, "_shared_buffers", []) + buffers
        return shared, sums

    def release_shared(self) -> None:
        """Drop the buffers exported by `share_bucket`; their memory returns to the caching allocator once the
        receivers have closed their handles (`ipc_collect` reclaims blocks they released)."""
        had = bool(getattr(self, "_shared_buffers", []))
        self._shared_buffers = []
        if had:
            torch.cuda.ipc_collect()

    def gpu_uuid(self) -> str:
        """The UUID of this rank's GPU (colocated rollout actors must report the same)."""
        return gpu_uuid(self.engine.device)

    def param_checksums(self) -> dict[str, float]:
        """float64 sum of each full parameter as this rank sees it."""
        return param_checksums(unwrap(self.engine.module), CHECKSUM_BUCKET_BYTES)

    def save(self, path: str, extra: dict[str, Any]) -> None:
        """Write the checkpoint (learners/checkpoint.py) with `extra` fields in its state.json."""
        checkpoint.save(path, self.engine, self.adam, self.loop, self.rank, self.role, self.model_path, extra)
        dist.barrier()

    def load(self, path: str) -> dict[str, Any]:
        """Restore a checkpoint written by `save`; returns its state.json."""
        return checkpoint.load(path, self.engine, self.adam, self.loop, self.rank, self.role)

    def where(self) -> dict[str, str]:
        """The Ray node this rank runs on: {"node_id", "node_ip"}; also the group's liveness probe."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}

    def read_shared_file(self, path: str) -> tuple[str, str | None]:
        """(this node's address, the text of `path` as this node sees it, or None if it has no such file)."""
        node_ip = ray.util.get_node_ip_address()
        try:
            return node_ip, Path(path).read_text()
        except FileNotFoundError:
            return node_ip, None

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
