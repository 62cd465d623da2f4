"""Datasets: bad input named by file, line and field (or skipped and counted), tokenized batches, resumable sampling."""

import json
from pathlib import Path

import pytest
import torch
from test_prompts import make_tokenizer

from rlhf_ray.config import DatasetConfig
from rlhf_ray.data import DataError, PromptSampler, load_dataset, tokenize_preferences, tokenize_prompts, tokenize_sft
from rlhf_ray.data.tokenize import cut_responses
from rlhf_ray.prompts import encode_prompt, format_prompt

GOOD = {
    "prompt": {"prompt": "Describe the weather.", "answer": "5"},
    "sft": {"prompt": "Describe the weather.", "response": "The river is calm ."},
    "preference": {"prompt": "Describe the weather.", "chosen": "calm", "rejected": "loud"},
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_lines(path: Path, lines: list[bytes | str | dict]) -> str:
    raw = [ln if isinstance(ln, bytes) else (json.dumps(ln) if isinstance(ln, dict) else ln).encode() for ln in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return str(path)


def msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


# Each bad row sits on line 3, after a good row and a blank line (blank lines are not rows but are counted).
BAD_ROWS = [
    # id, kind, config overrides, bad line, expected "field '...': reason" (or line-level reason)
    ("invalid_json", "prompt", {}, b'{"prompt": "a",', "invalid JSON: Expecting property name"),
    ("not_an_object", "prompt", {}, b'["a", "b"]', "expected a JSON object, got list"),
    ("invalid_utf8", "prompt", {}, b'{"prompt": "caf\xe9"}', "invalid UTF-8 at byte offset 15"),
    ("nul_byte", "prompt", {}, b'{"prompt": "a\x00b"}', "NUL byte in the line"),
    ("nul_escape", "prompt", {}, {"prompt": "a\u0000b"}, "field 'prompt': contains a NUL character"),
    ("nested_nul", "prompt", {}, {"prompt": "ok", "meta": {"src": "x\u0000"}}, "field 'meta.src': contains a NUL"),
    ("lone_surrogate", "prompt", {}, b'{"prompt": "a\\ud800"}', "field 'prompt': invalid UTF-8 (a lone surrogate"),
    ("missing_prompt", "prompt", {}, {"question": "Hi"}, "field 'prompt': missing"),
    ("prompt_not_str", "prompt", {}, {"prompt": ["Hi"]}, "field 'prompt': expected a string, got list"),
    ("empty_prompt", "prompt", {}, {"prompt": ""}, "field 'prompt': empty or whitespace-only"),
    ("blank_prompt", "prompt", {}, {"prompt": " \n\t "}, "field 'prompt': empty or whitespace-only"),
    ("unknown_role", "prompt", {}, {"messages": msgs(("user", "a"), ("bot", "b"))},
     "field 'messages[1].role': unknown role 'bot'"),
    ("prompt_ends_assistant", "prompt", {}, {"messages": msgs(("user", "a"), ("assistant", "b"))},
     "field 'messages[1].role': the last message is from 'assistant', expected 'user'"),
    ("message_no_content", "prompt", {}, {"messages": [{"role": "user"}]}, "field 'messages[0].content': missing"),
    ("messages_not_chat", "prompt", {"template": "plain"}, {"messages": msgs(("user", "a"))},
     "field 'messages': chat messages cannot be written with template 'plain'"),
    ("no_ground_truth", "prompt", {"require_answer": True}, {"prompt": "What is 2 + 2?"},
     "field 'answer': missing ground truth"),
    ("answer_wrong_type", "prompt", {}, {"prompt": "What is 2 + 2?", "answer": [4]},
     "field 'answer': expected a string or number, got list"),
    ("sft_empty_response", "sft", {}, {"prompt": "a", "response": "  "}, "field 'response': empty or whitespace-only"),
    ("sft_missing_response", "sft", {}, {"prompt": "a"}, "field 'response': missing"),
    ("sft_ends_user", "sft", {}, {"messages": msgs(("user", "a"))},
     "field 'messages[0].role': the last message is from 'user', expected 'assistant'"),
    ("sft_no_prompt_turn", "sft", {}, {"messages": msgs(("assistant", "a"))},
     "field 'messages': only an assistant turn, no prompt"),
    ("chosen_equals_rejected", "preference", {}, {"prompt": "a", "chosen": "same", "rejected": "same "},
     "field 'rejected': equal to 'chosen'"),
    ("missing_rejected", "preference", {}, {"prompt": "a", "chosen": "x"}, "field 'rejected': missing"),
    ("chosen_not_str", "preference", {}, {"prompt": "a", "chosen": 1, "rejected": "x"},
     "field 'chosen': expected a string, got int"),
]


@pytest.mark.parametrize("case, kind, overrides, bad, expected", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_names_file_line_and_field(tmp_path, tok, case, kind, overrides, bad, expected):
    path = write_lines(tmp_path / "data.jsonl", [GOOD[kind], "", bad, GOOD[kind]])
    with pytest.raises(DataError) as err:
        load_dataset(DatasetConfig(path=path, **overrides), kind, tok)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: {expected}"), msg
    assert "(fix: " in msg


def test_skip_counts_per_reason(tmp_path, tok):
    bad = [b"{oops", {"prompt": ""}, {"prompt": " "}, {"messages": msgs(("bot", "x"))}]
    path = write_lines(tmp_path / "d.jsonl", [GOOD["prompt"]] * 8 + bad)
    ds = load_dataset(DatasetConfig(path=path, on_error="skip", max_skip_fraction=0.5), "prompt", tok)
    assert len(ds) == 8
    assert ds.skipped == {"invalid_json": 1, "empty_text": 2, "unknown_role": 1}


def test_too_many_skipped_is_an_error_with_counts(tmp_path, tok):
    bad = [b"{oops", {"prompt": ""}, {"prompt": " "}]
    path = write_lines(tmp_path / "d.jsonl", [GOOD["prompt"]] * 7 + bad)
    cfg = DatasetConfig(path=path, on_error="skip", max_skip_fraction=0.3)
    assert len(load_dataset(cfg, "prompt", tok)) == 7  # 3 of 10 is exactly the allowed fraction
    cfg.max_skip_fraction = 0.2
    with pytest.raises(DataError, match=r"skipped 3 of 10 rows \(empty_text=2, invalid_json=1\), more than "
                                        r"max_skip_fraction=0.2; first: .*d.jsonl:8: invalid JSON"):
        load_dataset(cfg, "prompt", tok)


def test_every_row_bad_is_always_an_error(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": ""}, b"nope", {"x": 1}])
    cfg = DatasetConfig(path=path, on_error="skip", max_skip_fraction=1.0)
    with pytest.raises(DataError, match=r"every one of its 3 rows is bad .*first: .*d.jsonl:1: field 'prompt'"):
        load_dataset(cfg, "prompt", tok)


def test_empty_file_and_fewer_rows_than_a_batch(tmp_path, tok):
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_dataset(DatasetConfig(path=empty), "prompt", tok)
    path = write_lines(tmp_path / "d.jsonl", [GOOD["prompt"]] * 3)
    with pytest.raises(DataError, match=r"3 valid rows, fewer than one batch of 4 \(fix: "):
        load_dataset(DatasetConfig(path=path), "prompt", tok, min_rows=4)
    assert len(load_dataset(DatasetConfig(path=path), "prompt", tok, min_rows=3)) == 3


def test_prompt_exactly_at_limit_kept_one_over_rejected(tmp_path, tok):
    row = {"prompt": "Tell me about the city."}
    cfg = DatasetConfig(path=write_lines(tmp_path / "d.jsonl", [row] * 4), template="chat")
    n = len(encode_prompt(format_prompt(row, cfg, tok), tok))
    assert len(load_dataset(cfg, "prompt", tok, max_prompt_tokens=n)) == 4
    with pytest.raises(DataError, match=f"d.jsonl:1: field 'prompt': the formatted prompt has {n} tokens, over the "
                                        f"limit of {n - 1}"):
        load_dataset(cfg, "prompt", tok, max_prompt_tokens=n - 1)
    with pytest.raises(DataError, match=f"tokens, over the limit of {n - 1}"):
        tokenize_prompts([row], tok, cfg, max_prompt_tokens=n - 1)
    assert tokenize_prompts([row], tok, cfg, max_prompt_tokens=n) == [encode_prompt(format_prompt(row, cfg, tok), tok)]


def test_over_limit_rows_filtered_in_skip_mode(tmp_path, tok):
    short, long = {"prompt": "Hi."}, {"prompt": "Tell me about the city. " * 4}
    cfg = DatasetConfig(path=write_lines(tmp_path / "d.jsonl", [short] * 9 + [long]), on_error="skip")
    limit = len(encode_prompt(format_prompt(short, cfg, tok), tok))
    ds = load_dataset(cfg, "prompt", tok, max_prompt_tokens=limit)
    assert len(ds) == 9 and ds.skipped == {"prompt_too_long": 1}


def test_prompt_rows_keep_every_field(tmp_path, tok):
    rows = [{"prompt": f"What is {i} + 1?", "answer": i + 1, "id": f"q{i}"} for i in range(3)]
    cfg = DatasetConfig(path=write_lines(tmp_path / "d.jsonl", rows), require_answer=True)
    ds = load_dataset(cfg, "prompt", tok)
    assert ds.rows == rows
    assert ds.prompt_ids == tokenize_prompts(rows, tok, cfg)
    assert ds.prompts[0] == "<|im_start|>user\nWhat is 0 + 1?<|im_end|>\n<|im_start|>assistant\n"


def test_few_shot_from_the_dataset_itself(tmp_path, tok):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": 2 * i} for i in range(5)]
    cfg = DatasetConfig(path=write_lines(tmp_path / "d.jsonl", rows), template="few_shot", few_shot_k=2)
    a, b = load_dataset(cfg, "prompt", tok, seed=3), load_dataset(cfg, "prompt", tok, seed=3)
    assert a.prompts == b.prompts
    for row, text in zip(rows, a.prompts):
        assert text.count("Question:") == 3 and text.count(row["prompt"]) == 1
        assert text.endswith(f"Question: {row['prompt']}\nAnswer:")


def test_few_shot_pool_file_must_be_valid(tmp_path, tok):
    pool = write_lines(tmp_path / "pool.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "x"}])
    data = write_lines(tmp_path / "d.jsonl", [GOOD["prompt"]])
    cfg = DatasetConfig(path=data, template="few_shot", few_shot_k=1, few_shot_path=pool)
    with pytest.raises(DataError, match=r"pool.jsonl:2: field 'answer': missing ground truth"):
        load_dataset(cfg, "prompt", tok)


def test_chat_template_missing_is_one_clear_error(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD["prompt"]])
    with pytest.raises(DataError, match=r"d.jsonl: template 'chat' needs a tokenizer with a chat template.*\(fix: "):
        load_dataset(DatasetConfig(path=path), "prompt", make_tokenizer(chat_template=None))


@pytest.mark.parametrize(
    "path, expected",
    [
        ("", "dataset path is empty (fix: "),
        ("missing/data.jsonl", "missing/data.jsonl: no such file (fix: "),
        ("some-org/some-dataset", "some-org/some-dataset: not a local file"),
    ],
)
def test_unreadable_sources(tok, path, expected):
    with pytest.raises(DataError) as err:
        load_dataset(DatasetConfig(path=path), "prompt", tok)
    assert str(err.value).startswith(expected) and "(fix: " in str(err.value)


def test_parquet(tmp_path, tok):
    path = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match=r"reading Parquet needs pyarrow.*\(fix: `pip install pyarrow`"):
            load_dataset(DatasetConfig(path=str(path)), "prompt", tok)
        return
    pq.write_table(pa.Table.from_pylist([GOOD["prompt"], {"prompt": " ", "answer": "1"}]), path)
    with pytest.raises(DataError, match=r"d.parquet:row 1: field 'prompt': empty"):
        load_dataset(DatasetConfig(path=str(path)), "prompt", tok)


# ---------------------------------------------------------------- tokenization


def test_sft_loss_mask_covers_exactly_the_response(tok):
    rows = [
        {"prompt": "Describe the weather.", "response": "The river is calm ."},
        {"prompt": "Hi", "response": "warm and quiet and calm"},
    ]
    batch = tokenize_sft(rows, tok, max_len=64)
    N, L = batch["input_ids"].shape
    assert N == 2 and all(batch[k].shape == (N, L) for k in ("attention_mask", "loss_mask"))
    for i, row in enumerate(rows):
        prompt = encode_prompt(row["prompt"], tok)
        response = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(prompt) + len(response)
        assert batch["input_ids"][i, :n].tolist() == prompt + response
        assert batch["loss_mask"][i].tolist() == [0] * len(prompt) + [1] * len(response) + [0] * (L - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (L - n)
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()


def test_sft_truncates_the_response_and_refuses_a_prompt_with_no_room(tok):
    row = {"prompt": "Describe the weather.", "response": "The river is calm , warm and quiet ."}
    P = len(encode_prompt(row["prompt"], tok))
    batch = tokenize_sft([row], tok, max_len=P + 2)
    assert batch["input_ids"].shape == (1, P + 2) and batch["loss_mask"].sum() == 2
    with pytest.raises(DataError, match=f"row 0: field 'prompt': {P} tokens leave no room for a response"):
        tokenize_sft([row], tok, max_len=P)


def test_cut_responses_lists_exactly_the_rows_over_max_len(tok):
    short = {"prompt": "Hi", "response": "calm", "chosen": "calm", "rejected": "warm"}
    long = {"prompt": "Hi", "response": "calm " * 30, "chosen": "calm", "rejected": "warm " * 30}
    P = len(encode_prompt("Hi", tok))
    fits = P + len(tok("calm", add_special_tokens=False)["input_ids"]) + 1  # prompt + response + EOS
    assert cut_responses([short, long, short], tok, fits, ("response",)) == [1]
    assert cut_responses([long, short], tok, fits, ("chosen", "rejected")) == [0]  # either side counts
    assert cut_responses([short], tok, fits - 1, ("response",)) == [0]  # one token over is cut
    assert cut_responses([short, long], tok, 10_000, ("response",)) == []


def test_sft_rows_from_messages(tmp_path, tok):
    row = {"messages": msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "calm"))}
    ds = load_dataset(DatasetConfig(path=write_lines(tmp_path / "d.jsonl", [row])), "sft", tok)
    assert ds.rows == [{
        "prompt": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "response": "calm",
    }]
    batch = tokenize_sft(ds.rows, tok, max_len=128)
    target = batch["input_ids"][0][batch["loss_mask"][0].bool()].tolist()
    assert target == tok("calm", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_preference_batch(tmp_path, tok):
    rows = [{"prompt": "Describe the weather.", "chosen": "calm and warm", "rejected": "loud"},
            {"prompt": "Hi", "chosen": "quiet", "rejected": "dark , cold and broken"}]
    ds = load_dataset(DatasetConfig(path=write_lines(tmp_path / "d.jsonl", rows), template="plain"), "preference", tok)
    assert ds.rows == rows
    batch = tokenize_preferences(ds.rows, tok, max_len=64)
    shapes = {batch[k].shape for k in batch}
    assert len(shapes) == 1 and sorted(batch) == [
        "chosen_attention_mask", "chosen_input_ids", "rejected_attention_mask", "rejected_input_ids"]
    for i, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            ids = encode_prompt(row["prompt"], tok) + tok(row[side], add_special_tokens=False)["input_ids"]
            ids += [tok.eos_token_id]
            n = int(batch[f"{side}_attention_mask"][i].sum())
            assert batch[f"{side}_input_ids"][i, :n].tolist() == ids
            assert batch[f"{side}_attention_mask"][i, :n].all() and not batch[f"{side}_attention_mask"][i, n:].any()


# ---------------------------------------------------------------- sampling


@pytest.fixture
def prompts_ds(tmp_path, tok):
    rows = [{"prompt": f"Question {i}", "id": i} for i in range(10)]
    return load_dataset(DatasetConfig(path=write_lines(tmp_path / "d.jsonl", rows), template="plain"), "prompt", tok)


def test_sampler_is_deterministic_and_reshuffles_each_epoch(prompts_ds):
    a, b = PromptSampler(prompts_ds, 3, seed=1), PromptSampler(prompts_ds, 3, seed=1)
    batches = [a.next_indices() for _ in range(9)]
    assert batches == [b.next_indices() for _ in range(9)]
    epochs = [sum(batches[e * 3 : e * 3 + 3], []) for e in range(3)]  # 3 full batches of 3 per epoch of 10
    assert all(len(set(e)) == 9 for e in epochs)
    assert epochs[0] != epochs[1]
    assert [PromptSampler(prompts_ds, 3, seed=2).next_indices() for _ in range(3)] != batches[:3]
    rows, ids = PromptSampler(prompts_ds, 3, seed=1).next_batch()
    assert [r["id"] for r in rows] == batches[0] and ids == [prompts_ds.prompt_ids[i] for i in batches[0]]
    assert [r["prompt"] for r in rows] == [prompts_ds.prompts[i] for i in batches[0]]


@pytest.mark.parametrize("k", [0, 2, 3, 4, 6])  # 3 and 6 are epoch boundaries
def test_sampler_resume_equals_uninterrupted(tmp_path, prompts_ds, k):
    straight = PromptSampler(prompts_ds, 3, seed=5)
    expected = [straight.next_indices() for _ in range(k + 5)][k:]
    first = PromptSampler(prompts_ds, 3, seed=5)
    for _ in range(k):
        first.next_indices()
    torch.save(first.state_dict(), tmp_path / "s.pt")
    resumed = PromptSampler(prompts_ds, 3, seed=5)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert [resumed.next_indices() for _ in range(5)] == expected
    if k in (3, 6):  # saved at a boundary: the state already names the next epoch
        assert (first.epoch, first.position) == (k // 3, 0)


def test_sampler_refuses_a_state_from_another_setup(prompts_ds):
    state = PromptSampler(prompts_ds, 3, seed=5).state_dict()
    with pytest.raises(ValueError, match="state has batch_size=3 but this run has batch_size=2"):
        PromptSampler(prompts_ds, 2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=11 must be between 1 and the dataset's 10 rows"):
        PromptSampler(prompts_ds, 11)
