"""Held-out evaluation shared by the trainer (``RLModule.evaluate``) and
``python -m benchmarks.evaluate``.

For each batch of records the :class:`Evaluator` generates

* one **greedy** completion per prompt (``rollout.eval_temperature``, 0 = greedy):
  ``eval/accuracy``, ``eval/format`` (rate of the ``format`` reward, when configured),
  ``eval/mean_length``, ``eval/mean_length_correct``, ``eval/mean_length_incorrect``
  (completion tokens, EOS included);
* ``n`` **sampled** completions per prompt at the rollout temperature / top-p / top-k:
  ``eval/accuracy_sampled`` (mean correctness over all samples = pass@1 estimated from n
  samples) and ``eval/pass@k``, the unbiased estimator of Chen et al. 2021 (Codex),
  averaged over prompts::

      pass@k = 1 - C(n - c, k) / C(n, k)      (c correct among the n samples of a prompt)

``k`` is ``trainer.eval_pass_k`` (default 1) and ``n`` is ``trainer.eval_samples`` (default
``k``), so the default costs one sampled completion per prompt, as before.

Correctness comes from the run's :class:`rewards.RewardSet` (its ``correctness``
plugin), exactly as during training. Every metric is a torchmetrics ``MeanMetric``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchmetrics

from framework.errors import ConfigError
from framework.rollout.base import SamplingParams
from framework.rollout.inputs import encode_prompts

METRICS = (
    "accuracy",
    "format",
    "mean_length",
    "mean_length_correct",
    "mean_length_incorrect",
    "accuracy_sampled",
    "pass@k",
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: the probability that at
    least one of ``k`` samples drawn without replacement from the ``n`` is correct,
    ``1 - C(n-c, k) / C(n, k)``, computed as a stable product."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


@dataclass
class EvalSettings:
    greedy: SamplingParams
    sampled: SamplingParams
    pass_k: int = 1
    num_samples: int | None = None  # n samples per prompt (None: = pass_k)
    batch_size: int = 64

    @property
    def n(self) -> int:
        return int(self.num_samples or self.pass_k)

    def check(self) -> None:
        if self.pass_k < 1:
            raise ConfigError(f"eval pass_k={self.pass_k} must be >= 1")
        if self.n < self.pass_k:
            raise ConfigError(
                f"eval num_samples={self.num_samples} must be >= pass_k={self.pass_k} "
                "(pass@k needs at least k samples per prompt)"
            )
        if self.batch_size < 1:
            raise ConfigError(f"eval batch_size={self.batch_size} must be >= 1")


def settings_from_rollout(
    rollout_cfg: Any, *, pass_k: int = 1, num_samples: int | None = None, batch_size: int = 64
) -> EvalSettings:
    """Greedy / sampled sampling parameters from a rollout config section."""
    r = rollout_cfg
    greedy = SamplingParams(temperature=r.eval_temperature, max_new_tokens=r.max_new_tokens, stop=r.stop)
    sampled = SamplingParams(
        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens, stop=r.stop
    )
    return EvalSettings(
        greedy=greedy,
        sampled=sampled,
        pass_k=int(pass_k),
        num_samples=None if num_samples is None else int(num_samples),
        batch_size=int(batch_size),
    )


class Evaluator:
    """Evaluate a policy served by a rollout ``engine`` on held-out records.

    ``engine.generate(prompt_batch, n, SamplingParams)`` returns ``n`` completions per prompt
    (sample-major: p0, p0, ..., p1, ...); ``bundle`` is the model bundle (tokenizer, processor);
    ``rewards`` a :class:`rewards.RewardSet`; ``data_cfg`` supplies ``system_prompt`` and
    ``question_template``.
    """

    def __init__(self, engine, bundle, rewards, data_cfg: Any, settings: EvalSettings):
        settings.check()
        self.engine, self.bundle, self.rewards, self.settings = engine, bundle, rewards, settings
        get = data_cfg.get if hasattr(data_cfg, "get") else (lambda k, d=None: getattr(data_cfg, k, d))
        self.system_prompt = get("system_prompt", None)
        self.question_template = get("question_template", "{question}") or "{question}"
        self.metrics = {name: torchmetrics.MeanMetric() for name in METRICS}
        self.details: list[dict] = []

    @classmethod
    def from_config(
        cls,
        engine,
        bundle,
        rewards,
        data_cfg,
        rollout_cfg,
        *,
        pass_k: int = 1,
        num_samples: int | None = None,
        batch_size: int = 64,
    ) -> Evaluator:
        return cls(
            engine,
            bundle,
            rewards,
            data_cfg,
            settings_from_rollout(rollout_cfg, pass_k=pass_k, num_samples=num_samples, batch_size=batch_size),
        )

    # ------------------------------------------------------------------ helpers
    def encode(self, records: Sequence[dict]):
        return encode_prompts(self.bundle, list(records), self.system_prompt, self.question_template)

    def _texts(self, gen) -> list[str]:
        return self.bundle.tokenizer.batch_decode(
            [ids[m.bool()].tolist() for ids, m in zip(gen.completion_ids, gen.completion_mask)],
            skip_special_tokens=True,
        )

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        self.details = []

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def update(self, records: Sequence[dict], *, keep_details: bool = False, count: bool = True) -> None:
        """Generate and score one batch of records; accumulates into the metrics (only the
        generation runs when ``count`` is false)."""
        s = self.settings
        m = self.metrics
        records = list(records)
        prompts = self.encode(records)
        # sampled: n per prompt at the rollout temperature -> accuracy_sampled, pass@k
        gen_s = self.engine.generate(prompts, s.n, s.sampled)
        if not count:
            self.engine.generate(prompts, 1, s.greedy)
            return
        texts_s = self._texts(gen_s)
        recs_s = [r for r in records for _ in range(s.n)]
        correct_s = torch.tensor(self.rewards(texts_s, recs_s).correct, dtype=torch.float32).view(len(records), s.n)
        m["accuracy_sampled"].update(correct_s.flatten())
        c = correct_s.sum(1).round().long().tolist()
        m["pass@k"].update(torch.tensor([pass_at_k(s.n, ci, s.pass_k) for ci in c], dtype=torch.float32))
        # greedy: one per prompt -> accuracy, format, lengths (all / correct / incorrect)
        gen_g = self.engine.generate(prompts, 1, s.greedy)
        texts_g = self._texts(gen_g)
        scores = self.rewards(texts_g, records)
        comps, correct = scores.components, scores.correct
        correct_g = torch.tensor(correct, dtype=torch.float32)
        lengths = gen_g.completion_mask.float().sum(-1).cpu()
        m["accuracy"].update(correct_g)
        if "format" in comps:
            m["format"].update(torch.tensor(comps["format"], dtype=torch.float32))
        m["mean_length"].update(lengths)
        ok = correct_g.bool()
        if ok.any():
            m["mean_length_correct"].update(lengths[ok])
        if (~ok).any():
            m["mean_length_incorrect"].update(lengths[~ok])
        if keep_details:
            for i, r in enumerate(records):
                self.details.append(
                    {
                        "id": r.get("id"),
                        "question": r.get("question"),
                        "answer": r.get("answer"),
                        "greedy": texts_g[i],
                        "greedy_correct": bool(correct_g[i]),
                        "greedy_length": int(lengths[i]),
                        "samples": texts_s[i * s.n : (i + 1) * s.n],
                        "samples_correct": correct_s[i].tolist(),
                    }
                )

    def compute(self) -> dict[str, float]:
        """Metric values; with several processes, torchmetrics reduces each metric over ranks
        (every rank computes the metrics that any rank updated: the reduction is a collective)."""
        from framework.distributed import all_reduce

        counts = all_reduce([float(m.update_count) for m in self.metrics.values()], "sum")
        out = {}
        for (name, metric), n in zip(self.metrics.items(), counts):
            if n:
                v = float(metric.compute())
                if not math.isnan(v):
                    out[f"eval/{name}"] = v
        return out

    def run(self, records: Sequence[dict], *, keep_details: bool = False, progress=None) -> dict[str, float]:
        """All metrics over ``records`` as ``{"eval/<metric>": float}`` (a metric without any
        sample, e.g. ``mean_length_correct`` when nothing is correct, is left out).

        With several processes each rank evaluates its share ``records[rank::world]`` and the
        metrics are reduced over ranks. Ranks with fewer batches than another generate one
        more batch that is not counted, so that every rank makes the same generation calls
        (a collective under FSDP)."""
        from framework.distributed import all_reduce, world

        self.reset()
        records = list(records)
        if not records:
            return {}
        rank, ws = world()
        mine = records[rank::ws]
        bs = self.settings.batch_size
        batches = [mine[i : i + bs] for i in range(0, len(mine), bs)]
        most = int(all_reduce([float(len(batches))], "max")[0]) if ws > 1 else len(batches)
        for j in range(most):
            if j < len(batches):
                self.update(batches[j], keep_details=keep_details)
            else:  # a padding batch: joins the collective generation, counts nothing
                self.update(records[:1], keep_details=False, count=False)
            if progress is not None:
                progress(min((j + 1) * bs, len(mine)), len(mine))
        return self.compute()


__all__ = ["EvalSettings", "Evaluator", "METRICS", "pass_at_k", "settings_from_rollout"]
