"""Real-size architectures as transformers configs, for what needs the shape of a model but
not its weights: the memory budget's tests and the GPU update benchmark (random weights,
nothing to download). The numbers are those of the models' published ``config.json``."""

from __future__ import annotations


def qwen2_5_vl(size: str):
    """Qwen2.5-VL-3B / 7B-Instruct (``size`` "3b" or "7b")."""
    from transformers import Qwen2_5_VLConfig

    text = {
        "3b": dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        "7b": dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    }[size]
    out_hidden = text["hidden_size"]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936,
            max_position_embeddings=128000,
            rope_theta=1e6,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
            **text,
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=out_hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        tie_word_embeddings=text["tie_word_embeddings"],
    )


ARCHITECTURES = {"qwen2_5_vl_3b": lambda: qwen2_5_vl("3b"), "qwen2_5_vl_7b": lambda: qwen2_5_vl("7b")}


def get(name: str):
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{name}'; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]()
