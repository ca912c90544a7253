"""The Lightning RL module (manual optimization). One ``training_step`` is one RL step:

    prompts -> rollout (engine.generate, G per prompt)      framework/rollout/
            -> rewards (RewardSet)                          rewards/
            -> advantages, per-sample KL weights            algorithms/ (Algorithm.prepare)
            -> reference / old log-probs (only if needed)   framework/logprobs.py
            -> ppo_epochs x mini-batches of micro-batches:  Algorithm.loss, backward,
               grad-clip, optimizer + LR-schedule step
            -> engine.sync_weights, metrics                 logged through Lightning loggers

The module never branches on the algorithm's name: everything algorithm-specific is behind
the :class:`algorithms.base.Algorithm` interface.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from collections import defaultdict
from typing import Any

import lightning as L
import torch

from framework.distributed import all_reduce
from framework.logprobs import completion_logprobs
from framework.rollout.base import SamplingParams
from framework.rollout.inputs import encode_prompts, expand_inputs, select_inputs, training_inputs
from framework.types import LossNormalizer, Rollout


class NonFiniteError(FloatingPointError):
    pass


def lr_lambda(scheduler: str, total: int, warmup: int, min_ratio: float):
    """Multiplier of the base lr at optimizer step s: linear warm-up over ``warmup`` steps, then
    constant, or cosine / linear decay from 1 to ``min_ratio`` at step ``total``."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if scheduler == "constant":
            return 1.0
        prog = min(1.0, (s - warmup) / max(1, total - warmup))
        if scheduler == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
        return 1.0 - (1.0 - min_ratio) * prog

    return f


class RLModule(L.LightningModule):
    def __init__(
        self,
        *,
        policy,
        reference,
        bundle,
        algorithm,
        rewards,
        engine_factory,
        sections,
        data_cfg,
        eval_records: list[dict] | None = None,
        extra_prompts=None,
        seed: int = 0,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        # Kept outside the module tree: not trained, not in the checkpoint, moved by hand.
        self.__dict__["reference"] = reference
        self.bundle, self.algo, self.rewards = bundle, algorithm, rewards
        self.engine_factory = engine_factory
        self.engine = None
        self.s = sections
        self.data_cfg = data_cfg
        self.eval_records = eval_records or []
        self.extra_prompts = extra_prompts  # iterator of record lists for filter_groups refills
        self.rl_step = 0
        self.seed = seed
        self.updates_per_step = algorithm.ppo_epochs * sections["trainer"].num_mini_batches
        self.total_updates = sections["trainer"].max_steps * self.updates_per_step
        self.history: list[dict[str, float]] = []  # every logged metric row, for tests and reports
        self._last_eval_step = -1

    # ------------------------------------------------------------------ setup
    def configure_optimizers(self):
        o, t = self.s["optim"], self.s["trainer"]
        params = [p for p in self.policy.parameters() if p.requires_grad]
        from framework.distributed import is_sharded

        # the fused CUDA kernel for plain CUDA parameters (FSDP's DTensors use the foreach path)
        fused = bool(params) and all(p.is_cuda for p in params) and not is_sharded(self.policy)
        opt = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused or None
        )
        warm = int(o.warmup_ratio * self.total_updates)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.scheduler, self.total_updates, warm, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_model(self):
        """Under ``trainer.strategy=fsdp``: shard the policy and the frozen reference the same
        way (framework/distributed.py). Called by Lightning before the optimizer is built."""
        from framework.distributed import is_sharded, shard_model, uses_fsdp

        if not uses_fsdp(self._trainer) or is_sharded(self.policy):
            return
        cfg = self.trainer.strategy.fsdp_cfg
        mesh = self.device_mesh["data_parallel"]
        shard_model(self.policy, cfg, mesh, trainable=True)
        if self.reference is not None:
            shard_model(self.reference, cfg, mesh, trainable=False)

    @property
    def sharded(self) -> bool:
        from framework.distributed import uses_fsdp

        return uses_fsdp(self._trainer) and self.trainer.world_size > 1

    def on_fit_start(self):
        from framework.distributed import is_sharded

        if self.reference is not None and not is_sharded(self.reference):
            self.reference.to(self.device)
        self.engine = self.engine_factory(self.policy)

    def on_fit_end(self):
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------ helpers
    @property
    def sampling(self) -> SamplingParams:
        r = self.s["rollout"]
        # engines that report the sampler's log-probs for free (vLLM) are asked for them: they
        # give the sampler/trainer gap metric and the truncated-IS correction (rollout.tis_cap)
        return SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            stop=r.stop,
            return_logprobs=bool(getattr(self.engine, "returns_logprobs", False)),
        )

    def encode(self, records):
        return encode_prompts(
            self.bundle,
            records,
            self.data_cfg.get("system_prompt"),
            self.data_cfg.get("question_template", "{question}"),
        )

    def _forward_logprobs(self, model, prompt_inputs, ids, mask, with_entropy=False):
        dev = self.device
        pin = {k: v.to(dev) for k, v in prompt_inputs.items()}
        kw = training_inputs(pin, ids.to(dev), mask.to(dev), model)
        return completion_logprobs(
            model,
            kw,
            ids.shape[1],
            temperature=self.s["rollout"].temperature or 1.0,
            chunk_size=self.s["trainer"].logprob_chunk_size,
            with_entropy=with_entropy,
        )

    def _micro_batches(self, n: int):
        mb = self.s["trainer"].micro_batch_size
        return [list(range(i, min(n, i + mb))) for i in range(0, n, mb)]

    def _collective_micro_batches(self, n: int) -> list[tuple[list[int], bool]]:
        """``(rows, real)`` micro-batches. Under FSDP each forward is a collective, so a rank with
        fewer micro-batches than another (uneven ``filter_groups`` refills) adds padding passes
        (``real=False``: its first micro-batch again, with zero weight)."""
        batches = [(b, True) for b in self._micro_batches(n)]
        if self.sharded:
            most = int(all_reduce([float(len(batches))], "max")[0])
            batches += [(batches[0][0], False)] * (most - len(batches))
        return batches

    @torch.no_grad()
    def _logprobs_no_grad(self, model, rollout: Rollout, ips) -> torch.Tensor:
        out = torch.zeros_like(rollout.completion_mask)
        for idx, real in self._collective_micro_batches(len(rollout.group_ids)):
            pin = select_inputs(rollout.extras["prompt_inputs"], idx, ips)
            lp, _ = self._forward_logprobs(model, pin, rollout.completion_ids[idx], rollout.completion_mask[idx])
            if real:
                out[idx] = lp.float().cpu() * rollout.completion_mask[idx]
        return out

    # ------------------------------------------------------------------ rollout
    def collect(self, records: list[dict], metrics: dict) -> tuple[Rollout, list[str], list[dict]]:
        """Generate G completions per prompt, score them, build the Rollout."""
        G = self.s["rollout"].group_size
        t0 = time.perf_counter()
        prompts = self.encode(records)
        sp = self.sampling
        if self.s["rollout"].seed_per_prompt:
            sp.seeds = [
                zlib.crc32(f"{self.seed}:{self.rl_step}:{r.get('id', i)}".encode()) for i, r in enumerate(records)
            ]
        gen = self.engine.generate(prompts, G, sp)
        t1 = time.perf_counter()
        texts = self.bundle.tokenizer.batch_decode(
            [ids[m.bool()].tolist() for ids, m in zip(gen.completion_ids, gen.completion_mask)],
            skip_special_tokens=True,
        )
        recs = [r for r in records for _ in range(G)]
        total, comps, correct, rmetrics = self.rewards(texts, recs)
        t2 = time.perf_counter()
        N = len(texts)
        rollout = Rollout(
            completion_ids=gen.completion_ids,
            completion_mask=gen.completion_mask,
            group_ids=torch.arange(len(records)).repeat_interleave(G),
            rewards=torch.tensor(total, dtype=torch.float32),
            correct=torch.tensor(correct, dtype=torch.float32),
            truncated=gen.truncated,
            reward_components={k: torch.tensor(v, dtype=torch.float32) for k, v in comps.items()},
            logp_sampler=gen.logprobs,
            extras={
                "prompt_inputs": expand_inputs(prompts.inputs, G, prompts.images_per_sample),
                "images_per_sample": [c for c in prompts.images_per_sample for _ in range(G)],
                "completion_texts": texts,
            },
        )
        ntok = float(gen.completion_mask.sum())
        metrics["timing_s/rollout"] = metrics.get("timing_s/rollout", 0.0) + (t1 - t0)
        metrics["timing_s/reward"] = metrics.get("timing_s/reward", 0.0) + (t2 - t1)
        metrics["perf/rollout_tokens_per_s"] = ntok / max(t1 - t0, 1e-9)
        for k, v in rmetrics.items():
            metrics[k] = v
        return rollout, texts, recs

    def rollout_with_filter(self, records, metrics):
        rollout, texts, recs = self.collect(records, metrics)
        fg = self.algo.filter_groups
        if not fg.enabled:
            return rollout, texts, recs
        want = len(records)
        keep = self.algo.keep_groups(rollout)
        metrics["filter_groups/kept_frac_first_round"] = float(keep.float().mean())
        parts = [(rollout, texts, recs, keep)]
        rounds = 0

        def need_more() -> bool:
            short = float(sum(int(p[3].sum()) for p in parts) < want)
            if self.sharded:  # generation is a collective under FSDP: all ranks make the same rounds
                short = all_reduce([short], "max")[0]
            return bool(short)

        while rounds < fg.max_extra_rounds and self.extra_prompts is not None and need_more():
            rounds += 1
            r2, t2, rc2 = self.collect(next(self.extra_prompts), metrics)
            parts.append((r2, t2, rc2, self.algo.keep_groups(r2)))
        metrics["filter_groups/extra_rounds"] = float(rounds)
        merged = _concat_kept(parts, self.s["rollout"].group_size, want)
        if merged is None:  # nothing kept at all: train on the first batch (all-zero advantages)
            return rollout, texts, recs
        return merged

    # ------------------------------------------------------------------ the step
    def training_step(self, records, batch_idx):
        t_step = time.perf_counter()
        t = self.s["trainer"]
        if getattr(self, "_pending_rng", None) is not None:
            torch.set_rng_state(self._pending_rng)
            self._pending_rng = None
        due = self.rl_step == 0 or (t.eval_every and self.rl_step % t.eval_every == 0)
        if due and self._last_eval_step != self.rl_step:
            self.evaluate()
        metrics: dict[str, float] = {}
        rollout, texts, recs = self.rollout_with_filter(records, metrics)
        N = len(texts)
        ips = rollout.extras["images_per_sample"]
        sleep = self.engine is not None and self.s["rollout"].sleep
        if sleep:  # free the engine's memory (weights + KV cache) for the forward/backward passes
            self.engine.sleep()

        algo_metrics = self.algo.prepare(rollout, step=self.global_step)
        if self.algo.mask_truncated_completions:  # after prepare: STCR must still see their lengths
            rollout.completion_mask = rollout.completion_mask * (~rollout.truncated).float().unsqueeze(1)
        t0 = time.perf_counter()
        if self.algo.needs_reference and self.reference is not None:
            rollout.logp_ref = self._logprobs_no_grad(self.reference, rollout, ips)
        t1 = time.perf_counter()
        if self.algo.needs_old_logprobs:
            rollout.logp_old = self._logprobs_no_grad(self.policy, rollout, ips)
        if rollout.logp_sampler is not None:
            logp_trainer = self._sampler_gap(rollout, ips, metrics)
            cap = self.s["rollout"].tis_cap
            if cap:  # truncated importance sampling: correct for the sampler/trainer mismatch
                from algorithms.losses import truncated_is_weights

                w = truncated_is_weights(logp_trainer, rollout.logp_sampler, cap, rollout.completion_mask)
                rollout.tis_weights = w
                m = rollout.completion_mask
                metrics["rollout/tis_weight_mean"] = float((w * m).sum() / m.sum().clamp(min=1))
                metrics["rollout/tis_capped_frac"] = float(((w >= cap) * m).sum() / m.sum().clamp(min=1))
        metrics["timing_s/ref"] = t1 - t0

        opt = self.optimizers()
        sched = self.lr_schedulers()
        t_up = time.perf_counter()
        mini = self.s["trainer"].num_mini_batches
        G = self.s["rollout"].group_size
        groups = rollout.group_ids.unique()
        step_stats: dict[str, list[float]] = defaultdict(list)
        for epoch in range(self.algo.ppo_epochs):
            perm = groups[torch.randperm(len(groups))] if (mini > 1 or epoch > 0) else groups
            for chunk in perm.chunk(mini):
                idx_all = torch.cat([torch.nonzero(rollout.group_ids == g).flatten() for g in chunk]).tolist()
                sub = rollout.select(torch.tensor(idx_all))
                norm = LossNormalizer(
                    num_sequences=float(len(idx_all)),
                    num_tokens=float(sub.completion_mask.sum().clamp(min=1)),
                    max_len=float(self.s["rollout"].max_new_tokens),
                )
                norm = self._global_normalizer(norm)
                acc: dict[str, float] = defaultdict(float)
                ent_sum = 0.0
                for local, real in self._collective_micro_batches(len(idx_all)):
                    rows = [idx_all[i] for i in local]
                    mb = rollout.select(torch.tensor(rows))
                    pin = select_inputs(rollout.extras["prompt_inputs"], rows, ips)
                    logp, ent = self._forward_logprobs(
                        self.policy, pin, mb.completion_ids, mb.completion_mask, with_entropy=True
                    )
                    mb = _to(mb, self.device)
                    loss, lm = self.algo.loss(logp, mb, norm)
                    bad = real and not bool(torch.isfinite(loss))
                    bad = bool(all_reduce([float(bad)], "max")[0])  # all ranks skip together
                    if bad:
                        names = [k for k, v in lm.items() if not torch.isfinite(torch.as_tensor(v)).all()] or ["loss"]
                        msg = (
                            f"non-finite loss at RL step {self.rl_step} (optimizer step {self.global_step}): "
                            f"non-finite metric(s): {', '.join(names)}"
                        )
                        if t.on_nonfinite == "error":
                            raise NonFiniteError(msg + ". Set trainer.on_nonfinite=skip to skip such steps.")
                        self.print("WARNING: " + msg + "; skipping this update")
                        # an optimizer step without gradients: no parameter changes, but the step
                        # counters (max_steps, LR and KL schedules) advance as usual
                        opt.zero_grad(set_to_none=True)
                        opt.step()
                        sched.step()
                        metrics["nonfinite_skipped"] = 1.0
                        break
                    if not real:  # a padding pass (FSDP): joins the collectives, adds nothing
                        self.manual_backward(loss * 0.0)
                        continue
                    with self._no_grad_sync():  # DDP: gradients are all-reduced once, before the step
                        # FSDP averages gradients over ranks: scaled by the world size, the
                        # average is the sum of the rank losses' gradients (the global loss)
                        self.manual_backward(loss * self._grad_scale)
                    acc["loss"] += float(loss.detach())
                    for k, v in lm.items():
                        acc[k] += float(v)
                    m = mb.completion_mask
                    ent_sum += float((ent * m).sum())
                else:
                    gn = self._clip_and_step(opt, sched)
                    step_stats["grad_norm"].append(gn)
                    for k, v in acc.items():
                        step_stats[k].append(v)
                    step_stats["entropy"].append(
                        ent_sum / norm.num_tokens
                    )  # this rank's share of the global token mean
                # (a skipped mini-batch made its empty optimizer step above; go on with the next)
        t_done = time.perf_counter()
        if self.engine is not None:
            if sleep:  # weights first: they are pushed before the KV cache takes memory again
                self.engine.wake(["weights"])
            self.engine.sync_weights(self.policy)
            if sleep:
                self.engine.wake(["kv_cache"])
        metrics["timing_s/sync"] = time.perf_counter() - t_done
        metrics["timing_s/update"] = t_done - t_up
        for k, v in step_stats.items():
            metrics[k] = sum(v) / len(v)
        metrics.update(algo_metrics)
        metrics.update(self._rollout_metrics(rollout))
        metrics["lr"] = sched.get_last_lr()[0]
        metrics["timing_s/step"] = time.perf_counter() - t_step
        metrics["perf/update_tokens_per_s"] = (
            float(rollout.completion_mask.sum()) * self.algo.ppo_epochs / max(t_done - t_up, 1e-9)
        )
        self.rl_step += 1
        self._log(self._reduce_metrics(metrics))
        if (
            self.s["trainer"].log_completions_every
            and (self.rl_step - 1) % self.s["trainer"].log_completions_every == 0
        ):
            self._log_table(texts, recs, rollout)
        if self.rl_step >= t.max_steps:
            self.evaluate()

    def _is_ddp(self) -> bool:
        return (
            self._trainer is not None
            and self.trainer.world_size > 1
            and type(self.trainer.strategy).__name__.startswith("DDP")
        )

    def _no_grad_sync(self):
        """Under DDP, accumulate local gradients without DDP's per-backward all-reduce (an RL step
        makes many backward passes inside one training_step); :meth:`_allreduce_grads` sums them."""
        wrapped = getattr(self.trainer.strategy, "model", None) if self._is_ddp() else None
        return wrapped.no_sync() if hasattr(wrapped, "no_sync") else contextlib.nullcontext()

    def _allreduce_grads(self) -> None:
        """Sum gradients over ranks. Each rank's loss already uses the global denominators
        (:meth:`_global_normalizer`), so the sum is the gradient of the global-batch loss."""
        import torch.distributed as dist

        params = [p for p in self.policy.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[off : off + n].view_as(p))
            off += n

    def _clip_and_step(self, opt, sched) -> float:
        from framework.distributed import clip_grad_norm

        if self._is_ddp():
            self._allreduce_grads()
        params = [p for p in self.policy.parameters() if p.grad is not None]
        gn = clip_grad_norm(params, self.s["optim"].grad_clip)  # the global norm, also over FSDP shards
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return gn

    @property
    def _grad_scale(self) -> float:
        """Factor on each backward: FSDP averages gradients over ranks, DDP here sums them."""
        return float(self.trainer.world_size) if self.sharded else 1.0

    def _global_normalizer(self, norm: LossNormalizer) -> LossNormalizer:
        """Denominators summed over all ranks, so that the rank losses add up to the loss of the
        global batch (token_mean divides by the token count of all ranks and micro-batches)."""
        n_seq, n_tok = all_reduce([norm.num_sequences, norm.num_tokens], "sum")
        return LossNormalizer(num_sequences=n_seq, num_tokens=n_tok, max_len=norm.max_len)

    # metrics that add up over ranks (each rank holds its share of a global sum); the rest are means
    ADDITIVE = ("loss", "policy_loss", "kl_loss", "kl", "clip_ratio", "clip_ratio/low", "clip_ratio/high", "entropy")

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        ws = self.trainer.world_size if self._trainer is not None else 1
        if ws <= 1:
            return metrics
        keys = sorted(k for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v)))
        vals = all_reduce([float(metrics[k]) for k in keys], "sum")
        out = {k: v if k in self.ADDITIVE else v / ws for k, v in zip(keys, vals)}
        if "grad_norm" in metrics:  # computed after the all-reduce: already the global norm
            out["grad_norm"] = metrics["grad_norm"]
        return out

    def _sampler_gap(self, rollout: Rollout, ips, metrics) -> torch.Tensor:
        """Log |logp_sampler - logp_trainer| (per token, mean and max) for the rollout policy and
        warn above ``rollout.logp_diff_warn``; returns the trainer's log-probs [N, T]."""
        lp = rollout.logp_old if rollout.logp_old is not None else self._logprobs_no_grad(self.policy, rollout, ips)
        m = rollout.completion_mask
        diff = (rollout.logp_sampler - lp).abs() * m
        metrics["rollout/logp_diff_mean"] = float(diff.sum() / m.sum().clamp(min=1))
        metrics["rollout/logp_diff_max"] = float(diff.max())
        if metrics["rollout/logp_diff_mean"] > self.s["rollout"].logp_diff_warn:
            self.print(
                f"WARNING: step {self.rl_step}: sampler/trainer log-prob gap {metrics['rollout/logp_diff_mean']:.3g} "
                "(stale engine weights or a prompt-processing mismatch?)"
            )
        return lp

    def _rollout_metrics(self, r: Rollout) -> dict[str, float]:
        G = self.s["rollout"].group_size
        L = r.lengths
        c = r.correct.bool()
        pr = r.correct.view(-1, G).mean(1)
        out = {
            "reward": float(r.rewards.mean()),
            "reward_std": float(r.rewards.std()) if len(r.rewards) > 1 else 0.0,
            "accuracy": float(r.correct.mean()),
            "completions/mean_length": float(L.mean()),
            "completions/mean_length_correct": float(L[c].mean()) if c.any() else float("nan"),
            "completions/mean_length_incorrect": float(L[~c].mean()) if (~c).any() else float("nan"),
            "completions/clipped_ratio": float(r.truncated.float().mean()),
            "pass_rate/mean": float(pr.mean()),
            "pass_rate/all_correct": float((pr == 1).float().mean()),
            "pass_rate/all_wrong": float((pr == 0).float().mean()),
        }
        self._pass_rates = pr.tolist()
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation by :class:`framework.evaluation.Evaluator`: greedy accuracy, format
        rate and lengths (all / correct / incorrect); sampled accuracy and pass@k from
        ``trainer.eval_samples`` completions per prompt at the rollout temperature. Logs
        ``eval/*`` and ``eval/step`` (the RL step the evaluation belongs to)."""
        if not self.eval_records or self.engine is None:
            return {}
        from framework.evaluation import Evaluator

        self._last_eval_step = self.rl_step
        t = self.s["trainer"]
        evaluator = Evaluator.from_config(
            self.engine,
            self.bundle,
            self.rewards,
            self.data_cfg,
            self.s["rollout"],
            pass_k=t.eval_pass_k,
            num_samples=t.eval_samples,
            batch_size=t.eval_batch_size,
        )
        out = evaluator.run(self.eval_records)
        out["eval/step"] = float(self.rl_step)
        self._log(out)
        return out

    # ------------------------------------------------------------------ logging
    def _log(self, metrics: dict[str, float]) -> None:
        clean = {
            k: float(v) for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))
        }
        row = {"rl_step": float(self.rl_step), **clean}
        self.history.append(row)
        if self._trainer is None:
            return
        bar = {"reward", "accuracy", "eval/accuracy", "eval/accuracy_sampled", "kl"}
        for k, v in clean.items():
            self.log(k, v, prog_bar=k in bar, on_step=True, on_epoch=False, batch_size=1, sync_dist=False)
        self.log("rl_step", float(self.rl_step), on_step=True, on_epoch=False, batch_size=1)
        pr = getattr(self, "_pass_rates", None)
        if pr and "reward" in metrics:
            for lg in self.loggers:
                if type(lg).__name__ == "WandbLogger":
                    import wandb

                    lg.experiment.log({"pass_rate/hist": wandb.Histogram(pr)}, commit=False)

    def _log_table(self, texts, recs, rollout) -> None:
        for lg in self.loggers:
            if type(lg).__name__ == "WandbLogger":
                n = min(16, len(texts))
                data = [
                    [
                        self.rl_step,
                        recs[i]["question"],
                        recs[i]["answer"],
                        texts[i],
                        float(rollout.rewards[i]),
                        float(rollout.advantages[i]) if rollout.advantages is not None else 0.0,
                    ]
                    for i in range(n)
                ]
                lg.log_table(
                    key="completions",
                    columns=["step", "question", "answer", "completion", "reward", "advantage"],
                    data=data,
                )

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rl_state"] = {
            "rl_step": self.rl_step,
            "torch_rng": torch.get_rng_state(),
            "last_eval_step": self._last_eval_step,
        }
        # the reference is not trained: never stored

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        st = checkpoint.get("rl_state", {})
        self.rl_step = st.get("rl_step", 0)
        self._last_eval_step = st.get("last_eval_step", -1)
        # applied at the start of the next training_step: setting it here would be undone by the
        # RNG draws Lightning and the DataLoader make between restoring and the first batch
        self._pending_rng = st.get("torch_rng")
        if getattr(self, "batch_sampler", None) is not None:
            self.batch_sampler.start = self.rl_step  # the prompts the uninterrupted run would see

    def state_dict(self, *args, **kwargs):
        return super().state_dict(*args, **kwargs)


def _to(r: Rollout, device) -> Rollout:
    import dataclasses

    ch = {}
    for f in dataclasses.fields(r):
        v = getattr(r, f.name)
        if isinstance(v, torch.Tensor):
            ch[f.name] = v.to(device)
        elif f.name == "reward_components":
            ch[f.name] = {k: t.to(device) for k, t in v.items()}
    return dataclasses.replace(r, **ch)


def _concat_kept(parts, G: int, want: int):
    """Concatenate the kept groups of several rollout rounds (at most ``want`` groups)."""
    rows, texts, recs, srcs = [], [], [], []
    for pi, (r, t, rc, keep) in enumerate(parts):
        for g in torch.nonzero(keep).flatten().tolist():
            if len(srcs) >= want:
                break
            srcs.append((pi, g))
    if not srcs:
        return None
    import dataclasses

    pieces = []
    for new_g, (pi, g) in enumerate(srcs):
        r, t, rc, _ = parts[pi]
        idx = torch.nonzero(r.group_ids == g).flatten()
        sub = r.select(idx)
        sub = dataclasses.replace(sub, group_ids=torch.full((len(idx),), new_g, dtype=torch.long))
        pieces.append((sub, [t[i] for i in idx.tolist()], [rc[i] for i in idx.tolist()], idx.tolist(), r))
    T = max(p[0].completion_ids.shape[1] for p in pieces)

    def pad(x, val):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=val)

    cat = lambda name, val=0: torch.cat([pad(getattr(p[0], name), val) for p in pieces])  # noqa: E731
    out = Rollout(
        completion_ids=cat("completion_ids"),
        completion_mask=cat("completion_mask"),
        group_ids=torch.cat([p[0].group_ids for p in pieces]),
        rewards=torch.cat([p[0].rewards for p in pieces]),
        correct=torch.cat([p[0].correct for p in pieces]),
        truncated=torch.cat([p[0].truncated for p in pieces]),
        reward_components={
            k: torch.cat([p[0].reward_components[k] for p in pieces]) for k in pieces[0][0].reward_components
        },
        logp_sampler=cat("logp_sampler") if pieces[0][0].logp_sampler is not None else None,
    )
    # prompt inputs: select rows of each round and concatenate (prompt lengths differ: left-pad)
    from framework.rollout.inputs import select_inputs

    sel = [select_inputs(p[4].extras["prompt_inputs"], p[3], p[4].extras["images_per_sample"]) for p in pieces]
    P = max(s["input_ids"].shape[1] for s in sel)
    merged: dict[str, list] = defaultdict(list)
    for s in sel:
        for k, v in s.items():
            if k in ("pixel_values", "image_grid_thw"):
                merged[k].append(v)
            else:
                padv = 0
                merged[k].append(torch.nn.functional.pad(v, (P - v.shape[1], 0), value=padv))
    out.extras = {
        "prompt_inputs": {k: torch.cat(v) for k, v in merged.items()},
        "images_per_sample": [c for p in pieces for c in [p[4].extras["images_per_sample"][i] for i in p[3]]],
    }
    return out, [x for p in pieces for x in p[1]], [x for p in pieces for x in p[2]]
