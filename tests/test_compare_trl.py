"""benchmarks/compare_trl.py without TRL installed: both trainers are configured with the same
settings (read back from the composed framework config and from the GRPOConfig arguments),
a changed setting is caught, the same-work check compares prompt and completion tokens, and
the framework half runs and reports per-step timings and tokens."""

import dataclasses
import types

import pytest

from benchmarks import compare_trl as ct

SMALL = ct.Workload(prompts=8, prompts_per_step=2, group_size=2, max_new_tokens=6, steps=3, warmup=1)


def _trl_args(w, **change):
    """What GRPOConfig(**trl_kwargs) holds for the attributes read (GRPOConfig's own default of
    steps_per_generation, None, is resolved to 1 by TRL for one generation per step)."""
    kw = {**ct.trl_kwargs(w, "/tmp/x"), "steps_per_generation": None, **change}
    return types.SimpleNamespace(**kw)


def test_both_trainers_get_the_workloads_settings(tmp_path):
    w = ct.Workload()
    ours = ct.settings_of_ours(ct.compose_ours(w, str(tmp_path)))
    trl = ct.settings_of_trl(_trl_args(w), w.model)
    assert ct.settings_differ(ours, trl) == []
    assert ours["completions_per_step"] == 32 and ours["beta"] == 0.04 and ours["kl_estimator"] == "k3"
    assert ours["loss_agg"] == "seq_mean_token_mean" and ours["lr"] == 1e-5 and ours["grad_clip"] == 1.0


@pytest.mark.parametrize(
    "change, key",
    [
        ({"beta": 0.0}, "beta"),
        ({"loss_type": "dapo"}, "loss_agg"),
        ({"gradient_accumulation_steps": 2}, "completions_per_step"),
        ({"lr_scheduler_type": "linear"}, "lr_schedule"),
        ({"max_grad_norm": 0.5}, "grad_clip"),
    ],
)
def test_a_different_setting_is_named(tmp_path, change, key):
    w = ct.Workload()
    ours = ct.settings_of_ours(ct.compose_ours(w, str(tmp_path)))
    diff = ct.settings_differ(ours, ct.settings_of_trl(_trl_args(w, **change), w.model))
    assert len(diff) == 1 and diff[0].startswith(f"{key}:"), diff


def _run(fw, prompt_tokens, completion_tokens, wall=1.0):
    steps = [
        {
            "wall": None if i == 0 else wall,
            "cpu": None if i == 0 else wall,
            "rollout": 0.5,
            "reward": 0.01,
            "ref_logp": 0.1,
            "old_logp": 0.0,
        }
        for i in range(SMALL.steps)
    ]
    for s in steps:
        s.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    return {"framework": fw, "settings": {"lr": 1.0}, "steps": steps}


def test_same_work_compares_tokens_and_summary_takes_medians():
    budget = SMALL.completions_per_step * SMALL.max_new_tokens  # 24
    runs = [_run("ours", 100, budget, wall=1.0), _run("trl", 100, budget, wall=2.0), _run("ours", 100, 23, 3.0)]
    ok, notes = ct.same_work(runs, SMALL)
    assert ok, notes
    s = ct.summarise(runs, SMALL)
    assert s["trl"]["step"] == (2.0, 2.0, 2.0)
    assert s["ours"]["step"] == (2.0, 1.0, 3.0)  # median of the two run medians, their spread
    assert s["ours"]["update+"][0] == pytest.approx(2.0 - 0.61)
    assert not ct.same_work([_run("ours", 100, budget), _run("trl", 101, budget)], SMALL)[0]  # other prompts
    assert not ct.same_work([_run("ours", 100, budget), _run("trl", 100, 20)], SMALL)[0]  # shorter completions
    assert not ct.same_work([_run("ours", 100, budget + 1), _run("trl", 100, budget)], SMALL)[0]  # over the budget
    bad = _run("trl", 100, budget)
    bad["settings"] = {"lr": 2.0}
    ok, notes = ct.same_work([_run("ours", 100, budget), bad], SMALL)
    assert not ok and any("lr" in n for n in notes)
    assert "same work: YES" in ct.report(runs, SMALL)


def test_the_framework_half_runs_and_reports_each_step(tmp_path):
    from framework.module import RLModule

    before = RLModule.on_train_batch_end, RLModule.evaluate
    res = ct.run_ours(SMALL, str(tmp_path))
    assert (RLModule.on_train_batch_end, RLModule.evaluate) == before  # the patches are undone
    steps = res["steps"]
    assert len(steps) == SMALL.steps and steps[0]["wall"] is None
    for s in steps[1:]:
        assert s["cpu"] > 0
        assert s["wall"] >= s["rollout"] + s["reward"] + s["ref_logp"] + s["update"] > 0
        assert 0 < s["completion_tokens"] <= SMALL.completions_per_step * SMALL.max_new_tokens
        assert s["prompt_tokens"] > 0
    assert res["settings"]["completions_per_step"] == 4
    assert dataclasses.asdict(SMALL)["steps"] == 3
