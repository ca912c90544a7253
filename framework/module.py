"""The Lightning RL module (manual optimization). One ``training_step`` is one RL step:

    evaluate if due                                   framework/evaluation.py
    collect: prompts -> G completions -> rewards      framework/rollout/collector.py, rewards/
             -> Rollout
    prepare: shaped rewards, advantages, per-sample   algorithms/ (Algorithm.prepare)
             KL weights, loss mask -> Prepared
    reference / old log-probs, IS weights (if needed) framework/logprobs.py
             -> tensors, assembled into a TrainBatch  framework/types.py
    update: ppo_epochs x mini-batches of micro-batches,
            Algorithm.loss -> backward -> clip -> step framework/update.py, framework/distributed.py
    sync the engine's weights                         framework/rollout/
    log                                               framework/metrics.py -> Lightning loggers

Each phase returns a value the next one takes; none rewrites an earlier phase's value.

One clock: the RL step (``rl_step``, one rollout and its updates) drives evaluation, logging,
checkpoints and the progress shown; the schedules (the LR and the KL weight beta) count the
optimizer steps derived from it, ``rl_step * updates_per_step + k`` for the k-th update of the
step (:meth:`RLModule.schedule_step`), never Lightning's counter. With one update per RL step
(``ppo_epochs=1``, ``trainer.num_mini_batches=1``, the default) both are the RL step.

The module never branches on the algorithm's name: everything algorithm-specific is behind
the :class:`algorithms.base.Algorithm` interface; everything strategy-specific behind the
:class:`framework.distributed.GradientSync` chosen at setup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch

from algorithms.losses import truncated_is_weights
from algorithms.schedules import lr_multiplier
from framework.distributed import GradientSync, is_sharded, make_gradient_sync, shard_model, uses_fsdp
from framework.errors import NonFiniteError  # noqa: F401  (raised by the update; importable from here)
from framework.logprobs import RolloutLogProbs
from framework.metrics import (
    pass_rates,
    peak_flops,
    reduce_over_ranks,
    rollout_metrics,
    sampler_gap,
    step_perf,
    tis_metrics,
)
from framework.models.lora import reference_model
from framework.rollout.base import EngineSpec, SamplingParams
from framework.rollout.collector import DynamicSampling, RolloutCollector
from framework.rollout.inputs import PromptEncoder
from framework.types import Prepared, Rollout, TrainBatch
from framework.update import PolicyUpdate, UpdateResult

log = logging.getLogger(__name__)


class RLModule(L.LightningModule):
    def __init__(
        self,
        *,
        policy,
        reference,
        bundle,
        algorithm,
        rewards,
        engine: EngineSpec,
        encoder: PromptEncoder,
        sections,
        eval_records: list[dict] | None = None,
        refills: Iterator[list[dict]] | None = None,
        batch_sampler=None,
        seed: int = 0,
    ):
        """``engine``: the rollout engine to build once the device is known; ``encoder``: records
        -> prompt inputs (the one processing path); ``refills``: the prompts of DAPO's refill
        rounds (framework.train.RefillPrompts); ``batch_sampler``: repositioned on resume."""
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        # Kept outside the module tree: not trained, not in the checkpoint, moved by hand.
        self.__dict__["reference"] = reference
        self.bundle, self.algo, self.rewards = bundle, algorithm, rewards
        self.engine_spec, self.encoder = engine, encoder
        self.s = sections  # the typed, validated sections (framework.config.validate_run_config)
        self.eval_records = eval_records or []
        self.refills = refills  # iterator of record lists for filter_groups refills
        self.batch_sampler = batch_sampler  # repositioned on resume (framework.train.StepBatchSampler)
        self.seed = seed
        self.rl_step = 0
        self.updates_per_step = algorithm.ppo_epochs * sections["trainer"].num_mini_batches
        self.total_updates = sections["trainer"].max_steps * self.updates_per_step
        # several optimizer steps per rollout: every one after the first is off-policy, so the
        # rollout policy's log-probs are taken once, before any update (decided here, once)
        self.off_policy = algorithm.needs_old_logprobs or self.updates_per_step > 1
        self.history: list[dict[str, float]] = []  # every logged metric row, for tests and reports
        self._last_eval_step = -1
        self._pending_rng: torch.Tensor | None = None  # RNG state restored by a resume
        # built in on_fit_start, once the strategy and the device are known
        self.engine = None
        self.grad_sync: GradientSync = GradientSync()
        self.logprobs: RolloutLogProbs | None = None
        self.collector: RolloutCollector | None = None
        self.update: PolicyUpdate | None = None

    # ------------------------------------------------------------------ setup
    def configure_optimizers(self):
        o = self.s["optim"]
        params = [p for p in self.policy.parameters() if p.requires_grad]
        # the fused kernel for plain CUDA parameters and for fp32 CPU ones (4x faster than foreach
        # there, equal to it within float32 rounding); FSDP's DTensors use the foreach path
        fused = (
            bool(params)
            and not is_sharded(self.policy)
            and (
                all(p.is_cuda for p in params)
                or all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
            )
        )
        opt = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused or None
        )
        warmup = int(o.warmup_ratio * self.total_updates)
        f = lr_multiplier(o.scheduler, self.total_updates, warmup, o.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_model(self):
        """Under ``trainer.strategy=fsdp``: shard the policy and the frozen reference the same
        way (framework/distributed.py). Called by Lightning before the optimizer is built."""
        if not uses_fsdp(self._trainer) or is_sharded(self.policy):
            return
        from framework.models.loading import DTYPES

        cfg = self.trainer.strategy.fsdp_cfg
        mesh = self.device_mesh["data_parallel"]
        compute = DTYPES[self.s["model"].dtype]
        shard_model(self.policy, cfg, mesh, trainable=True, compute_dtype=compute)
        if self.reference is not None:
            shard_model(self.reference, cfg, mesh, trainable=False, compute_dtype=compute)

    def on_fit_start(self):
        if self.reference is not None and not is_sharded(self.reference):
            self.reference.to(self.device)
        r, t = self.s["rollout"], self.s["trainer"]
        self.engine = self.engine_spec.build(self.policy)
        # perf/mfu: the language model's parameters (2 N FLOPs per token forward) and the GPU's peak
        self._n_text_params = sum(p.numel() for n, p in self.policy.named_parameters() if "visual" not in n)
        self._peak_flops = peak_flops(self.device)
        self.grad_sync = make_gradient_sync(self.trainer)
        self.logprobs = RolloutLogProbs(r.temperature or 1.0, t.logprob_chunk_size, self.device)
        fg = self.algo.filter_groups
        self.collector = RolloutCollector(
            self.engine,
            self.encoder,
            self.rewards,
            self.bundle.tokenizer,
            SamplingParams(
                temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens, stop=r.stop
            ),
            group_size=r.group_size,
            seed=self.seed,
            seed_per_prompt=r.seed_per_prompt,
            dynamic_sampling=DynamicSampling(self.algo.keep_groups, fg.max_extra_rounds, self.refills)
            if fg.enabled
            else None,
            collective=self.grad_sync.collective,
        )
        self.update = PolicyUpdate(
            self.policy,
            self.algo,
            self.logprobs,
            self.grad_sync,
            micro_batch_size=t.micro_batch_size,
            num_mini_batches=t.num_mini_batches,
            max_len=r.max_new_tokens,
            grad_clip=self.s["optim"].grad_clip,
            on_nonfinite=t.on_nonfinite,
            backward=self.manual_backward,
        )

    def on_fit_end(self):
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------ the step
    def training_step(self, records, batch_idx):
        self._restore_rng()
        self._evaluate_if_due()  # not part of the step's timing (eval/* rows are their own)
        t_step = time.perf_counter()
        rollout, metrics = self.collector(records, self.rl_step)  # generate, decode, score (+ DAPO refills)
        self._engine_sleep()  # free the engine's memory for the forward/backward passes
        prepared = self.algo.prepare(rollout, step=self.schedule_step())  # advantages, beta_i, loss mask
        batch = self._train_batch(rollout, prepared, metrics)  # + reference / old log-probs
        t_up = time.perf_counter()
        opt, sched = self.optimizers(), self.lr_schedulers()
        result = self.update(batch, opt, sched, rl_step=self.rl_step, optimizer_step=self.schedule_step())
        t_done = time.perf_counter()
        self._sync_engine()  # the engine serves the updated policy from the next rollout on
        metrics["timing_s/sync"] = time.perf_counter() - t_done
        metrics["timing_s/update"] = t_done - t_up
        self.rl_step += 1
        self._log_step(rollout, prepared, batch, result, metrics, sched, t_step, t_done - t_up)
        if self.rl_step >= self.s["trainer"].max_steps:
            self.evaluate()

    def schedule_step(self) -> int:
        """The schedules' clock at the start of this RL step: its first optimizer step,
        ``rl_step * updates_per_step`` (the LR scheduler then steps once per update)."""
        return self.rl_step * self.updates_per_step

    # ------------------------------------------------------------------ phases
    def _restore_rng(self) -> None:
        """A resumed run continues the uninterrupted run's RNG stream (set here, not at load:
        Lightning and the DataLoader draw from it between restoring and the first batch)."""
        if self._pending_rng is not None:
            torch.set_rng_state(self._pending_rng)
            self._pending_rng = None

    def _evaluate_if_due(self) -> None:
        every = self.s["trainer"].eval_every
        due = self.rl_step == 0 or (every and self.rl_step % every == 0)
        if due and self._last_eval_step != self.rl_step:
            self.evaluate()

    def _engine_sleep(self) -> None:
        if self.engine is not None and self.s["rollout"].sleep:
            self.engine.sleep()

    def _sync_engine(self) -> None:
        if self.engine is None:
            return
        sleep = self.s["rollout"].sleep
        if sleep:  # weights first: they are pushed before the KV cache takes memory again
            self.engine.wake(["weights"])
        self.engine.sync_weights(self.policy)
        if sleep:
            self.engine.wake(["kv_cache"])

    def _train_batch(self, rollout: Rollout, prepared: Prepared, metrics: dict[str, float]) -> TrainBatch:
        """The log-prob phases and the batch they complete: the frozen reference's log-probs (KL
        term), the rollout policy's (several updates per rollout) and, with an engine that reports
        its own, the sampler/trainer gap and the truncated-IS weights (``rollout.tis_cap``). The
        passes see the loss mask as the completions' attention mask."""
        seqs = TrainBatch.assemble(rollout, prepared)  # the inputs of the log-prob passes
        mbs = self.grad_sync.micro_batches(len(seqs), self.s["trainer"].micro_batch_size)
        t0 = time.perf_counter()
        logp_ref = self._reference_logprobs(seqs, mbs)
        metrics["timing_s/ref_logp"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        logp_old = self.logprobs.no_grad(self.policy, seqs, mbs) if self.off_policy else None
        metrics["timing_s/old_logp"] = time.perf_counter() - t1
        tis = None
        if rollout.logp_sampler is not None:
            t1 = time.perf_counter()
            lp = logp_old if logp_old is not None else self.logprobs.no_grad(self.policy, seqs, mbs)
            metrics["timing_s/old_logp"] += time.perf_counter() - t1
            tis = self._sampler_correction(rollout.logp_sampler, lp, seqs.completion_mask, metrics)
        return TrainBatch.assemble(
            rollout, prepared, logp_ref=logp_ref, logp_old=logp_old, tis_weights=tis, off_policy=self.off_policy
        )

    def _reference_logprobs(self, seqs: TrainBatch, mbs) -> torch.Tensor | None:
        """[N, T] under the frozen reference when the algorithm has a KL term, else None. LoRA:
        the policy with its adapters disabled (framework/models/lora.py)."""
        if not self.algo.needs_reference:
            return None
        with reference_model(self.policy, self.reference) as ref:
            return self.logprobs.no_grad(ref, seqs, mbs) if ref is not None else None

    def _sampler_correction(self, logp_sampler, logp_trainer, mask, metrics: dict[str, float]):
        """The sampler/trainer gap metrics, and the truncated-IS weights [N, T] when
        ``rollout.tis_cap`` is set (else None)."""
        metrics.update(sampler_gap(logp_sampler, logp_trainer, mask))
        if metrics["rollout/logp_diff_mean"] > self.s["rollout"].logp_diff_warn:
            log.warning(
                "WARNING: step %d: sampler/trainer log-prob gap %.3g (stale engine weights or a "
                "prompt-processing mismatch?)",
                self.rl_step,
                metrics["rollout/logp_diff_mean"],
            )
        cap = self.s["rollout"].tis_cap
        if not cap:
            return None
        weights = truncated_is_weights(logp_trainer, logp_sampler, cap, mask)
        metrics.update(tis_metrics(weights, cap, mask))
        return weights

    def _log_step(
        self,
        rollout: Rollout,
        prepared: Prepared,
        batch: TrainBatch,
        result: UpdateResult,
        metrics,
        sched,
        t_step,
        update_s,
    ) -> None:
        metrics.update(result.stats)
        if result.skipped:
            metrics["nonfinite_skipped"] = 1.0
        metrics.update(prepared.metrics)
        G = self.s["rollout"].group_size
        # the rewards the advantages came from (shaped), the lengths the loss counted
        metrics.update(rollout_metrics(rollout, G, rewards=prepared.rewards, mask=prepared.loss_mask))
        metrics["lr"] = sched.get_last_lr()[0]
        metrics["timing_s/step"] = time.perf_counter() - t_step
        metrics.update(
            step_perf(
                batch,
                {"step": metrics["timing_s/step"], "update": update_s},
                ppo_epochs=self.algo.ppo_epochs,
                no_grad_passes=int(self.algo.needs_reference) + int(self.off_policy),
                n_params=self._n_text_params,
                peak=self._peak_flops,
            )
        )
        world = self.trainer.world_size if self._trainer is not None else 1
        self._log(reduce_over_ranks(metrics, world), group_pass_rates=pass_rates(rollout, G).tolist())
        every = self.s["trainer"].log_completions_every
        if every and (self.rl_step - 1) % every == 0:
            self._log_table(rollout, prepared)

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
            self.s["data"],
            self.s["rollout"],
            pass_k=t.eval_pass_k,
            num_samples=t.eval_samples,
            batch_size=t.eval_batch_size,
        )
        log.info("apo-rl: evaluating %d held-out records at RL step %d", len(self.eval_records), self.rl_step)
        out = evaluator.run(self.eval_records, progress=lambda done, total: log.info("  evaluated %d/%d", done, total))
        out["eval/step"] = float(self.rl_step)
        self._log(out)
        log.info(
            "eval at step %d: accuracy %.3f (greedy), %.3f (sampled), format %.3f",
            self.rl_step,
            out.get("eval/accuracy", float("nan")),
            out.get("eval/accuracy_sampled", float("nan")),
            out.get("eval/format", float("nan")),
        )
        return out

    # ------------------------------------------------------------------ logging
    def _wandb_loggers(self):
        from lightning.pytorch.loggers import WandbLogger

        return [lg for lg in self.loggers if isinstance(lg, WandbLogger)] if self._trainer is not None else []

    def _log(self, metrics: dict[str, float], group_pass_rates: list[float] | None = None) -> None:
        """One row per call, at the RL step, to every logger (CSV, W&B) and to ``history``.

        The loggers are called directly rather than through ``self.log``: Lightning's step is
        the optimizer step and its result collection carries values over from earlier steps,
        which put eval/* on rows where no evaluation ran and showed a stale value where a
        metric went NaN. Here a row holds what was measured at that RL step, NaN included."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        row = {"rl_step": float(self.rl_step), **clean}
        self.history.append(row)
        if self._trainer is None or self.trainer.global_rank != 0:
            return
        wandb_loggers = self._wandb_loggers()
        for lg in self.loggers:
            if lg in wandb_loggers and group_pass_rates:
                import wandb

                lg.log_metrics({**row, "pass_rate/hist": wandb.Histogram(group_pass_rates)}, step=self.rl_step)
            else:
                lg.log_metrics(row, step=self.rl_step)

    def _log_table(self, rollout: Rollout, prepared: Prepared) -> None:
        """A W&B table of sampled completions: the prompt's image(s), question, answer,
        completion, reward and advantage, one row per completion of the first groups."""
        loggers = self._wandb_loggers()
        if not loggers:
            return
        import wandb

        n = min(16, len(rollout))
        adv = prepared.advantages
        cols = ["step", "images", "question", "answer", "completion", "reward", "advantage"]
        data = []
        for i in range(n):
            rec = rollout.records[i]
            images = [wandb.Image(im) for im in rec.get("images") or []]
            data.append(
                [
                    self.rl_step,
                    images[0] if images else None,  # the first image (a cell holds one)
                    rec["question"],
                    rec["answer"],
                    rollout.texts[i],
                    float(prepared.rewards[i]),
                    float(adv[i]),
                ]
            )
        for lg in loggers:
            lg.log_table(key="completions", columns=cols, data=data)

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
        self._pending_rng = st.get("torch_rng")  # applied at the start of the next training_step
        if self.batch_sampler is not None:
            self.batch_sampler.start = self.rl_step  # the prompts the uninterrupted run would see
