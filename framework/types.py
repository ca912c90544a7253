"""Data that flows between rollout, rewards, algorithms and the update.

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


@dataclass
class Rollout:
    completion_ids: torch.Tensor  # [N, T] long, right padded
    completion_mask: torch.Tensor  # [N, T] float, 1 on tokens that count (incl. EOS)
    group_ids: torch.Tensor  # [N] long, sample i belongs to group group_ids[i]
    rewards: torch.Tensor  # [N] float, weighted sum of reward plugins
    correct: torch.Tensor  # [N] float in {0,1}, from the correctness reward only
    truncated: torch.Tensor  # [N] bool, hit max_new_tokens without EOS
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]
    logp_old: torch.Tensor | None = None  # [N, T] log-probs under the rollout policy
    logp_ref: torch.Tensor | None = None  # [N, T] log-probs under the frozen reference
    logp_sampler: torch.Tensor | None = None  # [N, T] log-probs reported by the engine
    advantages: torch.Tensor | None = None  # [N] set by Algorithm.prepare
    kl_coef: torch.Tensor | None = None  # [N] per-sample KL weight beta_i, set by prepare
    tis_weights: torch.Tensor | None = None  # [N, T] truncated IS weights sampler -> trainer (rollout.tis_cap)
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
        idx = torch.as_tensor(idx, dtype=torch.long)
        rows = idx.tolist()
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
            elif f.name == "reward_components":
                out[f.name] = {k: t[idx] for k, t in v.items()}
            elif f.name in _LIST_FIELDS and v:
                out[f.name] = [v[i] for i in rows]
        if self.prompt_inputs:
            from framework.rollout.inputs import select_inputs

            out["prompt_inputs"] = select_inputs(self.prompt_inputs, rows, self.images_per_sample)
            out["images_per_sample"] = [self.images_per_sample[i] for i in rows]
        return replace(self, **out)

    def to(self, device, *, prompt_inputs: bool = True) -> Rollout:
        """Every tensor on ``device`` (the prompt inputs too unless ``prompt_inputs=False``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v.to(device)
            elif f.name == "reward_components" or (f.name == "prompt_inputs" and prompt_inputs):
                out[f.name] = {k: t.to(device) for k, t in v.items()}
        return replace(self, **out)

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
