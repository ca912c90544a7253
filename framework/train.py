"""Build every component from the config and run Lightning's fit. ``train(cfg)`` is what
``python -m framework.run`` calls; tests call it with configs composed by Hydra. It reads as
its list of builders, each taking what the earlier ones built:

    continue_run -> check_early -> build_run_setup -> build_processor -> build_data
    -> build_models (policy, reference) -> build_engine -> build_module -> build_trainer -> fit

Order matters for clear errors: everything that can be checked without a model (config
sections, algorithm options, registered names, reward parameters, every data record) is
checked before any weight loads. The builders import Lightning, transformers and the module
where they use them, so that ``check_early`` (used by the sweep runner) stays light.
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

from framework.config import ConfigError, canonical_dtype, check_machine, validate_run_config
from framework.loggers import finish_wandb, make_loggers, wandb_mode
from framework.progress import progress_callback, use_rich_bar
from framework.registry import ROLLOUT_ENGINES, TASKS, import_plugins
from framework.rollout.base import EngineSpec
from framework.rollout.inputs import PromptEncoder

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
    import_plugins(cfg.get("plugins"))  # before the sections: a plugin task's options are checked with them
    sections = validate_run_config(cfg)
    from algorithms.base import build_algorithm
    from rewards import RewardSet

    t = sections["trainer"]
    check_machine(t)
    # built once: the schedules' clock ends at max_steps x ppo_epochs x num_mini_batches
    # optimizer steps (algorithms/base.py, "step clock")
    algorithm = build_algorithm(
        OmegaConf.to_container(cfg.algorithm, resolve=True), rl_steps=t.max_steps, num_mini_batches=t.num_mini_batches
    )
    rewards = RewardSet.from_config(OmegaConf.to_container(cfg.reward, resolve=True))
    engine_cls = ROLLOUT_ENGINES.get(sections["rollout"].engine)
    if hasattr(engine_cls, "check_available"):  # e.g. vLLM not installed: say how, before any model loads
        engine_cls.check_available()
    from framework.recipes import recipe_note

    note = recipe_note(cfg)
    if note:  # the algorithm's published recipe, and where this run departs from it
        log.info("apo-rl: %s", note)
    task = sections["data"].task
    if task not in ("local", "hub") and task not in TASKS:
        TASKS.get(task)  # raises with the list of registered tasks
    return {"sections": sections, "algorithm": algorithm, "rewards": rewards}


def continue_run(cfg: DictConfig):
    """``resume=`` continues the stored run (framework/checkpoint.py :func:`resume_config`): its
    config, its W&B run, written into the folder the user names (``output_dir=`` /
    ``hydra.run.dir=``) or else the run folder that holds the checkpoint; overrides are checked
    against what may change on resume. Returns the config to run and the checkpoint's
    :class:`RunInfo` (None: a new run; ``complete``: the run has nothing left to train)."""
    from framework.checkpoint import explicit_overrides, named_run_dir, resume_config

    if not cfg.get("resume"):
        return cfg, None
    from hydra.core.hydra_config import HydraConfig

    hydra_overrides, named = None, None
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        hydra_overrides = list(hc.overrides.task)  # Hydra keeps hydra.* out of these
        named = named_run_dir(list(hc.overrides.hydra), hc.runtime.output_dir)
    explicit = explicit_overrides(cfg, _default_config(), hydra_overrides, named)
    merged, info, d = resume_config(cfg, explicit)
    if info is not None and info.complete:
        log.info(
            "apo-rl: the run in %s is complete: checkpoint %s is its final RL step (%d); nothing to train "
            "(a larger trainer.max_steps extends it)",
            merged.output_dir,
            d,
            info.rl_step,
        )
        info.checkpoint = d
        return merged, info
    log.info("apo-rl: resuming %s (RL step %s) into %s", d, info.rl_step if info else "?", merged.output_dir)
    return merged, info


def _default_config() -> DictConfig:
    """The config composed without any override (what ``apo-rl`` runs), on the same search path
    as the running app (a user's ``--config-dir`` included) when there is one."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    from framework.resources import compose_config

    if GlobalHydra.instance().is_initialized():
        return compose("config")
    return compose_config()


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun, SLURM, Lightning's own)."""
    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def _has_images(ds, n: int = 64) -> bool:
    """Whether any of the first ``n`` records of ``ds`` has an image."""
    if "images" not in getattr(ds, "column_names", []):
        return False
    return any(bool(imgs) for imgs in ds.select(range(min(n, len(ds))))["images"])


REAL_SIZE_PARAMS = 100_000_000  # above this, training on a CPU is a mistake unless asked for by name


def _check_device_for_model(path: str, s: dict) -> None:
    """A real-size model with ``trainer.accelerator=auto`` on a machine without a GPU stops here,
    before any weight loads (it would train on the CPU for days)."""
    if s["trainer"].accelerator != "auto" or torch.cuda.is_available():
        return
    from transformers import AutoConfig

    from framework.memory import count_params

    n = count_params(AutoConfig.from_pretrained(path)).total
    if n > REAL_SIZE_PARAMS:
        raise ConfigError(
            f"model.name_or_path={s['model'].name_or_path} has {n / 1e9:.2f}B parameters and this machine has no GPU "
            "(trainer.accelerator=auto): run on a GPU machine (a paper's whole recipe: experiment=view_r1_3b, "
            "configs/experiment/), or set trainer.accelerator=cpu to train on the CPU anyway"
        )


def _print_memory_budget(path: str, s: dict, algorithm) -> None:
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
            prompt_tokens=s["data"].max_prompt_tokens,
        )
    except Exception as e:  # an estimate must never stop a run
        log.warning("apo-rl: no memory budget (%s: %s)", type(e).__name__, e)
        return
    b.log()


# ----------------------------------------------------------------------------- builders
# train() is the list of these, in order; each takes what the earlier ones built and is
# testable alone (tests/test_builders.py). The order matters for clear errors (everything that
# needs no weights first) and keeps the RNG stream of a run as it was.


@dataclass
class RunSetup:
    """Where the run writes and what it continues: the output folder, the Lightning checkpoint
    to resume (None: a new run), the config stored with every checkpoint, the W&B run id."""

    out: Path
    ckpt_path: str | None
    run_config: dict
    wandb_id: str | None
    info: Any = None  # framework.checkpoint.RunInfo of a resumed run


def build_run_setup(cfg: DictConfig, s: dict, info) -> RunSetup:
    """The output folder (created), the resume checkpoint, the W&B id; seeds every RNG."""
    import lightning as L

    from framework.checkpoint import plain, resolve_resume

    if not cfg.get("output_dir"):
        raise ConfigError("output_dir is not set: give the run's folder, e.g. output_dir=outputs/my_run")
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_resume(cfg.get("resume"), s["trainer"].strategy)
    wandb_id = info.wandb_id if info and info.wandb_id else None
    if wandb_id is None and s["logger"].wandb and wandb_mode(s["logger"]) != "disabled":
        from framework.loggers import new_wandb_id

        wandb_id = new_wandb_id()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.use_deterministic_algorithms(False)
    return RunSetup(out=out, ckpt_path=ckpt_path, run_config=plain(cfg), wandb_id=wandb_id, info=info)


def build_processor(s: dict, algorithm):
    """The model's checks that need no weights (device, options, LoRA targets, memory budget),
    then its tokenizer and processor: ``(path, bundle)``."""
    from framework.models.loading import check_model_options, load_model_bundle, resolve_path

    path = resolve_path(s["model"].name_or_path)
    _check_device_for_model(path, s)
    check_model_options(path, s["model"])  # e.g. freeze_vision_tower on a text-only model
    if s["model"].lora.enabled:  # targets, vision tower, adapter folder: checked on a meta model
        from framework.models.lora import check_lora

        check_lora(path, s["model"].lora)
    _print_memory_budget(path, s, algorithm)
    return path, load_model_bundle(path)


def to_records(rows: list[dict]) -> list[dict]:
    """The DataLoader's collate: data set rows -> records (framework/data/schema.py)."""
    from framework.data import to_record

    return [to_record(r) for r in rows]


class RefillPrompts:
    """The prompts of DAPO's refill rounds (``algorithm.filter_groups``): an endless iterator of
    ``n`` records drawn at random from ``dataset``, its own seeded stream (``seed + 7``)."""

    def __init__(self, dataset, n: int, seed: int):
        self.dataset, self.n = dataset, n
        self.rng = random.Random(seed + 7)

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        return to_records([self.dataset[self.rng.randrange(len(self.dataset))] for _ in range(self.n)])


@dataclass
class TrainData:
    """The checked data of a run: the train split, the held-out records, the step sampler and
    loader, and the refill prompts."""

    train: Any
    eval_records: list[dict]
    sampler: StepBatchSampler
    loader: torch.utils.data.DataLoader
    refills: RefillPrompts


def build_data(cfg: DictConfig, s: dict, encoder: PromptEncoder, bundle, out: Path) -> TrainData:
    """Every record checked with the tokenizer only, before any weight loads (each problem goes
    to ``<run>/data_report.jsonl``; nothing dropped silently); the splits, the held-out records
    and the loader of the RL steps' prompts."""
    from framework.data import REPORT_NAME, control_token_list, prepare_data, to_record

    data_cfg = s["data"].options(OmegaConf.to_container(cfg.data, resolve=True))
    splits, _ = prepare_data(
        data_cfg,
        count_prompt_tokens=encoder.count_tokens,
        special_tokens=control_token_list(bundle),
        report_path=out / REPORT_NAME if _launch_rank() == 0 else None,
        splits=("train", "test"),
    )
    if "train" not in splits:
        raise ConfigError(f"data has no 'train' split (splits: {list(splits)}): point data at a source with one")
    if not bundle.is_vl and _has_images(splits["train"]):
        raise ConfigError(
            f"model.name_or_path={s['model'].name_or_path} is a text-only model and the training records have "
            "images, which it would silently drop: use a vision-language model (or data=synthetic_text)"
        )
    t = s["trainer"]
    if len(splits["train"]) < t.prompts_per_step:  # known now, before any weight loads
        raise ConfigError(
            f"trainer.prompts_per_step={t.prompts_per_step} is larger than the train split "
            f"({len(splits['train'])} records)"
        )
    train_ds = splits["train"]
    eval_records = (
        [to_record(splits["test"][i]) for i in range(min(t.eval_size, len(splits["test"])))] if "test" in splits else []
    )
    sampler = StepBatchSampler(len(train_ds), t.prompts_per_step, int(cfg.seed))
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=sampler, collate_fn=to_records, num_workers=t.num_workers
    )
    return TrainData(
        train_ds, eval_records, sampler, loader, RefillPrompts(train_ds, t.prompts_per_step, int(cfg.seed))
    )


def build_models(path: str, s: dict, algorithm, seed: int):
    """The trained policy and the frozen reference: ``(policy, reference)``.

    The policy is loaded in the master dtype (fp32 by default: AdamW steps fp32 weights, and
    Lightning's bf16-mixed / FSDP's MixedPrecisionPolicy computes in model.dtype); the frozen
    reference is only ever run, so it is loaded in the compute dtype, and only when the
    algorithm has a KL term. With LoRA (model.lora) the frozen base is loaded in the compute
    dtype, the adapters are the master weights, and the reference is the policy with its
    adapters disabled: no second copy (reference None)."""
    from framework.models.loading import DTYPES, load_model

    m = s["model"]
    lora = m.lora.enabled
    policy = load_model(
        path,
        m.dtype if lora else m.master_dtype,
        trainable=True,
        gradient_checkpointing=m.gradient_checkpointing,
        freeze_vision_tower=m.freeze_vision_tower,
        attn_implementation=m.attn_implementation,
    )
    if lora:
        from framework.models.lora import apply_lora

        policy = apply_lora(
            policy,
            m.lora,
            adapter_dtype=DTYPES[m.master_dtype],
            gradient_checkpointing=m.gradient_checkpointing,
            seed=seed,
        )
    reference = (
        load_model(path, m.dtype, trainable=False, attn_implementation=m.attn_implementation)
        if algorithm.needs_reference and not lora
        else None
    )
    return policy, reference


def build_engine(s: dict, bundle) -> EngineSpec:
    """The rollout engine of ``rollout.engine``, built by the module once the device is known
    (an engine with its own weights, vLLM, runs in ``rollout.dtype``: the compute dtype unless
    set, derived once by :func:`framework.config.validate_run_config`)."""
    return EngineSpec(ROLLOUT_ENGINES.get(s["rollout"].engine), s["rollout"], bundle)


def build_module(
    s: dict, policy, reference, bundle, algorithm, rewards, engine: EngineSpec, data: TrainData, seed: int
):
    """The Lightning module of the RL step (framework/module.py)."""
    from framework.module import RLModule

    return RLModule(
        policy=policy,
        reference=reference,
        bundle=bundle,
        algorithm=algorithm,
        rewards=rewards,
        engine=engine,
        encoder=PromptEncoder(bundle, s["data"].system_prompt, s["data"].question_template),
        sections=s,
        eval_records=data.eval_records,
        refills=data.refills,
        batch_sampler=data.sampler,
        seed=seed,
    )


def build_trainer(s: dict, setup: RunSetup, bundle, updates_per_step: int):
    """Lightning's Trainer (strategy, precision, loggers, progress in RL steps) and the
    checkpoint callback: ``(trainer, checkpoint_callback)``."""
    import lightning as L

    from framework.checkpoint import RLCheckpoint
    from framework.distributed import make_strategy
    from framework.models.loading import DTYPES

    m, t = s["model"], s["trainer"]
    export = canonical_dtype(m.export_dtype or m.dtype)
    ckpt_cb = RLCheckpoint(
        setup.out / "checkpoints",
        every=t.save_every,
        bundle=bundle,
        export_dtype=DTYPES[export] if export != canonical_dtype(m.master_dtype) else None,
        run_config=setup.run_config,
        wandb_id=setup.wandb_id,
        export_merged=m.lora.enabled and m.lora.export_merged,
        keep_last=t.keep_last,
        max_steps=t.max_steps,
    )
    info = setup.info
    trainer = L.Trainer(
        max_steps=t.max_steps * updates_per_step,  # Lightning counts optimizer steps
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(t),
        precision=t.precision,
        logger=make_loggers(
            s["logger"],
            setup.run_config,
            setup.out,
            wandb_id=setup.wandb_id,
            resumed_step=info.rl_step if info else None,
        ),
        # progress in RL steps: Lightning's rich bar in a terminal, else a plain line per log_every
        callbacks=[ckpt_cb, progress_callback(t.progress_bar, t.log_every, t.max_steps)],
        log_every_n_steps=t.log_every,
        enable_checkpointing=False,
        enable_progress_bar=use_rich_bar(t.progress_bar),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(setup.out),
        use_distributed_sampler=False,
    )
    return trainer, ckpt_cb


def train(cfg: DictConfig) -> RunResult:
    """One run: the checks that need no model, then the builders in order, then Lightning's fit."""
    cfg, info = continue_run(cfg)  # resume=: the stored run's config, before anything else
    if info is not None and info.complete:  # its final checkpoint: a finished run, nothing to do
        return RunResult(output_dir=Path(info.output_dir), history=[], final_checkpoint=info.checkpoint)
    early = check_early(cfg)
    s, algorithm, rewards = early["sections"], early["algorithm"], early["rewards"]
    setup = build_run_setup(cfg, s, info)
    path, bundle = build_processor(s, algorithm)
    encoder = PromptEncoder(bundle, s["data"].system_prompt, s["data"].question_template)
    data = build_data(cfg, s, encoder, bundle, setup.out)
    policy, reference = build_models(path, s, algorithm, int(cfg.seed))
    engine = build_engine(s, bundle)
    module = build_module(s, policy, reference, bundle, algorithm, rewards, engine, data, int(cfg.seed))
    trainer, ckpt_cb = build_trainer(s, setup, bundle, module.updates_per_step)
    return fit(cfg, s, setup, module, trainer, ckpt_cb, data, rewards)


def fit(cfg: DictConfig, s: dict, setup: RunSetup, module, trainer, ckpt_cb, data: TrainData, rewards) -> RunResult:
    """Lightning's fit, then the run's end: rewards closed, W&B finished, a stop by signal raised."""
    from framework.checkpoint import StopTraining
    from framework.models.loading import check_state_matches

    out, ckpt_path = setup.out, setup.ckpt_path
    if ckpt_path and Path(ckpt_path).is_file():  # another model's state.ckpt: one line, not Lightning's traceback
        check_state_matches(
            ckpt_path, module.state_dict(), what=f"resume={cfg.get('resume')}", model=s["model"].name_or_path
        )
    log.info("apo-rl: algorithm=%s model=%s outputs -> %s", cfg.algorithm.name, s["model"].name_or_path, out)
    try:
        # weights_only: a checkpoint holds tensors and plain containers, never code to run
        trainer.fit(module, train_dataloaders=data.loader, ckpt_path=ckpt_path, weights_only=True)
    except StopTraining:  # a signal abandoned an evaluation or a rollout: the last step is saved
        pass
    finally:
        rewards.close()
        finish_wandb(trainer.loggers)  # the W&B run ends with the training (a next train() starts its own)
        ckpt_cb.restore_signals()  # a signal until here leaves a run whose final checkpoint is written complete
    stopped = ckpt_cb.stop_error(module.rl_step, out)  # SIGTERM/SIGUSR1: Preempted (75); Ctrl-C: Interrupted (130)
    if stopped is not None:
        raise stopped
    if trainer.global_rank == 0:
        log.info(
            f"apo-rl: done. metrics: {out / 'csv' / 'metrics.csv'}; checkpoints: {out / 'checkpoints'}"
            + (
                f"; W&B offline run: {out / 'wandb'}"
                if s["logger"].wandb and wandb_mode(s["logger"]) != "disabled"
                else ""
            )
        )
    return RunResult(output_dir=out, history=module.history, final_checkpoint=ckpt_cb.last)
