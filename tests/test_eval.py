"""`rlhf-ray eval`: chat template by default on chat models, per-template results kept, samples written."""

import json

import pytest
from test_prompts import make_tokenizer

from rlhf_ray.cli import main
from rlhf_ray.config import ConfigError
from rlhf_ray.driver.evaluate import ALL_TEMPLATES, TEXT_TEMPLATES, default_templates, parse_templates


def test_template_choice():
    assert default_templates(make_tokenizer()) == ALL_TEMPLATES == ("chat", "zero_shot", "few_shot", "cot")
    tok = make_tokenizer()
    tok.chat_template = None
    assert default_templates(tok) == TEXT_TEMPLATES
    assert parse_templates(" chat, cot") == ("chat", "cot")
    with pytest.raises(ConfigError, match=r"unknown template\(s\) \['socratic'\] \(fix: a comma-separated list"):
        parse_templates("chat,socratic")


def test_eval_keeps_each_template_and_writes_samples(tiny_model_dir, ray_cluster, tmp_path, capsys):
    rows = [{"prompt": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in ((1, 2), (3, 4), (2, 2))]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res" / "eval.json"
    code = main(["eval", f"model.policy_path={tiny_model_dir / 'policy'}", "model.max_model_len=256",
                 f"data.eval.path={data}", "data.eval.few_shot_k=5",  # 3 rows cannot give 5 shots: few_shot fails
                 "reward.use_model=false", "reward.functions=[{path: 'rlhf_ray.rewards:last_number_answer'}]",
                 "rollout.kv_cache_space_gib=0.25", "rollout.sampling.max_new_tokens=4",
                 "--templates", "chat,few_shot,zero_shot", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert list(results) == ["chat", "few_shot", "zero_shot"]
    assert "few_shot_k=5 but the pool has only 2 other solved examples" in results["few_shot"]["error"]
    for t in ("chat", "zero_shot"):
        assert results[t]["eval/num_prompts"] == 3.0 and 0.0 <= results[t]["eval/reward_mean"] <= 1.0
    samples = [json.loads(line) for line in (out.parent / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["template"] for s in samples] == ["chat"] * 3 + ["zero_shot"] * 3
    assert samples[0]["prompt"].startswith("<|im_start|>user\nWhat is 1 plus 2?")
    # zero-shot on a chat model: the Question/Answer text is the user turn of the chat template
    assert samples[3]["prompt"].startswith("<|im_start|>user\nQuestion: What is 1 plus 2?\nAnswer:<|im_end|>")
    assert all(s["scores"] in (0.0, 1.0) and "rlhf_ray.rewards:last_number_answer" in s for s in samples)
    printed = capsys.readouterr().out
    assert "eval chat: reward" in printed and "eval few_shot: skipped" in printed and f"samples: {out.parent}" in printed
