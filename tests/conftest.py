"""Shared fixtures: one tiny model and one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

# Nothing can be downloaded here: the hub is offline for every test and the processes they start. Set before
# transformers/huggingface_hub are imported, which read it once; otherwise each hub lookup waits out its retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import ray  # noqa: E402

from rlhf_ray.config import ClusterConfig  # noqa: E402
from rlhf_ray.ray_utils import init_ray  # noqa: E402
from rlhf_ray.recipes.tiny import make_tiny  # noqa: E402

if TYPE_CHECKING:
    from netns_cluster import NetnsCluster


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with `policy/` (Qwen2 causal LM) and `reward/` (one-label classifier), both with the tokenizer."""
    out = tmp_path_factory.mktemp("tiny")
    make_tiny(out, seed=0)
    return out


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray head with 8 logical CPUs on a 2-core machine: pools, learner ranks and helpers share the cores."""
    # Workers import the misbehaving reward functions of tests/reward_fns.py by dotted path.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    init_ray(ClusterConfig(num_cpus=8))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def netns_cluster() -> Iterator["NetnsCluster"]:
    """One Ray cluster across four network namespaces (tests/netns_cluster.py), shared by every multi-node test."""
    from netns_cluster import NetnsCluster, default_nodes, netns_unavailable

    why = netns_unavailable()
    if why:
        pytest.skip(f"no multi-node test bed: {why}")
    cluster = NetnsCluster(default_nodes())
    try:
        cluster.start()
        print(f"\nnetns test bed: {len(cluster.nodes)} nodes up in {cluster.start_s:.1f}s")
        yield cluster
    finally:
        print(f"\nnetns test bed torn down in {cluster.stop():.1f}s")


@pytest.fixture(scope="session")
def dapo_run_metrics(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> list[dict]:
    """metrics.jsonl rows of a 2-step DAPO run through the real pool (dynamic sampling, overlong shaping and
    filtering): half of every 4 prompts score the same on all samples (`reward_fns:brevity_on_odd_rows`).
    Shared by the dynamic-sampling test and the metric-table test, so the run happens once."""
    import json

    from rlhf_ray.config import load_config
    from rlhf_ray.driver.loop import train

    tmp = tmp_path_factory.mktemp("dapo")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe thing {i}.", "i": i}) + "\n" for i in range(64)))
    cfg = load_config(None, [
        f"model.policy_path={tiny_model_dir / 'policy'}", "model.max_model_len=64", "algorithm.name=dapo",
        "algorithm.dynamic_sampling_max_rounds=4", "algorithm.overlong_buffer=4", "algorithm.overlong_filter=true",
        "reward.use_model=false", "reward.functions=[{path: 'reward_fns:brevity_on_odd_rows'}]",
        f"data.prompts.path={prompts}", "data.prompts.template=chat", "data.shuffle=false",
        "rollout.kv_cache_space_gib=0.25", "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=12",
        "learner.micro_batch_size=16", "learner.minibatch_size=16",
        "train.steps=2", "train.prompts_per_step=4", f"train.output_dir={tmp}", "train.run_name=dapo",
        "tracking.backend=none", "cluster.num_cpus=8",
    ])
    train(cfg, tmp / "dapo")
    return [json.loads(line) for line in (tmp / "dapo" / "metrics.jsonl").read_text().splitlines()]
