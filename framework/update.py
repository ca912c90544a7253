"""The update phase of an RL step: ``ppo_epochs`` x ``num_mini_batches`` optimizer steps over
one :class:`framework.types.TrainBatch`, each the sum of micro-batch backward passes.

    for each ppo epoch:
        split the groups into mini-batches            (a group's G samples stay together)
        for each mini-batch:
            global denominators of its loss            (GradientSync.normalizer)
            for each micro-batch: logp -> Algorithm.loss -> backward
            reduce gradients -> clip -> optimizer step -> LR schedule step

Nothing here knows the algorithm or the strategy: the loss is ``Algorithm.loss`` and the
gradient plumbing is a :class:`framework.distributed.GradientSync`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from framework.distributed import GradientSync, clip_grad_norm
from framework.errors import ConfigError, NonFiniteError
from framework.logprobs import RolloutLogProbs
from framework.types import LossNormalizer, TrainBatch

log = logging.getLogger(__name__)


@dataclass
class UpdateResult:
    """What the update did: the mean over its optimizer steps of each loss term, the gradient
    norm (before clipping) and the entropy; ``optimizer_steps`` made and how many of them were
    skipped for a non-finite value."""

    stats: dict[str, float] = field(default_factory=dict)
    optimizer_steps: int = 0
    skipped: int = 0


class PolicyUpdate:
    def __init__(
        self,
        policy: torch.nn.Module,
        algorithm,
        logprobs: RolloutLogProbs,
        sync: GradientSync,
        *,
        micro_batch_size: int,
        num_mini_batches: int,
        max_len: int,
        grad_clip: float | None,
        on_nonfinite: str = "error",
        backward: Callable[[torch.Tensor], None] | None = None,
    ):
        self.policy, self.algo, self.logprobs, self.sync = policy, algorithm, logprobs, sync
        self.micro_batch_size, self.num_mini_batches = micro_batch_size, num_mini_batches
        self.max_len, self.grad_clip, self.on_nonfinite = max_len, grad_clip, on_nonfinite
        # Lightning's manual_backward (precision plugin, strategy hooks); plain autograd elsewhere
        self.backward = backward or (lambda loss: loss.backward())

    def __call__(self, batch: TrainBatch, optimizer, scheduler, *, rl_step: int, optimizer_step: int) -> UpdateResult:
        """``optimizer_step``: the schedule clock at this RL step's first update
        (``RLModule.schedule_step``); the LR scheduler steps once per update."""
        res = UpdateResult()
        per_step: dict[str, list[float]] = defaultdict(list)
        for epoch in range(self.algo.ppo_epochs):
            for rows in self.mini_batches(batch, epoch):
                step = optimizer_step + res.optimizer_steps
                stats = self._mini_batch(batch.select(rows), optimizer, rl_step=rl_step, optimizer_step=step)
                if stats is not None:
                    gn = self._grad_norm_and_clip()
                    if math.isfinite(gn):
                        optimizer.step()
                        stats["grad_norm"] = gn
                        for k, v in stats.items():
                            per_step[k].append(v)
                    else:  # a finite loss can still give non-finite gradients (a too large lr)
                        self._nonfinite({"grad_norm": gn}, rl_step, step, what="gradient norm")
                        stats = None
                if stats is None:  # skipped: an optimizer step without gradients, so that the
                    # step counters (max_steps, LR and KL schedules) advance while the weights
                    # (and AdamW's state: parameters without a gradient are left alone) stay
                    optimizer.zero_grad(set_to_none=True)
                    optimizer.step()
                    res.skipped += 1
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                res.optimizer_steps += 1
        res.stats = {k: sum(v) / len(v) for k, v in per_step.items()}
        return res

    def mini_batches(self, batch: TrainBatch, epoch: int) -> list[list[int]]:
        """Row indices of exactly ``num_mini_batches`` mini-batches of whole groups, shuffled
        whenever the batch is split or reused (the first epoch of a single mini-batch keeps the
        rollout's order). Lightning's max_steps and the LR and KL schedules count on exactly
        that many optimizer steps per epoch, so an uneven split is an error, not fewer steps."""
        groups = batch.group_ids.unique()
        k = self.num_mini_batches
        if len(groups) % k:
            raise ConfigError(
                f"{len(groups)} groups on this rank do not split into trainer.num_mini_batches={k} equal "
                f"mini-batches: make the prompts per rank (trainer.prompts_per_step / number of ranks) "
                f"a multiple of {k}"
            )
        if k > 1 or epoch > 0:
            groups = groups[torch.randperm(len(groups))]
        return [
            torch.cat([torch.nonzero(batch.group_ids == g).flatten() for g in chunk]).tolist()
            for chunk in groups.chunk(k)
        ]

    def _mini_batch(self, sub: TrainBatch, optimizer, *, rl_step: int, optimizer_step: int) -> dict[str, float] | None:
        """Accumulate the gradient of one mini-batch's loss; its loss terms (this rank's share of
        the global sums), or None when a non-finite loss made every rank skip it."""
        norm = self.sync.normalizer(
            LossNormalizer(
                num_sequences=float(len(sub)),
                num_tokens=float(sub.completion_mask.sum().clamp(min=1)),
                max_len=float(self.max_len),
            )
        )
        acc: dict[str, float] = defaultdict(float)
        ent_sum = 0.0
        for rows, real in self.sync.micro_batches(len(sub), self.micro_batch_size):
            mb = sub.select(rows)
            logp, ent = self.logprobs(self.policy, mb, with_entropy=True)
            mb = mb.to(logp.device, prompt_inputs=False)
            loss, terms = self.algo.loss(logp, mb, norm)
            if self.sync.any_rank(real and not bool(torch.isfinite(loss))):
                self._nonfinite(terms, rl_step, optimizer_step)
                optimizer.zero_grad(set_to_none=True)  # drop what earlier micro-batches added
                return None
            if not real:  # a padding pass (FSDP): joins the collectives, adds nothing
                self.backward(loss * 0.0)
                continue
            with self.sync.no_sync():  # DDP: gradients are all-reduced once, before the step
                self.backward(loss * self.sync.grad_scale)
            acc["loss"] += float(loss.detach())
            for k, v in terms.items():
                acc[k] += float(v)
            ent_sum += float((ent * mb.completion_mask).sum())
        acc["entropy"] = ent_sum / norm.num_tokens  # this rank's share of the global token mean
        return dict(acc)

    def _nonfinite(self, terms: dict, rl_step: int, optimizer_step: int, what: str = "loss") -> None:
        names = [k for k, v in terms.items() if not torch.isfinite(torch.as_tensor(v)).all()] or ["loss"]
        msg = (
            f"non-finite {what} at RL step {rl_step} (optimizer step {optimizer_step}): "
            f"non-finite metric(s): {', '.join(names)}"
        )
        if self.on_nonfinite == "error":
            hint = " (the loss was finite: lower optim.lr or set optim.grad_clip)" if what != "loss" else ""
            raise NonFiniteError(msg + hint + ". Set trainer.on_nonfinite=skip to skip such steps.")
        log.warning("WARNING: %s; skipping this update (the weights are left as they were)", msg)

    def _grad_norm_and_clip(self) -> float:
        """Make the gradients global, then clip them; the global norm before clipping (NaN or
        inf when a gradient is not finite: then nothing is clipped and the step is not made)."""
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.sync.reduce(trainable)
        params = [p for p in trainable if p.grad is not None]
        gn = clip_grad_norm(params, self.grad_clip, finite_only=True)  # the global norm, also over FSDP shards
        return gn
