"""The benchmark's rule reward, shared by rlhf_ray and the TRL baseline (plain Python, no imports)."""


def letter_fraction(prompt: str, response: str, row: dict) -> float:
    """Fraction of the response's characters that are letters, in [0, 1].

    Cheap, and it differs between the samples of a group, so GRPO's advantages are not all zero.
    """
    return sum(c.isalpha() for c in response) / len(response) if response else 0.0
