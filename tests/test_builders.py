"""train() is a list of named builders (framework/train.py); each one, alone, on the tiny
default config: what it builds and what it refuses."""

from pathlib import Path

import pytest
import torch

from framework.config import ConfigError
from framework.progress import PlainProgress, RLProgressBar, progress_callback
from framework.resources import compose_config
from framework.rollout.base import EngineSpec
from framework.rollout.hf import HFGenerateEngine
from framework.rollout.inputs import PromptEncoder, encode_prompts
from framework.train import (
    RefillPrompts,
    build_data,
    build_engine,
    build_models,
    build_module,
    build_processor,
    build_run_setup,
    build_trainer,
    check_early,
    to_records,
)

SMALL = [
    "trainer.prompts_per_step=4",
    "rollout.group_size=2",
    "rollout.max_new_tokens=8",
    "trainer.eval_size=3",
    "logger.wandb=false",
    "trainer.progress_bar=false",
]


def _early(tmp_path: Path, *overrides):
    cfg = compose_config([f"output_dir={tmp_path}", *SMALL, *overrides])
    return cfg, check_early(cfg)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default run's sections, setup, processor and data (the checks need no weights)."""
    tmp = tmp_path_factory.mktemp("run")
    cfg, early = _early(tmp)
    s = early["sections"]
    setup = build_run_setup(cfg, s, None)
    path, bundle = build_processor(s, early["algorithm"])
    encoder = PromptEncoder(bundle, s["data"].system_prompt, s["data"].question_template)
    data = build_data(cfg, s, encoder, bundle, setup.out)
    yield cfg, early, setup, path, bundle, encoder, data
    early["rewards"].close()


def test_run_setup_makes_the_folder_and_refuses_none(tmp_path):
    cfg, early = _early(tmp_path / "out")
    setup = build_run_setup(cfg, early["sections"], None)
    assert setup.out == (tmp_path / "out").resolve() and setup.out.is_dir()
    assert setup.ckpt_path is None and setup.wandb_id is None  # a new run, W&B off
    assert setup.run_config["algorithm"]["name"] == "grpo"
    cfg.output_dir = None
    with pytest.raises(ConfigError, match="output_dir is not set"):
        build_run_setup(cfg, early["sections"], None)
    early["rewards"].close()


def test_prompt_encoder_is_the_one_processing_path(built):
    _, _, _, _, bundle, encoder, data = built
    recs = data.eval_records[:2]
    want = encode_prompts(bundle, recs, encoder.system_prompt, encoder.question_template)
    got = encoder(recs)
    assert torch.equal(got.inputs["input_ids"], want.inputs["input_ids"])
    assert encoder.count_tokens(recs[0]) == int(
        encode_prompts(bundle, recs[:1], encoder.system_prompt, encoder.question_template).inputs["input_ids"].shape[1]
    )


def test_data_builder(built):
    cfg, early, _, _, _, _, data = built
    assert len(data.eval_records) == 3  # trainer.eval_size
    assert all({"question", "answer", "images"} <= set(r) for r in data.eval_records)
    batch = next(iter(data.loader))
    assert isinstance(batch, list) and len(batch) == 4 and all("question" in r for r in batch)
    # the refill prompts: their own seeded stream, records of prompts_per_step prompts
    a, b = RefillPrompts(data.train, 4, 0), RefillPrompts(data.train, 4, 0)
    first = next(a)
    assert len(first) == 4 and [r["id"] for r in first] == [r["id"] for r in next(b)]
    assert [r["id"] for r in next(iter(data.refills))] == [r["id"] for r in first]  # seed 0, as cfg.seed
    assert to_records([data.train[0]])[0]["id"] == data.train[0]["id"]


def test_data_builder_refuses_a_batch_larger_than_the_split(built, tmp_path):
    _, _, _, _, bundle, encoder, _ = built
    cfg, early = _early(tmp_path, "trainer.prompts_per_step=100000")
    with pytest.raises(ConfigError, match=r"prompts_per_step=100000 is larger than the train split"):
        build_data(cfg, early["sections"], encoder, bundle, tmp_path)
    early["rewards"].close()


def test_models_builder_loads_a_reference_only_for_a_kl_term(built, tmp_path):
    cfg, early, _, path, _, _, _ = built
    s = early["sections"]
    policy, reference = build_models(path, s, early["algorithm"], 0)  # GRPO: beta 0.04
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    assert any(p.requires_grad for p in policy.parameters())
    cfg0, no_kl = _early(tmp_path, "algorithm.kl.coef=0")
    _, ref0 = build_models(path, no_kl["sections"], no_kl["algorithm"], 0)
    assert ref0 is None
    cfgl, lora = _early(tmp_path, "model.lora.enabled=true")
    lp, lref = build_models(path, lora["sections"], lora["algorithm"], 0)
    assert lref is None  # the policy with its adapters disabled is the reference
    assert all("lora_" in n for n, p in lp.named_parameters() if p.requires_grad)
    for e in (no_kl, lora):
        e["rewards"].close()


def test_engine_module_and_trainer_builders(built, tmp_path):
    cfg, early, setup, path, bundle, _, data = built
    s = early["sections"]
    engine = build_engine(s, bundle)
    assert isinstance(engine, EngineSpec) and engine.cls is HFGenerateEngine
    assert s["rollout"].dtype == "float32"  # the compute dtype, for an engine with its own weights
    policy, reference = build_models(path, s, early["algorithm"], 0)
    module = build_module(s, policy, reference, bundle, early["algorithm"], early["rewards"], engine, data, 0)
    assert module.updates_per_step == 1 and not module.off_policy
    assert module.refills is data.refills and module.batch_sampler is data.sampler
    assert isinstance(engine.build(policy), HFGenerateEngine)
    trainer, ckpt_cb = build_trainer(s, setup, bundle, updates_per_step=4)
    assert trainer.max_steps == s["trainer"].max_steps * 4  # Lightning counts optimizer steps
    assert ckpt_cb.max_steps == s["trainer"].max_steps
    assert any(isinstance(c, PlainProgress) for c in trainer.callbacks)


def test_the_progress_bar_is_given_its_total():
    """It reads no module: the number of RL steps is given when it is built."""
    bar = RLProgressBar(7)
    assert bar.total_train_batches == 7
    assert isinstance(progress_callback(False, 1, 7), PlainProgress)
