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
    from framework.types import Rollout, TrainBatch


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
    kw = share_image_features(model, dict(inputs))  # the vision tower once per distinct image
    kw["use_cache"] = False
    hidden = core(**kw).last_hidden_state  # [N, P+T, H]
    T = completion_len
    h = hidden[:, -T - 1 : -1]  # positions P-1 .. P+T-2 predict tokens 0..T-1
    return _head_logprobs(model, h, inputs["input_ids"][:, -T:], temperature, chunk_size, with_entropy)


def _head_logprobs(model, h, labels, temperature: float, chunk_size: int, with_entropy: bool):
    """The chunked LM head over hidden states ``h`` [N, T, H] that predict ``labels`` [N, T]."""
    head = model.get_output_embeddings()
    N, T = labels.shape
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


def prompt_runs(prompt_inputs: dict, images_per_sample: list[int]) -> list[int]:
    """Lengths of the runs of consecutive samples with the same prompt (token ids, padding and
    images, bit for bit): a rollout holds each prompt's G samples next to each other."""
    from framework.rollout.inputs import distinct_images

    ids, att = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]
    img: list[tuple[int, ...]] = [()] * ids.shape[0]
    if "image_grid_thw" in prompt_inputs:
        _, index = distinct_images(prompt_inputs)
        k = 0
        for i, c in enumerate(images_per_sample):
            img[i] = tuple(index[k : k + c])
            k += c
    same = ((ids[1:] == ids[:-1]).all(1) & (att[1:] == att[:-1]).all(1)).tolist()
    runs = [1]
    for i, s in enumerate(same, start=1):
        if s and img[i] == img[i - 1]:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def shared_prompt_logprobs(
    model,
    prompt_inputs: dict,
    images_per_sample: list[int],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    runs: list[int],
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
):
    """The log-probs of :func:`completion_logprobs` with each prompt run once for all its
    samples: the distinct prompts (``runs``: samples per prompt, in order) go through the model
    with a KV cache, which is repeated for their samples, and the completions run on top of it
    (positions continuing the prompt's, as :func:`framework.rollout.inputs.training_inputs`
    gives them). Under autograd the gradient of every sample flows back into the one prompt
    pass. The completions' padding gets other positions than in the full forward, which
    changes nothing counted: it is after the EOS and masked out of attention."""
    from framework.rollout.inputs import select_inputs, share_image_features

    core = model.model
    dev = completion_ids.device
    first = torch.tensor([0, *runs[:-1]], device=dev).cumsum(0).tolist()
    rows = torch.repeat_interleave(torch.arange(len(runs), device=dev), torch.tensor(runs, device=dev))
    u = select_inputs(prompt_inputs, first, images_per_sample)
    ids, att = u["input_ids"], u["attention_mask"]
    kw = {"input_ids": ids, "attention_mask": att, "use_cache": True}
    if "pixel_values" in u and "mm_token_type_ids" in u:
        pos, _ = core.get_rope_index(
            ids, u["mm_token_type_ids"], image_grid_thw=u["image_grid_thw"], attention_mask=att
        )
        kw.update(
            pixel_values=u["pixel_values"], image_grid_thw=u["image_grid_thw"], mm_token_type_ids=u["mm_token_type_ids"]
        )
        last = pos.amax(dim=(0, 2))
    else:
        pos = (att.long().cumsum(-1) - 1).clamp(min=0)
        last = pos.amax(dim=1)
    kw["position_ids"] = pos
    out = core(**share_image_features(model, kw))
    cache = out.past_key_values
    cache.batch_select_indices(rows)  # each prompt's keys and values for each of its samples
    T = completion_ids.shape[1]
    cpos = last[rows].unsqueeze(1) + 1 + torch.arange(T, device=dev)  # [N, T]
    if pos.dim() == 3:
        cpos = cpos.unsqueeze(0).expand(3, -1, -1)
    full_att = torch.cat([att[rows], completion_mask.to(att.dtype)], dim=1)
    comp = core(
        input_ids=completion_ids, attention_mask=full_att, position_ids=cpos, past_key_values=cache, use_cache=True
    ).last_hidden_state
    h = torch.cat([out.last_hidden_state[:, -1:][rows], comp[:, :-1]], dim=1)  # positions P-1 .. P+T-2
    return _head_logprobs(model, h, completion_ids, temperature, chunk_size, with_entropy)


def shares_prompts(model) -> bool:
    """Whether :func:`shared_prompt_logprobs` serves ``model``: a Qwen2 / Qwen2-VL / Qwen2.5-VL
    model on one process (an FSDP-sharded model keeps one forward per pass), without
    gradient checkpointing (which turns the KV cache off)."""
    from framework.distributed import is_sharded

    mt = getattr(getattr(model, "config", None), "model_type", None)
    return (
        SHARE_PROMPTS
        and mt in ("qwen2", "qwen2_vl", "qwen2_5_vl")
        and not getattr(model, "is_gradient_checkpointing", False)
        and not is_sharded(model)
        and hasattr(model, "model")
    )


SHARE_PROMPTS = True  # False: one full forward per sample (the plain path; for comparisons)


@dataclass
class RolloutLogProbs:
    """Per-token log-probs of a rollout's completions under a model, through the one
    processing path the engines use (:func:`framework.rollout.inputs.training_inputs`)."""

    temperature: float  # the sampling temperature: log-probs of the distribution that sampled
    chunk_size: int  # tokens per LM-head chunk
    device: Any

    def __call__(self, model, mb: Rollout | TrainBatch, with_entropy: bool = False):
        """logp [n, T] (and entropy [n, T] when asked) of micro-batch ``mb``, on the device."""
        from framework.rollout.inputs import training_inputs

        dev = self.device
        pin = {k: v.to(dev) for k, v in mb.prompt_inputs.items()}
        if shares_prompts(model):
            runs = prompt_runs(pin, mb.images_per_sample)
            if len(runs) < len(mb):  # some samples share their prompt: run it once for them
                return shared_prompt_logprobs(
                    model,
                    pin,
                    mb.images_per_sample,
                    mb.completion_ids.to(dev),
                    mb.completion_mask.to(dev),
                    runs,
                    temperature=self.temperature,
                    chunk_size=self.chunk_size,
                    with_entropy=with_entropy,
                )
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
    def no_grad(self, model, rollout: Rollout | TrainBatch, micro_batches) -> torch.Tensor:
        """[N, T] masked log-probs on the CPU, micro-batch by micro-batch (``micro_batches``:
        ``(rows, real)`` pairs; padding passes only join the collectives)."""
        out = torch.zeros_like(rollout.completion_mask)
        for rows, real in micro_batches:
            mb = rollout.select(rows)
            lp, _ = self(model, mb)
            if real:
                out[rows] = lp.float().cpu() * mb.completion_mask
        return out
