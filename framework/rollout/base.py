"""Rollout engine interface. An engine turns a :class:`PromptBatch` into ``n`` sampled
completions per prompt. Engines register in ``framework.registry.ROLLOUT_ENGINES``.

    generate(prompts, n, sampling) -> Generation   (token ids, mask, optional log-probs)
    sync_weights(model)                               after every optimizer step
    sleep() / wake(tags)                              free / restore memory around the update

An engine whose ``returns_logprobs`` is True reports the sampler's log-probs with the tokens
at no extra cost; the trainer then requests them and logs the sampler/trainer gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    stop: list[str] | None = None
    return_logprobs: bool = False
    seeds: list[int] | None = None  # one per prompt: sample each prompt's completions from its own seed


@dataclass
class Generation:
    completion_ids: torch.Tensor  # [N, T] right padded (N = len(prompts) * n, sample-major)
    completion_mask: torch.Tensor  # [N, T] float, up to and including EOS
    truncated: torch.Tensor  # [N] bool
    logprobs: torch.Tensor | None = None  # [N, T] sampler log-probs of the chosen tokens


class RolloutEngine:
    name = "base"
    returns_logprobs = False  # True: generate() returns sampler log-probs at no extra cost

    def __init__(self, cfg, bundle, model):
        self.cfg, self.bundle, self.model = cfg, bundle, model

    def generate(self, prompts, n: int, sampling: SamplingParams) -> Generation:
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        """Make the engine serve ``model``'s current weights."""

    def sleep(self) -> None:
        pass

    def wake(self, tags: list[str] | None = None) -> None:
        """Restore what ``sleep`` freed: ``tags`` among "weights", "kv_cache" (all when None)."""

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class EngineSpec:
    """Which engine a run uses and with what (``rollout`` config section, the model's
    tokenizer/processor bundle). The module builds it in ``on_fit_start``, once the strategy has
    put the policy on its device (an engine may load its own copy there: vLLM)."""

    cls: type[RolloutEngine]
    cfg: object
    bundle: object

    def build(self, model) -> RolloutEngine:
        return self.cls(self.cfg, self.bundle, model)
