"""Evaluate a checkpoint on a benchmark: ``python -m benchmarks.evaluate checkpoint=<path> data=<benchmark>``.

``checkpoint`` is a policy folder written by training (``…/checkpoints/step-000080/policy``),
its step folder, or any Hugging Face model folder / hub id / built-in ``tiny:…`` model.
``data`` is any data config (configs/data/: mathvista, mathverse, mmk12, mmstar, mmmu,
geometry3k, geoqa, superclevr, synthetic, ...). The metrics are those the trainer logs as
``eval/*`` (framework/evaluation.py): greedy accuracy, format rate, mean length (all /
correct / incorrect), sampled accuracy and pass@k (``pass_k``, ``num_samples``). They are
printed as JSON and written to ``output`` (default ``<run dir>/metrics.json``). Progress and
skipped records are logged to stderr, so that stdout is the JSON alone.

Examples::

    python -m benchmarks.evaluate checkpoint=outputs/…/checkpoints/step-000080 data=synthetic limit=100
    python -m benchmarks.evaluate checkpoint=/models/View-R1-3B model=qwen2_5_vl_3b data=mathvista device=cuda
    python -m benchmarks.evaluate checkpoint=… data=superclevr data.path=/data/superclevr pass_k=4 num_samples=8
    python -m benchmarks.evaluate -m checkpoint=… data=mathvista,mathverse,mmstar   # several benchmarks
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError
from framework.resources import HYDRA_CONFIG_PATH

log = logging.getLogger("benchmarks.evaluate")  # not __name__: that is "__main__" under python -m


def resolve_checkpoint(checkpoint: Any) -> str:
    """A model folder (or hub id / tiny:…) from a checkpoint path as training writes it."""
    from framework.models.loading import resolve_path

    if checkpoint is None or str(checkpoint) in ("", "???"):
        raise ConfigError(
            "checkpoint is not set: checkpoint=<…/checkpoints/step-N/policy, a step folder, "
            "or a Hugging Face model folder / hub id>"
        )
    from framework.models.lora import is_adapter_folder

    p = Path(str(checkpoint)).expanduser()
    if p.is_file() and p.name == "state.ckpt":
        p = p.parent
    if p.is_dir() and not (p / "config.json").exists() and is_adapter_folder(p / "policy"):
        p = p / "policy"  # a LoRA run's step folder
    if is_adapter_folder(p):  # a LoRA adapter: evaluated on its base model, merged
        return str(p)
    if p.is_dir() and not (p / "config.json").exists() and (p / "policy" / "config.json").exists():
        p = p / "policy"
    return resolve_path(str(p) if p.exists() else str(checkpoint))


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device={name!r} is not a device; set device=auto, cpu, cuda or cuda:<index>") from e


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    import torch

    from framework.config import DataConfig, ModelConfig, RolloutConfig, check_section
    from framework.data import control_token_list, load_data, to_record
    from framework.data.validation import validate_records
    from framework.evaluation import Evaluator
    from framework.models.loading import load_model, load_model_bundle, resolve_path
    from framework.models.lora import adapter_base, is_adapter_folder, load_adapted
    from framework.registry import ROLLOUT_ENGINES, TASKS, import_plugins
    from framework.rollout.inputs import encode_prompts
    from rewards import RewardSet

    import_plugins(cfg.plugins)
    rollout = check_section(OmegaConf.to_container(cfg.rollout, resolve=True), RolloutConfig, "rollout")
    mcfg = check_section(OmegaConf.to_container(cfg.model, resolve=True), ModelConfig, "model")
    composed_data = OmegaConf.to_container(cfg.data, resolve=True)
    data = DataConfig.check_config(composed_data, "data")  # the typed section: every value read below
    data_cfg = data.options(composed_data)  # what the loaders take (a plugin task's options kept)
    task = data.task
    if task not in TASKS:
        TASKS.get(str(task))  # raises with the registered names
    engine_cls = ROLLOUT_ENGINES.get(rollout.engine)
    for key in ("batch_size", "pass_k"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be >= 1")
    if cfg.num_samples is not None and int(cfg.num_samples) < int(cfg.pass_k):
        raise ConfigError(f"num_samples={cfg.num_samples} must be >= pass_k={cfg.pass_k}")
    path = resolve_checkpoint(cfg.get("checkpoint"))
    rewards = RewardSet.from_config(OmegaConf.to_container(cfg.reward, resolve=True))
    try:
        torch.manual_seed(int(cfg.seed))
        t0 = time.perf_counter()
        device = _device(str(cfg.device))
        if is_adapter_folder(path):  # its base model (adapter_config.json) with the adapter merged
            bundle = load_model_bundle(resolve_path(adapter_base(path)))
            model = load_adapted(path, mcfg.dtype, attn_implementation=mcfg.attn_implementation).to(device)
        else:
            bundle = load_model_bundle(path)
            model = load_model(path, mcfg.dtype, trainable=False, attn_implementation=mcfg.attn_implementation)
            model = model.to(device)

        ds = load_data(data_cfg)
        split = str(cfg.split)
        if split not in ds:
            raise ConfigError(f"split={split!r} is not in data '{task}' (splits: {list(ds)}); set split=<one of them>")
        sysp, qt = data.system_prompt, data.question_template
        limit = cfg.limit
        part = ds[split] if limit is None else ds[split].select(range(min(int(limit), len(ds[split]))))
        checked, report = validate_records(
            part,
            count_prompt_tokens=lambda rec: int(encode_prompts(bundle, [rec], sysp, qt).inputs["input_ids"].shape[1]),
            max_prompt_tokens=data.max_prompt_tokens,
            on_invalid=data.on_invalid,
            split=split,
            max_image_bytes=data.max_image_bytes,
            control_tokens=data.control_tokens,
            special_tokens=control_token_list(bundle),
            max_record_bytes=data.max_record_bytes,
            max_image_pixels=data.max_image_pixels,
        )  # skipped records are logged (a warning with the summary); the data section's bounds, as in training
        records = [to_record(checked[i]) for i in range(len(checked))]

        engine = engine_cls(rollout, bundle, model)
        try:
            ev = Evaluator.from_config(
                engine,
                bundle,
                rewards,
                data,
                rollout,
                pass_k=int(cfg.pass_k),
                num_samples=cfg.num_samples,
                batch_size=int(cfg.batch_size),
            )
            t1 = time.perf_counter()
            metrics = ev.run(
                records,
                keep_details=bool(cfg.save_predictions),
                progress=lambda done, total: log.info("evaluated %d/%d", done, total),
            )
            t2 = time.perf_counter()
        finally:
            engine.close()
    finally:
        rewards.close()

    result = {
        "checkpoint": str(cfg.checkpoint),
        "model_path": path,
        "data": data.task_name or data.hub_id or task,
        "task": task,
        "split": split,
        "num_records": len(records),
        "num_invalid": report.invalid,
        "pass_k": int(cfg.pass_k),
        "num_samples": int(cfg.num_samples or cfg.pass_k),
        "metrics": metrics,
        "timing_s": {"load": round(t1 - t0, 2), "evaluate": round(t2 - t1, 2)},
        "device": str(device),
    }
    out = Path(cfg.output) if cfg.output else Path(_run_dir()) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if cfg.save_predictions:
        with open(out.with_name("predictions.jsonl"), "w", encoding="utf-8") as f:
            for d in ev.details:
                f.write(json.dumps(d, default=str) + "\n")
    result["output"] = str(out)
    return result


def _run_dir() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # noqa: BLE001 - called without Hydra (tests)
        return os.getcwd()


@hydra.main(config_path=HYDRA_CONFIG_PATH, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from framework.run import setup_console_logging, user_errors

    setup_console_logging(stream="stderr")  # stdout: the JSON result alone
    with user_errors():
        result = evaluate(cfg)
    print(json.dumps(result, indent=2), flush=True)
    return result["metrics"].get("eval/accuracy")


HELP = """\
apo-rl-eval: evaluate a checkpoint (or any model folder / tiny:... model) on a benchmark data
set and print the metrics the trainer logs as eval/* as JSON (greedy accuracy, format rate,
lengths, sampled accuracy, pass@k); also written to `output` (default <run dir>/metrics.json).

  apo-rl-eval checkpoint=outputs/.../checkpoints/step-000080 data=synthetic limit=100
  apo-rl-eval checkpoint=/models/View-R1-3B model=qwen2_5_vl_3b data=mathvista device=cuda
  apo-rl-eval -m checkpoint=... data=mathvista,mathverse,mmstar     several benchmarks"""


def cli() -> None:
    """The ``apo-rl-eval`` command (``python -m benchmarks.evaluate`` runs the same)."""
    from framework.run import run_cli

    run_cli(main, config_name="evaluate", prog="apo-rl-eval", about=HELP)


if __name__ == "__main__":
    cli()
