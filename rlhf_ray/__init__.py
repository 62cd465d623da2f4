"""rlhf_ray: distributed actor-learner RLHF on Ray, vLLM and DeepSpeed.

The core package (config schema, algorithms, data, prompts, protocol types,
weight-sync helpers, tracking, checkpointing) imports neither `actors` nor
`learners`; only the driver side (`rlhf_ray.driver`, `rlhf_ray.recipes`,
`rlhf_ray.bench`) and the CLI do. `tests/test_layers.py` checks it.
"""

__version__ = "0.1.0"
