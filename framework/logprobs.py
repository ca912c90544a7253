"""Per-token log-probs (and entropies) of completion tokens, without materialising the
full-vocabulary float32 logits of the whole batch: the last hidden states of the completion
positions go through the LM head in chunks of ``chunk_size`` tokens, each chunk under
activation checkpointing, so at most one chunk of [chunk, vocab] fp32 logits is alive in
the forward and in the backward.

    logp[i, t] = log_softmax(lm_head(h[i, P-1+t]) / temperature)[completion_ids[i, t]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from framework.types import Rollout


def _chunk_logp_entropy(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.nn.functional.linear(h, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least; fp64 stays fp64
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logz
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)
    return logp, entropy


def completion_logprobs(
    model,
    inputs: dict,
    completion_len: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``inputs``: kwargs from :func:`framework.rollout.inputs.training_inputs` (prompt of length
    P + completion of length T = ``completion_len``). Returns logp [N, T] (fp32) and entropy [N, T].

    An FSDP-sharded model (framework/distributed.py) runs the same computation through its
    registered forward method, which gathers the root unit's parameters (LM head) around it."""
    fn = getattr(model, "apo_completion_logprobs", None)
    if fn is not None:
        return fn(inputs, completion_len, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
    return completion_logprobs_unsharded(
        model, inputs, completion_len, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy
    )


def completion_logprobs_unsharded(
    model,
    inputs: dict,
    completion_len: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
):
    from framework.rollout.inputs import share_image_features

    core = model.model
    head = model.get_output_embeddings()
    kw = share_image_features(model, dict(inputs))  # the vision tower once per distinct image
    kw["use_cache"] = False
    hidden = core(**kw).last_hidden_state  # [N, P+T, H]
    T = completion_len
    h = hidden[:, -T - 1 : -1]  # positions P-1 .. P+T-2 predict tokens 0..T-1
    labels = inputs["input_ids"][:, -T:]
    N = h.shape[0]
    h_flat, y_flat = h.reshape(N * T, -1), labels.reshape(N * T)
    outs_lp, outs_ent = [], []
    use_ckpt = torch.is_grad_enabled() and h.requires_grad
    for s in range(0, N * T, chunk_size):
        args = (h_flat[s : s + chunk_size], head.weight, head.bias, y_flat[s : s + chunk_size], temperature)
        if use_ckpt:
            lp, ent = checkpoint(_chunk_logp_entropy, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logp_entropy(*args)
        outs_lp.append(lp)
        outs_ent.append(ent.detach() if with_entropy else ent[:0])
    logp = torch.cat(outs_lp).view(N, T).clone()  # not a view: FSDP hooks the output for its backward
    ent = torch.cat(outs_ent).view(N, T) if with_entropy else None
    return logp, ent


@dataclass
class RolloutLogProbs:
    """Per-token log-probs of a rollout's completions under a model, through the one
    processing path the engines use (:func:`framework.rollout.inputs.training_inputs`)."""

    temperature: float  # the sampling temperature: log-probs of the distribution that sampled
    chunk_size: int  # tokens per LM-head chunk
    device: Any

    def __call__(self, model, mb: Rollout, with_entropy: bool = False):
        """logp [n, T] (and entropy [n, T] when asked) of micro-batch ``mb``, on the device."""
        from framework.rollout.inputs import training_inputs

        dev = self.device
        pin = {k: v.to(dev) for k, v in mb.prompt_inputs.items()}
        kw = training_inputs(pin, mb.completion_ids.to(dev), mb.completion_mask.to(dev), model)
        return completion_logprobs(
            model,
            kw,
            mb.completion_ids.shape[1],
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            with_entropy=with_entropy,
        )

    @torch.no_grad()
    def no_grad(self, model, rollout: Rollout, micro_batches) -> torch.Tensor:
        """[N, T] masked log-probs on the CPU, micro-batch by micro-batch (``micro_batches``:
        ``(rows, real)`` pairs; padding passes only join the collectives)."""
        out = torch.zeros_like(rollout.completion_mask)
        for rows, real in micro_batches:
            mb = rollout.select(rows)
            lp, _ = self(model, mb)
            if real:
                out[rows] = lp.float().cpu() * mb.completion_mask
        return out
