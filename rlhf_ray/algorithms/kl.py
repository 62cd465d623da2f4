"""Per-token KL estimators and controllers for the KL penalty coefficient."""

from typing import Literal

import torch

from ._checks import _check_same_shape

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: KLEstimator,
    log_ratio_clamp: float | None = None,
    value_clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi.

    Estimators from Schulman, "Approximating KL Divergence" (2020).

    logp: [B, T] log-probabilities of the sampled tokens under pi, nats.
    ref_logp: [B, T] log-probabilities of the same tokens under the reference policy, nats.
    estimator: "k1" = log r, unbiased, high variance, can be negative;
        "k2" = (log r)^2 / 2, biased, low variance;
        "k3" = 1/r - 1 + log r, unbiased, low variance, always >= 0;
        where log r = logp - ref_logp.
    log_ratio_clamp: bound on |log r| before the estimator (k3's exp(-log r) overflows fp32 below -88).
    value_clamp: bound on |estimate| (peers clamp k3 at 10: beyond it the gradient 1 - exp(-log r)
        explodes; the clamped entries get no gradient).
    Returns [B, T] in nats per token. Padding positions are not masked; mask downstream (or pass
    log-probs that are 0 there, as the learner does).
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    log_ratio = logp - ref_logp
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio**2
    elif estimator == "k3":
        # exp(-x) - 1 + x, with expm1 to keep precision when pi and ref are close.
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}, expected 'k1', 'k2' or 'k3'")
    return kl if value_clamp is None else kl.clamp(-value_clamp, value_clamp)


class FixedKLController:
    """KL coefficient that never changes."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so both controllers share one interface."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards a target (Ziegler et al. 2019).

    init_coef: starting KL coefficient. target: desired KL per sequence, nats (the sum over a
    response's tokens, as the driver feeds it: `kl/mean`; not the per-token mean `kl/per_token`).
    horizon: number of samples over which the coefficient may change by about e^0.2.
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target=}, {horizon=}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after observing current_kl (nats) over n_steps samples."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
