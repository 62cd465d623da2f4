"""The tiny checkpoint builder: determinism, and that transformers loads what it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_ray.recipes.tiny import IM_END, PAD_TOKEN, make_tiny


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path: Path, tiny_model_dir: Path) -> None:
    make_tiny(tmp_path / "again", seed=0)
    first, second = _files(tiny_model_dir), _files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert "policy/model.safetensors" in first and "reward/model.safetensors" in first
    for name in first:
        assert first[name] == second[name], f"{name} differs between two builds with seed 0"


def test_other_seed_gives_other_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    paths = make_tiny(tmp_path, seed=1, reward_model=False)
    assert set(paths) == {"policy"}
    weights = (paths["policy"] / "model.safetensors").read_bytes()
    assert weights != (tiny_model_dir / "policy/model.safetensors").read_bytes()


def test_loads_in_transformers(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "policy")
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir / "reward")
    assert (tok.eos_token, tok.pad_token) == (IM_END, PAD_TOKEN)
    assert policy.config.vocab_size == len(tok)
    assert policy.config.eos_token_id == tok.eos_token_id
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == tok.pad_token_id
    # Nothing but EOS in the generation config: no sampling defaults leak into rollouts.
    gen = policy.generation_config
    assert gen.eos_token_id == tok.eos_token_id
    assert gen.repetition_penalty in (None, 1.0) and gen.top_p in (None, 1.0) and gen.temperature in (None, 1.0)
    ids = torch.tensor([tok.encode("The river is calm , warm and quiet .")])
    assert policy(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert reward(ids).logits.shape == (1, 1)


def test_tokenizer_round_trip(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "policy")
    for text in ["Describe the harbor.", "What is 3 plus 4? 7", "unseen wörds & symbols: {x}"]:
        assert tok.decode(tok.encode(text)) == text
    # The demo language compresses: words of the training corpus are single tokens.
    assert len(tok.encode(" harbor")) == 1


def test_chat_template(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "policy")
    messages = [{"role": "user", "content": "Describe the river."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nDescribe the river.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    assert tok.eos_token_id in ids  # the user turn ends with <|im_end|>, the EOS token


def test_bad_shape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head_dim"):
        make_tiny(tmp_path, hidden_size=64, num_heads=4, num_kv_heads=1)
    with pytest.raises(ValueError, match="arch"):
        make_tiny(tmp_path, arch="gpt5")


def test_llama_arch_loads(tmp_path: Path) -> None:
    paths = make_tiny(tmp_path, arch="llama", hidden_size=128, num_heads=2, num_kv_heads=2, reward_model=False)
    model = AutoModelForCausalLM.from_pretrained(paths["policy"])
    assert model.config.model_type == "llama" and model.config.head_dim == 64


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tied_model_shares_the_head_and_stores_no_lm_head(tmp_path: Path, arch: str) -> None:
    from safetensors import safe_open

    paths = make_tiny(tmp_path, arch=arch, tie=True, reward_model=False)
    model = AutoModelForCausalLM.from_pretrained(paths["policy"])
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with safe_open(paths["policy"] / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    untied = AutoModelForCausalLM.from_pretrained(make_tiny(tmp_path / "u", arch=arch, reward_model=False)["policy"])
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_make_tiny_cli_takes_arch_and_tie(tmp_path: Path) -> None:
    from rlhf_ray.cli import main

    assert main(["make-tiny", str(tmp_path), "--arch", "llama", "--tie"]) in (0, None)
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").config
    assert config.model_type == "llama" and config.tie_word_embeddings is True
