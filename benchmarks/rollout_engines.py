"""Rollout throughput of each engine on the same prompts: completion tokens per second of
``engine.generate(prompts, G, sampling)``, the call the trainer makes every RL step.

    python -m benchmarks.rollout_engines                                   # tiny text twin, CPU, hf + vllm
    python -m benchmarks.rollout_engines --prompts 64 --engines vllm
    python -m benchmarks.rollout_engines --model /models/Qwen2.5-VL-3B-Instruct --data synthetic \\
        --dtype bfloat16 --device cuda --max-new-tokens 256                 # GPU

On CPU vLLM needs ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) and, in-process,
``VLLM_CPU_OMP_THREADS_BIND=nobind``; both default here to 1 and nobind. vLLM runs text-only
models on CPU (its Qwen2-VL code needs torchvision). Also printed: each engine's start-up
time and, for vLLM, the in-place weight sync time. Record results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def data_config(name: str):
    """The typed ``data`` section of ``apo-rl data=<name>`` (framework.config.DataConfig)."""
    from framework.config import data_section

    return data_section(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny:qwen2-sft")
    ap.add_argument("--data", default="synthetic_text")
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    a = ap.parse_args()
    for k, v in {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }.items():
        os.environ.setdefault(k, v)

    import framework.rollout  # noqa: F401  registers the engines
    from framework.config import RolloutConfig
    from framework.data import load_data, to_record
    from framework.models.loading import load_model, load_model_bundle, resolve_path
    from framework.registry import ROLLOUT_ENGINES
    from framework.rollout.base import SamplingParams
    from framework.rollout.inputs import encode_prompts

    path = resolve_path(a.model)
    bundle = load_model_bundle(path)
    model = load_model(path, a.dtype, trainable=False).to(a.device)
    dcfg = data_config(a.data)
    ds = load_data(dcfg.options())["test"]
    recs = [to_record(ds[i % len(ds)]) for i in range(a.prompts)]
    prompts = encode_prompts(bundle, recs, dcfg.system_prompt, dcfg.question_template)
    sp = SamplingParams(temperature=a.temperature, max_new_tokens=a.max_new_tokens)
    P = int(prompts.inputs["attention_mask"].sum(-1).float().mean())
    print(
        f"model={a.model} data={a.data} device={a.device} dtype={a.dtype} batch={a.prompts}x{a.group_size} "
        f"prompt tokens (mean)={P} max_new_tokens={a.max_new_tokens} temperature={a.temperature} "
        f"torch threads={torch.get_num_threads()}"
    )
    rows = []
    for name in [e.strip() for e in a.engines.split(",") if e.strip()]:
        rcfg = RolloutConfig(
            engine=name,
            max_new_tokens=a.max_new_tokens,
            gpu_memory_utilization=a.gpu_memory_utilization,
            max_model_len=2048,
            dtype=None,
        )
        t0 = time.perf_counter()
        engine = ROLLOUT_ENGINES.get(name)(rcfg, bundle, model)
        start = time.perf_counter() - t0
        engine.generate(prompts, a.group_size, sp)  # warm-up
        secs, toks = [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            gen = engine.generate(prompts, a.group_size, sp)
            secs.append(time.perf_counter() - t0)
            toks.append(float(gen.completion_mask.sum()))
        sync = ""
        if hasattr(engine, "last_sync_s") and name != "hf":
            engine.sync_weights(model)
            sync = f"{engine.last_sync_s * 1000:.0f} ms"
        s, n = sum(secs) / len(secs), sum(toks) / len(toks)
        rows.append((name, start, s, n, n / s, sync))
        engine.close()
    print(
        "| engine | start-up (s) | rollout (s) | completion tokens | tokens/s | weight sync |\n|---|---|---|---|---|---|"
    )
    for name, start, s, n, tps, sync in rows:
        print(f"| {name} | {start:.1f} | {s:.3f} | {n:.0f} | {tps:,.0f} | {sync or '-'} |")


if __name__ == "__main__":
    main()
