"""Shared fixtures: one tiny model and one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest
import ray

from rlhf_ray.config import ClusterConfig
from rlhf_ray.ray_utils import init_ray
from rlhf_ray.recipes.tiny import make_tiny

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
