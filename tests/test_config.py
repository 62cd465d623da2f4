"""The typed config: YAML + dotted overrides, errors that name field, value and fix, redaction."""

from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import ConfigError, RunConfig, load_config, redact, save_resolved

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.cluster.host == "127.0.0.1"
    assert cfg.cluster.dashboard is False
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_overrides_apply_with_yaml_types():
    cfg = load_config(None, ["rollout.num_actors=2", "rollout.sampling.temperature=0.7", "rollout.sampling.stop=[a, b]"])
    assert cfg.rollout.num_actors == 2
    assert cfg.rollout.sampling.temperature == 0.7
    assert cfg.rollout.sampling.stop == ["a", "b"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.num_actor=2", "rollout.num_actor: unknown key; did you mean 'rollout.num_actors'?"),
        ("rollout.sampling.temprature=1", "did you mean 'rollout.sampling.temperature'?"),
        ("train.prompts_per_step=-4", "train.prompts_per_step: Input should be greater than or equal to 1 (got -4)"),
        ("learner.zero_stage=4", "learner.zero_stage: Input should be 'auto', 0, 1, 2 or 3 (got 4)"),
        ("reference.placement=gpu", "reference.placement: Input should be 'actor' or 'learner' (got 'gpu')"),
        ("rollout.num_actors=two", "rollout.num_actors: Input should be a valid integer"),
        ("algorithm.name=dpo", "algorithm.name: Input should be 'ppo', 'grpo', 'dr_grpo', 'dapo', 'gspo', 'rloo'"),
        ("tracking.resume=restart", "tracking.resume: Input should be 'rewind' or 'append' (got 'restart')"),
    ],
)
def test_bad_values_name_field_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_cross_field_batch_divisibility():
    with pytest.raises(ConfigError, match=r"learner.minibatch_size=6 must be divisible by learner.num_ranks"):
        load_config(None, ["learner.num_ranks=2", "learner.micro_batch_size=2", "learner.minibatch_size=6"])
    with pytest.raises(ConfigError, match=r"samples per step .* = 12 must be divisible by learner.minibatch_size=8"):
        load_config(None, ["train.prompts_per_step=12"])


ONE_STEP = ["algorithm.name=grpo", "algorithm.kl.placement=loss", "rollout.sampling.n=4", "train.prompts_per_step=4",
            "learner.minibatch_size=16", "learner.micro_batch_size=4", "learner.ppo_epochs=1"]


@pytest.mark.parametrize(
    "extra, skips",
    [
        ([], True),  # one optimizer step over a synchronous batch, KL in the loss
        (["learner.ppo_epochs=2"], False),
        (["learner.minibatch_size=8"], False),
        (["algorithm.kl.placement=reward"], False),  # the advantages need the learner's own log-probs
        (["train.async_mode=true"], False),  # samples from the previous policy
        (["algorithm.old_logprobs=recompute"], False),
        (["rollout.sampling.top_p=0.9"], False),  # vLLM's log-probs are then renormalised over the kept tokens
        (["rollout.sampling.top_k=20"], False),
    ],
)
def test_old_logprobs_are_skipped_only_for_one_on_policy_step(extra, skips):
    assert load_config(None, ONE_STEP + extra).skips_old_logprobs is skips


def test_group_algorithms_need_groups():
    with pytest.raises(ConfigError, match=r"algorithm.name=grpo needs rollout.sampling.n >= 2"):
        load_config(None, ["algorithm.name=grpo"])


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        load_config(None, ["rollout.num_actors"])


def test_secrets_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "planted-secret-value-42")
    data = {"tracking": {"project": "p-planted-secret-value-42"}, "x": {"hub_token": "abc123"}}
    out = redact(data)
    assert out["x"]["hub_token"] == "***"
    assert "planted-secret-value-42" not in str(out)
    cfg = load_config(None, ["tracking.project=run-planted-secret-value-42"])
    save_resolved(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "planted-secret-value-42" not in text
    assert yaml.safe_load(text)["rollout"]["num_actors"] == 1


def test_a_config_setting_that_overrides_the_algorithms_preset_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """configs/grpo-arithmetic.yaml sets GRPO's loss and KL coefficient; switched to DAPO by an override, those
    values still win (documented), and load_config says which preset settings they replace."""
    from rlhf_ray.config import load_config, preset_conflicts

    with caplog.at_level("WARNING", logger="rlhf_ray.config"):
        cfg = load_config("configs/grpo-arithmetic.yaml", ["algorithm.name=dapo"])
    assert cfg.algorithm.loss_agg == "seq_mean_token_mean" and cfg.algorithm.kl.coef == 0.01
    assert "algorithm.name=dapo implies algorithm.loss_agg=token_mean, but the config sets seq_mean_token_mean" in caplog.text
    assert "algorithm.name=dapo implies algorithm.kl.coef=0.0, but the config sets 0.01" in caplog.text
    assert preset_conflicts({"name": "grpo", "kl": {"estimator": "k3"}}) == []
    assert preset_conflicts({"name": "ppo"}) == []


def test_a_learner_held_reference_cannot_also_be_colocated() -> None:
    from rlhf_ray.config import ConfigError, load_config

    for overrides in (["reference.colocate=true"], ["reference.placement=learner", "reference.colocate=true"]):
        with pytest.raises(ConfigError, match=r"reference.placement=learner \(the default\) with reference.colocate=true"
                           r".*fix: set reference.placement=actor"):
            load_config(None, overrides)
    assert load_config(None, []).reference.placement == "learner"
    gpus = ["learner.num_gpus_per_rank=0.75", "reference.placement=actor", "reference.colocate=true"]
    assert load_config(None, gpus).reference.colocate
