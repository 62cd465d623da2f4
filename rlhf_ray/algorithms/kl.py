"""Per-token KL estimators and controllers for the KL penalty coefficient."""

from typing import Literal

import torch

from ._checks import _check_same_shape

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi.

    Estimators from Schulman, "Approximating KL Divergence" (2020).

    logp: [B, T] log-probabilities of the sampled tokens under pi, nats.
    ref_logp: [B, T] log-probabilities of the same tokens under the reference policy, nats.
    estimator: "k1" = log r, unbiased, high variance, can be negative;
        "k2" = (log r)^2 / 2, biased, low variance;
        "k3" = 1/r - 1 + log r, unbiased, low variance, always >= 0;
        where log r = logp - ref_logp.
    Returns [B, T] in nats per token. Padding positions are not masked; mask downstream.
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # exp(-x) - 1 + x, with expm1 to keep precision when pi and ref are close.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}, expected 'k1', 'k2' or 'k3'")


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

    init_coef: starting KL coefficient. target: desired KL per sequence, nats.
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
