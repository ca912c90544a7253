"""The real-size numbers in one prepared GPU job (issue 16): every part in its own process with
its own time limit, every number written to ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``.

    python -m benchmarks.gpu_check --out OUT                              # a CUDA machine, all parts
    python -m benchmarks.gpu_check --out OUT --device cpu --tiny          # the CPU dry run (CI test)
    python -m benchmarks.gpu_check --out OUT --parts update,rollout       # some parts only

Parts, in order (``--parts``; each is a subprocess, killed at its limit, and what it measured
before that is kept):

* ``update``  the update phase of the Qwen2.5-VL-3B-shaped model, random weights built from its
  config on the device (no download; :mod:`benchmarks.update_throughput`): fp32 master weights,
  bf16 compute under ``torch.autocast`` (what Lightning's bf16-mixed does), gradient
  checkpointing, chunked log-probs (framework/logprobs.py), the GRPO loss with its k3 KL term,
  gradient clipping, fused AdamW. Tokens/s, MFU = 6 * N_text * tokens / time / peak bf16 FLOP/s
  of the detected GPU (datasheet table; a measured 8192^3 bf16 matmul rate is reported beside
  it), peak memory, forward / backward / optimizer seconds, at 16x1024 and 32x1024 tokens.
* ``rollout`` the transformers engine (framework.rollout.hf.HFGenerateEngine) on the same model
  in bf16: completion tokens/s at batch 64 and 256 (8 samples of each prompt), 128-token text
  prompts, 256 new tokens, sampling at temperature 1 (as the anchor's plain ``generate``). The
  engine offers no static cache or compiled decode: recorded as "not offered".
* ``anchor``  the team's plain-PyTorch anchor (benchmarks/gpu_anchor.py, a verbatim copy of
  ../shared/bench/gpu_anchor.py) in the same job, so that update and rollout are ratios on one
  machine.
* ``step``    one full RL run of the framework, ``framework.train.train`` on a Hydra-composed
  config (``model=qwen2_5_vl_3b``: bf16-mixed with fp32 masters, gradient checkpointing), 2 RL
  steps of 8 prompts x G 8 = 64 completions of up to 256 tokens, synthetic image prompts
  (framework/data/synthetic.py grids scaled to 448x448 px, i.e. 256 visual tokens under the real
  Qwen2.5-VL image processor settings). The model is a Qwen2.5-VL-3B-shaped random model built from
  its config and saved with the tiny tokenizer (framework/models/tiny.py), so its vocabulary is
  resized to the tokenizer's (544 ids instead of 151,936: 3.44B parameters instead of 3.75B).
  Records ``timing_s/*`` and ``perf/*`` of the run's history and the peak memory against the
  start-up memory budget (framework.memory.budget_for_run), both as the run predicts it (with
  data.max_prompt_tokens) and at the measured prompt length. The final checkpoint is not written
  (a 3B fp32 + AdamW ``state.ckpt`` is ~45 GB: minutes of disk writes that measure nothing here).
* ``pytest``  ``pytest -m gpu`` (the GPU-marked tests; on the CPU they are skipped).

``--tiny`` swaps every model for a tiny one and every size for a small one (the dry run: all parts
end to end in about 45 s of CPU time); ``--device cpu`` runs on the CPU, one thread a process
(peak memory is then the worker's max RSS, and MFU is against the measured matmul rate). The
output folder gets gpu_check.json (every number, the versions, the plan), gpu_check.md (the
tables and the issue's goals) and gpu_check.log (every part's output); both files are rewritten
after each part, so a job killed at its limit still returns what it measured.

On the GPU machine (torch 2.11 / CUDA 13, transformers 5.17, lightning 2.6.6, no hydra,
omegaconf, datasets, math-verify or wandb: benchmarks/gpu_wheels.sh downloads them here as
wheels into the git-ignored .whl/, which the device call names in ``carry``), as one call
(``timeout_s`` 600; the parts' limits and ``--budget-s`` keep it near 9 minutes)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT --budget-s 540

transformers 5.17 and 5.19: the script runs under both (the CPU dry run passes under each:
5.19 is this project's pin, 5.17 the GPU machine's). The transformers APIs it relies on, checked
in both versions: ``Qwen2_5_VLConfig(text_config=..., vision_config=...)`` with
``rope_scaling={"type": "mrope", ...}`` (framework/models/architectures.py),
``AutoModelForImageTextToText.from_config(cfg, dtype=...)``, ``Qwen2_5_VLForConditionalGeneration``
``.save_pretrained`` / ``from_pretrained(dtype=...)``, ``gradient_checkpointing_enable(
gradient_checkpointing_kwargs=...)``, ``generate`` with ``suppress_tokens``, ``return_dict_in_generate``
and ``output_logits``, and ``Qwen2VLImageProcessorPil(min_pixels=..., max_pixels=...)`` from
``transformers.models.qwen2_vl.image_processing_pil_qwen2_vl``. Nothing newer than 5.17 is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = Path(__file__).resolve().parent / "gpu_anchor.py"
GiB = 1024**3
PARTS = ("update", "rollout", "anchor", "step", "pytest")
CHECKED_TRANSFORMERS = ("5.17", "5.19")


@dataclass(frozen=True)
class Plan:
    """Every size of one check: :data:`FULL` on a GPU, :data:`TINY` for the dry run."""

    arch: str  # update / rollout model (benchmarks.update_throughput.build): qwen2_5_vl_3b | tiny
    step_model: str  # the RL step's saved model: qwen2_5_vl_3b | tiny
    update_shapes: tuple[tuple[int, int], ...]
    update_prompt_tokens: int
    update_steps: int
    update_chunk: int
    rollout_batches: tuple[int, ...]
    rollout_prompt_tokens: int
    rollout_new_tokens: int
    group_size: int
    step_steps: int
    step_prompts: int
    step_new_tokens: int
    image_side: int
    pytest_paths: tuple[str, ...]
    limits_s: dict[str, int] = field(default_factory=dict)
    budget_s: int = 540


FULL = Plan(
    arch="qwen2_5_vl_3b",
    step_model="qwen2_5_vl_3b",
    update_shapes=((16, 1024), (32, 1024)),
    update_prompt_tokens=128,
    update_steps=3,
    update_chunk=1024,
    rollout_batches=(64, 256),
    rollout_prompt_tokens=128,
    rollout_new_tokens=256,
    group_size=8,
    step_steps=2,
    step_prompts=8,
    step_new_tokens=256,
    image_side=448,
    pytest_paths=("tests",),
    # estimates on an H100/H200: update ~40 s, rollout ~70 s, anchor ~80 s, step ~150 s, pytest ~120 s
    limits_s={"update": 110, "rollout": 130, "anchor": 130, "step": 230, "pytest": 200},
    budget_s=540,
)
TINY = Plan(
    arch="tiny",
    step_model="tiny",
    update_shapes=((2, 64), (4, 64)),
    update_prompt_tokens=16,
    update_steps=1,
    update_chunk=64,
    rollout_batches=(8, 16),
    rollout_prompt_tokens=16,
    rollout_new_tokens=8,
    group_size=8,
    step_steps=2,
    step_prompts=2,
    step_new_tokens=8,
    image_side=56,
    pytest_paths=("tests/test_scale_benchmarks.py",),
    limits_s={"update": 150, "rollout": 150, "anchor": 150, "step": 240, "pytest": 150},
    budget_s=900,
)

# The anchor's sizes and device, rewritten for the CPU dry run. Each pair must match the copy
# (a stale one fails the dry run, naming it); on a GPU the anchor runs as it is.
TINY_ANCHOR = (
    ("hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,", "hidden_size=128, intermediate_size=256, num_hidden_layers=2,"),
    ("num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,", "num_attention_heads=1, num_key_value_heads=1, vocab_size=4096,"),
    ("depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,", "depth=2, hidden_size=64, intermediate_size=128, num_heads=2,"),
    ("out_hidden_size=2048,", "out_hidden_size=128,"),
    ("fullatt_block_indexes=[7, 15, 23, 31]", "fullatt_block_indexes=[1]"),
    ("torch.cuda.get_device_name()", '"cpu"'),
    ('torch.device("cuda")', 'torch.device("cpu")'),
    ("torch.cuda.synchronize()", "None"),
    ("torch.cuda.max_memory_allocated()", "0"),
    ("torch.cuda.empty_cache()", "None"),
    ("fused=True", "fused=False"),
    ("[(64, 256), (256, 256)]", "[(8, 8), (16, 8)]"),
    ("[(8, 1024), (16, 1024)]", "[(2, 64), (4, 64)]"),
    ("torch.randint(1000, 100000,", "torch.randint(1000, 4000,"),
    ('(B, 128), device="cuda")', '(B, 16), device="cpu")'),
    ("(out.shape[1] - 128) * B", "(out.shape[1] - 16) * B"),
    ('device="cuda"', 'device="cpu"'),
)  # fmt: skip


# ----------------------------------------------------------------------------- small helpers
def finite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_json(path: Path, data: dict) -> None:
    """Atomically (a killed writer leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite(data), indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


class Record(dict):
    """A worker's results, saved after every measurement so that a part killed at its limit
    keeps what it measured."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def save(self) -> None:
        write_json(self.path, dict(self))


def versions() -> dict[str, Any]:
    """The versions this check runs with (and the GPU's name and memory)."""
    import importlib.metadata as md
    import platform

    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in (
        "transformers",
        "lightning",
        "pytorch-lightning",
        "torchmetrics",
        "tokenizers",
        "huggingface-hub",
        "hydra-core",
        "omegaconf",
        "datasets",
        "math-verify",
        "wandb",
        "pytest",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    tf = out["transformers"] or ""
    out["transformers_checked"] = tf.startswith(CHECKED_TRANSFORMERS)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / GiB,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        out["gpu"] = None
    return out


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> tuple[float, str]:
    """(GiB, what was measured): CUDA's peak allocated bytes since the last :func:`reset_peak`,
    or on the CPU the process's max resident set (its whole life)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / GiB, "torch.cuda.max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, "cpu max RSS of the process"


def matmul_tflops(device: str) -> float:
    """Measured dense bf16 matmul rate (the achievable ceiling): 8192^3 on a GPU, 512^3 on the
    CPU; random inputs, median of 10 after 3 warm-ups."""
    import torch

    n = 8192 if device.startswith("cuda") else 512
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


# ----------------------------------------------------------------------------- part: update
def part_update(plan: Plan, a, rec: Record) -> None:
    import torch

    from algorithms.base import build_algorithm
    from benchmarks.update_throughput import build, make_optimizer, measure, peak_tflops

    dev = a.device
    name = device_name(dev)
    rec.update(
        device=name,
        arch=plan.arch,
        master_dtype=a.master_dtype,
        compute="bfloat16 (torch.autocast)",
        gradient_checkpointing=True,
        logprob_chunk=plan.update_chunk,
        prompt_tokens=plan.update_prompt_tokens,
        algorithm="grpo (k3 KL term)",
        optimizer="AdamW" + (" (fused)" if dev.startswith("cuda") else ""),
        rows=[],
    )
    ceiling = matmul_tflops(dev)
    peak = peak_tflops(name) if dev.startswith("cuda") else None
    rec.update(
        matmul_tflops_measured=ceiling,
        peak_tflops=peak if peak else ceiling,
        peak_tflops_source="datasheet dense bf16" if peak else "measured matmul (no datasheet peak for this device)",
    )
    t0 = time.perf_counter()
    model, cfg = build(plan.arch, getattr(torch, a.master_dtype), dev, True, "sdpa")
    sync(dev)
    n_text = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    rec.update(
        build_s=time.perf_counter() - t0,
        n_params=sum(p.numel() for p in model.parameters()),
        n_text_params=n_text,
    )
    opt = make_optimizer(model, dev)
    algo = build_algorithm({"name": "grpo"}, total_steps=100)
    rec["needs_reference"] = bool(algo.needs_reference)
    rec.save()
    for B, L in plan.update_shapes:
        print(f"update {B}x{L} ...", flush=True)
        r = measure(
            model,
            cfg,
            algo,
            opt,
            B,
            L,
            device=dev,
            prompt_tokens=plan.update_prompt_tokens,
            chunk=plan.update_chunk,
            steps=plan.update_steps,
            autocast=torch.bfloat16,
        )
        row: dict[str, Any] = {"shape": f"{B}x{L}", "B": B, "L": L, "oom": r is None}
        if r is not None:
            mem, src = peak_memory(dev)
            flops = 6 * n_text * r["tokens"] / r["step_s"]
            row.update(
                tokens_per_s=r["tokens_per_s"],
                mfu=flops / (rec["peak_tflops"] * 1e12),
                mfu_vs_matmul=flops / (ceiling * 1e12),
                peak_mem_gib=mem,
                peak_mem_source=src,
                fwd_s=r["fwd_s"],
                bwd_s=r["bwd_s"],
                optim_s=r["optim_s"],
                step_s=r["step_s"],
            )
            print(
                f"update {B}x{L}: {r['tokens_per_s']:,.0f} tok/s MFU {row['mfu']:.1%} peak {mem:.2f} GiB "
                f"(fwd {r['fwd_s']:.3f} s, bwd {r['bwd_s']:.3f} s, optim {r['optim_s']:.3f} s)",
                flush=True,
            )
        else:
            print(f"update {B}x{L}: OOM", flush=True)
        rec["rows"].append(row)
        rec.save()


# ----------------------------------------------------------------------------- part: rollout
def in_memory_bundle(cfg):
    """A ModelBundle for a model built from its config (no folder, no processor): the special
    token ids of the config (Qwen2.5-VL's own where the config names none)."""
    from framework.models.loading import ModelBundle

    t = getattr(cfg, "text_config", cfg)
    vocab = t.vocab_size

    def ids(*values):
        return [int(v) for v in values if v is not None and 0 <= int(v) < vocab]

    eos = getattr(cfg, "eos_token_id", None) or getattr(t, "eos_token_id", None)
    eos_ids = ids(*(eos if isinstance(eos, list) else [eos])) or ids(151645, 151643)  # <|im_end|>, <|endoftext|>
    pad = getattr(cfg, "pad_token_id", None) or getattr(t, "pad_token_id", None)
    pad = (ids(pad) or ids(151643) or eos_ids)[0]
    vision = ids(
        *(
            getattr(cfg, k, None)
            for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
        )
    )
    return ModelBundle(
        path="(built from its config)",
        is_vl=hasattr(cfg, "vision_config"),
        processor=None,
        tokenizer=None,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        vision_token_ids=vision,
    )


def text_prompts(n: int, length: int, vocab: int, seed: int):
    """``n`` prompts of ``length`` random ordinary token ids (as the anchor's), no images."""
    import torch

    from framework.rollout.inputs import PromptBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab // 2), min(vocab, 100000), (n, length), generator=g)
    return PromptBatch(
        records=[{} for _ in range(n)],
        texts=["" for _ in range(n)],
        images=[[] for _ in range(n)],
        # mm_token_type_ids as encode_prompts gives a VL model's prompts (no image tokens here)
        inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids)},
        images_per_sample=[0] * n,
    )


def engine_offers(word: str) -> str:
    """Whether the rollout config has an option about ``word`` (a static KV cache, a compiled
    decode): none does yet, so only what exists is measured."""
    from dataclasses import fields

    from framework.config import RolloutConfig

    names = [f.name for f in fields(RolloutConfig) if word in f.name]
    return f"offered ({', '.join(names)}), not measured here" if names else "not offered"


def part_rollout(plan: Plan, a, rec: Record) -> None:
    import torch

    from benchmarks.update_throughput import build
    from framework.config import RolloutConfig
    from framework.rollout.base import SamplingParams
    from framework.rollout.hf import HFGenerateEngine

    dev = a.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    rec.update(
        device=device_name(dev),
        arch=plan.arch,
        engine="hf (framework.rollout.hf.HFGenerateEngine)",
        dtype=str(dtype).removeprefix("torch."),
        static_cache=engine_offers("cache"),
        compiled_decode=engine_offers("compile"),
        prompt_tokens=plan.rollout_prompt_tokens,
        new_tokens=plan.rollout_new_tokens,
        group_size=plan.group_size,
        sampling="temperature 1.0, top_p 1.0, no top_k",
        rows=[],
    )
    t0 = time.perf_counter()
    model, cfg = build(plan.arch, dtype, dev, False, "sdpa")
    model.eval()
    model.requires_grad_(False)
    sync(dev)
    rec["build_s"] = time.perf_counter() - t0
    vocab = getattr(cfg, "text_config", cfg).vocab_size
    bundle = in_memory_bundle(cfg)
    engine = HFGenerateEngine(
        RolloutConfig(engine="hf", max_new_tokens=plan.rollout_new_tokens, group_size=plan.group_size), bundle, model
    )
    rec.save()
    G = plan.group_size
    for B in plan.rollout_batches:
        prompts = text_prompts(B // G, plan.rollout_prompt_tokens, vocab, seed=B)
        print(f"rollout batch {B} ...", flush=True)
        engine.generate(prompts, G, SamplingParams(max_new_tokens=4))  # warm-up (kernels, allocator)
        reset_peak(dev)
        sync(dev)
        t0 = time.perf_counter()
        gen = engine.generate(prompts, G, SamplingParams(temperature=1.0, max_new_tokens=plan.rollout_new_tokens))
        sync(dev)
        dt = time.perf_counter() - t0
        ntok = float(gen.completion_mask.sum())
        mem, src = peak_memory(dev)
        row = {
            "batch": B,
            "prompts": B // G,
            "seconds": dt,
            "completion_tokens": ntok,
            "tokens_per_s": ntok / dt,
            "ms_per_decode_step": dt / max(1, gen.completion_ids.shape[1]) * 1e3,
            "peak_mem_gib": mem,
            "peak_mem_source": src,
        }
        print(f"rollout batch {B}: {ntok / dt:,.0f} tok/s ({dt:.2f} s, {ntok:.0f} tokens)", flush=True)
        rec["rows"].append(row)
        rec.save()
    del engine, model


# ----------------------------------------------------------------------------- part: step
def step_model_parts(kind: str, tok):
    """Config and image processor of the RL step's model, for the tiny tokenizer ``tok``: the
    tiny model's, or a Qwen2.5-VL-3B config (framework/models/architectures.py) with its
    vocabulary resized to the tokenizer and its special ids set to the tokenizer's, and the
    real Qwen2.5-VL image processor settings (min 56x56, max 12845056 pixels)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from framework.models.architectures import get
    from framework.models.tiny import SPECIAL_TOKENS, build_image_processor, tiny_vl_config

    if kind == "tiny":
        return tiny_vl_config(tok), build_image_processor()
    cfg = get(kind)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    t = cfg.text_config
    t.vocab_size = len(tok)
    t.bos_token_id = t.pad_token_id = ids["<|endoftext|>"]
    t.eos_token_id = ids["<|im_end|>"]
    cfg.image_token_id, cfg.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    cfg.vision_start_token_id, cfg.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    cfg.eos_token_id, cfg.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
    ip = Qwen2VLImageProcessorPil(
        patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 16384
    )
    return cfg, ip


def save_step_model(out: Path, kind: str, device: str, tok) -> dict:
    """A random-weight model folder (config, weights, tiny tokenizer, image processor, chat
    template) that ``framework.models.loading`` loads like any Hugging Face folder. Built on
    ``device`` (fast init), saved in bf16 on a GPU (the policy is loaded back in fp32)."""
    import torch
    from transformers import AutoModelForImageTextToText

    cfg, ip = step_model_parts(kind, tok)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ip.save_pretrained(out)
    del model
    reset_peak(device)
    return {"n_params": n, "vocab": cfg.text_config.vocab_size, "saved_dtype": str(dtype).removeprefix("torch.")}


def write_image_data(out: Path, n: int, side: int) -> dict:
    """A local data folder (``data=local``) of ``n`` synthetic counting prompts (the grids of
    framework/data/synthetic.py) scaled to ``side`` px; train split only, so the run does not
    evaluate."""
    from PIL import Image

    from framework.data import load_data, to_record

    ds = load_data({"task": "synthetic", "seed": 0, "train_size": n, "test_size": 1, "difficulty": [2]})["train"]
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for i in range(n):
            r = to_record(ds[i])
            img = r["images"][0].convert("RGB").resize((side, side), Image.NEAREST)
            img.save(out / "images" / f"{i}.png")
            f.write(
                json.dumps(
                    {"id": r["id"], "images": [f"images/{i}.png"], "question": r["question"], "answer": r["answer"]}
                )
                + "\n"
            )
    return {"records": n, "image_px": side, "visual_tokens_per_image": (side // 28) ** 2}


def ensure_wandb() -> str:
    """framework/module.py imports wandb for a histogram every step, whether or not a W&B
    logger is on. Where it cannot be imported (not carried to the GPU machine), a stub stands
    in, so the step is still measured; the JSON says so."""
    try:
        import wandb

        return str(getattr(wandb, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        import types

        stub = types.ModuleType("wandb")
        stub.Histogram = lambda *args, **kwargs: None
        sys.modules["wandb"] = stub
        return f"stub (import failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def budget_summary(b) -> dict:
    return {
        "peak_gib": b.peak_bytes / GiB,
        "update_gib": b.update_bytes / GiB,
        "rollout_gib": b.rollout_bytes / GiB,
        "rows_gib": {name: v / GiB for name, v, _ in b.rows},
    }


def part_step(plan: Plan, a, rec: Record) -> None:
    import torch
    from omegaconf import OmegaConf

    from framework.resources import compose_config
    from framework.run import setup_console_logging

    setup_console_logging()
    dev = a.device
    cuda = dev.startswith("cuda")
    rec.update(device=device_name(dev), wandb=ensure_wandb())
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_step-"))
    try:
        from framework.memory import budget_for_run, count_params
        from framework.models.tiny import build_tokenizer

        # the real-size config, on the meta device: in the dry run too, so a typo cannot wait for the GPU
        tok = build_tokenizer()
        full_cfg, _ = step_model_parts(FULL.step_model, tok)
        rec["full_model_params"] = count_params(full_cfg).total
        t0 = time.perf_counter()
        rec["model"] = save_step_model(tmp / "model", plan.step_model, dev, tok)
        rec["model"]["kind"] = plan.step_model
        rec["model"]["build_save_s"] = time.perf_counter() - t0
        n_records = 4 * plan.step_prompts
        rec["data"] = write_image_data(tmp / "data", n_records, plan.image_side)
        overrides = [
            "model=qwen2_5_vl_3b",
            f"model.name_or_path={tmp / 'model'}",
            "data=local",
            f"data.path={tmp / 'data'}",
            "logger=csv",
            "trainer.progress_bar=false",
            f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
            f"trainer.max_steps={plan.step_steps}",
            f"trainer.prompts_per_step={plan.step_prompts}",
            f"rollout.group_size={plan.group_size}",
            f"rollout.max_new_tokens={plan.step_new_tokens}",
            "trainer.eval_every=0",
            "trainer.log_completions_every=0",
            f"output_dir={tmp / 'run'}",
        ]
        rec["overrides"] = overrides
        cfg = compose_config(overrides)

        from framework.checkpoint import RLCheckpoint
        from framework.models.loading import load_model_bundle
        from framework.rollout.inputs import encode_prompts
        from framework.train import check_early, train

        early = check_early(cfg)
        s = early["sections"]
        rec["precision"] = s["trainer"].precision
        path = str(tmp / "model")
        max_prompt = s["data"].max_prompt_tokens
        predicted = budget_for_run(path, s, early["algorithm"], world_size=1, prompt_tokens=max_prompt)
        bundle = load_model_bundle(path)
        from framework.data import load_data, to_record

        ds = load_data(s["data"].options(OmegaConf.to_container(cfg.data, resolve=True)))["train"]
        recs = [to_record(ds[i]) for i in range(plan.step_prompts)]
        enc = encode_prompts(bundle, recs, s["data"].system_prompt, s["data"].question_template)
        prompt_len = int(enc.inputs["input_ids"].shape[1])
        at_prompt = budget_for_run(path, s, early["algorithm"], world_size=1, prompt_tokens=prompt_len)
        rec.update(
            prompt_tokens=prompt_len,
            budget_prompt_tokens=max_prompt,
            budget=budget_summary(predicted),
            budget_at_prompt=budget_summary(at_prompt),
        )
        rec.save()

        # no checkpoint: a 3B fp32 + AdamW state.ckpt is ~45 GB of disk writes that measure nothing here
        RLCheckpoint.save = lambda self, trainer, module: None
        rec["checkpoint"] = "not written (RLCheckpoint.save patched out in this benchmark)"
        reset_peak(dev)
        t0 = time.perf_counter()
        res = train(cfg)
        rec["train_wall_s"] = time.perf_counter() - t0
        mem, src = peak_memory(dev)
        steps = [
            {
                k: v
                for k, v in row.items()
                if k.startswith(("timing_s/", "perf/"))
                or k in ("rl_step", "loss", "kl", "reward", "completions/mean_length")
            }
            for row in res.history
            if "timing_s/step" in row
        ]
        last = steps[-1] if steps else {}
        rec.update(
            steps=steps,
            timing_s={k.removeprefix("timing_s/"): v for k, v in last.items() if k.startswith("timing_s/")},
            perf={k.removeprefix("perf/"): v for k, v in last.items() if k.startswith("perf/")},
            peak_mem_gib=mem,
            peak_mem_source=src,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB if cuda else None,
            peak_vs_budget=mem / rec["budget"]["peak_gib"],
            peak_vs_budget_at_prompt=mem / rec["budget_at_prompt"]["peak_gib"],
        )
        print(
            f"step: {len(steps)} RL steps, last {last.get('timing_s/step', float('nan')):.2f} s; peak {mem:.2f} GiB "
            f"vs budget {rec['budget']['peak_gib']:.2f} GiB (at the measured prompt length "
            f"{rec['budget_at_prompt']['peak_gib']:.2f} GiB)",
            flush=True,
        )
        rec.save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


WORKERS = {"update": part_update, "rollout": part_rollout, "step": part_step}


# ----------------------------------------------------------------------------- the anchor
def anchor_script(tiny: bool, tmp: Path) -> Path:
    """The anchor as it is, or (dry run) with :data:`TINY_ANCHOR` applied."""
    if not tiny:
        return ANCHOR
    src = ANCHOR.read_text()
    for old, new in TINY_ANCHOR:
        if old not in src:
            raise RuntimeError(f"benchmarks/gpu_anchor.py no longer contains {old!r}: update TINY_ANCHOR")
        src = src.replace(old, new)
    out = tmp / "gpu_anchor_tiny.py"
    out.write_text(src)
    return out


def parse_anchor(log: str, json_path: Path) -> dict:
    """The anchor's printed lines and its gpu_anchor.json, as numbers."""
    out: dict[str, Any] = {"generate": {}, "train": {}}
    if json_path.exists():
        out["json"] = json.loads(json_path.read_text())
    m = re.search(r"params total ([\d.]+)B text ([\d.]+)B build ([\d.]+)s", log)
    if m:
        out.update(params_total_b=float(m[1]), params_text_b=float(m[2]), build_s=float(m[3]))
    for m in re.finditer(r"HF generate B=(\d+) new=(\d+): ([\d,.]+) tok/s \(([\d.]+)s\)", log):
        out["generate"][m[1]] = {
            "new_tokens": int(m[2]),
            "tokens_per_s": float(m[3].replace(",", "")),
            "seconds": float(m[4]),
        }
    for m in re.finditer(
        r"train B=(\d+) L=(\d+): ([\d,.]+) tok/s step ([\d.]+)s MFU\(6N, vs ([\d.]+)T\) ([\d.]+)% peak mem ([\d.]+) GiB",
        log,
    ):
        out["train"][f"{m[1]}x{m[2]}"] = {
            "tokens_per_s": float(m[3].replace(",", "")),
            "step_s": float(m[4]),
            "mfu": float(m[6]) / 100,
            "mfu_peak_tflops": float(m[5]),
            "peak_mem_gib": float(m[7]),
        }
    for m in re.finditer(r"OOM at (\d+) (\d+)", log):
        out["train"][f"{m[1]}x{m[2]}"] = {"oom": True}
    m = re.search(r"floor per decode step ~([\d.]+) ms", log)
    if m:
        out["decode_floor_ms"] = float(m[1])
    for k, v in out.get("json", {}).items():  # its JSON's tokens/s are unrounded
        g = re.fullmatch(r"hf_generate_B(\d+)_tok_per_s", k) or re.fullmatch(r"train_B(\d+)_L(\d+)_tok_per_s", k)
        if g and g.lastindex == 1:
            out["generate"].setdefault(g[1], {})["tokens_per_s"] = v
        elif g:
            out["train"].setdefault(f"{g[1]}x{g[2]}", {})["tokens_per_s"] = v
    return out


# ----------------------------------------------------------------------------- pytest
def parse_pytest(log: str) -> dict:
    out = dict.fromkeys(("passed", "failed", "skipped", "errors", "deselected", "xfailed", "xpassed"), 0)
    lines = [ln for ln in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b", ln)]
    if lines:
        summary = lines[-1]
        out["summary"] = summary.strip("= ").strip()
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b", summary):
            out["errors" if what.startswith("error") else what] = int(n)
    return out


# ----------------------------------------------------------------------------- orchestration
def run_process(cmd: list[str], *, limit_s: float, log, prefix: str, env: dict) -> tuple[int | None, float, float, str]:
    """Run ``cmd`` in its own process group, echoing its output (prefixed) to stdout and to the
    log; kill the whole group at ``limit_s``. Returns (exit code or None on timeout, seconds,
    CPU seconds of the finished children, the output)."""
    import resource

    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            log.write(f"[{prefix}] {line}")
            log.flush()
            sys.stdout.write(f"[{prefix}] {line}")
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    reader.join(timeout=10)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return rc, time.perf_counter() - t0, cpu_s, "".join(lines)


def child_env(device: str) -> dict:
    env = dict(os.environ)
    if not device.startswith("cuda"):
        # one thread a process on the CPU: the dry run's ops are tiny, and on a busy machine
        # OpenMP threads that wait for each other cost 10-20x (measured on a 2-core machine)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_part(name: str, plan: Plan, a, tmp: Path, log, limit_s: float) -> dict:
    env = child_env(a.device)
    result: dict[str, Any] = {}
    if name in WORKERS:
        res_file = tmp / f"{name}.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", name, "--result", str(res_file)]
        cmd += ["--device", a.device, "--master-dtype", a.master_dtype] + (["--tiny"] if a.tiny else [])
        rc, secs, cpu_s, out = run_process(cmd, limit_s=limit_s, log=log, prefix=name, env=env)
        if res_file.exists():
            result = json.loads(res_file.read_text())
    elif name == "anchor":
        env["OUT"] = str(tmp)
        script = anchor_script(a.tiny, tmp)
        result["mode"] = "tiny rewrite (dry run)" if a.tiny else "verbatim"
        rc, secs, cpu_s, out = run_process(
            [sys.executable, str(script)], limit_s=limit_s, log=log, prefix=name, env=env
        )
        result.update(parse_anchor(out, tmp / "gpu_anchor.json"))
    elif name == "pytest":
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *plan.pytest_paths]
        rc, secs, cpu_s, out = run_process(cmd, limit_s=limit_s, log=log, prefix=name, env=env)
        result.update(parse_pytest(out), paths=list(plan.pytest_paths), rc=rc)
        if rc == 5:  # no tests collected
            rc = 0
    else:
        raise ValueError(f"unknown part {name!r}; parts: {', '.join(PARTS)}")
    status = "timeout" if rc is None else "ok" if rc == 0 else "failed"
    if status == "failed":
        result["error_tail"] = out[-3000:]
    result.update(status=status, seconds=secs, cpu_s=cpu_s, limit_s=limit_s, rc=rc)
    return result


def derive(res: dict) -> None:
    """Ratios against the anchor and the issue's goals."""
    parts = res["parts"]
    anchor = parts.get("anchor", {})
    cmp: dict[str, Any] = {}
    for row in parts.get("update", {}).get("rows", []):
        ref = anchor.get("train", {}).get(row["shape"], {})
        if row.get("tokens_per_s") and ref.get("tokens_per_s"):
            cmp[f"update_{row['shape']}_tokens_per_s_vs_anchor"] = row["tokens_per_s"] / ref["tokens_per_s"]
    for row in parts.get("rollout", {}).get("rows", []):
        ref = anchor.get("generate", {}).get(str(row["batch"]), {})
        if ref.get("tokens_per_s"):
            cmp[f"rollout_B{row['batch']}_tokens_per_s_vs_anchor"] = row["tokens_per_s"] / ref["tokens_per_s"]
    res["comparison"] = cmp

    goals = []
    up = [r for r in parts.get("update", {}).get("rows", []) if not r.get("oom")]
    if up:
        r0 = up[0]
        goals.append(
            {"goal": f"update MFU at {r0['shape']}", "value": r0["mfu"], "target": ">= 0.45", "met": r0["mfu"] >= 0.45}
        )
        ref = anchor.get("train", {}).get(r0["shape"], {}).get("peak_mem_gib")
        target = ref if ref else 63.0
        goals.append(
            {
                "goal": f"update peak memory at {r0['shape']} (GiB)",
                "value": r0["peak_mem_gib"],
                "target": f"< {target:.1f} (anchor)",
                "met": r0["peak_mem_gib"] < target,
            }
        )
    ro = parts.get("rollout", {}).get("rows", [])
    if ro:
        big = max(ro, key=lambda r: r["batch"])
        ratio = cmp.get(f"rollout_B{big['batch']}_tokens_per_s_vs_anchor")
        goals.append(
            {
                "goal": f"rollout tokens/s at batch {big['batch']} vs anchor generate",
                "value": ratio,
                "target": ">= 3x",
                "met": None if ratio is None else ratio >= 3,
            }
        )
    st = parts.get("step", {})
    if st.get("peak_vs_budget") is not None:
        v = st["peak_vs_budget"]
        goals.append(
            {
                "goal": "RL step peak memory / start-up budget",
                "value": v,
                "target": "within 15% (0.85-1.15)",
                "met": 0.85 <= v <= 1.15,
            }
        )
    res["goals"] = goals


def fmt(v: Any, spec: str = ",.0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def markdown(res: dict) -> str:
    m, p = res["meta"], res["parts"]
    v = m.get("versions", {})
    lines = [
        f"# GPU check: {v.get('gpu') or 'cpu'} ({'tiny dry run' if m['tiny'] else 'real size'})",
        "",
        f"`{m['command']}`, {m['started']}, {m['wall_s']:.0f} s",
        "",
        "versions: "
        + ", ".join(
            f"{k} {v[k]}"
            for k in ("python", "torch", "cuda", "transformers", "lightning", "hydra-core", "datasets", "wandb")
            if k in v
        ),
        "",
        "| part | status | seconds | CPU s | limit s |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {r.get('status')} | {fmt(r.get('seconds'), '.0f')} | {fmt(r.get('cpu_s'), '.0f')} | {fmt(r.get('limit_s'), '.0f')} |"
        for n, r in p.items()
    ]
    u = p.get("update")
    if u:
        an = p.get("anchor", {}).get("train", {})
        lines += [
            "",
            f"## Update: {u.get('arch')}, {u.get('master_dtype')} masters, {u.get('compute')}, grad ckpt, log-prob chunks of {u.get('logprob_chunk')}, {u.get('algorithm')}, {u.get('optimizer')}",
            "",
            f"N_text {fmt(u.get('n_text_params'))}; MFU vs {fmt(u.get('peak_tflops'), '.0f')} TFLOP/s ({u.get('peak_tflops_source')}); measured bf16 matmul {fmt(u.get('matmul_tflops_measured'), '.0f')} TFLOP/s",
            "",
            "| B x L | tokens/s | MFU | MFU vs matmul | peak GiB | fwd s | bwd s | optim s | anchor tokens/s | anchor MFU | anchor peak GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in u.get("rows", []):
            ref = an.get(r["shape"], {})
            if r.get("oom"):
                lines.append(f"| {r['shape']} | OOM | | | | | | | {fmt(ref.get('tokens_per_s'))} | | |")
                continue
            lines.append(
                f"| {r['shape']} | {fmt(r['tokens_per_s'])} | {fmt(r['mfu'], '.1%')} | {fmt(r['mfu_vs_matmul'], '.1%')} | "
                f"{fmt(r['peak_mem_gib'], '.2f')} | {fmt(r['fwd_s'], '.3f')} | {fmt(r['bwd_s'], '.3f')} | "
                f"{fmt(r['optim_s'], '.3f')} | {fmt(ref.get('tokens_per_s'))} | {fmt(ref.get('mfu'), '.1%')} | "
                f"{fmt(ref.get('peak_mem_gib'), '.1f')} |"
            )
    ro = p.get("rollout")
    if ro:
        an = p.get("anchor", {}).get("generate", {})
        lines += [
            "",
            f"## Rollout: transformers engine, {ro.get('arch')} in {ro.get('dtype')}, {ro.get('prompt_tokens')}-token prompts, {ro.get('new_tokens')} new tokens, G {ro.get('group_size')}; static cache: {ro.get('static_cache')}; compiled decode: {ro.get('compiled_decode')}",
            "",
            "| batch | tokens/s | seconds | ms / decode step | peak GiB | anchor generate tokens/s | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ro.get("rows", []):
            ref = an.get(str(r["batch"]), {}).get("tokens_per_s")
            ratio = r["tokens_per_s"] / ref if ref else None
            lines.append(
                f"| {r['batch']} | {fmt(r['tokens_per_s'])} | {fmt(r['seconds'], '.2f')} | {fmt(r['ms_per_decode_step'], '.1f')} | "
                f"{fmt(r['peak_mem_gib'], '.2f')} | {fmt(ref)} | {fmt(ratio, '.2f')} |"
            )
    st = p.get("step")
    if st and st.get("timing_s"):
        lines += [
            "",
            f"## RL step: framework.train.train, {st.get('model', {}).get('kind')} ({fmt(st.get('model', {}).get('n_params'))} params), {st.get('precision')}, {len(st.get('steps', []))} steps; values of the last step",
            "",
            "| measure | value |",
            "|---|---|",
        ]
        lines += [f"| timing_s/{k} | {fmt(val, '.3f')} |" for k, val in st["timing_s"].items()]
        lines += [f"| perf/{k} | {fmt(val)} |" for k, val in st.get("perf", {}).items()]
        lines += [
            f"| peak memory GiB ({st.get('peak_mem_source')}) | {fmt(st.get('peak_mem_gib'), '.2f')} |",
            f"| budget peak GiB (prompt {st.get('budget_prompt_tokens')} tokens) | {fmt(st['budget']['peak_gib'], '.2f')} |",
            f"| budget peak GiB (measured prompt {st.get('prompt_tokens')} tokens) | {fmt(st['budget_at_prompt']['peak_gib'], '.2f')} |",
            f"| peak / budget | {fmt(st.get('peak_vs_budget'), '.2f')} |",
        ]
    py = p.get("pytest")
    if py:
        lines += ["", f"## pytest -m gpu: {py.get('summary', '-')}"]
    if res.get("goals"):
        lines += ["", "## Goals (issue 16)", "", "| goal | value | target | met |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {fmt(g['value'], '.3g')} | {g['target']} | {fmt(g['met'])} |" for g in res["goals"]]
    return "\n".join(lines) + "\n"


def orchestrate(a) -> int:
    plan = TINY if a.tiny else FULL
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wanted = {x.strip() for x in a.parts.split(",") if x.strip()}
    unknown = sorted(wanted - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; parts: {','.join(PARTS)}")
    parts = [x for x in PARTS if x in wanted]  # always in this order
    budget = a.budget_s or plan.budget_s
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "meta": {
            "command": " ".join(["python -m benchmarks.gpu_check", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": a.device,
            "tiny": a.tiny,
            "budget_s": budget,
            "plan": asdict(plan),
            "versions": versions(),
            "wall_s": 0.0,
        },
        "parts": {},
    }
    v = res["meta"]["versions"]
    print("versions: " + json.dumps(v), flush=True)
    if not v["transformers_checked"]:
        print(f"WARNING: transformers {v['transformers']} is not one this check was tested with {CHECKED_TRANSFORMERS}")

    def save():
        res["meta"]["wall_s"] = time.perf_counter() - t_start
        derive(res)
        write_json(out / "gpu_check.json", res)
        (out / "gpu_check.md").write_text(markdown(res))

    save()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp, open(out / "gpu_check.log", "a") as log:
        for name in parts:
            left = budget - (time.perf_counter() - t_start)
            limit = min(float(a.limit_s or plan.limits_s.get(name, 120)), left)
            if limit < 15:
                res["parts"][name] = {"status": "skipped", "reason": f"no time left ({left:.0f} s of {budget} s)"}
                save()
                continue
            print(f"=== {name} (limit {limit:.0f} s) ===", flush=True)
            try:
                res["parts"][name] = run_part(name, plan, a, Path(tmp), log, limit)
            except Exception as e:  # one part's harness error must not lose the others
                res["parts"][name] = {"status": "failed", "error_tail": traceback.format_exc()[-3000:], "error": str(e)}
            r = res["parts"][name]
            print(f"=== {name}: {r.get('status')} in {r.get('seconds', 0):.0f} s ===", flush=True)
            save()
    save()
    print((out / "gpu_check.md").read_text(), flush=True)
    return 0 if all(r.get("status") == "ok" for r in res["parts"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", help="output folder (gpu_check.json, gpu_check.md, gpu_check.log)")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when there is one)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (the CPU dry run)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, in this order: {','.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="all parts together (default 540; tiny 900)")
    ap.add_argument("--limit-s", type=float, default=None, help="one limit for every part (default: per part)")
    ap.add_argument("--master-dtype", default="float32", help="update part: the weights' dtype (bf16 compute)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.worker:
        rec = Record(Path(a.result))
        rec["versions"] = versions()
        rec.save()
        WORKERS[a.worker](TINY if a.tiny else FULL, a, rec)
        rec.save()
        return 0
    if not a.out:
        ap.error("--out is required")
    return orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
