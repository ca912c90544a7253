"""Throughput, MFU and peak memory of the update phase on a real-size architecture with
random weights (nothing to download), measured on the framework's own update path: the
chunked, checkpointed log-probs (framework/logprobs.py) and the registered algorithm's loss
(GRPO with its k3 KL term by default), backward, gradient clipping and AdamW.

    python -m benchmarks.update_throughput --arch qwen2_5_vl_3b --device cuda            # a GPU, pure bf16
    python -m benchmarks.update_throughput --arch qwen2_5_vl_3b --dtype float32 --autocast bfloat16
                                          # fp32 master weights, bf16 compute (Lightning's bf16-mixed)
    python -m benchmarks.update_throughput --arch tiny --device cpu --steps 2            # smoke

Prints one Markdown row per batch shape: tokens/s of fwd+bwd+optimizer, MFU = 6 * N_text *
tokens / time / peak FLOP/s (N_text: the language model's parameters, as in the reference
measurement in ../shared/bench), peak memory, and the time of each phase. Compare with the
plain-PyTorch anchor (``python3 ../shared/bench/gpu_anchor.py``) in the same job;
``python -m benchmarks.gpu_check`` does both in one job (:func:`measure` is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from algorithms.base import build_algorithm
from framework.logprobs import completion_logprobs
from framework.types import LossNormalizer, Rollout, TrainBatch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def build(arch: str, dtype: torch.dtype, device: str, grad_ckpt: bool, attn: str):
    from transformers import AutoModelForImageTextToText

    if arch == "tiny":
        from transformers import AutoConfig

        from framework.models.loading import resolve_path

        cfg = AutoConfig.from_pretrained(resolve_path("tiny:qwen2_5_vl"))
    else:
        from framework.models.architectures import get

        cfg = get(arch)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model, cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of the named GPU (datasheet), None for a device not in the table."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def make_optimizer(model, device: str) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the fused kernel on CUDA), as the trainer builds it."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-6, fused=device.startswith("cuda"))


def measure(
    model,
    cfg,
    algo,
    opt,
    B: int,
    L: int,
    *,
    device: str,
    prompt_tokens: int = 128,
    chunk: int = 1024,
    steps: int = 4,
    autocast: torch.dtype | None = None,
) -> dict | None:
    """One batch shape of the update phase: B sequences of L tokens, the last L - prompt_tokens
    of them trained on, ``steps`` measured steps after one warm-up. ``autocast``: the compute
    dtype under ``torch.autocast`` (mixed precision over the parameters' own dtype, as
    Lightning's bf16-mixed does), None for none. Returns the median seconds of each phase
    ({"fwd_s", "bwd_s", "optim_s", "step_s", "tokens", "tokens_per_s", "peak_bytes"}; peak_bytes
    is None off CUDA), or None on out-of-memory."""
    P, T = prompt_tokens, L - prompt_tokens
    vocab = cfg.text_config.vocab_size if hasattr(cfg, "text_config") else cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), min(vocab, 100000), (B, L), generator=g).to(device)
    att = torch.ones_like(ids)
    kw = {"input_ids": ids, "attention_mask": att, "position_ids": torch.arange(L, device=device).expand(B, L)}
    mask = torch.ones(B, T)
    G = min(8, B)
    rollout = Rollout(
        completion_ids=ids[:, P:].cpu(),
        completion_mask=mask,
        group_ids=torch.arange(B) // G,
        rewards=torch.randn(B, generator=g),
        correct=torch.zeros(B),
        truncated=torch.zeros(B, dtype=torch.bool),
    )
    logp_ref = -torch.rand(B, T, generator=g) * 5 if algo.needs_reference else None
    mb = TrainBatch.assemble(rollout, algo.prepare(rollout, step=0), logp_ref=logp_ref).to(device)
    norm = LossNormalizer(num_sequences=float(B), num_tokens=float(mask.sum()), max_len=float(T))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    amp = (
        torch.autocast(device_type=torch.device(device).type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    times = []
    try:
        for i in range(steps + 1):
            sync(device)
            t0 = time.perf_counter()
            with amp:
                logp, _ = completion_logprobs(model, kw, T, chunk_size=chunk, with_entropy=False)
                loss, _ = algo.loss(logp, mb, norm)
            sync(device)
            t1 = time.perf_counter()
            loss.backward()
            sync(device)
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            t3 = time.perf_counter()
            if i:  # the first step warms up (allocator, kernels, optimizer state)
                times.append((t1 - t0, t2 - t1, t3 - t2))
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return None
    fwd, bwd, opt_s = (sorted(x)[len(x) // 2] for x in zip(*times))
    step = fwd + bwd + opt_s
    return {
        "fwd_s": fwd,
        "bwd_s": bwd,
        "optim_s": opt_s,
        "step_s": step,
        "tokens": B * L,
        "tokens_per_s": B * L / step,
        "peak_bytes": float(torch.cuda.max_memory_allocated()) if cuda else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2_5_vl_3b", help="qwen2_5_vl_3b | qwen2_5_vl_7b | tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", help="the parameters' dtype")
    ap.add_argument(
        "--autocast", default=None, help="compute dtype under torch.autocast, e.g. bfloat16 with --dtype float32"
    )
    ap.add_argument("--shapes", default="8x1024,16x1024", help="comma-separated BxL (sequences x tokens)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="of each sequence's L tokens, not trained on")
    ap.add_argument("--chunk", type=int, default=1024, help="trainer.logprob_chunk_size")
    ap.add_argument("--no-grad-ckpt", action="store_true")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--algorithm", default="grpo")
    ap.add_argument("--steps", type=int, default=4, help="measured steps (after one warm-up)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: from the device name)")
    a = ap.parse_args()

    dtype = getattr(torch, a.dtype)
    model, cfg = build(a.arch, dtype, a.device, not a.no_grad_ckpt, a.attn)
    n_text = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    peak = a.peak_tflops
    if peak is None and a.device.startswith("cuda"):
        peak = peak_tflops(torch.cuda.get_device_name())
    opt = make_optimizer(model, a.device)
    algo = build_algorithm({"name": a.algorithm}, total_steps=100)
    print(
        f"arch={a.arch} device={a.device} dtype={a.dtype} autocast={a.autocast} grad_ckpt={not a.no_grad_ckpt} "
        f"chunk={a.chunk} algorithm={a.algorithm} N_text={n_text / 1e9:.3f}B peak={peak} TFLOP/s"
    )
    print("| B x L | tokens/s | MFU | peak GiB | fwd s | bwd s | optim s |\n|---|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        B, L = (int(x) for x in shape.lower().split("x"))
        r = measure(
            model,
            cfg,
            algo,
            opt,
            B,
            L,
            device=a.device,
            prompt_tokens=a.prompt_tokens,
            chunk=a.chunk,
            steps=a.steps,
            autocast=getattr(torch, a.autocast) if a.autocast else None,
        )
        if r is None:
            print(f"| {B} x {L} | OOM | | | | | |")
            continue
        mfu = f"{6 * n_text * r['tokens'] / r['step_s'] / (peak * 1e12):.1%}" if peak else "n/a"
        mem = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] is not None else "n/a"
        print(
            f"| {B} x {L} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} | {r['fwd_s']:.3f} | {r['bwd_s']:.3f} "
            f"| {r['optim_s']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
