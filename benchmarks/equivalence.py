"""Behaviour-preserving refactors, checked: the metrics histories of short real runs, written
before and after a change and compared float for float.

    python -m benchmarks.equivalence --out /tmp/eq_before            # before the change
    python -m benchmarks.equivalence --out /tmp/eq_after             # after it
    python -m benchmarks.equivalence --compare /tmp/eq_before /tmp/eq_after

Each run (:data:`RUNS`) is 3 RL steps of the tiny Qwen2.5-VL (seed 0, no evaluation, no
W&B), one JSON file ``<name>.json`` holding ``RunResult.history``. ``--compare`` requires
every row of every run to hold the same keys with bit-identical values (NaN equal to NaN),
leaving out timings and throughput (``timing_s/*``, ``perf/*``): it prints one line per run
and exits 1 on any difference, naming the run, the row and the key.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
from pathlib import Path

# 3 RL steps x 4 prompts x 4 completions, 16 new tokens (room for answers that differ in reward)
COMMON = (
    "trainer.max_steps=3",
    "trainer.eval_every=0",
    "trainer.eval_size=4",
    "trainer.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=16",
    "logger.wandb=false",
    "trainer.progress_bar=false",
    "trainer.save_every=0",
    "seed=0",
)

# name -> overrides on top of COMMON
RUNS: dict[str, tuple[str, ...]] = {
    "grpo": (),
    # DAPO dynamic sampling with refill rounds and 2 optimizer steps per rollout
    "dapo_refills": (
        "algorithm=dapo",
        "algorithm.filter_groups.max_extra_rounds=1",
        "trainer.num_mini_batches=2",
        "algorithm.mask_truncated_completions=true",
    ),
    "apo": ("algorithm=apo",),
    "lora": ("model.lora.enabled=true",),
    # the step clock of both schedules: GRPO-D's KL schedule and a warmed-up cosine LR over
    # 2 ppo epochs x 2 mini-batches per rollout (old log-probs, clipped ratios)
    "grpo_d_clock": (
        "algorithm=grpo_d",
        "algorithm.ppo_epochs=2",
        "trainer.num_mini_batches=2",
        "optim.scheduler=cosine",
        "optim.warmup_ratio=0.2",
    ),
}

SKIPPED_PREFIXES = ("timing_s/", "perf/")


def run_all(out: Path, names: list[str]) -> None:
    from framework.resources import compose_config
    from framework.train import train

    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"eq_{name}_") as d:
            cfg = compose_config([f"output_dir={d}", *COMMON, *RUNS[name]])
            res = train(cfg)
        (out / f"{name}.json").write_text(json.dumps(res.history, indent=1))
        print(f"{name}: {len(res.history)} rows -> {out / (name + '.json')}", flush=True)


def _bits(v: float) -> bytes:
    return b"nan" if math.isnan(v) else struct.pack("<d", v)


def compare(a: Path, b: Path, names: list[str]) -> int:
    bad = 0
    for name in names:
        ha = json.loads((a / f"{name}.json").read_text())
        hb = json.loads((b / f"{name}.json").read_text())
        diffs = []
        if len(ha) != len(hb):
            diffs.append(f"{len(ha)} rows vs {len(hb)}")
        n_vals = 0
        for i, (ra, rb) in enumerate(zip(ha, hb)):
            ka = {k for k in ra if not k.startswith(SKIPPED_PREFIXES)}
            kb = {k for k in rb if not k.startswith(SKIPPED_PREFIXES)}
            if ka != kb:
                diffs.append(f"row {i}: keys only before {sorted(ka - kb)}, only after {sorted(kb - ka)}")
            for k in sorted(ka & kb):
                n_vals += 1
                if _bits(float(ra[k])) != _bits(float(rb[k])):
                    diffs.append(f"row {i} {k}: {ra[k]!r} vs {rb[k]!r}")
        status = "bit-identical" if not diffs else f"{len(diffs)} difference(s)"
        print(f"{name}: {len(ha)} rows, {n_vals} values compared: {status}")
        for d in diffs[:20]:
            print(f"  {d}")
        bad += bool(diffs)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write <name>.json histories into this folder")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare, args.runs)
    if not args.out:
        p.error("give --out DIR or --compare BEFORE AFTER")
    run_all(args.out, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
