"""Data that flows between the phases of an RL step, each the value one phase returns and the
next one takes (nothing downstream rewrites what an earlier phase produced):

    collector          -> Rollout       completions, rewards, prompt inputs   framework/rollout/collector.py
    Algorithm.prepare  -> Prepared      shaped rewards, advantages, beta_i,   algorithms/base.py
                                        the loss mask, metrics
    log-prob phases    -> tensors       reference / rollout-policy log-probs, framework/module.py
                                        truncated-IS weights
    TrainBatch.assemble -> TrainBatch   all of it, complete: what the update  framework/update.py
                                        and Algorithm.loss take

Shapes: N = number of completions in the batch (num_prompts * G), T = padded completion
length, P = padded prompt length. The G completions of one prompt are contiguous and share
a ``group_ids`` value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

# per-sample fields that are not tensors: sliced by ``select`` like the tensors
_LIST_FIELDS = ("texts", "records")
# prompt inputs that hold image rows, not sample rows (sliced through ``images_per_sample``)
_IMAGE_KEYS = ("pixel_values", "image_grid_thw")


@dataclass(frozen=True)
class Rollout:
    """What the collector returns: the sampled completions of one RL step and their rewards."""

    completion_ids: torch.Tensor  # [N, T] long, right padded
    completion_mask: torch.Tensor  # [N, T] float, 1 on tokens that count (incl. EOS)
    group_ids: torch.Tensor  # [N] long, sample i belongs to group group_ids[i]
    rewards: torch.Tensor  # [N] float, weighted sum of reward plugins
    correct: torch.Tensor  # [N] float in {0,1}, from the correctness reward only
    truncated: torch.Tensor  # [N] bool, hit max_new_tokens without EOS
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]
    logp_sampler: torch.Tensor | None = None  # [N, T] log-probs reported by the engine (None: it reports none)
    # the model inputs of each sample's prompt: input_ids / attention_mask / mm_token_type_ids
    # [N, P] (left padded) and the image rows pixel_values / image_grid_thw of its images
    prompt_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    images_per_sample: list[int] = field(default_factory=list)  # [N] images of each sample's prompt
    texts: list[str] = field(default_factory=list)  # [N] decoded completions
    records: list[dict] = field(default_factory=list)  # [N] the data record of each sample's prompt
    extras: dict[str, Any] = field(default_factory=dict)  # anything a plugin adds (not sliced)

    @property
    def lengths(self) -> torch.Tensor:
        """|o_i|: counted completion tokens per sample, [N] float."""
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return int(self.group_ids.shape[0])

    def select(self, idx: torch.Tensor | list[int]) -> Rollout:
        """Rows ``idx`` of every per-sample field, prompt inputs and image rows included
        (``extras`` are kept as they are)."""
        return _select(self, idx)

    def to(self, device, *, prompt_inputs: bool = True) -> Rollout:
        """Every tensor on ``device`` (the prompt inputs too unless ``prompt_inputs=False``)."""
        return _to(self, device, prompt_inputs)

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        """One rollout of several (e.g. the kept groups of DAPO refill rounds): completions
        right-padded to the longest, prompts left-padded to the longest, image rows
        concatenated in sample order, groups renumbered 0, 1, ... in order of appearance.
        Per-sample fields of the parts must be filled alike (all or none)."""
        if not parts:
            raise ValueError("Rollout.concat needs at least one rollout")
        T = max(p.completion_ids.shape[1] for p in parts)
        out: dict[str, Any] = {}
        for f in fields(Rollout):
            vals = [getattr(p, f.name) for p in parts]
            first = vals[0]
            if f.name == "group_ids":
                out[f.name] = _renumber_groups(vals)
            elif isinstance(first, torch.Tensor):
                out[f.name] = torch.cat([F.pad(v, (0, T - v.shape[1])) if v.dim() == 2 else v for v in vals])
            elif f.name == "reward_components":
                out[f.name] = {k: torch.cat([v[k] for v in vals]) for k in first}
            elif f.name == "prompt_inputs":
                out[f.name] = _concat_prompt_inputs(vals) if first else {}
            elif f.name in (*_LIST_FIELDS, "images_per_sample"):
                out[f.name] = [x for v in vals for x in v]
            elif f.name == "extras":
                out[f.name] = dict(first)
            else:  # an optional tensor field that is None
                out[f.name] = None
        return Rollout(**out)


@dataclass(frozen=True)
class Prepared:
    """What ``Algorithm.prepare`` returns for one rollout: everything the loss needs from the
    algorithm, decided once per RL step (a value: the rollout it came from is not changed).

    rewards [N]: the rewards after ``shape_rewards`` (what the advantages came from; logged);
    advantages [N]; kl_coef [N]: the per-sample KL weight beta_i = schedule(step) * shaping_i;
    loss_mask [N, T] float: the tokens that count in the loss (``Algorithm.loss_mask``: the
    completion mask, truncated completions zeroed when ``mask_truncated_completions``);
    metrics: the logged values of the preparation (``advantages/*``, ``beta``, ``stcr/*``, ...).
    """

    rewards: torch.Tensor
    advantages: torch.Tensor
    kl_coef: torch.Tensor
    loss_mask: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainBatch:
    """One typed training batch: what the update phase and ``Algorithm.loss`` take, complete.

    Every tensor is set; where a phase did not run, :meth:`assemble` fills the neutral value and
    a flag decided when the run was built says so: ``logp_ref`` is zeros when the algorithm has
    no KL term (``Algorithm.needs_reference`` False: the loss leaves the term out statically),
    ``logp_old`` is zeros when ``off_policy`` is False (one on-policy update per rollout: the
    loss takes ``logp.detach()``, rho = 1), ``tis_weights`` is ones without the truncated-IS
    correction (``rollout.tis_cap``).

    completion_mask [N, T] float is the loss mask (``Prepared.loss_mask``); the log-prob passes
    take it as the completions' attention mask too.
    """

    completion_ids: torch.Tensor  # [N, T] long
    completion_mask: torch.Tensor  # [N, T] float, the loss mask
    group_ids: torch.Tensor  # [N] long
    advantages: torch.Tensor  # [N]
    kl_coef: torch.Tensor  # [N] beta_i
    logp_old: torch.Tensor  # [N, T] rollout policy's log-probs (zeros unless off_policy)
    logp_ref: torch.Tensor  # [N, T] reference log-probs (zeros without a KL term)
    tis_weights: torch.Tensor  # [N, T] truncated-IS weights sampler -> trainer (ones without)
    prompt_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    images_per_sample: list[int] = field(default_factory=list)
    off_policy: bool = False  # several optimizer steps per rollout: the ratio is against logp_old

    @staticmethod
    def assemble(
        rollout: Rollout,
        prepared: Prepared,
        *,
        logp_ref: torch.Tensor | None = None,
        logp_old: torch.Tensor | None = None,
        tis_weights: torch.Tensor | None = None,
        off_policy: bool = False,
    ) -> TrainBatch:
        """The batch of ``rollout`` as ``prepared`` says to train on it, with the log-prob
        phases' tensors (None: that phase did not run; zeros, or ones for ``tis_weights``)."""
        mask = prepared.loss_mask
        if off_policy and logp_old is None:
            raise ValueError("an off-policy batch needs the rollout policy's log-probs (logp_old)")
        return TrainBatch(
            completion_ids=rollout.completion_ids,
            completion_mask=mask,
            group_ids=rollout.group_ids,
            advantages=prepared.advantages,
            kl_coef=prepared.kl_coef,
            logp_old=torch.zeros_like(mask) if logp_old is None else logp_old,
            logp_ref=torch.zeros_like(mask) if logp_ref is None else logp_ref,
            tis_weights=torch.ones_like(mask) if tis_weights is None else tis_weights,
            prompt_inputs=rollout.prompt_inputs,
            images_per_sample=rollout.images_per_sample,
            off_policy=off_policy,
        )

    @property
    def lengths(self) -> torch.Tensor:
        """Counted tokens per sample (the loss mask's), [N] float."""
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return int(self.group_ids.shape[0])

    def select(self, idx: torch.Tensor | list[int]) -> TrainBatch:
        """Rows ``idx`` of every per-sample field, prompt inputs and image rows included."""
        return _select(self, idx)

    def to(self, device, *, prompt_inputs: bool = True) -> TrainBatch:
        """Every tensor on ``device`` (the prompt inputs too unless ``prompt_inputs=False``)."""
        return _to(self, device, prompt_inputs)


def _select(obj, idx):
    idx = torch.as_tensor(idx, dtype=torch.long)
    rows = idx.tolist()
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            out[f.name] = v[idx]
        elif f.name == "reward_components":
            out[f.name] = {k: t[idx] for k, t in v.items()}
        elif f.name in _LIST_FIELDS and v:
            out[f.name] = [v[i] for i in rows]
    if obj.prompt_inputs:
        from framework.rollout.inputs import select_inputs

        out["prompt_inputs"] = select_inputs(obj.prompt_inputs, rows, obj.images_per_sample)
        out["images_per_sample"] = [obj.images_per_sample[i] for i in rows]
    return replace(obj, **out)


def _to(obj, device, prompt_inputs: bool):
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            out[f.name] = v.to(device)
        elif f.name == "reward_components" or (f.name == "prompt_inputs" and prompt_inputs):
            out[f.name] = {k: t.to(device) for k, t in v.items()}
    return replace(obj, **out)


def _renumber_groups(group_ids: list[torch.Tensor]) -> torch.Tensor:
    out, base = [], 0
    for g in group_ids:
        _, inverse = torch.unique_consecutive(g, return_inverse=True)
        out.append(inverse + base)
        base += int(inverse.max()) + 1 if len(inverse) else 0
    return torch.cat(out)


def _concat_prompt_inputs(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    P = max(x["input_ids"].shape[1] for x in inputs)
    out = {}
    for k in inputs[0]:
        if k in _IMAGE_KEYS:
            out[k] = torch.cat([x[k] for x in inputs])
        else:  # left padding, as the processor pads prompts (the attention mask hides it)
            out[k] = torch.cat([F.pad(x[k], (P - x[k].shape[1], 0)) for x in inputs])
    return out


@dataclass
class LossNormalizer:
    """Global denominators of one optimisation (mini-)batch, so that summing the losses of
    its micro-batches (and ranks) gives exactly the loss of the whole batch.

    num_sequences: B, completions in the mini-batch (all ranks, all accumulation steps)
    num_tokens: sum of completion_mask over the mini-batch (all ranks, all accumulation steps)
    max_len: L_max for seq_mean_token_sum_norm (Dr. GRPO) = the generation budget max_new_tokens
    """

    num_sequences: float
    num_tokens: float
    max_len: float
