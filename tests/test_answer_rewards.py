"""Answer-extraction rewards on rows written exactly as GSM8K has them (a solution ending in '#### N')."""

import pytest

from rlhf_ray.rewards import (
    RewardFunctionError,
    boxed_answer,
    call_rule,
    extract_boxed,
    extract_gsm8k,
    extract_last_number,
    gsm8k_answer,
    last_number_answer,
    load_reward_fn,
    math_answer,
    normalize_number,
)

# Two rows as they appear in openai/gsm8k ("main" subset, train split): the answer is a worked solution
# with calculator annotations <<...>>, its last line '#### N'.
GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
        "friends in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
        "$<<0.2*50=10>>10.\n#### 10",
    },
]


@pytest.mark.parametrize(
    "text, expected",
    [("72", "72"), ("72.0", "72"), ("$1,234.50", "1234.5"), ("-3", "-3"), (" 10. ", "10"), ("x+1", "x+1")],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_extractors_by_hand():
    assert extract_gsm8k("so 24 + 48 = 72\n#### 72") == "72"
    assert extract_gsm8k("#### 5 then #### 1,000") == "1000"  # the last marker wins
    assert extract_gsm8k("the answer is 72") is None
    assert extract_boxed(r"thus \boxed{72}.") == "72"
    assert extract_boxed(r"\boxed{1} or rather \boxed{\frac{1}{2}}") == r"\frac{1}{2}"  # nested braces
    assert extract_boxed(r"\boxed{7") is None  # cut off
    assert extract_last_number("48 + 24 = 72 clips, $10.00 total") == "10"
    assert extract_last_number("no digits") is None


@pytest.mark.parametrize(
    "response, gsm8k, boxed, last, math",
    [
        ("She sold 24 in May, 48 + 24 = 72 in all.\n#### 72", 1.0, 0.0, 1.0, 1.0),
        (r"48 + 24 = 72, so the answer is \boxed{72}.", 0.0, 1.0, 1.0, 1.0),
        ("The answer is 72 clips, counted over 2 months.", 0.0, 0.0, 0.0, 0.0),  # last number is 2
        ("72 is a guess; #### 71", 0.0, 0.0, 0.0, 0.0),
        ("", 0.0, 0.0, 0.0, 0.0),
    ],
)
def test_rewards_on_a_gsm8k_row(response, gsm8k, boxed, last, math):
    row = GSM8K_ROWS[0]
    assert gsm8k_answer(row["question"], response, row) == gsm8k
    assert boxed_answer(row["question"], response, row) == boxed
    assert last_number_answer(row["question"], response, row) == last
    assert math_answer(row["question"], response, row) == math


def test_dollar_amounts_and_plain_number_truth():
    row = GSM8K_ROWS[1]
    assert gsm8k_answer(row["question"], "0.2 x 50 = $10\n#### $10.00", row) == 1.0
    assert last_number_answer("q", "She earned 10", {"answer": 10}) == 1.0  # a bare number as the truth
    assert boxed_answer("q", r"\boxed{-4}", {"answer": "-4"}) == 1.0


@pytest.mark.parametrize("fn", [gsm8k_answer, boxed_answer, last_number_answer, math_answer])
@pytest.mark.parametrize("row", [{"question": "q"}, {"answer": None}, {"answer": "  "}])
def test_missing_ground_truth_is_a_named_error(fn, row):
    with pytest.raises(RewardFunctionError, match=rf"{fn.__name__} needs the ground truth in field 'answer'.*fix"):
        fn("q", "#### 1", row)


def test_loaded_by_dotted_path_and_scored_as_the_actor_does():
    path = "rlhf_ray.rewards:gsm8k_answer"
    fn = load_reward_fn(path)
    responses = ["#### 72", "#### 10", "#### 11", "no marker"]
    rows = [GSM8K_ROWS[0], GSM8K_ROWS[1], GSM8K_ROWS[1], {"question": "no answer field"}]
    out = call_rule(fn, path, [r["question"] for r in rows], responses, rows, retries=0)
    assert out.scores == [1.0, 1.0, 0.0, 0.0]
    assert out.valid == [True, True, True, False]
    assert "needs the ground truth" in out.errors[0]


def test_gsm8k_recipe_asks_for_the_format_its_reward_reads():
    from test_prompts import make_tokenizer

    from rlhf_ray.config import load_config
    from rlhf_ray.prompts import format_prompt

    cfg = load_config("configs/qwen2.5-1.5b-grpo.yaml", [])
    ds = cfg.data.prompts
    assert (ds.path, ds.subset, ds.split, ds.prompt_field, ds.template) == ("openai/gsm8k", "main", "train", "question", "chat")
    [fn_cfg] = cfg.reward.functions
    fn = load_reward_fn(fn_cfg.path)
    row = GSM8K_ROWS[0]
    prompt = format_prompt(row, ds, make_tokenizer())
    assert "#### <number>" in prompt and row["question"] in prompt  # the system turn names the marker
    follows_the_instruction = "In May she sold 48/2 = 24.\nIn all 48 + 24 = 72.\n#### 72"
    assert fn(prompt, follows_the_instruction, row) == 1.0
    assert fn(prompt, follows_the_instruction.replace("72", "71"), row) == 0.0
