"""Prompt templates: chat (ChatML), plain, zero-shot, few-shot (seeded, never the question itself), CoT."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_ray.config import DatasetConfig
from rlhf_ray.prompts import (
    COT_CUE,
    RowError,
    TemplateError,
    encode_prompt,
    example_rng,
    format_prompt,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Describe the weather. The river is calm , warm and quiet .",
    "Question: What is 2 + 3? Answer: 5. Let's think step by step.",
    "You are a helpful assistant. Tell me about the city.",
]


def make_tokenizer(chat_template: str | None = CHATML, bos: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences; EOS <|im_end|>, PAD <|endoftext|>, optional BOS prepended."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + ([bos] if bos else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=bos, chat_template=chat_template
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


POOL = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i), "rationale": f"{i} and {i} make {2 * i}."} for i in range(6)]


def test_chat_template_user_turn_and_generation_prompt(tok):
    out = format_prompt({"prompt": "Describe the weather."}, DatasetConfig(template="chat"), tok)
    assert out == "<|im_start|>user\nDescribe the weather.<|im_end|>\n<|im_start|>assistant\n"


def test_chat_system_prompt_added_once(tok):
    cfg = DatasetConfig(template="chat", system_prompt="Be brief.")
    out = format_prompt({"prompt": "Hi"}, cfg, tok)
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    own = {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}]}
    out = format_prompt(own, cfg, tok)
    assert out.count("<|im_start|>system") == 1 and "Own." in out and "Be brief." not in out


def test_chat_messages_multi_turn(tok):
    row = {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
    ]}
    out = format_prompt(row, DatasetConfig(template="chat"), tok)
    assert out == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_without_template_names_the_fix():
    with pytest.raises(TemplateError, match=r"has none \(fix: set `template: plain`.*chat_template"):
        format_prompt({"prompt": "Hi"}, DatasetConfig(template="chat"), make_tokenizer(chat_template=None))


@pytest.mark.parametrize(
    "row, field, expected",
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "messages[1].role",
         "unknown role 'bot'"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
        ({"messages": "hello"}, "messages", "expected a list"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages[1].role",
         "the last message is from 'assistant', expected 'user'"),
        ({"prompt": 7}, "prompt", "expected a string, got int"),
    ],
)
def test_bad_rows_name_the_field(tok, row, field, expected):
    with pytest.raises(RowError) as err:
        format_prompt(row, DatasetConfig(template="chat"), tok)
    assert err.value.field == field
    assert f"field '{field}': {expected}" in str(err.value)
    assert "(fix: " in str(err.value)


def test_messages_need_the_chat_template(tok):
    row = {"messages": [{"role": "user", "content": "a"}]}
    with pytest.raises(RowError, match="chat messages cannot be written with template 'plain'.*template: chat"):
        format_prompt(row, DatasetConfig(template="plain"), tok)


def test_plain_and_zero_shot():
    row = {"prompt": "What is 2 + 3?"}
    assert format_prompt(row, DatasetConfig(template="plain")) == "What is 2 + 3?"
    assert format_prompt(row, DatasetConfig(template="zero_shot")) == "Question: What is 2 + 3?\nAnswer:"


def test_few_shot_is_deterministic_per_seed_and_question():
    cfg = DatasetConfig(template="few_shot", few_shot_k=3)
    row = {"prompt": "What is 9 + 9?"}
    a = format_prompt(row, cfg, None, POOL, example_rng(7, row["prompt"]))
    b = format_prompt(row, cfg, None, POOL, example_rng(7, row["prompt"]))
    assert a == b
    assert a.endswith("\n\nQuestion: What is 9 + 9?\nAnswer:")
    assert a.count("Question:") == 4
    others = {format_prompt(row, cfg, None, POOL, example_rng(s, row["prompt"])) for s in range(10)}
    assert len(others) > 1, "the seed should change the draw"


def test_few_shot_never_shows_the_question_itself():
    cfg = DatasetConfig(template="few_shot", few_shot_k=len(POOL) - 1)
    for seed in range(5):
        for example in POOL:
            out = format_prompt({"prompt": example["prompt"]}, cfg, None, POOL, random.Random(seed))
            assert out.count(example["prompt"]) == 1  # only as the final question
            assert out.count("Question:") == len(POOL)


def test_few_shot_pool_too_small():
    cfg = DatasetConfig(template="few_shot", few_shot_k=len(POOL))
    with pytest.raises(RowError, match=f"few_shot_k={len(POOL)} but the pool has only {len(POOL) - 1}"):
        format_prompt({"prompt": POOL[0]["prompt"]}, cfg, None, POOL, random.Random(0))


def test_cot_cue_and_rationales():
    row = {"prompt": "What is 9 + 9?"}
    zero = format_prompt(row, DatasetConfig(template="cot", few_shot_k=0))
    assert zero == f"Question: What is 9 + 9?\nAnswer: {COT_CUE}"
    out = format_prompt(row, DatasetConfig(template="cot", few_shot_k=2), None, POOL, random.Random(0))
    shots, ask = out.rsplit("\n\n", 1)
    assert ask == zero
    assert shots.count(COT_CUE) == 2 and shots.count("The answer is") == 2
    assert any(p["rationale"] in shots for p in POOL)


def test_cot_pool_without_rationale_gives_plain_answers():
    pool = [{"prompt": p["prompt"], "answer": p["answer"]} for p in POOL]
    out = format_prompt({"prompt": "What is 9 + 9?"}, DatasetConfig(template="cot", few_shot_k=2), None, pool,
                        random.Random(0))
    shots, ask = out.rsplit("\n\n", 1)
    assert COT_CUE not in shots and COT_CUE in ask


def test_encode_prompt_adds_bos_once():
    tok = make_tokenizer(bos="<s>")
    bos = tok.bos_token_id
    assert encode_prompt("hello", tok)[0] == bos
    ids = encode_prompt("<s>hello", tok)
    assert ids[0] == bos and ids[1] != bos
