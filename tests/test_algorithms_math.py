"""Golden-value tests of the pure math in algorithms/ (references written independently,
in plain Python / float64)."""

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.advantages import group_advantages, zero_std_groups  # noqa: E402
from algorithms.apo_components import dads_weights, stcr_weights  # noqa: E402
from algorithms.kl import kl_estimator  # noqa: E402
from algorithms.losses import aggregate, clipped_surrogate, make_normalizer  # noqa: E402
from algorithms.schedules import SCHEDULES, cosine, grpo_d, linear, make_schedule  # noqa: E402
from framework.types import LossNormalizer  # noqa: E402

# ------------------------------------------------------------------ advantages
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.5, 0.0, 1.0, 1.0, 0.2, 0.9, 0.4]
GROUPS = [7, 7, 7, 7, 3, 3, 3, 3, 5, 5, 5, 5, 9, 9, 9]  # non-contiguous ids, sizes 4 and 3


def ref_advantages(rewards, groups, scale, eps=1e-4):
    out = []
    batch_std = statistics.stdev(rewards)
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        mean = sum(members) / len(members)
        if scale == "group":
            out.append((r - mean) / (statistics.stdev(members) + eps))
        elif scale == "batch":
            out.append((r - mean) / (batch_std + eps))
        else:
            out.append(r - mean)
        if max(members) == min(members):
            out[-1] = 0.0
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_advantages_against_reference(scale, dtype):
    r = torch.tensor(REWARDS, dtype=dtype)
    g = torch.tensor(GROUPS)
    a = group_advantages(r, g, scale=scale)
    ref = torch.tensor(ref_advantages(REWARDS, GROUPS, scale), dtype=torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert a.dtype == dtype
    torch.testing.assert_close(a.double(), ref, atol=tol, rtol=tol)
    assert torch.all(a[4:8] == 0)


def test_zero_std_group_is_exactly_zero():
    r = torch.tensor([0.1] * 8 + [0.3] * 7 + [1.0], dtype=torch.float32)
    g = torch.tensor([0] * 8 + [1] * 8)
    for scale in ("group", "batch", "none"):
        a = group_advantages(r, g, scale=scale)
        assert torch.all(a[:8] == 0.0)
        assert torch.all(a[8:] != 0.0)
    assert zero_std_groups(r, g).tolist() == [True, False]
    # singleton group
    assert group_advantages(torch.tensor([2.0]), torch.tensor([0])).item() == 0.0


def test_group_advantage_scale_is_validated():
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), scale="std")


# ------------------------------------------------------------------ aggregation
L = torch.tensor(
    [
        [1.0, 2.0, 3.0, 100.0, 100.0],
        [4.0, 5.0, 100.0, 100.0, 100.0],
        [7.0, 8.0, 9.0, 10.0, 100.0],
        [100.0, 100.0, 100.0, 100.0, 100.0],
    ],
    dtype=torch.float64,
)
M = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.float64)
NORM = LossNormalizer(num_sequences=4, num_tokens=9, max_len=5)


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("seq_mean_token_mean", (6 / 3 + 9 / 2 + 34 / 4 + 0) / 4),  # 3.75
        ("token_mean", 49 / 9),
        ("seq_mean_token_sum_norm", 49 / (4 * 5)),
    ],
)
def test_aggregate_by_hand(mode, expected):
    per_token = L.clone().requires_grad_(True)
    out = aggregate(per_token, M, mode, NORM)
    assert out.item() == pytest.approx(expected, abs=1e-12)
    out.backward()
    assert torch.isfinite(per_token.grad).all()
    assert torch.all(per_token.grad[M == 0] == 0)


def test_make_normalizer():
    n = make_normalizer(M, max_len=7)
    assert (n.num_sequences, n.num_tokens, n.max_len) == (4.0, 9.0, 7.0)
    assert make_normalizer(M).max_len == 5.0


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(10, 7, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 5, 0, 6, 2, 7, 4, 3])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).double()
    norm = make_normalizer(mask, max_len=12)
    full = aggregate(per_token, mask, mode, norm)
    for split in ([3, 3, 4], [1] * 10, [10], [6, 4]):
        parts = torch.split(torch.arange(10), split)
        total = sum(aggregate(per_token[p], mask[p], mode, norm) for p in parts)
        assert total.item() == pytest.approx(full.item(), abs=1e-12)


def test_aggregate_bad_mode():
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(L, M, "sum", NORM)


# ------------------------------------------------------------------ KL estimators
@pytest.mark.parametrize(
    "logp,logp_ref,k1,k2,k3",
    [
        (-1.0, -1.5, 0.5, 0.125, math.exp(-0.5) + 0.5 - 1),
        (-2.0, -1.7, -0.3, 0.045, math.exp(0.3) - 0.3 - 1),
        (-0.7, -0.7, 0.0, 0.0, 0.0),
    ],
)
def test_kl_estimators(logp, logp_ref, k1, k2, k3):
    lp = torch.tensor([[logp]], dtype=torch.float64)
    lr = torch.tensor([[logp_ref]], dtype=torch.float64)
    for kind, want in (("k1", k1), ("k2", k2), ("k3", k3)):
        got = kl_estimator(lp, lr, kind)
        assert got.shape == (1, 1)
        assert got.item() == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="k3"):
        kl_estimator(lp, lr, "k4")


def test_k3_is_nonnegative():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)[None]
    assert (kl_estimator(torch.zeros_like(x), x, "k3") >= 0).all()


# ------------------------------------------------------------------ schedules
def test_grpo_d_known_values():
    T = 1000
    for prog, want in zip([0, 0.15, 0.30, 0.65, 1.0], [0.070, 0.055, 0.040, 0.070, 0.100]):
        got = grpo_d(prog * T, T, beta_min=0.04, beta_max=0.10, explore_frac=0.3)
        assert got == pytest.approx(want, abs=1e-12)
    sched = make_schedule({"name": "grpo_d", "beta_min": 0.04, "beta_max": 0.1, "explore_frac": 0.3})
    assert sched(150, 1000) == pytest.approx(0.055, abs=1e-12)
    assert sched.peak == 0.1


def test_grpo_d_continuous_at_turning_point():
    T, w = 1000.0, 300.0
    f = lambda s: grpo_d(s, T, beta_min=0.04, beta_max=0.10, explore_frac=0.3)  # noqa: E731
    for d in (1e-3, 1e-6, 1e-9):
        assert f(w - d) == pytest.approx(0.04, abs=1e-6 * d * 1e3 + 1e-12)
        assert f(w + d) == pytest.approx(0.04, abs=1e-6 * d * 1e3 + 1e-12)
    assert f(w) == pytest.approx(0.04, abs=1e-15)
    # the geometry default: beta_min 0 is hit, beta never negative
    vals = [grpo_d(s, 100, beta_min=0.0, beta_max=0.02) for s in range(101)]
    assert min(vals) == 0.0 and max(vals) == pytest.approx(0.02) and vals[0] == pytest.approx(0.01)


def test_linear_and_cosine_endpoints():
    for fn in (linear, cosine):
        assert fn(0, 50, start=0.1, end=0.02) == pytest.approx(0.1, abs=1e-15)
        assert fn(50, 50, start=0.1, end=0.02) == pytest.approx(0.02, abs=1e-15)
        assert fn(25, 50, start=0.1, end=0.02) == pytest.approx(0.06, abs=1e-15)  # both symmetric
        assert fn(80, 50, start=0.1, end=0.02) == pytest.approx(0.02, abs=1e-15)  # clamped
    assert cosine(12.5, 50, start=1.0, end=0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert make_schedule({"name": "constant"}, coef=0.04)(7, 10) == 0.04
    lin = make_schedule({"name": "linear", "start": None, "end": 0.0}, coef=0.04)
    assert lin(0, 10) == 0.04 and lin(10, 10) == 0.0 and lin.peak == 0.04
    assert set(SCHEDULES) >= {"constant", "linear", "cosine", "grpo_d"}
    with pytest.raises(ValueError, match="grpo_d"):
        make_schedule({"name": "exponential"})


# ------------------------------------------------------------------ DADS
DADS_EXPECTED = [0.2881, 0.4932, 0.6392, 0.7431, 0.8171, 0.8698, 0.9073]


def _dads_batch():
    correct, groups = [], []
    for k in range(0, 9):  # k correct out of 8, groups 0..8 (0 = all wrong, 8 = all right)
        correct += [1.0] * k + [0.0] * (8 - k)
        groups += [k] * 8
    c = torch.tensor(correct)
    g = torch.tensor(groups)
    return c, g, group_advantages(c, g)


def test_dads_release_values():
    c, g, a = _dads_batch()
    f = dads_weights(c, g, a, variant="release")
    for k in range(1, 8):
        block = f[8 * k : 8 * k + 8]
        assert [round(x, 4) for x in block[:k].tolist()] == [DADS_EXPECTED[k - 1]] * k
        assert torch.all(block[k:] == 1.0)  # negatives
    assert torch.all(f[:8] == 1.0) and torch.all(f[64:] == 1.0)  # all wrong / all correct
    # p in {0, 1} gives f = 1 even with a positive advantage (e.g. from a format reward)
    f2 = dads_weights(c, g, torch.ones_like(a))
    assert torch.all(f2[:8] == 1.0) and torch.all(f2[64:] == 1.0)


def test_dads_exp_variant():
    c, g, a = _dads_batch()
    f = dads_weights(c, g, a, variant="exp")
    for k in range(1, 8):
        want = math.exp(-math.e * (1 - k / 8))
        assert f[8 * k].item() == pytest.approx(want, abs=1e-6)
        assert f[8 * k + 7].item() == 1.0
    with pytest.raises(ValueError, match="release"):
        dads_weights(c, g, a, variant="linear")


# ------------------------------------------------------------------ STCR
def test_stcr_values():
    # group 0: correct lengths 100, 200 (L+ = 150); incorrect D = 100, 1000, 4096, -30
    # group 1: no correct answer
    lengths = torch.tensor([100.0, 200.0, 250.0, 1150.0, 4246.0, 120.0, 50.0, 5000.0])
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    adv = torch.tensor([1.2, 1.2, -0.8, -0.8, -0.8, -0.8, -0.5, -0.5])
    w = stcr_weights(lengths, correct, groups, adv, lam=1.00001)
    assert [round(x, 4) for x in w[2:5].tolist()] == [1.0010, 1.0100, 1.0401]
    assert w[2].item() == pytest.approx(2 - 1.00001**-100, abs=1e-7)
    assert w[0].item() == 1.0 and w[1].item() == 1.0  # correct samples
    assert w[5].item() == 1.0  # shorter than the correct mean
    assert torch.all(w[6:] == 1.0)  # group without a correct answer
    assert torch.all((w >= 1) & (w < 2))


def test_stcr_only_negative_advantage_switch():
    lengths = torch.tensor([100.0, 600.0, 600.0])
    correct = torch.tensor([1.0, 0.0, 0.0])
    groups = torch.zeros(3, dtype=torch.long)
    adv = torch.tensor([1.0, 0.3, -1.0])  # sample 1: incorrect but A > 0 (format reward)
    w_on = stcr_weights(lengths, correct, groups, adv, only_negative_advantage=True)
    w_off = stcr_weights(lengths, correct, groups, adv, only_negative_advantage=False)
    expected = 2 - 1.00001**-500
    assert w_on[1].item() == 1.0
    assert w_off[1].item() == pytest.approx(expected, abs=1e-7)
    assert w_on[2].item() == pytest.approx(expected, abs=1e-7) == w_off[2].item()


# ------------------------------------------------------------------ clipped surrogate
def _lengths_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()


def test_on_policy_gradient_is_advantage_over_length():
    lengths, T = [4, 2, 5, 1], 5
    mask = _lengths_mask(lengths, T)
    adv = torch.tensor([1.5, -0.7, 0.3, -2.0], dtype=torch.float64)
    logp = (-torch.rand(4, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    s, low, high = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.2)
    assert not low.any() and not high.any()
    torch.testing.assert_close(s, adv[:, None].expand(4, T), rtol=0, atol=0)
    B = 4
    aggregate(-s, mask, "seq_mean_token_mean", make_normalizer(mask)).backward()
    want = (-adv[:, None] / torch.tensor(lengths, dtype=torch.float64)[:, None] / B) * mask
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-15)


def test_clip_binds_outside_the_range():
    # rho = exp(delta); columns: rho >1.2 (A>0 clipped), rho <0.8 (A<0 clipped),
    # rho >1.2 with A<0 (not clipped), rho in range
    deltas = torch.tensor([[0.5, -0.5, 0.5, 0.05], [0.5, -0.5, 0.5, 0.05]], dtype=torch.float64)
    adv = torch.tensor([2.0, -3.0], dtype=torch.float64)
    logp_old = torch.full((2, 4), -1.0, dtype=torch.float64)
    logp = (logp_old + deltas).requires_grad_(True)
    s, low, high = clipped_surrogate(logp, logp_old, adv, 0.2, 0.28)
    s.sum().backward()
    rho = deltas.exp()
    # row 0, A > 0: clip binds where rho > 1.28
    assert high[0].tolist() == [True, False, True, False] and not low[0].any()
    assert s[0, 0].item() == pytest.approx(1.28 * 2.0)
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 2].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(2.0 * rho[0, 1].item())  # rho<0.8, A>0: free
    assert logp.grad[0, 3].item() == pytest.approx(2.0 * rho[0, 3].item())
    # row 1, A < 0: clip binds where rho < 0.8
    assert low[1].tolist() == [False, True, False, False] and not high[1].any()
    assert s[1, 1].item() == pytest.approx(0.8 * -3.0)
    assert logp.grad[1, 1].item() == 0.0
    assert logp.grad[1, 0].item() == pytest.approx(-3.0 * rho[1, 0].item())
