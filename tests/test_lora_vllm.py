"""LoRA with vLLM (framework/models/lora.py merged_weights -> VLLMEngine.sync_weights), on the
tiny text twin as in tests/test_vllm.py: marked ``vllm`` (skipped without vLLM unless
APO_RL_REQUIRE_VLLM=1). Expected log-probs are the trainer's own for the adapted policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_lora import ROOT, SYSTEM, cfg_for, logprobs, lora_policy, perturb_adapters

from framework.models.loading import load_model, load_model_bundle
from framework.models.lora import merged_weights
from framework.rollout.base import SamplingParams
from framework.rollout.inputs import encode_prompts

# =========================================================================== vLLM: the merged sync
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
LOGP_TOL = 1e-4  # vLLM vs the trainer, fp32 (as in tests/test_vllm.py)


def text_records():
    return [
        {"question": "How many shapes are in the image?", "answer": "1"},
        {"question": "Grid:\nR . G\n. B .\nY . .\nHow many shapes are there? Answer with a number.", "answer": "4"},
    ]


@pytest.fixture(scope="module")
def vllm_available():
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install raises other errors
        if os.environ.get("APO_RL_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM is not importable ({e}); APO_RL_REQUIRE_VLLM=1 requires it", pytrace=False)
        pytest.skip(f"vLLM is not importable ({e})")


@pytest.fixture(scope="module")
def vllm_engine(vllm_available, tiny_text_path):
    from framework.config import RolloutConfig
    from framework.rollout.vllm_engine import VLLMEngine

    bundle = load_model_bundle(tiny_text_path)
    eng = VLLMEngine(
        RolloutConfig(engine="vllm", enforce_eager=True, max_model_len=1024),
        bundle,
        load_model(tiny_text_path, trainable=False),
    )
    yield eng
    eng.close()


@pytest.mark.vllm
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]], ids=["all-linear", "q_v"])
def test_vllm_serves_the_adapted_policy_after_the_merged_sync(vllm_engine, tiny_text_path, targets):
    """After a LoRA update the engine's log-probs are the adapted policy's (< 1e-4) once the
    merged weights are pushed, and far from them without the push. q/v only: vLLM reloads its
    fused qkv layer whole, so k (and the biases) must come along. The policy's frozen weights
    stay bit-identical (the merge is out of place)."""
    eng = vllm_engine
    prompts = encode_prompts(eng.bundle, text_records(), SYSTEM)
    policy = lora_policy(tiny_text_path, target_modules=targets)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    sp = SamplingParams(max_new_tokens=12, return_logprobs=True)
    eng.sync_weights(policy)  # B = 0: the base model
    perturb_adapters(policy, scale=0.3)  # an update
    stale = eng.generate(prompts, 4, sp)
    m = stale.completion_mask
    stale_gap = float(((logprobs(policy, prompts, 4, stale) - stale.logprobs).abs() * m).sum() / m.sum())
    assert stale_gap > 1e-2
    pushed = [n for n, _ in merged_weights(policy)]
    assert all(".base_layer" not in n and "lora_" not in n for n in pushed)
    assert "model.layers.0.self_attn.k_proj.weight" in pushed and "model.layers.0.self_attn.q_proj.bias" in pushed
    assert not any("embed_tokens" in n or "norm" in n for n in pushed)  # untouched modules are not pushed
    try:
        eng.sync_weights(policy)
        fresh = eng.generate(prompts, 4, sp)
        diff = (logprobs(policy, prompts, 4, fresh) - fresh.logprobs).abs()
        assert float(diff.max()) < LOGP_TOL, f"after the merged sync: max |logp_vllm - logp_policy| = {diff.max():.3g}"
    finally:
        eng.sync_weights(load_model(tiny_text_path, trainable=False))
    for n, p in policy.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n


LORA_VLLM_RUN = [
    "rollout=vllm",
    "model=tiny_qwen2",
    "data=synthetic_text",
    "model.name_or_path=tiny:qwen2",
    "model.lora.enabled=true",
    "reward.correctness=length",
    "~reward.components.accuracy",
    "~reward.components.format",
    "+reward.components.length={weight:1.0,target:20}",
    "trainer.prompts_per_step=4",
    "rollout.group_size=8",
    "rollout.max_new_tokens=12",
    "trainer.eval_every=0",
    "trainer.eval_size=4",
    "optim.lr=1e-2",
    "rollout.enforce_eager=true",
    "rollout.max_model_len=1024",
    "trainer.max_steps=3",
    "rollout.logp_diff_warn=0.05",
]


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_training_with_vllm_keeps_the_gap_at_full_sync_level_and_a_skipped_sync_shows(
    vllm_available, tmp_path, monkeypatch
):
    from framework.rollout.vllm_engine import VLLMEngine
    from framework.train import train

    res = train(cfg_for(tmp_path / "synced", *LORA_VLLM_RUN))
    gap = res.metric("rollout/logp_diff_mean")
    print("LoRA + vLLM, logp gap per step:", [f"{g:.1e}" for g in gap], "kl:", res.metric("kl"))
    assert len(gap) == 3 and max(gap) < 1e-4  # every step: the engine served the adapted policy
    assert res.metric("kl")[-1] > 0  # the adapters moved the policy away from the reference

    monkeypatch.setattr(VLLMEngine, "sync_weights", lambda self, model: None)  # a broken sync
    stale = train(cfg_for(tmp_path / "stale", *LORA_VLLM_RUN)).metric("rollout/logp_diff_mean")
    print("without the sync:", [f"{g:.1e}" for g in stale])
    assert stale[0] < 1e-4 and min(stale[1:]) > 0.05


@pytest.mark.vllm
@pytest.mark.slow
def test_fsdp_lora_engines_track_the_policy(vllm_available, tmp_path):
    """2 FSDP ranks, each with its own engine: every rank merges the gathered adapters into the
    gathered base weights of the adapted modules (a collective) and pushes them, so the
    sampler/trainer gap stays at numerical noise while the policy moves away from the reference."""
    import csv

    args = [
        *LORA_VLLM_RUN,
        "logger.wandb=false",
        "trainer.progress_bar=false",
        "trainer=fsdp",
        "trainer.fsdp.mixed_precision=null",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        f"output_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    p = subprocess.run(
        [sys.executable, "-m", "framework.run", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()) if r.get("reward")]
    assert [float(r["rl_step"]) for r in rows] == [1.0, 2.0, 3.0]
    assert all(float(r["rollout/logp_diff_max"]) < LOGP_TOL for r in rows)  # measured ~1e-6
    assert float(rows[-1]["kl"]) > 1e-3
    assert (tmp_path / "checkpoints" / "step-000003" / "policy" / "adapter_config.json").is_file()
