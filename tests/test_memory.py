"""The start-up memory budget (framework/memory.py): exact parameter counts from the config,
every row against a hand computation, sharding and offload, and the printed report."""

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoConfig

from framework.memory import GiB, count_params, estimate
from framework.models.loading import load_model, resolve_path
from tests.test_cli_and_config import CONFIGS


def qwen2_5_vl_3b_config():
    from framework.models.architectures import get

    return get("qwen2_5_vl_3b")


def test_param_counts_are_exact_for_the_tiny_model():
    path = resolve_path("tiny:qwen2_5_vl")
    model = load_model(path)
    c = count_params(AutoConfig.from_pretrained(path))
    assert c.total == sum(p.numel() for p in model.parameters())
    assert c.vision == sum(p.numel() for p in model.model.visual.parameters())
    layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    assert c.largest_block >= layer


def test_real_architecture_sizes():
    from framework.models.architectures import get

    c = count_params(qwen2_5_vl_3b_config())
    assert 3.74e9 < c.total < 3.77e9  # the published 3.75B
    assert 0.66e9 < c.vision < 0.68e9
    assert 8.2e9 < count_params(get("qwen2_5_vl_7b")).total < 8.35e9  # the published 8.29B


SMALL = dict(micro_batch_size=4, prompt_tokens=100, new_tokens=28, logprob_chunk=64, gen_sequences=32)


def test_rows_against_hand_computation():
    cfg = qwen2_5_vl_3b_config()
    c = count_params(cfg)
    N = c.total
    b = estimate(
        cfg,
        c,
        model_dtype="bfloat16",
        world_size=1,
        needs_reference=True,
        freeze_vision_tower=False,
        gradient_checkpointing=True,
        **SMALL,
    )
    assert b.row("weights") == N * 2
    assert b.row("gradients") == N * 2
    assert b.row("optimizer") == 4 * N
    assert b.row("reference") == N * 2
    t = 4 * 128
    h, I, L, kv, V = 2048, 11008, 36, 2 * 128, 151936  # noqa: E741  (I: the MLP width)
    acts = L * t * h * 2 + t * (8 * h + 3 * kv + 4 * I) * 2 + 3 * 64 * V * 4
    assert b.row("activations") == acts
    kv_cache = 32 * 128 * 2 * L * kv * 2
    assert b.row("rollout KV") == kv_cache
    assert b.update_bytes == 2 * N + 2 * N + 4 * N + 2 * N + acts
    assert b.rollout_bytes == 2 * N + 4 * N + 2 * N + kv_cache
    # no checkpointing: every block keeps all its activations
    nock = estimate(
        cfg,
        c,
        model_dtype="bfloat16",
        world_size=1,
        needs_reference=True,
        freeze_vision_tower=False,
        gradient_checkpointing=False,
        **SMALL,
    )
    assert nock.row("activations") == L * t * (8 * h + 3 * kv + 4 * I) * 2 + 3 * 64 * V * 4


def test_reference_frozen_vision_sharding_and_offload():
    cfg = qwen2_5_vl_3b_config()
    c = count_params(cfg)
    b = estimate(
        cfg,
        c,
        model_dtype="bfloat16",
        world_size=1,
        needs_reference=False,
        freeze_vision_tower=True,
        gradient_checkpointing=True,
        **SMALL,
    )
    assert b.row("reference") == 0
    assert b.row("gradients") == (c.total - c.vision) * 2
    fsdp = OmegaConf.create(dict(mixed_precision="bf16", cpu_offload=False, activation_checkpointing=True))
    s8 = estimate(
        cfg,
        c,
        model_dtype="float32",
        world_size=8,
        fsdp=fsdp,
        needs_reference=True,
        freeze_vision_tower=False,
        gradient_checkpointing=False,
        **SMALL,
    )
    assert s8.row("weights") == c.total * 4 / 8  # fp32 master weights, sharded
    assert s8.row("optimizer") == 2 * c.total * 4 / 8
    assert s8.row("reference") == c.total * 4 / 8  # sharded like the policy
    assert s8.row("FSDP gathered") == (c.root + 2 * c.largest_block) * 2
    # bf16 compute: activations as in the bf16 model with checkpointing
    bf = estimate(
        cfg,
        c,
        model_dtype="bfloat16",
        world_size=1,
        needs_reference=True,
        freeze_vision_tower=False,
        gradient_checkpointing=True,
        **SMALL,
    )
    assert s8.row("activations") == bf.row("activations")
    off = estimate(
        cfg,
        c,
        model_dtype="float32",
        world_size=8,
        fsdp=OmegaConf.merge(fsdp, {"cpu_offload": True}),
        needs_reference=True,
        freeze_vision_tower=False,
        gradient_checkpointing=False,
        **SMALL,
    )
    for row in ("weights", "gradients", "optimizer", "reference"):
        assert off.row(row) == 0, row


def test_over_budget_warns_with_the_remedies():
    cfg = qwen2_5_vl_3b_config()
    b = estimate(
        cfg,
        count_params(cfg),
        model_dtype="float32",
        world_size=1,
        needs_reference=True,
        freeze_vision_tower=False,
        gradient_checkpointing=False,
        micro_batch_size=32,
        prompt_tokens=512,
        new_tokens=1024,
        logprob_chunk=1024,
        gen_sequences=128,
        device_bytes=80 * GiB,
        device_name="H100",
    )
    assert b.peak_bytes > 80 * GiB
    assert "DOES NOT FIT" in b.format()
    w = b.warning()
    assert w and "trainer=fsdp" in w and "micro_batch_size" in w
    small = estimate(
        cfg,
        count_params(cfg),
        model_dtype="bfloat16",
        world_size=1,
        needs_reference=False,
        freeze_vision_tower=False,
        gradient_checkpointing=True,
        device_bytes=80 * GiB,
        **SMALL,
    )
    assert small.warning() is None and "fits" in small.format()


def test_a_run_prints_its_budget(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="framework")
    from framework.train import _print_memory_budget, check_early

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(
            "config", overrides=["output_dir=/tmp/x", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=4"]
        )
    early = check_early(cfg)
    _print_memory_budget(resolve_path(early["sections"]["model"].name_or_path), early["sections"], early["algorithm"])
    out = caplog.text
    assert "memory budget" in out
    for row in (
        "weights",
        "gradients",
        "optimizer",
        "reference",
        "FSDP gathered",
        "activations",
        "rollout KV",
        "update phase",
    ):
        assert row in out, row
    assert "/ 4 shards" in out
