"""Issue 17's fast paths compute what the plain paths compute (fp32, the tiny models):

* the vision tower run once per distinct image of a batch (the G copies of a prompt's
  images share its features) gives the log-probs and the gradients of running it per copy;
* the decode loop of the transformers engine (each prompt prefilled once, its KV cache
  shared by its G samples, transformers' logits processors, the same RNG stream) draws, with
  a fixed seed, exactly the completions transformers ``generate`` draws, with the same
  sampler log-probs, for several images per prompt and prompts of different lengths;
* the log-prob forwards (reference, old policy, policy with autograd) that run each prompt
  once with its KV cache shared by its samples give the log-probs, entropies and gradients of
  one full forward per sample, also for micro-batches that split a group;
* a 5-step training run with all of them on reports the metrics of the run with all off.
"""

from pathlib import Path

import pytest
import torch
from conftest import make_image
from hydra import compose, initialize_config_dir

import framework.logprobs as logprobs_mod
import framework.rollout.inputs as inputs_mod
from framework.logprobs import completion_logprobs
from framework.models.loading import load_model, load_model_bundle, resolve_path
from framework.rollout.base import SamplingParams
from framework.rollout.hf import HFGenerateEngine
from framework.rollout.inputs import distinct_images, encode_prompts, expand_inputs, training_inputs

G = 4
SYSTEM = "Think in <think> </think>, answer in <answer> </answer>."


def _records(n, images=True):
    out = []
    for i in range(n):
        rec = {"id": f"r{i}", "question": "How many shapes are in the image?" + " Look." * i, "answer": "1"}
        if images:  # two images each, of different sizes across prompts
            rec["question"] = "<image> <image> " + rec["question"]
            rec["images"] = [make_image(56 + 28 * (i % 2), i), make_image(56, 10 + i)]
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def vl():
    path = resolve_path("tiny:qwen2_5_vl-sft")  # warm-started: some completions end early, some run out
    torch.manual_seed(0)
    return load_model(path, "float32"), load_model_bundle(path)


@pytest.fixture(scope="module")
def text():
    path = resolve_path("tiny:qwen2-sft")
    torch.manual_seed(0)
    return load_model(path, "float32"), load_model_bundle(path)


def _unshared(monkeypatch):
    monkeypatch.setattr(inputs_mod, "share_image_features", lambda model, kw: kw)
    monkeypatch.setattr(logprobs_mod, "SHARE_PROMPTS", False)


def _forward_inputs(model, bundle, n_prompts=3):
    pb = encode_prompts(bundle, _records(n_prompts), SYSTEM)
    inp = expand_inputs(pb.inputs, G, pb.images_per_sample)
    N = inp["input_ids"].shape[0]
    gen = torch.Generator().manual_seed(1)
    comp = torch.randint(10, 200, (N, 9), generator=gen)
    mask = torch.ones(N, 9)
    mask[1, 5:] = 0
    mask[6, 2:] = 0
    return training_inputs(inp, comp, mask, model), pb


def test_distinct_images_finds_the_copies_of_each_prompts_images(vl):
    model, bundle = vl
    kw, pb = _forward_inputs(model, bundle)
    keep, index = distinct_images(kw)
    assert len(keep) == 6  # 3 prompts x 2 images, each repeated G = 4 times
    assert index == [j for p in range(3) for _ in range(G) for j in (2 * p, 2 * p + 1)]


def test_shared_image_features_give_the_same_logprobs_and_gradients(vl, monkeypatch):
    model, bundle = vl
    kw, _ = _forward_inputs(model, bundle)
    calls = []
    real = type(model.model).get_image_features

    def spy(self, pixel_values, grid, **k):
        calls.append(int(grid.shape[0]))
        return real(self, pixel_values, grid, **k)

    monkeypatch.setattr(type(model.model), "get_image_features", spy)
    T = 9  # completion tokens

    def run():
        model.zero_grad(set_to_none=True)
        lp, _ = completion_logprobs(model, kw, T)
        lp.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "visual" in n}
        return lp.detach(), grads

    shared, g_shared = run()
    assert calls == [6]  # one pass over the 6 distinct images instead of 24
    with monkeypatch.context() as m:
        _unshared(m)
        plain, g_plain = run()
    assert calls == [6, 24]
    assert torch.allclose(shared, plain, atol=1e-5, rtol=0)
    assert g_shared.keys() == g_plain.keys() and g_shared
    for n in g_plain:  # the vision tower's gradient: the G copies add up through the one pass
        assert torch.allclose(g_shared[n], g_plain[n], atol=1e-5, rtol=1e-4), n
    model.zero_grad(set_to_none=True)


SAMPLING = [
    SamplingParams(temperature=1.0, max_new_tokens=16, return_logprobs=True),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=16, return_logprobs=True),
    SamplingParams(temperature=0.0, max_new_tokens=16),
]


@pytest.mark.parametrize("kind", ["vl", "text"])
@pytest.mark.parametrize("sp", SAMPLING, ids=["t1", "t0.7-top_p-top_k", "greedy"])
def test_decode_loop_draws_the_completions_generate_draws(request, kind, sp):
    model, bundle = request.getfixturevalue(kind)
    prompts = encode_prompts(bundle, _records(3, images=kind == "vl"), SYSTEM)
    engine = HFGenerateEngine(None, bundle, model)
    out = {}
    for lean in (True, False):
        engine.lean = lean
        torch.manual_seed(123)
        out[lean] = engine.generate(prompts, G, sp)
    a, b = out[True], out[False]
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask) and torch.equal(a.truncated, b.truncated)
    lengths = a.completion_mask.sum(1)
    if sp.temperature > 0:  # samples that stop early next to longer ones (padding)
        assert lengths.min() < lengths.max()
    if sp.return_logprobs:
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["vl", "text"])
def test_shared_prompt_forward_gives_the_logprobs_and_gradients_of_full_forwards(request, kind, monkeypatch):
    from framework.types import Rollout

    model, bundle = request.getfixturevalue(kind)
    pb = encode_prompts(bundle, _records(3, images=kind == "vl"), SYSTEM)  # 3 prompt lengths
    inp = expand_inputs(pb.inputs, G, pb.images_per_sample)
    N = 3 * G
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(N, 9)
    mask[1, 5:] = 0
    mask[6, 2:] = 0
    ro = Rollout(
        completion_ids=torch.randint(10, 200, (N, 9), generator=gen),
        completion_mask=mask,
        group_ids=torch.arange(3).repeat_interleave(G),
        rewards=torch.zeros(N),
        correct=torch.zeros(N),
        truncated=torch.zeros(N, dtype=torch.bool),
        prompt_inputs=inp,
        images_per_sample=[c for c in pb.images_per_sample for _ in range(G)],
    )
    mb = ro.select(list(range(1, 11)))  # a micro-batch that splits the first and the last group
    assert logprobs_mod.prompt_runs(mb.prompt_inputs, mb.images_per_sample) == [3, 4, 3]
    assert logprobs_mod.shares_prompts(model)
    weights = torch.randn(10, 9, generator=gen)
    lp_fn = logprobs_mod.RolloutLogProbs(1.0, 7, "cpu")  # LM-head chunks across samples too

    def run():
        model.zero_grad(set_to_none=True)
        lp, ent = lp_fn(model, mb, with_entropy=True)
        (lp * mb.completion_mask * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return lp.detach() * mb.completion_mask, ent * mb.completion_mask, grads

    shared = run()
    monkeypatch.setattr(logprobs_mod, "SHARE_PROMPTS", False)
    plain = run()
    model.zero_grad(set_to_none=True)
    assert torch.allclose(shared[0], plain[0], atol=1e-5, rtol=0)
    assert torch.allclose(shared[1], plain[1], atol=1e-5, rtol=0)
    assert shared[2].keys() == plain[2].keys()
    for n, g in plain[2].items():  # measured: 4e-7 relative at most
        assert float((shared[2][n] - g).norm() / g.norm().clamp(min=1e-30)) < 1e-5, n
    with torch.no_grad():  # the no-grad passes (reference, old policy) take the same path
        assert torch.allclose(lp_fn(model, mb)[0] * mb.completion_mask, plain[0], atol=1e-5, rtol=0)


CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
RUN = [
    "trainer.max_steps=5",
    "trainer.prompts_per_step=2",
    "rollout.group_size=3",
    "rollout.max_new_tokens=10",
    "trainer.eval_every=0",
    "trainer.eval_size=1",
    "data.train_size=16",  # the data checks read every record: keep the set small
    "data.test_size=4",
    "optim.lr=1e-3",
    "reward.correctness=format",  # no math-verify worker pool to start twice
    "~reward.components.accuracy",
    "logger.wandb=false",
    "trainer.progress_bar=false",
]
COMPARED = ("reward", "loss", "kl", "grad_norm", "entropy", "completions/mean_length", "accuracy")


@pytest.mark.slow
def test_five_training_steps_match_with_the_fast_paths_off(tmp_path, monkeypatch):
    """Both fast paths on (the default) against both off: the same samples (same RNG stream)
    and log-probs equal to 1e-5, so every logged metric agrees within 1e-4 relative."""
    from framework.train import train

    def run(d):
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose("config", overrides=[f"output_dir={tmp_path / d}", *RUN])
        return [r for r in train(cfg).history if "loss" in r]

    fast = run("fast")
    monkeypatch.setattr(HFGenerateEngine, "lean", False)
    _unshared(monkeypatch)
    plain = run("plain")
    assert len(fast) == len(plain) == 5
    for f, p in zip(fast, plain):
        for k in COMPARED:
            assert f[k] == pytest.approx(p[k], rel=1e-4, abs=1e-6), (k, f["rl_step"])
