"""Build every component from the config and run Lightning's fit. ``train(cfg)`` is what
``python -m framework.run`` calls; tests call it with configs composed by Hydra.

Order matters for clear errors: everything that can be checked without a model (config
sections, algorithm options, registered names, reward parameters) is checked first.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from framework.config import ConfigError, canonical_dtype, validate_run_config
from framework.registry import ROLLOUT_ENGINES, TASKS, import_plugins

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    history: list[dict[str, float]]
    final_checkpoint: Path | None

    def metric(self, key: str) -> list[float]:
        return [row[key] for row in self.history if key in row]


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of prompt indices for RL steps ``start, start+1, ...``: an endless sequence of
    seeded permutations, so a resumed run sees the prompts the uninterrupted run would."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        if n < batch_size:
            raise ConfigError(f"trainer.prompts_per_step={batch_size} is larger than the train split ({n} records)")
        self.n, self.bs, self.seed, self.start = n, batch_size, seed, start

    def batch(self, step: int) -> list[int]:
        per_epoch = self.n // self.bs
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)).tolist()
        return perm[k * self.bs : (k + 1) * self.bs]

    def __iter__(self):
        from framework.distributed import world as rank_world

        rank, world = rank_world()
        if self.bs % world:
            raise ConfigError(
                f"trainer.prompts_per_step={self.bs} must be divisible by the number of ranks ({world}): "
                "each group of G completions stays on one rank"
            )
        per = self.bs // world
        for s in itertools.count(self.start):
            yield self.batch(s)[rank * per : (rank + 1) * per]  # this rank's contiguous shard of the global batch


def check_early(cfg: DictConfig) -> dict[str, Any]:
    """All checks that need no model. Returns typed sections + the algorithm and rewards."""
    import_plugins(cfg.get("plugins") or [])
    sections = validate_run_config(cfg)
    from algorithms.base import build_algorithm
    from rewards.base import RewardSet

    t = sections["trainer"]
    algo_cfg = OmegaConf.to_container(cfg.algorithm, resolve=True)
    pre = build_algorithm(algo_cfg, total_steps=1)
    total = t.max_steps * pre.ppo_epochs * t.num_mini_batches
    algorithm = build_algorithm(algo_cfg, total_steps=total)
    rewards = RewardSet.from_config(OmegaConf.to_container(cfg.reward, resolve=True))
    engine_cls = ROLLOUT_ENGINES.get(sections["rollout"].engine)
    if hasattr(engine_cls, "check_available"):  # e.g. vLLM not installed: say how, before any model loads
        engine_cls.check_available()
    task = cfg.data.get("task")
    if task not in ("local", "hub") and task not in TASKS:
        TASKS.get(task)  # raises with the list of registered tasks
    return {"sections": sections, "algorithm": algorithm, "rewards": rewards}


def _loggers(cfg, sections, out: Path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    lg = sections["logger"]
    loggers = []
    if lg.csv:
        loggers.append(CSVLogger(save_dir=str(out), name="", version="csv"))
    if lg.wandb and lg.wandb_mode != "disabled":
        os.environ.setdefault("WANDB_MODE", lg.wandb_mode)
        os.environ["WANDB_MODE"] = lg.wandb_mode
        os.environ.setdefault("WANDB_SILENT", "true")
        flat = OmegaConf.to_container(cfg, resolve=True)
        flat.pop("hydra", None)
        loggers.append(
            WandbLogger(
                project=lg.project, group=lg.group, name=lg.name, tags=list(lg.tags), save_dir=str(out), config=flat
            )
        )
    return loggers


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun, SLURM, Lightning's own)."""
    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def _print_memory_budget(path: str, s: dict, algorithm, cfg) -> None:
    """Print the per-device memory budget (framework/memory.py) before any weight loads."""
    from framework.memory import budget_for_run

    t = s["trainer"]
    if _launch_rank() != 0:
        return
    devices = t.devices if isinstance(t.devices, int) and t.devices > 0 else 1
    try:
        b = budget_for_run(
            path,
            s,
            algorithm,
            world_size=devices * t.num_nodes,
            prompt_tokens=int(cfg.data.get("max_prompt_tokens", 1024)),
        )
    except Exception as e:  # an estimate must never stop a run
        log.warning("apo-rl: no memory budget (%s: %s)", type(e).__name__, e)
        return
    b.log()


def train(cfg: DictConfig) -> RunResult:
    import lightning as L

    from framework.checkpoint import RLCheckpoint, resolve_resume
    from framework.data import load_data, to_record
    from framework.data.validation import validate_records
    from framework.distributed import make_strategy
    from framework.models.loading import DTYPES, load_model, load_model_bundle, resolve_path
    from framework.module import RLModule
    from framework.rollout.inputs import encode_prompts

    early = check_early(cfg)
    s = early["sections"]
    algorithm, rewards = early["algorithm"], early["rewards"]
    out = Path(cfg.get("output_dir") or "outputs/run").resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_resume(cfg.get("resume"), s["trainer"].strategy)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.use_deterministic_algorithms(False)

    # ---- model + processor
    path = resolve_path(s["model"].name_or_path)
    _print_memory_budget(path, s, algorithm, cfg)
    bundle = load_model_bundle(path)
    m = s["model"]
    # the policy is loaded in the master dtype (fp32 by default: AdamW steps fp32 weights, and
    # Lightning's bf16-mixed / FSDP's MixedPrecisionPolicy computes in model.dtype); the frozen
    # reference is only ever run, so it is loaded in the compute dtype
    policy = load_model(
        path,
        m.master_dtype,
        trainable=True,
        gradient_checkpointing=m.gradient_checkpointing,
        freeze_vision_tower=m.freeze_vision_tower,
        attn_implementation=m.attn_implementation,
    )
    reference = (
        load_model(path, m.dtype, trainable=False, attn_implementation=m.attn_implementation)
        if algorithm.needs_reference
        else None
    )

    # ---- data (checked record by record; nothing dropped silently)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    ds = load_data(data_cfg)
    sysp, qt = data_cfg.get("system_prompt"), data_cfg.get("question_template", "{question}")

    def count_tokens(rec: dict) -> int:
        return int(encode_prompts(bundle, [rec], sysp, qt).inputs["input_ids"].shape[1])

    splits = {}
    for split in ("train", "test"):
        if split not in ds:
            continue
        checked, report = validate_records(
            ds[split],
            count_prompt_tokens=count_tokens,
            max_prompt_tokens=int(data_cfg.get("max_prompt_tokens", 1024)),
            on_invalid=data_cfg.get("on_invalid", "error"),
            split=split,
        )
        splits[split] = checked
    if "train" not in splits:
        raise ConfigError(f"data has no 'train' split (splits: {list(ds)})")
    train_ds = splits["train"]
    eval_records = (
        [to_record(splits["test"][i]) for i in range(min(s["trainer"].eval_size, len(splits["test"])))]
        if "test" in splits
        else []
    )

    t = s["trainer"]
    sampler = StepBatchSampler(len(train_ds), t.prompts_per_step, int(cfg.seed))
    collate = lambda rows: [to_record(r) for r in rows]  # noqa: E731
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate, num_workers=t.num_workers)

    def extra_prompts():
        rng = random.Random(int(cfg.seed) + 7)
        while True:
            yield [to_record(train_ds[rng.randrange(len(train_ds))]) for _ in range(t.prompts_per_step)]

    engine_cls = ROLLOUT_ENGINES.get(s["rollout"].engine)
    if s["rollout"].dtype is None:  # an engine with its own weights (vLLM) runs in the compute dtype
        s["rollout"].dtype = canonical_dtype(m.dtype)

    def engine_factory(model):
        return engine_cls(s["rollout"], bundle, model)

    module = RLModule(
        policy=policy,
        reference=reference,
        bundle=bundle,
        algorithm=algorithm,
        rewards=rewards,
        engine_factory=engine_factory,
        sections=s,
        data_cfg=data_cfg,
        eval_records=eval_records,
        extra_prompts=extra_prompts(),
        batch_sampler=sampler,
        seed=int(cfg.seed),
    )

    export = canonical_dtype(m.export_dtype or m.dtype)
    ckpt_cb = RLCheckpoint(
        out / "checkpoints",
        every=t.save_every,
        bundle=bundle,
        export_dtype=DTYPES[export] if export != canonical_dtype(m.master_dtype) else None,
    )
    trainer = L.Trainer(
        max_steps=t.max_steps * module.updates_per_step,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(t),
        precision=t.precision,
        logger=_loggers(cfg, s, out),
        callbacks=[ckpt_cb],
        log_every_n_steps=t.log_every,
        enable_checkpointing=False,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
        use_distributed_sampler=False,
    )
    log.info("apo-rl: algorithm=%s model=%s outputs -> %s", cfg.algorithm.name, s["model"].name_or_path, out)
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    finally:
        rewards.close()
    if trainer.global_rank == 0:
        log.info(
            f"apo-rl: done. metrics: {out / 'csv' / 'metrics.csv'}; checkpoints: {out / 'checkpoints'}"
            + (
                f"; W&B offline run: {out / 'wandb'}"
                if s["logger"].wandb and s["logger"].wandb_mode != "disabled"
                else ""
            )
        )
    return RunResult(output_dir=out, history=module.history, final_checkpoint=ckpt_cb.last)
