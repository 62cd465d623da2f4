"""Ray actors of the rollout side: vLLM rollout actors and their pool, reward actors, the reference actor.

Each actor is a plain class that its creator wraps with `ray.remote`; this package imports only the
`rlhf_ray` core, never `learners`.
"""

from actors.reference_actor import ReferenceActor
from actors.reward_actor import RewardActor
from actors.rollout_actor import RolloutActor
from actors.rollout_pool import RolloutPool

__all__ = ["ReferenceActor", "RewardActor", "RolloutActor", "RolloutPool"]
