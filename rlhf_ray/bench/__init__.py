"""`rlhf-ray bench`: fixed workloads that measure rlhf_ray against its own parts and against TRL.

Every figure is a ratio of two things measured side by side in the same run (the machine may be
shared, so absolute speeds drift; ratios of neighbouring measurements much less), reported as the
median of the repeats with their min and max, the warm-up discarded:

    e2e_vs_trl          GRPO samples/s and tokens/s: rlhf_ray's driver ÷ TRL's GRPOTrainer
    rollout_efficiency  tokens/s through the rollout pool ÷ the same vLLM engine called directly
    weight_sync         bytes/s of a WeightBroadcaster broadcast ÷ a raw gloo broadcast of the same bytes
    rollout_scaling     tokens/s with 2 rollout actors ÷ 1 actor
    async_overlap       step time in async mode ÷ synchronous step time
    overhead            1 − (sum of stage times) ÷ step time, with the per-stage breakdown

`bench_main` (in `rlhf_ray.bench.main`) runs them and writes results.json, results.md and
results.png. This package's `__init__` and `reward` import nothing heavy: the TRL baseline runs
them under a second interpreter that has TRL but not vLLM.
"""
