"""Data as users have it: Parquet, `datasets` save_to_disk folders (one dataset or a DatasetDict), hub subsets.

Nothing is downloaded: every source is written by the test itself.
"""

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prompts import make_tokenizer

from rlhf_ray.config import DatasetConfig
from rlhf_ray.data import DataError, load_dataset

GSM8K_ROW = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                         "May. How many clips did Natalia sell altogether in April and May?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                       "altogether in April and May.\n#### 72"}
CHAT_ROW = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "answer": "1"}
SYSTEM_HI = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_parquet_gsm8k_rows_keep_the_solution(tmp_path, tok):
    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist([GSM8K_ROW, GSM8K_ROW | {"question": "Two?"}]), path)
    ds = load_dataset(DatasetConfig(path=str(path), prompt_field="question", template="plain", require_answer=True),
                      "prompt", tok)
    assert len(ds) == 2 and ds.rows[0] == GSM8K_ROW and ds.prompts[1] == "Two?"


def test_parquet_chat_messages_keep_the_system_turn(tmp_path, tok):
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT_ROW]), path)
    ds = load_dataset(DatasetConfig(path=str(path)), "prompt", tok)
    assert ds.prompts == [SYSTEM_HI] and ds.rows[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_save_to_disk_dataset(tmp_path, tok):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([GSM8K_ROW, CHAT_ROW | {"question": None}]).save_to_disk(str(folder))
    cfg = DatasetConfig(path=str(folder), prompt_field="question", template="plain", on_error="skip",
                        max_skip_fraction=0.5)
    ds = load_dataset(cfg, "prompt", tok)
    assert [r["answer"] for r in ds.rows] == [GSM8K_ROW["answer"]] and ds.skipped == {"missing_field": 1}


def test_save_to_disk_dataset_dict_reads_the_split(tmp_path, tok):
    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([GSM8K_ROW]),
        "test": datasets.Dataset.from_list([GSM8K_ROW | {"question": "Held out?"}]),
    }).save_to_disk(str(folder))
    cfg = DatasetConfig(path=str(folder), prompt_field="question", template="plain", split="test")
    assert load_dataset(cfg, "prompt", tok).prompts == ["Held out?"]
    with pytest.raises(DataError, match=r"split 'validation' not in this DatasetDict \(it has \['test', 'train'\]\)"
                                        r" \(fix: set `split`"):
        load_dataset(cfg.model_copy(update={"split": "validation"}), "prompt", tok)


def test_a_plain_folder_is_named_as_such(tmp_path, tok):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"a folder, but not one written by `datasets` save_to_disk .*\(fix: "):
        load_dataset(DatasetConfig(path=str(tmp_path)), "prompt", tok)


def test_hub_name_offline_names_subset_and_split(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = DatasetConfig(path="no-such-org/no-such-gsm8k", subset="main", split="test")
    with pytest.raises(DataError, match=r"^no-such-org/no-such-gsm8k: not a local file and could not be loaded as a "
                                        r"hub dataset \(subset 'main', split 'test'\).*\(fix: check the name, "):
        load_dataset(cfg, "prompt", tok)


def test_parquet_with_both_columns_reads_null_messages_as_absent(tmp_path, tok):
    # A Parquet file (or a datasets table) has one schema: rows without chat turns get messages = null.
    path = tmp_path / "mixed.parquet"
    table = pa.Table.from_pylist([CHAT_ROW | {"prompt": None}, {"prompt": "Hi", "messages": None, "answer": "2"}])
    pq.write_table(table, path)
    ds = load_dataset(DatasetConfig(path=str(path)), "prompt", tok)
    assert ds.prompts == [SYSTEM_HI, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
