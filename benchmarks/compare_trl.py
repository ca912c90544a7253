"""This framework against TRL's GRPOTrainer on the same work, side by side (issue 17).

    pip install -e '.[bench-trl]'                    # TRL is a benchmark extra, never a dependency
    python -m benchmarks.compare_trl                 # the workload below, 4 runs of each, interleaved
    python -m benchmarks.compare_trl --runs 6 --steps 12

The workload (:class:`Workload`): the same tiny random-weight Qwen2.5-VL folder loaded by both,
the same 64 synthetic "how many shapes" image prompts, 4 prompts x G = 8 completions of at most
64 new tokens per step at temperature 1, GRPO (seq-mean-token-mean loss, group-scaled
advantages, clip 0.2) with beta = 0.04 and the k3 KL against a frozen reference model, fp32,
AdamW at lr 1e-5 (constant, no weight decay), gradient clipping at 1.0, one optimizer step
per rollout over all 32 completions, the same reward plugins (accuracy + format, the project's
:class:`rewards.RewardSet`), no evaluation, no checkpoints.

Every run is a fresh process (``--worker ours|trl``); the runs alternate between the two
frameworks so that a change in the machine's load hits both. A step's wall time is the time
between the ends of consecutive optimizer steps (everything the trainer does, logging
included); its phases are measured in each framework around the same work: generation
(``rollout``), reward scoring (``reward``), the reference model's log-probs (``ref_logp``), the
rollout policy's (``old_logp``, not needed here) and the rest (``update+``: the policy's
forward and backward, the optimizer step, logging). The summary is the median over steps
``warmup+1 .. steps`` of each run, then the median over runs and its spread (min-max of the
run medians); the check that both did the same work compares the settings each trainer was
actually built with and the prompt / completion tokens of every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("rollout", "reward", "ref_logp", "old_logp")
ROOT = Path(__file__).resolve().parents[1]
# the checkout whose framework a worker runs (--also NAME=PATH runs another one, e.g. a git
# worktree of an earlier commit, through this file)
CHECKOUT = Path(os.environ.get("COMPARE_TRL_CHECKOUT", ROOT))


@dataclasses.dataclass
class Workload:
    model: str = "tiny:qwen2_5_vl"  # random weights: completions run to the budget
    prompts: int = 64
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 64
    beta: float = 0.04
    lr: float = 1e-5
    grad_clip: float = 1.0
    steps: int = 12
    warmup: int = 2  # steps left out of the medians (the first includes one-time set-up)
    seed: int = 0

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


# ----------------------------------------------------------------------------- settings
def ours_overrides(w: Workload, output_dir: str) -> list[str]:
    """Hydra overrides of ``python -m framework.run`` for the workload."""
    return [
        f"output_dir={output_dir}",
        f"model.name_or_path={w.model}",
        "model.dtype=float32",
        "model.master_dtype=float32",
        "data=synthetic",
        "data.kinds=[count]",
        "data.difficulty=[1]",
        f"data.train_size={w.prompts}",
        "data.test_size=4",
        "algorithm=grpo",
        f"algorithm.kl.coef={w.beta}",
        "algorithm.kl.estimator=k3",
        f"rollout.group_size={w.group_size}",
        f"rollout.max_new_tokens={w.max_new_tokens}",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        "rollout.top_k=0",
        f"trainer.prompts_per_step={w.prompts_per_step}",
        f"trainer.micro_batch_size={w.completions_per_step}",
        "trainer.num_mini_batches=1",
        f"trainer.max_steps={w.steps}",
        "trainer.accelerator=cpu",
        "trainer.eval_every=0",
        "trainer.eval_size=1",
        "trainer.save_every=0",
        "trainer.log_completions_every=0",
        "trainer.progress_bar=false",
        f"optim.lr={w.lr}",
        f"optim.grad_clip={w.grad_clip}",
        "optim.weight_decay=0.0",
        "optim.scheduler=constant",
        "optim.warmup_ratio=0.0",
        "logger.wandb=false",
        f"seed={w.seed}",
    ]


def trl_kwargs(w: Workload, output_dir: str) -> dict:
    """GRPOConfig keyword arguments for the workload."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=w.completions_per_step,  # one forward/backward over all completions
        gradient_accumulation_steps=1,
        num_generations=w.group_size,
        generation_batch_size=w.completions_per_step,
        max_completion_length=w.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=w.beta,
        num_iterations=1,
        epsilon=0.2,
        loss_type="grpo",  # = seq_mean_token_mean
        scale_rewards="group",
        mask_truncated_completions=False,
        learning_rate=w.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=w.grad_clip,
        max_steps=w.steps,
        seed=w.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        log_completions=False,
        disable_dropout=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_vllm=False,
        model_init_kwargs={"dtype": "float32"},
    )


SETTINGS = (
    "model",
    "dtype",
    "completions_per_step",
    "group_size",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "beta",
    "kl_estimator",
    "loss_agg",
    "advantage_scale",
    "clip",
    "epochs_per_rollout",
    "optimizer_steps_per_rollout",
    "lr",
    "lr_schedule",
    "weight_decay",
    "betas",
    "adam_eps",
    "grad_clip",
)


def settings_of_ours(cfg) -> dict:
    """The settings a composed framework config trains with, in :data:`SETTINGS`' terms."""
    a, r, t, o, m = cfg.algorithm, cfg.rollout, cfg.trainer, cfg.optim, cfg.model
    assert a.kl.schedule.name == "constant" and a.clip_low == a.clip_high
    return {
        "model": str(m.name_or_path),
        "dtype": f"{m.dtype}/{m.master_dtype}",
        "completions_per_step": int(t.prompts_per_step * r.group_size),
        "group_size": int(r.group_size),
        "max_new_tokens": int(r.max_new_tokens),
        "temperature": float(r.temperature),
        "top_p": float(r.top_p),
        "top_k": int(r.top_k),
        "beta": float(a.kl.coef),
        "kl_estimator": str(a.kl.estimator),
        "loss_agg": str(a.loss_agg),
        "advantage_scale": str(a.advantage.scale),
        "clip": float(a.clip_low),
        "epochs_per_rollout": int(a.ppo_epochs),
        "optimizer_steps_per_rollout": int(t.num_mini_batches * a.ppo_epochs),
        "lr": float(o.lr),
        "lr_schedule": f"{o.scheduler}, warm-up {float(o.warmup_ratio)}",
        "weight_decay": float(o.weight_decay),
        "betas": [float(b) for b in o.betas],
        "adam_eps": float(o.eps),
        "grad_clip": float(o.grad_clip),
    }


TRL_LOSS = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}


def settings_of_trl(args, model: str) -> dict:
    """The same settings read back from a GRPOConfig (or anything with its attributes)."""
    steps = args.steps_per_generation if getattr(args, "steps_per_generation", None) else 1
    dtype = (args.model_init_kwargs or {}).get("dtype", "auto")
    return {
        "model": model,
        "dtype": f"{dtype}/{dtype}" if not (args.bf16 or args.fp16) else "mixed",
        "completions_per_step": int(args.per_device_train_batch_size * args.gradient_accumulation_steps * steps),
        "group_size": int(args.num_generations),
        "max_new_tokens": int(args.max_completion_length),
        "temperature": float(args.temperature),
        "top_p": float(args.top_p),
        "top_k": int(args.top_k or 0),
        "beta": float(args.beta),
        "kl_estimator": "k3",  # TRL's only estimator: exp(ref - logp) - (ref - logp) - 1
        "loss_agg": TRL_LOSS.get(args.loss_type, args.loss_type),
        "advantage_scale": {True: "group", False: "none"}.get(args.scale_rewards, args.scale_rewards),
        "clip": float(args.epsilon),
        "epochs_per_rollout": int(args.num_iterations),
        "optimizer_steps_per_rollout": int(steps * args.num_iterations),
        "lr": float(args.learning_rate),
        "lr_schedule": f"{str(getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type))}, "
        f"warm-up {float(args.warmup_steps or 0) / max(args.max_steps, 1)}",
        "weight_decay": float(args.weight_decay),
        "betas": [float(args.adam_beta1), float(args.adam_beta2)],
        "adam_eps": float(args.adam_epsilon),
        "grad_clip": float(args.max_grad_norm),
    }


def settings_differ(ours: dict, trl: dict) -> list[str]:
    """One line per setting that is not the same in both (empty: the same settings)."""
    return [f"{k}: ours {ours.get(k)!r}, TRL {trl.get(k)!r}" for k in SETTINGS if ours.get(k) != trl.get(k)]


def compose_ours(w: Workload, output_dir: str):
    from hydra import compose, initialize_config_dir

    from framework.config import register_schemas

    register_schemas()  # the typed group bases (model/base, ...)
    with initialize_config_dir(config_dir=str(CHECKOUT / "configs"), version_base="1.3"):
        return compose("config", overrides=ours_overrides(w, output_dir))


def workload_records(cfg) -> list[dict]:
    """The workload's training records, read the way the framework reads them."""
    from omegaconf import OmegaConf

    from framework.data import load_data, to_record

    ds = load_data(OmegaConf.to_container(cfg.data, resolve=True))["train"]
    return [to_record(ds[i]) for i in range(len(ds))]


# ----------------------------------------------------------------------------- the workers
def run_ours(w: Workload, output_dir: str) -> dict:
    """One training run through ``framework.train``; per step: wall time between optimizer-step
    ends, the logged phase timings and token counts."""
    from framework.module import RLModule
    from framework.train import train

    marks: list[float] = []
    saved = RLModule.on_train_batch_end, RLModule.evaluate
    RLModule.on_train_batch_end = lambda self, *a, **k: marks.append((time.perf_counter(), time.process_time()))
    RLModule.evaluate = lambda self: {}  # no evaluation in the workload
    cfg = compose_ours(w, output_dir)
    try:
        res = train(cfg)
    finally:
        RLModule.on_train_batch_end, RLModule.evaluate = saved
    rows = [r for r in res.history if "timing_s/step" in r]
    steps = []
    for i, r in enumerate(rows):
        completion = r["completions/mean_length"] * w.completions_per_step
        steps.append(
            {
                "wall": marks[i][0] - marks[i - 1][0] if i > 0 else None,
                "cpu": marks[i][1] - marks[i - 1][1] if i > 0 else None,
                **{p: r.get(f"timing_s/{p}", 0.0) for p in PHASES},
                "update": r["timing_s/update"],
                "completion_tokens": round(completion),
                "prompt_tokens": round(r["perf/total_tokens"] - completion),
            }
        )
    return {"framework": "ours", "settings": settings_of_ours(cfg), "steps": steps}


def run_trl(w: Workload, output_dir: str) -> dict:
    """One training run through TRL's GRPOTrainer, timed around the same phases."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from framework.models.loading import load_model_bundle, resolve_path
    from rewards import RewardSet

    cfg = compose_ours(w, output_dir)  # the data, the reward plugins and the model of the same workload
    path = resolve_path(w.model)
    bundle = load_model_bundle(path)
    records = workload_records(cfg)
    sysp = cfg.data.system_prompt
    rows = []
    for i, rec in enumerate(records):
        msgs = ([{"role": "system", "content": sysp}] if sysp else []) + [
            {"role": "user", "content": cfg.data.question_template.format(question=rec["question"])}
        ]
        rows.append({"prompt": msgs, "image": rec["images"][0], "rid": i})
    from omegaconf import OmegaConf

    reward_set = RewardSet.from_config(OmegaConf.to_container(cfg.reward, resolve=True))

    cur: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    tokens = {"prompt": 0, "completion": 0}

    def reward_fn(prompts, completions, rid, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return list(reward_set(texts, [records[i] for i in rid]).total)

    reward_fn.__name__ = "accuracy_format"

    class Timed(GRPOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            cur["rollout"] += time.perf_counter() - t0
            tokens["prompt"] += sum(len(p) for p in out[0])
            tokens["completion"] += sum(len(c) for c in out[1])
            return out

        def _calculate_rewards(self, *a, **k):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*a, **k)
            cur["reward"] += time.perf_counter() - t0
            return out

        def _get_per_token_logps_and_entropies(self, model, *a, **k):
            t0 = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(model, *a, **k)
            if model is self.ref_model:
                cur["ref_logp"] += time.perf_counter() - t0
            elif not torch.is_grad_enabled():
                cur["old_logp"] += time.perf_counter() - t0
            return out

    steps: list[dict] = []
    last = [None]

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter(), time.process_time()
            steps.append(
                {
                    "wall": now[0] - last[0][0] if last[0] is not None else None,
                    "cpu": now[1] - last[0][1] if last[0] is not None else None,
                    **cur,
                    "completion_tokens": tokens["completion"],
                    "prompt_tokens": tokens["prompt"],
                }
            )
            last[0] = now
            cur.update(dict.fromkeys(PHASES, 0.0))
            tokens.update(prompt=0, completion=0)

    args = GRPOConfig(**trl_kwargs(w, output_dir))
    args.generation_kwargs = {"suppress_tokens": list(bundle.vision_token_ids)}  # as the framework samples
    torch.manual_seed(w.seed)
    trainer = Timed(
        model=str(path),
        reward_funcs=[reward_fn],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=bundle.processor,
        callbacks=[Marks()],
    )
    trainer.train()
    reward_set.close()
    return {"framework": "trl", "settings": settings_of_trl(args, w.model), "steps": steps}


# ----------------------------------------------------------------------------- summary
def summarise(runs: list[dict], w: Workload) -> dict:
    """Per framework: median over steps (after the warm-up) of each run, then the median over
    runs and the spread (min, max) of the run medians, for the wall time and each phase."""
    out = {}
    for fw in ("ours", "trl"):
        per_run = []
        for r in (x for x in runs if x["framework"] == fw):
            steps = [s for s in r["steps"][w.warmup :] if s["wall"] is not None]
            m = {
                "step": statistics.median(s["wall"] for s in steps),
                "step_cpu": statistics.median(s["cpu"] for s in steps),
            }
            for p in PHASES:
                m[p] = statistics.median(s[p] for s in steps)
            m["update+"] = statistics.median(s["wall"] - sum(s[p] for p in PHASES) for s in steps)
            per_run.append(m)
        if per_run:
            out[fw] = {
                k: (statistics.median(m[k] for m in per_run), min(m[k] for m in per_run), max(m[k] for m in per_run))
                for k in per_run[0]
            }
    return out


def same_work(runs: list[dict], w: Workload, completion_tol: float = 0.05) -> tuple[bool, list[str]]:
    """Whether both frameworks did the same work: the same settings, the same prompt tokens on
    every step, no completion over the budget, and mean completion tokens per step within
    ``completion_tol`` of each other (the completions are sampled: their lengths vary with
    the draws, not with the framework)."""
    notes = []
    ours = [r for r in runs if r["framework"] == "ours"]
    trl = [r for r in runs if r["framework"] == "trl"]
    ok = True
    if ours and trl:
        diff = settings_differ(ours[0]["settings"], trl[0]["settings"])
        if diff:
            ok = False
            notes += [f"settings differ: {d}" for d in diff]
        else:
            notes.append(f"settings: the same {len(SETTINGS)} settings ({', '.join(SETTINGS)})")
    budget = w.completions_per_step * w.max_new_tokens
    means = {}
    for fw, rs in (("ours", ours), ("trl", trl)):
        if not rs:
            continue
        steps = [s for r in rs for s in r["steps"]]
        comp = [s["completion_tokens"] for s in steps]
        means[fw] = statistics.mean(comp)
        if max(comp) > budget:
            ok = False
            notes.append(f"{fw}: {max(comp)} completion tokens in a step, over the budget {budget}")
        notes.append(
            f"{fw}: {len(rs)} runs x {len(rs[0]['steps'])} steps; prompt tokens per step "
            f"{sorted({s['prompt_tokens'] for s in steps})}; completion tokens per step {min(comp)}-{max(comp)} "
            f"(mean {means[fw]:.0f}, budget {budget})"
        )
    if ours and trl:
        po = {s["prompt_tokens"] for r in ours for s in r["steps"]}
        pt = {s["prompt_tokens"] for r in trl for s in r["steps"]}
        if po != pt:
            ok = False
            notes.append(f"prompt tokens per step differ: ours {sorted(po)}, TRL {sorted(pt)}")
        rel = abs(means["ours"] - means["trl"]) / max(means["trl"], 1e-9)
        if rel > completion_tol:
            ok = False
        notes.append(
            f"mean completion tokens per step differ by {rel:.1%} (allowed {completion_tol:.0%}): "
            + ("same" if rel <= completion_tol else "NOT the same")
        )
    return ok, notes


def report(runs: list[dict], w: Workload, threads: int = 1) -> str:
    s = summarise(runs, w)
    ok, notes = same_work(runs, w)
    n = {fw: sum(r["framework"] == fw for r in runs) for fw in ("ours", "trl")}
    lines = [
        f"workload: {w.prompts_per_step} prompts x G={w.group_size}, <= {w.max_new_tokens} new tokens, "
        f"{w.steps} steps (median of steps {w.warmup + 1}-{w.steps}), {n['ours']} + {n['trl']} runs interleaved, "
        f"{threads} torch thread(s) per run",
        "",
        "| phase | TRL s | ours s | TRL / ours | TRL spread | ours spread |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("step", "step_cpu", *PHASES, "update+"):
        if "trl" in s and "ours" in s:
            t, o = s["trl"][k], s["ours"][k]
            ratio = f"{t[0] / o[0]:.2f}x" if o[0] > 1e-6 else "-"
            lines.append(f"| {k} | {t[0]:.4f} | {o[0]:.4f} | {ratio} | {t[1]:.4f}-{t[2]:.4f} | {o[1]:.4f}-{o[2]:.4f} |")
        else:
            fw = next(iter(s))
            v = s[fw][k]
            lines.append(f"| {k} | ({fw}) {v[0]:.4f} | | | {v[1]:.4f}-{v[2]:.4f} | |")
    lines += ["", "same work: " + ("YES" if ok else "NO"), *[f"  {x}" for x in notes]]
    return "\n".join(lines)


def _worker(which: str, w: Workload, out: str, threads: int) -> None:
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        res = run_ours(w, d) if which == "ours" else run_trl(w, d)
    Path(out).write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4, help="runs of each framework (interleaved)")
    ap.add_argument("--steps", type=int, default=Workload.steps)
    ap.add_argument("--warmup", type=int, default=Workload.warmup)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1: least sensitive to a shared machine)"
    )
    ap.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only")
    ap.add_argument("--save", default=None, help="write every run's raw steps to this JSON file")
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also run the framework of another checkout (e.g. `git worktree add /tmp/before <commit>`), interleaved",
    )
    ap.add_argument("--worker", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    w = Workload(steps=a.steps, warmup=a.warmup)
    if a.worker:
        return _worker(a.worker, w, a.out, a.threads)
    sides = [a.only] if a.only else ["ours", "trl"]
    if "trl" in sides:
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("error: TRL is not installed: pip install -e '.[bench-trl]' (or --only ours)")
    checkouts = {"ours": ROOT} if "ours" in sides else {}
    checkouts.update({k: Path(v).resolve() for k, v in (x.split("=", 1) for x in a.also)})
    labels = [*checkouts, *(["trl"] if "trl" in sides else [])]
    runs = []
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(a.threads)}
    with tempfile.TemporaryDirectory() as d:
        for i in range(a.runs):
            order = labels if i % 2 == 0 else labels[::-1]  # alternate who goes first
            for label in order:
                fw = "trl" if label == "trl" else "ours"
                where = checkouts.get(label, ROOT)
                out = Path(d) / f"{label}-{i}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", fw, "--out", str(out)]
                cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
                run_env = {**env, "PYTHONPATH": str(where), "COMPARE_TRL_CHECKOUT": str(where)}
                t0 = time.perf_counter()
                p = subprocess.run(cmd, cwd=where, env=run_env, capture_output=True, text=True)
                if p.returncode != 0:
                    sys.exit(f"error: the {label} run failed:\n{p.stderr[-4000:]}")
                runs.append({**json.loads(out.read_text()), "label": label})
                med = statistics.median(s["wall"] for s in runs[-1]["steps"][a.warmup :] if s["wall"])
                print(f"run {i + 1}/{a.runs} {label}: {med:.3f} s/step ({time.perf_counter() - t0:.0f} s)", flush=True)
    if a.save:
        Path(a.save).write_text(json.dumps({"workload": dataclasses.asdict(w), "runs": runs}, indent=1))
    for label in checkouts:
        pair = [{**r, "framework": "ours"} for r in runs if r["label"] == label] + [
            r for r in runs if r["label"] == "trl"
        ]
        print(f"\n## {label} ({checkouts[label]}) vs TRL\n")
        print(report(pair, w, a.threads))


if __name__ == "__main__":
    main()
