"""Tiny, real Qwen2.5-VL (and a text-only Qwen2 twin) built locally, for tests and the
embedded default run. No download: the architecture comes from transformers config
classes, the tokenizer is a byte-level BPE trained here with Qwen2's own pre-tokenizer,
the image processor is Qwen2-VL's (patch 14, temporal 2, merge 2), the chat template is
Qwen2-VL's. Random weights (seeded); a supervised warm-start is in ``warmstart.py``.

``tiny:KIND`` names resolve here (:func:`resolve_tiny`); variants built on top of a tiny model
(``-sft``, in ``warmstart.py``) register themselves, so imports run one way:
tiny <- loading <- warmstart.

Built models are cached under ``$APO_RL_CACHE`` (default ``~/.cache/apo_rl``) and written
atomically, so concurrent runs do not see half-written folders.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TINY_VERSION = "v1"
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template (images as <|vision_start|><|image_pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("APO_RL_CACHE", Path.home() / ".cache" / "apo_rl"))


def _corpus() -> list[str]:
    """Synthetic text the tokenizer is trained on: the words the synthetic tasks, the
    R1-style system prompt and the think/answer format use, plus numbers."""
    from framework.config import DEFAULT_SYSTEM_PROMPT

    words = (
        DEFAULT_SYSTEM_PROMPT + " "
        "How many shapes are in the image? How many red green blue yellow shapes are there? "
        "What color is the shape in the top-left top-right bottom-left bottom-right cell? "
        "Are there more red shapes or blue shapes? I see I count there is are shape shapes "
        "square squares circle circles empty cell row column grid legend so the answer is "
        "Answer with a number. Choose one option. (A) (B) (C) (D) option letter "
        "system user assistant You are a helpful assistant. the image shows . , : ; ? ! "
        "more fewer than same left right top bottom middle first second third count color colour"
    )
    lines = [words]
    lines += [f"<think>I see {i} shapes.</think><answer>{i}</answer>" for i in range(40)]
    lines += [" ".join(str(i) for i in range(j, j + 50)) for j in range(0, 1000, 50)]
    lines += ["R G B Y . R . G / B . Y / . . R", "x = 3, y = 0.5, \\frac{1}{2} + 2^3 - 4*5 = $7$"]
    return lines * 20


def build_tokenizer(vocab_size: int = 1024):
    """Byte-level BPE with Qwen2's pre-tokenizer, wrapped as ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    vocab = tok.get_vocab()
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(tok.to_str())["model"]["merges"]
    ]
    qt = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",
    )
    qt.chat_template = CHAT_TEMPLATE
    for t in SPECIAL_TOKENS:  # ids must survive the wrap unchanged
        assert qt.convert_tokens_to_ids(t) == vocab[t], t
    return qt


def build_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=28 * 28,
        max_pixels=28 * 28 * 64,
    )


def tiny_vl_config(tokenizer, hidden: int = 128):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden // heads  # vLLM's CPU backend needs head_dim >= 32
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    cfg.eos_token_id = ids["<|im_end|>"]
    cfg.pad_token_id = ids["<|endoftext|>"]
    return cfg


def tiny_text_config(tokenizer, hidden: int = 128):
    """The text-only twin: a Qwen2 causal LM with the same text stack as the tiny VL."""
    from transformers import Qwen2Config

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=1e6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def _atomic_dir(final: Path, build) -> Path:
    """Run ``build(tmpdir)`` and move the result to ``final``. Processes that start together
    (``torchrun``, SLURM: every rank resolves the model) take turns on a file lock, so one
    builds and the others reuse its result."""
    if (final / "DONE").exists():
        return final
    import fcntl

    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "DONE").exists():  # another process built it while we waited
            return final
        if final.exists():  # left half-built by a killed process
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            build(tmp)
            if not (tmp / "config.json").exists():
                raise RuntimeError(
                    f"building {final.name} wrote no config.json (is torch.distributed initialised on "
                    "a rank other than 0? transformers then skips saving)"
                )
            (tmp / "DONE").write_text("ok\n")
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny(kind: str = "qwen2_5_vl", seed: int = 0, out_dir: str | Path | None = None) -> Path:
    """Build (or reuse) the tiny model of ``kind`` ('qwen2_5_vl' or 'qwen2') and return its
    folder, loadable with ``from_pretrained`` and :func:`framework.models.loading.load_processor`."""
    if kind not in ("qwen2_5_vl", "qwen2"):
        raise ValueError(f"unknown tiny model kind '{kind}'; choose qwen2_5_vl or qwen2")
    final = Path(out_dir) if out_dir else cache_root() / f"tiny-{kind}-{TINY_VERSION}-seed{seed}"

    def build(tmp: Path) -> None:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

        tok = build_tokenizer()
        torch.manual_seed(seed)
        if kind == "qwen2_5_vl":
            model = Qwen2_5_VLForConditionalGeneration(tiny_vl_config(tok))
            build_image_processor().save_pretrained(tmp)
        else:
            model = Qwen2ForCausalLM(tiny_text_config(tok))
        model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(final, build)


# ``tiny:KIND-NAME`` variants: NAME -> build(kind) -> folder. Filled by the modules that build
# them (warmstart.py registers "sft"; ``framework/models/__init__.py`` imports it).
_VARIANTS: dict[str, Callable[[str], Path]] = {}


def register_variant(name: str, build: Callable[[str], Path]) -> None:
    """Make ``tiny:KIND-NAME`` resolve to ``build(KIND)``. A module built on top of the tiny
    models registers here instead of being imported by the loader, which keeps imports one way."""
    _VARIANTS[name] = build


def resolve_tiny(name: str) -> Path:
    """Folder of the built-in tiny model ``tiny:KIND`` or ``tiny:KIND-VARIANT`` (built on first
    use, then cached)."""
    kind, _, variant = name.removeprefix("tiny:").partition("-")
    if not variant:
        return build_tiny(kind)
    if variant not in _VARIANTS:
        known = " or ".join([f"tiny:{kind}"] + [f"tiny:{kind}-{v}" for v in sorted(_VARIANTS)])
        raise ValueError(f"unknown tiny model variant '{name}': use {known}")
    return _VARIANTS[variant](kind)
