"""The update phase on its own (framework/update.py) with the tiny real Qwen2.5-VL: the
gradient strategy on one process, padding passes, and several optimizer steps per rollout
(``num_mini_batches=2``, ``ppo_epochs=2``): every step after the first is clipped against the
rollout policy's log-probs, checked against a float64 hand computation of the PPO loss."""

import copy
import dataclasses

import pytest
import torch
from conftest import make_image

import framework.distributed as dist_mod
from algorithms.base import build_algorithm
from framework.distributed import FSDPGradientSync, GradientSync
from framework.errors import ConfigError
from framework.logprobs import RolloutLogProbs
from framework.models.loading import load_model
from framework.rollout.base import SamplingParams
from framework.rollout.collector import RolloutCollector
from framework.rollout.hf import HFGenerateEngine
from framework.rollout.inputs import encode_prompts
from framework.types import LossNormalizer, TrainBatch
from framework.update import PolicyUpdate
from rewards import RewardSet

G = 4


def _records(n):
    return [
        {
            "id": f"r{i}",
            "question": "How many shapes?" + " Think." * i,
            "images": [make_image(56 + 28 * (i % 2), i)],
            "answer": str(i),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny(tiny_vl_path, vl_bundle):
    torch.manual_seed(0)
    return load_model(tiny_vl_path, "float32"), vl_bundle


def _rollout(model, bundle, n_prompts=4, seed=0):
    torch.manual_seed(seed)
    engine = HFGenerateEngine(None, bundle, model)
    rewards = RewardSet({"format": {"weight": 1.0}}, correctness="format")
    collector = RolloutCollector(
        engine,
        lambda recs: encode_prompts(bundle, recs, None),
        rewards,
        bundle.tokenizer,
        SamplingParams(max_new_tokens=10),
        group_size=G,
    )
    ro, _ = collector(_records(n_prompts), rl_step=0)
    rewards.close()
    # hand-made rewards with a spread in every group, so that the advantages are not zero
    return dataclasses.replace(ro, rewards=torch.randn(len(ro), generator=torch.Generator().manual_seed(seed)))


def _hand_logp(model, mb) -> torch.Tensor:
    """Per-token log-probs from the model's plain forward (full logits, float64 softmax):
    independent of the chunked path under test."""
    from framework.rollout.inputs import training_inputs

    kw = training_inputs(mb.prompt_inputs, mb.completion_ids, mb.completion_mask, model)
    with torch.no_grad():
        logits = model(**kw).logits.double()
    T = mb.completion_ids.shape[1]
    lp = torch.log_softmax(logits[:, -T - 1 : -1], -1).gather(-1, mb.completion_ids.unsqueeze(-1)).squeeze(-1)
    return lp * mb.completion_mask.double()


def _hand_ppo_loss(logp, logp_old, adv, mask, clip=0.2) -> float:
    """seq_mean_token_mean of -min(rho A, clip(rho) A), in float64."""
    total = 0.0
    for i in range(logp.shape[0]):
        m = mask[i].bool()
        rho = torch.exp(logp[i][m] - logp_old[i][m])
        s = torch.minimum(rho * adv[i], rho.clamp(1 - clip, 1 + clip) * adv[i])
        total += float(-s.mean())
    return total / logp.shape[0]


# ----------------------------------------------------------------------------- GradientSync
def test_gradient_sync_on_one_process_is_the_identity():
    sync = GradientSync()
    norm = LossNormalizer(num_sequences=8.0, num_tokens=37.0, max_len=24.0)
    assert sync.normalizer(norm) == norm
    assert sync.grad_scale == 1.0 and not sync.collective
    assert sync.micro_batches(10, 4) == [([0, 1, 2, 3], True), ([4, 5, 6, 7], True), ([8, 9], True)]
    assert sync.any_rank(True) and not sync.any_rank(False)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    sync.reduce([p])
    assert p.grad.tolist() == [1.0, 2.0, 3.0]


def test_fsdp_sync_pads_to_the_rank_with_most_micro_batches(monkeypatch):
    # another rank has 5 micro-batches: this rank (3 of its own) joins with 2 padding passes
    monkeypatch.setattr(dist_mod, "all_reduce", lambda values, op="sum": [5.0] if op == "max" else values)
    sync = FSDPGradientSync(world_size=2)
    assert sync.grad_scale == 2.0 and sync.collective
    mbs = sync.micro_batches(10, 4)
    assert [real for _, real in mbs] == [True, True, True, False, False]
    assert mbs[3][0] == mbs[4][0] == [0, 1, 2, 3]


class _PaddedSync(GradientSync):
    """One process with two padding passes per mini-batch, as a short FSDP rank has."""

    def micro_batches(self, n, size):
        mbs = super().micro_batches(n, size)
        return mbs + [(mbs[0][0], False)] * 2


def test_padding_passes_add_nothing_to_the_gradient(tiny):
    model, bundle = tiny
    ro = _rollout(model, bundle)
    algo = build_algorithm({"name": "grpo", "kl": {"coef": 0.0}}, total_steps=1)
    batch = TrainBatch.assemble(ro, algo.prepare(ro, step=0))
    grads = []
    for sync in (GradientSync(), _PaddedSync()):
        m = copy.deepcopy(model)
        up = PolicyUpdate(
            m,
            algo,
            RolloutLogProbs(1.0, 64, "cpu"),
            sync,
            micro_batch_size=6,
            num_mini_batches=1,
            max_len=10,
            grad_clip=None,
        )
        sub = batch.select(list(range(len(batch))))
        stats = up._mini_batch(sub, torch.optim.SGD(m.parameters(), lr=0.0), rl_step=0, optimizer_step=0)
        grads.append((stats, torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])))
    (s0, g0), (s1, g1) = grads
    assert s0 == pytest.approx(s1)
    torch.testing.assert_close(g0, g1, rtol=0, atol=0)


# ----------------------------------------------------------------------------- several steps per rollout
@pytest.mark.parametrize("epochs,minis", [(1, 2), (2, 1)], ids=["num_mini_batches=2", "ppo_epochs=2"])
def test_later_optimizer_steps_are_clipped_against_the_rollout_policy(tiny, epochs, minis):
    model, bundle = tiny
    policy = copy.deepcopy(model)
    ro = _rollout(policy, bundle)
    algo = build_algorithm({"name": "grpo", "kl": {"coef": 0.0}, "ppo_epochs": epochs}, total_steps=2)
    prepared = algo.prepare(ro, step=0)
    lp = RolloutLogProbs(1.0, 64, "cpu")
    sync = GradientSync()
    # what the module does before the first update when one rollout feeds several steps
    logp_old = lp.no_grad(policy, ro, sync.micro_batches(len(ro), 64))
    torch.testing.assert_close(logp_old.double(), _hand_logp(policy, ro), atol=1e-5, rtol=0)
    batch = TrainBatch.assemble(ro, prepared, logp_old=logp_old, off_policy=True)

    up = PolicyUpdate(policy, algo, lp, sync, micro_batch_size=64, num_mini_batches=minis, max_len=10, grad_clip=None)
    seen = []  # (rows of the mini-batch, the loss the algorithm computed, its clip ratio, policy then)
    mini_batches = up.mini_batches
    batches = []

    def record_batches(rollout, epoch):
        out = mini_batches(rollout, epoch)
        batches.extend(out)
        return out

    loss_fn = algo.loss

    def record_loss(logp, mb, norm):
        loss, terms = loss_fn(logp, mb, norm)
        seen.append((float(loss.detach()), float(terms["clip_ratio"]), copy.deepcopy(policy.state_dict())))
        return loss, terms

    up.mini_batches = record_batches
    algo.loss = record_loss
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)  # a large step: the second ratio must leave [0.8, 1.2]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    res = up(batch, opt, sched, rl_step=0, optimizer_step=0)
    del algo.loss
    assert res.optimizer_steps == 2 and res.skipped == 0 and len(seen) == 2 and len(batches) == 2

    # the second step: its loss is the PPO loss of the moved policy against the rollout policy
    rows = batches[1]
    mb = batch.select(rows)
    moved = copy.deepcopy(model)
    moved.load_state_dict(seen[1][2])
    want = _hand_ppo_loss(_hand_logp(moved, mb), logp_old[rows].double(), mb.advantages.double(), mb.completion_mask)
    assert seen[1][0] == pytest.approx(want, abs=1e-5)
    assert seen[0][1] == 0.0  # the first step is on-policy: ratio 1, nothing clipped
    assert seen[1][1] > 0.0  # the clip binds once the policy has moved


def test_mini_batches_are_exact_or_refused(tiny):
    model, bundle = tiny
    ro = _rollout(model, bundle, n_prompts=6)
    algo = build_algorithm({"name": "grpo", "kl": {"coef": 0.0}}, total_steps=1)
    up = PolicyUpdate(
        model,
        algo,
        RolloutLogProbs(1.0, 64, "cpu"),
        GradientSync(),
        micro_batch_size=8,
        num_mini_batches=3,
        max_len=10,
        grad_clip=1.0,
    )
    batches = up.mini_batches(ro, 0)
    assert len(batches) == 3 and all(len(b) == 2 * G for b in batches)
    assert sorted(r for b in batches for r in b) == list(range(len(ro)))  # every row once, groups whole
    assert all(len({int(ro.group_ids[r]) for r in b}) == 2 for b in batches)
    up.num_mini_batches = 4  # 6 groups do not split into 4: no silent 3 steps
    with pytest.raises(ConfigError, match=r"6 groups .*num_mini_batches=4"):
        up.mini_batches(ro, 0)
