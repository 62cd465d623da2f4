"""Shared fixtures: one tiny model and one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import ray

from rlhf_ray.config import ClusterConfig
from rlhf_ray.ray_utils import init_ray
from rlhf_ray.recipes.tiny import make_tiny


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
