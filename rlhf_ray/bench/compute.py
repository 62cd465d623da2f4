"""The learner's arithmetic rate against the machine's own matmul peak, both measured by the bench.

    peak = matmul_peak_gflops("bfloat16", threads=2)       # GFLOP/s of a large square matmul
    flops = update_flops(policy, samples=8, seq_len=79)     # FLOPs of one forward + backward
    share = flops / update_s / 1e9 / peak
"""

from __future__ import annotations

import time

import torch

PEAK_SIZE = 1024  # square matmul side: large enough to reach the kernel's peak, small enough to time quickly
PEAK_REPEATS = 20


def matmul_peak_gflops(dtype: str, threads: int, size: int = PEAK_SIZE, repeats: int = PEAK_REPEATS) -> float:
    """Best GFLOP/s of `repeats` timed [size, size] @ [size, size] products in `dtype` on `threads` threads.

    The best, not the median: a peak, and the machine may be shared. Restores torch's thread count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size).to(getattr(torch, dtype))
        b = torch.randn(size, size).to(getattr(torch, dtype))
        a @ b  # warm-up: kernel selection and page faults
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 / best / 1e9


def update_flops(policy_path: str, samples: int, seq_len: int) -> float:
    """FLOPs of one forward and backward pass of the causal LM at `policy_path` over samples × seq_len tokens.

    Matmuls only: 2 FLOPs per weight of every linear layer (lm_head included) per token forward, twice
    that backward, plus attention's scores and weighted sum (4 · seq_len² · hidden per layer and sequence
    forward). Built on the meta device: no weights are read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(policy_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * seq_len**2 * config.num_attention_heads * head_dim * config.num_hidden_layers * samples
    forward = 2 * linear * samples * seq_len + attention
    return 3 * forward
