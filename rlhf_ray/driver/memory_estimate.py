"""Sizing a run for a cluster you do not have yet: GPU memory per device and a step-time estimate.

Everything here is arithmetic on the model's config.json shape and the run config; nothing is measured.
Memory per learner GPU (bytes, Ψ = parameters, N = ranks sharing the ZeRO partition, d = bytes per
parameter of `model.dtype`: 2 for bfloat16/float16, 4 for float32):

    weights     d·Ψ, divided by N under ZeRO-3
    gradients   d·Ψ, divided by N under ZeRO-2 and -3
    optimizer   K·Ψ, divided by N under ZeRO-1, -2 and -3; Adam in mixed precision keeps an fp32 master copy
                plus two moments (K = 12); in float32 the weights are the master copy (K = 8)
    activations per layer 34·s·b·h·d/2 (Korthikanti et al. 2022, flash attention: no s² term); with
                gradient checkpointing L·s·b·h·d (each layer's input) plus one layer's 34·s·b·h·d/2
    logits      8·b·s·V: the fp32 logits and their log-softmax of one micro-batch
    overhead    `assumptions.overhead_gib` (CUDA context, allocator, communication buffers)
    reference   d·Ψ, divided by N under ZeRO-3, with reference.placement=learner only (the ranks hold it)

with s = model.max_model_len (the worst case) and b = learner.micro_batch_size. A vLLM rollout GPU gets
gpu_memory_utilization × its memory; the weights (d·Ψ / tensor_parallel_size) and
`assumptions.vllm_overhead_gib` come off it, the rest holds KV cache at 2·L·kv_heads·head_dim·d bytes per
token per tensor-parallel rank. The reference (and a reward model, assumed to have the policy's shape) hold
weights, one micro-batch's logits and the overhead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_ray.config import ConfigError, RunConfig

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer's config.json that set its memory."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tied_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> "ModelShape":
        missing = [k for k in SHAPE_FIELDS if not isinstance(config.get(k), int)]
        if missing:
            raise ConfigError(f"{source}: no integer {', '.join(missing)} (fix: give the model's config.json, which "
                              "holds vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads)")
        return cls(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def parameters(self) -> int:
        """Ψ: embeddings (and an untied LM head), attention, gated MLP, RMSNorm weights."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)
        layer = attention + 3 * h * self.intermediate_size + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return embeddings + self.num_layers * layer + h


def load_shape(path: str) -> ModelShape:
    """The shape in `path` (a config.json, or a model folder holding one)."""
    p = Path(path).expanduser()
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"{p}: no such file (fix: pass --model-config with the model's config.json; shapes of "
                          "common models are in configs/models/)")
    return ModelShape.from_config(json.loads(p.read_text()), str(p))


@dataclass(frozen=True)
class Assumptions:
    """The throughput and overhead figures the estimate rests on; a cluster spec's `assumptions:` overrides them."""

    train_mfu: float = 0.3  # fraction of the GPU's peak FLOP/s a learner update or forward reaches
    generate_mfu: float = 0.1  # the same for vLLM generation (decode is memory-bound)
    prompt_tokens: int = 256  # mean prompt length (tokens)
    response_fill: float = 0.5  # mean response length as a fraction of max_new_tokens
    sync_gb_per_s: float = 10.0  # weight broadcast bandwidth (GB/s)
    overhead_gib: float = 2.0  # per learner/reference GPU
    vllm_overhead_gib: float = 2.0  # per rollout GPU: activation peak, CUDA graphs


def learner_bytes(shape: ModelShape, cfg: RunConfig, ranks: int, assume: Assumptions) -> dict[str, float]:
    """Bytes on one learner GPU by part (see the module docstring), for a ZeRO group of `ranks` ranks."""
    psi, d = shape.parameters, DTYPE_BYTES[cfg.model.dtype]
    stage = cfg.learner.zero_stage_used(cfg.model.dtype == "bfloat16")
    k = 8 if d == 4 else 12
    s, b, h, L = cfg.model.max_model_len, cfg.learner.micro_batch_size, shape.hidden_size, shape.num_layers
    one_layer = 34 * s * b * h * d / 2
    activations = L * s * b * h * d + one_layer if cfg.learner.gradient_checkpointing else L * one_layer
    parts = {
        "weights": d * psi / (ranks if stage >= 3 else 1),
        "gradients": d * psi / (ranks if stage >= 2 else 1),
        "optimizer": k * psi / (ranks if stage >= 1 else 1),
        "activations": activations,
        "logits": 8 * b * s * shape.vocab_size,
        "overhead": assume.overhead_gib * GIB,
    }
    if cfg.reference.placement == "learner":  # the frozen reference beside the policy, sharded like its weights
        parts["reference"] = parts["weights"]
    return parts


def inference_bytes(shape: ModelShape, cfg: RunConfig, assume: Assumptions, lm_head: bool = True) -> dict[str, float]:
    """Bytes on the reference's GPU: weights, one micro-batch's logits, overhead. A reward model (`lm_head`
    False) has a one-score head in place of the vocabulary logits."""
    logits = 8 * cfg.learner.micro_batch_size * cfg.model.max_model_len * shape.vocab_size if lm_head else 0.0
    return {"weights": DTYPE_BYTES[cfg.model.dtype] * shape.parameters, "logits": logits,
            "overhead": assume.overhead_gib * GIB}


def reward_model_bytes(shape: ModelShape, cfg: RunConfig, gpu_memory_gib: float, assume: Assumptions) -> dict[str, float]:
    """Bytes the reward model's vLLM engine takes on its GPU: reward.gpu_memory_utilization × the GPU's memory,
    split into weights (the policy's shape), overhead and the KV cache left (negative: the weights do not fit)."""
    budget = cfg.reward.gpu_memory_utilization * gpu_memory_gib * GIB
    weights = DTYPE_BYTES[cfg.model.dtype] * shape.parameters
    overhead = assume.vllm_overhead_gib * GIB
    return {"weights": weights, "overhead": overhead, "KV cache": budget - weights - overhead}


def shared_gpu_bytes(members: dict[str, dict[str, float]]) -> float:
    """Peak bytes on one GPU shared by several processes: the sum of each one's peak. Each process keeps its
    own peak reserved (PyTorch's caching allocator does not hand memory back; vLLM reserves its whole budget
    while awake), so the peaks add up even when the processes run at different times."""
    return sum(sum(parts.values()) for parts in members.values())


@dataclass(frozen=True)
class RolloutMemory:
    budget: float  # gpu_memory_utilization × GPU memory (bytes)
    weights: float  # per tensor-parallel rank (bytes)
    overhead: float
    kv_bytes_per_token: float
    kv_tokens: int  # tokens of KV cache that fit (0 when the weights do not)

    @property
    def fits(self) -> bool:
        return self.kv_tokens > 0


def rollout_memory(shape: ModelShape, cfg: RunConfig, gpu_memory_gib: float, assume: Assumptions) -> RolloutMemory:
    """vLLM on one GPU of a tensor-parallel group: weights, overhead and the KV-cache tokens left in the budget."""
    d, tp = DTYPE_BYTES[cfg.model.dtype], cfg.rollout.tensor_parallel_size
    budget = cfg.rollout.gpu_memory_utilization * gpu_memory_gib * GIB
    weights = d * shape.parameters / tp
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * d / tp
    free = budget - weights - assume.vllm_overhead_gib * GIB
    return RolloutMemory(budget, weights, assume.vllm_overhead_gib * GIB, per_token, max(int(free // per_token), 0))


def step_seconds(shape: ModelShape, cfg: RunConfig, rollout_tflops: float, learner_tflops: float,
                 assume: Assumptions) -> dict[str, float]:
    """Seconds per RL step by stage, from 2Ψ FLOPs per token forward and 6Ψ forward+backward (8Ψ with
    gradient checkpointing), each GPU at its peak × the stated MFU; the stages run one after another."""
    psi = shape.parameters
    samples = cfg.train.prompts_per_step * cfg.rollout.sampling.n
    response = assume.response_fill * cfg.rollout.sampling.max_new_tokens
    tokens = samples * (assume.prompt_tokens + response)
    rollout_gpus = cfg.rollout.num_actors * cfg.rollout.tensor_parallel_size
    ranks = cfg.learner.num_ranks
    learner_rate = learner_tflops * 1e12 * assume.train_mfu  # FLOP/s per learner GPU
    forward = 2 * psi * tokens
    update = (8 if cfg.learner.gradient_checkpointing else 6) * psi * tokens * cfg.learner.ppo_epochs
    out = {
        "generate": 2 * psi * samples * response / (rollout_gpus * rollout_tflops * 1e12 * assume.generate_mfu),
        "reference": forward / (ranks * learner_rate if cfg.reference.placement == "learner" else learner_rate),
        "logprobs": 0.0 if cfg.skips_old_logprobs else forward / (ranks * learner_rate),
        "update": update / (ranks * learner_rate),
        "sync": DTYPE_BYTES[cfg.model.dtype] * psi / (assume.sync_gb_per_s * 1e9),
    }
    if cfg.algorithm.uses_critic:  # values before the update, then the critic's own update
        out["critic"] = (forward + update) / (ranks * learner_rate)
    if cfg.reward.use_model:
        out["reward"] = forward / learner_rate
    return out
