"""The driver side: it knows both the rollout actors and the learners, and nothing imports it but the CLI,
the recipes and the benchmark.

    loop.py         `train`: rollout -> reward -> reference -> advantages -> update -> broadcast,
                    read top to bottom
    components.py   building a run's actors and learners; saving and restoring its complete state
    recovery.py     live scaling of the rollout pool, actors lost during a broadcast, failure records
    broadcaster.py  the weight-sync group's life cycle and each broadcast, verified
    step_guard.py   masked bad rewards, skipped non-finite updates, the consecutive-skip stop
    stages.py       the supervised stages: pretraining, SFT, reward model
    evaluate.py     `rlhf-ray eval`: the chat template and zero/few-shot/CoT scored on held-out prompts
    plan.py         config -> Ray resource requests, placement, transport and batch arithmetic
    cluster_plan.py `rlhf-ray plan --cluster SPEC`: the plan on node pools from a file, no Ray needed
    memory_estimate.py  memory per GPU and step time from the model's shape (the arithmetic, stated)
    preflight.py    checks before anything heavy starts: versions, model folders, rewards, cluster
    launch.py       `rlhf-ray submit`: a run on a Ray cluster through the Jobs API
    supervisor.py   resuming from the last complete checkpoint when a learner rank dies
"""
