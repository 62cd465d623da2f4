"""Config sections of the wiring between processes: the weight-sync group and the Ray cluster."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_ray.config.base import Section


class WeightSyncConfig(Section):
    backend: Literal["auto", "gloo", "nccl", "cuda_ipc"] = "auto"
    bucket_mb: float = Field(64.0, gt=0)
    master_addr: str = Field(
        "", description="Address learner rank 0 listens on for the weight-sync group; empty: its node's address "
        "as Ray knows it (127.0.0.1 for a local head). Set it, or `interface`, on hosts with several networks.",
    )
    interface: str = Field(
        "", description="Network interface (e.g. eth1) whose IPv4 address learner rank 0 listens on, like "
        "NCCL_SOCKET_IFNAME; used when master_addr is empty.",
    )
    timeout_s: float = Field(120.0, gt=0)
    verify: bool = Field(True, description="Compare per-layer checksums after every broadcast.")
    verify_columns: int = Field(
        32, ge=0,
        description="Input columns per linear weight that CPU vLLM has repacked for its kernel and so reads back "
        "through it (identity rows), drawn afresh from each policy version; 0 reads every column (exact but slow: "
        "the read costs in_features times one token's FLOPs). Other tensors are always summed whole.",
    )
    probe_every: int = Field(
        1, ge=0,
        description="Every this many broadcasts, each rollout actor scores a fixed batch of token sequences and its "
        "log-probs must equal the learner's (within probe_tol): proves what vLLM samples from, which checksums of "
        "the tensors sent cannot (e.g. a tied LM head). 0 turns the probe off.",
    )
    probe_tokens: int = Field(32, ge=2, description="Tokens per probe sequence (2 sequences per probe).")
    probe_tol: float | None = Field(
        None, gt=0,
        description="Largest mean |vLLM - learner| probe log-prob, nats/token; None: 1e-3 for float32 weights, "
        "5e-2 for bf16/fp16.",
    )


class ClusterConfig(Section):
    address: str = Field("", description="Ray address; empty starts a local head on 127.0.0.1.")
    host: str = Field("127.0.0.1", description="Address a local head and its servers bind to.")
    dashboard: bool = False
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local head; None uses all.")
    env_passthrough: list[str] = Field(
        default_factory=lambda: ["WANDB_API_KEY", "HF_TOKEN"],
        description="Environment variables forwarded to workers by name, never logged.",
    )
