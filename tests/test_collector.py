"""Rollout assembly (framework/rollout/collector.py) with the real transformers engine on the
tiny Qwen2.5-VL: DAPO refill rounds, the concatenation of kept groups whose prompts differ in
length and image count (the training forward sees the same log-probs as on each part alone),
and the fill-up when too few groups are kept."""

import pytest
import torch
from conftest import make_image

from framework.logprobs import RolloutLogProbs
from framework.models.loading import load_model
from framework.rollout.base import SamplingParams
from framework.rollout.collector import DynamicSampling, RolloutCollector
from framework.rollout.hf import HFGenerateEngine
from framework.rollout.inputs import encode_prompts
from framework.types import Rollout
from rewards import RewardSet

G = 3


def _rec(rid, n_images, words):
    q = ("<image> " * n_images) + "How many shapes?" + " Look closely." * words
    return {
        "id": rid,
        "question": q,
        "images": [make_image(56 + 28 * k, hash(rid) % 100 + k) for k in range(n_images)],
        "answer": "2",
    }


class SpyEngine(HFGenerateEngine):
    """The real engine, remembering which prompts it generated for."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def generate(self, prompts, n, sampling):
        self.calls.append([r["id"] for r in prompts.records])
        return super().generate(prompts, n, sampling)


@pytest.fixture(scope="module")
def setup(tiny_vl_path, vl_bundle):
    torch.manual_seed(0)
    model = load_model(tiny_vl_path, "float32")
    rewards = RewardSet({"format": {"weight": 1.0}}, correctness="format")
    yield model, vl_bundle, rewards
    rewards.close()


def _collector(setup, keep_ids, rounds, max_extra_rounds=3):
    model, bundle, rewards = setup
    engine = SpyEngine(None, bundle, model)

    def keep(ro):  # a deterministic stand-in for "the group's rewards differ"
        return torch.tensor([ro.records[i]["id"] in keep_ids for i in range(0, len(ro), G)])

    c = RolloutCollector(
        engine,
        lambda recs: encode_prompts(bundle, recs, None),
        rewards,
        bundle.tokenizer,
        SamplingParams(max_new_tokens=8),
        group_size=G,
        dynamic_sampling=DynamicSampling(keep, max_extra_rounds, iter(rounds)),
    )
    return c, engine


def test_refill_rounds_until_enough_groups_are_kept(setup):
    first = [_rec("a0", 1, 0), _rec("a1", 2, 3), _rec("a2", 1, 1)]
    rounds = [
        [_rec("b0", 0, 5), _rec("b1", 1, 0), _rec("b2", 2, 0)],
        [_rec("c0", 1, 2), _rec("c1", 1, 0), _rec("c2", 1, 0)],
    ]
    c, engine = _collector(setup, {"a1", "b0", "b2", "c0"}, rounds)
    ro, metrics = c(first, rl_step=0)
    assert engine.calls == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]  # one extra round was enough
    assert metrics["filter_groups/extra_rounds"] == 1.0
    assert metrics["filter_groups/kept_frac_first_round"] == pytest.approx(1 / 3)
    assert metrics["filter_groups/filled_groups"] == 0.0
    assert [ro.records[i]["id"] for i in range(0, len(ro), G)] == ["a1", "b0", "b2"]  # the first 3 kept, in order
    assert ro.group_ids.tolist() == [0] * G + [1] * G + [2] * G
    assert ro.images_per_sample == [2] * G + [0] * G + [2] * G
    assert len(ro.texts) == len(ro.records) == 3 * G
    assert ro.prompt_inputs["image_grid_thw"].shape[0] == 4 * G  # the image rows of exactly those samples


def test_concatenated_groups_keep_their_logprobs(setup):
    """Parts with different prompt lengths and image counts (0, 1, 2 images): the forward over
    the merged batch (re-padded prompts and completions, concatenated image rows) gives each
    sample the log-probs it has in its own part."""
    model, bundle, rewards = setup
    c = RolloutCollector(
        HFGenerateEngine(None, bundle, model),
        lambda recs: encode_prompts(bundle, recs, None),
        rewards,
        bundle.tokenizer,
        SamplingParams(max_new_tokens=8),
        group_size=G,
    )
    torch.manual_seed(1)
    p1 = c.collect([_rec("x0", 1, 0), _rec("x1", 2, 6)], 0, {})
    p2 = c.collect([_rec("y0", 0, 9), _rec("y1", 1, 1)], 0, {})
    assert p1.prompt_inputs["input_ids"].shape[1] != p2.prompt_inputs["input_ids"].shape[1]
    parts = [p1.select(list(range(G, 2 * G))), p2.select(list(range(0, 2 * G)))]
    merged = Rollout.concat(parts)
    assert merged.group_ids.tolist() == [0] * G + [1] * G + [2] * G
    lp = RolloutLogProbs(1.0, 16, "cpu")
    whole = lp.no_grad(model, merged, [(list(range(len(merged))), True)])
    alone = [lp.no_grad(model, p, [(list(range(len(p))), True)]) for p in parts]
    T = merged.completion_ids.shape[1]
    want = torch.cat([torch.nn.functional.pad(a, (0, T - a.shape[1])) for a in alone])
    assert (merged.completion_mask.sum(1) == torch.cat([p.completion_mask.sum(1) for p in parts])).all()
    torch.testing.assert_close(whole, want, atol=1e-5, rtol=0)


def test_too_few_kept_groups_are_filled_up_from_the_first_round(setup):
    first = [_rec("a0", 1, 0), _rec("a1", 1, 0), _rec("a2", 1, 0), _rec("a3", 1, 0)]
    rounds = [[_rec("b0", 1, 0), _rec("b1", 1, 0), _rec("b2", 1, 0), _rec("b3", 1, 0)]]
    # one round only, 2 groups kept in all: 2 unkept groups of the first round fill up to 4
    c, engine = _collector(setup, {"a2", "b1"}, rounds, max_extra_rounds=1)
    ro, metrics = c(first, rl_step=0)
    assert metrics["filter_groups/extra_rounds"] == 1.0 and metrics["filter_groups/filled_groups"] == 2.0
    assert [ro.records[i]["id"] for i in range(0, len(ro), G)] == ["a2", "b1", "a0", "a1"]
    assert ro.group_ids.unique().numel() == 4


def test_nothing_kept_trains_on_the_first_round(setup):
    first = [_rec("a0", 1, 0), _rec("a1", 2, 0)]
    rounds = [[_rec(f"b{i}", 1, 0), _rec(f"c{i}", 1, 0)] for i in range(3)]
    c, engine = _collector(setup, set(), rounds, max_extra_rounds=2)
    ro, metrics = c(first, rl_step=0)
    assert len(engine.calls) == 3 and metrics["filter_groups/extra_rounds"] == 2.0
    assert metrics["filter_groups/filled_groups"] == 2.0
    assert [ro.records[i]["id"] for i in range(0, len(ro), G)] == ["a0", "a1"]
    assert ro.images_per_sample == [1] * G + [2] * G
