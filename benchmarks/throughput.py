"""Rollout and update throughput of one RL step's phases, printed as a table.

    python -m benchmarks.throughput                       # tiny default model, CPU
    python -m benchmarks.throughput --model tiny:qwen2 --data synthetic_text
    python -m benchmarks.throughput --model /models/Qwen2.5-VL-3B-Instruct --dtype bfloat16 --device cuda

Measures the same code the trainer runs: the rollout engine's generate (G completions per
prompt), the chunked log-prob forward without grad (reference / old policy) and
forward+backward of the policy loss through :class:`framework.logprobs.RolloutLogProbs` (each
prompt run once for its samples). Record results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from framework.data import load_data, to_record
from framework.logprobs import RolloutLogProbs
from framework.models.loading import load_model, load_model_bundle, resolve_path
from framework.registry import ROLLOUT_ENGINES
from framework.rollout.base import SamplingParams
from framework.rollout.inputs import encode_prompts, expand_inputs
from framework.types import Rollout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny:qwen2_5_vl-sft")
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--engine", default="hf")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    path = resolve_path(a.model)
    bundle = load_model_bundle(path)
    model = load_model(path, a.dtype).to(a.device)
    from benchmarks.rollout_engines import data_config

    dcfg = data_config(a.data)
    ds = load_data(dcfg.options())["test"]
    recs = [to_record(ds[i]) for i in range(a.prompts)]
    rcfg = OmegaConf.create({"engine": a.engine})
    engine = ROLLOUT_ENGINES.get(a.engine)(rcfg, bundle, model)
    sp = SamplingParams(max_new_tokens=a.max_new_tokens)
    prompts = encode_prompts(bundle, recs, dcfg.system_prompt, dcfg.question_template)
    engine.generate(prompts, a.group_size, sp)  # warm-up
    rows = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        gen = engine.generate(prompts, a.group_size, sp)
        t1 = time.perf_counter()
        ntok = float(gen.completion_mask.sum())
        N = gen.completion_ids.shape[0]
        ro = Rollout(
            completion_ids=gen.completion_ids,
            completion_mask=gen.completion_mask,
            group_ids=torch.arange(len(recs)).repeat_interleave(a.group_size),
            rewards=torch.zeros(N),
            correct=torch.zeros(N),
            truncated=gen.truncated,
            prompt_inputs=expand_inputs(prompts.inputs, a.group_size, prompts.images_per_sample),
            images_per_sample=[c for c in prompts.images_per_sample for _ in range(a.group_size)],
        )
        logprobs = RolloutLogProbs(1.0, 1024, a.device)
        with torch.no_grad():
            logprobs(model, ro)
        t2 = time.perf_counter()
        lp, _ = logprobs(model, ro)
        (-(lp * gen.completion_mask.to(a.device)).sum()).backward()
        model.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        rows.append((ntok, t1 - t0, t2 - t1, t3 - t2))
    n = len(rows)
    ntok = sum(r[0] for r in rows) / n
    print(
        f"model={a.model} engine={a.engine} device={a.device} dtype={a.dtype} "
        f"batch={a.prompts}x{a.group_size} max_new_tokens={a.max_new_tokens}"
    )
    print("| phase | seconds | completion tokens/s |\n|---|---|---|")
    for name, i in (("rollout (generate)", 1), ("log-probs, no grad", 2), ("update (fwd+bwd)", 3)):
        s = sum(r[i] for r in rows) / n
        print(f"| {name} | {s:.3f} | {ntok / s:,.0f} |")


if __name__ == "__main__":
    main()
