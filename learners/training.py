"""The optimizer-step loop shared by every learner update: minibatches, micro-batches, the guard.

Loss normalisation. An update's loss is the aggregate over a whole minibatch (e.g. the mean over
all its response tokens), whatever the number of ranks and micro-batches it is cut into. Micro-
batch i on some rank computes its own aggregate L_i over size s_i (tokens, or rows for the
sequence-mean modes) and back-propagates L_i * s_i / S, where S = sum of s_i over all micro-
batches of the minibatch on all ranks (one all-reduce before the first forward). The sum of these
over micro-batches and ranks is exactly the minibatch aggregate. DeepSpeed averages gradients over
ranks, so the backward loss is also multiplied by the world size, and `scale_wrt_gas=False` stops
it dividing by the accumulation steps. Per-micro-batch means, by contrast, would weight a token in
a short micro-batch more than one in a long one, and change with the number of ranks. A summed loss
(`algorithm.loss_agg=token_sum`, `summed=True`) has no normaliser: L_i is micro-batch i's own token
sum and is back-propagated as it is (times the world size), so the micro-batches and ranks add up
to the minibatch's token sum; s_i / S then only weights the stats.

The guard. Each minibatch is skipped on every rank, with the weights untouched, when (1) any
rank's share of the experience holds NaN/inf (found before any forward), or (2) any rank saw a
non-finite loss or a non-finite local gradient (hooks on the parameters) — one all-reduced flag
decides, and the step is vetoed inside the inner AdamW — or (3) DeepSpeed's own global gradient
norm is not finite (its ZeRO optimizers then drop the step themselves).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.distributed as dist

from rlhf_ray.algorithms import first_nonfinite
from rlhf_ray.config import LearnerConfig

from .batching import micro_batches, num_rows, select_rows
from .optim import VetoableAdamW, lr_multiplier

log = logging.getLogger(__name__)

Objective = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]
SizeFn = Callable[[dict[str, Any]], float]


def is_max(stat: str) -> bool:
    """Stats named *_max are maxima over micro-batches, ranks and minibatches; all others are averaged."""
    return stat.endswith("_max")


class StepLoop:
    """Runs optimizer steps of one DeepSpeed engine and keeps the step counters and lr schedule."""

    def __init__(self, engine: Any, adam: VetoableAdamW, cfg: LearnerConfig, lr: float, total_steps: int | None):
        self.engine, self.adam, self.cfg = engine, adam, cfg
        self.peak_lr, self.total_steps = lr, total_steps
        self.world_size = dist.get_world_size()
        self.device = engine.device
        self.optimizer_steps = 0  # applied steps; the lr schedule is a function of this count
        self.skipped_steps = 0
        self.last_lr = self.lr  # the rate of the last step taken, for logging
        self._grad_nonfinite = torch.zeros((), device=self.device)
        for p in engine.module.parameters():
            if p.requires_grad:
                p.register_hook(self._check_grad)

    def _check_grad(self, grad: torch.Tensor) -> None:
        self._grad_nonfinite += (~torch.isfinite(grad)).any()

    @property
    def lr(self) -> float:
        cfg = self.cfg
        return self.peak_lr * lr_multiplier(self.optimizer_steps, cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio)

    def _all_reduce(self, values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def run(
        self,
        batch: dict[str, Any],
        rows_per_minibatch: int,
        objective: Objective,
        size: SizeFn,
        guarded: tuple[str, ...] = (),
        summed: bool = False,
    ) -> dict[str, float]:
        """One optimizer step per `rows_per_minibatch` rows of this rank's `batch`, in order.

        Every rank must call this with the same number of rows. objective(model, micro) gives a
        micro-batch's (loss, stats); size(micro) the tokens or rows its loss averages over.
        `guarded` names the fields checked for NaN/inf before a minibatch is used. `summed`: the
        objective's loss is a sum over its micro-batch, added up unscaled (size then weights only the stats).
        Returns the stats averaged (`is_max`: maximised) over applied steps, as `train/<name>`, plus train/grad_norm
        (before clipping), train/lr (of the last applied step) and train/skipped_steps (a count).
        """
        totals: dict[str, float] = {}
        applied = skipped = 0
        grad_norm = 0.0
        n = num_rows(batch)
        for start in range(0, n, rows_per_minibatch):
            minibatch = select_rows(batch, slice(start, start + rows_per_minibatch))
            stats = self._minibatch(minibatch, objective, size, guarded, summed)
            if stats is None:
                skipped += 1
                continue
            applied += 1
            grad_norm += stats.pop("grad_norm")
            for k, v in stats.items():
                totals[k] = max(totals.get(k, v), v) if is_max(k) else totals.get(k, 0.0) + v
        self.skipped_steps += skipped
        metrics = {f"train/{k}": v if is_max(k) else v / max(applied, 1) for k, v in totals.items()}
        metrics["train/grad_norm"] = grad_norm / applied if applied else float("nan")
        metrics["train/lr"] = self.last_lr
        metrics["train/skipped_steps"] = float(skipped)
        return metrics

    def _minibatch(
        self, minibatch: dict[str, Any], objective: Objective, size: SizeFn, guarded: tuple[str, ...], summed: bool
    ) -> dict[str, float] | None:
        """Forward, backward and step on one minibatch; None when the step was skipped."""
        micros = micro_batches(minibatch, self.cfg.micro_batch_size)
        sizes = [size(m) for m in micros]
        bad_input = first_nonfinite({k: minibatch[k] for k in guarded if minibatch.get(k) is not None})
        total_size, bad_ranks = self._all_reduce([sum(sizes), float(bad_input is not None)])
        if bad_ranks:
            log.warning("skipping a step: non-finite experience on %d rank(s)%s",
                        int(bad_ranks), f" ({bad_input})" if bad_input else "")
            return None

        self.engine.train()
        self._grad_nonfinite.zero_()
        bad_loss = 0.0
        weighted: dict[str, float] = {}
        for i, (micro, s) in enumerate(zip(micros, sizes)):
            weight = s / max(total_size, 1.0)
            self.engine.set_gradient_accumulation_boundary(i == len(micros) - 1)
            # Through the engine's forward: DeepSpeed counts micro-steps there, and ZeRO-3 would
            # otherwise overwrite rather than accumulate the gradients of earlier micro-batches.
            loss, stats = objective(self.engine, micro)
            bad_loss += float(not torch.isfinite(loss.detach()))
            loss_scale = 1.0 if summed else weight
            self.engine.backward(loss * (loss_scale * self.world_size), scale_wrt_gas=False)
            for k, v in stats.items():
                weighted[k] = max(weighted.get(k, v), v) if is_max(k) else weighted.get(k, 0.0) + v * weight
        return self._step(bad_loss + float(self._grad_nonfinite), weighted)

    def _step(self, local_bad: float, weighted: dict[str, float]) -> dict[str, float] | None:
        """All-reduce the guard flag and the stats, then step (or veto) on every rank."""
        names = sorted(k for k in weighted if not is_max(k))
        maxima = sorted(k for k in weighted if is_max(k))
        reduced = self._all_reduce([local_bad] + [weighted[k] for k in names])
        reduced_max = self._all_reduce([weighted[k] for k in maxima], dist.ReduceOp.MAX) if maxima else []
        stage0_norm = self._stage0_grad_norm()
        veto = reduced[0] > 0 or (stage0_norm is not None and not math.isfinite(stage0_norm))
        lr = self.lr
        for group in self.adam.param_groups:
            group["lr"] = lr
        self.adam.veto = veto
        try:
            self.engine.step()
        finally:
            self.adam.veto = False
        norm = stage0_norm if stage0_norm is not None else self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        if veto or not math.isfinite(norm):
            log.warning("skipping a step: non-finite loss or gradient (grad norm %s)", norm)
            return None
        self.optimizer_steps += 1
        self.last_lr = lr
        return dict(zip(names, reduced[1:]), **dict(zip(maxima, reduced_max)), grad_norm=norm)

    def _stage0_grad_norm(self) -> float | None:
        """Global gradient norm without ZeRO in fp32, where DeepSpeed clips but does not report it.

        The gradients are already all-reduced at the boundary, so every rank gets the same value.
        """
        if self.engine.zero_optimization_stage() > 0 or self.engine.bfloat16_enabled():
            return None
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def prime(self, dummy_loss: Callable[[], torch.Tensor]) -> None:
        """A vetoed step on zero gradients before any real one: DeepSpeed links its views on the
        optimizer state at the first step, and checkpoints need them from step 0 on."""
        self.engine.train()
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.backward(dummy_loss() * 0.0, scale_wrt_gas=False)
        self.adam.veto = True
        try:
            self.engine.step()
        finally:
            self.adam.veto = False
