"""Rule-based rewards: dotted-path loading, guards against bad returns, retries, normalisation."""

import math
import random
import re

import pytest
import torch

from actors.reward_actor import RewardActor
from rlhf_ray.config import ModelConfig, RewardConfig, RewardFunctionConfig
from rlhf_ray.rewards import RewardFunctionError, RewardNormalizer, call_rule, exact_answer, load_reward_fn
from rlhf_ray.recipes.synthetic import edited_answer, hidden_rule, hidden_score, label_pairs, win_rate


@pytest.mark.parametrize(
    "path, message",
    [
        ("os.system", "not a dotted path of the form 'package.module:function'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("reward_fns:missing", "module 'reward_fns' has no function 'missing'"),
    ],
)
def test_load_errors_name_the_path(path, message):
    with pytest.raises(RewardFunctionError, match=message):
        load_reward_fn(path)


def test_exception_rows_are_masked_and_named():
    fn = load_reward_fn("reward_fns:raises_on_odd")
    rows = [{"i": i} for i in range(4)]
    out = call_rule(fn, "reward_fns:raises_on_odd", ["p"] * 4, ["r"] * 4, rows, retries=1)
    assert out.valid == [True, False, True, False]
    assert out.scores == [1.0, 0.0, 1.0, 0.0]
    assert "reward_fns:raises_on_odd' raised KeyError" in out.errors[0] and "row 1" in out.errors[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), None, 1e30, "0.5", [1.0], True])
def test_bad_return_values_are_masked(value):
    out = call_rule(load_reward_fn("reward_fns:returns_bad"), "reward_fns:returns_bad", ["p"], ["r"], [{"value": value}], 0)
    assert out.valid == [False] and out.scores == [0.0]
    assert "reward_fns:returns_bad" in out.errors[0] and "row 0" in out.errors[0]
    assert all(math.isfinite(s) for s in out.scores)


def test_retry_recovers_a_flaky_function():
    out = call_rule(load_reward_fn("reward_fns:flaky_once"), "f", ["p"] * 2, ["r"] * 2, [{"i": 10}, {"i": 11}], retries=1)
    assert out.valid == [True, True] and out.scores == [2.0, 2.0]


def test_builtin_rules():
    assert exact_answer("What is 3 plus 4?", " 7 because", {"answer": "7"}) == 1.0
    assert exact_answer("What is 3 plus 4?", "8", {"answer": "7"}) == 0.0
    assert hidden_rule("Describe the river.", "The river is calm , quiet and old .", {}) == 2.0
    assert hidden_score("Describe the river.", "The river is dark , dark and old .") == -3.0  # -2 disliked, -1 repeat
    assert hidden_score("Describe the river.", "The city is calm , quiet and old .") == -3.0  # wrong subject


def test_noisy_labels_and_win_rate():
    pairs = [("Describe the river.", "The river is calm , calm and new .", "The river is dark , cold and new .")] * 200
    rows = label_pairs(pairs, noise=0.1, seed=0)
    flipped = sum(r["chosen"].startswith("The river is dark") for r in rows) / len(rows)
    assert 0.05 < flipped < 0.16
    assert win_rate(["Describe the river."], ["The river is calm , quiet and new ."], ["The river is old , new and large ."]) == 1.0


def test_normalizer_matches_batch_statistics():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = RewardNormalizer(True)(x)
    assert torch.allclose(out, (x - x.mean()) / x.std(), atol=1e-5)
    assert torch.equal(RewardNormalizer(False)(x), x)


def test_normalizer_leaves_masked_rows_out_of_its_statistics():
    x = torch.tensor([1.0, 2.0, 0.0, 3.0, 4.0])
    valid = torch.tensor([True, True, False, True, True])
    norm = RewardNormalizer(True)
    out = norm(x, valid)
    kept = x[valid]
    assert norm.count == 4 and abs(norm.mean - 2.5) < 1e-12
    assert torch.allclose(out[valid], (kept - kept.mean()) / kept.std(), atol=1e-5)


def _rule_actor(*functions: tuple[str, float], clip: float | None = None) -> RewardActor:
    """A reward actor with rule functions only (no reward model, so no vLLM), called in-process."""
    cfg = RewardConfig(use_model=False, retries=0, clip=clip,
                       functions=[RewardFunctionConfig(path=p, weight=w) for p, w in functions])
    return RewardActor(ModelConfig(), cfg)


def test_actor_masks_only_the_failed_rows_of_a_batch():
    actor = _rule_actor(("reward_fns:raises_on_odd", 2.0), ("reward_fns:constant", 1.0), clip=3.0)
    out = actor.score([[1]] * 4, ["p"] * 4, ["r"] * 4, [{"i": i} for i in range(4)])
    assert out["valid"].tolist() == [True, False, True, False]
    assert out["scores"].tolist() == [3.0, 0.0, 3.0, 0.0]  # 2*1 + 1.5 clipped to 3; failed rows carry no reward
    assert out["reward_fns:constant"].tolist() == [1.5] * 4
    assert out["reward_fns:raises_on_odd"].tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("value", [float("nan"), "0.5", None])
def test_actor_stops_when_a_function_fails_on_every_row(value):
    actor = _rule_actor(("reward_fns:constant", 1.0), ("reward_fns:returns_bad", 1.0))
    with pytest.raises(RewardFunctionError, match=r"every one of the 3 rows.*'reward_fns:returns_bad' returned .* row 0"):
        actor.score([[1]] * 3, ["p"] * 3, ["r"] * 3, [{"value": value}] * 3)


def test_actor_names_the_function_that_raised():
    actor = _rule_actor(("reward_fns:raises_on_odd", 1.0))
    with pytest.raises(RewardFunctionError, match=r"'reward_fns:raises_on_odd' raised KeyError: 'boom' on row 0"):
        actor.score([[1]], ["p"], ["r"], [{"i": 1}])


def test_edited_answers_change_one_judged_behaviour():
    rng = random.Random(0)
    answer = "The river is calm , dark and old ."
    kinds = set()
    for _ in range(60):
        edit = edited_answer(answer, rng)
        thing, *qualities = re.match(r"^The (\w+) is (\w+) , (\w+) and (\w+) \.$", edit).groups()
        changed = (thing != "river") + sum(a != b for a, b in zip(qualities, ["calm", "dark", "old"]))
        assert changed <= 1, edit
        kinds.add("subject" if thing != "river" else "repeat" if len(set(qualities)) < 3 else "quality")
    assert kinds == {"subject", "repeat", "quality"}
    assert edited_answer("The river calm .", rng) is None
