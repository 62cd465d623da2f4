"""Ray actors of the rollout side: vLLM rollout actors and their pool, reward actors, the reference actor.

Each actor is a plain class that its creator wraps with `ray.remote`; this package imports only the
`rlhf_ray` core, never `learners`.
"""
