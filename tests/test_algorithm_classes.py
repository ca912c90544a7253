"""Tests of the trainer-facing Algorithm classes, their configs and the plugin path."""

import dataclasses
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algorithms import build_algorithm  # noqa: E402
from algorithms.losses import make_normalizer  # noqa: E402
from framework.registry import ALGORITHMS, UnknownNameError, import_plugins  # noqa: E402
from framework.types import LossNormalizer, Rollout, TrainBatch  # noqa: E402

YAMLS = sorted((ROOT / "configs" / "algorithm").glob("*.yaml"))


def make_rollout(rewards, correct, groups, lengths, T=None, dtype=torch.float32):
    lengths = torch.tensor(lengths)
    T = T or int(lengths.max())
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    n = len(rewards)
    return Rollout(
        completion_ids=torch.zeros(n, T, dtype=torch.long),
        completion_mask=mask,
        group_ids=torch.tensor(groups),
        rewards=torch.tensor(rewards, dtype=dtype),
        correct=torch.tensor(correct, dtype=dtype),
        truncated=torch.zeros(n, dtype=torch.bool),
    )


# ------------------------------------------------------------------ configs
def test_all_yamls_exist():
    names = {p.stem for p in YAMLS}
    assert names >= {"grpo", "dr_grpo", "dapo", "grpo_d", "grpo_d_counting", "apo"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_build_from_yaml(path):
    cfg = OmegaConf.load(path)
    algo = build_algorithm(cfg, total_steps=100)
    # a yaml without a name keeps the one it builds on: algorithm/base's (grpo) or grpo_d.yaml's
    unnamed = {
        "grpo": "grpo",
        "dapo": "grpo",
        "dr_grpo": "grpo",
        "grpo_d_counting": "grpo_d",
        "reinforce_pp_baseline": "reinforce_pp",
    }
    assert isinstance(algo, ALGORITHMS.get(unnamed[path.stem] if "name" not in cfg else cfg.name))
    # every key in the yaml is a Config field (a typo would have raised) and round-trips
    assert OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(algo.cfg), cfg)) == OmegaConf.to_container(
        OmegaConf.structured(algo.cfg)
    )


def test_yaml_recipes():
    load = lambda n: build_algorithm(OmegaConf.load(ROOT / f"configs/algorithm/{n}.yaml"), 1000)  # noqa: E731
    grpo = load("grpo")
    assert (grpo.beta(0), grpo.cfg.kl.estimator, grpo.cfg.clip_low, grpo.cfg.loss_agg) == (
        0.04,
        "k3",
        0.2,
        "seq_mean_token_mean",
    )
    dr = load("dr_grpo")
    assert (dr.cfg.advantage.scale, dr.cfg.loss_agg, dr.needs_reference) == ("none", "seq_mean_token_sum_norm", False)
    dapo = load("dapo")
    assert (dapo.cfg.clip_high, dapo.cfg.loss_agg, dapo.cfg.filter_groups.enabled, dapo.needs_reference) == (
        0.28,
        "token_mean",
        True,
        False,
    )
    gd = load("grpo_d")
    assert gd.needs_reference and gd.beta(0) == pytest.approx(0.01) and gd.beta(300) == 0.0
    gdc = load("grpo_d_counting")
    assert [round(gdc.beta(s), 6) for s in (0, 150, 300, 650, 1000)] == [0.07, 0.055, 0.04, 0.07, 0.1]
    apo = load("apo")
    assert apo.beta(0) == 1e-3 and apo.cfg.dads.enabled and apo.cfg.stcr.enabled


def test_defaults_without_yaml():
    assert build_algorithm({"name": "grpo_d"}, 10).cfg.kl.schedule.beta_max == 0.02
    apo = build_algorithm({"name": "apo"}, 10)
    assert apo.cfg.kl.coef == 1e-3 and apo.cfg.stcr.lam == 1.00001


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"name": "grpo", "lr": 1e-6}, "algorithm.lr"),
        ({"name": "grpo", "kl": {"beta": 0.1}}, "algorithm.kl.beta"),
        ({"name": "grpo", "dads": {"enabled": True}}, "algorithm.dads"),
    ],
)
def test_unknown_key(cfg, key):
    with pytest.raises(ValueError, match="unknown key") as e:
        build_algorithm(cfg, 10)
    assert key in str(e.value) and "allowed keys" in str(e.value)


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"name": "grpo", "loss_agg": "mean"}, "loss_agg"),
        ({"name": "grpo", "advantage": {"scale": "std"}}, "advantage.scale"),
        ({"name": "grpo", "kl": {"estimator": "k4"}}, "kl.estimator"),
        ({"name": "grpo", "kl": {"schedule": {"name": "exp"}}}, "kl.schedule.name"),
        ({"name": "grpo", "kl": {"coef": -0.1}}, "kl.coef"),
        ({"name": "grpo", "ppo_epochs": 0}, "ppo_epochs"),
        ({"name": "grpo", "clip_low": "big"}, "clip_low"),
        ({"name": "apo", "dads": {"variant": "linear"}}, "dads.variant"),
        ({"name": "apo", "stcr": {"length_unit": "words"}}, "stcr.length_unit"),
    ],
)
def test_bad_value(cfg, key):
    with pytest.raises(ValueError) as e:
        build_algorithm(cfg, 10)
    assert f"algorithm.{key}" in str(e.value)


def test_unknown_algorithm():
    with pytest.raises(UnknownNameError) as e:
        build_algorithm({"name": "ppo2"}, 10)
    for n in ("grpo", "grpo_d", "apo"):
        assert n in str(e.value)


def test_needs_reference_and_old_logprobs():
    assert not build_algorithm({"name": "grpo", "kl": {"coef": 0.0}}, 10).needs_reference
    assert build_algorithm({"name": "grpo"}, 10).needs_reference
    assert build_algorithm({"name": "grpo_d", "kl": {"schedule": {"beta_min": 0.0}}}, 10).needs_reference
    assert not build_algorithm({"name": "grpo_d", "kl": {"schedule": {"beta_max": 0.0}}}, 10).needs_reference
    assert build_algorithm(
        {"name": "grpo", "kl": {"coef": 0.0, "schedule": {"name": "linear", "end": 0.01}}}, 10
    ).needs_reference
    a = build_algorithm({"name": "grpo"}, 10)
    assert (a.ppo_epochs, a.needs_old_logprobs) == (1, False)
    a = build_algorithm({"name": "grpo", "ppo_epochs": 2}, 10)
    assert (a.ppo_epochs, a.needs_old_logprobs) == (2, True)


# ------------------------------------------------------------------ prepare
def test_grpo_prepare():
    rewards = [1.0, 0.0, 0.5, 1.0, 0.3, 0.3, 0.3, 0.3]
    ro = make_rollout(rewards, [1, 0, 0, 1, 0, 0, 0, 0], [0] * 4 + [1] * 4, [3] * 8)
    algo = build_algorithm({"name": "grpo"}, 100)
    before = ro.rewards.clone()
    p = algo.prepare(ro, step=5)
    m = p.metrics
    g = rewards[:4]
    want = [(r - sum(g) / 4) / (statistics.stdev(g) + 1e-4) for r in g] + [0.0] * 4
    torch.testing.assert_close(p.advantages.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.all(p.kl_coef == 0.04)
    assert torch.equal(p.loss_mask, ro.completion_mask) and torch.equal(ro.rewards, before)  # nothing rewritten
    assert m["frac_reward_zero_std"] == 0.5 and m["beta"] == 0.04
    assert {"advantages/mean", "advantages/std", "beta/effective"} <= set(m)


def test_apo_prepare():
    # group 0: correct lengths 10, 20 (L+ = 15); wrong 300 (D = 285), wrong 5 (shorter)
    # group 1: all wrong -> A = 0, w = 1, beta_i = beta
    correct = [1, 1, 0, 0, 0, 0, 0, 0]
    rewards = [c + 0.5 for c in correct]  # accuracy + 0.5 * format (format all 1)
    ro = make_rollout(rewards, correct, [0] * 4 + [1] * 4, [10, 20, 300, 5, 8, 8, 8, 8], dtype=torch.float64)
    algo = build_algorithm({"name": "apo"}, 100)
    p = algo.prepare(ro, step=0)
    m = p.metrics
    a = 0.5 / (statistics.stdev([1.5, 1.5, 0.5, 0.5]) + 1e-4)  # |A| in group 0
    w = 2 - 1.00001**-285
    want_adv = [a, a, -a * w, -a, 0, 0, 0, 0]
    torch.testing.assert_close(p.advantages, torch.tensor(want_adv, dtype=torch.float64), atol=1e-12, rtol=0)
    f = 1 - math.exp(-math.e * 0.5)
    want_kl = [1e-3 * f, 1e-3 * f] + [1e-3] * 6
    torch.testing.assert_close(p.kl_coef, torch.tensor(want_kl, dtype=torch.float64), atol=1e-15, rtol=0)
    assert m["stcr/frac_penalised"] == pytest.approx(1 / 8)
    assert m["stcr/mean_weight"] == pytest.approx((7 + w) / 8)
    assert m["dads/frac_positive"] == pytest.approx(2 / 8)
    assert m["dads/mean_weight"] == pytest.approx(f)
    assert m["beta/effective"] == pytest.approx(sum(want_kl) / 8)

    off = build_algorithm({"name": "apo", "dads": {"enabled": False}, "stcr": {"enabled": False}}, 100)
    ro2 = make_rollout(rewards, correct, [0] * 4 + [1] * 4, [10, 20, 300, 5, 8, 8, 8, 8], dtype=torch.float64)
    p2 = off.prepare(ro2, 0)
    grpo = build_algorithm({"name": "grpo", "kl": {"coef": 1e-3}}, 100)
    ro3 = make_rollout(rewards, correct, [0] * 4 + [1] * 4, [10, 20, 300, 5, 8, 8, 8, 8], dtype=torch.float64)
    p3 = grpo.prepare(ro3, 0)
    assert torch.equal(p2.advantages, p3.advantages) and torch.equal(p2.kl_coef, p3.kl_coef)


def test_grpo_d_prepare_uses_schedule():
    algo = build_algorithm({"name": "grpo_d", "kl": {"schedule": {"beta_min": 0.04, "beta_max": 0.1}}}, 200)
    ro = make_rollout([1.0, 0.0], [1, 0], [0, 0], [2, 2])
    p = algo.prepare(ro, step=30)
    assert p.metrics["beta"] == pytest.approx(0.055)
    assert torch.allclose(p.kl_coef, torch.full((2,), 0.055))


def test_keep_groups():
    ro = make_rollout([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], [1, 0, 1, 1, 0, 0], [4, 4, 2, 2, 9, 9], [2] * 6)
    dapo = build_algorithm(OmegaConf.load(ROOT / "configs/algorithm/dapo.yaml"), 10)
    assert dapo.keep_groups(ro).tolist() == [False, True, False]  # sorted ids 2, 4, 9
    assert build_algorithm({"name": "grpo"}, 10).keep_groups(ro).tolist() == [True] * 3


# ------------------------------------------------------------------ loss: gradient check
def reference_loss(logp, logp_old, logp_ref, mask, adv, kl_coef, cfg, B, n_tok, L_max):
    """Plain loops over samples and tokens."""
    agg = {"seq_mean_token_mean": None, "token_mean": None, "seq_mean_token_sum_norm": None}
    lo, hi = 1 - cfg["clip_low"], 1 + cfg["clip_high"]

    def reduce(vals, mode):  # vals[i] = list of per-token terms on the mask
        if mode == "seq_mean_token_mean":
            return sum(sum(v) / len(v) for v in vals if v) / B
        if mode == "token_mean":
            return sum(sum(v) for v in vals if v) / n_tok
        return sum(sum(v) for v in vals if v) / (B * L_max)

    assert set(agg) >= {cfg["loss_agg"], cfg["kl_agg"]}
    pol, kl = [], []
    for i in range(logp.shape[0]):
        pi, ki = [], []
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                continue
            rho = torch.exp(logp[i, t] - logp_old[i, t])
            a = float(adv[i])
            clipped = min(max(rho, torch.tensor(lo, dtype=rho.dtype)), torch.tensor(hi, dtype=rho.dtype))
            pi.append(-torch.minimum(rho * a, clipped * a))
            x = logp_ref[i, t] - logp[i, t]
            k = {"k1": -x, "k2": x * x / 2, "k3": torch.exp(x) - x - 1}[cfg["estimator"]]
            ki.append(float(kl_coef[i]) * k)
        pol.append(pi)
        kl.append(ki)
    return reduce(pol, cfg["loss_agg"]) + reduce(kl, cfg["kl_agg"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "grpo"},
        {"name": "grpo", "ppo_epochs": 2, "kl": {"estimator": "k1"}},
        {"name": "grpo", "loss_agg": "token_mean", "clip_high": 0.28, "kl": {"estimator": "k2"}},
        {"name": "grpo", "loss_agg": "seq_mean_token_sum_norm", "advantage": {"scale": "none"}},
        {"name": "apo", "loss_agg": "token_mean", "kl_agg": "seq_mean_token_mean", "ppo_epochs": 2},
    ],
)
def test_loss_gradient_against_reference(overrides):
    g = torch.Generator().manual_seed(3)
    N, T, L_max = 8, 6, 9
    lengths = [6, 3, 1, 0, 5, 6, 2, 4]
    correct = [1, 0, 0, 1, 1, 1, 0, 0]
    rewards = [c + 0.5 * (i % 3 != 0) for i, c in enumerate(correct)]
    ro = make_rollout(rewards, correct, [0] * 4 + [1] * 4, lengths, T=T, dtype=torch.float64)
    algo = build_algorithm(overrides, 50)
    prepared = algo.prepare(ro, step=10)
    logp_now = -torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    logp_old = logp_now + 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64) if algo.needs_old_logprobs else None
    logp_ref = logp_now + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    batch = TrainBatch.assemble(ro, prepared, logp_ref=logp_ref, logp_old=logp_old, off_policy=algo.needs_old_logprobs)
    norm = LossNormalizer(num_sequences=N, num_tokens=float(sum(lengths)), max_len=L_max)

    logp = logp_now.clone().requires_grad_(True)
    loss, metrics = algo.loss(logp, batch, norm)
    loss.backward()

    logp_r = logp_now.clone().requires_grad_(True)
    cfg = {
        "clip_low": algo.cfg.clip_low,
        "clip_high": algo.cfg.clip_high,
        "loss_agg": algo.cfg.loss_agg,
        "kl_agg": algo.cfg.kl_agg or algo.cfg.loss_agg,
        "estimator": algo.cfg.kl.estimator,
    }
    old = logp_old if logp_old is not None else logp_now
    ref = reference_loss(
        logp_r, old, logp_ref, ro.completion_mask, prepared.advantages, prepared.kl_coef, cfg, N, sum(lengths), L_max
    )
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-10
    assert (logp.grad - logp_r.grad).abs().max().item() < 1e-10
    assert torch.all(logp.grad[ro.completion_mask == 0] == 0)
    assert metrics["policy_loss"].item() + metrics["kl_loss"].item() == pytest.approx(loss.item())
    if algo.needs_old_logprobs:
        assert metrics["clip_ratio"].item() > 0
    else:
        assert metrics["clip_ratio"].item() == 0

    # micro-batches: losses, gradients and metrics sum to the full mini-batch
    logp_mb = logp_now.clone().requires_grad_(True)
    total = dict.fromkeys(metrics, 0.0)
    for idx in (torch.tensor([0, 1, 2]), torch.tensor([3]), torch.tensor([4, 5, 6, 7])):
        mb = batch.select(idx)
        l_mb, m_mb = algo.loss(logp_mb[idx], mb, norm)
        l_mb.backward()
        for k, v in m_mb.items():
            total[k] += v.item()
    assert (logp_mb.grad - logp.grad).abs().max().item() < 1e-12
    for k, v in metrics.items():
        assert total[k] == pytest.approx(v.item(), abs=1e-12), k


def test_loss_on_policy_metrics_and_static_terms():
    ro = make_rollout([1.0, 0.0], [1, 0], [0, 0], [3, 2], dtype=torch.float64)
    algo = build_algorithm({"name": "grpo"}, 10)
    logp = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    ref = torch.full((2, 3), -1.5, dtype=torch.float64)
    batch = TrainBatch.assemble(ro, algo.prepare(ro, 0), logp_ref=ref)
    assert not batch.off_policy and torch.all(batch.tis_weights == 1) and torch.all(batch.logp_old == 0)
    loss, m = algo.loss(logp, batch, make_normalizer(ro.completion_mask))
    assert m["kl"].item() == pytest.approx(math.exp(-0.5) - 0.5)  # k3 at x = -0.5
    assert m["clip_ratio/low"].item() == 0 == m["clip_ratio/high"].item()
    # no KL term (beta = 0 at every step): the term is off statically, logp_ref is zeros
    no_kl = build_algorithm({"name": "grpo", "kl": {"coef": 0.0}}, 10)
    assert not no_kl.needs_reference
    batch = TrainBatch.assemble(ro, no_kl.prepare(ro, 0))
    assert torch.all(batch.logp_ref == 0)
    loss, m = no_kl.loss(logp, batch, make_normalizer(ro.completion_mask))
    assert m["kl"].item() == 0 == m["kl_loss"].item() and torch.isfinite(loss)
    with pytest.raises(ValueError, match="logp_old"):
        TrainBatch.assemble(ro, no_kl.prepare(ro, 0), off_policy=True)


def test_loss_mask_moves_into_the_algorithm():
    """mask_truncated_completions: the loss mask zeroes truncated completions; STCR (in prepare)
    still saw their lengths; the rollout's own completion mask is left as it was."""
    ro = make_rollout([1.0, 0.0, 0.0, 1.0], [1, 0, 0, 1], [0] * 4, [2, 3, 3, 1], T=3, dtype=torch.float64)
    ro = dataclasses.replace(ro, truncated=torch.tensor([False, True, False, False]))
    mask_before = ro.completion_mask.clone()
    p = build_algorithm({"name": "grpo", "mask_truncated_completions": True}, 10).prepare(ro, 0)
    want = mask_before.clone()
    want[1] = 0.0
    assert torch.equal(p.loss_mask, want) and torch.equal(ro.completion_mask, mask_before)
    keep = build_algorithm({"name": "grpo"}, 10).prepare(ro, 0)
    assert torch.equal(keep.loss_mask, mask_before)


def test_algorithm_built_once_counts_optimizer_steps():
    """rl_steps x ppo_epochs x num_mini_batches: the schedule clock's end, from one build."""
    a = build_algorithm({"name": "grpo", "ppo_epochs": 3}, rl_steps=10, num_mini_batches=2)
    assert a.total_steps == 60
    assert build_algorithm({"name": "grpo"}, rl_steps=7).total_steps == 7
    with pytest.raises(TypeError):
        build_algorithm({"name": "grpo"}, 5, rl_steps=5)


# ------------------------------------------------------------------ plugin
def test_plugin_registers_and_changes_advantages():
    sys.path.insert(0, str(ROOT / "examples" / "my_algo"))
    try:
        import_plugins(["my_algo"])
    finally:
        sys.path.remove(str(ROOT / "examples" / "my_algo"))
    assert "grpo_len" in ALGORITHMS.names()
    algo = build_algorithm({"name": "grpo_len", "length_penalty": 0.01}, 10)
    # equal accuracy, different lengths: GRPO gives A = 0, the plugin prefers the short one
    ro = make_rollout([1.0, 1.0], [1, 1], [0, 0], [10, 50])
    p = algo.prepare(ro, 0)
    assert p.advantages[0] > 0 > p.advantages[1]
    assert torch.allclose(p.rewards, torch.tensor([0.9, 0.5]))
    assert torch.equal(ro.rewards, torch.tensor([1.0, 1.0]))  # the rollout's own rewards are kept
    ro = make_rollout([1.0, 1.0], [1, 1], [0, 0], [10, 50])
    assert torch.all(build_algorithm({"name": "grpo"}, 10).prepare(ro, 0).advantages == 0)
    with pytest.raises(ValueError, match="algorithm.length_penalty"):
        build_algorithm({"name": "grpo_len", "length_penalty": -1.0}, 10)
