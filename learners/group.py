"""The driver-facing learner: N DeepSpeed ranks (Ray actors) in one placement group, used as one.

Every call takes the global batch, gives each rank an equal share of its rows, calls all ranks
at once and gathers the answers with a timeout that names the rank that failed or hung.

    policy = LearnerGroup("policy", "ckpt/sft", cfg.learner, cfg.model, cfg.algorithm, total_steps=100)
    old_logp = policy.compute_logprobs(batch)                 # [N, R]
    metrics = policy.ppo_update(experience)                   # {"train/policy_loss": ..., ...}
    weights = policy.export_weights()                         # [(hf_name, tensor), ...]
"""

from __future__ import annotations

import time
from typing import Any, Callable

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.algorithms import sft_loss
from rlhf_ray.config import AlgorithmConfig, LearnerConfig, ModelConfig
from rlhf_ray.protocol import LAYOUT_FIELDS
from rlhf_ray.protocol import Experience, missing_experience_fields
from rlhf_ray.protocol import TensorBatch as Batch
from rlhf_ray.hardware import compute_runtime_env
from rlhf_ray.ray_utils import ActorCallError, LearnerRankError, get_with_timeout
from rlhf_ray.sizing import learner_rank_request, optimizer_steps, ray_options

from .batching import check_batch, num_rows, pad_rows, rank_rows, select_rows, split_rows
from .models import ROLES, Role
from .objectives import sft_targets
from .worker import LearnerSpec, LearnerWorker

SHUTDOWN_WAIT_S = 10.0
PROBE_WAIT_S = 5.0  # a rank stuck in a collective does not answer; only an answered death counts
RM_PAIR = ("chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask")


class LearnerGroup:
    """`learner_cfg.num_ranks` LearnerWorker actors training one model of `role` together.

    role: "policy" (causal LM), "critic" (token values) or "reward" (sequence score).
    model_path: HF folder to start from (a critic may start from a causal-LM folder: new head).
    total_steps: optimizer steps over which the lr decays (cosine, after warm-up); None keeps
    the peak lr after warm-up.
    hold_reference: a policy group whose ranks also hold the frozen initial policy and compute the
    reference log-probs (`start_ref_logprobs`), in place of a ReferenceActor (reference.placement=learner).
    """

    def __init__(
        self,
        role: Role,
        model_path: str,
        learner_cfg: LearnerConfig,
        model_cfg: ModelConfig,
        algo_cfg: AlgorithmConfig | None = None,
        total_steps: int | None = None,
        placement: PlacementGroup | None = None,
        hold_reference: bool = False,
    ):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if hold_reference and role != "policy":
            raise ValueError(f"only a policy learner group can hold the reference, not a {role} group")
        if model_cfg.dtype == "float16":
            raise ValueError("learners train in float32 or bfloat16 (fp16 would need loss scaling); "
                             "set model.dtype=bfloat16 instead of float16")
        self.role, self.cfg = role, learner_cfg
        self.algo = algo_cfg or AlgorithmConfig()
        self.num_updates = 0  # seeds the minibatch shuffle of each update
        n, cfg = learner_cfg.num_ranks, learner_cfg
        bundle = learner_rank_request(cfg)  # as `rlhf-ray plan` shows it
        # `placement`: a group the caller owns, one bundle per rank that a colocated rollout actor shares.
        self._owns_placement = placement is None
        self.placement_group = placement or placement_group([bundle] * n, strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=cfg.call_timeout_s)
        if not ready:
            self._remove_placement()
            raise ActorCallError(
                f"{role} learner group: {n} bundles of {bundle} could not be placed within "
                f"{cfg.call_timeout_s:.0f}s; the cluster has {ray.available_resources()} available"
            )
        # nice 0 and a dense-compute OpenMP policy (rlhf_ray/hardware.py)
        actor_cls = ray.remote(**ray_options(bundle), runtime_env=compute_runtime_env())(LearnerWorker)
        self.names = [f"{role}-learner-{i}" for i in range(n)]
        self.node_ips: dict[str, str] = {}  # each rank's node address, known once setup has answered
        self.workers = [
            actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i)).remote(
                LearnerSpec(i, n, role, model_path, learner_cfg, model_cfg, self.algo, total_steps, hold_reference)
            )
            for i in range(n)
        ]
        try:
            address, port = self._each("rendezvous", [()], "rendezvous")[0]
            self.info = self._each("setup", [(address, port)] * n, "setup")[0]
            self.node_ips = {name: w["node_ip"] for name, w in self.where().items()}  # to name a lost rank's node
        except BaseException:
            self._release()
            raise

    @property
    def num_ranks(self) -> int:
        return len(self.workers)

    # ------------------------------------------------------------------ fan-out

    def _each(self, method: str, args: list[tuple], what: str | None = None) -> list[Any]:
        """Call `method` on every rank with its own arguments; answers in rank order.

        Raises as soon as any rank fails: the others are then stuck in a collective, and waiting
        for them would only turn a clear error into a timeout. When a rank has died the error is a
        `LearnerRankError` naming it (the run can resume from its last checkpoint).
        """
        return self._start(method, args, what)()

    def _start(self, method: str, args: list[tuple], what: str | None = None) -> Callable[[], list[Any]]:
        """`_each`, submitted now; the returned function waits for the answers (same timeout and errors)."""
        what = f"{self.role} learner {what or method}"
        refs = [getattr(w, method).remote(*a) for w, a in zip(self.workers, args)]

        def wait() -> list[Any]:
            try:
                return self._gather(refs, what)
            except Exception as err:
                dead = self.dead_ranks()
                if not dead:
                    raise
                nodes = {name: self.node_ips[name] for name in dead if name in self.node_ips}
                lost = "; ".join(f"{name} was on node {nodes.get(name, '(unknown)')}" for name in dead)
                if isinstance(err, ActorCallError) and all(f"{name} died" in str(err) for name in dead):
                    raise LearnerRankError(f"{err}; {lost}", dead, dead, nodes) from err
                message = f"{what} failed: {', '.join(dead)} died; then: {err}; {lost}"
                raise LearnerRankError(message, dead, dead, nodes) from err

        return wait

    def _gather(self, refs: list[ray.ObjectRef], what: str) -> list[Any]:
        results: dict[int, Any] = {}
        pending, deadline = list(refs), time.monotonic() + self.cfg.call_timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            i = refs.index(ready[0])
            results[i] = get_with_timeout(ready, [self.names[i]], what, 0)[0]
        if pending:
            late = [i for i, r in enumerate(refs) if i not in results]
            get_with_timeout([refs[i] for i in late], [self.names[i] for i in late], what, 0)
        return [results[i] for i in range(len(refs))]

    def dead_ranks(self) -> list[str]:
        """Names of the ranks whose actor has died (a rank busy in a collective is not counted)."""
        probes = [w.where.remote() for w in self.workers]
        ray.wait(probes, num_returns=len(probes), timeout=PROBE_WAIT_S)
        dead = []
        for name, probe in zip(self.names, probes):
            try:
                ray.get(probe, timeout=0)
            except ray.exceptions.RayActorError:
                dead.append(name)
            except Exception:  # no answer yet, or a timeout: alive as far as we can tell
                pass
        return dead

    def where(self) -> dict[str, dict[str, str]]:
        """Each rank's Ray node: {rank name: {"node_id", "node_ip"}}."""
        return dict(zip(self.names, self._all("where")))

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._each(method, [args] * self.num_ranks)

    def _forward(self, method: str, batch: Batch, *args: Any) -> torch.Tensor:
        """Rows padded to a multiple of the ranks, sharded, run, concatenated and unpadded."""
        return self._start_forward(method, batch, *args)()

    def _start_forward(self, method: str, batch: Batch, *args: Any) -> Callable[[], torch.Tensor]:
        padded, n = pad_rows(batch, self.num_ranks)
        wait = self._start(method, [(shard, *args) for shard in split_rows(padded, self.num_ranks)])
        return lambda: torch.cat(wait())[:n]

    def _train(self, method: str, batch: Batch, *args: Any) -> dict[str, float]:
        """Each rank's rows of every shuffled minibatch of every epoch, then one call per rank."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.num_updates)
        rows = rank_rows(num_rows(batch), self.cfg.minibatch_size, self.num_ranks, self.cfg.ppo_epochs, generator)
        self.num_updates += 1
        return self._agreed(self._each(method, [(select_rows(batch, r), *args) for r in rows]))

    def _agreed(self, per_rank: list[dict[str, float]]) -> dict[str, float]:
        """Rank 0's metrics, after checking that every rank took and skipped the same steps."""
        skipped = [m["train/skipped_steps"] for m in per_rank]
        if len(set(skipped)) > 1:
            raise RuntimeError(f"{self.role} learner ranks disagree on skipped steps: {skipped}")
        return per_rank[0]

    def _require(self, role: Role, method: str) -> None:
        if self.role != role:
            raise ValueError(f"{method} needs a {role} learner group; this group's role is {self.role}")

    # ------------------------------------------------------------------ forward-only

    def compute_logprobs(self, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
        """log softmax(logits / temperature) of the sampled response tokens: [N, R] fp32 nats, 0 on padding."""
        self._require("policy", "compute_logprobs")
        check_batch(batch, LAYOUT_FIELDS)
        return self._forward("forward_logprobs", batch, temperature)

    def start_ref_logprobs(self, batch: Batch, temperature: float = 1.0) -> Callable[[], torch.Tensor]:
        """The reference's log softmax(logits / temperature) of the sampled response tokens, computed by the
        ranks that hold it (`hold_reference`): submitted now, the returned function waits for the answer,
        [N, R] fp32 nats, 0 on padding."""
        self._require("policy", "start_ref_logprobs")
        check_batch(batch, LAYOUT_FIELDS)
        return self._start_forward("forward_ref_logprobs", batch, temperature)

    def compute_values(self, batch: Batch) -> torch.Tensor:
        """Critic value of the state before each response token: [N, R] fp32, 0 on padding."""
        self._require("critic", "compute_values")
        check_batch(batch, LAYOUT_FIELDS)
        return self._forward("forward_values", batch)

    def compute_rewards(self, batch: Batch) -> torch.Tensor:
        """Reward-model score at each row's last real token: [N] fp32 (batch: input_ids, attention_mask)."""
        self._require("reward", "compute_rewards")
        check_batch(batch, ("input_ids", "attention_mask"))
        return self._forward("forward_rewards", batch)

    def sft_eval_loss(self, batch: Batch) -> float:
        """Held-out SFT loss without a step: nats per token marked by loss_mask (input_ids, attention_mask, loss_mask [N, L])."""
        self._require("policy", "sft_eval_loss")
        check_batch(batch, ("input_ids", "attention_mask", "loss_mask"))
        logp = self._forward("forward_target_logprobs", batch)
        return float(sft_loss(logp, sft_targets(batch)))

    # ------------------------------------------------------------------ updates

    def ppo_update(self, experience: Experience, temperature: float = 1.0) -> dict[str, float]:
        """algo.ppo_epochs x (N / minibatch_size) policy steps on the experience.

        experience: a `protocol.Experience` (kl_coef weighs KL(pi || ref) in the loss; rollout_logprobs
        give the truncated importance weight when algo.tis_cap is set). `temperature` must be the one
        the old log-probs were computed at. With old_logprobs None the update must be one optimizer
        step (ppo_epochs 1, minibatch_size N): its own log-probs, detached, are the old ones, and it
        also returns train/logprob_diff_mean (nats/token) and train/logprob_diff_max (nats),
        |learner - vLLM| on the sampled tokens.
        Returns train/policy_loss, clipfrac, approx_kl (nats/token), entropy (nats/token),
        kl_loss (nats), grad_norm (before clipping), lr, skipped_steps.
        """
        self._require("policy", "ppo_update")
        missing = missing_experience_fields(experience)
        if missing:
            raise ValueError(
                f"experience is missing {missing}; it has {sorted(experience)}. Build it with "
                "rlhf_ray.experience.make_experience (old_logprobs may be None, but must be given)"
            )
        check_batch(experience)
        steps = optimizer_steps(num_rows(experience), self.cfg.minibatch_size, self.cfg.ppo_epochs)
        if experience["old_logprobs"] is None and steps != 1:
            raise ValueError(
                f"ppo_update without old_logprobs takes the policy's own log-probs as the old ones, which is exact "
                f"only for one optimizer step, but learner.ppo_epochs={self.cfg.ppo_epochs} × {num_rows(experience)} "
                f"rows / learner.minibatch_size={self.cfg.minibatch_size} = {steps} steps; pass old_logprobs "
                "(LearnerGroup.compute_logprobs) or set algorithm.old_logprobs=recompute"
            )
        return self._train("ppo_update", experience, temperature)

    def value_update(self, experience: Batch) -> dict[str, float]:
        """Critic steps on the experience (returns, old_values [N, R]), same minibatches as ppo_update.

        Returns train/value_loss, value_clipfrac, values_mean, grad_norm, lr, skipped_steps.
        """
        self._require("critic", "value_update")
        check_batch(experience, LAYOUT_FIELDS + ("returns", "old_values"))
        return self._train("value_update", experience)

    def sft_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on input_ids, attention_mask, loss_mask [N, L] (1 on tokens to predict).

        Returns train/sft_loss (nats per predicted token), grad_norm, lr, skipped_steps.
        """
        self._require("policy", "sft_step")
        check_batch(batch, ("input_ids", "attention_mask", "loss_mask"))
        if batch["loss_mask"].shape != batch["input_ids"].shape:
            raise ValueError(f"loss_mask has shape {tuple(batch['loss_mask'].shape)} "
                             f"but input_ids has {tuple(batch['input_ids'].shape)}")
        return self._agreed(self._each("sft_step", [(s,) for s in split_rows(batch, self.num_ranks)]))

    def rm_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step of the Bradley-Terry loss on (chosen_*, rejected_*) input_ids/attention_mask pairs.

        Returns train/rm_loss, rm_accuracy (fraction with chosen > rejected), rm_margin (mean
        chosen - rejected), rm_chosen_mean, grad_norm, lr, skipped_steps.
        """
        self._require("reward", "rm_step")
        missing = [k for k in RM_PAIR if k not in batch]
        if missing:
            raise ValueError(f"rm_step batch is missing {missing}; it has {sorted(batch)}")
        for side in ("chosen", "rejected"):
            check_batch({"input_ids": batch[f"{side}_input_ids"], "attention_mask": batch[f"{side}_attention_mask"]})
        if batch["chosen_input_ids"].shape[0] != batch["rejected_input_ids"].shape[0]:
            raise ValueError(f"chosen_input_ids has {batch['chosen_input_ids'].shape[0]} rows "
                             f"but rejected_input_ids has {batch['rejected_input_ids'].shape[0]}")
        return self._agreed(self._each("rm_step", [(s,) for s in split_rows(batch, self.num_ranks)]))

    # ------------------------------------------------------------------ weights and state

    def export_weights(self, bucket_bytes: int = 2**28) -> list[tuple[str, torch.Tensor]]:
        """Every HF-named full parameter, on CPU, from rank 0 (all ranks take part in the gather)."""
        return self._all("export_weights", bucket_bytes)[0]

    def param_checksums(self) -> list[dict[str, float]]:
        """Per rank, the float64 sum of each full parameter as that rank sees it."""
        return self._all("param_checksums")

    def save(self, path: str) -> None:
        """An HF model folder at `path` plus optimizer, schedule and RNG state (see learners/checkpoint.py)."""
        self._all("save", path, {"num_updates": self.num_updates})

    def load(self, path: str) -> None:
        """Restore what `save` wrote (the number of ranks and the ZeRO stage may differ)."""
        self.num_updates = int(self._all("load", path)[0].get("num_updates", 0))

    def shutdown(self) -> None:
        """Leave the process group, end the actors and free the placement group.

        Waits only briefly for the ranks to leave: after a failed call some may be stuck in a
        collective, and killing the actor frees its resources either way.
        """
        ray.wait([w.shutdown.remote() for w in self.workers], num_returns=self.num_ranks, timeout=SHUTDOWN_WAIT_S)
        self._release()

    def _release(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self._remove_placement()

    def _remove_placement(self) -> None:
        if self._owns_placement:
            remove_placement_group(self.placement_group)

    def __enter__(self) -> "LearnerGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
