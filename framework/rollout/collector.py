"""Rollout assembly: prompts -> G sampled completions each (the engine) -> decoded texts ->
rewards -> a :class:`framework.types.Rollout`; with DAPO dynamic sampling
(``algorithm.filter_groups``), extra rounds on fresh prompts until enough groups with a
reward spread are kept, and the kept groups of all rounds concatenated (``Rollout.concat``).

The collector is given everything it needs when it is built and never reaches back into the
trainer.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Iterator

import torch

from framework.distributed import all_reduce
from framework.rollout.base import RolloutEngine, SamplingParams
from framework.rollout.inputs import PromptBatch, expand_inputs
from framework.types import Rollout


@dataclasses.dataclass
class DynamicSampling:
    """DAPO's dynamic sampling: ``keep(rollout) -> [num_groups] bool`` (groups to train on),
    at most ``max_extra_rounds`` extra rounds on prompts drawn from ``extra_prompts``."""

    keep: Callable[[Rollout], torch.Tensor]
    max_extra_rounds: int
    extra_prompts: Iterator[list[dict]] | None


class RolloutCollector:
    def __init__(
        self,
        engine: RolloutEngine,
        encode: Callable[[list[dict]], PromptBatch],
        rewards,
        tokenizer,
        sampling: SamplingParams,
        *,
        group_size: int,
        seed: int = 0,
        seed_per_prompt: bool = False,
        dynamic_sampling: DynamicSampling | None = None,
        collective: bool = False,
    ):
        """``encode``: records -> PromptBatch (the one processing path, a
        :class:`framework.rollout.inputs.PromptEncoder`); ``rewards``: a RewardSet;
        ``collective``: generation is a collective over ranks (FSDP), so every rank makes the
        same number of rounds."""
        self.engine, self.encode, self.rewards, self.tokenizer = engine, encode, rewards, tokenizer
        # engines that report the sampler's log-probs for free (vLLM) are asked for them: they
        # give the sampler/trainer gap metric and the truncated-IS correction (rollout.tis_cap)
        self.sampling = dataclasses.replace(sampling, return_logprobs=bool(engine.returns_logprobs))
        self.G, self.seed, self.seed_per_prompt = group_size, seed, seed_per_prompt
        self.dynamic, self.collective = dynamic_sampling, collective

    def __call__(self, records: list[dict], rl_step: int) -> tuple[Rollout, dict[str, float]]:
        """The rollout of one RL step and its metrics (timings, rewards, refill rounds)."""
        metrics: dict[str, float] = {}
        self._tokens = 0.0  # completion tokens of all rounds, for perf/rollout_tokens_per_s
        first = self.collect(records, rl_step, metrics)
        if self.dynamic is None:
            return first, metrics
        want = len(records)
        keeps = [self.dynamic.keep(first)]
        parts = [first]
        metrics["filter_groups/kept_frac_first_round"] = float(keeps[0].float().mean())
        rounds = 0
        while rounds < self.dynamic.max_extra_rounds and self.dynamic.extra_prompts is not None:
            if not self._any_rank(sum(int(k.sum()) for k in keeps) < want):
                break
            rounds += 1
            more = self.collect(next(self.dynamic.extra_prompts), rl_step, metrics)
            parts.append(more)
            keeps.append(self.dynamic.keep(more))
        metrics["filter_groups/extra_rounds"] = float(rounds)
        kept, n = _kept_rows(parts, keeps, want)
        if n < want:  # still short after the last round: fill up with first-round groups that were
            # not kept (equal rewards: zero advantage, only the KL term acts), so that every step
            # trains on the same number of groups and makes the same number of mini-batches
            fill, _ = _kept_rows([first], [~keeps[0]], want - n)
            kept += fill
        metrics["filter_groups/filled_groups"] = float(max(0, want - n))
        return Rollout.concat([parts[i].select(rows) for i, rows in kept]), metrics

    def collect(self, records: list[dict], rl_step: int, metrics: dict[str, float]) -> Rollout:
        """One round: G completions per prompt, decoded and scored."""
        G = self.G
        t0 = time.perf_counter()
        prompts = self.encode(records)
        sp = self.sampling
        if self.seed_per_prompt:  # the same samples whatever the batch or the number of ranks
            seeds = [zlib.crc32(f"{self.seed}:{rl_step}:{r.get('id', i)}".encode()) for i, r in enumerate(records)]
            sp = dataclasses.replace(sp, seeds=seeds)
        gen = self.engine.generate(prompts, G, sp)
        t1 = time.perf_counter()
        texts = self.tokenizer.batch_decode(
            [ids[m.bool()].tolist() for ids, m in zip(gen.completion_ids, gen.completion_mask)],
            skip_special_tokens=True,
        )
        recs = [r for r in records for _ in range(G)]
        scores = self.rewards(texts, recs)
        t2 = time.perf_counter()
        metrics["timing_s/rollout"] = metrics.get("timing_s/rollout", 0.0) + (t1 - t0)
        metrics["timing_s/reward"] = metrics.get("timing_s/reward", 0.0) + (t2 - t1)
        self._tokens = getattr(self, "_tokens", 0.0) + float(gen.completion_mask.sum())
        metrics["perf/rollout_tokens_per_s"] = self._tokens / max(metrics["timing_s/rollout"], 1e-9)
        metrics.update(scores.metrics)

        def as_tensor(x):
            return torch.tensor(x, dtype=torch.float32)

        return Rollout(
            completion_ids=gen.completion_ids,
            completion_mask=gen.completion_mask,
            group_ids=torch.arange(len(records)).repeat_interleave(G),
            rewards=as_tensor(scores.total),
            correct=as_tensor(scores.correct),
            truncated=gen.truncated,
            reward_components={k: as_tensor(v) for k, v in scores.components.items()},
            logp_sampler=gen.logprobs,
            prompt_inputs=expand_inputs(prompts.inputs, G, prompts.images_per_sample),
            images_per_sample=[c for c in prompts.images_per_sample for _ in range(G)],
            texts=texts,
            records=recs,
        )

    def _any_rank(self, flag: bool) -> bool:
        if self.collective:  # generation is a collective under FSDP: all ranks make the same rounds
            return bool(all_reduce([float(flag)], "max")[0])
        return flag


def _kept_rows(parts: list[Rollout], keeps: list[torch.Tensor], want: int) -> tuple[list[tuple[int, list[int]]], int]:
    """``(part, rows)`` of the first ``want`` kept groups over all rounds, in order, and their
    number of groups."""
    out: list[tuple[int, list[int]]] = []
    n = 0
    for i, (part, keep) in enumerate(zip(parts, keeps)):
        rows = []
        for g in torch.nonzero(keep).flatten().tolist():
            if n >= want:
                break
            rows += torch.nonzero(part.group_ids == g).flatten().tolist()
            n += 1
        if rows:
            out.append((i, rows))
    return out, n
