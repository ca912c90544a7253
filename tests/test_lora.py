"""LoRA adapters (model.lora, framework/models/lora.py) end to end on the tiny models.

Every expected number comes from outside the code under test: a separately loaded base
model (the reference), the base model's own weight file (bit-identical after training),
``PeftModel.from_pretrained`` and ``from_pretrained`` of the checkpoint folders (log-probs of
the adapter and of the merged export), a run without interruption (resume), autograd without
gradient checkpointing, and vLLM's own log-probs (the merged sync).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image
from hydra import compose, initialize_config_dir

from framework.config import ConfigError, LoraOptions
from framework.logprobs import completion_logprobs
from framework.models.loading import load_model, load_model_bundle
from framework.models.lora import apply_lora, base_name, reference_model
from framework.rollout.base import SamplingParams
from framework.rollout.hf import HFGenerateEngine
from framework.rollout.inputs import encode_prompts, expand_inputs, training_inputs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
SYSTEM = "A conversation between User and Assistant."
TOL = 1e-5  # fp32 log-probs of the same function computed two ways (measured ~1e-6)


def cfg_for(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(
            "config",
            overrides=[f"output_dir={tmp_path}", "logger.wandb=false", "trainer.progress_bar=false", *overrides],
        )


def vl_records():
    return [
        {"question": "How many shapes are in the image?", "images": [make_image(56, 0)], "answer": "1"},
        {"question": "What color is the top-left shape?", "images": [make_image(84, 3)], "answer": "red"},
    ]


def logprobs(model, prompts, n, gen):
    """Per-token log-probs of ``gen``'s completions under ``model`` (the trainer's path)."""
    pin = expand_inputs(prompts.inputs, n, prompts.images_per_sample)
    kw = training_inputs(pin, gen.completion_ids, gen.completion_mask, model)
    with torch.no_grad():
        lp, _ = completion_logprobs(model, kw, gen.completion_ids.shape[1], with_entropy=False)
    return lp * gen.completion_mask


def perturb_adapters(model, seed=0, scale=0.5):
    """An update's worth of change to the adapters (B = 0 at init would make them a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def lora_policy(path, **opts):
    return apply_lora(load_model(path), LoraOptions(enabled=True, **opts), adapter_dtype=torch.float32)


@pytest.fixture(scope="module")
def vl_rollout(tiny_vl_path, vl_bundle):
    """Prompts with images and 4 sampled completions each, from the base model."""
    base = load_model(tiny_vl_path, trainable=False)
    prompts = encode_prompts(vl_bundle, vl_records(), SYSTEM)
    torch.manual_seed(0)
    gen = HFGenerateEngine(None, vl_bundle, base).generate(prompts, 4, SamplingParams(max_new_tokens=12))
    return base, prompts, gen


# =========================================================================== options
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora.r=64"], r"model\.lora\.r=64 is set but model\.lora\.enabled=false.*model\.lora\.enabled=true"),
        (["model.lora.enabled=true", "model.lora.r=0"], r"model\.lora\.r=0 must be an integer > 0"),
        (["model.lora.enabled=true", "model.lora.alpha=-1"], r"model\.lora\.alpha=-1.0 must be > 0"),
        (["model.lora.enabled=true", "model.lora.dropout=1.5"], r"model\.lora\.dropout=1\.5 must be in \[0, 1\)"),
        (
            ["model.lora.enabled=true", "model.lora.init_lora_weights=pissa"],
            r"init_lora_weights='pissa' is not allowed.*rewrite the base weights",
        ),
        (
            ["model.lora.enabled=true", "model.lora.path=/some/adapter", "model.lora.r=64"],
            r"model\.lora\.r=64 is set but model\.lora\.path=/some/adapter brings its own .*drop model\.lora\.r",
        ),
        (
            ["model.lora.enabled=true", "+model.lora.rank=8"],
            r"unknown key 'model\.lora\.rank'.*allowed keys in model\.lora: enabled, r, alpha",
        ),
    ],
)
def test_bad_lora_options_fail_at_start(tmp_path, overrides, message):
    from framework.train import check_early

    with pytest.raises(ConfigError, match=message):
        check_early(cfg_for(tmp_path, *overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.lora.target_modules=[qq_proj]"],
            r"model\.lora\.target_modules=\['qq_proj'\] matches no layer .*linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        ),
        (
            ["model.lora.target_modules=[qkv]"],
            r"target_modules=\[.qkv.\] matches no layer",
        ),  # only the vision tower has qkv
        (
            ["model.lora.vision=true", "model.lora.target_modules=[q_proj]"],
            r"vision=true but .* no layer of the vision tower",
        ),
        (["model.lora.path=/nonexistent/adapter"], r"model\.lora\.path=/nonexistent/adapter: no adapter_config\.json"),
        (
            ["model=tiny_qwen2", "data=synthetic_text", "model.lora.vision=true"],
            r"model\.lora\.vision=true but .* is a text-only model \(no vision tower\): drop model\.lora\.vision",
        ),
    ],
)
def test_lora_targets_are_checked_on_the_architecture_before_any_weight_loads(
    tmp_path, monkeypatch, overrides, message
):
    import framework.models.loading as loading
    from framework.train import train

    def no_load(*a, **k):
        raise AssertionError("load_model called before the LoRA options were checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    with pytest.raises(ConfigError, match=message):
        train(cfg_for(tmp_path / "run", "model.lora.enabled=true", "trainer.max_steps=1", *overrides))


def test_cli_prints_one_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("APO_RL_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    p = subprocess.run(
        [sys.executable, "-m", "framework.run", "model.lora.r=64", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.lora.enabled=true" in errors[0], p.stderr
    assert "Traceback" not in p.stdout + p.stderr


# =========================================================================== the policy
def test_only_adapters_train_on_the_language_model_and_vision_is_opt_in(tiny_vl_path):
    policy = lora_policy(tiny_vl_path)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert not any("visual" in n for n in trainable)
    # all-linear: every linear layer of the language model's blocks (2 layers x 7), not the LM head
    adapted = {n.rsplit(".lora_", 1)[0] for n in trainable}
    assert len(adapted) == 2 * 7 and not any("lm_head" in n for n in adapted)
    with_vision = lora_policy(tiny_vl_path, vision=True)
    assert any("visual" in n for n, p in with_vision.named_parameters() if p.requires_grad)
    # the trainer's names for vLLM: base_model.model. and .base_layer stripped
    assert base_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )


def test_reference_is_the_base_model_through_disabled_adapters(tiny_vl_path, vl_rollout):
    """Reference log-probs of the LoRA policy (adapters disabled) equal those of a separately
    loaded base model, while the adapted policy's differ; the adapters are back afterwards."""
    base, prompts, gen = vl_rollout
    policy = lora_policy(tiny_vl_path)
    perturb_adapters(policy)
    lp_base = logprobs(base, prompts, 4, gen)
    lp_adapted = logprobs(policy, prompts, 4, gen)
    m = gen.completion_mask
    assert float(((lp_adapted - lp_base).abs() * m).sum() / m.sum()) > 1e-2  # the adapters change the model
    with reference_model(policy, None) as ref:
        assert ref is policy
        lp_ref = logprobs(ref, prompts, 4, gen)
    assert float((lp_ref - lp_base).abs().max()) < TOL
    assert torch.equal(logprobs(policy, prompts, 4, gen), lp_adapted)  # enabled again
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    with reference_model(policy, base) as ref:  # a loaded reference (full weights) is used as it is
        assert ref is base


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_vl_path, vl_rollout):
    _, prompts, gen = vl_rollout

    def grads(gc: bool):
        model = load_model(tiny_vl_path, gradient_checkpointing=gc)
        torch.manual_seed(0)  # the same random adapters in both
        policy = apply_lora(
            model,
            LoraOptions(enabled=True, init_lora_weights="gaussian"),
            adapter_dtype=torch.float32,
            gradient_checkpointing=gc,
        )
        perturb_adapters(policy)
        pin = expand_inputs(prompts.inputs, 4, prompts.images_per_sample)
        kw = training_inputs(pin, gen.completion_ids, gen.completion_mask, policy)
        lp, _ = completion_logprobs(policy, kw, gen.completion_ids.shape[1], with_entropy=False)
        (lp * gen.completion_mask).sum().backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    assert all(float(g.abs().max()) > 0 for g in plain.values())  # every adapter gets a gradient
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-5, atol=1e-7), n


def test_memory_budget_counts_adapters_only_and_no_reference(tiny_vl_path):
    from transformers import AutoConfig

    from framework.memory import count_params, estimate

    cfg = AutoConfig.from_pretrained(tiny_vl_path)
    counts = count_params(cfg)
    n_lora = sum(p.numel() for n, p in lora_policy(tiny_vl_path).named_parameters() if "lora_" in n)
    kw = dict(
        model_dtype="float32",
        compute_dtype="bfloat16",
        world_size=1,
        needs_reference=True,
        freeze_vision_tower=False,
        gradient_checkpointing=False,
        micro_batch_size=4,
        prompt_tokens=64,
        new_tokens=16,
        logprob_chunk=1024,
        gen_sequences=8,
    )
    full, lora = estimate(cfg, counts, **kw), estimate(cfg, counts, **kw, lora_params=n_lora)
    assert full.row("reference") == counts.total * 2 and lora.row("reference") == 0
    assert lora.row("gradients") == n_lora * 4 and lora.row("optimizer") == 2 * n_lora * 4
    assert lora.row("weights") == counts.total * 2 + n_lora * 4  # bf16 frozen base + fp32 adapters
    assert "no copy" in lora.format()


# =========================================================================== training
@pytest.fixture(scope="module")
def sft_path():
    """The base model of the default run (the warm-started tiny Qwen2.5-VL)."""
    from framework.models.loading import resolve_path

    return resolve_path("tiny:qwen2_5_vl-sft")


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.ckpt", map_location="cpu", weights_only=True)


# Held-out sampled accuracy (100 records x 4 samples at temperature 1.0) of the warm-started tiny
# model: 0.155 at the start, 0.255 after 40 RL steps of LoRA GRPO (r 16, alpha 32, lr 1e-3;
# measured, seed 0). lr 3e-3 raised the training reward but not the held-out accuracy (and the
# greedy accuracy fell 0.84 -> 0.57); lr 1e-2 collapsed the policy.
LEARN = [
    "rollout.temperature=1.0",  # the learning tests' task and temperature (tests/test_training.py)
    "data.balanced_answers=false",
    "model.lora.enabled=true",
    "optim.lr=1e-3",
    "trainer.max_steps=40",
    "trainer.eval_every=0",
    "trainer.eval_size=100",
    "trainer.eval_samples=4",
]
MARGIN = 0.05


@pytest.mark.slow
def test_lora_grpo_learns_with_only_the_adapters_changed(tmp_path, sft_path):
    from framework.train import train

    res = train(cfg_for(tmp_path, *LEARN))
    before, after = res.metric("eval/accuracy_sampled")
    print(f"LoRA GRPO: held-out sampled accuracy {before:.3f} -> {after:.3f}")
    assert after > before + MARGIN
    assert max(res.metric("kl")) > 0  # the reference (adapters disabled) differs from the policy
    state = _state(res.final_checkpoint)
    sd = {k[len("policy.") :]: v for k, v in state["state_dict"].items() if k.startswith("policy.")}
    # the frozen base weights are bit-identical to those of the base model, loaded on its own
    base = dict(load_model(sft_path, trainable=False).named_parameters())
    frozen = {base_name(k): v for k, v in sd.items() if "lora_" not in k}
    assert set(base) <= set(frozen)
    for k, v in base.items():
        assert torch.equal(frozen[k], v), k
    # only the adapters are in the optimizer, and they moved
    opt = state["optimizer_states"][0]
    n_lora = sum("lora_" in k for k in sd)
    assert sum(len(g["params"]) for g in opt["param_groups"]) == n_lora == len(opt["state"]) == 2 * 2 * 7
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if "lora_B" in k)


@pytest.mark.slow
def test_lora_with_bf16_compute_and_gradient_checkpointing(tmp_path, sft_path):
    """The real-size path: bf16 compute (Lightning bf16-mixed), the frozen base held in bf16, the
    adapters and AdamW's state in fp32, gradient checkpointing on; the adapters train and the
    base stays bit-identical to the base model loaded in bf16."""
    from framework.train import train

    res = train(
        cfg_for(
            tmp_path,
            "model.lora.enabled=true",
            "model.dtype=bfloat16",
            "model.gradient_checkpointing=true",
            "optim.lr=3e-3",
            "trainer.max_steps=2",
            "trainer.prompts_per_step=4",
            "rollout.group_size=4",
            "trainer.micro_batch_size=8",
            "trainer.eval_every=0",
            "trainer.eval_size=4",
        )
    )
    rows = [r for r in res.history if "reward" in r]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    state = _state(res.final_checkpoint)
    sd = {k[len("policy.") :]: v for k, v in state["state_dict"].items() if k.startswith("policy.")}
    lora = {k: v for k, v in sd.items() if "lora_" in k}
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)  # trained
    assert all(s["exp_avg"].dtype == torch.float32 for s in state["optimizer_states"][0]["state"].values())
    base = load_model(sft_path, "bfloat16", trainable=False).state_dict()
    for k, v in sd.items():
        if "lora_" not in k:
            assert v.dtype == torch.bfloat16 and torch.equal(v, base[base_name(k)]), k


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """4 LoRA RL steps (KL on, several optimizer steps per rollout), checkpoints at 2 and 4,
    with the merged export."""
    from framework.train import train

    out = tmp_path_factory.mktemp("lora_run")
    common = [
        "model.lora.enabled=true",
        "model.lora.export_merged=true",
        "optim.lr=3e-3",
        "algorithm=grpo_d",
        "trainer.max_steps=4",
        "trainer.prompts_per_step=4",
        "trainer.num_mini_batches=2",
        "trainer.micro_batch_size=4",
        "rollout.group_size=4",
        "trainer.eval_every=0",
        "trainer.eval_size=8",
        "trainer.save_every=2",
    ]
    return common, out, train(cfg_for(out, *common))


def _policy_from_state(tiny_vl_path, ckpt: Path):
    """The trained LoRA policy rebuilt from Lightning's state.ckpt (not through policy/)."""
    policy = lora_policy(tiny_vl_path)
    sd = {k[len("policy.") :]: v for k, v in _state(ckpt)["state_dict"].items() if k.startswith("policy.")}
    policy.load_state_dict(sd, strict=True)
    return policy.eval()


@pytest.mark.slow
def test_adapter_checkpoint_and_merged_export_reload_the_trained_policy(sft_path, lora_run, vl_rollout):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    _, out, res = lora_run
    ckpt = res.final_checkpoint
    assert (ckpt / "policy" / "adapter_config.json").is_file() and (
        ckpt / "policy" / "adapter_model.safetensors"
    ).is_file()
    assert not (ckpt / "policy" / "model.safetensors").exists()  # the adapter, not a second full model
    _, prompts, gen = vl_rollout
    trained = _policy_from_state(sft_path, ckpt)
    want = logprobs(trained, prompts, 4, gen)
    base = load_model(sft_path, trainable=False)
    assert float((logprobs(base, prompts, 4, gen) - want).abs().max()) > 1e-3  # it trained
    adapter = PeftModel.from_pretrained(load_model(sft_path, trainable=False), str(ckpt / "policy")).eval()
    # (the trainer's log-prob path runs the Hugging Face model inside the PeftModel, adapters injected)
    assert float((logprobs(adapter.get_base_model(), prompts, 4, gen) - want).abs().max()) < TOL
    merged = AutoModelForImageTextToText.from_pretrained(str(ckpt / "merged")).eval()
    assert float((logprobs(merged, prompts, 4, gen) - want).abs().max()) < TOL
    load_model_bundle(str(ckpt / "merged"))  # a complete model folder (tokenizer, processor)
    # model.lora.path: a new run continues from the adapter (trainable, the same function)
    from framework.models.lora import check_lora

    opts = LoraOptions(enabled=True, path=str(ckpt / "policy"))
    n = sum(p.numel() for k, p in trained.named_parameters() if "lora_" in k)
    assert check_lora(sft_path, opts) == n
    cont = apply_lora(load_model(sft_path), opts, adapter_dtype=torch.float32)
    assert sum(p.numel() for p in cont.parameters() if p.requires_grad) == n
    assert float((logprobs(cont.eval(), prompts, 4, gen) - want).abs().max()) < TOL


@pytest.mark.slow
def test_lora_resume_matches_the_uninterrupted_run(tmp_path, lora_run):
    from safetensors.torch import load_file

    from framework.train import train

    common, out, full = lora_run
    resumed = train(cfg_for(tmp_path, *common, f"resume={out / 'checkpoints' / 'step-000002'}"))
    a = [r for r in full.history if "reward" in r][2:]
    b = [r for r in resumed.history if "reward" in r]
    assert [r["rl_step"] for r in b] == [3.0, 4.0]
    for x, y in zip(a, b):
        for k in ("reward", "loss", "kl", "grad_norm", "lr"):
            assert x[k] == y[k], k  # CPU: bit-exact
    end_a, end_b = full.final_checkpoint, resumed.final_checkpoint
    wa = load_file(str(end_a / "policy" / "adapter_model.safetensors"))
    wb = load_file(str(end_b / "policy" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = _state(end_a)["optimizer_states"][0]["state"], _state(end_b)["optimizer_states"][0]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)


@pytest.mark.slow
def test_evaluate_takes_an_adapter_folder(tmp_path, lora_run):
    """benchmarks.evaluate with checkpoint=<adapter folder> (and a step folder) evaluates the
    adapted model: the same greedy accuracy as the merged export."""
    from benchmarks.evaluate import evaluate

    _, _, res = lora_run
    ckpt = res.final_checkpoint

    def run(checkpoint, name):
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose(
                "evaluate",
                overrides=[f"checkpoint={checkpoint}", "data=synthetic", "limit=16", f"output={tmp_path / name}.json"],
            )
        return evaluate(cfg)["metrics"]

    adapter, step, merged = run(ckpt / "policy", "adapter"), run(ckpt, "step"), run(ckpt / "merged", "merged")
    assert adapter["eval/accuracy"] == step["eval/accuracy"] == merged["eval/accuracy"]
    assert adapter["eval/mean_length"] == merged["eval/mean_length"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["apo", "dapo", "gspo", "rloo", "reinforce_pp", "cispo"])
def test_every_algorithm_trains_adapters_unchanged(tmp_path, algorithm):
    """The Algorithm interface does not know about LoRA: each algorithm's step trains the adapters
    (a gradient reaches them; the loss and the reference's KL are finite)."""
    import math

    from framework.train import train

    res = train(
        cfg_for(
            tmp_path,
            f"algorithm={algorithm}",
            "model.lora.enabled=true",
            "rollout.temperature=1.0",  # at the default 0.7 all 4 groups of 4 can agree: no gradient
            "data.balanced_answers=false",
            "optim.lr=3e-3",
            "trainer.max_steps=1",
            "trainer.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=12",
            "trainer.eval_every=0",
            "trainer.eval_size=4",
        )
    )
    rows = [r for r in res.history if "reward" in r]
    assert len(rows) == 1
    assert all(math.isfinite(r["loss"]) and math.isfinite(r.get("kl", 0.0)) and r["grad_norm"] > 0 for r in rows)
