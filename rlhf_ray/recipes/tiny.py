"""Build a tiny policy, reward model and BPE tokenizer from scratch, deterministically.

No model hub is reachable on the development machines, so tests and the demo make their own
checkpoints: a byte-level BPE tokenizer trained with `tokenizers`, a randomly initialised Qwen2
(or Llama) causal LM, and a one-label sequence-classification reward model on the same backbone
config. Every file is a plain `save_pretrained` output that vLLM and transformers load from the
folder, and the same arguments always give the same bytes.

    out_dir/policy   config.json, generation_config.json, model.safetensors, tokenizer files
    out_dir/reward   config.json, model.safetensors, tokenizer files
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

from rlhf_ray.recipes import synthetic

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# ChatML, as Qwen2-Instruct writes it. The assistant turn ends with <|im_end|>, which is the EOS
# token, so generation stops at the end of the answer under both the chat and plain templates.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHS = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification),
    "llama": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification),
}


def default_corpus(seed: int = 0) -> list[str]:
    """Text the built-in tokenizer is trained on: the demo's tiny language, chat turns and arithmetic."""
    lines = synthetic.pretraining_corpus(2000, seed)
    for row in synthetic.instruction_rows(500, seed + 1):
        lines.append(f"{IM_START}user\n{row['prompt']}{IM_END}\n{IM_START}assistant\n{row['response']}{IM_END}\n")
    lines += [f"{r['prompt']} {r['answer']}" for r in synthetic.arithmetic_rows(500, seed + 2)]
    lines += ["The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18"]
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the ChatML special tokens; EOS is <|im_end|>, PAD is <|endoftext|>, no BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=None,
        clean_up_tokenization_spaces=False,
    )


def model_config(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position: int,
    tie: bool = False,
    **extra: int,
) -> Qwen2Config | LlamaConfig:
    """The backbone config shared by policy and reward model; the vocabulary is the tokenizer's.

    tie: the LM head shares the input embedding matrix (tie_word_embeddings), as in Qwen2.5-0.5B/1.5B
    and Llama-3.2; the checkpoint then holds no lm_head.weight.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )
    if hidden_size // num_heads < 32:
        raise ValueError(
            f"head_dim = hidden_size / num_heads = {hidden_size // num_heads} is below 32, "
            "which vLLM's CPU attention refuses; lower num_heads"
        )
    config_cls = ARCHS[arch][0]
    return config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **extra,
    )


def _save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def make_tiny(
    out_dir: str | os.PathLike,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    vocab_size: int = 512,
    max_position: int = 512,
    seed: int = 0,
    corpus: list[str] | None = None,
    reward_model: bool = True,
    tie: bool = False,
) -> dict[str, Path]:
    """Build a random-init policy (and reward model) plus tokenizer under `out_dir`.

    `vocab_size` is the BPE training target; the model's vocabulary is the tokenizer's actual size
    (at most `vocab_size`, smaller when the corpus has fewer merges), so every id the model can
    emit decodes. head_dim = hidden_size / num_heads must be at least 32 (vLLM CPU attention).
    The MLP is 4·hidden wide, so a layer holds about (14 + 2·num_kv_heads/num_heads)·hidden²
    parameters: the default is 0.18M in all, and hidden_size=512, num_layers=8, num_heads=8,
    num_kv_heads=2 gives 31M for benchmarks. `tie` shares the embedding with the LM head.

    Returns {"policy": folder, "reward": folder} (no "reward" when reward_model is False).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not one of {sorted(ARCHS)}")
    _, lm_cls, rm_cls = ARCHS[arch]
    out = Path(out_dir)
    tokenizer = train_tokenizer(corpus if corpus is not None else default_corpus(seed), vocab_size)
    shape = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "max_position": max_position,
        "tie": tie,
    }
    paths = {"policy": out / "policy"}
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        policy = lm_cls(model_config(arch, tokenizer, **shape)).eval()
        # Only the EOS id: vLLM and transformers would otherwise pick up sampling defaults
        # (repetition penalty, top-p) from here and rollout log-probs would drift from the learner's.
        policy.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
        _save_model(policy, tokenizer, paths["policy"])
        if reward_model:
            paths["reward"] = out / "reward"
            torch.manual_seed(seed + 1)
            reward = rm_cls(model_config(arch, tokenizer, num_labels=1, **shape)).eval()
            _save_model(reward, tokenizer, paths["reward"])
    return paths
