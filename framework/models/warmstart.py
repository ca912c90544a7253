"""Supervised warm-start of the tiny models on the synthetic task, cached on disk.

Real RL starts from an instruct model that already answers in the expected format and is
sometimes right. A randomly initialised tiny model is never right, so RL would have no
signal. This builds that starting point: a short SFT on reference completions
("<think>...</think><answer>...</answer>") of the synthetic *train* split, stopped early so
the model follows the format but answers only part of the held-out questions correctly,
leaving room for RL to improve accuracy.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from framework.models.loading import load_model, load_model_bundle
from framework.models.tiny import TINY_VERSION, _atomic_dir, build_tiny, cache_root, register_variant

SFT_VERSION = "v1"


def _default_data_cfg(kind: str):
    """The typed ``data`` section of the default task for this model kind (framework.config.DataConfig)."""
    from framework.config import data_section

    return data_section("synthetic" if kind == "qwen2_5_vl" else "synthetic_text")


def _noisy(completion: str, record: dict, rng: random.Random, p: float) -> str:
    """With probability ``p`` swap the answer for another plausible one (label noise), so the
    warm-started model is sure of the format but not of the answers."""
    if p <= 0 or rng.random() >= p or not record["answer"].isdigit():
        return completion
    wrong = str(rng.choice([i for i in range(10) if str(i) != record["answer"]]))
    return completion.replace(record["answer"], wrong)


def sft_steps_default() -> int:
    return 250


def build_warmstarted(
    kind: str = "qwen2_5_vl",
    steps: int | None = None,
    seed: int = 0,
    lr: float = 3e-4,
    batch_size: int = 32,
    label_noise: float = 0.0,
    difficulty: list | None = None,
    out_dir: str | Path | None = None,
    verbose: bool = True,
) -> Path:
    steps = steps or sft_steps_default()
    final = (
        Path(out_dir)
        if out_dir
        else cache_root() / f"tiny-{kind}-{TINY_VERSION}-sft{SFT_VERSION}-{steps}steps-seed{seed}"
    )
    base = build_tiny(kind, seed=seed)

    def build(tmp: Path) -> None:
        from framework.data import load_data, to_record
        from framework.data.synthetic import reference_completion
        from framework.logprobs import completion_logprobs
        from framework.rollout.inputs import completion_mask, encode_prompts, training_inputs

        bundle = load_model_bundle(str(base))
        model = load_model(str(base), "float32")
        dcfg = dataclasses.replace(
            _default_data_cfg(kind),
            seed=seed + 1000,  # a different draw from the RL train split the run uses
            # the level drawn first, as an instruct model's data would be: the rare counts (5-9) it
            # answers poorly are what RL on the balanced task (data.balanced_answers) teaches
            balanced_answers=False,
        )
        if difficulty:
            dcfg = dataclasses.replace(dcfg, difficulty=list(difficulty))
        ds = load_data(dcfg.options())["train"]
        rng = random.Random(seed)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        tok = bundle.tokenizer
        eos = bundle.eos_token_ids[0]
        it = range(steps)
        if verbose:
            from tqdm import tqdm

            it = tqdm(it, desc=f"warm-start SFT of tiny {kind} (cached for later runs)")
        for _ in it:
            recs = [to_record(ds[rng.randrange(len(ds))]) for _ in range(batch_size)]
            prompts = encode_prompts(bundle, recs, dcfg.system_prompt, dcfg.question_template)
            targets = [
                tok(_noisy(reference_completion(r), r, rng, label_noise), add_special_tokens=False)["input_ids"] + [eos]
                for r in recs
            ]
            T = max(len(t) for t in targets)
            ids = torch.full((len(recs), T), bundle.pad_token_id, dtype=torch.long)
            for i, tgt in enumerate(targets):
                ids[i, : len(tgt)] = torch.tensor(tgt)
            mask, _ = completion_mask(ids, [eos])
            kw = training_inputs(prompts.inputs, ids, mask, model)
            logp, _ = completion_logprobs(model, kw, T, with_entropy=False)
            loss = -(logp * mask).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if verbose:
                it.set_postfix(loss=f"{loss.item():.3f}")
        model.save_pretrained(tmp)
        bundle.tokenizer.save_pretrained(tmp)
        if bundle.is_vl:
            bundle.processor.image_processor.save_pretrained(tmp)

    return _atomic_dir(final, build)


register_variant("sft", build_warmstarted)  # tiny:KIND-sft
