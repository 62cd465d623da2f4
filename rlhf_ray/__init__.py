"""rlhf_ray: distributed actor-learner RLHF on Ray, vLLM and DeepSpeed.

The core package (config schema, algorithms, data, prompts, protocol types,
weight-sync helpers, tracking, checkpointing) imports neither `actors` nor
`learners`; only the driver (`rlhf_ray.driver`) and the CLI do.
"""

__version__ = "0.1.0"
